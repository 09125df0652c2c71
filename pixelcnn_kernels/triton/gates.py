"""Triton kernels of the gated activations (see :mod:`pixelcnn_kernels.reference.gates`).

Every kernel works on a tensor already viewed in memory order as *rows*: the
ops (:mod:`pixelcnn_kernels.ops.gates`) turn any dense layout, contiguous or
channels-last, into a contiguous ``(outer, 2, half, inner)`` view whose ``2``
is the split of ``dim``. A gate reads the two halves of a row at ``row * 2R +
col`` and ``row * 2R + R + col`` (``R = half * inner``) and writes ``row * R +
col``; each program handles a ``BLOCK_OUTER x BLOCK_ROW`` tile of (row, col),
so no per-element division is needed except to find ``cond``'s channel. In
colour groups (``group_size`` < half: the 2·half channels are blocks [a_1 b_1 |
a_2 b_2 | ...] of twice ``group_size``, the last one the rest) output channel
c = col // inner of group g = c // group_size reads a at channel c + g·group_size
and b that plus the group's size.

All arithmetic is fp32 (loads are converted at once); outputs are rounded to
the storage dtype on store. The elementwise math is exposed as ``@triton.jit``
helpers (:func:`gate_tanh_sigmoid_math`, :func:`gate_sigmoid_math`,
:func:`concat_elu_math` and their gradients) for other kernels' epilogues.

``tanh`` and ``expm1`` are libdevice calls, not available in the interpreter, so
both are written here from a short Taylor series and the exp and reciprocal of
:mod:`~pixelcnn_kernels.triton.approx_math` (one instruction each on the GPU, which
keeps the bf16 gates within an H200's rate of issue), accurate to ~10 fp32 ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixelcnn_kernels.triton.approx_math import exp_ftz, reciprocal_of_1_or_more
from pixelcnn_kernels.triton.utils import cdiv, launch_device, needs_int64_index, next_power_of_2, pointer_type, register_compile_case

# Elements per program: 16 per thread at 4 warps, i.e. a few 16-byte vectors per tensor.
_TILE = 2048
_NUM_WARPS = 4


# ----------------------------------------------------------------------------- math


@triton.jit
def sigmoid_math(x):
    """``sigmoid(x) = 1 / (1 + exp(-x))``, as ``tl.sigmoid`` but in the one-instruction forms of
    :mod:`~pixelcnn_kernels.triton.approx_math`: the bf16 tanh·σ forward went from 52 to 43
    instructions an element with them, its backward from 79 to 66, where an H200 issues ~49 and
    ~82 in the time its bytes take at copy bandwidth (dmol_and_gates_perf_notes.md)."""
    return reciprocal_of_1_or_more(1.0 + exp_ftz(-x))


@triton.jit
def expm1_nonpositive(x):
    """``exp(x) - 1`` for ``x <= 0`` (or NaN), to ~3 fp32 ulps.

    Near 0, ``exp(x) - 1`` cancels, so a Taylor series to x**8/8! is used for
    ``x > -0.5`` (truncation below 0.2 ulp there); below, ``exp(x) - 1`` loses
    at most a couple of ulps.
    """
    series = 1.0 / 40320.0
    series = series * x + 1.0 / 5040.0
    series = series * x + 1.0 / 720.0
    series = series * x + 1.0 / 120.0
    series = series * x + 1.0 / 24.0
    series = series * x + 1.0 / 6.0
    series = series * x + 0.5
    series = series * x + 1.0
    return tl.where(x > -0.5, x * series, exp_ftz(x) - 1.0)


@triton.jit
def tanh_math(x):
    """``tanh(x)`` in fp32, accurate to ~10 ulps also near 0 (unlike ``2 * sigmoid(2x) - 1``).

    ``tanh(|x|) = -e / (e + 2)`` with ``e = expm1(-2|x|)`` in ``(-1, 0]``: no
    overflow, and ``tanh(+-inf) = +-1``, ``tanh(nan) = nan`` as in PyTorch.
    """
    e = expm1_nonpositive(-2.0 * tl.abs(x))
    magnitude = -e * reciprocal_of_1_or_more(e + 2.0)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def sech2_math(x):
    """``1 - tanh(x)**2`` as ``4u / (1 + u)**2``, ``u = exp(-2|x|)``: accurate where ``1 - t*t`` cancels."""
    u = exp_ftz(-2.0 * tl.abs(x))
    r = reciprocal_of_1_or_more(1.0 + u)
    return 4.0 * u * r * r


@triton.jit
def sigmoid_and_complement(b):
    """``(sigmoid(b), 1 - sigmoid(b))``, the latter for ``b > 0`` as ``e * s``, ``e = exp(-b)``.

    ``1 - s`` cancels there (at b = 7.7, computed from the rounded ``s`` it is 1.5e-4 off
    relatively, near the float32 tolerance); once ``1 + e`` rounds to 1, where PyTorch's ``s``
    is exactly 1 (and :func:`reciprocal_of_1_or_more`'s too), it is ``1 - s`` = 0 again, keeping
    autograd's ``inf * 0 = nan`` for an infinite factor beside it. The test is on ``1 + e``,
    not on ``s < 1``: the approximate reciprocal may round ``s`` to 1 a few ulps early.
    """
    e = exp_ftz(-b)
    one_plus_e = 1.0 + e
    s = reciprocal_of_1_or_more(one_plus_e)
    return s, tl.where((b > 0.0) & (one_plus_e != 1.0), e * s, 1.0 - s)


@triton.jit
def gate_tanh_sigmoid_math(a, b):
    """``tanh(a) * sigmoid(b)`` of fp32 tensors."""
    return tanh_math(a) * sigmoid_math(b)


@triton.jit
def gate_tanh_sigmoid_grad_math(a, b, grad):
    """``(d/da, d/db)`` of ``grad * tanh(a) * sigmoid(b)``.

    Same products as PyTorch's autograd (``sigmoid'(b) = (1 - s) * s``), so
    infinities and NaNs propagate alike; ``1 - tanh(a)**2`` via :func:`sech2_math`,
    ``1 - s`` via :func:`sigmoid_and_complement`.
    """
    s, one_minus_s = sigmoid_and_complement(b)
    grad_a = grad * s * sech2_math(a)
    grad_b = grad * tanh_math(a) * one_minus_s * s
    return grad_a, grad_b


@triton.jit
def gate_sigmoid_math(a, b):
    """``a * sigmoid(b)`` of fp32 tensors."""
    return a * sigmoid_math(b)


@triton.jit
def gate_sigmoid_grad_math(a, b, grad):
    """``(d/da, d/db)`` of ``grad * a * sigmoid(b)``, with PyTorch's autograd products (``inf * 0 = nan`` alike)
    and ``1 - s`` via :func:`sigmoid_and_complement`."""
    s, one_minus_s = sigmoid_and_complement(b)
    return grad * s, grad * a * one_minus_s * s


@triton.jit
def concat_elu_math(x):
    """``(elu(x), elu(-x))`` of an fp32 tensor (``elu(z) = z`` if ``z > 0`` else ``expm1(z)``).

    One of ``x, -x`` is the identity branch, so a single ``expm1(-|x|)`` serves
    both. The selects keep ``F.elu``'s signed zeros (elu(+0) = +0, elu(-0) = -0, where
    ``expm1(-|x|)`` is -0 for both) and its NaNs.
    """
    e = expm1_nonpositive(-tl.abs(x))
    return tl.where(x < 0, e, x), tl.where(x > 0, e, -x)


@triton.jit
def concat_elu_grad_math(x, grad_pos, grad_neg):
    """Gradient w.r.t. ``x`` of ``concat_elu``, given the gradients of its two halves.

    ``grad_pos * elu'(x) - grad_neg * elu'(-x)`` with PyTorch's ``elu'(z) =
    exp(z) if z <= 0 else 1`` (so a NaN ``x`` gives ``grad_pos - grad_neg``, as
    in PyTorch); ``exp(x)`` for ``x <= 0`` and ``exp(-x)`` for ``x >= 0`` are both
    ``exp(-|x|)``: one exp.
    """
    e = exp_ftz(-tl.abs(x))
    return tl.where(x <= 0, grad_pos * e, grad_pos) - tl.where(x >= 0, grad_neg * e, grad_neg)


@triton.jit
def colour_group_halves(n, channels, group_size):
    """``(a, b)``: the channels of gated output channel ``n``'s two halves when the 2·``channels``
    pre-activation channels are colour-group blocks [a_1 b_1 | a_2 b_2 | ...] of twice
    ``group_size``, the last one the rest (:func:`~pixelcnn_kernels.masks.halves_first_channels`)."""
    group_start = n // group_size * group_size  # the first output channel of n's group
    a = n + group_start
    return a, a + tl.minimum(group_size, channels - group_start)


# -------------------------------------------------------------------------- kernels


@triton.jit
def _tile(outer, row_len, BLOCK_OUTER: tl.constexpr, BLOCK_ROW: tl.constexpr, INT64: tl.constexpr):
    """This program's ``(rows[:, None], cols[None, :], mask)`` in an ``(outer, row_len)`` grid."""
    pid = tl.program_id(0)
    if INT64:  # before any product: the first row of a program can itself pass 2^31
        pid = pid.to(tl.int64)
    blocks_per_row = tl.cdiv(row_len, BLOCK_ROW)
    rows = (pid // blocks_per_row) * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)
    cols = (pid % blocks_per_row) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    mask = (rows < outer)[:, None] & (cols < row_len)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _gate_inputs(x_ptr, cond_ptr, rows, cols, mask, row_len, half, inner, group_size, batch_div, batch, HAS_COND: tl.constexpr, GROUPED: tl.constexpr):
    """A tile's fp32 gate inputs ``(a + cond_a, b + cond_b, a's offsets, b's offsets)``: ``a`` at ``row * 2R + col``,
    ``b`` at ``+ R``; GROUPED: in colour groups of ``group_size`` channels (the module docstring)."""
    # rows * 2 first: with INT64 it is int64, so the product cannot overflow.
    a_offsets = rows * 2 * row_len + cols
    # One return: b's shift is the scalar row_len with one group (its loads stay vectorised as
    # row_len's divisibility allows), per column with several.
    if GROUPED:
        channels = cols // inner
        a_channels, b_channels = colour_group_halves(channels, half, group_size)
        a_channels_shift = a_channels - channels
        b_channels_shift = b_channels - a_channels
        a_offsets += a_channels_shift * inner
        b_offsets = a_offsets + b_channels_shift * inner
    else:
        a_channels_shift = 0
        b_channels_shift = half
        b_offsets = a_offsets + row_len
    a = tl.load(x_ptr + a_offsets, mask=mask).to(tl.float32)
    b = tl.load(x_ptr + b_offsets, mask=mask).to(tl.float32)
    if HAS_COND:
        # cond is a contiguous (batch, 2 * half) in x's channel order; a row's batch index is
        # (row // batch_div) % batch, its output channel col // inner.
        cond_offsets = ((rows // batch_div) % batch) * (2 * half) + cols // inner + a_channels_shift
        a += tl.load(cond_ptr + cond_offsets, mask=mask).to(tl.float32)
        b += tl.load(cond_ptr + cond_offsets + b_channels_shift, mask=mask).to(tl.float32)
    return a, b, a_offsets, b_offsets


@triton.jit
def _gate_forward_kernel(
    x_ptr, cond_ptr, y_ptr, outer, row_len, half, inner, group_size, batch_div, batch,
    TANH_GATE: tl.constexpr, HAS_COND: tl.constexpr, GROUPED: tl.constexpr, INT64: tl.constexpr, BLOCK_OUTER: tl.constexpr, BLOCK_ROW: tl.constexpr,
):  # fmt: skip
    """``y[o, c, i] = gate(x[o, 0, c, i] + cond, x[o, 1, c, i] + cond)``.

    x: contiguous (outer, 2, half, inner) fp32/fp16/bf16; cond: contiguous
    (batch, 2 * half) of x's dtype, read when HAS_COND (row o is in batch
    (o // batch_div) % batch); y: contiguous (outer, half, inner) of x's dtype;
    row_len = half * inner. TANH_GATE picks tanh(a)*sigmoid(b) over a*sigmoid(b).
    GROUPED: the channels are in colour groups of group_size (the module docstring).
    """
    rows, cols, mask = _tile(outer, row_len, BLOCK_OUTER, BLOCK_ROW, INT64)
    a, b, _, _ = _gate_inputs(x_ptr, cond_ptr, rows, cols, mask, row_len, half, inner, group_size, batch_div, batch, HAS_COND, GROUPED)
    if TANH_GATE:
        y = gate_tanh_sigmoid_math(a, b)
    else:
        y = gate_sigmoid_math(a, b)
    tl.store(y_ptr + rows * row_len + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_backward_kernel(
    grad_ptr, x_ptr, cond_ptr, accumulate_ptr, dx_ptr, outer, row_len, half, inner, group_size, batch_div, batch,
    TANH_GATE: tl.constexpr, HAS_COND: tl.constexpr, HAS_ACCUMULATE: tl.constexpr, GROUPED: tl.constexpr, INT64: tl.constexpr,
    BLOCK_OUTER: tl.constexpr, BLOCK_ROW: tl.constexpr,
):  # fmt: skip
    """``dx = d gate / d(x + cond) * grad (+ accumulate)``, recomputed from x (the forward saves nothing else).

    grad: contiguous (outer, half, inner); x, dx and, read when HAS_ACCUMULATE,
    accumulate (x's gradient from its other uses, added before dx's rounding):
    contiguous (outer, 2, half, inner); cond and GROUPED as in the forward; all of
    one dtype (fp32/fp16/bf16).
    """
    rows, cols, mask = _tile(outer, row_len, BLOCK_OUTER, BLOCK_ROW, INT64)
    a, b, a_offsets, b_offsets = _gate_inputs(x_ptr, cond_ptr, rows, cols, mask, row_len, half, inner, group_size, batch_div, batch, HAS_COND, GROUPED)
    grad = tl.load(grad_ptr + rows * row_len + cols, mask=mask).to(tl.float32)
    if TANH_GATE:
        grad_a, grad_b = gate_tanh_sigmoid_grad_math(a, b, grad)
    else:
        grad_a, grad_b = gate_sigmoid_grad_math(a, b, grad)
    if HAS_ACCUMULATE:
        grad_a += tl.load(accumulate_ptr + a_offsets, mask=mask).to(tl.float32)
        grad_b += tl.load(accumulate_ptr + b_offsets, mask=mask).to(tl.float32)
    tl.store(dx_ptr + a_offsets, grad_a.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + b_offsets, grad_b.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _concat_elu_forward_kernel(
    x_ptr, y_ptr, keep_ptr, outer, row_len, keep_scale, INT64: tl.constexpr, BLOCK_OUTER: tl.constexpr, BLOCK_ROW: tl.constexpr
):
    """``y[o, 0, r] = elu(x[o, r])``, ``y[o, 1, r] = elu(-x[o, r])``, then with ``keep_ptr`` dropout.

    x: contiguous (outer, row_len); y: contiguous (outer, 2, row_len); one
    dtype, fp32/fp16/bf16. keep_ptr: None, or a uint8 (outer, 2, row_len) mask
    (the masked convolution's input dropout): each value, rounded to y's dtype as
    the activation stored without dropout, times keep · keep_scale (a product, not
    a select: NaN or inf dropped stays NaN, as in the reference), rounded again.
    """
    rows, cols, mask = _tile(outer, row_len, BLOCK_OUTER, BLOCK_ROW, INT64)
    x = tl.load(x_ptr + rows * row_len + cols, mask=mask).to(tl.float32)
    pos, neg = concat_elu_math(x)
    y_offsets = rows * 2 * row_len + cols
    if keep_ptr is not None:
        pos = pos.to(y_ptr.dtype.element_ty).to(tl.float32) * (tl.load(keep_ptr + y_offsets, mask=mask).to(tl.float32) * keep_scale)
        neg = neg.to(y_ptr.dtype.element_ty).to(tl.float32) * (tl.load(keep_ptr + y_offsets + row_len, mask=mask).to(tl.float32) * keep_scale)
    tl.store(y_ptr + y_offsets, pos.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_offsets + row_len, neg.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _concat_elu_backward_kernel(
    grad_ptr, x_ptr, dx_ptr, outer, row_len, INT64: tl.constexpr, BLOCK_OUTER: tl.constexpr, BLOCK_ROW: tl.constexpr
):
    """``dx[o, r]`` from ``grad[o, 0, r]``, ``grad[o, 1, r]`` and ``x[o, r]``.

    grad: contiguous (outer, 2, row_len); x, dx: contiguous (outer, row_len);
    one dtype, fp32/fp16/bf16.
    """
    rows, cols, mask = _tile(outer, row_len, BLOCK_OUTER, BLOCK_ROW, INT64)
    x_offsets = rows * row_len + cols
    grad_offsets = rows * 2 * row_len + cols
    x = tl.load(x_ptr + x_offsets, mask=mask).to(tl.float32)
    grad_pos = tl.load(grad_ptr + grad_offsets, mask=mask).to(tl.float32)
    grad_neg = tl.load(grad_ptr + grad_offsets + row_len, mask=mask).to(tl.float32)
    dx = concat_elu_grad_math(x, grad_pos, grad_neg)
    tl.store(dx_ptr + x_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------ launchers


def _launch(kernel, outer: int, row_len: int, int64: bool, *args, **constexprs) -> None:
    """Runs ``kernel`` over an ``(outer, row_len)`` grid of tiles of ``_TILE`` elements."""
    block_row = min(next_power_of_2(row_len), _TILE)
    block_outer = _TILE // block_row
    grid = (cdiv(outer, block_outer) * cdiv(row_len, block_row),)
    with launch_device(args[0]):
        kernel[grid](*args, INT64=int64, BLOCK_OUTER=block_outer, BLOCK_ROW=block_row, num_warps=_NUM_WARPS, **constexprs)


def _cond_args(cond: torch.Tensor | None, x_rows: torch.Tensor, batch_div: int) -> tuple:
    """``(cond_ptr, batch_div, batch)``; x stands in for the unread pointer when there is no cond."""
    if cond is None:
        return x_rows, 1, 1
    return cond.contiguous(), batch_div, cond.shape[0]


def gate_forward(x_rows: torch.Tensor, cond: torch.Tensor | None, batch_div: int, tanh_gate: bool, group_size: int) -> torch.Tensor:
    """The gate of a contiguous ``(outer, 2, half, inner)`` ``x_rows``: a contiguous ``(outer, half, inner)``.

    ``cond`` (batch, 2 * half) of x's dtype or None; row ``o`` of x belongs to
    batch ``(o // batch_div) % batch``. ``tanh_gate``: tanh(a)*sigmoid(b), else a*sigmoid(b).
    ``group_size``: ``half`` (one group), or the channels of each colour group but the last
    (the module docstring).
    """
    outer, _, half, inner = x_rows.shape
    y = x_rows.new_empty((outer, half, inner))
    if y.numel():
        cond_ptr, batch_div, batch = _cond_args(cond, x_rows, batch_div)
        _launch(
            _gate_forward_kernel, outer, half * inner, needs_int64_index(x_rows),
            x_rows, cond_ptr, y, outer, half * inner, half, inner, group_size, batch_div, batch,
            TANH_GATE=tanh_gate, HAS_COND=cond is not None, GROUPED=group_size != half,
        )  # fmt: skip
    return y


def gate_backward(
    grad_rows: torch.Tensor, x_rows: torch.Tensor, cond: torch.Tensor | None, accumulate: torch.Tensor | None, batch_div: int, tanh_gate: bool,
    group_size: int,
) -> torch.Tensor:  # fmt: skip
    """Gradient w.r.t. ``x_rows`` (and ``x + cond``) of :func:`gate_forward`, given ``grad_rows`` (outer, half, inner),
    plus ``accumulate`` (a contiguous tensor of x_rows' shape and dtype, or None) before the result is rounded."""
    outer, _, half, inner = x_rows.shape
    dx = torch.empty_like(x_rows)
    if dx.numel():
        cond_ptr, batch_div, batch = _cond_args(cond, x_rows, batch_div)
        _launch(
            _gate_backward_kernel, outer, half * inner, needs_int64_index(x_rows),
            grad_rows, x_rows, cond_ptr, x_rows if accumulate is None else accumulate, dx, outer, half * inner, half, inner, group_size,
            batch_div, batch, TANH_GATE=tanh_gate, HAS_COND=cond is not None, HAS_ACCUMULATE=accumulate is not None, GROUPED=group_size != half,
        )  # fmt: skip
    return dx


def concat_elu_forward(x_rows: torch.Tensor, keep: torch.Tensor | None = None, keep_scale: float = 1.0) -> torch.Tensor:
    """``concat_elu`` of a contiguous ``(outer, row_len)`` ``x_rows``: a contiguous ``(outer, 2, row_len)``;
    with ``keep`` (uint8, contiguous, y's shape) dropped out: kept elements times ``keep_scale``, the others 0."""
    outer, row_len = x_rows.shape
    y = x_rows.new_empty((outer, 2, row_len))
    if y.numel():
        _launch(_concat_elu_forward_kernel, outer, row_len, needs_int64_index(y), x_rows, y, keep, outer, row_len, keep_scale)
    return y


def concat_elu_backward(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x_rows`` (outer, row_len) of :func:`concat_elu_forward`, given ``grad_rows`` (outer, 2, row_len)."""
    outer, row_len = x_rows.shape
    dx = torch.empty_like(x_rows)
    if dx.numel():
        _launch(_concat_elu_backward_kernel, outer, row_len, needs_int64_index(grad_rows), grad_rows, x_rows, dx, outer, row_len)
    return dx


# ------------------------------------------------------------ sm_90 compile cases


def _register_compile_cases() -> None:
    sizes = {"outer": "i32", "row_len": "i32", "half": "i32", "inner": "i32", "group_size": "i32", "batch_div": "i32", "batch": "i32"}
    for dtype in (torch.float32, torch.bfloat16):
        ptr = pointer_type(dtype)
        name = str(dtype).removeprefix("torch.")
        # The Gated PixelCNN's horizontal gate in colour groups, class-conditional, and the others.
        for tanh_gate, has_cond, int64, grouped in ((True, True, False, False), (False, False, True, False), (True, True, False, True)):
            gate = ("tanh_sigmoid" if tanh_gate else "sigmoid") + ("_3_groups" if grouped else "")
            flags = dict(TANH_GATE=tanh_gate, HAS_COND=has_cond, GROUPED=grouped, INT64=int64, BLOCK_OUTER=16, BLOCK_ROW=128)
            # The backward of a gated conv's kept pre-activation adds the gradient of its other uses.
            backward_flags = dict(flags, HAS_ACCUMULATE=tanh_gate)
            register_compile_case(
                f"gates_{gate}_forward_{name}", _gate_forward_kernel,
                {"x_ptr": ptr, "cond_ptr": ptr, "y_ptr": ptr, **sizes}, flags, num_warps=_NUM_WARPS, flushing_math=True,
            )  # fmt: skip
            register_compile_case(
                f"gates_{gate}_backward_{name}", _gate_backward_kernel,
                {"grad_ptr": ptr, "x_ptr": ptr, "cond_ptr": ptr, "accumulate_ptr": ptr, "dx_ptr": ptr, **sizes}, backward_flags, num_warps=_NUM_WARPS, flushing_math=True,
            )  # fmt: skip
        flags = dict(INT64=dtype == torch.bfloat16, BLOCK_OUTER=1, BLOCK_ROW=_TILE)
        sizes_and_scale = {"outer": "i32", "row_len": "i32", "keep_scale": "fp32"}
        register_compile_case(
            f"gates_concat_elu_forward_{name}", _concat_elu_forward_kernel,
            {"x_ptr": ptr, "y_ptr": ptr, **sizes_and_scale}, dict(flags, keep_ptr=None), num_warps=_NUM_WARPS, flushing_math=True,
        )  # fmt: skip
        # The masked convolution's concat_elu input in training, with PixelCNN++'s dropout
        # (rows of 80 or 160 channels: the tile spans several rows).
        register_compile_case(
            f"gates_concat_elu_forward_dropout_{name}", _concat_elu_forward_kernel,
            {"x_ptr": ptr, "y_ptr": ptr, "keep_ptr": "*u8", **sizes_and_scale}, dict(flags, INT64=False, BLOCK_OUTER=16, BLOCK_ROW=128), num_warps=_NUM_WARPS, flushing_math=True,
        )  # fmt: skip
        register_compile_case(
            f"gates_concat_elu_backward_{name}", _concat_elu_backward_kernel,
            {"grad_ptr": ptr, "x_ptr": ptr, "dx_ptr": ptr, "outer": "i32", "row_len": "i32"}, flags, num_warps=_NUM_WARPS, flushing_math=True,
        )  # fmt: skip


_register_compile_cases()
