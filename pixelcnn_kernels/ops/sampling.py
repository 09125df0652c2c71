"""The fused per-pixel steps of cached sampling, Gated PixelCNN and PixelCNN++ (issue 7).

Cached sampling (:mod:`pixelcnn_kernels.sampling.cached_gated`) computes, for each
generated value, one pixel (i, j) of every horizontal-stack layer. Each layer is one
launch here instead of about six PyTorch ops:

- :func:`horizontal_conv_step`: ``out[b, i, j] = bias + Σ_t x[b, i, j + dx_t] · wp[t]``,
  a 1×k masked convolution at one pixel (the model's first ``horizontal_A`` conv);
- :func:`gated_layer_step`: a :class:`~pixelcnn_kernels.nn.GatedMaskedConv2d`'s
  horizontal stack at one pixel::

      pre = conv_horiz taps + bias + conv_vert_to_horiz(v_pre[b, j]) + cond[b]
      out[b, i, j] = x[b, i, j] + conv_horiz_1x1(gate_tanh_sigmoid(pre, groups=color_groups))

  with the colour-grouped tanh·σ of :mod:`pixelcnn_kernels.reference.gates` (1 or 3
  groups) and the residual on the layer input;
- :func:`softmax_draw_step`: the softmax head on the last layer's output at the pixel
  (elu, the colour-masked 1×1), the categorical draw of one channel at its noise, and
  the writes of the value to the images (unless known) and to the network's input: one
  launch instead of about twenty ops;
- :func:`dmol_draw_step` (both models' DMOL heads): from the head's logits at the pixel,
  the DMOL draw of every channel at its noise and the same writes: one launch instead
  of about fifteen ops.

And one launch per block and pixel step of cached PixelCNN++ sampling
(:mod:`pixelcnn_kernels.sampling.cached_pixelcnn_pp`) instead of about ten ops per position:

- :func:`resnet_position_step`: a :class:`~pixelcnn_kernels.nn.GatedResnet` at the
  positions (i, j) a table gives the step, from caches of its input ``x``, its skips and
  its *inner* map ``c`` (the first shifted conv, before its concat_elu), each
  (B, H+2, W+2, C) with a zero ring (pixel (i, j) at [i+1, j+1]: the padding the
  shifted convs read); for each position in the step's slots, in order::

      for each tap t set in new_taps, at its pixel q (inner values not yet computed):
          inner[b, q] = conv_input(concat_elu(x))[b, q] (+ nin_skip(concat_elu(cat(skips)))[b, q])
      out[b, i, j] = x[b, i, j] + a·σ(g),  a | g = conv_out(concat_elu(inner))[b, i, j] + cond[b]

  the two shifted convs read the window of their kernel around the pixel from the
  caches. The step and the table are device tensors, so the same launch serves every
  pixel step (a CUDA graph replays it).

Every step's pixel is the device tensor ``pixel`` (int64 (1,), ``p = i·W + j``), never a host
integer, so one launch sequence with fixed pointers serves every pixel: a CUDA graph
captures it once. The Gated PixelCNN steps' ``x`` and ``out`` are (B, H, W, C) views of any strides, so a row
buffer (B, W, C) expanded over H (stride 0) or a per-image vector (B, C) expanded over
H and W serves as well as a whole image; ``out`` is written at the pixel only.

The weights are packed once per sampling run (:class:`HorizontalStepWeights`,
:class:`GatedLayerStepWeights`): the active taps only, as the masked convolution's
kernels read them (:func:`~pixelcnn_kernels.ops.masked_conv.pack_weight`).

Backends: ``triton`` and ``cuda`` (the extension's ``gated_pixel_step``,
``resnet_position_step``, ``softmax_draw_step`` and ``dmol_draw_step``), float32, float16 and bfloat16,
fp32 arithmetic (the draw's softmax in float64). The
references are the PyTorch steps of
:class:`~pixelcnn_kernels.sampling.cached_gated.CachedGatedPixelCNN` and
:class:`~pixelcnn_kernels.sampling.cached_pixelcnn_pp.CachedPixelCNNPlusPlus` (which
also run float64); :func:`step_backend` says which a tensor gets. These are plain functions, not
``torch.library`` custom ops: they write into caches in place, have no gradient and run
thousands of times per image, where a custom op's dispatch would cost more than the
kernel.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from pixelcnn_kernels.backend import BackendUnavailableError, backend_with_cuda_op, cuda_ops, resolve_backend
from pixelcnn_kernels.masks import check_gated_color_channels, color_group_size
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.dmol import check_num_logit_channels
from pixelcnn_kernels.ops.masked_conv import pack_weight, tap_offsets
from pixelcnn_kernels.reference.dmol import bins_to_values
from pixelcnn_kernels.utils import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

__all__ = [
    "GatedLayerStepWeights",
    "HorizontalStepWeights",
    "ResnetStepWeights",
    "SoftmaxHeadWeights",
    "bin_inputs",
    "dmol_draw_step",
    "gated_layer_step",
    "horizontal_conv_step",
    "pixel_step_fits",
    "resnet_position_step",
    "resnet_step_fits",
    "softmax_draw_fits",
    "softmax_draw_step",
    "step_backend",
]

# The extension's ops (csrc/sampling_ops.cpp); an extension built before them lacks them.
GATED_CUDA_OP = "gated_pixel_step"
RESNET_CUDA_OP = "resnet_position_step"
DRAW_CUDA_OP = "softmax_draw_step"
DMOL_DRAW_CUDA_OP = "dmol_draw_step"
# Bins the softmax draw takes: one program (Triton) or block (CUDA) holds every bin's logit.
MAX_DRAW_BINS = 4096
# A CUDA step stages one image's operands in shared memory, within the 48 KiB a block has without
# opting in (kMaxSharedBytes and kMaxTaps in csrc/sampling.h; the byte counts are sampling.cu's
# *_shared_bytes functions). The glue refuses a larger step; the *_fits predicates tell a
# sampler before it starts, so it keeps the PyTorch step for such a model instead.
_CUDA_STEP_SHARED_BYTES = 48 * 1024
_CUDA_PIXEL_STEP_TAPS = 16
_FP32_BYTES, _FP64_BYTES = 4, 8


def _pack(conv: MaskedConv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight packed (T, Cin, Cout) contiguous (colour-masked pairs exact zeros) and its bias, in ``dtype``."""
    bias = None if conv.bias is None else conv.bias.detach().to(dtype).contiguous()
    return pack_weight(conv.weight.detach().to(dtype), conv.spec), bias


