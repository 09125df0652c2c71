"""Masked convolutions: ``masked_conv2d`` and ``masked_conv2d_gated``.

Stride 1, "same" output size, the mask a named spec or a boolean (kh, kw) tensor
(see :mod:`pixelcnn_kernels.masks`). The weight keeps the ``nn.Conv2d`` shape
(Cout, Cin, kh, kw); weights at masked-out taps are never read and their
gradient is exactly zero.

Backends: ``reference`` (``F.conv2d`` on the masked weight; float64 runs only
here), ``triton`` (implicit-GEMM kernels over the active taps only) and ``cuda``
(the extension's ``pixelcnn_kernels_cuda.masked_conv2d_*`` ops). Both kernel
backends take the same host-side packing, built here: channels-last
activations, the packed weight ``wp`` (T, Cin, Cout) of the T active taps, the
taps' (dy, dx) offsets, and ``allow_tf32``: fp32 products use TF32 where
PyTorch allows it for its own convolutions (:func:`conv_allows_tf32`).
The output has the input's memory format (channels-last in, channels-last out).

Both ops take two fusions: ``residual`` (added to the output in the forward's
epilogue; its gradient is the output's) and ``input_activation="concat_elu"``
(the kernels read concat_elu(x) from one elementwise pass just before the forward
and the weight gradient, and fold concat_elu's backward into the input gradient's
epilogue), optionally followed by dropout (``dropout_keep``, a boolean mask the
caller draws, and ``dropout_p``: read as uint8 rows by that pass, and applied to
the gradient in the same epilogue before concat_elu's backward).
The gated op also takes an ``addend`` to its pre-activation (added in the
epilogue before the gate; its gradient is the pre-activation's), can return
that pre-activation, written in the same pass, and gates a pre-activation laid
out in colour groups (``gate_groups``): the packed weight's columns then come
halves first, and the epilogue maps each column to its channel. Its backward
is the gate's backward, one elementwise pass that also adds the returned
pre-activation's gradient from its other uses (``accumulate``; not when cond
needs a gradient, which is the gate's part alone), then the conv's two GEMMs.
"""

from __future__ import annotations

import functools
import importlib
import operator

import torch

from pixelcnn_kernels.backend import backend_with_cuda_op, cuda_ops, resolve_kernel_backend
from pixelcnn_kernels.masks import MaskSpec, channel_group_mask, check_color_channels, check_color_groups, check_gated_color_channels, halves_first_channels, resolve_mask
from pixelcnn_kernels.ops.gates import gate_sigmoid, gate_sigmoid_backward, gate_tanh_sigmoid, gate_tanh_sigmoid_backward
from pixelcnn_kernels.ops.registration import autograd_inside_custom_op, custom_op, eager_fast_path
from pixelcnn_kernels.reference.masked_conv import GATES, INPUT_ACTIVATIONS, dropout_scale, masked_conv2d_ref
from pixelcnn_kernels.utils import channels_last, check_dropout_rate, check_int, check_same_device, check_same_dtype, check_tensor, compute_dtype, in_layout_of, is_channels_last

# Codes of the gates in the kernels' ``gate`` argument (shared with the CUDA op).
GATE_CODES = {"tanh_sigmoid": 1, "sigmoid": 2}
# The unfused gate and its gradient are the gates family's ops (their own backend choice).
_GATE_OPS = {1: gate_tanh_sigmoid, 2: gate_sigmoid}
_GATE_BACKWARD_OPS = {1: gate_tanh_sigmoid_backward, 2: gate_sigmoid_backward}

# ---------------------------------------------------------------- host-side packing (triton and cuda)


def tap_offsets(spec: MaskSpec, dilation: int) -> list[int]:
    """(dy_0, dx_0, dy_1, dx_1, ...): where each active tap reads, relative to the output pixel."""
    ai, aj = spec.anchor
    return [d for i, j in spec.taps for d in ((i - ai) * dilation, (j - aj) * dilation)]


@functools.lru_cache(maxsize=None)
def _tap_index(taps: tuple[tuple[int, int], ...], kernel_width: int, device: torch.device) -> torch.Tensor:
    """Flat (i·kw + j) kernel positions of the taps, cached per device (no host copy per call)."""
    return torch.tensor([i * kernel_width + j for i, j in taps], dtype=torch.long, device=device)


