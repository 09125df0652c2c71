"""The fused per-pixel step of cached Gated PixelCNN sampling (issue 7).

Cached sampling (:mod:`pixelcnn_kernels.sampling.cached_gated`) computes, for each
generated value, one pixel (i, j) of every horizontal-stack layer. Each layer is one
launch here instead of about six PyTorch ops:

- :func:`horizontal_conv_step`: ``out[b, i, j] = bias + Σ_t x[b, i, j + dx_t] · wp[t]``,
  a 1×k masked convolution at one pixel (the model's first ``horizontal_A`` conv);
- :func:`gated_layer_step`: a :class:`~pixelcnn_kernels.nn.GatedMaskedConv2d`'s
  horizontal stack at one pixel::

      pre = conv_horiz taps + bias + conv_vert_to_horiz(v_pre[b, j]) + cond[b]
      out[b, i, j] = x[b, i, j] + conv_horiz_1x1(grouped_gate(pre))

  with :func:`~pixelcnn_kernels.reference.layers.grouped_gate`'s colour-grouped
  tanh·σ (1 or 3 groups) and the residual on the layer input.

The pixel is the device tensor ``pixel`` (int64 (1,), ``p = i·W + j``), never a host
integer, so one launch sequence with fixed pointers serves every pixel: a CUDA graph
captures it once. ``x`` and ``out`` are (B, H, W, C) views of any strides, so a row
buffer (B, W, C) expanded over H (stride 0) or a per-image vector (B, C) expanded over
H and W serves as well as a whole image; ``out`` is written at the pixel only.

The weights are packed once per sampling run (:class:`HorizontalStepWeights`,
:class:`GatedLayerStepWeights`): the active taps only, as the masked convolution's
kernels read them (:func:`~pixelcnn_kernels.ops.masked_conv.pack_weight`).

Backends: ``triton`` and ``cuda`` (the extension's ``gated_pixel_step``), float32,
float16 and bfloat16, fp32 arithmetic. The reference is the PyTorch step of
:class:`~pixelcnn_kernels.sampling.cached_gated.CachedGatedPixelCNN` (which also runs
float64); :func:`step_backend` says which a tensor gets. These are plain functions, not
``torch.library`` custom ops: they write into caches in place, have no gradient and run
thousands of times per image, where a custom op's dispatch would cost more than the
kernel.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from pixelcnn_kernels.backend import BackendUnavailableError, cuda_ops, forced_backend, resolve_backend, unavailable_reason
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.masked_conv import pack_weight, tap_offsets
from pixelcnn_kernels.utils import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["GatedLayerStepWeights", "HorizontalStepWeights", "gated_layer_step", "horizontal_conv_step", "step_backend"]

# The extension's op (csrc/sampling_ops.cpp); an extension built before it lacks it.
_CUDA_OP = "gated_pixel_step"


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
        bias = None if conv.bias is None else conv.bias.detach().to(dtype).contiguous()
        return cls(pack_weight(conv.weight.detach().to(dtype), conv.spec), bias, tuple(offsets[1::2]))


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


def step_backend(like: torch.Tensor) -> str | None:
    """The kernel backend the step runs on for tensors like ``like``, or None: the PyTorch step.

    None for the ``reference`` backend and for float64. An automatic ``cuda`` choice
    whose extension lacks the op falls back to ``triton`` (None where Triton cannot
    run); a forced one raises BackendUnavailableError.
    """
    backend = resolve_backend(like)
    if backend == "reference" or like.dtype not in FLOAT_DTYPES:
        return None
    if backend == "cuda" and not hasattr(cuda_ops(), _CUDA_OP):
        if forced_backend() is not None:
            raise BackendUnavailableError(f"cuda backend unavailable: the extension has no {_CUDA_OP} op (rebuild it)")
        return "triton" if unavailable_reason("triton", like.device) is None else None
    return backend


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
    if weights.color_groups not in (1, 3) or channels % weights.color_groups:
        raise ValueError(f"weights.color_groups must be 1 or 3 and divide the {channels} channels, got {weights.color_groups!r}")
    _check_operand(v_pre, "v_pre", x, (batch, width, 2 * channels), required=True)
    _check_operand(weights.link_weight, "weights.link_weight", x, (2 * channels, 2 * channels), required=True, contiguous=True)
    _check_operand(weights.out_weight, "weights.out_weight", x, (channels, channels), required=True, contiguous=True)
    _check_operand(weights.link_bias, "weights.link_bias", x, (2 * channels,), contiguous=True)
    _check_operand(weights.out_bias, "weights.out_bias", x, (channels,), contiguous=True)
    _check_operand(cond, "cond", x, (batch, 2 * channels), contiguous=True)
    _kernels(backend).gated_pixel_step(
        pixel, x, horizontal.wp, horizontal.bias, list(horizontal.offsets), v_pre,
        weights.link_weight, weights.link_bias, cond, weights.out_weight, weights.out_bias, channels // weights.color_groups, out,
    )  # fmt: skip


# ---------------------------------------------------------------- validation and dispatch


def _check_common(pixel, x, wp, bias, offsets, out, out_channels: int | None) -> str:
    """Checks what both steps share (``out_channels`` None: x's, as a gated layer's residual needs); returns the backend."""
    if not isinstance(pixel, torch.Tensor) or pixel.dtype != torch.int64:
        raise TypeError("pixel must be an int64 tensor holding the flat pixel index i·W + j")
    if pixel.shape != (1,):
        raise ValueError(f"pixel must have shape (1,), got {tuple(pixel.shape)}")
    check_tensor(x, "x", ndim=4, allow_float64=False)
    check_tensor(out, "out", ndim=4, allow_float64=False)
    check_same_device(x=x, pixel=pixel, out=out, wp=wp, bias=bias)
    batch, height, width, in_channels = x.shape
    out_channels = in_channels if out_channels is None else out_channels
    if tuple(out.shape) != (batch, height, width, out_channels):
        raise ValueError(f"out must have shape {(batch, height, width, out_channels)} (B, H, W, C) for x of shape {tuple(x.shape)}, got {tuple(out.shape)}")
    for name, t in (("out", out), ("wp", wp), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if wp.dim() != 3 or not wp.is_contiguous() or wp.shape[0] != len(offsets) or wp.shape[1] != in_channels:
        raise ValueError(f"wp must be a contiguous (T={len(offsets)}, Cin={in_channels}, Cout) packed weight, got shape {tuple(wp.shape)}")
    if bias is not None and (tuple(bias.shape) != (wp.shape[2],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous of shape ({wp.shape[2]},), got {tuple(bias.shape)}")
    if not all(isinstance(dx, int) and abs(dx) < 2**30 for dx in offsets):
        raise ValueError(f"offsets must be int column offsets within +-2^30, got {offsets!r}")
    backend = step_backend(x)
    if backend is None:
        raise BackendUnavailableError(
            f"the fused sampling step runs on the triton or cuda backend with float32, float16 or bfloat16 tensors; got {x.dtype} tensors on {x.device} "
            f"with the {resolve_backend(x)} backend (the PyTorch step of sampling.cached_gated covers the rest)"
        )
    return backend


def _check_operand(t, name: str, x: torch.Tensor, shape: tuple[int, ...], *, required: bool = False, contiguous: bool = False) -> None:
    """A gated layer's operand: None unless ``required``, else of ``x``'s dtype and device and this shape."""
    if t is None and not required:
        return
    check_tensor(t, name, allow_float64=False)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    check_same_device(x=x, **{name: t})
    if tuple(t.shape) != shape or (contiguous and not t.is_contiguous()):
        raise ValueError(f"{name} must have shape {shape}{' and be contiguous' if contiguous else ''}, got {tuple(t.shape)}")


def _kernels(backend: str):
    """The module holding ``gated_pixel_step`` for a kernel backend (one signature)."""
    if backend == "cuda":
        return cuda_ops()
    return importlib.import_module("pixelcnn_kernels.triton.sampling")