@dataclasses.dataclass(frozen=True)
class HorizontalStepWeights:
    """A 1×k masked convolution packed for the step: ``wp`` (T, Cin, Cout) contiguous,
    ``bias`` (Cout,) or None, ``offsets`` the T taps' column offsets dx (dilation included)."""

    wp: torch.Tensor
    bias: torch.Tensor | None
    offsets: tuple[int, ...]

    @classmethod
    def from_conv(cls, conv: MaskedConv2d, dtype: torch.dtype) -> "HorizontalStepWeights":
        """Packs ``conv`` (one kernel row: a ``horizontal`` mask, or a 1×1) in ``dtype``; colour-masked pairs are exact zeros."""
        if conv.spec.kernel_size[0] != 1:
            raise ValueError(f"conv must have one kernel row (a horizontal or 1×1 mask), got kernel_size {conv.spec.kernel_size}")
        offsets = tap_offsets(conv.spec, conv.dilation[0])
        return cls(*_pack(conv, dtype), tuple(offsets[1::2]))


@dataclasses.dataclass(frozen=True)
class GatedLayerStepWeights:
    """A :class:`~pixelcnn_kernels.nn.GatedMaskedConv2d`'s horizontal stack packed for the step.

    ``horizontal``: ``conv_horiz`` (C → 2C); ``link_weight`` (2C, 2C) and
    ``out_weight`` (C, C): ``conv_vert_to_horiz`` and ``conv_horiz_1x1`` laid out
    (in, out); their biases (or None); ``color_groups`` 1 or 3.
    """

    horizontal: HorizontalStepWeights
    link_weight: torch.Tensor
    link_bias: torch.Tensor | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    color_groups: int

    @classmethod
    def from_layer(cls, layer, dtype: torch.dtype) -> "GatedLayerStepWeights":
        # A 1×1 convolution is a one-tap horizontal one: its packed (1, in, out) weight is the matrix.
        link = HorizontalStepWeights.from_conv(layer.conv_vert_to_horiz, dtype)
        out = HorizontalStepWeights.from_conv(layer.conv_horiz_1x1, dtype)
        return cls(HorizontalStepWeights.from_conv(layer.conv_horiz, dtype), link.wp[0], link.bias, out.wp[0], out.bias, layer.color_groups)