@functools.lru_cache(maxsize=None)
def _hidden_channel_pairs(spec: MaskSpec, out_channels: int, in_channels: int, device: torch.device) -> torch.Tensor:
    """Boolean (Cout, Cin): the channel pairs ``spec``'s colour groups hide at the anchor tap.

    Zeroed with masked_fill, not a multiply: exact zeros even where the values are not finite.
    """
    return ~channel_group_mask(out_channels, in_channels, spec.color_groups, spec.anchor_inclusive).to(device)


@functools.lru_cache(maxsize=None)
def _halves_first_index(out_channels: int, gate_groups: int, device: torch.device) -> torch.Tensor:
    """:func:`~pixelcnn_kernels.masks.halves_first_channels` on ``device``, cached (no host copy per call)."""
    return halves_first_channels(out_channels // 2, gate_groups).to(device)


def pack_weight(weight: torch.Tensor, spec: MaskSpec, gate_groups: int = 1) -> torch.Tensor:
    """The kernels' weight ``wp`` (T, Cin, Cout), contiguous: wp[t, ci, co] = weight[co, ci, i_t, j_t].

    One gather of the taps from the transposed view (index_select writes its result
    contiguous). With colour groups, the channel pairs hidden at the anchor tap are zero.
    With ``gate_groups`` > 1 (a gated conv whose pre-activation is [a_1 b_1 | a_2 b_2 |
    ...], see :mod:`pixelcnn_kernels.reference.gates`) the
    columns come halves first, [a_1 a_2 ... | b_1 b_2 ...], as the gated kernels pair
    column n with n + Cout / 2; their epilogue maps each column to its channel.
    """
    out_channels, in_channels, _, kernel_width = weight.shape
    hidden = _hidden_channel_pairs(spec, out_channels, in_channels, weight.device) if spec.color_groups > 1 else None
    if gate_groups > 1:
        columns = _halves_first_index(out_channels, gate_groups, weight.device)
        weight = weight.index_select(0, columns)
        hidden = None if hidden is None else hidden.index_select(0, columns)
    packed = weight.flatten(2).permute(2, 1, 0).index_select(0, _tap_index(spec.taps, kernel_width, weight.device))
    if hidden is not None:
        packed[spec.taps.index(spec.anchor)].masked_fill_(hidden.T, 0)
    return packed


def weight_grad_layout(spec: MaskSpec, weight: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor | None, int]:
    """The weight-gradient kernels' layout arguments: each tap's flat kernel position i·kw + j,
    the kernel size (kh, kw), and the channel pairs the colour groups hide at the anchor tap
    (uint8 (Cout, Cin), 1: hidden; None without colour groups) with that tap's index (-1 without).

    The kernels write the gradient in the weight's own shape: exactly zero at masked-out taps and
    at those hidden pairs."""
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    positions = [i * kernel_width + j for i, j in spec.taps]
    if spec.color_groups == 1:
        return positions, [kernel_height, kernel_width], None, -1
    hidden = _hidden_channel_pairs(spec, out_channels, in_channels, weight.device).view(torch.uint8)
    return positions, [kernel_height, kernel_width], hidden, spec.taps.index(spec.anchor)


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as a contiguous (N, H, W, C) tensor: a view when ``t`` is channels-last."""
    return t.permute(0, 2, 3, 1).contiguous()


def _memory_format(like: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(like) else torch.contiguous_format


def _from_channels_last_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) kernel output as (N, C, H, W) in ``like``'s memory format."""
    return in_layout_of(rows.permute(0, 3, 1, 2), like)


def _empty_nchw(like: torch.Tensor, channels: int) -> torch.Tensor:
    """Uninitialised (N, channels, H, W) in ``like``'s dtype, device and memory format (the fakes)."""
    n, _, h, w = like.shape
    return torch.empty(n, channels, h, w, dtype=like.dtype, device=like.device, memory_format=_memory_format(like))


# ---------------------------------------------------------------- backend choice


def _choose_backend(cuda_op: str, *tensors: torch.Tensor | None) -> str:
    """The backend of one call, with this family's per-call fallbacks.

    float64 runs only on ``reference``. The ``cuda`` backend runs the extension
    op named ``cuda_op``; when the extension lacks it, a forced ``cuda`` raises
    BackendUnavailableError saying so, an automatic choice falls back to
    ``triton`` (``reference`` where Triton cannot run).
    """
    backend = resolve_kernel_backend(tensors[0].dtype, "masked-convolution", *tensors)
    return backend_with_cuda_op(backend, cuda_op, tensors[0].device)


# The (backend, op) keys of torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision
# and torch.backends.fp32_precision, read by the getter those properties call: each property read
# costs ~1 µs of Python, and every convolution launch reads them.
_CONV_FP32_PRECISION_KEYS = (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))
_fp32_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def conv_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 convolutions use TF32 (True by default); passed to the kernels.

    Reads the per-op ``fp32_precision`` settings where this torch has them
    ("none" defers to the cuDNN-wide, then the global setting), else the legacy
    ``torch.backends.cudnn.allow_tf32`` (whose getter raises once the two APIs are mixed).
    """
    if _fp32_precision is None or not hasattr(torch.backends.cudnn, "conv"):
        return torch.backends.cudnn.allow_tf32
    for backend, op in _CONV_FP32_PRECISION_KEYS:
        precision = _fp32_precision(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


def _kernels(backend: str):
    """The module of ``masked_conv2d_*`` kernel launchers of a kernel backend (same signatures)."""
    if backend == "cuda":
        return cuda_ops()
    return importlib.import_module("pixelcnn_kernels.triton.masked_conv")


# ---------------------------------------------------------------- validation


@torch.compiler.assume_constant_result
def _named_mask_args(mask: str, kernel_size: tuple[int, int], color_groups: int) -> tuple:
    """:func:`_mask_args` of a named mask; a constant to torch.compile (resolving builds small tensors,
    which Dynamo would trace; it inlines an lru_cache, so the cache is a function of its own)."""
    return _cached_named_mask_args(mask, kernel_size, color_groups)


@functools.lru_cache(maxsize=None)
def _cached_named_mask_args(mask: str, kernel_size: tuple[int, int], color_groups: int) -> tuple:
    """Resolving a name takes ~36 µs of host time, as long as the rest of an op's checks together."""
    return _mask_args(resolve_mask(mask, kernel_size, color_groups))


