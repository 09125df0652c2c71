"""PixelCNN layers written once, over a table of ops: the source of truth for the fused layers.

The layers are Gated PixelCNN's gated masked convolution (:class:`GatedMaskedConv2d`),
PixelCNN++'s gated resnet block (:class:`GatedResnet`) and PixelCNN++'s shifted
convolutions and transposed convolutions (:class:`ShiftedConv2d`,
:class:`ShiftedConvTranspose2d`).

Every layer calls its ops through ``self.ops``, an :class:`OpSet`. The classes here
use :data:`REFERENCE_OPS` (the plain-PyTorch reference functions: what ``torch.compile``
traces and fuses, the benchmarks' baseline); :mod:`pixelcnn_kernels.nn.layers`
subclasses them with the public custom ops (the fused kernels). So the fused layer
and the reference-built layer are one implementation, with the same parameters and
``state_dict``; :func:`set_ops` switches a built model from one to the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelcnn_kernels.masks import check_gated_color_channels, resolve_mask
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d, conv_operands
from pixelcnn_kernels.reference.dmol import discretized_mix_logistic_nll as discretized_mix_logistic_nll_ref
from pixelcnn_kernels.reference.gates import concat_elu as concat_elu_ref
from pixelcnn_kernels.reference.gates import gate_tanh_sigmoid as gate_tanh_sigmoid_ref
from pixelcnn_kernels.reference.masked_conv import draw_dropout_keep, masked_conv2d_gated_ref, masked_conv2d_ref
from pixelcnn_kernels.utils import activation_dtype, check_dropout_rate, check_int, check_same_device, check_same_dtype, check_tensor, in_layout_of

SHIFTS = ("down", "down_right")


@dataclasses.dataclass(frozen=True)
class OpSet:
    """The ops a layer or model calls, with the signatures of the public ops of the same names.

    The masked convolutions take ``residual=`` and ``input_activation=`` (the reference
    adds and applies them as separate passes, the kernels fuse them).
    ``discretized_mix_logistic_nll(x, logits, num_bins=...)`` returns the per-pixel
    (B, H, W) NLL (the public op with ``reduction="none"``).
    """

    masked_conv2d: Callable[..., torch.Tensor]
    masked_conv2d_gated: Callable[..., torch.Tensor]
    gate_tanh_sigmoid: Callable[..., torch.Tensor]
    concat_elu: Callable[..., torch.Tensor]
    discretized_mix_logistic_nll: Callable[..., torch.Tensor]


REFERENCE_OPS = OpSet(
    masked_conv2d=masked_conv2d_ref,
    masked_conv2d_gated=masked_conv2d_gated_ref,
    gate_tanh_sigmoid=gate_tanh_sigmoid_ref,
    concat_elu=concat_elu_ref,
    discretized_mix_logistic_nll=discretized_mix_logistic_nll_ref,
)


def set_ops(module: nn.Module, ops: OpSet) -> nn.Module:
    """Makes ``module`` and every submodule that calls ops through ``.ops`` call ``ops``; returns it."""
    for submodule in module.modules():
        if isinstance(getattr(submodule, "ops", None), OpSet):
            submodule.ops = ops
    return module


def apply_masked_conv(ops_fn: Callable[..., torch.Tensor], conv: MaskedConv2d, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``ops_fn`` (a masked convolution op) with the weight, bias and mask settings of ``conv``."""
    x, weight, bias = conv_operands(conv, x)
    return ops_fn(x, weight, bias, mask=conv.spec, dilation=conv.dilation[0], color_groups=conv.spec.color_groups, **kwargs)


def residual_masked_conv(ops_fn: Callable[..., torch.Tensor], conv: MaskedConv2d, x: torch.Tensor, residual: torch.Tensor, **kwargs) -> torch.Tensor:
    """``residual + apply_masked_conv(ops_fn, conv, x, **kwargs)``, the add in the conv's epilogue.

    The op takes a residual of its own dtype only; under autocast the residual stream
    keeps its wider dtype, and so does the sum: the add is then a separate op.
    """
    if residual.dtype == activation_dtype(x):
        return apply_masked_conv(ops_fn, conv, x, residual=residual, **kwargs)
    return residual + apply_masked_conv(ops_fn, conv, x, **kwargs)


def _check_channels(x: torch.Tensor, channels: int, name: str) -> None:
    check_tensor(x, name)  # a float tensor: cast to its dtype, integer weights would round to zeros
    if x.dim() != 4 or x.shape[1] != channels or 0 in x.shape[2:]:
        raise ValueError(f"{name} must be (N, {channels}, H, W) with H, W >= 1, got shape {tuple(x.shape)}")


