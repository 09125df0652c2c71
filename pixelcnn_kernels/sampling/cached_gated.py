"""Cached incremental sampling of :class:`~pixelcnn_kernels.models.GatedPixelCNN`.

Generating one value only changes activations that depend on it (Fast WaveNet, Paine et
al. 2016), so each layer keeps its inputs in a cache and a step computes only what the
next value needs:

- **vertical stack, once per row.** Row i of every layer's vertical stack sees rows < i
  only, so when row i starts (rows above it final) one row of each layer's vertical
  pre-activation is computed from the cached rows above and stored: ``v_pre`` row i
  (the link to the horizontal stack) and the gated row, the next layer's input.
- **horizontal stack, once per value.** Pixel (i, j) of every layer's horizontal stack
  sees the pixels left of it in row i (and, through the colour masks, the lower colours
  of pixel (i, j)) and ``v_pre`` row i; one step computes the new pixel through every
  layer and the 1×1 head: a 1×k tap window from each layer's cached input row, the
  1×1 vertical link, the gate, the residual.

The vertical stack always runs in PyTorch (``F.conv2d`` on the masked weights over the
cached rows, the model's gate op). The horizontal step has two implementations:

- **PyTorch** (:class:`CachedGatedPixelCNN`, the reference): every cache is a layer
  input stored zero-padded by its convolution's padding, so a step's window is a slice;
  ``F.conv2d`` on the masked weights (``weight · mask``, as the reference masked
  convolution) over the window, the 1×1 link, the model's gate op, the 1×1 and the
  residual: about six launches per layer per value. It runs on the ``reference``
  backend (the default for CPU tensors) and in float64.
- **fused** (:class:`FusedCachedGatedPixelCNN`, the ``triton`` and ``cuda`` backends in
  float32, float16 and bfloat16): one launch per layer per value
  (:mod:`pixelcnn_kernels.ops.sampling`) for the first ``horizontal_A`` conv and for
  each gated layer's taps, bias, link, conditioning, colour-grouped gate, 1×1 and
  residual, reading a row buffer of the layer's input and writing the next layer's;
  with the softmax head, one more launch per value for the head (elu and the 1×1
  output conv), the draw and the writes of the drawn value
  (:func:`~pixelcnn_kernels.ops.sampling.softmax_draw_step`); with the DMOL head, the
  head in PyTorch ops and one launch for the draw and the writes
  (:func:`~pixelcnn_kernels.ops.sampling.dmol_draw_step`). The pixel is a device tensor, so on a CUDA device
  one whole pixel step (every value's layer steps, head, draw and writes, then the pixel
  increment) is captured once in a CUDA graph and replayed for every pixel, and so is
  one row's vertical stack (its row a device tensor too): no Python and no host
  synchronisation per pixel or per row.

**Exactness.** The step computes each activation from the same values as the full
forward, but on other shapes than the full image, which may sum in another order
(``F.conv2d`` on a window; the fused kernels' fp32 reductions): the logits can differ
from the full forward's in the last bits. The draft is then the naive sampler's image
unless a noise value falls within that rounding of a category boundary: never in
practice for a float64 model (the tests check the draft needed no repair), rarely in
float32, in bf16/fp16 as :mod:`~pixelcnn_kernels.sampling.verify` measured. ``model.sample`` checks every
draft with one full forward and repairs such values and the values drawn after them
(:mod:`~pixelcnn_kernels.sampling.verify`), so the returned image is the naive one bit
for bit. In float32 the cached logits are as accurate as the full forward's (within
twice its error against float64; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.sampling import (
    DMOL_DRAW_CUDA_OP,
    DRAW_CUDA_OP,
    GATED_CUDA_OP,
    GatedLayerStepWeights,
    HorizontalStepWeights,
    SoftmaxHeadWeights,
    dmol_draw_step,
    gated_layer_step,
    horizontal_conv_step,
    pixel_step_fits,
    softmax_draw_fits,
    softmax_draw_step,
    step_backend,
)
from pixelcnn_kernels.sampling.common import SamplingProblem, masked_operands, write_values
from pixelcnn_kernels.sampling.replay import PixelStepSampler

__all__ = ["CachedGatedPixelCNN", "FusedCachedGatedPixelCNN", "fused_steps_fit", "sample_cached_gated"]


class CachedGatedPixelCNN:
    """The per-layer caches of one cached sampling run of a GatedPixelCNN ``model``, PyTorch step.

    Built from the problem's start images (the prefix, or zeros); then, for each row i,
    :meth:`start_row` once, and for each pixel (i, j) :meth:`horizontal_stack` +
    :meth:`logits` for each value drawn there, :meth:`store_pixel` after each draw. All
    activations are in the model's parameter dtype, on its device.
    """

    def __init__(self, model, problem: SamplingProblem):
        batch, _, height, width = problem.images.shape
        dtype = model.parameter_dtype()
        self.model = model
        inputs = model.to_inputs(problem.images)
        self.vertical = _VerticalStack(model, problem, inputs)
        self.x_horizontal = _CachedConv(model.conv_hstack, batch, height, width, dtype)
        self.h_inputs = [_CachedConv(layer.conv_horiz, batch, height, width, dtype) for layer in model.conv_layers]
        self.vert_to_horiz = [_pointwise(layer.conv_vert_to_horiz, dtype) for layer in model.conv_layers]
        self.horiz_1x1 = [_pointwise(layer.conv_horiz_1x1, dtype) for layer in model.conv_layers]
        self.conv_out = _pointwise(model.conv_out, dtype)
        self.cond_horiz = [_projection(layer.cond_horiz, problem.class_vector) for layer in model.conv_layers]
        # Row i of each layer's vertical pre-activation, (B, 2C, 1, W): the link to the horizontal stack.
        self.v_pre_row: list[torch.Tensor] = []
        self.x_horizontal.store(inputs, 0, 0)

    def start_row(self, row: int) -> None:
        """Computes row ``row`` of every layer's vertical stack (the rows above it must be final)."""
        self.v_pre_row = self.vertical.pre_activations(row)

    def horizontal_stack(self, row: int, col: int) -> torch.Tensor:
        """The last layer's horizontal stack at pixel (row, col), (B, C, 1, 1); stores every layer's input there."""
        ops = self.model.ops
        h = self.x_horizontal.pixel(row, col)
        for layer, h_input, vert_to_horiz, horiz_1x1, v_pre, cond in zip(
            self.model.conv_layers, self.h_inputs, self.vert_to_horiz, self.horiz_1x1, self.v_pre_row, self.cond_horiz
        ):
            h_input.store(h, row, col)
            h_pre = h_input.pixel(row, col) + vert_to_horiz(v_pre[:, :, :, col : col + 1])
            h = h + horiz_1x1(ops.gate_tanh_sigmoid(h_pre, 1, cond, layer.color_groups))
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on the last horizontal stack ``h`` (B, C, 1, 1), in the network's layout for a 1×1 image."""
        return _head(self.model, self.conv_out, h)

    def store_pixel(self, row: int, col: int, values: torch.Tensor) -> None:
        """Stores the integer values (B, C, 1, 1) of pixel (row, col), the input of the later steps."""
        inputs = self.model.to_inputs(values)
        self.vertical.inputs.store(inputs, row, col)
        self.x_horizontal.store(inputs, row, col)