@dataclasses.dataclass(frozen=True)
class ResnetStepWeights:
    """A :class:`~pixelcnn_kernels.nn.GatedResnet` packed for :func:`resnet_position_step`.

    ``input_weight`` (T, 2C, C) and ``out_weight`` (T, 2C, 2C): ``conv_input`` and
    ``conv_out``'s T = kh·kw taps (:func:`~pixelcnn_kernels.ops.masked_conv.pack_weight`);
    ``skip_weight`` (2SC, C): ``nin_skip`` laid out (in, out), None without skips;
    their biases (or None); ``kernel`` (kh, kw, top, left): the convs' kernel size and
    the anchor (the tap over the output pixel).
    """

    input_weight: torch.Tensor
    input_bias: torch.Tensor | None
    skip_weight: torch.Tensor | None
    skip_bias: torch.Tensor | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    kernel: tuple[int, int, int, int]

    @classmethod
    def from_block(cls, block, dtype: torch.dtype) -> "ResnetStepWeights":
        spec = block.conv_input.spec
        kh, kw = spec.kernel_size
        if len(spec.taps) != kh * kw or block.conv_out.spec != spec:
            raise ValueError(f"block must have two shifted convs with every tap active and one mask, got {spec.name!r} and {block.conv_out.spec.name!r}")
        skip_weight, skip_bias = (None, None) if block.nin_skip is None else _pack(block.nin_skip, dtype)
        top, _, left, _ = spec.padding()
        # A 1×1 convolution's packed (1, in, out) weight is the matrix.
        return cls(*_pack(block.conv_input, dtype), None if skip_weight is None else skip_weight[0], skip_bias, *_pack(block.conv_out, dtype), (kh, kw, top, left))


