"""Checks that an autoregressive image model respects its generation order.

:func:`check_causality` takes the gradient of each output position with respect
to the input (on the CPU, with the model's weights in float64, or float32 for a
model whose forward casts its input, and convolutions without oneDNN or NNPACK's
transforms: a masked-out path gives a gradient of exactly zero) and classifies
every input position:

- **leak**: the output depends on an input at or after its own position in the
  generation order (a model trained with a leak learns to copy the answer);
- **blind spot**: an earlier input does not influence the output although an
  input farther away in the same direction does, i.e. a hole inside the
  receptive field (the upper-right blind spot of a plain stack of masked 3×3
  convolutions). Earlier inputs beyond the reach of a shallow network are not
  blind spots: nothing farther out is seen either. Holes that only close with
  more depth are reported too (e.g. PixelCNN++ with one block per resolution
  on a small image, whose coarse resolutions see farther up than its full
  resolution sees to the right).

Generation order: pixels in raster order (row by row, left to right) and, within
a pixel, channels in index order (R, then G, then B). How outputs map to it:

- an output of shape (B, K, C, H, W) (e.g. per-channel softmax logits):
  ``out[:, :, c, i, j]`` predicts input channel c at pixel (i, j);
- an output of shape (B, C', H, W): the C' channels are split into
  ``output_groups`` contiguous groups (of ⌈C' / output_groups⌉ channels, the last
  one the rest). With ``output_groups = C`` group g predicts input channel g (the
  colour-group convention of masked convolutions, :mod:`pixelcnn_kernels.masks`);
  with ``output_groups = 1`` every channel predicts the whole pixel (e.g.
  discretized-mixture-of-logistics parameters), so it may only see earlier
  pixels. Default: 1 for one input channel or where C' is not a multiple of C;
  otherwise the layout is ambiguous (30 channels may be 3 groups of logits or a
  3-component logistic mixture) and must be given.

An output position is written (g, i, j): g is the predicted channel (always 0
with one output group), (i, j) the pixel. Input positions are (c, i, j).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pixelcnn_kernels.masks import check_color_channels, color_group_size
from pixelcnn_kernels.models.base import PixelCNNModel
from pixelcnn_kernels.nn.masked_conv import refresh_weight_norm
from pixelcnn_kernels.utils import TrainingModes, check_int

ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
MAX_TABLE_ROWS = 20
MAX_LISTED_INPUTS = 4


@dataclass(frozen=True)
class CausalityFinding:
    """Input positions (c, i, j) that leak into, or are blind to, the output position (g, i, j)."""

    output: tuple[int, int, int]
    inputs: tuple[tuple[int, int, int], ...]


@dataclass
class CausalityReport:
    """What :func:`check_causality` found; ``str(report)`` prints a table.

    ``influence`` maps each checked output position (g, i, j) to a (C, H, W)
    boolean tensor: True where the input position influences that output (a
    non-zero gradient in some trial). Booleans, not the gradients: one byte per
    input and output position (150 MB for every output of a 3×64×64 image).
    """

    input_shape: tuple[int, int, int]
    output_groups: int
    leaks: list[CausalityFinding] = field(default_factory=list)
    blind_spots: list[CausalityFinding] = field(default_factory=list)
    influence: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no output leaks and none has a blind spot."""
        return not self.leaks and not self.blind_spots

    def receptive_field(self, position: tuple[int, int, int]) -> torch.Tensor:
        """The (C, H, W) boolean influence map of one checked output position (g, i, j)."""
        position = tuple(position)
        if position not in self.influence:
            raise ValueError(f"position {position} was not checked; check_causality(positions=...) chose which are")
        return self.influence[position]

    def categories(self, position: tuple[int, int, int]) -> torch.Tensor:
        """Per input position (C, H, W): 0 no influence, 1 influence (allowed), 2 leak, 3 blind spot."""
        seen = self.receptive_field(position)
        allowed = _allowed_inputs(self.input_shape, self.output_groups, position)
        category = torch.zeros(self.input_shape, dtype=torch.int64)
        category[seen & allowed] = 1
        category[seen & ~allowed] = 2
        for finding in self.blind_spots:
            if finding.output == tuple(position):
                for c, i, j in finding.inputs:
                    category[c, i, j] = 3
        return category

    def save_receptive_field_png(self, path: str | Path, position: tuple[int, int, int]) -> Path:
        """Saves a PNG map of one output's receptive field, one panel per input channel.

        Colours: white no influence, green influence, red leak, orange blind
        spot; the output's own pixel is outlined in blue.
        """
        path = Path(path)
        if path.suffix.lower() != ".png":  # matplotlib would add one, or write another format
            raise ValueError(f"path must name a .png file, got {str(path)!r}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch, Rectangle

        category = self.categories(position)
        channels = self.input_shape[0]
        colours = ListedColormap(["white", "tab:green", "tab:red", "tab:orange"])
        fig, axes = plt.subplots(1, channels, figsize=(max(3.2 * channels, 5.0), 3.4), squeeze=False)
        g, i, j = position
        for c, ax in enumerate(axes[0]):
            ax.imshow(category[c].numpy(), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:blue", linewidth=2))
            ax.set_title(f"input channel {c}")
            ax.set_xticks([])
            ax.set_yticks([])
        legend = [Patch(color=colours(k), label=label) for k, label in enumerate(["no influence", "influence", "leak", "blind spot"])]
        fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=4, fontsize="small")
        fig.suptitle(f"receptive field of output {tuple(position)} (group, row, col)", y=1.04)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def __str__(self) -> str:
        c, h, w = self.input_shape
        status = "OK" if self.ok else f"{len(self.leaks)} outputs leak, {len(self.blind_spots)} have blind spots"
        lines = [f"causality of a {c}×{h}×{w} input, {len(self.influence)} output positions checked: {status}"]
        findings = [("leak", f) for f in self.leaks] + [("blind spot", f) for f in self.blind_spots]
        if findings:
            lines.append(f"{'finding':<11} {'output (g,i,j)':<15} {'inputs':>6}  first inputs (c,i,j)")
            for kind, finding in findings[:MAX_TABLE_ROWS]:
                listed = ", ".join(str(p) for p in finding.inputs[:MAX_LISTED_INPUTS])
                more = " ..." if len(finding.inputs) > MAX_LISTED_INPUTS else ""
                lines.append(f"{kind:<11} {str(finding.output):<15} {len(finding.inputs):>6}  {listed}{more}")
            if len(findings) > MAX_TABLE_ROWS:
                lines.append(f"... and {len(findings) - MAX_TABLE_ROWS} more findings")
        return "\n".join(lines)


def _allowed_inputs(input_shape: tuple[int, int, int], output_groups: int, position: tuple[int, int, int]) -> torch.Tensor:
    """Boolean (C, H, W): the inputs that come before output position (g, i, j) in the generation order."""
    channels, height, width = input_shape
    g, i, j = position
    pixel = torch.arange(height * width).reshape(height, width)
    allowed = (pixel < i * width + j).expand(channels, height, width).clone()
    if output_groups == channels:  # per-channel outputs also see the earlier channels of their own pixel
        allowed[:g, i, j] = True
    return allowed


def _prefix_or(block: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """OR over all elements at lower-or-equal indices along ``dims`` (a cumulative OR)."""
    out = block.to(torch.int64)
    for dim in dims:
        out = out.cumsum(dim)
    return out > 0


def _blind_spots(seen: torch.Tensor, allowed: torch.Tensor, position: tuple[int, int, int]) -> torch.Tensor:
    """Boolean (C, H, W): allowed inputs that do not influence the output while a farther one does.

    "Farther" is in the output's frame: at least as many rows above, and (left
    and right separately) at least as many columns out; for an input in the
    output's own column, any input at least as many rows above. Earlier
    channels of the output's own pixel are always reached by a correct model.
    """
    _, i, j = position
    earlier = seen & allowed
    farther_seen = torch.zeros_like(seen)
    # Left of the output's column, rows 0..i: farther = up and left (lower row and column indices).
    farther_seen[:, : i + 1, :j] = _prefix_or(earlier[:, : i + 1, :j], (1, 2))
    # Right of its column, rows 0..i-1 (row i to the right is later): farther = up and right.
    farther_seen[:, :i, j + 1 :] = _prefix_or(earlier[:, :i, j + 1 :].flip(2), (1, 2)).flip(2)
    # Its own column, rows above: farther = any seen input at least as many rows up.
    row_seen = earlier[:, :i].any(dim=2)
    farther_seen[:, :i, j] = _prefix_or(row_seen, (1,))
    blind = allowed & ~seen & farther_seen
    own_pixel = allowed[:, i, j]
    blind[:, i, j] = own_pixel & ~seen[:, i, j]
    return blind


def _positions_of(mask: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(int(v) for v in p) for p in mask.nonzero())


def _output_layout(output: torch.Tensor, input_shape: tuple[int, int, int], output_groups: int | None) -> int:
    """The number of output groups, after checking the output's shape against the input's."""
    channels, height, width = input_shape
    if output.dim() == 5 and tuple(output.shape[2:]) == input_shape:
        if output_groups not in (None, channels):
            raise ValueError(f"output_groups must be {channels} (or None) for a (B, K, C, H, W) output, got {output_groups}")
        return channels
    if output.dim() == 4 and tuple(output.shape[2:]) == (height, width):
        out_channels = output.shape[1]
        if output_groups is None and channels > 1 and out_channels % channels == 0:
            raise ValueError(
                f"output_groups is needed for a (B, {out_channels}, H, W) output of a {channels}-channel input: 1 if every "
                f"output channel predicts the whole pixel (e.g. mixture-of-logistics parameters), {channels} if "
                f"{channels} contiguous groups predict the input channels in order"
            )
        groups = output_groups if output_groups is not None else 1
        if groups not in (1, channels):
            raise ValueError(f"output_groups must be 1 or {channels}, got {groups}")
        check_color_channels(out_channels, groups, "the model's output channels")
        return groups
    raise ValueError(
        f"the model's output must be (B, K, {channels}, {height}, {width}) or (B, C', {height}, {width}) for input_shape "
        f"{input_shape}, got shape {tuple(output.shape)}"
    )


def _select(output: torch.Tensor, groups: int, position: tuple[int, int, int]) -> tuple:
    """Index of one batch element's outputs at output position (g, i, j), minus the batch index."""
    g, i, j = position
    if output.dim() == 5:
        return (slice(None), g, i, j)
    size = color_group_size(output.shape[1], groups)
    return (slice(g * size, (g + 1) * size), i, j)


def _default_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The project models' float path (a fixed class for conditional ones), else ``model(x)``."""
    if isinstance(model, PixelCNNModel):
        model.check_spatial_size(x.shape[2], x.shape[3])  # model(x) checks it; the float path does not
        class_vector = None
        if model.num_classes is not None:
            class_vector = model.class_vector(torch.zeros(x.shape[0], dtype=torch.long), x.shape[0])
        return model.network(x, class_vector)
    return model(x)


class _NotATensorError(TypeError):
    """The model's forward returned something else than a tensor (in any dtype)."""


class _ForwardCall(nn.Module):
    """``forward_fn(model, x)`` as one module's forward, which :func:`torch.func.functional_call` runs on substituted weights."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.forward_fn(self.model, x)
        if not isinstance(output, torch.Tensor):
            raise _NotATensorError(f"the model's forward returned a {type(output).__name__}, not a tensor; pass forward_fn=lambda model, x: ... returning the output")
        return output


def _cpu_forward(model: nn.Module, forward_fn: ForwardFn, probe: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``x -> forward_fn(model, x)`` on CPU copies of the weights and buffers, float64 where the model runs
    in it, else float32 (a forward that casts its input, ``x.float()``), and ``x`` in that dtype; and its
    output on ``probe``, the run that chose the dtype.

    Substituted (:func:`torch.func.functional_call`) rather than a deep copy of the
    model, which PyTorch cannot make of ``torch.nn.utils.weight_norm`` modules.
    """
    call = _ForwardCall(model, forward_fn)
    # One name per tensor: functional_call ties the weights a model holds under several names itself.
    named = list(itertools.chain(call.named_parameters(), call.named_buffers()))
    failure = None
    for dtype in (torch.float64, torch.float32):
        state = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype) for name, t in named}

        def run(x: torch.Tensor, state=state, dtype=dtype) -> torch.Tensor:
            return torch.func.functional_call(call, state, (x.to(dtype),))

        try:
            with torch.no_grad():
                output = run(probe)
        except _NotATensorError:
            raise
        except Exception as exc:  # e.g. "Input type (float) and bias type (double) should be the same"
            failure = failure or exc
            continue
        return run, output
    raise failure