def _check_cond(cond: torch.Tensor | None, cond_channels: int | None, batch: int) -> None:
    if cond_channels is None:
        if cond is not None:
            raise ValueError("cond was given but the layer was built without cond_channels")
        return
    if cond is None:
        raise ValueError(f"the layer was built with cond_channels={cond_channels}: pass cond (N, {cond_channels})")
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"cond must be a torch.Tensor, got {type(cond).__name__}")
    if tuple(cond.shape) != (batch, cond_channels):
        raise ValueError(f"cond must be ({batch}, {cond_channels}), got shape {tuple(cond.shape)}")


def _cond_projection(cond_channels: int | None, out_channels: int) -> nn.Linear | None:
    """V^T·h of the Gated PixelCNN paper: a per-image vector added to every pixel's pre-activation."""
    if cond_channels is None:
        return None
    check_int(cond_channels, "cond_channels", 1)
    return nn.Linear(cond_channels, out_channels, bias=False)


def _project(projection: nn.Linear | None, cond: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if projection is None:
        return None
    dtype = activation_dtype(like)
    return F.linear(cond.to(dtype), projection.weight.to(dtype))


class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al. 2016), as in the UvA DL tutorial 12.

    ``forward(v, h, cond=None) -> (v_out, h_out)`` on two stacks of shape (N, C, H, W):

    - vertical: ``v_pre = conv_vert(v)`` (k×k, rows up to the centre row), ``v_out = tanh(a)·σ(b)``;
    - horizontal: ``h_pre = conv_horiz(h) + conv_vert_to_horiz(v_pre)`` (1×k, the centre
      and its left; plus a 1×1 of the vertical *pre-activation*, the vertical conv's
      output), gated the same way, then ``h_out = h + conv_horiz_1x1(gated)``: the
      residual is on the horizontal stack only.

    The vertical stack must only see rows strictly above (the model's first layer uses a
    ``vertical_A`` mask); the link from it to the horizontal stack is then causal.
    ``cond`` (N, cond_channels), e.g. a one-hot class, is projected without bias to each
    stack's 2C pre-activation channels and added just before its gate (so the vertical
    link carries the conv output only; the horizontal projection covers that term).
    The vertical conv, its conditioning and gate run as one ``masked_conv2d_gated``
    that also returns the pre-activation for the link; the horizontal stack's link,
    the add of ``conv_horiz(h)`` (``addend=``), its conditioning and gate as another.
    The 1×1 output conv adds ``h`` in its epilogue (``residual=``).

    With ``color_groups=3`` the horizontal stack's channels are R, G, B groups (C ≡ 0 or
    2 mod 3: 126 and 128 split 42/42/42 and 43/43/42, see
    :func:`~pixelcnn_kernels.masks.check_gated_color_channels`): ``conv_horiz`` and
    ``conv_horiz_1x1`` are colour-masked (group g sees
    groups ≤ g at the centre), their 2C pre-activations are laid out colour-major, and
    the horizontal gate pairs a and b within each group (``gate_groups=3``, see
    :mod:`pixelcnn_kernels.reference.gates`); the vertical stack
    needs no colour mask (it sees no pixel of the current row). Accepts float32,
    float16, bfloat16 and float64 inputs.

    ``dropout`` (default 0) drops elements of the horizontal gated output before
    ``conv_horiz_1x1`` in training mode only (the residual branch: the skip path and the
    vertical stack are untouched); elementwise dropout keeps causality, and in eval mode
    the layer is deterministic, which exact sampling needs.
    """

    ops: ClassVar[OpSet] = REFERENCE_OPS

    def __init__(
        self, channels: int, kernel_size: int = 3, dilation: int = 1, color_groups: int = 1, cond_channels: int | None = None, dropout: float = 0.0
    ):
        super().__init__()
        check_int(channels, "channels", 1)
        if check_int(kernel_size, "kernel_size", 1) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if color_groups not in (1, 3):
            raise ValueError(f"color_groups must be 1 or 3, got {color_groups!r}")
        check_gated_color_channels(channels, color_groups, "channels")
        check_dropout_rate(dropout, "dropout")
        self.channels = channels
        self.color_groups = color_groups
        self.cond_channels = cond_channels
        self.dropout = nn.Dropout(dropout)
        self.conv_vert = MaskedConv2d(channels, 2 * channels, kernel_size, mask="vertical", dilation=dilation)
        self.conv_horiz = MaskedConv2d(channels, 2 * channels, (1, kernel_size), mask="horizontal", dilation=dilation, color_groups=color_groups)
        self.conv_vert_to_horiz = MaskedConv2d(2 * channels, 2 * channels, 1, mask="full")
        self.conv_horiz_1x1 = MaskedConv2d(channels, channels, 1, mask="full", color_groups=color_groups)
        self.cond_vert = _cond_projection(cond_channels, 2 * channels)
        self.cond_horiz = _cond_projection(cond_channels, 2 * channels)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_channels(v, self.channels, "v")
        _check_channels(h, self.channels, "h")
        if v.shape != h.shape:
            raise ValueError(f"v and h must have one shape, got {tuple(v.shape)} and {tuple(h.shape)}")
        check_same_dtype(v, "v", h=h)
        check_same_device(v=v, h=h)
        _check_cond(cond, self.cond_channels, v.shape[0])
        ops = self.ops
        v_out, v_pre = apply_masked_conv(ops.masked_conv2d_gated, self.conv_vert, v, cond=_project(self.cond_vert, cond, v), return_preactivation=True)
        h_conv = apply_masked_conv(ops.masked_conv2d, self.conv_horiz, h)
        h_cond = _project(self.cond_horiz, cond, h)
        h_gated = apply_masked_conv(
            ops.masked_conv2d_gated, self.conv_vert_to_horiz, v_pre, cond=h_cond, addend=h_conv, gate_groups=self.color_groups
        )
        h_out = residual_masked_conv(ops.masked_conv2d, self.conv_horiz_1x1, self.dropout(h_gated), h)
        return v_out, h_out


class GatedResnet(nn.Module):
    """PixelCNN++'s gated resnet block (Salimans et al. 2017, ``gated_resnet``).

    ``forward(x, skip=None, cond=None)`` on x (N, C, H, W)::

        c = conv_input(concat_elu(x))            # shifted conv, 2C -> C
        c = c + nin_skip(concat_elu(skip))       # when the block has a skip input
        c = dropout(concat_elu(c))               # in training
        a, b = halves of conv_out(c) + cond_proj(cond)   # shifted conv, 2C -> 2C
        return x + a·σ(b)

    ``shift`` is ``"down"`` (2×3 down-shifted convs, the stream from above) or
    ``"down_right"`` (2×2 down-right-shifted convs, the stream from above and the left).
    ``skip_streams`` is how many C-channel tensors are concatenated in ``skip`` (0: none;
    ``skip`` is then (N, skip_streams·C, H, W)). ``cond`` (N, cond_channels) is projected
    without bias and added before the gate, as in the original's ``h``. The second
    conv, the bias, the conditioning, the gate and the residual run as one
    ``masked_conv2d_gated``. Every concat_elu is the ``input_activation`` of the conv
    that reads it (computed by the conv's kernels, not as a pass of the layer's own),
    and in training the dropout after the second one too: the layer draws its mask
    (:func:`~pixelcnn_kernels.reference.masked_conv.draw_dropout_keep`) and the conv
    applies it with concat_elu (``dropout_keep``). ``nin_skip`` adds ``c`` in its epilogue.
    Dropout is elementwise (as ``nn.Dropout``: kept elements times 1 / (1 - p)), as in
    the original TensorFlow code; the PyTorch port pclucas14/pixel-cnn-pp uses
    ``nn.Dropout2d`` (whole channels). ``self.dropout`` holds p.
    """

    ops: ClassVar[OpSet] = REFERENCE_OPS

    def __init__(self, channels: int, shift: str = "down", skip_streams: int = 0, cond_channels: int | None = None, dropout: float = 0.5):
        super().__init__()
        check_int(channels, "channels", 1)
        if shift not in SHIFTS:
            raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
        check_int(skip_streams, "skip_streams", 0)
        check_dropout_rate(dropout, "dropout")
        self.channels = channels
        self.skip_streams = skip_streams
        self.cond_channels = cond_channels
        mask = f"{shift}_shifted"
        self.conv_input = MaskedConv2d(2 * channels, channels, mask=mask)
        self.nin_skip = MaskedConv2d(2 * skip_streams * channels, channels, 1, mask="full") if skip_streams else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = MaskedConv2d(2 * channels, 2 * channels, mask=mask)
        self.cond_proj = _cond_projection(cond_channels, 2 * channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_channels(x, self.channels, "x")
        if self.skip_streams:
            if skip is None:
                raise ValueError(f"this block takes a skip input (N, {self.skip_streams * self.channels}, H, W)")
            _check_channels(skip, self.skip_streams * self.channels, "skip")
            if skip.shape[0] != x.shape[0] or skip.shape[2:] != x.shape[2:]:
                raise ValueError(f"skip must match x in batch and spatial size, got {tuple(skip.shape)} and {tuple(x.shape)}")
        elif skip is not None:
            raise ValueError("skip was given but the block was built with skip_streams=0")
        _check_cond(cond, self.cond_channels, x.shape[0])
        ops = self.ops
        c = apply_masked_conv(ops.masked_conv2d, self.conv_input, x, input_activation="concat_elu")
        if skip is not None:
            c = residual_masked_conv(ops.masked_conv2d, self.nin_skip, skip, c, input_activation="concat_elu")
        p = self.dropout.p if self.dropout.training else 0.0  # its own mode, as nn.Dropout's (e.g. Monte Carlo dropout)
        keep = draw_dropout_keep(c, 2 * self.channels, p) if p > 0 else None
        return residual_masked_conv(
            ops.masked_conv2d_gated, self.conv_out, c, x, input_activation="concat_elu", gate="sigmoid", cond=_project(self.cond_proj, cond, c),
            dropout_keep=keep, dropout_p=p,
        )  # fmt: skip


# The shifts pad after slicing: the result is then dense in x's layout (a slice of a padded
# tensor is neither NCHW nor NHWC, and the next convolution would have to copy it).


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Moves every row one down, with a zero first row (PixelCNN++'s ``down_shift``)."""
    return F.pad(x[:, :, :-1, :], (0, 0, 1, 0))


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Moves every column one right, with a zero first column (PixelCNN++'s ``right_shift``)."""
    return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))