def _mask_args(spec: MaskSpec) -> tuple:
    """A spec as the custom ops' arguments: (flat taps, anchor, color_groups, anchor_inclusive)."""
    return tuple(v for tap in spec.taps for v in tap), spec.anchor, spec.color_groups, spec.anchor_inclusive


@functools.lru_cache(maxsize=None)
def _spec_from_args(kernel_size: tuple[int, int], taps: tuple[int, ...], anchor: tuple[int, int], color_groups: int, anchor_inclusive: bool) -> MaskSpec:
    """The MaskSpec the custom ops' mask arguments describe (its name is not among them)."""
    pairs = tuple(zip(taps[0::2], taps[1::2]))
    return MaskSpec("resolved", kernel_size, pairs, anchor, color_groups, anchor_inclusive)


def _spec(weight: torch.Tensor, taps: list[int], anchor: list[int], color_groups: int, anchor_inclusive: bool) -> MaskSpec:
    """The spec of an op call, its kernel size taken from ``weight``."""
    return _spec_from_args(tuple(weight.shape[2:]), tuple(taps), tuple(anchor), color_groups, anchor_inclusive)


def _validate(x, weight, bias, mask, dilation, color_groups, input_activation=None, dropout_keep=None, dropout_p=0.0) -> tuple:
    """Checks the arguments of masked_conv2d but residual; returns the ops' conv arguments.

    They are (dropout_keep, taps, anchor, color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p).
    """
    if input_activation is not None and input_activation not in INPUT_ACTIVATIONS:
        raise ValueError(f"input_activation must be None or one of {INPUT_ACTIVATIONS}, got {input_activation!r}")
    concat_elu_input = input_activation == "concat_elu"
    check_tensor(x, "x", ndim=4)
    if 0 in x.shape[2:]:
        raise ValueError(f"x must have a height and width >= 1 (a same-size convolution pads them), got shape {tuple(x.shape)}")
    check_tensor(weight, "weight", ndim=4)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    check_same_dtype(x, weight=weight, bias=bias)
    check_same_device(x=x, weight=weight, bias=bias)
    out_channels, in_channels = weight.shape[:2]
    # The mask is compile-time structure of the kernels: torch.compile(dynamic=True) specialises on the kernel size.
    kernel_size = (operator.index(weight.shape[2]), operator.index(weight.shape[3]))
    if out_channels == 0 or in_channels == 0 or 0 in kernel_size:
        raise ValueError(f"weight must have at least one output and one input channel and a kernel of at least 1×1, got shape {tuple(weight.shape)}")
    if concat_elu_input and 2 * x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels, {2 * x.shape[1]} after input_activation='concat_elu', but weight expects {in_channels} (weight shape {tuple(weight.shape)})"
        )
    if not concat_elu_input and x.shape[1] != in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {in_channels} (weight shape {tuple(weight.shape)})")
    if bias is not None and bias.shape[0] != out_channels:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has {out_channels} output channels")
    check_int(dilation, "dilation", 1)
    if isinstance(mask, str):
        args = _named_mask_args(mask, kernel_size, check_color_groups(color_groups))
    else:
        if isinstance(mask, torch.Tensor):
            _check_mask_tensor(mask, kernel_size)
        args = _mask_args(resolve_mask(mask, kernel_size, color_groups))
    check_color_channels(in_channels, color_groups, "weight.shape[1] (input channels)")
    check_color_channels(out_channels, color_groups, "weight.shape[0] (output channels)")
    if color_groups > 1 and concat_elu_input:
        # concat_elu's channels [elu(x), elu(-x)] are not colour-major: a colour third of them mixes groups.
        raise ValueError(f"input_activation='concat_elu' needs color_groups=1 (its 2C channels would mix colour groups), got {color_groups}")
    dropout_p = _check_dropout(dropout_keep, dropout_p, concat_elu_input, x, in_channels)
    return (dropout_keep,) + args + (dilation, concat_elu_input, dropout_p)


