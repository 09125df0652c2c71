"""Triton implicit-GEMM kernels of the masked convolution (kernels, then launchers).

Data layout (the contract shared with the CUDA kernels; ``ops/masked_conv.py``
builds these tensors once for both backends):

- activations channels-last and contiguous: ``x`` (N, H, W, Cin), output (N, H, W, Cout);
- packed weight ``wp`` (T, Cin, Cout) contiguous: one (Cin, Cout) slab per active tap;
- ``offsets`` = (dy_0, dx_0, dy_1, dx_1, ...): where each active tap reads, relative
  to the output pixel;
- the weight gradient in the weight's own (Cout, Cin, kh, kw) shape and dtype, tap t at
  the flat position ``tap_positions[t]``, with the colour groups' ``hidden`` channel
  pairs at tap ``anchor_tap`` (``ops.masked_conv.weight_grad_layout``).

The forward is a GEMM with M = N·H·W output pixels, N = Cout columns and
K = T·Cin, reduced in one loop over (tap, channel block) steps whose tap offsets
come from the compile-time ``OFFSETS`` tuple, so every tap set (mask, kernel size,
dilation) is its own specialisation and a masked-out tap is never loaded nor
multiplied. The input gradient is the same
kernel with negated offsets reading the packed weight transposed (Cout is then
the reduction). The weight gradient is one (Cin × Cout) GEMM per tap reduced over
all pixels, split over pixels into partial sums (no atomics) that a finishing pass adds in a
fixed order (deterministic), writing the gradient in the weight's own (Cout, Cin, kh, kw)
layout and dtype, zeros at the masked-out taps included.

Fused around the GEMMs:

- a residual (the output's shape) added last in the forward epilogue (after the gate);
- the concat_elu prologue (``concat_elu_input``): x has C = Cin / 2 channels and the
  GEMMs read concat_elu(x) = elu(cat([x, -x])), written by one elementwise pass
  (the gates family's concat_elu kernel) just before the forward and the weight gradient and
  dropped after it: nothing 2C-channel is kept for the backward. Computed inside the
  GEMMs' loads instead, as these kernels did first, it was recomputed for every tap and
  output-channel block and broke the loads' pipelining: the H200 (2026-11-30) ran the
  bf16 forward 4.6× slower than the same GEMM without it (0.495 ms against 0.107, where
  the extra pass moves 32 MB, about 8 µs: predicted ~0.12 ms, not yet measured). The TF32
  weight gradient's pixel-major copy of its input (``_tap_major_rows``) computes concat_elu
  (and the dropout) itself, in place of that pass;
- its backward in the input gradient's epilogue: given x, the input-gradient GEMM
  accumulates the gradients w.r.t. elu(x) and elu(-x) side by side (as the gated
  forward does its two halves) and stores grad_x = g₁·elu'(x) − g₂·elu'(−x), so
  neither the 2C-channel gradient nor a separate elementwise pass exists;
- dropout after concat_elu (PixelCNN++'s, in training): given ``keep``, a uint8
  (N·H·W, 2C) mask, the prologue pass writes kept elements times ``keep_scale`` =
  1 / (1 - p) and zeros elsewhere, and the input gradient's epilogue applies the same
  to g₁, g₂ before concat_elu's backward.

Dtypes: float32, float16, bfloat16 (all tensors of one call share it). Products
accumulate in fp32; fp16/bf16 tiles go to ``tl.dot`` as they are (tensor cores),
fp32 tiles use TF32 when the ``allow_tf32`` argument says so (the op passes
whether PyTorch allows TF32 for convolutions), else full fp32 ("ieee"). The weight
gradient is summed in fp32 and rounded once, to the weight's dtype. Triton's TF32 products
take the fp32 operands' top 10 mantissa bits as they are (truncated,
triton-lang/triton#4574; the PTX has no rounding ``cvt``), where the CUDA
kernels round to nearest (``cvt.rna.tf32.f32``). Within TF32's precision either way, but
truncation shrinks every product toward zero, so sums are biased rather than scattered around
the fp32 result: emulated on the CPU (random normal 2048×1920 @ 1920×160, operands truncated
vs rounded to 10 mantissa bits, against float64), a gain of 1 - 7.0e-4 (RMS error 7.7e-4)
truncated, 1 - 1.4e-6 (2.9e-4) rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixelcnn_kernels.triton.gates import colour_group_halves, concat_elu_forward, concat_elu_grad_math, concat_elu_math, gate_sigmoid_math, gate_tanh_sigmoid_math
from pixelcnn_kernels.triton.utils import cdiv, launch_device, needs_int64_index, next_power_of_2, pointer_type, register_compile_case

# Gate codes of the fused epilogue (the same numbers as the CUDA op's ``gate`` argument).
GATE_NONE = 0
GATE_TANH_SIGMOID = 1
GATE_SIGMOID = 2


@triton.jit
def _apply_gate(a, b, GATE: tl.constexpr):
    """tanh(a)·σ(b) (GATE_TANH_SIGMOID) or a·σ(b) (GATE_SIGMOID) of fp32 tiles, as the gates family computes them."""
    if GATE == 1:  # GATE_TANH_SIGMOID
        gated = gate_tanh_sigmoid_math(a, b)
    else:
        gated = gate_sigmoid_math(a, b)
    return gated


@triton.jit
def _pixels(block, num_pixels, BLOCK: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """Flat pixel indices of block ``block`` (block·BLOCK onwards), and whether each exists."""
    if WIDE_INDEX:  # before the product, which itself can pass 2^31
        block = block.to(tl.int64)
    pixels = block * BLOCK + tl.arange(0, BLOCK)
    return pixels, pixels < num_pixels


@triton.jit
def _pixel_block(block, num_pixels, H, W, BLOCK: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """:func:`_pixels` of block ``block``, and each pixel's row and column."""
    pixels, pixel_ok = _pixels(block, num_pixels, BLOCK, WIDE_INDEX)
    return pixels, pixel_ok, (pixels // W) % H, pixels % W


@triton.jit
def _tap_sources(pixels, pixel_ok, row, col, dy, dx, H, W):
    """(the pixels that ``pixels`` read at tap offset (dy, dx), whether each exists): the neighbour
    exists iff it lies inside the image (zero padding otherwise); then it is pixel p + dy·W + dx
    of the same image."""
    src_ok = pixel_ok & (row + dy >= 0) & (row + dy < H) & (col + dx >= 0) & (col + dx < W)
    return pixels + (dy * W + dx), src_ok


@triton.jit
def _tap_offset(tap, OFFSETS: tl.constexpr):
    """(dy, dx) of the runtime tap index ``tap``, picked out of the compile-time table (only active taps are in it)."""
    dy = 0
    dx = 0
    for t in tl.static_range(len(OFFSETS) // 2):
        dy = tl.where(tap == t, OFFSETS[2 * t], dy)
        dx = tl.where(tap == t, OFFSETS[2 * t + 1], dx)
    return dy, dx


@triton.jit
def _preactivation_channels(cols, N_COLS, GATE_GROUPS: tl.constexpr):
    """(channel of column n's half a, the shift to its half b) in a gated conv's pre-activation.

    The GEMM pairs column n with n + N_COLS; the pre-activation's 2·N_COLS channels are
    GATE_GROUPS blocks of two halves, [a_1 b_1 | a_2 b_2 | ...] (one block: [a | b]), of
    ⌈N_COLS / GATE_GROUPS⌉ channels each but the last (masks.color_group_size).
    """
    # One return: Triton wants a function's returns of one type, and b's shift is a scalar with
    # one block (the epilogue's loads then stay vectorised) but per column with several.
    if GATE_GROUPS == 1:
        channels, b_shift = cols, N_COLS
    else:
        channels, b_channels = colour_group_halves(cols, N_COLS, tl.cdiv(N_COLS, GATE_GROUPS))
        b_shift = b_channels - channels
    return channels, b_shift


@triton.jit
def _masked_conv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    cond_ptr,
    residual_ptr,
    addend_ptr,
    elu_x_ptr,
    keep_ptr,
    out_ptr,
    pre_ptr,
    num_pixels,
    H,
    W,
    C_IN,
    N_COLS,
    stride_wt,
    stride_wk,
    stride_wn,
    keep_scale,
    OFFSETS: tl.constexpr,
    GATE: tl.constexpr,
    GATE_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[p, n] = bias[n] + Σ_t Σ_k in[p shifted by tap t, k] · w[t, k, n] (+ residual), gated if GATE.

    x: (N·H·W, C_IN) channels-last rows. w[t, k, n] at w_ptr + t·stride_wt +
    k·stride_wk + n·stride_wn (wp (T, Cin, Cout) in fp16/bf16, transposed (T, Cout, Cin)
    in fp32, so that TF32's operand is K-major; the input gradient reads wp transposed).
    The epilogue:

    - GATE_NONE, elu_x_ptr None: out (N·H·W, N_COLS) = the GEMM + bias;
    - GATE_TANH_SIGMOID / GATE_SIGMOID: the GEMM has 2·N_COLS columns; program
      (m, n) accumulates columns n and n + N_COLS (halves a and b) side by side, adds
      bias and addend (N·H·W, 2·N_COLS), stores that pre-activation to pre (N·H·W,
      2·N_COLS) unless pre_ptr is None, adds cond (N, 2·N_COLS) and stores
      gate(a, b) to out (N·H·W, N_COLS). With GATE_GROUPS > 1 the pre-activation's
      channels are GATE_GROUPS blocks [a_1 b_1 | a_2 b_2 | ...] while w's columns
      come halves first (ops.masked_conv.pack_weight): the epilogue reads bias,
      addend and cond and writes pre at each column's channel (_preactivation_channels);
    - elu_x_ptr given (the input gradient of a concat_elu input x (N·H·W, N_COLS)):
      the halves are the gradients g₁, g₂ w.r.t. elu(x), elu(-x), and out = the
      gradient w.r.t. x, g₁·elu'(x) − g₂·elu'(−x); with keep_ptr (the forward's
      dropout mask, (N·H·W, 2·N_COLS) uint8) g₁, g₂ are first those w.r.t. the
      dropped activation: kept elements times keep_scale, the others 0.

    residual (the shape of out) is added last,
    to the stored value. bias_ptr, cond_ptr, residual_ptr, addend_ptr, elu_x_ptr,
    keep_ptr and pre_ptr may be None.
    """
    TWO_HALVES: tl.constexpr = GATE != 0 or elu_x_ptr is not None
    pixels, pixel_ok, row, col = _pixel_block(tl.program_id(0), num_pixels, H, W, BLOCK_M, WIDE_INDEX)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_COLS
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO_HALVES:
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One loop over every (tap, channel block) step, so the software pipeline runs across
    # taps instead of filling and draining once per tap (a tap has only C_IN / BLOCK_K steps).
    k_steps = tl.cdiv(C_IN, BLOCK_K)
    for step in range(0, (len(OFFSETS) // 2) * k_steps):
        tap = step // k_steps
        k = (step - tap * k_steps) * BLOCK_K + ks
        dy, dx = _tap_offset(tap, OFFSETS)
        sources, src_ok = _tap_sources(pixels, pixel_ok, row, col, dy, dx, H, W)
        k_ok = k < C_IN
        a = tl.load(x_ptr + sources[:, None] * C_IN + k[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = w_ptr + tap * stride_wt + k[:, None] * stride_wk + cols[None, :] * stride_wn
        b = tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if TWO_HALVES:
            b_second = tl.load(w_tile + N_COLS * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_b = tl.dot(a, b_second, acc_b, input_precision=DOT_PRECISION)

    store_ok = pixel_ok[:, None] & col_ok[None, :]
    out_index = pixels[:, None] * N_COLS + cols[None, :]
    if GATE == 0:
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if elu_x_ptr is not None:
            elu_x = tl.load(elu_x_ptr + out_index, mask=store_ok, other=0.0).to(tl.float32)
            if keep_ptr is not None:  # the gradients w.r.t. the dropped activation's halves, through the dropout
                keep_index = pixels[:, None] * (2 * N_COLS) + cols[None, :]
                acc = acc * (tl.load(keep_ptr + keep_index, mask=store_ok, other=0).to(tl.float32) * keep_scale)
                acc_b = acc_b * (tl.load(keep_ptr + keep_index + N_COLS, mask=store_ok, other=0).to(tl.float32) * keep_scale)
            result = concat_elu_grad_math(elu_x, acc, acc_b)
        else:
            result = acc
    else:
        channels, b_shift = _preactivation_channels(cols, N_COLS, GATE_GROUPS)
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + channels, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_b += tl.load(bias_ptr + channels + b_shift, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        pre_index = pixels[:, None] * (2 * N_COLS) + channels[None, :]
        if addend_ptr is not None:
            acc += tl.load(addend_ptr + pre_index, mask=store_ok, other=0.0).to(tl.float32)
            acc_b += tl.load(addend_ptr + pre_index + b_shift, mask=store_ok, other=0.0).to(tl.float32)
        # The gate sees the pre-activation rounded to the output dtype, as stored for the backward
        # and as a separate gate op would read it.
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc_b = acc_b.to(out_ptr.dtype.element_ty).to(tl.float32)
        if pre_ptr is not None:
            tl.store(pre_ptr + pre_index, acc.to(pre_ptr.dtype.element_ty), mask=store_ok)
            tl.store(pre_ptr + pre_index + b_shift, acc_b.to(pre_ptr.dtype.element_ty), mask=store_ok)
        if cond_ptr is not None:
            cond_rows = cond_ptr + (pixels // (H * W))[:, None] * (2 * N_COLS) + channels[None, :]
            acc += tl.load(cond_rows, mask=store_ok, other=0.0).to(tl.float32)
            acc_b += tl.load(cond_rows + b_shift, mask=store_ok, other=0.0).to(tl.float32)
        result = _apply_gate(acc, acc_b, GATE)
    if residual_ptr is not None:
        result += tl.load(residual_ptr + out_index, mask=store_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_index, result.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _masked_conv_wgrad_kernel(
    x_ptr,
    gout_ptr,
    partial_ptr,
    num_pixels,
    H,
    W,
    C_IN,
    C_OUT,
    stride_xt,
    stride_xp,
    stride_xc,
    stride_gp,
    stride_gc,
    blocks_per_split,
    stride_split,
    OFFSETS: tl.constexpr,
    TAP_MAJOR_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """partial[s, t, ci, co] = Σ_{p in split s} x[p shifted by tap t, ci] · gout[p, co], in fp32.

    x[p, ci] at x_ptr + p·stride_xp + ci·stride_xc, gout[p, co] at gout_ptr + p·stride_gp
    + co·stride_gc (p a flat N·H·W pixel): channels-last rows (stride_xp = C_IN), or for
    TF32 pixel-major copies (stride 1 along p), since TF32's products want their operands
    contiguous along the reduction, here the pixels: of gout, and with ``TAP_MAJOR_X`` of x
    already shifted by each tap (:func:`_tap_major_rows`; tap t's at x_ptr + t·stride_xt, read
    at p itself). partial: split s's (T, C_IN, C_OUT) fp32 at partial_ptr + s·stride_split
    (the taps of one launch inside a buffer holding all of a convolution's). Grid:
    (T · cdiv(C_IN, BLOCK_CI), cdiv(C_OUT, BLOCK_CO), splits); split s covers pixel blocks
    [s·blocks_per_split, (s+1)·blocks_per_split).
    """
    ci_blocks = tl.cdiv(C_IN, BLOCK_CI)
    tap = tl.program_id(0) // ci_blocks
    ci = (tl.program_id(0) % ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    split = tl.program_id(2)
    dy, dx = _tap_offset(tap, OFFSETS)
    ci_ok = ci < C_IN
    co_ok = co < C_OUT
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(num_pixels, BLOCK_P))
    # Each lane's row and column, advanced by BLOCK_P pixels a step without dividing by W and H
    # (sm_90: 322 -> 219 instructions a step in bf16, 299 -> 234 in fp32; H, W as constexprs
    # would give 187 and 182 but compile the kernel again for every image size).
    _, _, row, col = _pixel_block(first, num_pixels, H, W, BLOCK_P, WIDE_INDEX)
    step_cols = BLOCK_P % W
    step_rows = (BLOCK_P // W) % H
    for block in range(first, last):
        pixels, pixel_ok = _pixels(block, num_pixels, BLOCK_P, WIDE_INDEX)
        if TAP_MAJOR_X:  # shifted, and zero outside the image, by the copy
            sources, src_ok = pixels, pixel_ok
        else:
            sources, src_ok = _tap_sources(pixels, pixel_ok, row, col, dy, dx, H, W)
        # x tile read transposed, (BLOCK_CI, BLOCK_P), so the product reduces over pixels.
        x_tile = tl.load(x_ptr + tap * stride_xt + sources[None, :] * stride_xp + ci[:, None] * stride_xc, mask=ci_ok[:, None] & src_ok[None, :], other=0.0)
        g_tile = tl.load(gout_ptr + pixels[:, None] * stride_gp + co[None, :] * stride_gc, mask=pixel_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, g_tile, acc, input_precision=DOT_PRECISION)
        col += step_cols
        wraps = col >= W
        col = tl.where(wraps, col - W, col)
        row += step_rows + wraps.to(row.dtype)
        row = tl.where(row >= H, row - H, row)
    out = partial_ptr + split * stride_split + (tap * C_IN + ci[:, None]) * C_OUT + co[None, :]
    tl.store(out, acc, mask=ci_ok[:, None] & co_ok[None, :])


@triton.jit
def _weight_grad_finish_kernel(
    partial_ptr, hidden_ptr, grad_ptr, num_splits, C_IN, C_OUT,
    TAP_POSITIONS: tl.constexpr, ZERO_POSITIONS: tl.constexpr, ANCHOR_TAP: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
):  # fmt: skip
    """grad[co, ci, TAP_POSITIONS[t]] = Σ_s partial[s, t, ci, co], 0 at ZERO_POSITIONS.

    The weight gradient in the layout and dtype of the weight, in one pass: the split sums
    added, the taps scattered to their kernel positions, the masked-out positions zeroed and,
    with ``hidden_ptr`` (uint8 (C_OUT, C_IN), 1: a channel pair the colour groups hide), those
    pairs zeroed at tap ANCHOR_TAP. partial: (num_splits, T, C_IN, C_OUT) fp32 contiguous;
    grad: (C_OUT, C_IN, kh·kw) contiguous, kh·kw = len(TAP_POSITIONS) + len(ZERO_POSITIONS).
    Grid: (cdiv(C_IN · C_OUT, BLOCK_PAIRS), T + 1): program (p, t < T) sums tap t of BLOCK_PAIRS
    (ci, co) pairs, BLOCK_SPLITS splits a step (independent loads in flight, not one split's
    latency after another's; the same order every run); program (p, T) writes their zeros.
    """
    NUM_TAPS: tl.constexpr = len(TAP_POSITIONS)
    POSITIONS: tl.constexpr = NUM_TAPS + len(ZERO_POSITIONS)
    pairs = tl.program_id(0) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)  # ci · C_OUT + co
    ok = pairs < C_IN * C_OUT
    tap = tl.program_id(1)
    ci = pairs // C_OUT
    grad_pairs = grad_ptr + ((pairs - ci * C_OUT) * C_IN + ci) * POSITIONS
    if tap < NUM_TAPS:
        position = 0
        for t in tl.static_range(NUM_TAPS):
            position = tl.where(tap == t, TAP_POSITIONS[t], position)
        total = tl.zeros((BLOCK_PAIRS,), dtype=tl.float32)
        for first in range(0, num_splits, BLOCK_SPLITS):
            splits = first + tl.arange(0, BLOCK_SPLITS)
            tile = partial_ptr + (splits[:, None] * NUM_TAPS + tap) * (C_IN * C_OUT) + pairs[None, :]
            total += tl.sum(tl.load(tile, mask=(splits < num_splits)[:, None] & ok[None, :], other=0.0), axis=0)
        if hidden_ptr is not None:
            hidden = tl.load(hidden_ptr + (pairs - ci * C_OUT) * C_IN + ci, mask=ok, other=0)
            total = tl.where((hidden != 0) & (tap == ANCHOR_TAP), 0.0, total)
        tl.store(grad_pairs + position, total.to(grad_ptr.dtype.element_ty), mask=ok)
    else:
        for z in tl.static_range(len(ZERO_POSITIONS)):
            tl.store(grad_pairs + ZERO_POSITIONS[z], tl.zeros((BLOCK_PAIRS,), dtype=grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tap_major_kernel(
    x_ptr, out_ptr, keep_ptr, num_pixels, H, W, C, keep_scale,
    OFFSETS: tl.constexpr, CONCAT_ELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[t, c, p] = in[p shifted by tap t, c], 0 where the tap leaves the image.

    x: (N·H·W, C) channels-last rows; ``in`` is x (Cin = C) or, with CONCAT_ELU, concat_elu(x)
    (Cin = 2C: channel c < C is elu(x[c]), c >= C elu(-x[c - C]); :func:`concat_elu_math`, the
    materialised input's own math), dropped out by ``keep_ptr`` when given (uint8 (N·H·W, 2C): kept
    elements times keep_scale, at the activation's own pixel). out: (T, Cin, N·H·W) contiguous,
    fewer than 2^31 elements. Grid: (cdiv(N·H·W, BLOCK_P), cdiv(Cin, BLOCK_C), T). Each program
    reads its (BLOCK_P, BLOCK_C) tile along the channels and writes it along the pixels (Triton
    transposes it in shared memory between the two). float32 only (TF32's operand).
    """
    tap = tl.program_id(2)
    dy, dx = _tap_offset(tap, OFFSETS)
    pixels, pixel_ok, row, col = _pixel_block(tl.program_id(0), num_pixels, H, W, BLOCK_P, False)
    in_channels = 2 * C if CONCAT_ELU else C
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < in_channels
    sources, src_ok = _tap_sources(pixels, pixel_ok, row, col, dy, dx, H, W)
    read = src_ok[:, None] & channel_ok[None, :]
    if CONCAT_ELU:
        negated = channels >= C
        pos, neg = concat_elu_math(tl.load(x_ptr + sources[:, None] * C + tl.where(negated, channels - C, channels)[None, :], mask=read, other=0.0))
        tile = tl.where(negated[None, :], neg, pos)
        if keep_ptr is not None:
            tile *= tl.load(keep_ptr + sources[:, None] * in_channels + channels[None, :], mask=read, other=0).to(tl.float32) * keep_scale
    else:
        tile = tl.load(x_ptr + sources[:, None] * C + channels[None, :], mask=read, other=0.0)
    tl.store(out_ptr + (tap * in_channels + channels[None, :]) * num_pixels + pixels[:, None], tile, mask=pixel_ok[:, None] & channel_ok[None, :])


# ---------------------------------------------------------------- launchers

# Tile sizes, chosen without autotuning (one compile per tap set, and stable
# numerics). Forward / input gradient: 128 pixels × 64 columns × 32 fp32 (64
# 16-bit) reduction elements: 24 KiB of operands per pipeline stage, 3 stages
# fit the H200's shared memory, the 128×64 fp32 accumulator is 64 registers per
# thread at 4 warps. The gated forward and the input gradient of a concat_elu
# input keep two accumulators, so they halve BLOCK_M to stay near the same
# register budget (_conv_tiles). One accumulator over a multiple of 128 columns
# takes 128 of them at 8 warps (_BLOCK_N_WIDE). Weight gradient: 64×64 output
# tiles (Cin × Cout) reduced over 32 (64) pixels at a time.
_BLOCK_M = 128
_BLOCK_M_TWO_HALVES = 64
_BLOCK_N = 64
_BLOCK_N_WIDE = 128
_BLOCK_K_BYTES = 128  # BLOCK_K · element size: 32 fp32 or 64 fp16/bf16 elements
_WGRAD_BLOCK = 64
# The tap-major copy's tile (_tap_major_rows): 64 pixels × 64 channels, 16 KiB in fp32; and the
# taps one copy holds: at most three times x's memory at once (a 3×3 mask's 6 taps in two).
_TAP_MAJOR_BLOCK_P = 64
_TAP_MAJOR_BLOCK_C = 64
_TAP_MAJOR_MAX_TAPS = 3
_WGRAD_BLOCK_WIDE = 128
# The weight gradient's finishing pass (_weight_grad_finish_kernel): 256 channel pairs a program
# (4 warps: 2 per thread), their partial sums read 8 splits a step (16 loads in flight a thread).
_FINISH_BLOCK_PAIRS = 256
_FINISH_BLOCK_SPLITS = 8
_NUM_WARPS = 4
_NUM_STAGES = 3
# A weight-gradient program reduces at least this many pixel blocks before the
# reduction is split further (splitting more only adds partial-sum traffic).
_MIN_BLOCKS_PER_SPLIT = 8
# Weight-gradient programs an SM holds at once: 64×64 tiles at 4 warps take 48 KiB of shared
# memory and at most 128 registers per thread each (sm_90), 4 fit; 128×128 tiles at 8 warps
# 96 KiB and at most 122, 2 fit (164 with 64-bit indices: then 1). Asking for 2 per SM of
# the 64×64 tiles, the H200 run of 2026-11-30 had 288 programs at its bench shapes: 24 SMs
# ran 3 and 108 ran 2. One full wave is predicted to take up to a quarter off the weight
# gradient; not yet measured.
_WGRAD_BLOCKS_PER_SM = 4
_WGRAD_WIDE_BLOCKS_PER_SM = 2
# tl.dot needs every tile dimension to be at least 16.
_MIN_DOT_DIM = 16


def _tile(size: int, largest: int) -> int:
    """Power-of-two tile covering ``size`` where possible, between 16 and ``largest``."""
    return max(_MIN_DOT_DIM, min(largest, next_power_of_2(size)))


def _max_reduction_tile(dtype: torch.dtype) -> int:
    """BLOCK_K for a large reduction: _BLOCK_K_BYTES of ``dtype`` per row."""
    return _BLOCK_K_BYTES // dtype.itemsize


def _reduction_tile(size: int, dtype: torch.dtype) -> int:
    """BLOCK_K for a reduction of ``size`` elements of ``dtype``."""
    return _tile(size, _max_reduction_tile(dtype))


def _conv_tiles(two_halves: bool, dtype: torch.dtype, precision: str, n_cols: int, gate_groups: int = 1) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of _masked_conv_kernel over ``n_cols`` output columns.

    One accumulator: _BLOCK_M pixels × _BLOCK_N columns at 4 warps, or × _BLOCK_N_WIDE at 8
    warps when the columns are a multiple of it (no padded columns): each program then
    reads its rows of x once per 128 columns instead of per 64, a third less of the
    operand traffic from L2 that bounds the bf16 forward (the vertical 3×3, 64×128×32×32 →
    256: ~0.60 → ~0.40 GB; 0.099 ms on the H200 on 2026-11-30, at ~6 TB/s). Predicted
    ~0.07 ms, not yet measured; 128 × 256 halves it but spills 116 bytes with a residual.
    Two accumulators (a gate, or concat_elu's backward: the kernel's TWO_HALVES): half as
    many pixels, at 8 warps for 16-bit inputs or a gate in groups. Full-fp32 ("ieee")
    products: half the pixels again, never the wide tile.

    Register use compiled for sm_90 by Triton 3.6 (ptxas -v; no spills unless said), e.g. the
    vertical 3×3 taps: one accumulator 124 (fp32, TF32) or 118 (bf16) at 4 warps, 118 and 120
    wide at 8 (180 for the 1×1 with an fp32 residual); two 138 (fp32) at 4 warps, 80 (bf16) at 8.
    "ieee" ``tl.dot`` is an FMA loop holding both operand tiles in registers: at 128 rows the
    input gradient spills 12 bytes and the 64-bit-index forward 16; at 64 rows, 96. A gate in
    groups maps each column to its channel, so the epilogue's loads and stores are not
    vectorised: the 1×1 link of the colour model (128 channels) in fp32 takes 188 registers
    at 8 warps, no spills.
    """
    full_fp32 = precision == "ieee" and dtype == torch.float32
    block_n = _tile(n_cols, _BLOCK_N)
    if two_halves:
        rows, warps = _BLOCK_M_TWO_HALVES, _NUM_WARPS if dtype == torch.float32 and gate_groups == 1 else 2 * _NUM_WARPS
    elif not full_fp32 and n_cols % _BLOCK_N_WIDE == 0:
        rows, block_n, warps = _BLOCK_M, _BLOCK_N_WIDE, 2 * _NUM_WARPS
    else:
        rows, warps = _BLOCK_M, _NUM_WARPS
    return (rows // 2 if full_fp32 else rows), block_n, warps


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: TF32 for fp32 if allowed, else "ieee" (full fp32; fp16/bf16 ignore it)."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _conv_launch(
    x, w, w_strides, out, offsets, n_cols, allow_tf32, *,
    bias=None, cond=None, residual=None, addend=None, pre=None, elu_x=None, concat_elu_input=False, keep=None, keep_scale=1.0, gate=GATE_NONE,
    gate_groups=1,
):  # fmt: skip
    """Runs _masked_conv_kernel over channels-last ``x`` (N, H, W, C) into ``out``; returns ``out``.

    The GEMM reads x, or concat_elu(x) (2C channels) when ``concat_elu_input``, dropped
    out by ``keep`` and ``keep_scale`` when ``keep`` is given; the other keyword arguments
    are the kernel's epilogue inputs (None: absent).
    """
    if keep is not None and not (concat_elu_input or elu_x is not None):
        raise ValueError("keep (a dropout mask) needs a concat_elu input")
    batch, height, width, _ = x.shape
    num_pixels = batch * height * width
    if num_pixels == 0:
        return out
    if concat_elu_input:
        x, keep = _concat_elu_rows(x, keep, keep_scale), None
    c_in = x.shape[3]
    precision = dot_precision(x.dtype, allow_tf32)
    block_m, block_n, num_warps = _conv_tiles(gate != GATE_NONE or elu_x is not None, x.dtype, precision, n_cols, gate_groups)
    grid = (cdiv(num_pixels, block_m), cdiv(n_cols, block_n))
    with launch_device(x):
        _masked_conv_kernel[grid](
            x, w, bias, cond, residual, addend, elu_x, keep, out, pre,
            num_pixels, height, width, c_in, n_cols, *w_strides, keep_scale,
            OFFSETS=tuple(offsets), GATE=gate, GATE_GROUPS=gate_groups, DOT_PRECISION=precision,
            WIDE_INDEX=needs_int64_index(x, out, addend, pre, keep),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_reduction_tile(c_in, x.dtype),
            num_warps=num_warps, num_stages=_NUM_STAGES,
        )
    return out


def _concat_elu_rows(x: torch.Tensor, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    """concat_elu(x) as the GEMMs read it: x (N, H, W, C) contiguous to (N, H, W, 2C) in x's dtype,
    with ``keep`` ((N, H, W, 2C) uint8 contiguous, or None) dropped out: kept elements times
    ``keep_scale``, the others 0. One elementwise pass (see the module docstring for why): the
    gates family's, whose (rows, 2, C) output is these channels-last rows."""
    batch, height, width, channels = x.shape
    return concat_elu_forward(x.view(-1, channels), keep, keep_scale).view(batch, height, width, 2 * channels)


def _forward_weight(wp: torch.Tensor, allow_tf32: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The packed weight (T, Cin, Cout) as the forward reads it, and its (tap, k, n) strides.

    For TF32 products a (T, Cout, Cin) copy read through transposed strides: TF32's
    operands must be contiguous along the reduction (Cin), else Triton copies the weight
    into shared memory 4 bytes at a time (16-bit operands it reads either way). Predicted
    for the vertical 3×3 fp32 forward (0.343 ms on the H200, 2026-11-30): its ~0.4 GB of
    weight-tile reads in 16-byte copies, ~0.25 ms; not yet measured.
    """
    if dot_precision(wp.dtype, allow_tf32) != "tf32":
        return wp, wp.stride()
    transposed = wp.transpose(1, 2).contiguous()
    return transposed, (transposed.stride(0), transposed.stride(2), transposed.stride(1))


def masked_conv2d_fwd(
    x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, offsets: list[int], concat_elu_input: bool,
    allow_tf32: bool, keep: torch.Tensor | None = None, keep_scale: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """out[n, y, x, co] = bias[co] + Σ_t Σ_ci in[n, y+dy_t, x+dx_t, ci] · wp[t, ci, co] + residual[n, y, x, co].

    x: (N, H, W, C) contiguous; ``in`` is x (Cin = C), or concat_elu(x) (Cin = 2C)
    when ``concat_elu_input``, then with ``keep`` ((N, H, W, 2C) uint8 contiguous, or
    None) dropped out: kept elements times ``keep_scale``, the others 0; wp: (T, Cin,
    Cout) contiguous; bias: (Cout,) or None; residual: (N, H, W, Cout) contiguous in
    x's dtype, or None; offsets: (dy_0, dx_0, ...) of length 2T; allow_tf32: fp32
    products in TF32. Returns (N, H, W, Cout) in x's dtype.
    """
    out = x.new_empty(*x.shape[:3], wp.shape[2])
    return _conv_launch(
        x, *_forward_weight(wp, allow_tf32), out, offsets, wp.shape[2], allow_tf32, bias=bias, residual=residual, concat_elu_input=concat_elu_input,
        keep=keep, keep_scale=keep_scale,
    )  # fmt: skip


def masked_conv2d_dgrad(
    gout: torch.Tensor, wp: torch.Tensor, x: torch.Tensor | None, offsets: list[int], allow_tf32: bool, keep: torch.Tensor | None = None, keep_scale: float = 1.0
) -> torch.Tensor:
    """gin[n, y, x, ci] = Σ_t Σ_co gout[n, y-dy_t, x-dx_t, co] · wp[t, ci, co]: the gradient w.r.t. the conv's input.

    gout: (N, H, W, Cout) contiguous; wp: (T, Cin, Cout) contiguous. The forward
    kernel with negated offsets, reading wp as (T, Cout, Cin) through its strides.
    x: None, or the forward's x (N, H, W, Cin / 2) contiguous when the forward read
    concat_elu(x): then the epilogue folds concat_elu's backward in and the result
    is the gradient w.r.t. x, gin[..., :C]·elu'(x) − gin[..., C:]·elu'(−x); with
    ``keep`` (the forward's (N, H, W, Cin) uint8 dropout mask, or None) gin is first
    taken through the dropout (kept elements times ``keep_scale``, the others 0).
    Returns (N, H, W, Cin), or (N, H, W, Cin / 2) given x, in gout's dtype.
    """
    n_cols = wp.shape[1] if x is None else x.shape[3]
    gx = gout.new_empty(*gout.shape[:3], n_cols)
    negated = [-d for d in offsets]
    transposed = (wp.stride(0), wp.stride(2), wp.stride(1))
    return _conv_launch(gout, wp, transposed, gx, negated, n_cols, allow_tf32, elu_x=x, keep=keep, keep_scale=keep_scale)


def masked_conv2d_fwd_gated(
    x: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    cond: torch.Tensor | None,
    residual: torch.Tensor | None,
    addend: torch.Tensor | None,
    offsets: list[int],
    concat_elu_input: bool,
    gate: int,
    gate_groups: int,
    write_preact: bool,
    allow_tf32: bool,
    keep: torch.Tensor | None = None,
    keep_scale: float = 1.0,
) -> list[torch.Tensor]:
    """[gate(pre + cond) + residual, pre], pre = the forward's output + addend, gated in channel halves a, b.

    x, wp, bias, offsets, concat_elu_input, keep, keep_scale as :func:`masked_conv2d_fwd`, with Cout a
    multiple of 2·gate_groups; addend: (N, H, W, Cout) contiguous or None; cond: (N,
    Cout) contiguous or None; gate: GATE_TANH_SIGMOID or GATE_SIGMOID; residual: (N,
    H, W, Cout / 2) contiguous or None, added after the gate. With gate_groups > 1
    the channels of bias, cond, addend and pre are gate_groups blocks [a_1 b_1 | a_2
    b_2 | ...] and wp's columns are halves first (``pack_weight(..., gate_groups)``).
    Returns the gated (N, H, W, Cout / 2) and, when ``write_preact``, the
    pre-activation conv + bias + addend (N, H, W, Cout) written in the same pass
    (else an empty tensor).
    """
    half = wp.shape[2] // 2
    out = x.new_empty(*x.shape[:3], half)
    preact = x.new_empty(*x.shape[:3], wp.shape[2]) if write_preact else x.new_empty(0)
    _conv_launch(
        x, *_forward_weight(wp, allow_tf32), out, offsets, half, allow_tf32,
        bias=bias, cond=cond, residual=residual, addend=addend, pre=preact if write_preact else None, concat_elu_input=concat_elu_input, keep=keep,
        keep_scale=keep_scale, gate=gate, gate_groups=gate_groups,
    )
    return [out, preact]


def _wgrad_tiles(c_in: int, c_out: int) -> tuple[int, int, int, int]:
    """(BLOCK_CI, BLOCK_CO, num_warps, programs per SM) of the weight gradient.

    128 × 128 at 8 warps when both channel counts are multiples of 128 (no padded rows or
    columns), else up to 64 × 64 at 4: each step's two operand tiles then feed 4× the
    products for 2× the bytes, halving the operand traffic from L2 (the vertical 3×3 bf16:
    ~0.8 → ~0.4 GB) and the loop's instructions per product: 1.39× (bf16) and 1.51× (TF32)
    faster on the H200 (2026-11-30, vertical 3×3, 64×128×32×32 → 256).
    """
    if c_in % _WGRAD_BLOCK_WIDE == 0 and c_out % _WGRAD_BLOCK_WIDE == 0:
        return _WGRAD_BLOCK_WIDE, _WGRAD_BLOCK_WIDE, 2 * _NUM_WARPS, _WGRAD_WIDE_BLOCKS_PER_SM
    return _tile(c_in, _WGRAD_BLOCK), _tile(c_out, _WGRAD_BLOCK), _NUM_WARPS, _WGRAD_BLOCKS_PER_SM


def _weight_grad_splits(tiles: int, pixel_blocks: int, blocks_per_sm: int, device: torch.device) -> int:
    """How many pixel ranges the weight-gradient reduction is split into.

    Enough programs for one full wave over the GPU's SMs (``blocks_per_sm`` each),
    each reducing at least _MIN_BLOCKS_PER_SPLIT pixel blocks; depends on shapes and
    device only, so the summation order, hence the result, is reproducible.
    """
    if device.type != "cuda":
        return 1
    programs_wanted = blocks_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(programs_wanted, tiles), pixel_blocks // _MIN_BLOCKS_PER_SPLIT))


def _tap_major_rows(x: torch.Tensor, offsets: list[int], concat_elu_input: bool = False, keep: torch.Tensor | None = None, keep_scale: float = 1.0) -> torch.Tensor:
    """(T, Cin, N·H·W): the convolution's input, x (N, H, W, C) contiguous or with ``concat_elu_input``
    concat_elu(x) dropped out by ``keep`` (as :func:`_concat_elu_rows`), moved by each tap's offset
    (zeros where it leaves the image), pixel-major: the weight gradient's TF32 operand, contiguous
    along the pixels and 16-byte aligned at every tile whatever the tap (:func:`_tap_major_x`).
    concat_elu is computed here, not read from a materialised (N, H, W, 2C): one pass and one
    launch fewer, and C read instead of 2C written and read."""
    batch, height, width, channels = x.shape
    num_pixels, num_taps = batch * height * width, len(offsets) // 2
    c_in = 2 * channels if concat_elu_input else channels
    out = torch.empty(num_taps, c_in, num_pixels, device=x.device, dtype=x.dtype)
    grid = (cdiv(num_pixels, _TAP_MAJOR_BLOCK_P), cdiv(c_in, _TAP_MAJOR_BLOCK_C), num_taps)
    with launch_device(x):
        _tap_major_kernel[grid](
            x, out, keep, num_pixels, height, width, channels, keep_scale,
            OFFSETS=tuple(offsets), CONCAT_ELU=concat_elu_input, BLOCK_P=_TAP_MAJOR_BLOCK_P, BLOCK_C=_TAP_MAJOR_BLOCK_C,
        )  # fmt: skip
    return out


def _tap_major_x(precision: str, c_in: int, copy_elements: int) -> bool:
    """Whether the weight gradient reads x from :func:`_tap_major_rows`' copy (else its channels-last rows).

    TF32's operands must be contiguous along the reduction (the pixels), and 16-byte aligned,
    for Triton to copy them into shared memory 16 bytes at a time: channels-last rows, read
    at pixels shifted by the tap, took 4-byte copies (the vertical 3×3 sm_90 kernel's three
    pipeline stages: 48 of them, against 12 16-byte ones for the pixel-major gout). On the H200 (2026-11-30)
    that weight gradient ran at 58 TFLOP/s in TF32 against 387 in bf16 (0.442 against 0.067 ms,
    64×128×32×32 → 256). The copy moves x once in and T times out, ~0.06 ms there at the copy
    rate; the GEMM at half the bf16 rate ~0.13 ms: predicted ~0.2 ms, not yet measured. The
    copy is made a few taps at a time (_TAP_MAJOR_MAX_TAPS), one GEMM launch each. As for
    gout, not for inputs narrower than a tile; nor when the copy (``copy_elements``) would pass
    2^31 elements.
    """
    return precision == "tf32" and c_in >= _WGRAD_BLOCK and copy_elements < 2**31


def _pixel_major_gout(precision: str, wide_index: bool, c_in: int) -> bool:
    """Whether the weight gradient reads a pixel-major copy of gout (else its channels-last rows).

    TF32's operands must be contiguous along the reduction, the pixels: from channels-last
    rows Triton copies them into shared memory 4 bytes at a time. A pixel-major copy of
    gout (one read and write of it) takes 16-byte copies; x's tiles start at pixels shifted
    by the tap, not 16-byte aligned, so x takes a copy per tap (:func:`_tap_major_x`). Not
    for tensors past 2^31 elements (the copy's offsets) nor for inputs narrower than a tile
    (a first layer's 1-4 channels, whose kernel then spills registers).
    """
    return precision == "tf32" and not wide_index and c_in >= _WGRAD_BLOCK


def masked_conv2d_wgrad(
    x: torch.Tensor, gout: torch.Tensor, offsets: list[int], tap_positions: list[int], kernel_size: list[int], hidden: torch.Tensor | None,
    anchor_tap: int, concat_elu_input: bool, allow_tf32: bool, keep: torch.Tensor | None = None, keep_scale: float = 1.0, num_splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """grad[co, ci, i_t, j_t] = Σ_{n,y,x} in[n, y+dy_t, x+dx_t, ci] · gout[n, y, x, co]: the weight's gradient.

    x: (N, H, W, C), gout: (N, H, W, Cout), both contiguous and of one dtype; ``in``
    is x (Cin = C), or concat_elu(x) (Cin = 2C) when ``concat_elu_input``, dropped out
    by ``keep`` and ``keep_scale`` when given (as :func:`masked_conv2d_fwd`). Tap t is
    at the kernel's flat position ``tap_positions[t]`` = i_t·kw + j_t of ``kernel_size``
    (kh, kw); the other positions get 0, and so do the channel pairs ``hidden``
    (uint8 (Cout, Cin), or None) marks at tap ``anchor_tap``. Summed in fp32: the pixel
    reduction is split in ``num_splits`` ranges (default: chosen from the shapes and the
    device) whose partial sums the finishing pass adds in a fixed order. Returns
    (Cout, Cin, kh, kw) contiguous in x's dtype.
    """
    if keep is not None and not concat_elu_input:
        raise ValueError("keep (a dropout mask) needs a concat_elu input")
    batch, height, width, channels = x.shape
    c_in = 2 * channels if concat_elu_input else channels
    num_taps, c_out, num_pixels = len(offsets) // 2, gout.shape[3], batch * height * width
    grad = x.new_empty(c_out, c_in, *kernel_size)
    if num_pixels == 0:
        return grad.zero_()
    # The input's offsets reach num_pixels · c_in elements, concat_elu's 2C channels included.
    precision, wide_index = dot_precision(x.dtype, allow_tf32), num_pixels * c_in >= 2**31 or needs_int64_index(gout)
    if _pixel_major_gout(precision, wide_index, c_in):
        g_rows, g_strides = gout.reshape(num_pixels, c_out).t().contiguous(), (1, num_pixels)
    else:
        g_rows, g_strides = gout, (c_out, 1)
    # A few taps a launch where x is copied per tap: the copies held at once stay within _TAP_MAJOR_MAX_TAPS.
    taps_per_copy = min(num_taps, _TAP_MAJOR_MAX_TAPS)
    tap_major_x = _tap_major_x(precision, c_in, taps_per_copy * num_pixels * c_in)
    taps_per_launch = taps_per_copy if tap_major_x else num_taps
    block_ci, block_co, num_warps, blocks_per_sm = _wgrad_tiles(c_in, c_out)
    block_p = _reduction_tile(num_pixels, x.dtype)
    pixel_blocks = cdiv(num_pixels, block_p)
    tiles = taps_per_launch * cdiv(c_in, block_ci) * cdiv(c_out, block_co)
    splits = num_splits or _weight_grad_splits(tiles, pixel_blocks, blocks_per_sm, x.device)
    partial = torch.empty(splits, num_taps, c_in, c_out, device=x.device, dtype=torch.float32)
    rows = None if tap_major_x else (_concat_elu_rows(x, keep, keep_scale) if concat_elu_input else x)
    with launch_device(x):
        for first in range(0, num_taps, taps_per_launch):
            part = offsets[2 * first : 2 * (first + taps_per_launch)]
            if tap_major_x:
                source, x_strides = _tap_major_rows(x, part, concat_elu_input, keep, keep_scale), (c_in * num_pixels, 1, num_pixels)
            else:
                source, x_strides = rows, (0, c_in, 1)
            grid = ((len(part) // 2) * cdiv(c_in, block_ci), cdiv(c_out, block_co), splits)
            _masked_conv_wgrad_kernel[grid](
                source, g_rows, partial[:, first], num_pixels, height, width, c_in, c_out, *x_strides, *g_strides, cdiv(pixel_blocks, splits),
                partial.stride(0), OFFSETS=tuple(part), TAP_MAJOR_X=tap_major_x, DOT_PRECISION=precision, WIDE_INDEX=wide_index,
                BLOCK_CI=block_ci, BLOCK_CO=block_co, BLOCK_P=block_p, num_warps=num_warps, num_stages=_NUM_STAGES,
            )  # fmt: skip
        positions = set(tap_positions)
        _weight_grad_finish_kernel[(cdiv(c_in * c_out, _FINISH_BLOCK_PAIRS), num_taps + 1)](
            partial, hidden, grad, splits, c_in, c_out, TAP_POSITIONS=tuple(tap_positions),
            ZERO_POSITIONS=tuple(k for k in range(kernel_size[0] * kernel_size[1]) if k not in positions), ANCHOR_TAP=anchor_tap,
            BLOCK_SPLITS=_FINISH_BLOCK_SPLITS, BLOCK_PAIRS=_FINISH_BLOCK_PAIRS,
        )  # fmt: skip
    return grad


# ---------------------------------------------------------------- sm_90 compile cases


def _register_compile_cases() -> None:
    from pixelcnn_kernels.masks import resolve_mask
    from pixelcnn_kernels.ops.masked_conv import tap_offsets

    tap_sets = {
        "vertical3x3": tap_offsets(resolve_mask("vertical", 3), 1),
        "horizontal1x3": tap_offsets(resolve_mask("horizontal", (1, 3)), 1),
        "down_shifted2x3": tap_offsets(resolve_mask("down_shifted"), 1),
        "down_right_shifted2x2": tap_offsets(resolve_mask("down_right_shifted"), 1),
        "A5x5_dil2": tap_offsets(resolve_mask("A", 5), 2),
        "full1x1": tap_offsets(resolve_mask("full", 1), 1),
    }
    # The models' first layers read the image: 1, 3 or 4 (PixelCNN++'s image and ones) input
    # channels, whose counts and strides are not multiples of 16, so their launches specialise
    # without the divisibility hint and take the launchers' smallest channel tiles (16): compiled
    # that way, forward and weight gradient (the image needs no input gradient).
    first_layer_tap_sets = {
        "vertical_A3x3": tap_offsets(resolve_mask("vertical_A", 3), 1),
        "horizontal_A1x3": tap_offsets(resolve_mask("horizontal_A", (1, 3)), 1),
        "down_shifted2x3": tap_offsets(resolve_mask("down_shifted"), 1),
        "down_shifted1x3": tap_offsets(resolve_mask("down_shifted", (1, 3)), 1),
        "down_right_shifted2x1": tap_offsets(resolve_mask("down_right_shifted", (2, 1)), 1),
    }
    # (kind, gate, the optional pointers given): the tap sets of gated layers' k×k convs get
    # the plain passes; PixelCNN++'s shifted convs also the residual ones and the input
    # gradients of a concat_elu input; the 1×1 convs of Gated PixelCNN's horizontal stack
    # (the vertical link, the output conv) only their fused forwards.
    plain_variants = (
        ("fwd", GATE_NONE, ("bias_ptr",)),
        ("dgrad", GATE_NONE, ()),
        ("fwd_gated", GATE_TANH_SIGMOID, ("bias_ptr", "cond_ptr", "pre_ptr")),
    )
    pixelcnn_pp_variants = (
        ("fwd_residual", GATE_NONE, ("bias_ptr", "residual_ptr")),
        ("dgrad_concat_elu", GATE_NONE, ("elu_x_ptr",)),
        ("fwd_gated_residual", GATE_SIGMOID, ("bias_ptr", "cond_ptr", "residual_ptr", "pre_ptr")),
        # In training, with the dropout between concat_elu and the gated resnet's second conv.
        ("dgrad_concat_elu_dropout", GATE_NONE, ("elu_x_ptr", "keep_ptr")),
    )
    link_variants = (
        ("fwd_residual", GATE_NONE, ("bias_ptr", "residual_ptr")),
        ("fwd_gated_addend", GATE_TANH_SIGMOID, ("bias_ptr", "cond_ptr", "addend_ptr", "pre_ptr")),
    )
    variants_of = {"down_shifted2x3": plain_variants + pixelcnn_pp_variants, "down_right_shifted2x2": plain_variants + pixelcnn_pp_variants, "full1x1": link_variants}
    # Gated PixelCNN's at 128 channels (the bench's), PixelCNN++'s at a width of a multiple of 128.
    wide_tap_sets = ("vertical3x3", "horizontal1x3", "full1x1", "down_shifted2x3")
    wgrad_variants_of = {"down_shifted2x3": (False, True), "full1x1": ()}  # wide_index of each
    optional_pointers = ("bias_ptr", "cond_ptr", "residual_ptr", "addend_ptr", "elu_x_ptr", "keep_ptr", "pre_ptr")

    def register_conv(name, offsets, dtype, gate, given_pointers, *, wide_index=False, precision=None, divisible_ints=True, c_in=None, gate_groups=1, n_cols=_BLOCK_N):
        ptr = pointer_type(dtype)
        precision = precision or dot_precision(dtype, allow_tf32=True)
        # Triton specialises an int argument equal to 1 as a constant, as the launches pass the
        # weight's unit stride: the reduction's in the input gradient and in a TF32 forward
        # (_forward_weight), the output channels' in a 16-bit (or "ieee") forward.
        unit_stride = "stride_wk" if name.startswith("masked_conv_dgrad") or precision == "tf32" else "stride_wn"
        strides = [stride for stride in ("stride_wt", "stride_wk", "stride_wn") if stride != unit_stride]
        signature = {"x_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, **dict.fromkeys(("num_pixels", "H", "W", "C_IN", "N_COLS", *strides), "i32")}
        signature.update({**dict.fromkeys(given_pointers, ptr), **({"num_pixels": "i64"} if wide_index else {}), "keep_scale": "fp32"})  # 64-bit indices: num_pixels arrives as i64
        if "keep_ptr" in given_pointers:
            signature["keep_ptr"] = "*u8"
        block_m, block_n, num_warps = _conv_tiles(gate != GATE_NONE or "elu_x_ptr" in given_pointers, dtype, precision, n_cols, gate_groups)
        constexprs = {
            "OFFSETS": tuple(offsets), "DOT_PRECISION": precision, "WIDE_INDEX": wide_index, "BLOCK_N": block_n,
            "BLOCK_K": _max_reduction_tile(dtype) if c_in is None else _reduction_tile(c_in, dtype),
            **{name: None for name in optional_pointers if name not in given_pointers}, "GATE": gate, "GATE_GROUPS": gate_groups,
            "BLOCK_M": block_m, unit_stride: 1,
        }  # fmt: skip
        register_compile_case(
            name, _masked_conv_kernel, signature, constexprs, num_warps=num_warps, num_stages=_NUM_STAGES, divisible_ints=divisible_ints,
            min_copy_bytes=16 if divisible_ints else 0,
        )

    def register_wgrad(name, offsets, dtype, *, wide_index=False, divisible_ints=True, c_in=_WGRAD_BLOCK, c_out=_WGRAD_BLOCK):
        # As masked_conv2d_wgrad launches it: x channels-last or tap-major, gout channels-last or pixel-major.
        precision = dot_precision(dtype, allow_tf32=True)
        tap_major = _tap_major_x(precision, c_in, 0) and not wide_index
        pixel_major = _pixel_major_gout(precision, wide_index, c_in)
        block_ci, block_co, num_warps, _ = _wgrad_tiles(c_in, c_out)
        unit_strides = ("stride_xp" if tap_major else "stride_xc", "stride_gp" if pixel_major else "stride_gc")
        strides = [stride for stride in ("stride_xt", "stride_xp", "stride_xc", "stride_gp", "stride_gc") if stride not in unit_strides]
        signature = {
            "x_ptr": pointer_type(dtype), "gout_ptr": pointer_type(dtype), "partial_ptr": "*fp32",
            **dict.fromkeys(("num_pixels", "H", "W", "C_IN", "C_OUT", *strides, "blocks_per_split", "stride_split"), "i32"),
            **({"num_pixels": "i64"} if wide_index else {}),
        }  # fmt: skip
        constexprs = {
            "OFFSETS": tuple(offsets), "TAP_MAJOR_X": tap_major, "DOT_PRECISION": precision, "WIDE_INDEX": wide_index, **dict.fromkeys(unit_strides, 1),
            "BLOCK_CI": block_ci, "BLOCK_CO": block_co, "BLOCK_P": _max_reduction_tile(dtype),
        }  # fmt: skip
        # Aligned operands copy 16 bytes at a time, except TF32's channels-last ones past 2^31 elements (no pixel-major copies there).
        full_width = divisible_ints and not (wide_index and precision == "tf32")
        register_compile_case(
            name, _masked_conv_wgrad_kernel, signature, constexprs, num_warps=num_warps, num_stages=_NUM_STAGES, divisible_ints=divisible_ints,
            min_copy_bytes=16 if full_width else 0,
        )

    for dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        for tap_name, offsets in tap_sets.items():
            for kind, gate, given_pointers in variants_of.get(tap_name, plain_variants):
                register_conv(f"masked_conv_{kind}_{tap_name}_{dtype_name}", offsets, dtype, gate, given_pointers)
                if tap_name == "down_shifted2x3" and kind == "fwd":  # past 2^31 elements: 64-bit indices
                    register_conv(f"masked_conv_{kind}_wide_index_{tap_name}_{dtype_name}", offsets, dtype, gate, given_pointers, wide_index=True)
                if dtype == torch.float32 and kind == "fwd" and tap_name == "vertical3x3":  # TF32 off: full-precision fp32 products
                    register_conv(f"masked_conv_{kind}_ieee_{tap_name}_{dtype_name}", offsets, dtype, gate, given_pointers, precision="ieee")
                if gate == GATE_NONE and "elu_x_ptr" not in given_pointers and tap_name in wide_tap_sets:  # 128 columns or a multiple
                    register_conv(f"masked_conv_{kind}_wide_{tap_name}_{dtype_name}", offsets, dtype, gate, given_pointers, n_cols=_BLOCK_N_WIDE)
            wgrad_index_widths = wgrad_variants_of.get(tap_name, (False,))
            for wide_index in wgrad_index_widths:
                register_wgrad(f"masked_conv_wgrad{'_wide_index' if wide_index else ''}_{tap_name}_{dtype_name}", offsets, dtype, wide_index=wide_index)
            if wgrad_index_widths and tap_name in wide_tap_sets:
                register_wgrad(f"masked_conv_wgrad_wide_{tap_name}_{dtype_name}", offsets, dtype, c_in=_WGRAD_BLOCK_WIDE, c_out=_WGRAD_BLOCK_WIDE)
            if dtype == torch.float32:  # the TF32 weight gradient's copy of x
                # x itself; PixelCNN++'s convolutions' concat_elu input, and in training its dropout too.
                copies = (("", False, None),) + ((("_concat_elu", True, None), ("_concat_elu_dropout", True, "*u8")) if tap_name in variants_of else ())
                for variant, concat_elu, keep_type in copies:
                    register_compile_case(
                        f"masked_conv_tap_major{variant}_{tap_name}_{dtype_name}", _tap_major_kernel,
                        {"x_ptr": pointer_type(dtype), "out_ptr": pointer_type(dtype), **({"keep_ptr": keep_type} if keep_type else {}),
                         **dict.fromkeys(("num_pixels", "H", "W", "C"), "i32"), "keep_scale": "fp32"},
                        {"OFFSETS": tuple(offsets), "CONCAT_ELU": concat_elu, "BLOCK_P": _TAP_MAJOR_BLOCK_P, "BLOCK_C": _TAP_MAJOR_BLOCK_C,
                         **({} if keep_type else {"keep_ptr": None})},
                    )  # fmt: skip
        # The weight gradient's finishing pass: masked-out positions to zero (or none, the 1×1), and
        # the colour model's hidden channel pairs at the anchor tap.
        finish_layouts = {
            "vertical3x3": (resolve_mask("vertical", 3), False), "full1x1": (resolve_mask("full", 1), False),
            "color_B3x3": (resolve_mask("B", 3, 3), True),
        }  # fmt: skip
        for layout_name, (spec, hidden) in finish_layouts.items():
            positions = [i * spec.kernel_size[1] + j for i, j in spec.taps]
            register_compile_case(
                f"masked_conv_wgrad_finish_{layout_name}_{dtype_name}", _weight_grad_finish_kernel,
                {"partial_ptr": "*fp32", "grad_ptr": pointer_type(dtype), **({"hidden_ptr": "*u8"} if hidden else {}), **dict.fromkeys(("num_splits", "C_IN", "C_OUT"), "i32")},
                {"TAP_POSITIONS": tuple(positions), "ZERO_POSITIONS": tuple(k for k in range(spec.kernel_size[0] * spec.kernel_size[1]) if k not in positions),
                 "ANCHOR_TAP": spec.taps.index(spec.anchor) if hidden else -1, "BLOCK_SPLITS": _FINISH_BLOCK_SPLITS, "BLOCK_PAIRS": _FINISH_BLOCK_PAIRS,
                 **({} if hidden else {"hidden_ptr": None})},
                divisible_ints=False,
            )  # fmt: skip
        for tap_name, offsets in first_layer_tap_sets.items():
            register_conv(f"masked_conv_fwd_first_layer_{tap_name}_{dtype_name}", offsets, dtype, GATE_NONE, ("bias_ptr",), divisible_ints=False, c_in=4)
            register_wgrad(f"masked_conv_wgrad_first_layer_{tap_name}_{dtype_name}", offsets, dtype, divisible_ints=False, c_in=4)
        # Colour Gated PixelCNN's horizontal link gates its colour-major pre-activation in three
        # groups (of 43, 43 and 42 channels in the benchmark model's 128, a multiple of 16; a
        # width such as 126 is not). And a colour-masked conv gated per colour
        # (MaskedConv2dGated(color_groups=3)), on the horizontal stack's taps.
        for aligned in (True, False):
            suffix = "" if aligned else "_unaligned"
            register_conv(
                f"masked_conv_fwd_gated_addend_3_groups{suffix}_full1x1_{dtype_name}", tap_sets["full1x1"], dtype, GATE_TANH_SIGMOID,
                ("bias_ptr", "cond_ptr", "addend_ptr", "pre_ptr"), divisible_ints=aligned, gate_groups=3,
            )
            register_conv(
                f"masked_conv_fwd_gated_3_groups{suffix}_horizontal1x3_{dtype_name}", tap_sets["horizontal1x3"], dtype, GATE_TANH_SIGMOID,
                ("bias_ptr", "cond_ptr", "pre_ptr"), divisible_ints=aligned, gate_groups=3,
            )

_register_compile_cases()