def _check_shape(input_shape: object) -> tuple[int, int, int]:
    if not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must hold positive ints, got {input_shape!r}")
    return tuple(input_shape)


def check_causality(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    forward_fn: ForwardFn | None = None,
    positions: Sequence[tuple[int, int, int]] | None = None,
    output_groups: int | None = None,
    trials: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> CausalityReport:
    """Finds leaks and blind spots of ``model`` on inputs of shape ``input_shape`` (C, H, W).

    The model runs in eval mode on CPU float64 copies of its weights (float32
    where its forward casts its input); its own weights and modes are left as
    they were. ``forward_fn(model, x)`` maps a float input (B, C, H, W) to the
    output tensor. Default: for the package's models
    (:class:`~pixelcnn_kernels.models.PixelCNNModel`) their float path
    ``network(x, class_vector)`` (class 0 for a class-conditional one; the
    mixture-of-logistics head counts as one output group), else ``model(x)``;
    pass one for models that take integer images or return several tensors:
    the input must reach the output through differentiable operations, or a
    ValueError says no output depends on it. ``positions``
    lists the output positions (g, i, j) to check (default: all; see the module
    docstring for g). Each output's gradient is taken at ``trials`` random inputs
    (uniform in [-1, 1]) and an input counts as influencing if any gradient is
    non-zero, so a unit that happens to be inactive (a ReLU at zero) at one
    input neither hides a leak nor makes a false blind spot; very narrow ReLU
    networks (a few channels per colour group) may need more ``trials``. Outputs are checked ``batch_size`` at a time, one batch
    element per output position (the model must not mix batch elements, which
    eval mode ensures for batch norm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_shape = _check_shape(input_shape)
    check_int(trials, "trials", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed")
    if output_groups is not None:
        check_int(output_groups, "output_groups", 1)
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable, got {type(forward_fn).__name__}")
    forward = forward_fn or _default_forward

    modes = TrainingModes(model)
    model.eval()
    try:
        with _exact_cpu_convolutions():
            return _check_causality(model, input_shape, forward, positions, output_groups, trials, batch_size, seed)
    finally:
        modes.restore()
        refresh_weight_norm(model)  # its hooks left CPU float64 weights computed from the substitutes


@contextlib.contextmanager
def _exact_cpu_convolutions():
    """CPU convolutions as plain sums of products: oneDNN and NNPACK may pick transformed (Winograd)
    algorithms, whose float32 rounding would turn a masked-out weight's zero into noise."""
    mkldnn_enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn_enabled


def _check_causality(model, input_shape, forward, positions, output_groups, trials, batch_size, seed) -> CausalityReport:
    channels, height, width = input_shape
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(trials, *input_shape, generator=generator, dtype=torch.float64) * 2 - 1
    if output_groups is None and isinstance(model, PixelCNNModel) and model.head == "dmol":
        output_groups = 1
    run, probe_output = _cpu_forward(model, forward, inputs[:1])
    groups = _output_layout(probe_output, input_shape, output_groups)

    all_positions = [(g, i, j) for i in range(height) for j in range(width) for g in range(groups)]
    if positions is None:
        targets = all_positions
    else:
        if not isinstance(positions, (tuple, list)) or not all(isinstance(p, (tuple, list)) for p in positions):
            raise ValueError(f"positions must be a list of (g, i, j) triples, got {positions!r}")
        targets = [tuple(p) for p in positions]
        bad = [p for p in targets if p not in set(all_positions)]
        if bad or not targets:
            raise ValueError(f"positions must be non-empty (g, i, j) with g < {groups}, i < {height}, j < {width}; got {bad or 'none'}")

    report = CausalityReport(input_shape, groups)
    # One batch of outputs at a time, through every trial, classified before the next:
    # only a batch's gradients are held in float64.
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        summed = torch.zeros(len(chunk), *input_shape, dtype=torch.float64)
        for trial in range(trials):
            x = inputs[trial].expand(len(chunk), *input_shape).clone().requires_grad_(True)
            with torch.enable_grad():
                output = run(x)
                cotangent = torch.zeros_like(output)
                for b, position in enumerate(chunk):
                    index = _select(output, groups, position)
                    cotangent[b][index] = torch.randn(output[b][index].shape, generator=generator, dtype=torch.float64).to(output.dtype)
                # No graph from x (integer casts, embeddings): no influence, reported below.
                (grad,) = torch.autograd.grad(output, x, cotangent, allow_unused=True) if output.requires_grad else (None,)
            if grad is not None:
                summed += grad.abs().double()
        for position, influence in zip(chunk, summed != 0):
            report.influence[position] = influence
            allowed = _allowed_inputs(input_shape, groups, position)
            leaked = _positions_of(influence & ~allowed)
            if leaked:
                report.leaks.append(CausalityFinding(position, leaked))
            blind = _positions_of(_blind_spots(influence, allowed, position))
            if blind:
                report.blind_spots.append(CausalityFinding(position, blind))
    if not any(report.influence[p].any() for p in targets) and any(_allowed_inputs(input_shape, groups, p).any() for p in targets):
        raise ValueError(
            "no output depends on the input through gradients: the forward quantises it, casts it to integers or looks it "
            "up in an embedding; pass forward_fn=lambda model, x: ... feeding the float input x in [-1, 1] to the layers"
        )
    return report
