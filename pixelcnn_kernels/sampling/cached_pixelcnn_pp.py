"""Cached incremental sampling of :class:`~pixelcnn_kernels.models.PixelCNNPlusPlus`.

PixelCNN++ runs at three resolutions, with stride-2 convolutions down and transposed
convolutions up, and skips from the up pass to the down pass (Ramachandran et al. 2017
cache every layer at its own resolution). Here every activation map of the network is
a :class:`_Node`: a cache of its values plus which positions are computed. The logits
of pixel (i, j) are asked of the head; a node computes a position on first demand from
the windows of its input nodes that its convolution reads, and keeps it. A position is
first asked for while generating the first pixel whose logits depend on it, and by
causality its own inputs are then final, so each activation is computed once, when it
becomes computable: the u (down-shifted) streams one step ahead along the row, the
lower resolutions when the pixel at the corresponding position comes, and pixels
every image knows not at all until a later pixel needs them. Each gated resnet block
also caches its inner map ``c`` (its first conv, plus the 1×1 of its skips, before the
concat_elu that its second conv reads).

A position of a **gated resnet block** (the bulk of the work) runs one of two ways:

- **fused** (the ``triton`` and ``cuda`` backends in float32, float16 and bfloat16):
  one launch of :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step` computes
  the inner values its window needs that no earlier position computed (concat_elu,
  the shifted conv's taps read from the input node's cache, the 1×1 of concat_elu of
  the skips), then concat_elu, the second shifted conv over the inner window, the
  conditioning, a·σ(b) and the residual, writing into the block's cache. The host
  only finds the new inner pixels and asks their inputs of the graph.
- **PyTorch** (the ``reference`` backend, the default for CPU tensors, and float64):
  about ten ops per position, ``F.conv2d`` on the exact windows (the masked weights of
  the reference, all taps active for the shifted convolutions), the model's
  ``concat_elu`` op and the reference sigmoid gate.

Still PyTorch ops on every backend: the first shifted convs (``u_init``, ``ul_init``),
the stride-2 down-sampling convs and the transposed convs (the sum of the ≤ 2 input
pixels times the kernel taps that reach the output pixel): 11 nodes against 64 blocks
at nr_resnet 5, the strided ones at a quarter of the positions or fewer, left unfused;
and the head (elu, 1×1) and the draw. The positions are host
integers and the demand-driven graph runs in Python, one launch per block and
position: no CUDA graph replays the steps (the Gated PixelCNN's sampler can, as its
per-pixel work is the same at every pixel; here which positions each pixel computes
varies with the resolution and the borders).

**Exactness** as for :mod:`~pixelcnn_kernels.sampling.cached_gated`: the same values
up to the rounding of the other reduction shapes; images equal the naive sampler's in
float64 (tested), and in float32 on the fused path for tiny models (tested); float32
logits are as accurate as the full forward's (tested), and the fused blocks match the
PyTorch ones within the float32 tolerance (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelcnn_kernels.ops.sampling import RESNET_CUDA_OP, ResnetStepWeights, resnet_position_step, step_backend
from pixelcnn_kernels.reference.gates import gate_sigmoid
from pixelcnn_kernels.reference.layers import GatedResnet, ShiftedConv2d, ShiftedConvTranspose2d
from pixelcnn_kernels.sampling.common import SamplingProblem, masked_operands, write_values

__all__ = ["CachedPixelCNNPlusPlus", "sample_cached_pixelcnn_pp"]


class _Node:
    """One activation map (B, channels, height, width), computed position by position on demand.

    ``compute(i, j)`` returns the (B, channels, 1, 1) value at (i, j), or None where it
    wrote it into the cache itself (a fused step). The ``cache`` (B, height + 2,
    width + 2, channels), channels-last as the step kernels read it, has a one-pixel ring
    of zeros around the image: the padding every convolution of the network reads (its
    windows reach at most one pixel outside); ``values`` is its (B, channels, ...) view.
    """

    def __init__(self, channels: int, height: int, width: int, like: torch.Tensor, compute: Callable[[int, int], torch.Tensor | None] | None):
        self.height, self.width = height, width
        self.cache = like.new_zeros(like.shape[0], height + 2, width + 2, channels)
        self.values = self.cache.permute(0, 3, 1, 2)
        self.compute = compute
        self.done = [[compute is None] * width for _ in range(height)]

    def window(self, rows: range, cols: range) -> torch.Tensor:
        """The values at rows × cols (image coordinates, -1 and height/width being the padding), computed if need be."""
        for r in range(max(rows.start, 0), min(rows.stop, self.height)):
            for c in range(max(cols.start, 0), min(cols.stop, self.width)):
                if not self.done[r][c]:
                    value = self.compute(r, c)
                    if value is not None:
                        self.values[:, :, r + 1 : r + 2, c + 1 : c + 2] = value
                    self.done[r][c] = True
        return self.values[:, :, rows.start + 1 : rows.stop + 1, cols.start + 1 : cols.stop + 1]

    def at(self, i: int, j: int) -> torch.Tensor:
        """The (B, channels, 1, 1) value at (i, j)."""
        return self.window(range(i, i + 1), range(j, j + 1))


def _conv_node(conv: ShiftedConv2d, source: _Node, dtype: torch.dtype) -> _Node:
    """``conv`` (stride 1 or 2, with or without its output shift) on ``source``."""
    weight, bias = masked_operands(conv, dtype)
    stride = conv.conv_stride
    top, _, left, _ = conv.spec.padding()
    kh, kw = conv.spec.kernel_size
    # The output shift moves the conv's output one row down ("down") or one column right.
    shift = (0, 0) if not conv.shift_output else (1, 0) if conv.shift == "down" else (0, 1)

    def compute(i: int, j: int) -> torch.Tensor:
        i, j = i - shift[0], j - shift[1]
        if i < 0 or j < 0:
            return weight.new_zeros(1)  # the shift's zero row / column (broadcast)
        rows = range(stride * i - top, stride * i - top + kh)
        cols = range(stride * j - left, stride * j - left + kw)
        return F.conv2d(source.window(rows, cols), weight, bias)

    return _Node(conv.out_channels, math.ceil(source.height / stride), math.ceil(source.width / stride), source.values, compute)


def _transposed_node(deconv: ShiftedConvTranspose2d, source: _Node, dtype: torch.dtype) -> _Node:
    """``deconv`` (stride 2, cropped as :class:`ShiftedConvTranspose2d` does) on ``source``.

    Output (i, j) of the uncropped transposed conv sums input (i', j') times kernel tap
    (i - 2i', j - 2j'); the crop drops the first ``(kw-1)/2`` columns ("down", kernel
    2×3) or none ("down_right", 2×2), and the rows past 2H.
    """
    weight = deconv.weight.to(dtype)  # (in, out, kh, kw)
    bias = deconv.bias.to(dtype)
    stride = deconv.stride[0]
    kw = deconv.kernel_size[1]  # kernel rows = stride: output row i reads input row i // stride at tap i % stride
    col_offset = (kw - 1) // 2 if deconv.shift == "down" else 0

    def compute(i: int, j: int) -> torch.Tensor:
        full_col = j + col_offset
        tap_row, source_row = i % stride, i // stride
        out = bias.expand(source.values.shape[0], -1)
        for tap_col in range(full_col % stride, kw, stride):
            source_col = (full_col - tap_col) // stride
            if source_col < source.width:
                out = out + source.at(source_row, source_col)[:, :, 0, 0] @ weight[:, :, tap_row, tap_col]
        return out[:, :, None, None]

    return _Node(deconv.out_channels, stride * source.height, stride * source.width, source.values, compute)


def _resnet_node(block: GatedResnet, source: _Node, skips: list[_Node], class_vector: torch.Tensor | None, dtype: torch.dtype, fused: bool) -> _Node:
    """``block(source, cat(skips), cond)``, with its inner map ``c`` (before the concat_elu that ``conv_out`` reads) cached as well.

    ``fused``: each position is one :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step`,
    which also computes the inner pixels of its window not computed yet; else PyTorch
    ops, the inner map a node of its own.
    """
    cond = None if block.cond_proj is None else block.cond_proj(class_vector)
    top, _, left, _ = block.conv_input.spec.padding()
    kh, kw = block.conv_input.spec.kernel_size

    def window(i: int, j: int) -> tuple[range, range]:
        return range(i - top, i - top + kh), range(j - left, j - left + kw)

    if fused:
        return _fused_resnet_node(block, source, skips, cond, window, dtype)
    concat_elu = block.ops.concat_elu
    in_weight, in_bias = masked_operands(block.conv_input, dtype)
    out_weight, out_bias = masked_operands(block.conv_out, dtype)
    skip_weight, skip_bias = masked_operands(block.nin_skip, dtype) if skips else (None, None)

    def compute_inner(i: int, j: int) -> torch.Tensor:
        c = F.conv2d(concat_elu(source.window(*window(i, j))), in_weight, in_bias)
        if skips:
            skip = torch.cat([node.at(i, j) for node in skips], dim=1)
            c = c + F.conv2d(concat_elu(skip), skip_weight, skip_bias)
        return c

    inner = _Node(block.channels, source.height, source.width, source.values, compute_inner)

    def compute(i: int, j: int) -> torch.Tensor:
        # dropout: identity in eval mode
        pre = F.conv2d(concat_elu(inner.window(*window(i, j))), out_weight, out_bias)
        return source.at(i, j) + gate_sigmoid(pre, 1, cond)

    return _Node(block.channels, source.height, source.width, source.values, compute)


def _fused_resnet_node(block: GatedResnet, source: _Node, skips: list[_Node], cond: torch.Tensor | None, window, dtype: torch.dtype) -> _Node:
    """The fused :func:`_resnet_node`: the host finds the new inner pixels and computes their inputs, one launch does the rest."""
    weights = ResnetStepWeights.from_block(block, dtype)
    inner = source.cache.new_zeros(source.cache.shape)
    inner_done = [[False] * source.width for _ in range(source.height)]

    def compute(i: int, j: int) -> None:
        new_taps = 0
        rows, cols = window(i, j)
        for tap, (r, c) in enumerate((r, c) for r in rows for c in cols):
            if 0 <= r < source.height and 0 <= c < source.width and not inner_done[r][c]:
                source.window(*window(r, c))
                for skip in skips:
                    skip.at(r, c)
                inner_done[r][c] = True
                new_taps |= 1 << tap
        source.at(i, j)
        resnet_position_step(i, j, new_taps, source.cache, inner, [skip.cache for skip in skips], cond, weights, node.cache)

    node = _Node(block.channels, source.height, source.width, source.values, compute)
    return node


class CachedPixelCNNPlusPlus:
    """The activation caches of one cached sampling run of a PixelCNNPlusPlus ``model``.

    Mirrors ``PixelCNNPlusPlus.network`` node for node. :meth:`logits` gives pixel
    (i, j)'s DMOL parameters (B, P, 1, 1); :meth:`store_pixel` enters a drawn pixel.
    ``fused``: the gated resnet blocks run as fused steps (default: where
    :func:`~pixelcnn_kernels.ops.sampling.step_backend` gives a kernel backend for the
    parameters), else as PyTorch ops.
    """

    def __init__(self, model, problem: SamplingProblem, fused: bool | None = None):
        dtype = model.parameter_dtype()
        if fused is None:
            fused = step_backend(model.nin_out.weight, RESNET_CUDA_OP) is not None
        inputs = model.to_inputs(problem.images)
        self.model = model
        self.x = _Node(model.in_channels + 1, problem.height, problem.width, inputs, None)
        # The image with a channel of ones, so that the zero padding is distinguishable.
        self.x.values[:, :, 1:-1, 1:-1] = torch.cat((inputs, torch.ones_like(inputs[:, :1])), dim=1)
        u_list = [_conv_node(model.u_init, self.x, dtype)]
        ul_parts = [_conv_node(conv, self.x, dtype) for conv in model.ul_init]
        ul_list = [_Node(model.u_init.out_channels, problem.height, problem.width, inputs, lambda i, j: ul_parts[0].at(i, j) + ul_parts[1].at(i, j))]
        class_vector = problem.class_vector
        for stage, up_layer in enumerate(model.up_layers):
            for u_block, ul_block in zip(up_layer.u_stream, up_layer.ul_stream):
                u_list.append(_resnet_node(u_block, u_list[-1], [], class_vector, dtype, fused))
                ul_list.append(_resnet_node(ul_block, ul_list[-1], [u_list[-1]], class_vector, dtype, fused))
            if stage < len(model.up_layers) - 1:
                u_list.append(_conv_node(model.downsize_u_stream[stage], u_list[-1], dtype))
                ul_list.append(_conv_node(model.downsize_ul_stream[stage], ul_list[-1], dtype))
        u, ul = u_list.pop(), ul_list.pop()
        for stage, down_layer in enumerate(model.down_layers):
            for u_block, ul_block in zip(down_layer.u_stream, down_layer.ul_stream):
                u = _resnet_node(u_block, u, [u_list.pop()], class_vector, dtype, fused)
                ul = _resnet_node(ul_block, ul, [u, ul_list.pop()], class_vector, dtype, fused)
            if stage < len(model.down_layers) - 1:
                u = _transposed_node(model.upsize_u_stream[stage], u, dtype)
                ul = _transposed_node(model.upsize_ul_stream[stage], ul, dtype)
        self.ul = ul
        self.head_weight, self.head_bias = masked_operands(model.nin_out, dtype)

    def logits(self, i: int, j: int) -> torch.Tensor:
        """``nin_out(elu(ul))`` at pixel (i, j): (B, P, 1, 1)."""
        return F.conv2d(F.elu(self.ul.at(i, j)), self.head_weight, self.head_bias)

    def store_pixel(self, i: int, j: int, values: torch.Tensor) -> None:
        """Enters the integer values (B, C, 1, 1) of pixel (i, j)."""
        self.x.values[:, :-1, i + 1 : i + 2, j + 1 : j + 2] = self.model.to_inputs(values)


def sample_cached_pixelcnn_pp(model, problem: SamplingProblem, progress: bool) -> int:
    """Fills ``problem.images`` by cached incremental generation; returns 0 (no full network pass runs).

    ``model`` is a :class:`~pixelcnn_kernels.models.PixelCNNPlusPlus` in eval mode,
    called under ``torch.no_grad``. The gated resnet blocks run fused where
    :func:`~pixelcnn_kernels.ops.sampling.step_backend` gives a kernel backend for the
    parameters, as PyTorch ops elsewhere.
    """
    cached = CachedPixelCNNPlusPlus(model, problem)
    all_known = problem.pixels_all_known()
    (channels,) = model.step_channels()  # the DMOL head draws a pixel's channels together
    with tqdm(total=problem.height * problem.width, desc="sampling (cached)", unit="pixel", disable=not progress) as bar:
        for i in range(problem.height):
            for j in range(problem.width):
                if not all_known[i][j]:
                    drawn = model.draw_values(cached.logits(i, j), problem.noise_window(i, j))
                    write_values(problem, i, j, channels, drawn[:, channels, 0, 0])
                    cached.store_pixel(i, j, problem.images[:, :, i : i + 1, j : j + 1])
                bar.update()
    return 0
