"""Triton kernels of the discretized logistic mixture (DMOL): NLL forward, NLL backward, sampler.

One program handles ``BLOCK`` pixels as tiles of pixels x mixture components (the
NLL's forward: a power-of-two tile and one for the rest, 10 = 8 + 2; its gradient pass
and the sampler: one tile of K rounded up to a power of two), so every parameter load
reads one logits channel across consecutive pixels (coalesced in NCHW; any strides,
channels-last included, are read in place). The math follows
:mod:`pixelcnn_kernels.reference.dmol` in float32 whatever the storage dtype. The
gradient pass computes the forward in the same pass that writes the logits' gradient,
so nothing of size (B, H, W, C, K) is ever stored: when a gradient will be needed it
writes the NLL and the gradient of its sum at once (the op's backward scales that by
the upstream gradient), else it recomputes the forward in the backward.

libdevice is not available in the Triton interpreter, so ``expm1`` and ``tanh``
are written here with an exp and a Taylor series where ``exp(v) - 1`` would
cancel; where an error is amplified (a log-scale's inverse, a colour coefficient's
tanh, the likelihood's divisions: see :func:`_exp_accurate`), with an exp and a division
about as accurate as the CUDA kernel's ``expf`` and ``/`` (tests/gpu_math_emulation.py
emulates the GPU's approximate ones in the interpreter). Elsewhere the exp and the
reciprocal are the one-instruction forms of :mod:`~pixelcnn_kernels.triton.approx_math`:
the NLL kernels are bound by instruction issue, and these took 16% of the forward's
instructions and 14% of the gradient pass's (sm_90 SASS).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pixelcnn_kernels.reference import dmol as _reference
from pixelcnn_kernels.triton.approx_math import exp_ftz, reciprocal_positive
from pixelcnn_kernels.triton.utils import cdiv, launch_device, needs_int64_index, next_power_of_2, pointer_type, register_compile_case

# The reference's constants, as constexprs the kernels can read.
LOG_SCALE_MIN = tl.constexpr(_reference.LOG_SCALE_MIN)
MIN_BIN_PROBABILITY = tl.constexpr(_reference.MIN_BIN_PROBABILITY)
EDGE_THRESHOLD = tl.constexpr(_reference.EDGE_THRESHOLD)
U_EPS = tl.constexpr(_reference.U_EPS)
# Pixels per program: keeps a (BLOCK, K_PAD) float32 tile at 512 elements (4 per thread) in the
# NLL, its two tiles at up to 6 per thread (_mixture_tiles); in the sampler at most
# 128 pixels (a pixel's draw holds about a dozen values per channel: 2048 at K = 1 spilled
# 528 B on sm_90) and at most 2048 elements (128 at K_PAD = 64 spilled 1 KB).
_NLL_TILE_ELEMENTS = 512
_NLL_SPLIT_MAX_ELEMENTS = 6
_SAMPLE_BLOCK = 128
_SAMPLE_TILE_ELEMENTS = 2048
# Launch options of the kernels that draw: every product and sum rounded on its own, as in the
# PyTorch reference (no FMA contraction), so a value is binned exactly as the reference bins it
# (the value itself may still differ in its last bits: tl.exp and tl.log are the GPU's own).
DRAW_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# --------------------------------------------------------------------------- math helpers


@triton.jit
def _expm1_given_exp(v, exp_v):
    """``exp(v) - 1`` given ``exp_v = exp(v)``: a Taylor series to v**8/8! below |v| = 0.5 (truncation
    < 1e-8 relative), where the subtraction would cancel."""
    series = v * (1.0 + v * (0.5 + v * (0.16666666666666666 + v * (0.041666666666666664 + v * (
        0.008333333333333333 + v * (0.001388888888888889 + v * (1.984126984126984e-04 + v * 2.48015873015873e-05)))))))
    return tl.where(tl.abs(v) < 0.5, series, exp_v - 1.0)


@triton.jit
def _expm1(v):
    return _expm1_given_exp(v, exp_ftz(v))


# ln 2 in two parts: n · _LN2_HIGH is exact for |n| < 2^15 (_LN2_HIGH has 9 significant bits).
_LOG2_E = tl.constexpr(1.4426950408889634)
_LN2_HIGH = tl.constexpr(0.693359375)
_LN2_LOW = tl.constexpr(-2.1219444005469057e-04)


@triton.jit
def _exp_accurate(x):
    """exp(x) to about an ulp over float32's normal range, the same on a GPU and in the interpreter.

    On a GPU ``tl.exp(x)`` (and :func:`exp_ftz`) is ``ex2.approx(x · log2 e)``: rounding the product costs
    |x · log2 e| · 2^-24 relative (about 7 ulp at |x| = 7, the largest inverse scale's
    exponent), and ex2.approx up to 2^-22 more. Errors that large, in the inverse scale or in
    a colour coefficient's tanh (which moves the next channel's mean by its error times x),
    reach the gradient multiplied by up to e^7: the Triton gradient missed the float64
    reference by 18× the tolerance table on the H200 where float32 PyTorch missed it by 4×
    (2026-11-30). Here x = n · ln 2 + r with |r| <= ln 2 / 2 (Cody and Waite's reduction),
    e^r is its Taylor series to r^7 (truncation under 0.1 ulp; seven multiply-adds, no
    MUFU op) and 2^n is made exactly from its bits. Below -87 the result is 0 (subnormals
    flushed: an inverse scale under 2^-126 leaves m and h at 0 as well), above 88 inf; NaN
    stays NaN.
    """
    n = tl.floor(x * _LOG2_E + 0.5)
    r = (x - n * _LN2_HIGH) - n * _LN2_LOW
    exp_r = 1.0 + r * (1.0 + r * (0.5 + r * (0.16666666666666666 + r * (
        0.041666666666666664 + r * (0.008333333333333333 + r * (0.001388888888888889 + r * 1.984126984126984e-04))))))
    in_range = (x > -87.0) & (x < 88.0)
    two_to_n = ((tl.where(in_range, n, 0.0).to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x <= -87.0, 0.0, tl.where(x >= 88.0, float("inf"), exp_r * two_to_n))


@triton.jit
def _larger(a, b):
    # max(a, b), or b where either is NaN: the sums over the tiles then carry that NaN on.
    return tl.where(a > b, a, b)


@triton.jit
def _sign(v):
    return tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0))


@triton.jit
def _divide_accurately(a, b):
    """a / b for b > 0 (or +inf, NaN; 0 gives NaN) to within an ulp: the quotient by
    :func:`reciprocal_positive` (up to 6 ulp off) corrected by its residual, exact by FMA.
    tl.math.div_rn is exact, but calls a slow-path subroutine for hard operands (11 more
    registers in the NLL forward for sm_90); this stays straight-line code, a third of a
    ``div.full``'s instructions."""
    inverse = reciprocal_positive(b)
    quotient = a * inverse
    return quotient + tl.fma(-quotient, b, a) * inverse


@triton.jit
def _tanh_and_sech2(v):
    """tanh(v) and its derivative 1 - tanh(v)**2, both to float32 rounding: the CUDA kernel's
    form, (1 - e2) / (1 + e2) with e2 = exp(-2|v|), with an accurate exp and division (a
    coefficient's error is amplified: :func:`_exp_accurate`)."""
    minus_2v = -2.0 * tl.abs(v)
    e2 = _exp_accurate(minus_2v)
    one_plus = 1.0 + e2
    tanh = _sign(v) * _divide_accurately(-_expm1_given_exp(minus_2v, e2), one_plus)
    return tanh, 4.0 * e2 / (one_plus * one_plus)


@triton.jit
def _sub_pixel_terms(value, first_bin, last_bin, mean, raw_log_scale, half_bin, log_half_bins):
    """log P(bin) of one discretized logistic and its derivatives, on a (BLOCK, K_PAD) tile.

    Returns ``(log_prob, d log_prob / d mean, d log_prob / d raw_log_scale)`` where
    ``mean`` is the colour-adjusted mean and the log-scale derivative is the unclamped
    one (:func:`_through_clamp` applies the clamp to the gradient written). With
    ``m = (x - mean) / scale`` and ``h = half_bin / scale``, each branch gives
    ``d log_prob / dm`` and ``d log_prob / dh``; then ``d/dmean = -dm / scale`` and
    ``d/dlog_scale = -m * dm - h * dh`` (minus 1 more for the mid-point density).
    The interior branch uses ``P = sinh(h) / (cosh(m) + cosh(h))``, whose
    derivatives are ``dm = -sinh(m) / (cosh(m) + cosh(h))`` and
    ``dh = (1 + cosh(m) cosh(h)) / (sinh(h) (cosh(m) + cosh(h)))``, all scaled by
    ``exp(-max(|m|, h))`` so that nothing overflows.

    Each element takes one log, of its own branch's argument: ``tl.log`` is a software
    routine of ~25 instructions (``tl.exp`` one MUFU op), and five logs per element, one
    per branch, were 44% of the kernel's instructions. The edge bins and the mid-point
    density are ``softplus(v)`` at ``v = -(m + h)``, ``m - h`` and ``m``, which also
    share one ``exp(-|v|)``.
    """
    log_scale = tl.where(raw_log_scale < LOG_SCALE_MIN, LOG_SCALE_MIN, raw_log_scale)
    inv_scale = _exp_accurate(-log_scale)
    m = (value - mean) * inv_scale
    h = inv_scale * half_bin
    edge_bin = first_bin | last_bin
    # First bin: log sigmoid(m + h) = -softplus(v); last bin: log(1 - sigmoid(m - h)) = -softplus(v).
    v = tl.where(first_bin, -(m + h), tl.where(last_bin, m - h, m))
    exp_neg_abs_v = exp_ftz(-tl.abs(v))
    one_plus_exp = 1.0 + exp_neg_abs_v
    # Interior: P = sinh(h) / (cosh m + cosh h) = delta_ratio * e^(h - widest), scaled so nothing overflows.
    abs_m = tl.abs(m)
    widest = tl.where(abs_m > h, abs_m, h)
    p = exp_ftz(abs_m - widest)
    q = exp_ftz(-abs_m - widest)
    s = exp_ftz(-h - widest)
    scaled_exp_h = exp_ftz(h - widest)
    inv_scaled_sum = _divide_accurately(1.0, p + q + scaled_exp_h + s)
    one_minus_e2h = -_expm1(-2.0 * h)
    delta_ratio = one_minus_e2h * inv_scaled_sum
    # The reference's test log P > log(1e-5), on P itself (P underflows to 0 only far below 1e-5).
    use_delta = (delta_ratio * scaled_exp_h > MIN_BIN_PROBABILITY) & (edge_bin == 0)
    log_arg = tl.log(tl.where(use_delta, delta_ratio, one_plus_exp))
    softplus_v = tl.where(v > 0.0, v, 0.0) + log_arg  # NaN v: NaN through log_arg
    log_mid = m - log_scale - 2.0 * softplus_v - log_half_bins
    log_prob = tl.where(edge_bin, -softplus_v, tl.where(use_delta, log_arg + (h - widest), log_mid))

    # Edges: d/dm log sigmoid(m + h) = sigmoid(-(m + h)) = sigmoid(v), and -sigmoid(m - h) = -sigmoid(v).
    sigmoid_v = _divide_accurately(tl.where(v > 0.0, 1.0, exp_neg_abs_v), one_plus_exp)
    # Interior and mid-point (v = m there): 1 - e^-|m| without cancellation, and 1 - e^-2|m| from it.
    one_minus_em = -_expm1_given_exp(-abs_m, exp_neg_abs_v)
    sign_m = _sign(m)
    delta_dm = -sign_m * p * one_minus_em * one_plus_exp * inv_scaled_sum
    delta_dh = _divide_accurately(((p + q) * (2.0 - one_minus_e2h) + 4.0 * s) * inv_scaled_sum, one_minus_e2h)
    mid_dm = -sign_m * _divide_accurately(one_minus_em, one_plus_exp)  # -tanh(m / 2)
    dm = tl.where(first_bin, sigmoid_v, tl.where(last_bin, -sigmoid_v, tl.where(use_delta, delta_dm, mid_dm)))
    dh_term = tl.where(edge_bin, h * sigmoid_v, tl.where(use_delta, h * delta_dh, 1.0))  # h * dh, plus the mid-point density's direct -log_scale term
    d_mean = -dm * inv_scale
    d_log_scale = -m * dm - dh_term
    return log_prob, d_mean, d_log_scale


@triton.jit
def _through_clamp(grad, raw_log_scale):
    """A raw log-scale's gradient through the clamp at -7: at or above it, not below nor for NaN,
    as ``reference.clamp_log_scales``; 0 elsewhere, where a NaN posterior times 0 would leave NaN."""
    return tl.where(raw_log_scale >= LOG_SCALE_MIN, grad, 0.0)


@triton.jit
def _bin_centre(bins, last_bin):
    """The centre ``(2·bin - last_bin) / last_bin`` of float bins: exact integers over an IEEE
    division (``/`` is approximate on the GPU), correctly rounded as ``reference.bins_to_values``."""
    return tl.math.div_rn(2.0 * bins - last_bin, last_bin)


@triton.jit
def nearest_bin(value, last_bin):
    """The nearest bin ``floor((value + 1)·last_bin/2 + 0.5)`` of values in [-1, 1] as floats, halves up,
    clamped to [0, last_bin] (NaN: bin 0), as ``reference.to_bins``.

    Rounded as ``reference.to_bins`` rounds it only in kernels launched with :data:`DRAW_LAUNCH_OPTIONS`.
    """
    bins = tl.floor((value + 1.0) * (0.5 * last_bin) + 0.5)
    return tl.where(bins > 0.0, tl.where(bins < last_bin, bins, last_bin), 0.0)


# --------------------------------------------------------------------------- addressing helpers


@triton.jit
def _pixel_coords(pid, num_pixels, height, width, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """(pixel, b, h, w, mask) of the BLOCK pixels of program ``pid``: the flat pixel index and its
    coordinates (int64 when INDEX_64, from the pixel index on: the last program's padding lanes
    can pass 2**31 - 1)."""
    if INDEX_64:
        pid = pid.to(tl.int64)
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    mask = pix < num_pixels
    col = pix % width
    rest = pix // width
    row = rest % height
    batch = rest // height
    return pix, batch, row, col, mask


@triton.jit
def _channel_ptrs(base_ptr, pixel_offset, channel, channel_stride, INDEX_64: tl.constexpr):
    """Pointers to ``channel`` (a (K_PAD,) or (BLOCK, 1) index) of every pixel."""
    if INDEX_64:
        channel = channel.to(tl.int64)
    return base_ptr + pixel_offset + channel * channel_stride


@triton.jit
def _load_x(x_ptr, x_offset, channel, x_stride_c, pix_mask, last_bin_index, X_IS_INT: tl.constexpr):
    """x of one colour channel as (value, first_bin, last_bin), each (BLOCK, 1); ``last_bin_index`` = num_bins - 1 as a float."""
    raw = tl.load(x_ptr + x_offset + channel * x_stride_c, mask=pix_mask, other=0)
    if X_IS_INT:
        bins = raw.to(tl.float32)  # exact: bins < 2**24
        value = _bin_centre(bins, last_bin_index)
        first_bin = bins == 0.0
        last_bin = bins == last_bin_index
    else:
        value = raw.to(tl.float32)
        first_bin = value < -EDGE_THRESHOLD
        last_bin = value > EDGE_THRESHOLD
    return value[:, None], first_bin[:, None], last_bin[:, None]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mixture_terms(
    logits_ptr, l_offset, l_stride_p, num_mix, k, pix_mask,
    x0, first0, last0, x1, first1, last1, x2, first2, last2, half_bin, log_half_bins,
    CHANNELS: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """The mixture components ``k`` (a (K_TILE,) index) of every pixel: ``(mix_logits, log_probs, terms)``.

    ``mix_logits`` (BLOCK, K_TILE) is -inf for k >= num_mix, ``log_probs`` the components'
    log P(x), summed over channels, and ``terms`` what the gradient needs: (d_mean,
    d_raw_log_scale, raw_log_scale) of each channel, then for C = 3 each coefficient's tanh'.
    """
    k_mask = k < num_mix
    tile_mask = pix_mask[:, None] & k_mask[None, :]
    k = k[None, :]
    mix_logits = tl.load(_channel_ptrs(logits_ptr, l_offset, k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0)
    mix_logits = tl.where(k_mask[None, :], mix_logits.to(tl.float32), -float("inf"))
    mean0 = tl.load(_channel_ptrs(logits_ptr, l_offset, num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
    raw_ls0 = tl.load(_channel_ptrs(logits_ptr, l_offset, 2 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
    log_probs, d_mean0, d_ls0 = _sub_pixel_terms(x0, first0, last0, mean0, raw_ls0, half_bin, log_half_bins)
    if CHANNELS == 1:
        return mix_logits, log_probs, (d_mean0, d_ls0, raw_ls0)
    else:
        # Channel c's block starts at num_mix * (1 + 3c): K means, K log-scales, K coefficients.
        coef0, sech2_0 = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 3 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32))
        coef1, sech2_1 = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 6 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32))
        coef2, sech2_2 = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 9 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32))
        mean1 = tl.load(_channel_ptrs(logits_ptr, l_offset, 4 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
        raw_ls1 = tl.load(_channel_ptrs(logits_ptr, l_offset, 5 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
        mean2 = tl.load(_channel_ptrs(logits_ptr, l_offset, 7 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
        raw_ls2 = tl.load(_channel_ptrs(logits_ptr, l_offset, 8 * num_mix + k, l_stride_p, INDEX_64), mask=tile_mask, other=0.0).to(tl.float32)
        log_prob1, d_mean1, d_ls1 = _sub_pixel_terms(x1, first1, last1, mean1 + coef0 * x0, raw_ls1, half_bin, log_half_bins)
        log_prob2, d_mean2, d_ls2 = _sub_pixel_terms(x2, first2, last2, mean2 + coef1 * x0 + coef2 * x1, raw_ls2, half_bin, log_half_bins)
        terms = (d_mean0, d_ls0, raw_ls0, d_mean1, d_ls1, raw_ls1, d_mean2, d_ls2, raw_ls2, sech2_0, sech2_1, sech2_2)
        return mix_logits, log_probs + log_prob1 + log_prob2, terms


@triton.jit
def _store_mixture_grads(
    grad_logits_ptr, d_offset, d_stride_p, num_mix, k, pix_mask, grad, log_norm, log_total, mix_logits, log_probs, terms, x0, x1,
    CHANNELS: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Writes the logits' gradient of the components ``k``, given :func:`_mixture_terms`' values for them."""
    tile_mask = pix_mask[:, None] & (k < num_mix)[None, :]
    k = k[None, :]
    out_ty = grad_logits_ptr.dtype.element_ty
    # d NLL / d log_probs[k] = -posterior[k]; d NLL / d mix[k] = prior[k] - posterior[k].
    neg_posterior = -grad * exp_ftz(mix_logits + log_probs - log_total[:, None])
    prior = exp_ftz(mix_logits - log_norm[:, None])
    tl.store(_channel_ptrs(grad_logits_ptr, d_offset, k, d_stride_p, INDEX_64), (grad * prior + neg_posterior).to(out_ty), mask=tile_mask)
    tl.store(_channel_ptrs(grad_logits_ptr, d_offset, num_mix + k, d_stride_p, INDEX_64), (neg_posterior * terms[0]).to(out_ty), mask=tile_mask)
    tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 2 * num_mix + k, d_stride_p, INDEX_64), _through_clamp(neg_posterior * terms[1], terms[2]).to(out_ty), mask=tile_mask)
    if CHANNELS == 3:
        g_mean1 = neg_posterior * terms[3]
        g_mean2 = neg_posterior * terms[6]
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 3 * num_mix + k, d_stride_p, INDEX_64), (g_mean1 * x0 * terms[9]).to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 4 * num_mix + k, d_stride_p, INDEX_64), g_mean1.to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 5 * num_mix + k, d_stride_p, INDEX_64), _through_clamp(neg_posterior * terms[4], terms[5]).to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 6 * num_mix + k, d_stride_p, INDEX_64), (g_mean2 * x0 * terms[10]).to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 7 * num_mix + k, d_stride_p, INDEX_64), g_mean2.to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 8 * num_mix + k, d_stride_p, INDEX_64), _through_clamp(neg_posterior * terms[7], terms[8]).to(out_ty), mask=tile_mask)
        tl.store(_channel_ptrs(grad_logits_ptr, d_offset, 9 * num_mix + k, d_stride_p, INDEX_64), (g_mean2 * x1 * terms[11]).to(out_ty), mask=tile_mask)


@triton.jit
def _dmol_nll_kernel(
    x_ptr, logits_ptr, grad_nll_ptr, nll_ptr, grad_logits_ptr,
    num_pixels, height, width, num_mix,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    l_stride_b, l_stride_p, l_stride_h, l_stride_w,
    g_stride_b, g_stride_h, g_stride_w,
    d_stride_b, d_stride_p, d_stride_h, d_stride_w,
    half_bin, last_bin_index, log_half_bins,
    CHANNELS: tl.constexpr, X_IS_INT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, GRAD_OF_SUM: tl.constexpr,
    K_FIRST: tl.constexpr, K_REST: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    """Per-pixel DMOL NLL (COMPUTE_GRAD=False) or the logits' gradient (COMPUTE_GRAD=True).

    x: (B, C, H, W) float32, uint8 or int64 (X_IS_INT: bins), any strides.
    logits: (B, P, H, W) float32/float16/bfloat16, any strides, P = (1 + C*n) * num_mix.
    Forward writes nll: (B, H, W) float32 contiguous. Backward reads grad_nll
    (B, H, W) float32 (any strides, e.g. an expanded scalar) and writes
    grad_logits (B, P, H, W) in the logits dtype with its own strides; with GRAD_OF_SUM
    it reads no grad_nll (1 for every pixel: the gradient of the NLL's sum, bit for bit
    the backward's given ones) and writes nll as the forward does.
    The components are two tiles, K_FIRST of them and K_REST after (0: none), powers of two
    covering num_mix (see :func:`_mixture_tiles`).
    """
    pix, batch, row, col, pix_mask = _pixel_coords(tl.program_id(0), num_pixels, height, width, BLOCK, INDEX_64)
    x_offset = batch * x_stride_b + row * x_stride_h + col * x_stride_w
    l_offset = (batch * l_stride_b + row * l_stride_h + col * l_stride_w)[:, None]
    x0, first0, last0 = _load_x(x_ptr, x_offset, 0, x_stride_c, pix_mask, last_bin_index, X_IS_INT)
    x1, first1, last1 = x0, first0, last0
    x2, first2, last2 = x0, first0, last0
    if CHANNELS == 3:
        x1, first1, last1 = _load_x(x_ptr, x_offset, 1, x_stride_c, pix_mask, last_bin_index, X_IS_INT)
        x2, first2, last2 = _load_x(x_ptr, x_offset, 2, x_stride_c, pix_mask, last_bin_index, X_IS_INT)
    k_first = tl.arange(0, K_FIRST)
    mix_first, log_probs_first, terms_first = _mixture_terms(
        logits_ptr, l_offset, l_stride_p, num_mix, k_first, pix_mask, x0, first0, last0, x1, first1, last1, x2, first2, last2,
        half_bin, log_half_bins, CHANNELS, INDEX_64,
    )  # fmt: skip
    # NLL = logsumexp_k(mix) - logsumexp_k(mix + log_probs) over both tiles; padded components are -inf.
    mix_max = tl.max(mix_first, axis=1)
    joint_max = tl.max(mix_first + log_probs_first, axis=1)
    if K_REST > 0:
        k_rest = K_FIRST + tl.arange(0, K_REST)
        mix_rest, log_probs_rest, terms_rest = _mixture_terms(
            logits_ptr, l_offset, l_stride_p, num_mix, k_rest, pix_mask, x0, first0, last0, x1, first1, last1, x2, first2, last2,
            half_bin, log_half_bins, CHANNELS, INDEX_64,
        )  # fmt: skip
        mix_max = _larger(mix_max, tl.max(mix_rest, axis=1))
        joint_max = _larger(joint_max, tl.max(mix_rest + log_probs_rest, axis=1))
    mix_sum = tl.sum(exp_ftz(mix_first - mix_max[:, None]), axis=1)
    joint_sum = tl.sum(exp_ftz(mix_first + log_probs_first - joint_max[:, None]), axis=1)
    if K_REST > 0:
        mix_sum += tl.sum(exp_ftz(mix_rest - mix_max[:, None]), axis=1)
        joint_sum += tl.sum(exp_ftz(mix_rest + log_probs_rest - joint_max[:, None]), axis=1)
    log_norm = mix_max + tl.log(mix_sum)
    log_total = joint_max + tl.log(joint_sum)
    if not COMPUTE_GRAD:
        tl.store(nll_ptr + pix, log_norm - log_total, mask=pix_mask)
    else:
        if GRAD_OF_SUM:
            tl.store(nll_ptr + pix, log_norm - log_total, mask=pix_mask)
            grad = tl.full((BLOCK, 1), 1.0, tl.float32)
        else:
            grad = tl.load(grad_nll_ptr + batch * g_stride_b + row * g_stride_h + col * g_stride_w, mask=pix_mask, other=0.0)
            grad = grad.to(tl.float32)[:, None]
        d_offset = (batch * d_stride_b + row * d_stride_h + col * d_stride_w)[:, None]
        _store_mixture_grads(
            grad_logits_ptr, d_offset, d_stride_p, num_mix, k_first, pix_mask, grad, log_norm, log_total, mix_first, log_probs_first, terms_first,
            x0, x1, CHANNELS, INDEX_64,
        )  # fmt: skip
        if K_REST > 0:
            _store_mixture_grads(
                grad_logits_ptr, d_offset, d_stride_p, num_mix, k_rest, pix_mask, grad, log_norm, log_total, mix_rest, log_probs_rest, terms_rest,
                x0, x1, CHANNELS, INDEX_64,
            )  # fmt: skip


@triton.jit
def _clamp_noise(u):
    return tl.where(u < U_EPS, U_EPS, tl.where(u > 1.0 - U_EPS, 1.0 - U_EPS, u))


@triton.jit
def _logistic_draw(logits_ptr, l_offset, mean_channel, l_stride_p, num_mix, u, pix_mask, INDEX_64: tl.constexpr):
    """``mean + exp(max(log_scale, -7)) * (log(u) - log(1 - u))`` of the chosen components.

    ``mean_channel`` (BLOCK,) indexes each pixel's chosen mean; its log-scale is ``num_mix`` channels later.
    """
    mean = tl.load(_channel_ptrs(logits_ptr, l_offset, mean_channel, l_stride_p, INDEX_64), mask=pix_mask, other=0.0).to(tl.float32)
    raw_ls = tl.load(_channel_ptrs(logits_ptr, l_offset, mean_channel + num_mix, l_stride_p, INDEX_64), mask=pix_mask, other=0.0).to(tl.float32)
    log_scale = tl.where(raw_ls < LOG_SCALE_MIN, LOG_SCALE_MIN, raw_ls)
    u = _clamp_noise(u)
    return mean + exp_ftz(log_scale) * (tl.log(u) - tl.log(1.0 - u))


@triton.jit
def _finish_channel(value, last_bin, QUANTIZE: tl.constexpr):
    """Clamps to [-1, 1] (NaN-propagating) and, if QUANTIZE, rounds to the nearest bin centre (halves up; NaN: bin 0's, as ``reference.to_bins``)."""
    value = tl.where(value < -1.0, -1.0, tl.where(value > 1.0, 1.0, value))
    if QUANTIZE:
        value = _bin_centre(nearest_bin(value, last_bin), last_bin)
    return value


@triton.jit
def draw_pixels(
    logits_ptr, l_offset, l_stride_p, num_mix, u_mix_ptr, m_offset, m_stride_k, u_logistic_ptr, u_offset, u_stride_c, pix_mask,
    last_bin,
    CHANNELS: tl.constexpr, QUANTIZE: tl.constexpr, K_PAD: tl.constexpr, INDEX_64: tl.constexpr,
):
    """One draw per pixel of a (BLOCK,) block: (red, green, blue), green and blue red's when CHANNELS is 1.

    Pixel i's logits channel p at ``logits_ptr + l_offset[i] + p·l_stride_p``, its
    u_mix component k at ``u_mix_ptr + m_offset[i] + k·m_stride_k``, its u_logistic
    channel c at ``u_logistic_ptr + u_offset[i] + c·u_stride_c``. The component is
    ``argmax_k(logit_k - log(-log(u_mix_k)))`` (first index on ties); each channel is
    finished (:func:`_finish_channel`) before it conditions the next. For the sampler
    and cached sampling's draw step (:mod:`pixelcnn_kernels.triton.sampling`).
    """
    k = tl.arange(0, K_PAD)
    k_mask = k < num_mix
    tile_mask = pix_mask[:, None] & k_mask[None, :]
    mix_logits = tl.load(_channel_ptrs(logits_ptr, l_offset[:, None], k[None, :], l_stride_p, INDEX_64), mask=tile_mask, other=0.0)
    u_mix = _clamp_noise(tl.load(_channel_ptrs(u_mix_ptr, m_offset[:, None], k[None, :], m_stride_k, INDEX_64), mask=tile_mask, other=0.5))
    scores = mix_logits.to(tl.float32) - tl.log(-tl.log(u_mix))
    # The first NaN score wins, as in torch.argmax (even after a +inf); else the first maximum.
    # Padded lanes (k >= K) are neither NaN nor above -inf, so never picked.
    is_nan = ((scores != scores) & k_mask[None, :]).to(tl.int32)
    first_nan = tl.argmax(is_nan, axis=1)
    best = tl.argmax(tl.where(k_mask[None, :] & (is_nan == 0), scores, -float("inf")), axis=1)
    component = tl.where(tl.max(is_nan, axis=1) > 0, first_nan, best)

    u_red = tl.load(u_logistic_ptr + u_offset, mask=pix_mask, other=0.5)
    red = _logistic_draw(logits_ptr, l_offset, num_mix + component, l_stride_p, num_mix, u_red, pix_mask, INDEX_64)
    red = _finish_channel(red, last_bin, QUANTIZE)
    green = red
    blue = red
    if CHANNELS == 3:
        coef0, _ = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 3 * num_mix + component, l_stride_p, INDEX_64), mask=pix_mask, other=0.0).to(tl.float32))
        coef1, _ = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 6 * num_mix + component, l_stride_p, INDEX_64), mask=pix_mask, other=0.0).to(tl.float32))
        coef2, _ = _tanh_and_sech2(tl.load(_channel_ptrs(logits_ptr, l_offset, 9 * num_mix + component, l_stride_p, INDEX_64), mask=pix_mask, other=0.0).to(tl.float32))
        u_green = tl.load(u_logistic_ptr + u_offset + u_stride_c, mask=pix_mask, other=0.5)
        green = _logistic_draw(logits_ptr, l_offset, 4 * num_mix + component, l_stride_p, num_mix, u_green, pix_mask, INDEX_64)
        green = _finish_channel(green + coef0 * red, last_bin, QUANTIZE)
        u_blue = tl.load(u_logistic_ptr + u_offset + 2 * u_stride_c, mask=pix_mask, other=0.5)
        blue = _logistic_draw(logits_ptr, l_offset, 7 * num_mix + component, l_stride_p, num_mix, u_blue, pix_mask, INDEX_64)
        blue = _finish_channel(blue + coef1 * red + coef2 * green, last_bin, QUANTIZE)
    return red, green, blue


@triton.jit
def _dmol_sample_kernel(
    logits_ptr, u_mix_ptr, u_logistic_ptr, out_ptr,
    num_pixels, height, width, num_mix,
    l_stride_b, l_stride_p, l_stride_h, l_stride_w,
    m_stride_b, m_stride_k, m_stride_h, m_stride_w,
    u_stride_b, u_stride_c, u_stride_h, u_stride_w,
    o_stride_b, o_stride_c, o_stride_h, o_stride_w,
    last_bin,
    CHANNELS: tl.constexpr, QUANTIZE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    """One draw per pixel from the DMOL, given its uniform noise.

    logits: (B, P, H, W) float32/float16/bfloat16, any strides. u_mix: (B, K, H, W) and
    u_logistic: (B, C, H, W) float32, any strides. out: (B, C, H, W) float32.
    The component is ``argmax_k(logit_k - log(-log(u_mix_k)))`` (first index on ties).
    """
    _, batch, row, col, pix_mask = _pixel_coords(tl.program_id(0), num_pixels, height, width, BLOCK, INDEX_64)
    l_offset = batch * l_stride_b + row * l_stride_h + col * l_stride_w
    m_offset = batch * m_stride_b + row * m_stride_h + col * m_stride_w
    u_offset = batch * u_stride_b + row * u_stride_h + col * u_stride_w
    o_offset = batch * o_stride_b + row * o_stride_h + col * o_stride_w
    red, green, blue = draw_pixels(
        logits_ptr, l_offset, l_stride_p, num_mix, u_mix_ptr, m_offset, m_stride_k, u_logistic_ptr, u_offset, u_stride_c, pix_mask,
        last_bin, CHANNELS, QUANTIZE, K_PAD, INDEX_64,
    )  # fmt: skip
    tl.store(out_ptr + o_offset, red, mask=pix_mask)
    if CHANNELS == 3:
        tl.store(out_ptr + o_offset + o_stride_c, green, mask=pix_mask)
        tl.store(out_ptr + o_offset + 2 * o_stride_c, blue, mask=pix_mask)


# --------------------------------------------------------------------------- launchers


def _needs_int64(num_pixels: int, block: int, *tensors: torch.Tensor) -> bool:
    """True when an element offset of any tensor (views included) can reach 2**31, or the last
    program's pixel indices (padding lanes included) can pass 2**31 - 1, which expanded
    (stride-0) tensors allow with every offset below it."""
    return (
        cdiv(num_pixels, block) * block > 2**31 - 1
        or needs_int64_index(*tensors)
        or any(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 - 1 for t in tensors)
    )


def _padded_tile(num_mix: int) -> tuple[int, int, int]:
    """(K_FIRST, K_REST, BLOCK) of one tile of K = ``num_mix`` components padded to a power of two,
    _NLL_TILE_ELEMENTS per program."""
    padded = next_power_of_2(num_mix)
    return padded, 0, max(1, _NLL_TILE_ELEMENTS // padded)


def _mixture_tiles(num_mix: int, compute_grad: bool) -> tuple[int, int, int]:
    """(K_FIRST, K_REST, BLOCK) of the NLL kernel for K = ``num_mix`` components.

    A power-of-two tile and a second one for the rest (10 = 8 + 2: no padded component,
    37.5% of the work at K = 10 was padding), the second at least one element per thread
    (replicated lanes would be padding again), unless that holds more than
    _NLL_SPLIT_MAX_ELEMENTS per thread (K = 9 = 8 + 1 would need 9): then one padded tile of
    _NLL_TILE_ELEMENTS. The gradient pass takes the same tiles at twice the warps (its rest
    tile then spans half the lanes, the other half repeating it). Over twice the pixels, as
    many elements per thread as the forward, they were 1.78× faster than one padded tile on the
    H200 (B = 256, K = 10, 2026-11-30: 0.237 against 0.422 ms, fp32; tile_choices.py), but with
    the accurate exp and divisions that spills on sm_90 (255 registers and 104 B with Triton
    3.6, fp32); these take 210 registers (3.6; 199 with 3.8), the padded tile 160: one
    program of 8 warps per SM either way.
    """
    single = _padded_tile(num_mix)
    padded = single[0]
    first = padded if padded == num_mix else padded // 2
    if first == num_mix:
        return single
    rest = next_power_of_2(num_mix - first)
    threads = 32 * _nll_warps(compute_grad=False)
    fitting = _NLL_TILE_ELEMENTS // (first + rest)
    block = max(1 << (fitting.bit_length() - 1), threads // rest)  # powers of two
    if block * (first + rest) > _NLL_SPLIT_MAX_ELEMENTS * threads:
        return single
    return first, rest, block


def _sample_block(k_pad: int) -> int:
    return max(1, min(_SAMPLE_BLOCK, _SAMPLE_TILE_ELEMENTS // k_pad))


def _nll_warps(compute_grad: bool) -> int:
    """Four warps; eight for the backward, whose gradient terms per tile take 195 registers (fp32)
    and 253 (bf16, 64-bit indices) at 4 warps on sm_90, 97 and 149 at 8."""
    return 8 if compute_grad else 4


def _launch_nll(x, logits, num_bins, nll, grad_nll, grad_logits, compute_grad: bool, grad_of_sum: bool = False) -> None:
    batch, num_logit_channels, height, width = logits.shape
    channels = x.shape[1]
    num_mix = _reference.num_mixtures(num_logit_channels, channels)
    k_first, k_rest, block = _mixture_tiles(num_mix, compute_grad)
    num_pixels = batch * height * width
    with launch_device(logits):
        _dmol_nll_kernel[(cdiv(num_pixels, block),)](
            x, logits, grad_nll, nll, grad_logits,
            num_pixels, height, width, num_mix,
            *x.stride(), *logits.stride(), *grad_nll.stride(), *grad_logits.stride(),
            1.0 / (num_bins - 1), float(num_bins - 1), math.log((num_bins - 1) / 2),
            CHANNELS=channels, X_IS_INT=not x.dtype.is_floating_point, COMPUTE_GRAD=compute_grad, GRAD_OF_SUM=grad_of_sum,
            K_FIRST=k_first, K_REST=k_rest, BLOCK=block, INDEX_64=_needs_int64(num_pixels, block, x, logits, grad_logits, grad_nll),
            num_warps=_nll_warps(compute_grad),
        )


def nll_forward(x: torch.Tensor, logits: torch.Tensor, num_bins: int, nll: torch.Tensor) -> None:
    """Writes the per-pixel NLL into ``nll`` ((B, H, W) float32 contiguous).

    x: (B, C, H, W) float32, uint8 or int64; logits: (B, P, H, W) float32/float16/bfloat16; any strides.
    """
    # The gradient pointers are unused without COMPUTE_GRAD; nll/logits stand in for them.
    _launch_nll(x, logits, num_bins, nll, nll, logits, compute_grad=False)


def nll_backward(x: torch.Tensor, logits: torch.Tensor, grad_nll: torch.Tensor, num_bins: int, grad_logits: torch.Tensor) -> None:
    """Writes d(sum(grad_nll * nll))/d logits into ``grad_logits`` (logits' shape and dtype, any strides).

    grad_nll: (B, H, W) float32, any strides (an expanded scalar works).
    """
    _launch_nll(x, logits, num_bins, grad_nll, grad_nll, grad_logits, compute_grad=True)


def nll_with_grad_of_sum(x: torch.Tensor, logits: torch.Tensor, num_bins: int, nll: torch.Tensor, grad_logits: torch.Tensor) -> None:
    """Writes the per-pixel NLL into ``nll`` and d(sum(nll))/d logits into ``grad_logits`` in one pass.

    Shapes, dtypes and strides as :func:`nll_forward` and :func:`nll_backward`.
    """
    # grad_nll is not read with GRAD_OF_SUM; nll stands in for it.
    _launch_nll(x, logits, num_bins, nll, nll, grad_logits, compute_grad=True, grad_of_sum=True)


def sample(logits: torch.Tensor, u_mix: torch.Tensor, u_logistic: torch.Tensor, num_bins: int, quantize: bool, out: torch.Tensor) -> None:
    """Writes one draw per pixel into ``out`` ((B, C, H, W) float32); see :func:`_dmol_sample_kernel`."""
    batch, num_logit_channels, height, width = logits.shape
    channels = u_logistic.shape[1]
    num_pixels = batch * height * width
    with launch_device(logits):
        k_pad = next_power_of_2(u_mix.shape[1])
        block = _sample_block(k_pad)
        _dmol_sample_kernel[(cdiv(num_pixels, block),)](
            logits, u_mix, u_logistic, out,
            num_pixels, height, width, _reference.num_mixtures(num_logit_channels, channels),
            *logits.stride(), *u_mix.stride(), *u_logistic.stride(), *out.stride(),
            float(num_bins - 1),
            CHANNELS=channels, QUANTIZE=quantize, K_PAD=k_pad, BLOCK=block,
            INDEX_64=_needs_int64(num_pixels, block, logits, u_mix, u_logistic, out), **DRAW_LAUNCH_OPTIONS,
        )


# --------------------------------------------------------------------------- sm_90 compile cases


def _signature(names: str, types: dict[str, str], default: str) -> dict[str, str]:
    return {name: types.get(name, default) for name in names.split()}


_NLL_ARGS = (
    "x_ptr logits_ptr grad_nll_ptr nll_ptr grad_logits_ptr num_pixels height width num_mix "
    "x_stride_b x_stride_c x_stride_h x_stride_w l_stride_b l_stride_p l_stride_h l_stride_w "
    "g_stride_b g_stride_h g_stride_w d_stride_b d_stride_p d_stride_h d_stride_w "
    "half_bin last_bin_index log_half_bins"
)
_SAMPLE_ARGS = (
    "logits_ptr u_mix_ptr u_logistic_ptr out_ptr num_pixels height width num_mix "
    "l_stride_b l_stride_p l_stride_h l_stride_w m_stride_b m_stride_k m_stride_h m_stride_w "
    "u_stride_b u_stride_c u_stride_h u_stride_w o_stride_b o_stride_c o_stride_h o_stride_w "
    "last_bin"
)
_FLOAT_ARGS = ("half_bin", "last_bin_index", "log_half_bins", "last_bin")


def _as_launched(num_mix: int) -> dict:
    """K = 1 reaches a launch as an int argument equal to 1, which Triton specialises to a constant."""
    return {"num_mix": 1} if num_mix == 1 else {}

for _channels, _x_dtype, _logits_dtype, _pass, _num_mix, _index_64 in (
    (3, torch.float32, torch.float32, "forward", 10, False),  # two tiles, 8 + 2
    (3, torch.float32, torch.float32, "backward", 10, False),
    (3, torch.float32, torch.float32, "grad_of_sum", 10, False),  # the NLL and its gradient in one pass
    (3, torch.uint8, torch.bfloat16, "backward", 10, True),
    (3, torch.uint8, torch.bfloat16, "grad_of_sum", 10, False),
    (1, torch.int64, torch.float16, "forward", 5, False),  # 4 + 1
    (3, torch.uint8, torch.bfloat16, "forward", 9, False),  # 8 + 1 would hold 9 per thread: padded to 16
    (1, torch.uint8, torch.bfloat16, "backward", 3, False),
    (3, torch.uint8, torch.float16, "backward", 1, False),  # K = 1 (512 pixels per program) and K = 64
    (3, torch.uint8, torch.float32, "backward", 64, False),
):
    _grad = _pass != "forward"
    _types = {name: "fp32" for name in _FLOAT_ARGS}
    _types.update(x_ptr=pointer_type(_x_dtype), logits_ptr=pointer_type(_logits_dtype), grad_logits_ptr=pointer_type(_logits_dtype))
    _k_first, _k_rest, _block = _mixture_tiles(_num_mix, _grad)
    register_compile_case(
        f"dmol_nll_{_pass}_c{_channels}_{str(_logits_dtype).removeprefix('torch.')}_x{str(_x_dtype).removeprefix('torch.')}"
        f"_k{_num_mix}{'_int64' if _index_64 else ''}",
        _dmol_nll_kernel,
        _signature(_NLL_ARGS, _types, "i32") | {"grad_nll_ptr": "*fp32", "nll_ptr": "*fp32"},
        dict(CHANNELS=_channels, X_IS_INT=not _x_dtype.is_floating_point, COMPUTE_GRAD=_grad, GRAD_OF_SUM=_pass == "grad_of_sum",
             K_FIRST=_k_first, K_REST=_k_rest, BLOCK=_block, INDEX_64=_index_64, **_as_launched(_num_mix)),
        num_warps=_nll_warps(_grad),
        divisible_ints=False,  # K = 10 mixtures, P = 100 logits
        # K = 1's gradient pass (512 pixels a program): Triton 3.8's ptxas holds it to 128 registers,
        # two programs per SM, for 4 spilled bytes (Triton 3.6: 141 registers, none).
        max_spill_bytes=4 if _grad and _num_mix == 1 else 0,
    )

for _channels, _logits_dtype, _quantize, _k_pad in (
    (3, torch.float32, True, 16),
    (1, torch.bfloat16, False, 16),
    (3, torch.float16, True, 1),
    (3, torch.float32, True, 64),
):
    _types = {name: "fp32" for name in _FLOAT_ARGS}
    _types.update(logits_ptr=pointer_type(_logits_dtype), u_mix_ptr="*fp32", u_logistic_ptr="*fp32", out_ptr="*fp32")
    register_compile_case(
        f"dmol_sample_c{_channels}_{str(_logits_dtype).removeprefix('torch.')}_k{_k_pad}{'_quantize' if _quantize else ''}",
        _dmol_sample_kernel,
        _signature(_SAMPLE_ARGS, _types, "i32"),
        dict(CHANNELS=_channels, QUANTIZE=_quantize, K_PAD=_k_pad, BLOCK=_sample_block(_k_pad), INDEX_64=False, **_as_launched(_k_pad)),
        divisible_ints=False,
        launch_options=DRAW_LAUNCH_OPTIONS,
    )