@dataclasses.dataclass(frozen=True)
class SoftmaxHeadWeights:
    """A :class:`~pixelcnn_kernels.models.GatedPixelCNN`'s softmax head packed for :func:`softmax_draw_step`.

    ``weight`` (hidden, C·num_bins): ``conv_out`` (colour-masked pairs exact zeros) laid
    out (in, out); ``bias`` (C·num_bins,) or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def from_model(cls, model, dtype: torch.dtype) -> "SoftmaxHeadWeights":
        if model.head != "softmax":
            raise ValueError(f"model must have the softmax head, got head={model.head!r}")
        # A 1×1 convolution is a one-tap horizontal one: its packed (1, in, out) weight is the matrix.
        head = HorizontalStepWeights.from_conv(model.conv_out, dtype)
        return cls(head.wp[0], head.bias)


def step_backend(like: torch.Tensor, cuda_op: str = GATED_CUDA_OP) -> str | None:
    """The kernel backend the step ``cuda_op`` runs on for tensors like ``like``, or None: the PyTorch step.

    None for the ``reference`` backend and for float64. An automatic ``cuda`` choice
    whose extension lacks the op falls back to ``triton`` (None where Triton cannot
    run); a forced one raises BackendUnavailableError.
    """
    backend = resolve_backend(like)
    if backend == "reference" or like.dtype not in FLOAT_DTYPES:
        return None
    backend = backend_with_cuda_op(backend, cuda_op, like.device)
    return None if backend == "reference" else backend


def pixel_step_fits(backend: str, taps: int, in_channels: int, out_channels: int, gated: bool) -> bool:
    """Whether ``backend``'s pixel step takes a 1×k conv of ``taps`` active taps from ``in_channels``
    to ``out_channels`` (gated: :func:`gated_layer_step`'s C → C; else :func:`horizontal_conv_step`)."""
    if backend == "triton":
        return out_channels <= _kernels("triton").MAX_PIXEL_STEP_CHANNELS
    staged = taps * in_channels + (3 * out_channels if gated else 0)
    return taps <= _CUDA_PIXEL_STEP_TAPS and staged * _FP32_BYTES <= _CUDA_STEP_SHARED_BYTES


def resnet_step_fits(backend: str, taps: int, skip_streams: int, channels: int) -> bool:
    """Whether ``backend``'s :func:`resnet_position_step` takes a block of ``channels`` whose shifted convs have ``taps`` taps and ``skip_streams`` skips.

    Triton's takes any width (past 256 channels it spills registers: slower, still exact).
    """
    return backend == "triton" or 2 * (taps + skip_streams) * channels * _FP32_BYTES <= _CUDA_STEP_SHARED_BYTES


def softmax_draw_fits(backend: str, hidden: int, num_bins: int) -> bool:
    """Whether ``backend``'s :func:`softmax_draw_step` takes a head from ``hidden`` units to ``num_bins`` bins per channel."""
    if num_bins > MAX_DRAW_BINS:
        return False
    return backend == "triton" or num_bins * _FP64_BYTES + hidden * _FP32_BYTES <= _CUDA_STEP_SHARED_BYTES


def horizontal_conv_step(pixel: torch.Tensor, x: torch.Tensor, weights: HorizontalStepWeights, out: torch.Tensor) -> None:
    """Writes ``out[b, i, j, :] = bias + Σ_t x[b, i, j + dx_t, :] · wp[t]`` at the pixel p = i·W + j in ``pixel``.

    ``x`` (B, H, W, Cin) and ``out`` (B, H, W, Cout): views of any strides (see the
    module docstring), float32/float16/bfloat16, one dtype and device with the
    weights; taps outside the image read zero.
    """
    backend = _check_common(pixel, x, weights.wp, weights.bias, weights.offsets, out, weights.wp.shape[2])
    _kernels(backend).gated_pixel_step(pixel, x, weights.wp, weights.bias, list(weights.offsets), None, None, None, None, None, None, 0, out)


def gated_layer_step(
    pixel: torch.Tensor, x: torch.Tensor, v_pre: torch.Tensor, cond: torch.Tensor | None, weights: GatedLayerStepWeights, out: torch.Tensor
) -> None:
    """Writes one gated layer's horizontal output at the pixel p = i·W + j in ``pixel`` (see the module docstring).

    ``x`` (B, H, W, C): the layer's input (its taps and the residual); ``v_pre``
    (B, W, 2C): the vertical pre-activation of row i, any strides; ``cond`` (B, 2C)
    or None, the layer's projected conditioning; ``out`` (B, H, W, C).
    """
    horizontal = weights.horizontal
    backend = _check_common(pixel, x, horizontal.wp, horizontal.bias, horizontal.offsets, out, None)
    batch, _, width, channels = x.shape
    if horizontal.wp.shape[2] != 2 * channels:
        raise ValueError(f"weights.horizontal has {horizontal.wp.shape[2]} output channels but x has {channels}: a gated layer maps C to 2C")
    if weights.color_groups not in (1, 3):
        raise ValueError(f"weights.color_groups must be 1 or 3, got {weights.color_groups!r}")
    check_gated_color_channels(channels, weights.color_groups, "x.shape[3] (channels)")
    _check_operand(v_pre, "v_pre", x, (batch, width, 2 * channels), required=True)
    _check_operand(weights.link_weight, "weights.link_weight", x, (2 * channels, 2 * channels), required=True, contiguous=True)
    _check_operand(weights.out_weight, "weights.out_weight", x, (channels, channels), required=True, contiguous=True)
    _check_operand(weights.link_bias, "weights.link_bias", x, (2 * channels,), contiguous=True)
    _check_operand(weights.out_bias, "weights.out_bias", x, (channels,), contiguous=True)
    _check_operand(cond, "cond", x, (batch, 2 * channels), contiguous=True)
    _check_written_apart({"out": out}, {"v_pre": v_pre})
    _kernels(backend).gated_pixel_step(
        pixel, x, horizontal.wp, horizontal.bias, list(horizontal.offsets), v_pre,
        weights.link_weight, weights.link_bias, cond, weights.out_weight, weights.out_bias, color_group_size(channels, weights.color_groups), out,
    )  # fmt: skip


def resnet_position_step(
    pixel: torch.Tensor,
    table: torch.Tensor,
    x: torch.Tensor,
    inner: torch.Tensor,
    skips: list[torch.Tensor] | tuple[torch.Tensor, ...],
    cond: torch.Tensor | None,
    weights: ResnetStepWeights,
    out: torch.Tensor,
) -> None:
    """Writes a gated resnet block's output at the positions of step ``pixel`` in ``table`` into ``out`` (see the module docstring).

    ``pixel``: int64 (1,), the step p (the flat pixel index i·W + j of the sampler);
    ``table``: int32 (steps, slots, 3), contiguous: slot s of step p is a position
    (row, col) and its ``new_taps``, or -1 in every field for none; the slots run in
    order, each after the previous one's writes. ``new_taps`` has a bit per tap
    t = ty·kw + tx of the block's kernel, set where the inner value at pixel
    (row + ty - top, col + tx - left) is computed (and stored) first; every other inner
    pixel of the window is read from ``inner`` as it is. The table is read on the
    device, not checked: an entry outside the image, a bit whose pixel is outside it,
    or a step outside [0, steps) does nothing, so no table makes the kernel reach past
    the caches or write their zero ring.

    ``x``, ``inner``, ``out`` and each of the 0 to 2 ``skips``: contiguous
    (B, H+2, W+2, C) caches with a zero ring, float32/float16/bfloat16, one dtype and
    device with the weights; ``inner`` and ``out``, which the step writes, each in memory of its own. ``cond`` (B, 2C) or None: the block's projected
    conditioning. The caches must hold, at every pixel read, the values the block's
    inputs have there.
    """
    check_tensor(x, "x", ndim=4, allow_float64=False)
    backend = _kernel_backend(x, RESNET_CUDA_OP)
    if not x.is_contiguous():
        raise ValueError("x must be a contiguous (B, H+2, W+2, C) cache")
    _check_pixel(pixel)
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int32:
        raise TypeError("table must be an int32 tensor of (row, col, new_taps) entries")
    if table.dim() != 3 or table.shape[2] != 3 or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous (steps, slots, 3) tensor, got shape {tuple(table.shape)}")
    check_same_device(x=x, pixel=pixel, table=table)
    batch, _, _, channels = x.shape
    kh, kw, top, left = weights.kernel
    if not (0 <= top < kh and 0 <= left < kw and max(top, kh - 1 - top, left, kw - 1 - left) <= 1):
        raise ValueError(f"weights.kernel {weights.kernel} must have a window reaching at most one pixel past the image (the caches' zero ring)")
    taps = kh * kw
    if not isinstance(skips, (list, tuple)) or len(skips) > 2:
        raise ValueError(f"skips must be a list of at most 2 caches, got {skips!r}")
    if (weights.skip_weight is None) != (len(skips) == 0):
        given = "absent" if weights.skip_weight is None else "given"
        raise ValueError(f"skips has {len(skips)} caches but weights.skip_weight is {given}: the block's nin_skip reads the skips")
    caches = {"inner": inner, "out": out, **{f"skips[{index}]": skip for index, skip in enumerate(skips)}}
    for name, cache in caches.items():
        _check_operand(cache, name, x, tuple(x.shape), required=True, contiguous=True)
    operands = (
        ("weights.input_weight", weights.input_weight, (taps, 2 * channels, channels), True),
        ("weights.input_bias", weights.input_bias, (channels,), False),
        ("weights.skip_weight", weights.skip_weight, (2 * len(skips) * channels, channels), False),
        ("weights.skip_bias", weights.skip_bias, (channels,), False),
        ("weights.out_weight", weights.out_weight, (taps, 2 * channels, 2 * channels), True),
        ("weights.out_bias", weights.out_bias, (2 * channels,), False),
        ("cond", cond, (batch, 2 * channels), False),
    )
    for name, t, shape, needed in operands:
        _check_operand(t, name, x, shape, required=needed, contiguous=True)
    _check_written_apart({"out": out, "inner": inner}, {"x": x, **{f"skips[{index}]": skip for index, skip in enumerate(skips)}})
    _kernels(backend).resnet_position_step(
        pixel, table, list(weights.kernel), x, inner, list(skips), weights.input_weight, weights.input_bias,
        weights.skip_weight, weights.skip_bias, weights.out_weight, weights.out_bias, cond, out,
    )  # fmt: skip


def softmax_draw_step(
    pixel: torch.Tensor,
    channel: int,
    h: torch.Tensor,
    weights: SoftmaxHeadWeights,
    noise: torch.Tensor,
    known: torch.Tensor,
    images: torch.Tensor,
    inputs: torch.Tensor,
    bin_inputs: torch.Tensor,
) -> None:
    """Draws channel ``channel`` of every image at the pixel p = i·W + j in ``pixel`` from the softmax head on ``h``; writes it.

    One launch for the PyTorch head and draw of cached sampling
    (:meth:`~pixelcnn_kernels.sampling.cached_gated.CachedGatedPixelCNN.logits`, then the
    model's ``draw_values`` and the writes), with bins = ``bin_inputs.numel()``::

        logits = conv_out(elu(h[b]))[channel·bins : (channel + 1)·bins]   (elu and logits rounded to h's dtype)
        value  = the first k with CDF(k) > noise[b, channel, p]·CDF(bins - 1), CDF the float64 cumulative softmax
        images[b, channel, p] = value unless known[b, p]
        inputs[b, channel, p] = bin_inputs[images[b, channel, p]]

    ``h`` (B, hidden): the last horizontal stack at the pixel, contiguous
    float32/float16/bfloat16, one dtype and device with the weights, ``inputs`` and
    ``bin_inputs`` (num_bins,) (:func:`bin_inputs`, at most :data:`MAX_DRAW_BINS`);
    ``noise`` (B, C, H·W) float32, ``known`` (B, H·W) bool, ``images`` (B, C, H·W)
    int64 and ``inputs`` (B, C, H·W): contiguous, on ``h``'s device.
    """
    backend = _check_draw(pixel, h, "h", DRAW_CUDA_OP, images, known)
    _, hidden = h.shape
    channels = images.shape[1]
    _check_noise(noise, "noise", images, channels)
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < channels:
        raise ValueError(f"channel must be an int in [0, {channels}), got {channel!r}")
    num_bins = _check_bin_inputs(bin_inputs, "bin_inputs", h, "h", MAX_DRAW_BINS)
    _check_operand(weights.weight, "weights.weight", h, (hidden, channels * num_bins), required=True, contiguous=True, x_name="h")
    _check_operand(weights.bias, "weights.bias", h, (channels * num_bins,), contiguous=True, x_name="h")
    _check_operand(inputs, "inputs", h, tuple(images.shape), required=True, contiguous=True, x_name="h")
    _kernels(backend).softmax_draw_step(pixel, h, weights.weight, weights.bias, bin_inputs, noise, known, images, inputs, channel)


def dmol_draw_step(
    pixel: torch.Tensor,
    logits: torch.Tensor,
    noise: tuple[torch.Tensor, torch.Tensor],
    known: torch.Tensor,
    images: torch.Tensor,
    inputs: torch.Tensor,
    bin_inputs: torch.Tensor,
    input_index: torch.Tensor | None = None,
) -> None:
    """Draws every image's pixel p = i·W + j in ``pixel`` from the DMOL head's ``logits`` at its noise; writes it.

    One launch for the PyTorch draw of cached sampling (the model's ``draw_values`` on
    the head's logits at the pixel, then the writes), with
    :func:`~pixelcnn_kernels.sample_discretized_mix_logistic`'s quantized draw::

        v = the draw from logits[b] at u_mix[b, :, p], u_logistic[b, :, p]; its bins floor((v + 1)·(bins - 1)/2 + 0.5)
        images[b, :, p] = those bins unless known[b, p]
        inputs[b, c, input_index[p]] = bin_inputs[images[b, c, p]]   (input_index None: p)

    ``logits`` (B, P) contiguous float32/float16/bfloat16, P = 3K for C = 1 and 10K for
    C = 3; ``noise`` = (u_mix (B, K, H·W), u_logistic (B, C, H·W)) float32, ``known``
    (B, H·W) bool and ``images`` (B, C, H·W) int64: contiguous, on ``logits``' device;
    ``inputs`` (B, C, N) of ``logits``' dtype, any strides (the network input, e.g. a
    channels-last cache with ``input_index`` (H·W,) int64 the pixels' positions in it;
    None: N = H·W, position p); ``bin_inputs`` (num_bins,): :func:`bin_inputs`.
    """
    backend = _check_draw(pixel, logits, "logits", DMOL_DRAW_CUDA_OP, images, known)
    batch, channels, pixels = images.shape
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    mixtures = check_num_logit_channels(logits.shape[1], channels)
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise TypeError("noise must be a pair (u_mix, u_logistic) of tensors")
    _check_noise(noise[0], "noise[0] (u_mix)", images, mixtures)
    _check_noise(noise[1], "noise[1] (u_logistic)", images, channels)
    _check_bin_inputs(bin_inputs, "bin_inputs", logits, "logits")
    check_tensor(inputs, "inputs", ndim=3, allow_float64=False)
    check_same_dtype(logits, "logits", inputs=inputs)
    check_same_device(logits=logits, inputs=inputs)
    if inputs.shape[:2] != (batch, channels):
        raise ValueError(f"inputs must be (B, C, N) = ({batch}, {channels}, N), got shape {tuple(inputs.shape)}")
    if input_index is None:
        if inputs.shape[2] != pixels:
            raise ValueError(f"inputs must have images' H·W = {pixels} positions without input_index, got {inputs.shape[2]}")
    else:
        check_tensor(input_index, "input_index", ndim=1, dtypes=(torch.int64,))
        check_same_device(logits=logits, input_index=input_index)
        if input_index.shape != (pixels,) or not input_index.is_contiguous():
            raise ValueError(f"input_index must be contiguous of shape ({pixels},), got {tuple(input_index.shape)}")
    _kernels(backend).dmol_draw_step(pixel, logits, noise[0], noise[1], known, images, inputs, input_index, bin_inputs)


def bin_inputs(num_bins: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """(num_bins,): the network input of each bin, ``(2·bin - L)/L`` with L = num_bins - 1, as the models' ``to_inputs`` computes it in ``dtype``."""
    return bins_to_values(torch.arange(num_bins, device=device), num_bins, dtype)


# ---------------------------------------------------------------- validation and dispatch


def _check_draw(pixel, source: torch.Tensor, name: str, cuda_op: str, images, known) -> str:
    """Checks what both draws share: ``source`` (B, ·) contiguous, images (B, C, H·W) int64 and known (B, H·W) bool, contiguous; returns the backend."""
    _check_pixel(pixel)
    check_tensor(source, name, ndim=2, allow_float64=False)
    backend = _kernel_backend(source, cuda_op)
    if not source.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (B, ·) tensor")
    check_tensor(images, "images", ndim=3, dtypes=(torch.int64,))
    check_tensor(known, "known", dtypes=(torch.bool,))
    check_same_device(**{name: source}, pixel=pixel, images=images, known=known)
    batch, _, pixels = images.shape
    if images.shape[0] != source.shape[0] or not images.is_contiguous():
        raise ValueError(f"images must be a contiguous (B={source.shape[0]}, C, H·W) tensor, got shape {tuple(images.shape)}")
    if tuple(known.shape) != (batch, pixels) or not known.is_contiguous():
        raise ValueError(f"known must be contiguous of shape {(batch, pixels)}, got {tuple(known.shape)}")
    return backend


def _check_noise(noise, name: str, images: torch.Tensor, channels: int) -> None:
    """A draw's uniforms: float32 (B, channels, H·W), contiguous, on images' device."""
    check_tensor(noise, name, dtypes=(torch.float32,), allow_float64=False)
    check_same_device(images=images, **{name: noise})
    shape = (images.shape[0], channels, images.shape[2])
    if tuple(noise.shape) != shape or not noise.is_contiguous():
        raise ValueError(f"{name} must be contiguous of shape {shape}, got {tuple(noise.shape)}")


def _check_bin_inputs(table, name: str, source: torch.Tensor, source_name: str, max_bins: int | None = None) -> int:
    """A draw's bin_inputs: (num_bins,) contiguous, at least 2 (and at most ``max_bins``) bins, of the source's dtype and device; returns num_bins."""
    check_tensor(table, name, ndim=1, allow_float64=False)
    check_same_dtype(source, source_name, **{name: table})
    check_same_device(**{source_name: source, name: table})
    most = 2**30 if max_bins is None else max_bins
    if not table.is_contiguous() or not 2 <= table.shape[0] <= most:
        raise ValueError(f"{name} must be contiguous and hold 2 to {most} bins, got {table.shape[0]}")
    return table.shape[0]


def _check_common(pixel, x, wp, bias, offsets, out, out_channels: int | None) -> str:
    """Checks what both steps share (``out_channels`` None: x's, as a gated layer's residual needs); returns the backend."""
    _check_pixel(pixel)
    check_tensor(x, "x", ndim=4, allow_float64=False)
    check_tensor(out, "out", ndim=4, allow_float64=False)
    check_same_device(x=x, pixel=pixel, out=out, wp=wp, bias=bias)
    batch, height, width, in_channels = x.shape
    out_channels = in_channels if out_channels is None else out_channels
    if tuple(out.shape) != (batch, height, width, out_channels):
        raise ValueError(f"out must have shape {(batch, height, width, out_channels)} (B, H, W, C) for x of shape {tuple(x.shape)}, got {tuple(out.shape)}")
    check_same_dtype(x, out=out, wp=wp, bias=bias)
    if wp.dim() != 3 or not wp.is_contiguous() or wp.shape[0] != len(offsets) or wp.shape[1] != in_channels:
        raise ValueError(f"wp must be a contiguous (T={len(offsets)}, Cin={in_channels}, Cout) packed weight, got shape {tuple(wp.shape)}")
    if bias is not None and (tuple(bias.shape) != (wp.shape[2],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous of shape ({wp.shape[2]},), got {tuple(bias.shape)}")
    if not all(isinstance(dx, int) and abs(dx) < 2**30 for dx in offsets):
        raise ValueError(f"offsets must be int column offsets within +-2^30, got {offsets!r}")
    _check_written_apart({"out": out}, {"x": x})
    return _kernel_backend(x, GATED_CUDA_OP)


def _check_written_apart(written: dict[str, torch.Tensor], read: dict[str, torch.Tensor | None]) -> None:
    """Each tensor a step writes in memory of its own: the kernels' threads read their inputs while
    others write, in no set order, so a write into memory an input shares (a view of it, or the
    same cache) would race."""
    # Empty tensors hold no memory (their storages all start at address 0).
    tensors = list(written.items()) + [(name, t) for name, t in read.items() if t is not None]
    tensors = [(name, t) for name, t in tensors if t.numel() > 0]
    for index, (name, t) in enumerate(tensors):
        if name not in written:
            break
        for other_name, other in tensors[index + 1 :]:
            if t.untyped_storage().data_ptr() == other.untyped_storage().data_ptr():
                raise ValueError(f"{name} shares memory with {other_name}: the step writes {name} while it reads {other_name}")


def _check_pixel(pixel) -> None:
    if not isinstance(pixel, torch.Tensor) or pixel.dtype != torch.int64:
        raise TypeError("pixel must be an int64 tensor holding the flat pixel index i·W + j")
    if pixel.shape != (1,):
        raise ValueError(f"pixel must have shape (1,), got {tuple(pixel.shape)}")


def _kernel_backend(x: torch.Tensor, cuda_op: str) -> str:
    """The backend the step ``cuda_op`` runs on for ``x``; raises where that is the PyTorch step."""
    backend = step_backend(x, cuda_op)
    if backend is None:
        raise BackendUnavailableError(
            f"the fused sampling step runs on the triton or cuda backend with float32, float16 or bfloat16 tensors; got {x.dtype} tensors on {x.device} "
            f"with the {resolve_backend(x)} backend (the PyTorch steps of the cached samplers cover the rest)"
        )
    return backend


def _check_operand(
    t, name: str, x: torch.Tensor, shape: tuple[int, ...], *, required: bool = False, contiguous: bool = False, x_name: str = "x"
) -> None:
    """A step's operand: None unless ``required``, else of ``x``'s dtype and device (``x`` called ``x_name``) and this shape."""
    if t is None and not required:
        return
    check_tensor(t, name, allow_float64=False)
    check_same_dtype(x, x_name, **{name: t})
    check_same_device(**{x_name: x, name: t})
    if tuple(t.shape) != shape or (contiguous and not t.is_contiguous()):
        raise ValueError(f"{name} must have shape {shape}{' and be contiguous' if contiguous else ''}, got {tuple(t.shape)}")


def _kernels(backend: str):
    """The module holding the steps (``gated_pixel_step``, ``resnet_position_step``, ``softmax_draw_step``, ``dmol_draw_step``) for a kernel backend (one signature each)."""
    if backend == "cuda":
        return cuda_ops()
    return importlib.import_module("pixelcnn_kernels.triton.sampling")