def _check_mask_tensor(mask: torch.Tensor, kernel_size: tuple[int, int]) -> None:
    """A mask tensor's values are read on the host: they must be at hand, and the weight's kernel's shape."""
    if torch.compiler.is_compiling():
        # Tracing cannot read the values the kernels are specialised on.
        raise TypeError("mask: under torch.compile a mask tensor's values cannot be read; resolve it before the "
                        "compiled function (spec = pixelcnn_kernels.masks.resolve_mask(mask)) and pass the MaskSpec, "
                        "or use pixelcnn_kernels.nn.MaskedConv2d, which resolves it once")
    if mask.device.type == "meta":
        raise ValueError("mask must hold values (a boolean (kh, kw) tensor on any real device), got a meta tensor")
    if tuple(mask.shape) != kernel_size:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight's kernel is {kernel_size}")


def _check_dropout(dropout_keep, dropout_p, concat_elu_input: bool, x: torch.Tensor, in_channels: int) -> float:
    """``dropout_p`` as a float (0.0 without ``dropout_keep``), after checking both."""
    dropout_p = check_dropout_rate(dropout_p, "dropout_p")
    if dropout_keep is None:
        if dropout_p:
            raise ValueError(f"dropout_p={dropout_p} needs dropout_keep, the mask drawn with it (draw_dropout_keep)")
        return 0.0
    if not concat_elu_input:
        raise ValueError("dropout_keep needs input_activation='concat_elu' (the dropout the kernels fuse is PixelCNN++'s, after concat_elu)")
    check_tensor(dropout_keep, "dropout_keep", ndim=4, dtypes=(torch.bool,), allow_float64=False)
    check_same_device(x=x, dropout_keep=dropout_keep)
    expected = (x.shape[0], in_channels, *x.shape[2:])
    if tuple(dropout_keep.shape) != expected:
        raise ValueError(f"dropout_keep must have the convolution input's shape (N, Cin, H, W) = {expected}, got {tuple(dropout_keep.shape)}")
    return dropout_p


def _check_output_shaped(t: torch.Tensor | None, name: str, what: str, x: torch.Tensor, channels: int) -> None:
    """``t`` (argument ``name``), if given, must be (N, channels, H, W) of x (``what``), in x's dtype and on its device."""
    if t is None:
        return
    check_tensor(t, name, ndim=4)
    check_same_dtype(x, **{name: t})
    check_same_device(x=x, **{name: t})
    expected = (x.shape[0], channels, *x.shape[2:])
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have {what} {expected}, got {tuple(t.shape)}")


# ---------------------------------------------------------------- masked_conv2d and its gradients

# Every op below takes the input's dropout, mask, dilation and input activation as
# (dropout_keep: boolean (N, Cin, H, W) or None, taps: flat (i, j) list, anchor: (i, j),
# color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p).


def _input_activation(concat_elu_input: bool) -> str | None:
    """The reference's ``input_activation`` argument of the ops' flag."""
    return "concat_elu" if concat_elu_input else None


def _optional_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _channels_last_rows(t)