class ShiftedConv2d(MaskedConv2d):
    """PixelCNN++'s ``down_shifted_conv2d`` / ``down_right_shifted_conv2d``.

    ``shift="down"``: kernel (2, 3) by default, output (i, j) sees rows i-kh+1..i and
    columns j-(kw-1)/2..j+(kw-1)/2. ``shift="down_right"``: kernel (2, 2) by default,
    rows i-kh+1..i and columns j-kw+1..j. Stride 1 runs the ``masked_conv2d`` op with
    the ``down_shifted`` / ``down_right_shifted`` mask; a larger stride (the
    down-sampling convs) zero-pads the same way and runs a strided ``F.conv2d``.
    ``shift_output`` then moves the output one row down (``"down"``) or one column
    right (``"down_right"``), as the original's first layers do, so that the output no
    longer sees its own pixel. Input (N, in_channels, H, W), any float dtype; output
    (N, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    ops: ClassVar[OpSet] = REFERENCE_OPS

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] | None = None, shift: str = "down", stride: int = 1, shift_output: bool = False):
        if shift not in SHIFTS:
            raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
        check_int(stride, "stride", 1)
        if not isinstance(shift_output, bool):
            raise TypeError(f"shift_output must be a bool, got {type(shift_output).__name__}")
        super().__init__(in_channels, out_channels, kernel_size, mask=f"{shift}_shifted")
        self.stride = (stride, stride)  # Conv2d's attribute: the masked conv op is stride 1, a larger one runs F.conv2d
        self.shift = shift
        self.shift_output = shift_output

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *args, **kwargs):
        raise TypeError("ShiftedConv2d.from_conv is not supported: use MaskedConv2d.from_conv(conv, mask='down_shifted') "
                        "or mask='down_right_shifted' (pixelcnn_kernels.convert does, for PixelCNN++'s shifted convs)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.in_channels, "x")
        if self.stride[0] == 1:
            out = apply_masked_conv(self.ops.masked_conv2d, self, x)
        else:
            x, weight, bias = conv_operands(self, x)
            top, bottom, left, right = self.spec.padding()
            out = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride=self.stride)
        if not self.shift_output:
            return out
        return down_shift(out) if self.shift == "down" else right_shift(out)

    def extra_repr(self) -> str:
        stride = f", stride={self.stride[0]}" if self.stride[0] > 1 else ""
        return f"{super().extra_repr()}, shift={self.shift!r}{stride}" + (", shift_output=True" if self.shift_output else "")


class ShiftedConvTranspose2d(nn.ConvTranspose2d):
    """PixelCNN++'s ``down_shifted_deconv2d`` / ``down_right_shifted_deconv2d`` (up-sampling).

    A transposed convolution (kernel (2, 3) for ``shift="down"``, (2, 2) for
    ``"down_right"``, stride 2, output padding 1) cropped so that output (i, j) only
    depends on inputs at or above (and, for ``"down_right"``, at or left of) it.
    Input (N, in_channels, H, W), output (N, out_channels, stride·H, stride·W); no op of
    the package does this, so both op sets run ``F.conv_transpose2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] | None = None, shift: str = "down", stride: int = 2):
        if shift not in SHIFTS:
            raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
        check_int(stride, "stride", 1)
        kernel_size = resolve_mask(f"{shift}_shifted", kernel_size).kernel_size  # the shifted conv's checks (an odd width "down")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, output_padding=stride - 1)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.in_channels, "x")
        dtype = activation_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = F.conv_transpose2d(x.to(dtype), self.weight.to(dtype), bias, stride=self.stride, output_padding=self.output_padding)
        kh, kw = self.kernel_size
        rows = out.shape[2] - kh + 1
        left, right = ((kw - 1) // 2, (kw - 1) // 2) if self.shift == "down" else (0, kw - 1)
        # The crop made dense in the input's layout, once, for the convolutions that read it.
        return in_layout_of(out[:, :, :rows, left : out.shape[3] - right], x)
