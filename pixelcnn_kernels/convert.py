"""``convert(model)``: swap the masked convolutions of someone else's PixelCNN for fused ones.

It recognises masked convolutions by what they hold, not by class name:

1. an ``nn.Conv2d`` (subclass or not) holding a 0/1 tensor whose attribute name
   contains ``mask`` (a buffer, a frozen Parameter or a plain attribute) of
   shape (kh, kw), (1, 1, kh, kw) or the weight's (out, in, kh, kw), applied to
   the weight in ``forward`` in place or functionally;
2. a wrapper module holding exactly one ``nn.Conv2d`` child and such a mask;
3. a pad-conv-shift module: one ``nn.Conv2d`` child without padding and either
   an ``nn.ZeroPad2d`` child or an ``F.pad`` call in ``forward``, as in
   PixelCNN++'s ``down_shifted_conv2d`` / ``down_right_shifted_conv2d``, whose
   output may then move one row down (a down-shifted conv) or one column right
   (a down-right-shifted one), as PixelCNN++'s first layers'
   ``shift_output_down`` / ``shift_output_right`` do.

The mask becomes a :class:`~pixelcnn_kernels.masks.MaskSpec` (a named spec such
as ``"A"``/``"B"`` when it is one, else a custom tap mask; a full mask with the
R, G, B channel pattern at the centre gives ``color_groups=3``). A replacement is
made only after it gives the same output as the old module on random probe
inputs, both with the module's current weights and with random weights (so a
module that holds a mask but does not apply it is caught), within
:func:`pixelcnn_kernels.testing.tolerance` of the weight's dtype. The probes
leave the weights as they were.

The replacement holds the same Parameter objects (an optimizer built before the
conversion keeps working) and has the same ``state_dict()`` keys: a mask kept in
the state dict is registered on the replacement under its old name, and loading
a state dict whose mask differs from the one the fused conv implements raises a
ValueError. Checkpoints load both ways.

A weight-normalised conv (``torch.nn.utils.weight_norm``, PixelCNN++'s default,
or any ``torch.nn.utils.parametrize`` parametrization of the weight) keeps its
normalisation: the replacement computes its weight by the same hook or
parametrization from the same Parameters (:meth:`MaskedConv2d.from_conv`).

Not converted (each skipped candidate is listed in the report with the reason):
strided, grouped or non-zero-padded convs, convs with a parametrized bias,
modules with hooks (other than weight norm's), modules whose forward needs more
than the image or returns more than a tensor, and modules whose forward does
more than the masked conv (and the output shift of kind 3).

Code-level operations cannot be swapped by walking modules; change one line:
``a, b = x.chunk(2, dim); torch.tanh(a) * torch.sigmoid(b)`` becomes
``pixelcnn_kernels.gate_tanh_sigmoid(x, dim)``, and PixelCNN++'s
``discretized_mix_logistic_loss(x, l)`` becomes
``pixelcnn_kernels.compat.discretized_mix_logistic_loss(x, l)``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from pixelcnn_kernels.masks import MaskSpec, resolve_mask, splits_into_color_groups
from pixelcnn_kernels.nn import MaskedConv2d
from pixelcnn_kernels.nn.masked_conv import refresh_weight_norm, weight_norm_hook, weight_norm_parameters
from pixelcnn_kernels.reference.layers import down_shift, right_shift
from pixelcnn_kernels.testing import tolerance
from pixelcnn_kernels.utils import TrainingModes, check_int

PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d)
SHIFT_MASKS = ("down_shifted", "down_right_shifted")
# The output shift a pad-conv-shift module of each shifted mask may apply after its conv (PixelCNN++'s first layers).
OUTPUT_SHIFTS = {"down_shifted": "down", "down_right_shifted": "right"}
# Tried in this order, so a mask several names describe gets the most specific (a 1×k "B" is "horizontal").
CENTRED_MASKS = ("full", "horizontal", "horizontal_A", "A", "B", "vertical", "vertical_A")
PROBE_SIZE = 9  # probe images are at least 9×9: every tap of a small kernel sees interior and border pixels
PROBE_BATCH = 2


@dataclass(frozen=True)
class Replaced:
    """A module ``convert`` replaced: its name in the model, old and new class, the mask it implements."""

    name: str
    old_class: str
    new_class: str
    mask: str


@dataclass(frozen=True)
class Skipped:
    """A candidate left as it was, and why."""

    name: str
    old_class: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did; ``model`` is the converted model, ``str(report)`` a table."""

    model: nn.Module
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("replaced", r.name or "(model)", r.old_class, f"{r.new_class}, mask {r.mask}") for r in self.replaced]
        rows += [("skipped", s.name or "(model)", s.old_class, s.reason) for s in self.skipped]
        header = ("action", "module", "class", "replacement / reason")
        widths = [max(len(row[k]) for row in [header, *rows]) for k in range(3)]
        lines = [f"convert: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        if not rows:
            return lines[0] + (
                "; no masked convolution found. convert recognises a Conv2d holding a 0/1 mask tensor, a module "
                "wrapping one Conv2d and such a mask, and a pad-then-conv module (help(pixelcnn_kernels.convert)); "
                "a conv padded by its own padding and cropped by its caller is not one of them"
            )
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
        return "\n".join(lines)


class NotConvertible(Exception):
    """Internal: a candidate cannot be replaced; the message is the report's reason."""


class MaskedConvWrapper(nn.Module):
    """Holds a fused masked conv under the child name the replaced wrapper used (keeps state-dict keys);
    ``output_shift`` ("down", "right" or None) moves its output as the replaced module did."""

    def __init__(self, conv_name: str, conv: nn.Module, output_shift: str | None = None):
        super().__init__()
        self.conv_name = conv_name
        self.output_shift = output_shift
        self.add_module(conv_name, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._modules[self.conv_name](x)
        if self.output_shift is None:
            return out
        return down_shift(out) if self.output_shift == "down" else right_shift(out)

    def extra_repr(self) -> str:
        shift = "" if self.output_shift is None else f", output_shift={self.output_shift!r}"
        return f"conv_name={self.conv_name!r}{shift}"


@dataclass(frozen=True)
class _MaskTensor:
    """A mask tensor found on a module: its attribute name, value and how it is stored."""

    name: str
    tensor: torch.Tensor
    storage: str  # "parameter", "buffer", "non-persistent buffer" or "attribute"


def _find_masks(module: nn.Module) -> list[_MaskTensor]:
    """Tensors held directly by ``module`` whose name contains "mask" (in definition order)."""
    found = []
    for name, param in module._parameters.items():
        if param is not None and "mask" in name.lower():
            found.append(_MaskTensor(name, param, "parameter"))
    for name, buffer in module._buffers.items():
        if buffer is not None and "mask" in name.lower():
            storage = "non-persistent buffer" if name in module._non_persistent_buffers_set else "buffer"
            found.append(_MaskTensor(name, buffer, storage))
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor) and "mask" in name.lower():
            found.append(_MaskTensor(name, value, "attribute"))
    return found


def _named_equivalent(spec: MaskSpec) -> str | torch.Tensor:
    """The name of the centred named spec equal to ``spec``, else its tap mask (a custom spec)."""
    for name in CENTRED_MASKS:
        try:
            named = resolve_mask(name, spec.kernel_size, spec.color_groups)
        except ValueError:  # the name does not exist for this kernel size
            continue
        if dataclasses.replace(named, name=spec.name) == spec:
            return name
    return spec.tap_mask()


def _describe(mask: str | torch.Tensor, kernel_size: tuple[int, int], dilation: int, color_groups: int) -> str:
    what = mask if isinstance(mask, str) else "custom"
    dilated = f", dilation {dilation}" if dilation > 1 else ""
    groups = f", colour groups {color_groups}" if color_groups > 1 else ""
    return f"{what} {kernel_size[0]}×{kernel_size[1]}{dilated}{groups}"


def _infer_mask(found: _MaskTensor, weight_shape: torch.Size) -> tuple[str | torch.Tensor, int]:
    """(mask for MaskedConv2d, color_groups) equal to a 0/1 weight mask; NotConvertible if none is."""
    out_channels, in_channels, kh, kw = weight_shape
    values = found.tensor.detach().to("cpu", torch.float64)
    if not bool(((values == 0) | (values == 1)).all()):
        raise NotConvertible(f"{found.name!r} holds values other than 0 and 1")
    if tuple(values.shape) in ((kh, kw), (1, 1, kh, kw)):
        full = values.reshape(kh, kw).expand(out_channels, in_channels, kh, kw)
    elif values.shape == weight_shape:
        full = values
    else:
        raise NotConvertible(f"{found.name!r} has shape {tuple(values.shape)}, not the weight's {tuple(weight_shape)} or ({kh}, {kw})")
    if kh % 2 == 0 or kw % 2 == 0:
        raise NotConvertible(f"a centred mask needs odd kernel sizes, got {(kh, kw)}")
    union = full.bool().any(dim=1).any(dim=0)
    for color_groups in (1, 3) if splits_into_color_groups(out_channels, 3) and splits_into_color_groups(in_channels, 3) else (1,):
        for anchor_active in (True, False) if color_groups > 1 else (bool(union[kh // 2, kw // 2]),):
            taps = union.clone()
            taps[kh // 2, kw // 2] = anchor_active
            try:
                spec = resolve_mask(taps, color_groups=color_groups)
            except ValueError:  # e.g. no active tap
                continue
            if torch.equal(spec.weight_mask(out_channels, in_channels, torch.float64), full):
                return _named_equivalent(spec), color_groups
    raise NotConvertible(
        f"{found.name!r} is not a spatial mask (uniform over channels, or the R,G,B colour-group pattern "
        "over contiguous groups [R|G|B] of the channels, as pixelcnn_kernels.masks splits them; channels "
        "interleaved R,G,B,R,... are not supported)"
    )


def _check_plain_conv(conv: nn.Conv2d) -> int:
    """The conv's dilation, after checking the fused conv can stand in for it."""
    if parametrize.is_parametrized(conv) and set(conv.parametrizations) != {"weight"}:
        raise NotConvertible(f"parametrizations of {sorted(set(conv.parametrizations) - {'weight'})}: the fused conv carries over the weight's only")
    if tuple(conv.stride) != (1, 1):
        raise NotConvertible(f"stride {tuple(conv.stride)}: the fused conv is stride 1")
    if conv.groups != 1:
        raise NotConvertible(f"groups={conv.groups}: the fused conv is not grouped")
    if conv.padding_mode != "zeros":
        raise NotConvertible(f"padding_mode={conv.padding_mode!r}: the fused conv pads with zeros")
    if conv.dilation[0] != conv.dilation[1]:
        raise NotConvertible(f"dilation {tuple(conv.dilation)} differs between height and width")
    return conv.dilation[0]


def _check_no_hooks(*modules: nn.Module) -> None:
    """NotConvertible where a module has hooks other than weight norm's (which the replacement carries over)."""
    for module in modules:
        carried_over = weight_norm_hook(module)
        forward_pre_hooks = [hook for hook in module._forward_pre_hooks.values() if hook is not carried_over]
        if module._forward_hooks or forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            raise NotConvertible(f"{type(module).__name__} has forward/backward hooks the replacement would not run")


def _keep_mask(replacement: nn.Module, found: _MaskTensor) -> None:
    """Registers a state-dict mask on the replacement under its old name, checked on load."""
    if found.storage == "attribute":
        return
    if found.storage == "parameter":
        replacement.register_parameter(found.name, found.tensor)
    else:
        replacement.register_buffer(found.name, found.tensor, persistent=found.storage == "buffer")
    # On the CPU: the model may move to another device after the conversion.
    implemented = found.tensor.detach().cpu().clone()

    def check_loaded_mask(module: nn.Module, incompatible_keys) -> None:
        if not torch.equal(getattr(module, found.name).detach().cpu().to(implemented.dtype), implemented):  # 0/1: exact in any dtype
            raise ValueError(
                f"the loaded {found.name!r} differs from the mask this converted conv implements; "
                "load that state dict into the unconverted model"
            )

    replacement.register_load_state_dict_post_hook(check_loaded_mask)


def _probe_inputs(conv: nn.Conv2d, generator: torch.Generator) -> torch.Tensor:
    kh, kw = conv.kernel_size
    size = max(PROBE_SIZE, 2 * conv.dilation[0] * max(kh, kw) + 1)
    x = torch.randn(PROBE_BATCH, conv.in_channels, size, size, generator=generator, dtype=torch.float64)
    weight = _weight_and_bias(conv)[0]  # a Parameter: weight norm's computed weight is stale until a forward
    return x.to(device=weight.device, dtype=weight.dtype)


def _probe(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; NotConvertible where its forward needs more than ``x`` or returns no tensor (a MaskedConv2d's forward does neither)."""
    try:
        out = module(x)
    except Exception as exc:  # e.g. forward(x, h) of a conditional conv
        raise NotConvertible(f"its forward cannot run on an image batch alone ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor):
        raise NotConvertible(f"its forward returns a {type(out).__name__}, not a tensor")
    return out


def _weight_and_bias(conv: nn.Conv2d) -> list[nn.Parameter]:
    """The Parameters of ``conv``'s weight (or those weight norm or a parametrization computes it from) and its bias: not a mask held as one."""
    weight = list(weight_norm_parameters(conv).values())
    if not weight:
        weight = list(conv.parametrizations.weight.parameters()) if parametrize.is_parametrized(conv, "weight") else [conv.weight]
    return weight + ([conv.bias] if conv.bias is not None else [])


def _buffer_snapshot(*modules: nn.Module) -> Callable[[], None]:
    """A function that puts back the values every buffer of ``modules`` holds now.

    A forward in training mode may update buffers in place (spectral norm's power
    iteration vectors, a batch norm's running statistics): the probes must leave them
    as they were, and each probe must start from the same state.
    """
    buffers = {id(b): b for module in modules for b in module.buffers()}
    saved = [(b, b.detach().clone()) for b in buffers.values()]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)

    return restore


def _replayed_randomness(device: torch.device) -> Callable[[], None]:
    """A function that puts the global generators a forward on ``device`` draws from (the CPU's, and
    ``device``'s) back to their state now: before each of two forwards, they draw the same dropout
    masks; after the probes, the random streams are where they were."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return replay


def _verify(old: nn.Module, new: nn.Module, conv: nn.Conv2d, generator: torch.Generator) -> None:
    """Raises NotConvertible unless ``old`` and ``new`` agree on probe inputs, with current and random
    weights, in training and in eval mode (each pair of calls drawing the same random numbers: a
    module that drops out in training mode, which the masked conv does not, differs there).

    Leaves the Parameters, buffers, modes and the global random generators as they were.
    """
    params = _weight_and_bias(conv)
    saved = [p.detach().clone() for p in params]
    restore_buffers = _buffer_snapshot(old, new)
    modes = TrainingModes(old, new)
    replay_randomness = _replayed_randomness(params[0].device)
    rtol, atol = tolerance(params[0].dtype, tf32=params[0].device.type == "cuda")
    try:
        with torch.no_grad():
            for weights in ("current", "random"):
                if weights == "random":
                    # Scaled like the default init (outputs of order 1), so the tolerance means the same as for trained weights.
                    scale = (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]) ** -0.5
                    for p in params:
                        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).mul_(scale).to(p))
                x = _probe_inputs(conv, generator)
                for training in (True, False):
                    modes.set(training)
                    replay_randomness()
                    expected = _probe(old, x)
                    restore_buffers()
                    replay_randomness()
                    actual = new(x)
                    restore_buffers()
                    if actual.shape != expected.shape:
                        raise NotConvertible(f"output shape {tuple(actual.shape)} differs from the module's {tuple(expected.shape)}")
                    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
                        difference = (actual.double() - expected.double()).abs().max().item()
                        raise NotConvertible(
                            f"output differs from the masked conv on a probe with {weights} weights in {'training' if training else 'eval'} "
                            f"mode (max |difference| {difference:.3g}, atol {atol:g}, rtol {rtol:g})"
                        )
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        restore_buffers()
        replay_randomness()
        modes.restore()
        for module in (old, new):  # weight norm's weights were last computed from the probe's random Parameters
            refresh_weight_norm(module)


def _check_same_state(old: nn.Module, new: nn.Module) -> None:
    old_keys, new_keys = set(old.state_dict()), set(new.state_dict())
    if old_keys != new_keys:
        raise NotConvertible(f"state_dict keys would change (lost {sorted(old_keys - new_keys)}, new {sorted(new_keys - old_keys)})")
    new_params = {id(p) for p in new.parameters()}
    lost = [name for name, p in old.named_parameters() if id(p) not in new_params]
    if lost:
        raise NotConvertible(f"the replacement would not hold the Parameters {lost}")


def _masked_conv(conv: nn.Conv2d, mask: str | torch.Tensor, dilation: int, color_groups: int) -> MaskedConv2d:
    return MaskedConv2d.from_conv(conv, mask, dilation=dilation, color_groups=color_groups)


def _padding_pair(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's (height, width) zero padding, with the "valid" and "same" strings resolved."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _check_centred_padding(conv: nn.Conv2d, dilation: int) -> None:
    kh, kw = conv.kernel_size
    centred = (dilation * (kh // 2), dilation * (kw // 2))
    if _padding_pair(conv) != centred:
        raise NotConvertible(f"padding {conv.padding} is not the centred padding {centred} a masked conv uses")


def _is_zero_pad(module: nn.Module) -> bool:
    return isinstance(module, PAD_MODULES) and getattr(module, "value", 0.0) == 0.0


def _wrapped_conv(module: nn.Module) -> tuple[str, nn.Conv2d]:
    """(name, conv) of a wrapper's one conv child; other children may only be zero padding."""
    (conv_name, conv), *_ = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Conv2d)]
    others = [type(c).__name__ for c in module.children() if c is not conv and not _is_zero_pad(c)]
    if others:
        raise NotConvertible(f"it also holds {others}, which the masked conv would drop")
    return conv_name, conv


def _shift_masks(module: nn.Module, conv: nn.Conv2d, dilation: int) -> list[str]:
    """The shifted specs that fit a pad-conv module: the one its pad child matches, or all (F.pad in forward)."""
    fitting = []
    for name in SHIFT_MASKS:
        try:
            spec = resolve_mask(name, conv.kernel_size)
        except ValueError:  # down_shifted needs an odd width
            continue
        top, bottom, left, right = spec.padding(dilation)
        fitting.append((name, (left, right, top, bottom)))
    pads = [c for c in module.children() if _is_zero_pad(c)]
    if not pads:
        return [name for name, _ in fitting]
    if len(pads) > 1:
        raise NotConvertible(f"it holds {len(pads)} padding modules")
    padding = tuple(pads[0].padding)
    matching = [name for name, pattern in fitting if pattern == padding]
    if not matching:
        raise NotConvertible(f"padding (left, right, top, bottom)={padding} is not a down-shift pattern {dict(fitting)}")
    return matching


def _is_candidate(module: nn.Module) -> bool:
    """Whether ``module`` looks like a masked conv of one of the three kinds (see the module docstring)."""
    if isinstance(module, (MaskedConv2d, MaskedConvWrapper)):  # already fused (e.g. converted before)
        return False
    if isinstance(module, nn.Conv2d):
        return bool(_find_masks(module))
    convs = [c for c in module.children() if isinstance(c, nn.Conv2d)]
    if len(convs) != 1 or _find_masks(convs[0]):
        return False
    if _find_masks(module) or any(_is_zero_pad(c) for c in module.children()):
        return True
    # An F.pad-then-conv module: its only child is an unpadded conv with a kernel to shift.
    conv = convs[0]
    only_child = len(module._modules) == 1
    return only_child and _padding_pair(conv) == (0, 0) and tuple(conv.kernel_size) != (1, 1)


def _replacement_options(module: nn.Module) -> tuple[nn.Conv2d, list[tuple[nn.Module, str]]]:
    """The conv whose Parameters the replacement shares, and the replacements to try in order."""
    masks = _find_masks(module)
    if len(masks) > 1:
        raise NotConvertible(f"it holds several mask tensors {[m.name for m in masks]}")
    if isinstance(module, nn.Conv2d):  # kind 1: a conv holding its own mask
        conv_name, conv = None, module
        others = [type(c).__name__ for name, c in module.named_children() if name != "parametrizations"]
        if others:
            raise NotConvertible(f"it also holds {others}, which the masked conv would drop")
    else:  # kinds 2 and 3: a wrapper of one conv
        conv_name, conv = _wrapped_conv(module)
    dilation = _check_plain_conv(conv)
    _check_no_hooks(module, conv)
    if masks:
        _check_centred_padding(conv, dilation)
        mask, color_groups = _infer_mask(masks[0], conv.weight.shape)
        choices = [(mask, color_groups, None)]
    else:
        if _padding_pair(conv) != (0, 0):
            raise NotConvertible(f"the conv pads by {conv.padding} itself, but a shifted conv is padded before it")
        shifted = _shift_masks(module, conv, dilation)
        choices = [(name, 1, None) for name in shifted] + [(name, 1, OUTPUT_SHIFTS[name]) for name in shifted]
    options = []
    for mask, color_groups, output_shift in choices:
        replacement = _masked_conv(conv, mask, dilation, color_groups)
        if conv_name is not None:
            replacement = MaskedConvWrapper(conv_name, replacement, output_shift)
        if masks:
            _keep_mask(replacement, masks[0])
        description = _describe(mask, conv.kernel_size, dilation, color_groups)
        options.append((replacement, description + (f", output shifted {output_shift}" if output_shift else "")))
    return conv, options


def _convert_one(module: nn.Module, generator: torch.Generator) -> tuple[nn.Module, str]:
    """The first replacement of ``module`` that verifies, and its mask; NotConvertible if none does.

    ``module``'s buffers end as they began: in training mode even reading a parametrized
    weight runs its parametrization, and spectral norm's then updates its vectors.
    """
    restore_buffers = _buffer_snapshot(module)
    try:
        conv, options = _replacement_options(module)
        failures = []
        for replacement, description in options:
            try:
                _verify(module, replacement, conv, generator)
                _check_same_state(module, replacement)
            except NotConvertible as exc:
                failures.append(f"as {description}: {exc}" if len(options) > 1 else str(exc))
                continue
            return replacement, description
        raise NotConvertible("; ".join(failures))
    finally:
        restore_buffers()


def convert(model: nn.Module, inplace: bool = True, *, seed: int = 0) -> ConversionReport:
    """Replaces every masked convolution of ``model`` it recognises and verifies; returns the report.

    ``inplace=False`` converts a deep copy (``report.model``; its Parameters are
    the copy's). ``seed`` seeds the probe inputs and weights. Modules replaced
    are listed in ``report.replaced``, candidates left alone with the reason in
    ``report.skipped``; ``print(report)`` shows both as a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    check_int(seed, "seed")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as exc:  # e.g. torch.nn.utils.weight_norm's computed weight
            raise ValueError(f"inplace=False converts a deep copy, and PyTorch cannot deep-copy this model ({exc}); convert it in place") from exc
    report = ConversionReport(model)
    generator = torch.Generator().manual_seed(seed)
    replaced_prefixes: list[str] = []
    # id(module) -> (its first name, its replacement or None, the replacement's description or the skip's reason):
    # a module held at several names (tied layers) gets one replacement at every name, so it stays one module.
    seen: dict[int, tuple[str, nn.Module | None, str]] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name.startswith(prefix + ".") for prefix in replaced_prefixes) or not _is_candidate(module):
            continue
        old_class = type(module).__name__
        if id(module) in seen:
            first_name, replacement, what = seen[id(module)]
            if replacement is None:
                report.skipped.append(Skipped(name, old_class, f"the module at {first_name!r} again: {what}"))
                continue
            description = f"{what} (the module at {first_name!r} again)"
        else:
            try:
                if not name:
                    raise NotConvertible("the model itself is the masked conv; convert a module that holds it")
                replacement, description = _convert_one(module, generator)
            except NotConvertible as exc:
                seen[id(module)] = (name, None, str(exc))
                report.skipped.append(Skipped(name, old_class, str(exc)))
                continue
            replacement.train(module.training)
            seen[id(module)] = (name, replacement, description)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)
        replaced_prefixes.append(name)
        report.replaced.append(Replaced(name, old_class, type(replacement).__name__, description))
    return report