def _keep_rows(dropout_keep: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean (N, Cin, H, W) keep mask as the kernels read it: (N, H, W, Cin) uint8 rows."""
    return None if dropout_keep is None else _channels_last_rows(dropout_keep).view(torch.uint8)


def _forward(backend: str, x, weight, bias, residual, keep, spec: MaskSpec, dilation: int, concat_elu_input: bool, dropout_p: float) -> torch.Tensor:
    """The convolution (+ residual) on ``backend``, output in x's memory format."""
    if backend == "reference":
        out = masked_conv2d_ref(
            x, weight, bias, spec, dilation, spec.color_groups, residual=residual, input_activation=_input_activation(concat_elu_input),
            dropout_keep=keep, dropout_p=dropout_p,
        )  # fmt: skip
        return in_layout_of(out, x)
    bias = bias.contiguous() if bias is not None else None
    out = _kernels(backend).masked_conv2d_fwd(
        _channels_last_rows(x), pack_weight(weight, spec), bias, _optional_rows(residual), tap_offsets(spec, dilation), concat_elu_input, conv_allows_tf32(),
        _keep_rows(keep), dropout_scale(dropout_p),
    )  # fmt: skip
    return _from_channels_last_rows(out, x)


@custom_op("pixelcnn_kernels::masked_conv2d")
def _masked_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, dropout_keep: torch.Tensor | None,
    taps: list[int], anchor: list[int], color_groups: int, anchor_inclusive: bool, dilation: int, concat_elu_input: bool, dropout_p: float,
) -> torch.Tensor:
    spec = _spec(weight, taps, anchor, color_groups, anchor_inclusive)
    backend = _choose_backend("masked_conv2d_fwd", x, weight, bias, residual, dropout_keep)
    return _forward(backend, x, weight, bias, residual, dropout_keep, spec, dilation, concat_elu_input, dropout_p)


@_masked_conv2d_op.register_fake
def _(x, weight, bias, residual, dropout_keep, taps, anchor, color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p):
    return _empty_nchw(x, weight.shape[0])


def _reference_grad(grad_out, x, weight, keep, spec, dilation, concat_elu_input, dropout_p, wrt_input: bool) -> torch.Tensor:
    """Gradient of the reference convolution w.r.t. x or weight (autograd: no math written twice)."""
    with autograd_inside_custom_op():
        x = x.detach().requires_grad_(wrt_input)
        weight = weight.detach().requires_grad_(not wrt_input)
        out = masked_conv2d_ref(
            x, weight, None, spec, dilation, spec.color_groups, input_activation=_input_activation(concat_elu_input), dropout_keep=keep, dropout_p=dropout_p
        )
        (grad,) = torch.autograd.grad(out, x if wrt_input else weight, grad_out)
    return grad


@custom_op("pixelcnn_kernels::masked_conv2d_grad_input")
def _grad_input_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dropout_keep: torch.Tensor | None,
    taps: list[int], anchor: list[int], color_groups: int, anchor_inclusive: bool, dilation: int, concat_elu_input: bool, dropout_p: float,
) -> torch.Tensor:
    """The gradient w.r.t. x (through concat_elu, and the dropout, when ``concat_elu_input``)."""
    spec = _spec(weight, taps, anchor, color_groups, anchor_inclusive)
    backend = _choose_backend("masked_conv2d_dgrad", grad_out, x, weight, dropout_keep)
    if backend == "reference":
        return in_layout_of(_reference_grad(grad_out, x, weight, dropout_keep, spec, dilation, concat_elu_input, dropout_p, wrt_input=True), x)
    # The kernels take x only to fold concat_elu's backward into the epilogue.
    activation_x = _channels_last_rows(x) if concat_elu_input else None
    grad = _kernels(backend).masked_conv2d_dgrad(
        _channels_last_rows(grad_out), pack_weight(weight, spec), activation_x, tap_offsets(spec, dilation), conv_allows_tf32(),
        _keep_rows(dropout_keep), dropout_scale(dropout_p),
    )  # fmt: skip
    return _from_channels_last_rows(grad, x)


@_grad_input_op.register_fake
def _(grad_out, x, weight, dropout_keep, taps, anchor, color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p):
    return _empty_nchw(x, x.shape[1])


@custom_op("pixelcnn_kernels::masked_conv2d_grad_weight")
def _grad_weight_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dropout_keep: torch.Tensor | None,
    taps: list[int], anchor: list[int], color_groups: int, anchor_inclusive: bool, dilation: int, concat_elu_input: bool, dropout_p: float,
) -> torch.Tensor:
    spec = _spec(weight, taps, anchor, color_groups, anchor_inclusive)
    backend = _choose_backend("masked_conv2d_wgrad", grad_out, x, weight, dropout_keep)
    if backend == "reference":
        return _reference_grad(grad_out, x, weight, dropout_keep, spec, dilation, concat_elu_input, dropout_p, wrt_input=False).contiguous()
    return _kernels(backend).masked_conv2d_wgrad(
        _channels_last_rows(x), _channels_last_rows(grad_out), tap_offsets(spec, dilation), *weight_grad_layout(spec, weight), concat_elu_input,
        conv_allows_tf32(), _keep_rows(dropout_keep), dropout_scale(dropout_p),
    )  # fmt: skip


