"""Triton kernels of cached sampling's per-pixel steps (kernels, then launchers).

Gated PixelCNN's layer step: one launch computes one pixel of one horizontal-stack layer for a batch of images
(:mod:`pixelcnn_kernels.ops.sampling` states the math and validates the arguments;
``csrc/sampling.cu`` is the CUDA twin). Layout, shared with the CUDA kernel:

- ``pixel``: int64 (1,), the flat index ``p = i·W + j`` of the pixel, read on the
  device so that the same launch serves every pixel (one CUDA graph replays it);
- ``x``, ``out``: (B, H, W, C) views with any strides (a row buffer is expanded over
  H with stride 0); the taps read ``x[b, i, j + dx_t, :]``, zero outside the image;
- ``wp``: (T, Cin, Npre) packed taps (:func:`~pixelcnn_kernels.ops.masked_conv.pack_weight`),
  ``OFFSETS`` the taps' dx;
- gated layers: ``v_pre`` (B, W, 2C) the vertical pre-activation row, the 1×1 link
  ``wv`` (2C, 2C) and output conv ``w1`` (C, C) laid out (in, out), ``cond`` (B, 2C)
  contiguous; gated channel n pairs pre-activation columns ``a(n) = n + (n // G)·G``
  and ``min(a(n) + G, n + C)`` (G = ``group_size``: ⌈C / colour groups⌉, the last group
  the rest; :func:`~pixelcnn_kernels.triton.gates.colour_group_halves`).

A program takes BLOCK_B images and every channel: the gate needs both halves and the
1×1 needs every gated channel, so the channel dimension is never split. Products use
``tl.dot`` in full fp32 ("ieee"): the step is a handful of tiny matrix products bound
by latency, not by arithmetic, and full precision keeps it close to the PyTorch step.
Loads are converted to fp32 at once; the result is rounded once, on store.

The other kernels state their own layouts: PixelCNN++'s block step
(:func:`_resnet_step_kernel`), the softmax head's draw (:func:`_softmax_draw_kernel`:
a program per image holds every bin's logit, as the softmax needs them all, and draws
in float64 as the PyTorch draw does) and the DMOL head's (:func:`_dmol_draw_kernel`,
the DMOL sampler's draw at one pixel of BLOCK_B images).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixelcnn_kernels.triton.dmol import DRAW_LAUNCH_OPTIONS, draw_pixels, nearest_bin
from pixelcnn_kernels.triton.gates import colour_group_halves, concat_elu_math, gate_sigmoid_math, gate_tanh_sigmoid_math
from pixelcnn_kernels.triton.utils import cdiv, launch_device, next_power_of_2, pointer_type, register_compile_case


@triton.jit
def _dot_columns(acc, tile, w_rows, cols, w_ok):
    """``acc + tile · w[:, cols]`` in full fp32; ``w_rows`` points at the rows of w the tile's columns multiply."""
    w_tile = tl.load(w_rows + cols[None, :], mask=w_ok, other=0.0).to(tl.float32)
    return tl.dot(tile, w_tile, acc, input_precision="ieee")