class FusedCachedGatedPixelCNN(PixelStepSampler):
    """One cached sampling run of a GatedPixelCNN ``model`` whose horizontal step runs on the fused kernels.

    Every buffer is allocated here, once, and the pixel and the row being generated are
    the device tensors ``pixel`` (int64 (1,), p = i·W + j) and ``row`` (int64 (1,), i),
    so :meth:`pixel_step` launches the same work on the same addresses for every pixel,
    and :meth:`start_row` for every row after the first: a CUDA graph can replay each
    (:meth:`sample`). Per row i, :meth:`start_row` before the row's first pixel; then
    :meth:`pixel_step` for each pixel, which draws its values, writes them to
    ``problem.images`` (except where known) and moves ``pixel`` on. Needs
    :func:`fused_steps_fit`.
    """

    graph_rows = True

    def __init__(self, model, problem: SamplingProblem):
        images = problem.images
        batch, channels, height, width = images.shape
        dtype, device = model.parameter_dtype(), images.device
        hidden = model.conv_hstack.out_channels
        super().__init__(model, problem)
        self.row = torch.zeros(1, dtype=torch.int64, device=device)
        # The network's input, kept equal to to_inputs(images) as values are drawn.
        self.inputs = model.to_inputs(images)
        self.vertical = _VerticalStack(model, problem, self.inputs)
        self.first_conv = HorizontalStepWeights.from_conv(model.conv_hstack, dtype)
        self.layers = [GatedLayerStepWeights.from_layer(layer, dtype) for layer in model.conv_layers]
        self.cond = [_projection(layer.cond_horiz, problem.class_vector) for layer in model.conv_layers]
        self.conv_out = _pointwise(model.conv_out, dtype)
        self.softmax_head = SoftmaxHeadWeights.from_model(model, dtype) if model.head == "softmax" else None
        # Row i of each layer's vertical pre-activation, channels-last (B, W, 2C): the link's operand.
        self.v_pre_rows = [torch.zeros(batch, width, 2 * hidden, dtype=dtype, device=device) for _ in model.conv_layers]
        # Each layer's input on the current row (B, W, C): a step reads its taps there, left of
        # the pixel, and the previous layer's step writes the pixel. The last layer writes h_out (B, C).
        h_rows = [torch.zeros(batch, width, hidden, dtype=dtype, device=device) for _ in model.conv_layers]
        self.h_out = torch.zeros(batch, hidden, dtype=dtype, device=device)
        # The steps' (B, H, W, C) views: the input image, the rows repeated over H, h_out over H and W.
        expanded = [row[:, None].expand(batch, height, width, hidden) for row in h_rows]
        self.step_inputs = [self.inputs.permute(0, 2, 3, 1)] + expanded
        self.step_outputs = expanded + [self.h_out[:, None, None].expand(batch, height, width, hidden)]
        self.inputs_flat = self.inputs.view(batch, channels, height * width)  # written at the pixel

    def start_row(self, row: int) -> None:
        """Computes row ``row`` of every layer's vertical pre-activation into ``v_pre_rows`` and moves ``row`` on (the rows above must be final).

        The work indexes the row by the device tensor ``row``, which must hold ``row``;
        the host ``row`` only says whether there is a row above to store.
        """
        if row > 0:
            # The row above is final now: the vertical stack's input cache takes it whole, not pixel by pixel.
            above = self.row - 1
            self.vertical.inputs.store(self.inputs.index_select(2, above), above, 0)
        for buffer, v_pre in zip(self.v_pre_rows, self.vertical.pre_activations(self.row)):
            buffer.copy_(v_pre[:, :, 0].transpose(1, 2))
        self.row += 1

    def horizontal_stack(self) -> torch.Tensor:
        """The last layer's horizontal stack at the pixel, (B, C, 1, 1); writes every layer's input there."""
        horizontal_conv_step(self.pixel, self.step_inputs[0], self.first_conv, self.step_outputs[0])
        for x, out, v_pre, cond, weights in zip(self.step_inputs[1:], self.step_outputs[1:], self.v_pre_rows, self.cond, self.layers):
            gated_layer_step(self.pixel, x, v_pre, cond, weights, out)
        return self.h_out[:, :, None, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on the last horizontal stack ``h`` (B, C, 1, 1), as :meth:`CachedGatedPixelCNN.logits`."""
        return _head(self.model, self.conv_out, h)

    def draw(self, channels: slice) -> None:
        """Draws ``channels`` at the pixel; writes them to the images (except where known) and to the network's input."""
        h = self.horizontal_stack()
        if self.softmax_head is None:  # DMOL: every channel at once, from the PyTorch head's logits
            dmol_draw_step(self.pixel, self.logits(h).flatten(1), self.noise_flat, self.known_flat, self.images_flat, self.inputs_flat, self.bin_inputs)
        else:  # one channel per step; h is the view (B, C, 1, 1) of h_out
            softmax_draw_step(self.pixel, channels.start, self.h_out, self.softmax_head, self.noise_flat, self.known_flat, self.images_flat, self.inputs_flat, self.bin_inputs)

    def pixel_step(self, draw: bool = True) -> None:
        """Generates the pixel's values (``draw=False``: only its activations, for a pixel every image knows) and moves to the next pixel."""
        if draw:
            for channels in self.model.step_channels():
                self.draw(channels)
        else:
            self.horizontal_stack()
        self.pixel += 1


def fused_steps_fit(model) -> bool:
    """Whether :class:`FusedCachedGatedPixelCNN` can sample ``model``: its layer step and its head's
    draw each have a kernel backend for the parameters (:func:`~pixelcnn_kernels.ops.sampling.step_backend`)
    that takes the model's sizes (the ``*_fits`` predicates of :mod:`pixelcnn_kernels.ops.sampling`)."""
    weight = model.conv_out.weight
    softmax = model.head == "softmax"
    layer_backend = step_backend(weight, GATED_CUDA_OP)
    draw_backend = step_backend(weight, DRAW_CUDA_OP if softmax else DMOL_DRAW_CUDA_OP)
    if layer_backend is None or draw_backend is None:
        return False
    first = model.conv_hstack
    return (
        pixel_step_fits(layer_backend, len(first.spec.taps), first.in_channels, first.out_channels, gated=False)
        and all(pixel_step_fits(layer_backend, len(layer.conv_horiz.spec.taps), layer.channels, layer.channels, gated=True) for layer in model.conv_layers)
        and (not softmax or softmax_draw_fits(draw_backend, model.conv_out.in_channels, model.num_bins))
    )


def sample_cached_gated(model, problem: SamplingProblem, progress: bool) -> int:
    """Fills ``problem.images`` by cached incremental generation; returns 0 (no full network pass runs).

    ``model`` is a :class:`~pixelcnn_kernels.models.GatedPixelCNN` in eval mode, called
    under ``torch.no_grad``. The fused step runs where :func:`fused_steps_fit` holds (with a
    CUDA graph on a CUDA device); the PyTorch step elsewhere. Pixels every
    image knows are still run through the horizontal stack (later pixels read their
    activations), but nothing is drawn there (except inside a CUDA graph, which replays
    one step for every pixel; known values are kept).
    """
    if fused_steps_fit(model):
        FusedCachedGatedPixelCNN(model, problem).sample(progress)
        return 0
    cached = CachedGatedPixelCNN(model, problem)
    skipped = problem.skipped_pixels()
    with tqdm(total=problem.height * problem.width, desc="sampling (cached)", unit="pixel", disable=not progress) as bar:
        for i in range(problem.height):
            cached.start_row(i)
            for j in range(problem.width):
                if skipped[i][j]:
                    cached.horizontal_stack(i, j)
                else:
                    for channels in model.step_channels():
                        drawn = model.draw_values(cached.logits(cached.horizontal_stack(i, j)), problem.noise_window(i, j))
                        write_values(problem, i, j, channels, drawn[:, channels, 0, 0])
                        cached.store_pixel(i, j, problem.images[:, :, i : i + 1, j : j + 1])
                bar.update()
    return 0


class _VerticalStack:
    """Every layer's vertical stack, one row at a time, from a cache of the input rows above it (PyTorch).

    ``inputs`` caches the network's input (the first conv's); :meth:`pre_activations`
    stores each layer's input row as it computes it.
    """

    def __init__(self, model, problem: SamplingProblem, inputs: torch.Tensor):
        batch, _, height, width = problem.images.shape
        dtype = model.parameter_dtype()
        self.model = model
        self.inputs = _CachedConv(model.conv_vstack, batch, height, width, dtype)
        self.layer_inputs = [_CachedConv(layer.conv_vert, batch, height, width, dtype) for layer in model.conv_layers]
        self.cond = [_projection(layer.cond_vert, problem.class_vector) for layer in model.conv_layers]
        self.inputs.store(inputs, 0, 0)

    def pre_activations(self, row: int | torch.Tensor) -> list[torch.Tensor]:
        """Row ``row`` (an int or a device index, as :meth:`_CachedConv.row`) of every layer's vertical pre-activation, (B, 2C, 1, W) each; the input rows above it must be final."""
        ops = self.model.ops
        v = self.inputs.row(row)
        rows = []
        for v_input, cond in zip(self.layer_inputs, self.cond):
            v_input.store(v, row, 0)
            v_pre = v_input.row(row)
            rows.append(v_pre)
            v = ops.gate_tanh_sigmoid(v_pre, 1, cond)
        return rows


def _head(model, conv_out, h: torch.Tensor) -> torch.Tensor:
    """``model``'s head (``conv_out`` a :func:`_pointwise` of it) on the last horizontal stack ``h`` (B, C, 1, 1)."""
    logits = conv_out(F.elu(h))
    if model.head == "dmol":
        return logits
    return logits.unflatten(1, (model.in_channels, model.num_bins)).transpose(1, 2)


class _CachedConv:
    """A masked convolution whose input is cached, zero-padded, for evaluation at one row or pixel.

    ``store`` writes input values as they become final; ``row`` and ``pixel`` evaluate
    the convolution's output at one row / one pixel from the cached window. The cache
    is the input (B, in_channels, H, W) in ``dtype`` padded by the conv's "same"
    padding (zeros outside the image, as the full convolution pads).
    """

    def __init__(self, conv: MaskedConv2d, batch: int, height: int, width: int, dtype: torch.dtype):
        self.weight, self.bias = masked_operands(conv, dtype)
        self.dilation = conv.dilation[0]
        self.top, bottom, self.left, right = conv.spec.padding(self.dilation)
        kh, kw = conv.spec.kernel_size
        self.span = (self.dilation * (kh - 1) + 1, self.dilation * (kw - 1) + 1)
        self.cache = torch.zeros(batch, conv.in_channels, self.top + height + bottom, self.left + width + right, dtype=dtype, device=conv.weight.device)
        self.window_rows = torch.arange(self.span[0], device=conv.weight.device)

    def store(self, value: torch.Tensor, row: int | torch.Tensor, col: int) -> None:
        """Stores ``value`` (B, in_channels, h, w) as the input at rows row..row+h-1, columns col..col+w-1.

        ``row`` an int, or a device index (int64 (1,)) for one row (h = 1).
        """
        top, left = self.top + row, self.left + col
        columns = self.cache[:, :, :, left : left + value.shape[3]]
        if isinstance(row, torch.Tensor):
            columns.index_copy_(2, top, value)
        else:
            columns[:, :, top : top + value.shape[2]] = value

    def row(self, row: int | torch.Tensor) -> torch.Tensor:
        """The output at row ``row``, every column: (B, out_channels, 1, W).

        ``row`` an int, or a device index (int64 (1,)): the same launches on the same
        addresses for every row, which a CUDA graph can replay.
        """
        if isinstance(row, torch.Tensor):
            window = self.cache.index_select(2, row + self.window_rows)
        else:
            window = self.cache[:, :, row : row + self.span[0]]
        return F.conv2d(window, self.weight, self.bias, dilation=self.dilation)

    def pixel(self, row: int, col: int) -> torch.Tensor:
        """The output at pixel (row, col): (B, out_channels, 1, 1)."""
        window = self.cache[:, :, row : row + self.span[0], col : col + self.span[1]]
        return F.conv2d(window, self.weight, self.bias, dilation=self.dilation)


def _pointwise(conv: MaskedConv2d, dtype: torch.dtype):
    """A 1×1 (possibly colour-masked) conv as a function of a (B, in_channels, h, w) window."""
    weight, bias = masked_operands(conv, dtype)
    return lambda x: F.conv2d(x, weight, bias)


def _projection(projection: torch.nn.Linear | None, class_vector: torch.Tensor | None) -> torch.Tensor | None:
    """A layer's conditioning vector (B, 2C) (the gated layer's ``_project``), computed once per run."""
    return None if projection is None else projection(class_vector)