@_grad_weight_op.register_fake
def _(grad_out, x, weight, dropout_keep, taps, anchor, color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


_grad_input = eager_fast_path(_grad_input_op)
_grad_weight = eager_fast_path(_grad_weight_op)


def _channel_sum(grad: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Σ of ``grad`` over ``dims``, accumulated in fp32 (fp64 for fp64) and cast to ``dtype``."""
    return grad.sum(dim=dims, dtype=compute_dtype(grad.dtype)).to(dtype)


def _conv_grads(ctx, grad_pre: torch.Tensor, x, weight, keep, needs_x: bool, needs_weight: bool, needs_bias: bool) -> tuple:
    """(grad x, grad weight, grad bias) of the convolution given the gradient of its output."""
    if needs_x and needs_weight and is_channels_last(x):
        # A channels-last network's kernels read it as rows, both: laid out so once, not copied by each.
        grad_pre = channels_last(grad_pre)
    grad_x = _grad_input(grad_pre, x, weight, keep, *ctx.conv_args) if needs_x else None
    grad_weight = _grad_weight(grad_pre, x, weight, keep, *ctx.conv_args) if needs_weight else None
    grad_bias = _channel_sum(grad_pre, (0, 2, 3), weight.dtype) if needs_bias else None
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, keep, *conv_args = inputs
    ctx.save_for_backward(x, weight, keep)
    ctx.conv_args = conv_args


def _backward(ctx, grad_out):
    x, weight, keep = ctx.saved_tensors
    grads = _conv_grads(ctx, grad_out, x, weight, keep, *ctx.needs_input_grad[:3])
    # The residual is added last: its gradient is the output's.
    grad_residual = grad_out if ctx.needs_input_grad[3] else None
    return grads + (grad_residual, None) + (None,) * len(ctx.conv_args)


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_masked_conv2d = eager_fast_path(_masked_conv2d_op)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
    *,
    residual: torch.Tensor | None = None,
    input_activation: str | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Stride-1, same-size masked convolution; only the mask's active taps are computed.

    Args:
        x: (N, C, H, W), float32 / float16 / bfloat16 (float64 on the reference
            backend), NCHW or channels-last (the kernels work channels-last; the
            output has x's memory format).
        weight: (Cout, Cin, kh, kw) as in ``nn.Conv2d``, x's dtype and device;
            Cin = C, or 2C with ``input_activation="concat_elu"``.
        bias: (Cout,) or None.
        mask: a name from :data:`pixelcnn_kernels.masks.NAMED_MASKS`, a boolean
            (kh, kw) tensor (anchored at the centre, along an even side at its last row or column) or a MaskSpec.
        dilation: spacing of the taps (the padding grows with it).
        color_groups: 1, or 3 to split channels into R, G, B groups (of
            :func:`~pixelcnn_kernels.masks.color_group_size` channels, none empty):
            at the anchor tap output group g sees input groups < g (mask A) or <= g (mask B).
        residual: (N, Cout, H, W) in x's dtype and device, or None: added to the
            output (after the bias) in the same pass.
        input_activation: None, or ``"concat_elu"``: the convolution reads
            concat_elu(x) = elu(cat([x, -x], 1)), written by one pass just before
            the forward and the weight gradient, never kept for the backward (needs
            ``color_groups=1``).
        dropout_keep: None, or with ``input_activation="concat_elu"`` a boolean
            (N, Cin, H, W) tensor on x's device (True: kept): the convolution reads
            dropout(concat_elu(x)), the kept elements times 1 / (1 - ``dropout_p``)
            and the others 0, applied where concat_elu is (PixelCNN++'s concat_elu →
            dropout → conv without passes of their own; draw it with
            :func:`~pixelcnn_kernels.reference.masked_conv.draw_dropout_keep`).
        dropout_p: the dropout rate in [0, 1) that ``dropout_keep`` was drawn with.

    Returns (N, Cout, H, W). Gradients flow to x, weight, bias and residual; the
    gradient of masked-out weights is exactly zero. fp32 uses TF32 on the kernel
    backends where PyTorch allows it for convolutions
    (``torch.backends.cudnn.allow_tf32``, True by default, or
    ``torch.backends.cudnn.conv.fp32_precision``).
    """
    conv_args = _validate(x, weight, bias, mask, dilation, color_groups, input_activation, dropout_keep, dropout_p)
    _check_output_shaped(residual, "residual", "the output's shape", x, weight.shape[0])
    return _masked_conv2d(x, weight, bias, residual, *conv_args)


# ---------------------------------------------------------------- masked_conv2d_gated


@custom_op("pixelcnn_kernels::masked_conv2d_gated")
def _masked_conv2d_gated_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cond: torch.Tensor | None,
    residual: torch.Tensor | None,
    addend: torch.Tensor | None,
    dropout_keep: torch.Tensor | None,
    taps: list[int],
    anchor: list[int],
    color_groups: int,
    anchor_inclusive: bool,
    dilation: int,
    concat_elu_input: bool,
    dropout_p: float,
    gate: int,
    gate_groups: int,
    keep_preactivation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate(pre + cond) + residual, pre) with pre = conv + bias + addend; pre is empty unless ``keep_preactivation``."""
    spec = _spec(weight, taps, anchor, color_groups, anchor_inclusive)
    backend = _choose_backend("masked_conv2d_fwd_gated", x, weight, bias, cond, residual, addend, dropout_keep)
    if backend == "reference":
        preactivation = _forward(backend, x, weight, bias, addend, dropout_keep, spec, dilation, concat_elu_input, dropout_p)
        out = _GATE_OPS[gate](preactivation, 1, cond, gate_groups)
        if residual is not None:
            out = in_layout_of(out + residual, x)
        return out, preactivation if keep_preactivation else x.new_empty(0)
    bias = bias.contiguous() if bias is not None else None
    cond = cond.contiguous() if cond is not None else None
    out, pre_rows = _kernels(backend).masked_conv2d_fwd_gated(
        _channels_last_rows(x), pack_weight(weight, spec, gate_groups), bias, cond, _optional_rows(residual), _optional_rows(addend),
        tap_offsets(spec, dilation), concat_elu_input, gate, gate_groups, keep_preactivation, conv_allows_tf32(), _keep_rows(dropout_keep), dropout_scale(dropout_p),
    )
    return _from_channels_last_rows(out, x), _from_channels_last_rows(pre_rows, x) if keep_preactivation else pre_rows


@_masked_conv2d_gated_op.register_fake
def _(x, weight, bias, cond, residual, addend, dropout_keep, taps, anchor, color_groups, anchor_inclusive, dilation, concat_elu_input, dropout_p, gate, gate_groups, keep_preactivation):
    out_channels = weight.shape[0]
    return _empty_nchw(x, out_channels // 2), _empty_nchw(x, out_channels) if keep_preactivation else x.new_empty(0)


def _gated_setup_context(ctx, inputs, output):
    x, weight, bias, cond, residual, addend, keep, *conv_args, gate, gate_groups, keep_preactivation = inputs
    _, preactivation = output
    ctx.save_for_backward(x, weight, preactivation, cond, keep)
    ctx.conv_args = conv_args
    ctx.gate = gate
    ctx.gate_groups = gate_groups
    ctx.keep_preactivation = keep_preactivation
    # An unused output's gradient arrives as None, not zeros to add (pre when only kept for backward).
    ctx.set_materialize_grads(False)


def _gated_backward(ctx, grad_out, grad_preactivation):
    x, weight, preactivation, cond, keep = ctx.saved_tensors
    needs_x, needs_weight, needs_bias, needs_cond, needs_residual, needs_addend = ctx.needs_input_grad[:6]
    # The residual is added after the gate: its gradient is the output's, no pre-activation needed.
    grad_residual = grad_out if needs_residual else None
    grad_cond = None
    grad_pre = grad_preactivation  # pre's gradient from its other uses, None if none
    if grad_out is not None and (needs_x or needs_weight or needs_bias or needs_cond or needs_addend):
        if not ctx.keep_preactivation:
            raise RuntimeError("masked_conv2d_gated was run without keep_preactivation; its backward needs the pre-activation")
        gate_backward = _GATE_BACKWARD_OPS[ctx.gate]
        if needs_cond:
            # cond's gradient is the gate's part alone; pre's gradient from its other uses joins after.
            grad_through_gate = gate_backward(grad_out, preactivation, 1, cond, None, ctx.gate_groups)
            grad_cond = _channel_sum(grad_through_gate, (2, 3), weight.dtype)
            # In place: the gate backward's output is this function's own (one tensor less at the peak).
            grad_pre = grad_through_gate if grad_pre is None else grad_through_gate.add_(grad_pre)
        else:
            # pre's gradient from its other uses (the Gated PixelCNN's vertical link) is added in the
            # gate backward's pass: one pass over the 2C channels and one launch fewer than an add.
            grad_pre = gate_backward(grad_out, preactivation, 1, cond, grad_pre, ctx.gate_groups)
    grads = (None,) * 3
    if grad_pre is not None:
        grads = _conv_grads(ctx, grad_pre, x, weight, keep, needs_x, needs_weight, needs_bias)
    grad_addend = grad_pre if needs_addend else None
    return grads + (grad_cond, grad_residual, grad_addend, None) + (None,) * (len(ctx.conv_args) + 3)


_masked_conv2d_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)
_masked_conv2d_gated = eager_fast_path(_masked_conv2d_gated_op)


def masked_conv2d_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
    gate: str = "tanh_sigmoid",
    cond: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    input_activation: str | None = None,
    addend: torch.Tensor | None = None,
    return_preactivation: bool = False,
    gate_groups: int = 1,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``gate(pre + cond[:, :, None, None]) + residual``, ``pre = masked_conv2d(x, weight, bias) + addend``, in one pass.

    The gate splits the Cout output channels into halves a (first) and b (second)
    and returns tanh(a)·σ(b) (``"tanh_sigmoid"``) or a·σ(b) (``"sigmoid"``): (N, Cout
    / 2, H, W). With ``gate_groups`` > 1 the channels are that many contiguous blocks,
    each split into halves (Gated PixelCNN's colour-major [a_R b_R | a_G b_G | a_B
    b_B] with 3; see :mod:`pixelcnn_kernels.reference.gates`),
    and the output is the blocks' gated halves in order; Cout / 2 must pass
    :func:`~pixelcnn_kernels.masks.check_gated_color_channels` (with 3 groups,
    ≡ 0 or 2 mod 3). ``cond`` is (N, Cout) or None; ``addend`` (N, Cout, H, W) or
    None is added to the convolution before the gate (Gated PixelCNN's horizontal
    stack: its own conv plus the vertical link); ``residual`` (N, Cout / 2, H, W) or
    None is added to the gated output; ``cond``, ``addend`` and the returned ``pre``
    are in the pre-activation's channel order. Other arguments (``input_activation``,
    ``dropout_keep`` and ``dropout_p`` included) as :func:`masked_conv2d`; ``color_groups`` > 1 needs ``gate_groups``
    equal to it, so that each gate pairs channels of one colour.

    Returns the gated output, or with ``return_preactivation`` the pair (gated
    output, ``pre``), ``pre`` (N, Cout, H, W) written in the same pass (Gated
    PixelCNN's vertical stack feeds it to the horizontal one); gradients flow
    through both. When a gradient is needed the forward keeps ``pre`` for the
    backward either way.
    """
    conv_args = _validate(x, weight, bias, mask, dilation, color_groups, input_activation, dropout_keep, dropout_p)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    check_int(gate_groups, "gate_groups", 1)
    if color_groups != 1 and gate_groups != color_groups:
        raise ValueError(f"color_groups={color_groups} needs gate_groups={color_groups} (a gate would pair channels of two colours), got {gate_groups}")
    out_channels = weight.shape[0]
    if out_channels % 2:
        raise ValueError(f"weight must have an even number of output channels (the gate's two halves), got {out_channels}")
    check_gated_color_channels(out_channels // 2, gate_groups, "weight.shape[0] // 2 (gated channels)")
    if cond is not None:
        check_tensor(cond, "cond", ndim=2)
        check_same_dtype(x, cond=cond)
        check_same_device(x=x, cond=cond)
        if tuple(cond.shape) != (x.shape[0], out_channels):
            raise ValueError(f"cond must have shape (N, Cout) = {(x.shape[0], out_channels)}, got {tuple(cond.shape)}")
    _check_output_shaped(residual, "residual", "the output's shape", x, out_channels // 2)
    _check_output_shaped(addend, "addend", "the pre-activation's shape", x, out_channels)
    if not isinstance(return_preactivation, bool):
        raise TypeError(f"return_preactivation must be a bool, got {type(return_preactivation).__name__}")
    # Only the gradients through the gate need the pre-activation (not the residual's).
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, cond, addend))
    out, preactivation = _masked_conv2d_gated(
        x, weight, bias, cond, residual, addend, *conv_args, GATE_CODES[gate], gate_groups, needs_grad or return_preactivation
    )
    return (out, preactivation) if return_preactivation else out