@triton.jit
def _add_products(
    acc_a, acc_b, in_rows, in_stride, in_ok, K, w_ptr, n_pre, cols_a, cols_b, n_ok, neg_rows, BLOCK_K: tl.constexpr, PAIR: tl.constexpr, CONCAT_ELU: tl.constexpr
):
    """``acc_a += in · w[:, cols_a]`` (and ``acc_b += in · w[:, cols_b]`` if PAIR) over K inputs, BLOCK_K at a time.

    ``in_rows`` (BLOCK_B, 1) points at each image's K inputs, ``in_stride`` apart (zero
    where not ``in_ok``); ``w`` is (K, n_pre) row-major. CONCAT_ELU: the inputs are
    ``concat_elu(in)``, computed as loaded: input k's ``elu(in_k)`` multiplies row k of
    w and its ``elu(-in_k)`` row ``neg_rows + k`` (a zero input is zero in both halves).
    """
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        tile = tl.load(in_rows + k[None, :] * in_stride, mask=in_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w_rows = w_ptr + k[:, None] * n_pre
        w_ok = k_ok[:, None] & n_ok[None, :]
        if CONCAT_ELU:
            # Rounded to the input's dtype, as the full forward's concat_elu gives it.
            tile, neg = concat_elu_math(tile)
            tile = tile.to(in_rows.dtype.element_ty).to(tl.float32)
            neg = neg.to(in_rows.dtype.element_ty).to(tl.float32)
        acc_a = _dot_columns(acc_a, tile, w_rows, cols_a, w_ok)
        if PAIR:
            acc_b = _dot_columns(acc_b, tile, w_rows, cols_b, w_ok)
        if CONCAT_ELU:
            w_neg = w_rows + neg_rows * n_pre
            acc_a = _dot_columns(acc_a, neg, w_neg, cols_a, w_ok)
            if PAIR:
                acc_b = _dot_columns(acc_b, neg, w_neg, cols_b, w_ok)
    return acc_a, acc_b


@triton.jit
def _pixel_step_kernel(
    pixel_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    v_ptr,
    wv_ptr,
    bias_v_ptr,
    cond_ptr,
    w1_ptr,
    bias1_ptr,
    out_ptr,
    B,
    H,
    W,
    C_IN,
    C_OUT,
    group_size,
    stride_xb,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_vb,
    stride_vw,
    stride_vc,
    stride_ob,
    stride_oh,
    stride_ow,
    stride_oc,
    OFFSETS: tl.constexpr,
    GATED: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """out[b, i, j, :] at the pixel p = i·W + j for images b of this program.

    GATED False: ``out = bias + Σ_t x[b, i, j + dx_t, :] · wp[t]`` (C_OUT columns).
    GATED True: ``pre = that (2·C_OUT columns) + v_pre[b, j] · wv + bias_v + cond[b]``,
    ``out = x[b, i, j] + tanh(pre_a)·σ(pre_b) · w1 + bias1``, the halves in colour groups
    of group_size channels (ONE_GROUP: group_size == C_OUT, the halves [a | b]). Pointers
    given as None are absent. A pixel index outside [0, H·W) writes nothing.
    """
    p = tl.load(pixel_ptr)
    row = p // W
    col = p - row * W
    images = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: images·stride_xb can pass 2^31
    image_ok = (images < B) & (p >= 0) & (p < H * W)
    n = tl.arange(0, BLOCK_C)
    n_ok = n < C_OUT
    if GATED and ONE_GROUP:  # group_size == C_OUT, as the grey models' layers (and fewer registers)
        n_pre = 2 * C_OUT
        cols_a = n
        cols_b = n + C_OUT
    elif GATED:
        n_pre = 2 * C_OUT
        cols_a, cols_b = colour_group_halves(n, C_OUT, group_size)
    else:
        n_pre = C_OUT
        cols_a = n
        cols_b = n  # the plain step has no b half
    x_row = x_ptr + images[:, None] * stride_xb + row * stride_xh

    acc_a = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(len(OFFSETS)):
        src_col = col + OFFSETS[tap]
        # Zero padding: a tap left (or right) of the image reads nothing.
        src_ok = image_ok & (src_col >= 0) & (src_col < W)
        w_tap = w_ptr + tap * C_IN * n_pre
        acc_a, acc_b = _add_products(acc_a, acc_b, x_row + src_col * stride_xw, stride_xc, src_ok, C_IN, w_tap, n_pre, cols_a, cols_b, n_ok, 0, BLOCK_K, GATED, False)
    if bias_ptr is not None:
        acc_a += tl.load(bias_ptr + cols_a, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_b += tl.load(bias_ptr + cols_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    if GATED:
        # The 1×1 link from the vertical stack's pre-activation at column j.
        v_col = v_ptr + images[:, None] * stride_vb + col * stride_vw
        acc_a, acc_b = _add_products(acc_a, acc_b, v_col, stride_vc, image_ok, n_pre, wv_ptr, n_pre, cols_a, cols_b, n_ok, 0, BLOCK_K, True, False)
        if bias_v_ptr is not None:
            acc_a += tl.load(bias_v_ptr + cols_a, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_b += tl.load(bias_v_ptr + cols_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if cond_ptr is not None:
            cond_rows = cond_ptr + images[:, None] * n_pre
            cond_ok = image_ok[:, None] & n_ok[None, :]
            acc_a += tl.load(cond_rows + cols_a[None, :], mask=cond_ok, other=0.0).to(tl.float32)
            acc_b += tl.load(cond_rows + cols_b[None, :], mask=cond_ok, other=0.0).to(tl.float32)
        # Padded channels hold tanh(0)·σ(0) = 0, and their rows of w1 are masked to 0 as well.
        gated = gate_tanh_sigmoid_math(acc_a, acc_b)
        # The output 1×1 and the residual, a column block at a time (bounds the registers of w1's tile);
        # a runtime loop: unrolled over 512 channels the kernel took minutes to compile.
        for o0 in range(0, C_OUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_ok = o < C_OUT
            result = _dot_columns(tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32), gated, w1_ptr + n[:, None] * C_OUT, o, n_ok[:, None] & o_ok[None, :])
            if bias1_ptr is not None:
                result += tl.load(bias1_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            store_ok = image_ok[:, None] & o_ok[None, :]
            result += tl.load(x_row + col * stride_xw + o[None, :] * stride_xc, mask=store_ok, other=0.0).to(tl.float32)
            out = out_ptr + images[:, None] * stride_ob + row * stride_oh + col * stride_ow + o[None, :] * stride_oc
            tl.store(out, result.to(out_ptr.dtype.element_ty), mask=store_ok)
    else:
        out = out_ptr + images[:, None] * stride_ob + row * stride_oh + col * stride_ow + n[None, :] * stride_oc
        tl.store(out, acc_a.to(out_ptr.dtype.element_ty), mask=image_ok[:, None] & n_ok[None, :])


@triton.jit
def _add_skip_products(acc, skip_ptr, pixel_offset, image_base, image_ok, C, w_ptr, n, n_ok, neg_rows, BLOCK_K: tl.constexpr):
    """``acc += concat_elu(skip[b, pixel]) · w`` (C rows for elu(skip), C at ``neg_rows`` for elu(-skip)); no-op for an absent skip."""
    if skip_ptr is not None:
        acc, _ = _add_products(acc, acc, skip_ptr + image_base + pixel_offset, 1, image_ok, C, w_ptr, C, n, n, n_ok, neg_rows, BLOCK_K, False, True)
    return acc


@triton.jit(do_not_specialize=("STEPS", "SLOTS"))
def _resnet_step_kernel(
    x_ptr,
    inner_ptr,
    skip0_ptr,
    skip1_ptr,
    out_ptr,
    w_in_ptr,
    bias_in_ptr,
    w_skip_ptr,
    bias_skip_ptr,
    w_out_ptr,
    bias_out_ptr,
    cond_ptr,
    pixel_ptr,
    table_ptr,
    STEPS,
    SLOTS,
    KH,
    KW,
    TOP,
    LEFT,
    B,
    HP,
    WP,
    C,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A gated resnet block at the positions the table gives the step p in ``pixel``, for the images b of this program.

    ``table`` (STEPS, SLOTS, 3) int32: slot s of step p is a position (row, col) and its
    ``new_taps``, or a row of -1 (nothing); the slots run in order. An entry outside
    the image, a ``new_taps`` bit whose pixel is outside it, or p outside [0, STEPS) does
    nothing, so no table reaches past the caches. A slot reads the inner values earlier
    slots stored (each slot's stores are followed by a barrier).

    Caches are (B, HP, WP, C) contiguous with a zero ring: pixel (i, j) at [i + 1, j + 1].
    Both convs have every tap of a KH×KW kernel anchored at (TOP, LEFT): tap
    t = ty·KW + tx reads pixel (row + ty - TOP, col + tx - LEFT). First, for each tap t
    whose bit is set in ``new_taps``, the inner value at its pixel q::

        inner[b, q] = bias_in + Σ_t' concat_elu(x[b, q + off_t']) · w_in[t']
                      (+ bias_skip + concat_elu(cat(skip0, skip1)[b, q]) · w_skip)

    then, after a barrier (other threads of the program read what these stored)::

        a | g = bias_out + cond[b] + Σ_t concat_elu(inner[b, (row, col) + off_t]) · w_out[t]
        out[b, row, col] = x[b, row, col] + a·σ(g)

    The tap loops are runtime loops: unrolled, the kernel took minutes to compile.
    """
    images = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    image_base = (images.to(tl.int64) * HP * WP * C)[:, None]
    n = tl.arange(0, BLOCK_C)
    n_ok = n < C
    # Rows of w_skip: elu(skip0), elu(skip1), then elu(-skip0), elu(-skip1).
    skip_rows = C if skip1_ptr is None else 2 * C
    taps = KH * KW
    step = tl.load(pixel_ptr)
    step_ok = (step >= 0) & (step < STEPS)
    step = tl.where(step_ok, step, 0)

    for slot in range(SLOTS):
        entry = table_ptr + (step * SLOTS + slot) * 3
        row = tl.load(entry)
        col = tl.load(entry + 1)
        position_ok = step_ok & (row >= 0) & (row < HP - 2) & (col >= 0) & (col < WP - 2)
        new_taps = tl.load(entry + 2)
        if position_ok:  # uniform over the program: the barriers inside are safe
            image_ok = images < B
            store_ok = image_ok[:, None] & n_ok[None, :]
            for tap in range(taps):
                if (new_taps >> tap) & 1:
                    q_row = row + 1 + tap // KW - TOP
                    q_col = col + 1 + tap % KW - LEFT
                    q_ok = image_ok & (q_row >= 1) & (q_row < HP - 1) & (q_col >= 1) & (q_col < WP - 1)
                    c = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
                    for src in range(taps):
                        src_offset = ((q_row + src // KW - TOP) * WP + q_col + src % KW - LEFT) * C
                        c, _ = _add_products(c, c, x_ptr + image_base + src_offset, 1, q_ok, C, w_in_ptr + src * 2 * C * C, C, n, n, n_ok, C, BLOCK_K, False, True)
                    if bias_in_ptr is not None:
                        c += tl.load(bias_in_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    if w_skip_ptr is not None:
                        q_offset = (q_row * WP + q_col) * C
                        c = _add_skip_products(c, skip0_ptr, q_offset, image_base, q_ok, C, w_skip_ptr, n, n_ok, skip_rows, BLOCK_K)
                        c = _add_skip_products(c, skip1_ptr, q_offset, image_base, q_ok, C, w_skip_ptr + C * C, n, n_ok, skip_rows, BLOCK_K)
                        if bias_skip_ptr is not None:
                            c += tl.load(bias_skip_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    tl.store(inner_ptr + image_base + (q_row * WP + q_col) * C + n[None, :], c.to(inner_ptr.dtype.element_ty), mask=q_ok[:, None] & n_ok[None, :])
            tl.debug_barrier()

            acc_a = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
            acc_b = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
            for tap in range(taps):
                tap_offset = ((row + 1 + tap // KW - TOP) * WP + col + 1 + tap % KW - LEFT) * C
                w_tap = w_out_ptr + tap * 4 * C * C
                acc_a, acc_b = _add_products(acc_a, acc_b, inner_ptr + image_base + tap_offset, 1, image_ok, C, w_tap, 2 * C, n, n + C, n_ok, C, BLOCK_K, True, True)
            if bias_out_ptr is not None:
                acc_a += tl.load(bias_out_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                acc_b += tl.load(bias_out_ptr + C + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if cond_ptr is not None:
                cond_rows = cond_ptr + images[:, None] * 2 * C
                acc_a += tl.load(cond_rows + n[None, :], mask=store_ok, other=0.0).to(tl.float32)
                acc_b += tl.load(cond_rows + C + n[None, :], mask=store_ok, other=0.0).to(tl.float32)
            pixel_offset = ((row + 1) * WP + col + 1) * C + n[None, :]
            result = tl.load(x_ptr + image_base + pixel_offset, mask=store_ok, other=0.0).to(tl.float32) + gate_sigmoid_math(acc_a, acc_b)
            tl.store(out_ptr + image_base + pixel_offset, result.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _softmax_draw_kernel(
    pixel_ptr,
    h_ptr,
    w_ptr,
    bias_ptr,
    bin_inputs_ptr,
    noise_ptr,
    known_ptr,
    images_ptr,
    inputs_ptr,
    HIDDEN,
    NUM_BINS,
    CHANNELS,
    HW,
    channel,
    BLOCK_BINS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Channel ``channel`` of image ``program_id`` at the pixel p: the softmax head's draw, written to the images and inputs.

    ``h`` (B, HIDDEN) the last horizontal stack at the pixel; ``w`` (HIDDEN,
    CHANNELS·NUM_BINS) the head's 1×1 laid out (in, out), ``bias`` (CHANNELS·NUM_BINS,)
    or None; ``bin_inputs`` (NUM_BINS,) the network input of each bin; ``noise``
    (B, CHANNELS, HW) float32, ``known`` (B, HW) bool, ``images`` (B, CHANNELS, HW)
    int64, ``inputs`` (B, CHANNELS, HW): all contiguous. As the PyTorch head and draw::

        logits = elu(h) · w[:, channel·NUM_BINS:][:, :NUM_BINS] + bias   (elu and logits rounded to h's dtype)
        value  = the first k with CDF(k) > u·CDF(NUM_BINS - 1), CDF the float64 cumulative softmax of logits
        images[b, channel, p] = value unless known[b, p]; inputs[b, channel, p] = bin_inputs[images[b, channel, p]]

    A pixel index outside [0, HW) writes nothing.
    """
    image = tl.program_id(0).to(tl.int64)
    p = tl.load(pixel_ptr)
    pixel_ok = (p >= 0) & (p < HW)
    bins = tl.arange(0, BLOCK_BINS)
    bin_ok = bins < NUM_BINS
    w_columns = w_ptr + channel * NUM_BINS + bins[None, :]
    acc = tl.zeros((BLOCK_BINS,), dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        h = tl.load(h_ptr + image * HIDDEN + k, mask=k_ok, other=0.0).to(tl.float32)
        elu_h, _ = concat_elu_math(h)
        # Rounded to h's dtype, as F.elu's output is before the PyTorch head's 1×1.
        elu_h = elu_h.to(h_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_columns + k[:, None] * (CHANNELS * NUM_BINS), mask=k_ok[:, None] & bin_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * elu_h[:, None], axis=0)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + channel * NUM_BINS + bins, mask=bin_ok, other=0.0).to(tl.float32)
    logits = tl.where(bin_ok, acc.to(h_ptr.dtype.element_ty).to(tl.float64), float("-inf"))
    # The CDF unnormalised: u is scaled by its last entry, as the PyTorch draw scales it. A
    # non-finite logit (NaN, +inf, or all -inf) makes that entry NaN: no bin passes, bin 0 is drawn.
    cdf = tl.cumsum(tl.where(bin_ok, tl.exp(logits - tl.max(logits, axis=0)), 0.0), axis=0)
    total = tl.sum(tl.where(bins == NUM_BINS - 1, cdf, 0.0), axis=0)
    value_offset = (image * CHANNELS + channel) * HW + p
    threshold = tl.load(noise_ptr + value_offset, mask=pixel_ok, other=0.0).to(tl.float64) * total
    drawn = tl.minimum(tl.sum(tl.where(bin_ok & (cdf <= threshold), 1, 0), axis=0), NUM_BINS - 1).to(tl.int64)
    known = tl.load(known_ptr + image * HW + p, mask=pixel_ok, other=0) != 0
    _write_value(drawn, known, images_ptr + value_offset, inputs_ptr + value_offset, bin_inputs_ptr, NUM_BINS, pixel_ok, pixel_ok)


@triton.jit
def _write_value(drawn, known, image_ptrs, input_ptrs, bin_inputs_ptr, NUM_BINS, ok, input_ok):
    """A draw's writes: where ``ok`` the image's value becomes ``drawn`` unless ``known``; where ``input_ok`` the network input, its bin's."""
    value = tl.where(known, tl.load(image_ptrs, mask=ok, other=0), drawn)
    tl.store(image_ptrs, value, mask=ok)
    # Clamped only for the lookup: a known value is in range (the sampler checks its prefix).
    tl.store(input_ptrs, tl.load(bin_inputs_ptr + tl.minimum(tl.maximum(value, 0), NUM_BINS - 1), mask=input_ok), mask=input_ok)


@triton.jit
def _dmol_draw_kernel(
    pixel_ptr,
    logits_ptr,
    u_mix_ptr,
    u_logistic_ptr,
    known_ptr,
    images_ptr,
    inputs_ptr,
    input_index_ptr,
    bin_inputs_ptr,
    B,
    P,
    NUM_MIX,
    HW,
    N,
    NUM_BINS,
    stride_ib,
    stride_ic,
    stride_in,
    last_bin,
    CHANNELS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """The DMOL draw at the pixel p for the BLOCK_B images of this program, written to the images and inputs.

    ``logits`` (B, P), ``u_mix`` (B, NUM_MIX, HW), ``u_logistic`` and ``images``
    (B, CHANNELS, HW) int64, ``known`` (B, HW): contiguous; ``inputs`` (B, CHANNELS, N)
    through its strides, at position ``input_index[p]`` (None: p; outside [0, N): no write). The draw is the
    sampler's (:func:`~pixelcnn_kernels.triton.dmol.draw_pixels`, quantized); each
    channel's bin (:func:`~pixelcnn_kernels.triton.dmol.nearest_bin`) is written as
    :func:`_write_value` says. A pixel index outside [0, HW) writes nothing.
    """
    p = tl.load(pixel_ptr)
    pixel_ok = (p >= 0) & (p < HW)
    images = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = (images < B) & pixel_ok
    red, green, blue = draw_pixels(
        logits_ptr, images * P, 1, NUM_MIX, u_mix_ptr, images * NUM_MIX * HW + p, HW, u_logistic_ptr, images * CHANNELS * HW + p, HW, ok,
        last_bin, CHANNELS, True, K_PAD, True,
    )  # fmt: skip
    known = tl.load(known_ptr + images * HW + p, mask=ok, other=0) != 0
    if input_index_ptr is None:
        position = p
    else:
        position = tl.load(input_index_ptr + p, mask=pixel_ok, other=0)
    # A position outside inputs (a bad input_index) writes no input.
    input_ok = ok & (position >= 0) & (position < N)
    image_ptrs = images_ptr + images * CHANNELS * HW + p
    input_ptrs = inputs_ptr + images * stride_ib + position * stride_in
    for channel in tl.static_range(CHANNELS):
        drawn = red if channel == 0 else (green if channel == 1 else blue)
        bins = nearest_bin(drawn, last_bin).to(tl.int64)
        _write_value(bins, known, image_ptrs + channel * HW, input_ptrs + channel * stride_ic, bin_inputs_ptr, NUM_BINS, ok, input_ok)


# ---------------------------------------------------------------- launcher

# Images per program: tl.dot's smallest tile. The step is latency-bound: a bigger
# batch gets more programs, not bigger ones.
_BLOCK_B = 16
# Reduction chunk (input channels of a tap, or of the vertical link) and output-column
# block of the 1×1: at most 64, and each weight tile (chunk × BLOCK_C) at most _MAX_TILE
# elements where tl.dot's 16-row minimum allows (past 64 channels it does not). Full-fp32 tl.dot is an FMA loop holding its operand tiles in registers; compiled
# for sm_90 (ptxas -v) the 64-channel gated step with 64 × 64 chunks at 4 warps spilled
# 1.3 KB (fp32) and 1.8 KB (bf16) per thread, with 16 × 64 at 8 warps it takes about 105
# registers and spills nothing (the 160-channel resnet step 222; 512 channels, at the
# 16-row minimum, 124 bytes).
_MAX_BLOCK_K = 64
_MAX_TILE = 1024
_STEP_WARPS = 8
# tl.dot needs every tile dimension to be at least 16.
_MIN_DOT_DIM = 16
# No software pipelining of the steps' reduction loops: with 3 stages the pixel step's two
# fp32 weight tiles took 264 KiB of shared memory at 192 channels and the resnet step's
# at 160, past the 227 KiB a block may have on sm_90.
_STAGES = 1
# Channels the pixel step takes: every channel is in one program (the gate needs both
# halves, the 1×1 every gated channel); at 512 its tiles fit sm_90's shared memory.
MAX_PIXEL_STEP_CHANNELS = 512

_DRAW_WARPS = 4
# The draw's (hidden chunk × bins) weight tile, a plain product and sum (no spills at 8192).
_DRAW_TILE = 8192


def _block(size: int, largest: int | None = None) -> int:
    """Power-of-two tile covering ``size``, at least 16 (and at most ``largest``)."""
    block = max(_MIN_DOT_DIM, next_power_of_2(size))
    return block if largest is None else min(block, largest)


def _chunk(size: int, block_c: int) -> int:
    """Reduction or 1×1-column chunk against BLOCK_C columns: at most ``size``, 64 and _MAX_TILE // block_c."""
    return _block(min(size, _MAX_TILE // block_c), _MAX_BLOCK_K)


def _pixel_step_config(c_in: int, c_out: int, gated: bool) -> tuple[dict, int]:
    """The pixel step's block sizes and warps for these widths (the launcher's and the compile cases')."""
    block_c = _block(c_out)
    reduction = max(c_in, 2 * c_out) if gated else c_in
    blocks = {"BLOCK_B": _BLOCK_B, "BLOCK_K": _chunk(reduction, block_c), "BLOCK_C": block_c, "BLOCK_O": _chunk(block_c, block_c)}
    return blocks, _STEP_WARPS


def _resnet_step_config(channels: int) -> tuple[dict, int]:
    """The resnet step's block sizes and warps for this width (the launcher's and the compile cases')."""
    block_c = _block(channels)
    return {"BLOCK_B": _BLOCK_B, "BLOCK_K": _chunk(channels, block_c), "BLOCK_C": block_c}, _STEP_WARPS


def _softmax_draw_config(hidden: int, num_bins: int) -> dict:
    """The draw's block sizes: every bin at once, and hidden units in chunks of at most _DRAW_TILE // BLOCK_BINS."""
    block_bins = next_power_of_2(num_bins)
    return {"BLOCK_BINS": block_bins, "BLOCK_K": min(next_power_of_2(hidden), max(1, _DRAW_TILE // block_bins))}


def gated_pixel_step(
    pixel: torch.Tensor,
    x: torch.Tensor,
    wp: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: list[int],
    v_pre: torch.Tensor | None,
    link_weight: torch.Tensor | None,
    link_bias: torch.Tensor | None,
    cond: torch.Tensor | None,
    out_weight: torch.Tensor | None,
    out_bias: torch.Tensor | None,
    group_size: int,
    out: torch.Tensor,
) -> None:
    """Writes one pixel of ``out`` in place (the CUDA op ``gated_pixel_step``'s signature).

    Gated iff ``v_pre`` is given (then ``link_weight``, ``out_weight`` too); see the
    module docstring for the layout. Arguments are validated by the caller, except
    the width: ValueError past MAX_PIXEL_STEP_CHANNELS output channels.
    """
    batch, height, width, c_in = x.shape
    c_out = out.shape[3]
    if c_out > MAX_PIXEL_STEP_CHANNELS:
        raise ValueError(f"out has {c_out} channels; the Triton pixel step takes at most {MAX_PIXEL_STEP_CHANNELS} (the cuda backend takes more)")
    if batch == 0:
        return
    gated = v_pre is not None
    blocks, num_warps = _pixel_step_config(c_in, c_out, gated)
    v_strides = v_pre.stride() if gated else (0, 0, 0)
    with launch_device(x):
        _pixel_step_kernel[(cdiv(batch, _BLOCK_B),)](
            pixel, x, wp, bias, v_pre, link_weight, link_bias, cond, out_weight, out_bias, out,
            batch, height, width, c_in, c_out, group_size, *x.stride(), *v_strides, *out.stride(),
            OFFSETS=tuple(offsets), GATED=gated, ONE_GROUP=group_size == c_out, **blocks, num_warps=num_warps, num_stages=_STAGES,
        )  # fmt: skip


def resnet_position_step(
    pixel: torch.Tensor,
    table: torch.Tensor,
    kernel: list[int],
    x: torch.Tensor,
    inner: torch.Tensor,
    skips: list[torch.Tensor],
    input_weight: torch.Tensor,
    input_bias: torch.Tensor | None,
    skip_weight: torch.Tensor | None,
    skip_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    cond: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Writes a gated resnet block's outputs at the positions ``table[pixel]`` gives, and their new inner values, in place.

    The CUDA op ``resnet_position_step``'s signature; ``kernel`` is (KH, KW, TOP, LEFT):
    the convs' kernel size and anchor; layout in :func:`_resnet_step_kernel`. Arguments
    are validated by the caller.
    """
    batch, padded_height, padded_width, channels = x.shape
    steps, slots, _ = table.shape
    if batch == 0 or steps == 0 or slots == 0:
        return
    skip0, skip1 = (list(skips) + [None, None])[:2]
    blocks, num_warps = _resnet_step_config(channels)
    with launch_device(x):
        _resnet_step_kernel[(cdiv(batch, _BLOCK_B),)](
            x, inner, skip0, skip1, out, input_weight, input_bias, skip_weight, skip_bias, out_weight, out_bias, cond,
            pixel, table, steps, slots, *kernel, batch, padded_height, padded_width, channels,
            **blocks, num_warps=num_warps, num_stages=_STAGES,
        )  # fmt: skip


def softmax_draw_step(
    pixel: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bin_inputs: torch.Tensor,
    noise: torch.Tensor,
    known: torch.Tensor,
    images: torch.Tensor,
    inputs: torch.Tensor,
    channel: int,
) -> None:
    """Draws channel ``channel`` of every image at the pixel and writes it (the CUDA op ``softmax_draw_step``'s signature).

    Layout in :func:`_softmax_draw_kernel`; arguments are validated by the caller.
    """
    batch, hidden = h.shape
    num_bins = bin_inputs.shape[0]
    if batch == 0:
        return
    blocks = _softmax_draw_config(hidden, num_bins)
    with launch_device(h):
        _softmax_draw_kernel[(batch,)](
            pixel, h, weight, bias, bin_inputs, noise, known, images, inputs,
            hidden, num_bins, images.shape[1], images.shape[2], channel, **blocks, num_warps=_DRAW_WARPS,
        )  # fmt: skip


def dmol_draw_step(
    pixel: torch.Tensor,
    logits: torch.Tensor,
    u_mix: torch.Tensor,
    u_logistic: torch.Tensor,
    known: torch.Tensor,
    images: torch.Tensor,
    inputs: torch.Tensor,
    input_index: torch.Tensor | None,
    bin_inputs: torch.Tensor,
) -> None:
    """Draws every image's pixel from the DMOL head's logits and writes it (the CUDA op ``dmol_draw_step``'s signature).

    Layout in :func:`_dmol_draw_kernel`; arguments are validated by the caller.
    """
    batch, num_logits = logits.shape
    _, channels, pixels = images.shape
    if batch == 0:
        return
    num_bins = bin_inputs.shape[0]
    with launch_device(logits):
        _dmol_draw_kernel[(cdiv(batch, _BLOCK_B),)](
            pixel, logits, u_mix, u_logistic, known, images, inputs, input_index, bin_inputs,
            batch, num_logits, u_mix.shape[1], pixels, inputs.shape[2], num_bins, *inputs.stride(), float(num_bins - 1),
            CHANNELS=channels, K_PAD=next_power_of_2(u_mix.shape[1]), BLOCK_B=_BLOCK_B, **DRAW_LAUNCH_OPTIONS,
        )  # fmt: skip


# ---------------------------------------------------------------- sm_90 compile cases


def _register_compile_cases() -> None:
    """The tutorial model's steps (its first 1×3 ``horizontal_A`` conv from 3 colours, a 64-channel gated layer), the
    colour benchmark model's 128-channel layer in colour groups of 43, 43, 42, and the widest gated layer."""
    sizes = dict.fromkeys(("B", "H", "W", "C_IN", "C_OUT", "group_size"), "i32")
    strides = dict.fromkeys(("stride_xb", "stride_xh", "stride_xw", "stride_xc", "stride_vb", "stride_vw", "stride_vc", "stride_ob", "stride_oh", "stride_ow", "stride_oc"), "i32")
    for dtype in (torch.float32, torch.bfloat16):
        ptr, dtype_name = pointer_type(dtype), str(dtype).removeprefix("torch.")
        common = {"pixel_ptr": "*i64", "x_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, **sizes, **strides}
        gated = {name: ptr for name in ("v_ptr", "wv_ptr", "bias_v_ptr", "cond_ptr", "w1_ptr", "bias1_ptr")}
        blocks, num_warps = _pixel_step_config(3, 64, gated=False)
        register_compile_case(
            f"sampling_step_first_conv_1x3_{dtype_name}", _pixel_step_kernel, common,
            {**dict.fromkeys(gated, None), **blocks, "OFFSETS": (-1, 0), "GATED": False, "ONE_GROUP": False}, num_warps=num_warps, num_stages=_STAGES,
        )  # fmt: skip
        for channels, dilation, one_group in ((64, 1, True), (64, 2, True), (128, 1, False), (MAX_PIXEL_STEP_CHANNELS, 1, True)):
            blocks, num_warps = _pixel_step_config(channels, channels, gated=True)
            register_compile_case(
                f"sampling_step_gated_1x3_c{channels}_dil{dilation}{'' if one_group else '_3_groups'}_{dtype_name}", _pixel_step_kernel, {**common, **gated},
                {**blocks, "OFFSETS": (-dilation, 0), "GATED": True, "ONE_GROUP": one_group}, num_warps=num_warps, num_stages=_STAGES,
                # The widest step's two (16, 512) fp32 accumulators and gate leave a few spills at the smallest chunks.
                max_spill_bytes=128 if channels == MAX_PIXEL_STEP_CHANNELS else 0,
            )  # fmt: skip


def _register_resnet_compile_cases() -> None:
    """PixelCNN++'s blocks at nr_filters 160: without skip (the up pass's u), with one (ul) and two (the down pass's ul) skip streams."""
    sizes = {"pixel_ptr": "*i64", "table_ptr": "*i32", **dict.fromkeys(("STEPS", "SLOTS", "KH", "KW", "TOP", "LEFT", "B", "HP", "WP", "C"), "i32")}
    blocks, num_warps = _resnet_step_config(160)
    for dtype in (torch.float32, torch.bfloat16):
        ptr, dtype_name = pointer_type(dtype), str(dtype).removeprefix("torch.")
        tensors = dict.fromkeys(("x_ptr", "inner_ptr", "out_ptr", "w_in_ptr", "bias_in_ptr", "w_out_ptr", "bias_out_ptr", "cond_ptr"), ptr)
        for skip_streams in (0, 1, 2):
            present = {"skip0_ptr": skip_streams >= 1, "skip1_ptr": skip_streams == 2, "w_skip_ptr": skip_streams > 0, "bias_skip_ptr": skip_streams > 0}
            signature = {**tensors, **{name: ptr for name, given in present.items() if given}, **sizes}
            constexprs = {**{name: None for name, given in present.items() if not given}, **blocks}
            register_compile_case(
                f"sampling_resnet_step_skips{skip_streams}_{dtype_name}", _resnet_step_kernel, signature, constexprs,
                num_warps=num_warps, num_stages=_STAGES,
            )  # fmt: skip


def _register_draw_compile_cases() -> None:
    """The tutorial model's head (64 hidden units, 256 bins, with and without a bias) and the widest draw."""
    from pixelcnn_kernels.ops.sampling import MAX_DRAW_BINS

    for dtype in (torch.float32, torch.bfloat16):
        ptr, dtype_name = pointer_type(dtype), str(dtype).removeprefix("torch.")
        signature = {
            "pixel_ptr": "*i64", "h_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "bin_inputs_ptr": ptr, "noise_ptr": "*fp32",
            "known_ptr": "*i1", "images_ptr": "*i64", "inputs_ptr": ptr, **dict.fromkeys(("HIDDEN", "NUM_BINS", "CHANNELS", "HW", "channel"), "i32"),
        }  # fmt: skip
        for hidden, num_bins in ((64, 256), (512, MAX_DRAW_BINS)):
            register_compile_case(
                f"sampling_softmax_draw_h{hidden}_bins{num_bins}_{dtype_name}", _softmax_draw_kernel, signature,
                _softmax_draw_config(hidden, num_bins), num_warps=_DRAW_WARPS, divisible_ints=False,
            )  # fmt: skip
        no_bias = {name: type_ for name, type_ in signature.items() if name != "bias_ptr"}
        register_compile_case(
            f"sampling_softmax_draw_no_bias_{dtype_name}", _softmax_draw_kernel, no_bias, {"bias_ptr": None, **_softmax_draw_config(64, 256)},
            num_warps=_DRAW_WARPS, divisible_ints=False,
        )  # fmt: skip


def _register_dmol_draw_compile_cases() -> None:
    """PixelCNN++'s draw (3 channels, 10 logistics) into its channels-last input cache, and a grey draw into (B, C, HW) inputs."""
    for dtype in (torch.float32, torch.bfloat16):
        ptr, dtype_name = pointer_type(dtype), str(dtype).removeprefix("torch.")
        signature = {
            "pixel_ptr": "*i64", "logits_ptr": ptr, "u_mix_ptr": "*fp32", "u_logistic_ptr": "*fp32", "known_ptr": "*i1", "images_ptr": "*i64",
            "inputs_ptr": ptr, "input_index_ptr": "*i64", "bin_inputs_ptr": ptr,
            **dict.fromkeys(("B", "P", "NUM_MIX", "HW", "N", "NUM_BINS", "stride_ib", "stride_ic", "stride_in"), "i32"),
            "last_bin": "fp32",
        }  # fmt: skip
        register_compile_case(
            f"sampling_dmol_draw_c3_{dtype_name}", _dmol_draw_kernel, signature, {"CHANNELS": 3, "K_PAD": 16, "BLOCK_B": _BLOCK_B},
            divisible_ints=False, launch_options=DRAW_LAUNCH_OPTIONS,
        )
        no_index = {name: type_ for name, type_ in signature.items() if name != "input_index_ptr"}
        register_compile_case(
            f"sampling_dmol_draw_c1_{dtype_name}", _dmol_draw_kernel, no_index, {"input_index_ptr": None, "CHANNELS": 1, "K_PAD": 4, "BLOCK_B": _BLOCK_B},
            divisible_ints=False, launch_options=DRAW_LAUNCH_OPTIONS,
        )  # fmt: skip

_register_compile_cases()
_register_resnet_compile_cases()
_register_draw_compile_cases()
_register_dmol_draw_compile_cases()
