"""The masked-convolution CUDA kernels, called through torch.ops.pixelcnn_kernels_cuda.

The ops take the kernels' contract directly (channels-last x (N, H, W, Cin), the
packed weight wp (T, Cin, Cout), the taps' offsets), built with the op module's
packing helpers; every result is compared with a float64 evaluation of the
reference masked_conv2d_ref. The error allowed scales with the sum of the
magnitudes of the terms (the same convolution of |x|, |weight|, |bias|), the bound
a float32 accumulation meets, times the project's tolerance for the dtype.

CPU: the schemas the extension registers (when it is built). On the GPU, or without
one on the CPU (``CUDA_KERNELS``: the kernels built for it by pixelcnn_kernels.cuda_on_cpu):
every mask kind and tap count, dilations 1/2/4, fp32 with and without TF32, fp16,
bf16, odd channel counts, N = 1, H != W, the gated epilogue, the residual epilogue,
a concat_elu input (forward, wgrad) and its backward in dgrad's epilogue, the dropout
after it, empty batches. GPU only (marked ``gpu``): deterministic wgrad at size, inputs
over 2**31 elements and the glue's errors.
"""

from __future__ import annotations

import pytest
import torch
from op_table import CUDA_KERNELS, DEVICE

from pixelcnn_kernels import backend
from pixelcnn_kernels.backend import cuda_ops
from pixelcnn_kernels.masks import halves_first_channels, resolve_mask
from pixelcnn_kernels.ops.masked_conv import GATE_CODES, pack_weight, tap_offsets, weight_grad_layout
from pixelcnn_kernels.reference.gates import concat_elu
from pixelcnn_kernels.reference.masked_conv import draw_dropout_keep, masked_conv2d_gated_ref, masked_conv2d_ref
from pixelcnn_kernels.testing import tolerance

KEEP = "Tensor? keep=None, float keep_scale=1."  # the dropout mask of a concat_elu input (PixelCNN++ in training)
SCHEMAS = {
    "masked_conv2d_fwd": f"(Tensor x, Tensor wp, Tensor? bias, Tensor? residual, int[] offsets, bool concat_elu_input, bool allow_tf32, {KEEP}) -> Tensor",
    "masked_conv2d_fwd_gated": (
        "(Tensor x, Tensor wp, Tensor? bias, Tensor? cond, Tensor? residual, Tensor? addend, int[] offsets, bool concat_elu_input, "
        f"int gate, int gate_groups, bool write_preact, bool allow_tf32, {KEEP}) -> Tensor[]"
    ),
    "masked_conv2d_dgrad": f"(Tensor gout, Tensor wp, Tensor? x, int[] offsets, bool allow_tf32, {KEEP}) -> Tensor",
    "masked_conv2d_wgrad": (
        "(Tensor x, Tensor gout, int[] offsets, int[] tap_positions, int[] kernel_size, Tensor? hidden, int anchor_tap, bool concat_elu_input, "
        f"bool allow_tf32, {KEEP}) -> Tensor"
    ),
}

# (mask, kernel size, colour groups): every tap count the drop-in models use.
MASKS = [
    ("full", 1, 1),  # 1 tap
    ("horizontal_A", (1, 3), 1),  # 1
    ("horizontal", (1, 3), 1),  # 2
    ("vertical_A", 3, 1),  # 3
    ("A", 3, 1),  # 4
    ("down_right_shifted", (2, 2), 1),  # 4
    ("B", 3, 1),  # 5
    ("A", 3, 3),  # 5: four taps and the anchor, with colour groups
    ("vertical", 3, 1),  # 6
    ("down_shifted", (2, 3), 1),  # 6
    ("full", 3, 1),  # 9
    ("A", 5, 1),  # 12
    ("B", 5, 1),  # 13
    ("A", 7, 1),  # 24
    ("B", 7, 1),  # 25
    ("full", 7, 1),  # 49: the most taps one launch takes
]
MASK_IDS = [f"{m}-k{k if isinstance(k, int) else 'x'.join(map(str, k))}-g{g}" for m, k, g in MASKS]
DILATED_MASKS = [MASKS[6], MASKS[8], MASKS[9], MASKS[11]]  # B 3x3, vertical 3x3, down_shifted, A 5x5

# name -> (dtype, allow_tf32); allow_tf32 only matters for float32.
PRECISIONS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "fp16": (torch.float16, True),
    "bf16": (torch.bfloat16, True),
}

# (N, H, W, Cin, Cout): two channel steps per tap (32 + 16), two column blocks in the
# 64 x 64 tiles (64 + 8) and one partial one in the 128 x 128 tiles, multiples of 8 (the
# vectorised loads), channels divisible by 3 for the colour groups, H != W and a partial
# last pixel block (198 = 3 * 64 + 6 = 128 + 70).
SHAPE = (2, 9, 11, 48, 72)
# Odd channel counts (scalar loads and partial tiles everywhere), and N = 1.
ODD_SHAPES = [(2, 5, 7, 3, 5), (1, 6, 13, 64, 130)]


def _to_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous channels-last (N, H, W, C)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _make_inputs(shape, spec, dtype, *, seed=0):
    """x (N, Cin, H, W), weight (Cout, Cin, kh, kw), bias (Cout,) in ``dtype`` on DEVICE, N(0, 1)."""
    batch, height, width, c_in, c_out = shape
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    kh, kw = spec.kernel_size

    def randn(*size):
        return torch.randn(*size, device=DEVICE, generator=generator).to(dtype)

    return randn(batch, c_in, height, width), randn(c_out, c_in, kh, kw), randn(c_out)


def _activation(x, input_activation):
    """What the convolution reads: x, or concat_elu(x)."""
    return x if input_activation is None else concat_elu(x)


def _conv_ref(x, weight, bias, spec, dilation, *, residual=None, input_activation=None):
    """The float64 reference (N, H, W, Cout) and its error scale: the same conv of |input|, |weight|, |bias|, plus |residual|."""
    x, weight = x.double(), weight.double()
    bias = None if bias is None else bias.double()
    residual = None if residual is None else residual.double()
    exact = masked_conv2d_ref(x, weight, bias, spec, dilation, spec.color_groups, residual=residual, input_activation=input_activation)
    activation = _activation(x, input_activation).abs()
    scale = masked_conv2d_ref(activation, weight.abs(), None if bias is None else bias.abs(), spec, dilation, spec.color_groups)
    if residual is not None:
        scale = scale + residual.abs()
    return _to_rows(exact), _to_rows(scale)


def _assert_within(actual, expected, scale, dtype, tf32, what):
    """|actual - expected| <= atol + rtol * scale elementwise, (rtol, atol) the project's for ``dtype``."""
    rtol, atol = tolerance(dtype, tf32=tf32)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    excess = (actual.double() - expected).abs() - (atol + rtol * scale)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements off; worst at flat index {worst}: "
        f"got {actual.flatten()[worst].item()}, expected {expected.flatten()[worst].item()}, scale {scale.flatten()[worst].item()}"
    )


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.skipif(backend._cuda_extension_error() is not None, reason=f"the CUDA extension is not loaded: {backend._cuda_extension_error()}")
def test_ops_are_registered_with_the_contract_schemas():
    ops = cuda_ops()
    for name, signature in SCHEMAS.items():
        assert hasattr(ops, name), f"pixelcnn_kernels_cuda.{name} is not registered"
        assert str(getattr(ops, name).default._schema) == f"{backend.CUDA_OPS_NAMESPACE}::{name}{signature}"


# ---------------------------------------------------------------------------------------------- GPU


def _check_forward(mask, kernel_size, color_groups, dilation, shape, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, color_groups)
    x, weight, bias = _make_inputs(shape, spec, dtype)
    out = cuda_ops().masked_conv2d_fwd(_to_rows(x), pack_weight(weight, spec), bias, None, tap_offsets(spec, dilation), False, allow_tf32)
    expected, scale = _conv_ref(x, weight, bias, spec, dilation)
    assert out.dtype == dtype
    _assert_within(out, expected, scale, dtype, allow_tf32, f"forward {len(spec.taps)} taps")


def _check_dgrad(mask, kernel_size, color_groups, dilation, shape, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, color_groups)
    x, weight, _ = _make_inputs(shape, spec, dtype)
    gout = torch.randn(shape[0], shape[4], shape[1], shape[2], device=DEVICE).to(dtype)
    gx = cuda_ops().masked_conv2d_dgrad(_to_rows(gout), pack_weight(weight, spec), None, tap_offsets(spec, dilation), allow_tf32)

    def input_grad(x64, w64, g64):
        x64 = x64.detach().requires_grad_()
        (grad,) = torch.autograd.grad(masked_conv2d_ref(x64, w64, None, spec, dilation, spec.color_groups), x64, g64)
        return _to_rows(grad)

    expected = input_grad(x.double(), weight.double(), gout.double())
    scale = input_grad(x.double(), weight.double().abs(), gout.double().abs())
    assert gx.dtype == dtype
    _assert_within(gx, expected, scale, dtype, allow_tf32, f"dgrad {len(spec.taps)} taps")


def _wgrad_ref(x, gout, weight, spec, dilation, input_activation=None):
    """(expected, scale) of the weight gradient, float64 in the weight's shape (zero at masked-out taps and hidden pairs)."""

    def weight_grad(x64, g64, activation):
        w64 = weight.double().detach().requires_grad_()
        out = masked_conv2d_ref(x64, w64, None, spec, dilation, spec.color_groups, input_activation=activation)
        (grad,) = torch.autograd.grad(out, w64, g64)
        return grad

    x64 = x.double()
    return weight_grad(x64, gout.double(), input_activation), weight_grad(_activation(x64, input_activation).abs(), gout.double().abs(), None)


def _wgrad(x, gout, weight, spec, dilation, concat_elu_input, allow_tf32, *keep):
    """The extension's weight gradient of the conv of ``x`` (N, C, H, W), laid out as ``weight``."""
    layout = weight_grad_layout(spec, weight)
    return cuda_ops().masked_conv2d_wgrad(_to_rows(x), _to_rows(gout), tap_offsets(spec, dilation), *layout, concat_elu_input, allow_tf32, *keep)


def _check_wgrad(mask, kernel_size, color_groups, dilation, shape, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, color_groups)
    x, weight, _ = _make_inputs(shape, spec, dtype)
    gout = torch.randn(shape[0], shape[4], shape[1], shape[2], device=DEVICE).to(dtype)
    grad = _wgrad(x, gout, weight, spec, dilation, False, allow_tf32)
    expected, scale = _wgrad_ref(x, gout, weight, spec, dilation)
    assert grad.dtype == dtype and grad.is_contiguous()
    # Accumulated in fp32 on tensor cores (which truncate inside an MMA) over all the pixels,
    # then rounded to the weight's dtype: the input dtype's tolerance, as for the forward. Zero
    # where the reference is (masked-out taps, hidden colour pairs): no scale there.
    _assert_within(grad, expected, scale, dtype, allow_tf32, f"wgrad {len(spec.taps)} taps")
    assert not grad[expected == 0].any()


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), MASKS, ids=MASK_IDS)
def test_forward_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_forward(mask, kernel_size, color_groups, 1, SHAPE, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), DILATED_MASKS, ids=[MASK_IDS[MASKS.index(m)] for m in DILATED_MASKS])
def test_forward_dilated(mask, kernel_size, color_groups, dilation, precision):
    _check_forward(mask, kernel_size, color_groups, dilation, SHAPE, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[3]}to{s[4]}-n{s[0]}")
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), [MASKS[6], MASKS[9]], ids=["B-k3", "down_shifted"])
def test_forward_odd_channels(mask, kernel_size, color_groups, shape, precision):
    _check_forward(mask, kernel_size, color_groups, 2, shape, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), MASKS, ids=MASK_IDS)
def test_dgrad_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_dgrad(mask, kernel_size, color_groups, 1, SHAPE, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[3]}to{s[4]}-n{s[0]}")
@pytest.mark.parametrize("dilation", [2, 4])
def test_dgrad_dilated_odd_channels(dilation, shape, precision):
    _check_dgrad("vertical", 3, 1, dilation, shape, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), MASKS, ids=MASK_IDS)
def test_wgrad_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_wgrad(mask, kernel_size, color_groups, 1, SHAPE, precision)


# The 128 x 128 tiles, on tensor cores over channels that 128-wide blocks pad no more than 64-wide
# ones (a multiple of 128, or 64 past one, as SHAPE's 72): the forward's Cout, dgrad's Cin, wgrad's
# Cin and Cout both. 2 * 9 * 11 = 198 pixels = 128 + 70, so the forward's last tile has a partial
# second block of 64 staged rows; 256 columns make two column blocks, 200 a partial second (and a
# partial second staged block in wgrad); 48 input channels, a partial step (and 64 x 64 wgrad
# tiles); 4 * 32 * 40 pixels, wgrad split over them. Exact fp32 takes the 64 x 64 tiles.
WIDE_SHAPES = [(2, 9, 11, 48, 256), (2, 9, 11, 256, 128), (1, 6, 13, 200, 126), (4, 32, 40, 128, 128)]


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=[f"{s[3]}to{s[4]}" for s in WIDE_SHAPES])
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), [MASKS[2], MASKS[8], MASKS[11]], ids=["horizontal", "vertical", "A-k5"])
def test_wide_tiles(mask, kernel_size, color_groups, shape, precision):
    """Forward, dgrad and wgrad where the channels take the 128 x 128 tiles."""
    _check_forward(mask, kernel_size, color_groups, 1, shape, precision)
    _check_dgrad(mask, kernel_size, color_groups, 1, shape, precision)
    _check_wgrad(mask, kernel_size, color_groups, 1, shape, precision)


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(4, 32, 40, 48, 72)], ids=["3to5", "64to130-n1", "split-k"])
@pytest.mark.parametrize("dilation", [1, 4])
def test_wgrad_dilated_odd_channels_and_split(dilation, shape, precision):
    _check_wgrad("down_shifted", (2, 3), 1, dilation, shape, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("channels", [(40, 72), (128, 72)], ids=["64x64-tiles", "128x128-tiles"])
def test_wgrad_is_deterministic(channels, precision):
    """Split-K partials are summed in a fixed order: two runs agree bit for bit."""
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask("vertical", 3, 1)
    # 64 * 32 * 32 pixels: many splits on any GPU.
    x = torch.randn(64, 32, 32, channels[0], device="cuda").to(dtype)
    gout = torch.randn(64, 32, 32, channels[1], device="cuda").to(dtype)
    args = (tap_offsets(spec, 1), *weight_grad_layout(spec, torch.empty(channels[1], channels[0], 3, 3, device="cuda")), False, allow_tf32)
    first = cuda_ops().masked_conv2d_wgrad(x, gout, *args)
    second = cuda_ops().masked_conv2d_wgrad(x, gout, *args)
    assert torch.equal(first, second)


def _gate_halves(rows: torch.Tensor, gate_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves (a, b) of a gated pre-activation's channels (last dim), in gate_groups blocks [a_1 b_1 | a_2 b_2 | ...]."""
    half = rows.shape[-1] // 2
    halves_first = halves_first_channels(half, gate_groups).to(rows.device)
    return rows[..., halves_first[:half]], rows[..., halves_first[half:]]


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("gate", GATE_CODES)
@pytest.mark.parametrize(("shape", "with_cond", "with_bias", "write_preact", "with_residual", "with_addend", "input_activation", "gate_groups"), [
    (SHAPE, True, True, True, False, False, None, 1),
    (SHAPE, True, True, True, False, True, None, 1),  # Gated PixelCNN's horizontal stack
    ((2, 9, 11, 48, 10), True, False, False, False, False, None, 1),  # half = 5 columns
    ((1, 6, 13, 64, 130), False, True, True, False, True, None, 1),  # half = 65: two column blocks per half
    ((2, 5, 7, 3, 256), True, True, False, False, False, None, 1),
    (SHAPE, True, True, True, True, False, "concat_elu", 1),  # x has 24 channels, the GEMM reads 48: two reduction steps, a partial one
    ((1, 6, 13, 80, 130), False, True, False, True, False, "concat_elu", 1),  # 40: 80 read, three steps, a partial one
    ((2, 5, 7, 6, 10), True, False, True, True, True, "concat_elu", 1),  # 3: scalar loads
    ((2, 9, 11, 48, 252), True, True, True, True, True, None, 3),  # colour-major: groups of 42, two column blocks per half
    ((2, 9, 11, 48, 256), True, True, True, True, True, None, 3),  # groups of 43, 43, 42
], ids=["48to72", "48to72-addend", "48to10-no-bias", "64to130-n1-no-cond-addend", "3to256", "48to72-fused", "80to130-fused", "6to10-fused-addend",
        "48to252-3-groups", "48to256-3-unequal-groups"])  # fmt: skip
def test_gated_forward(gate, shape, with_cond, with_bias, write_preact, with_residual, with_addend, input_activation, gate_groups, precision):
    """shape's Cin is the weight's: x has Cin / 2 channels with a concat_elu input; gate_groups > 1: the
    channels of bias, cond, addend and preact colour-major, wp's columns halves first."""
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask("vertical", 3, 1)
    x, weight, bias = _make_inputs(shape, spec, dtype)
    if input_activation is not None:
        x = x[:, : shape[3] // 2].contiguous()
    half = shape[4] // 2
    bias = bias if with_bias else None
    cond = torch.randn(shape[0], shape[4], device=DEVICE).to(dtype) if with_cond else None
    residual = torch.randn(shape[0], half, *shape[1:3], device=DEVICE).to(dtype) if with_residual else None
    addend = torch.randn(shape[0], shape[4], *shape[1:3], device=DEVICE).to(dtype) if with_addend else None
    out, preact = cuda_ops().masked_conv2d_fwd_gated(
        _to_rows(x), pack_weight(weight, spec, gate_groups), bias, cond, None if residual is None else _to_rows(residual),
        None if addend is None else _to_rows(addend), tap_offsets(spec, 2), input_activation is not None, GATE_CODES[gate], gate_groups, write_preact, allow_tf32,
    )

    cond64, residual64, addend64 = (None if t is None else t.double() for t in (cond, residual, addend))
    expected = masked_conv2d_gated_ref(
        x.double(), weight.double(), None if bias is None else bias.double(), spec, 2, 1, gate, cond64,
        residual=residual64, addend=addend64, input_activation=input_activation, gate_groups=gate_groups,
    )  # fmt: skip
    expected = _to_rows(expected)
    pre, pre_scale = _conv_ref(x, weight, bias, spec, 2, input_activation=input_activation)
    if addend is not None:
        pre = pre + _to_rows(addend64)
        pre_scale = pre_scale + _to_rows(addend64.abs())
    gated_pre = pre if cond is None else pre + cond64[:, None, None, :]
    gated_scale = pre_scale if cond is None else pre_scale + cond64.abs()[:, None, None, :]
    # The pre-activation error bounds carried through the gate: |d out / d a| <= 1 for both
    # gates and |d out / d b| <= max(1, |a|) / 4, here bounded by 1 + |a|; the residual adds its magnitude.
    (scale_a, scale_b), (pre_a, _) = _gate_halves(gated_scale, gate_groups), _gate_halves(gated_pre, gate_groups)
    out_scale = scale_a + scale_b * (1 + pre_a.abs())
    if residual is not None:
        out_scale = out_scale + _to_rows(residual64.abs())
    assert out.dtype == dtype and out.shape == (*shape[:3], half)
    _assert_within(out, expected, out_scale, dtype, allow_tf32, f"gated out, gate {gate}")
    if write_preact:
        _assert_within(preact, pre, pre_scale, dtype, allow_tf32, f"gated preact, gate {gate}")
    else:
        assert preact.numel() == 0


# (N, H, W, C, Cout) of the concat_elu tests, C being x's channels (the conv's Cin is 2C):
# 48 or 80 channels read (24, 40: a partial last reduction step), two or three column blocks
# (72, 130), scalar loads (3), and the 128 x 128 tiles (Cout 128, with and without a residual).
CONCAT_ELU_SHAPES = [(2, 9, 11, 24, 72), (1, 6, 13, 40, 130), (2, 5, 7, 3, 5), (2, 9, 11, 40, 128)]
CONCAT_ELU_IDS = [f"{s[3]}to{s[4]}-n{s[0]}" for s in CONCAT_ELU_SHAPES]
PIXELCNN_PP_MASKS = [("down_shifted", (2, 3)), ("down_right_shifted", (2, 2)), ("full", 1)]


def _concat_elu_inputs(shape, spec, dtype):
    """x (N, C, H, W) and weight (Cout, 2C, kh, kw), bias (Cout,) for a conv of concat_elu(x)."""
    batch, height, width, c_x, c_out = shape
    x, weight, bias = _make_inputs((batch, height, width, 2 * c_x, c_out), spec, dtype)
    return x[:, :c_x].contiguous(), weight, bias


def _concat_elu_backward_inputs(mask, kernel_size, shape, precision):
    """(dtype, allow_tf32, spec, x, weight, gout) of a backward pass of a conv of concat_elu(x)."""
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, 1)
    x, weight, _ = _concat_elu_inputs(shape, spec, dtype)
    gout = torch.randn(shape[0], shape[4], shape[1], shape[2], device=DEVICE).to(dtype)
    return dtype, allow_tf32, spec, x, weight, gout


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("shape", CONCAT_ELU_SHAPES, ids=CONCAT_ELU_IDS)
@pytest.mark.parametrize(("mask", "kernel_size"), PIXELCNN_PP_MASKS, ids=[m for m, _ in PIXELCNN_PP_MASKS])
def test_forward_concat_elu_and_residual(mask, kernel_size, shape, with_residual, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, 1)
    x, weight, bias = _concat_elu_inputs(shape, spec, dtype)
    residual = torch.randn(shape[0], shape[4], *shape[1:3], device=DEVICE).to(dtype) if with_residual else None
    out = cuda_ops().masked_conv2d_fwd(
        _to_rows(x), pack_weight(weight, spec), bias, None if residual is None else _to_rows(residual), tap_offsets(spec, 1), True, allow_tf32
    )
    expected, scale = _conv_ref(x, weight, bias, spec, 1, residual=residual, input_activation="concat_elu")
    assert out.dtype == dtype
    _assert_within(out, expected, scale, dtype, allow_tf32, f"forward of concat_elu, {mask}")


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(2, 9, 11, 24, 72), (1, 6, 13, 80, 130), (2, 5, 7, 3, 5)], ids=["24to72", "80to130-n1", "3to5"])
@pytest.mark.parametrize(("mask", "kernel_size"), PIXELCNN_PP_MASKS, ids=[m for m, _ in PIXELCNN_PP_MASKS])
def test_dgrad_folds_concat_elu_backward(mask, kernel_size, shape, precision):
    """Given x, dgrad returns the gradient w.r.t. x through concat_elu (C = 80: two column blocks of the halves)."""
    dtype, allow_tf32, spec, x, weight, gout = _concat_elu_backward_inputs(mask, kernel_size, shape, precision)
    gx = cuda_ops().masked_conv2d_dgrad(_to_rows(gout), pack_weight(weight, spec), _to_rows(x), tap_offsets(spec, 1), allow_tf32)

    x64 = x.double().requires_grad_()
    (expected,) = torch.autograd.grad(masked_conv2d_ref(x64, weight.double(), None, spec, input_activation="concat_elu"), x64, gout.double())
    # The error of the gradient w.r.t. concat_elu(x) (bounded as in _check_dgrad), carried
    # through elu' <= 1 from both halves.
    activation = concat_elu(x.double()).requires_grad_()
    (activation_scale,) = torch.autograd.grad(masked_conv2d_ref(activation, weight.double().abs(), None, spec), activation, gout.double().abs())
    scale = activation_scale[:, : shape[3]] + activation_scale[:, shape[3] :]
    assert gx.dtype == dtype and gx.shape == (shape[0], shape[1], shape[2], shape[3])
    _assert_within(gx, _to_rows(expected), _to_rows(scale), dtype, allow_tf32, f"dgrad of concat_elu, {mask}")


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(2, 9, 11, 24, 72), (2, 9, 11, 80, 72), (1, 6, 13, 3, 5), (4, 32, 40, 24, 72)], ids=["24to72", "80to72", "3to5", "split-k"])
@pytest.mark.parametrize(("mask", "kernel_size"), PIXELCNN_PP_MASKS, ids=[m for m, _ in PIXELCNN_PP_MASKS])
def test_wgrad_of_concat_elu(mask, kernel_size, shape, precision):
    """The weight gradient of a conv of concat_elu(x) (C = 80: 2C = 160 input channels, three channel blocks)."""
    dtype, allow_tf32, spec, x, weight, gout = _concat_elu_backward_inputs(mask, kernel_size, shape, precision)
    grad = _wgrad(x, gout, weight, spec, 1, True, allow_tf32)
    expected, scale = _wgrad_ref(x, gout, weight, spec, 1, "concat_elu")
    assert grad.dtype == dtype and grad.shape == weight.shape == (shape[4], 2 * shape[3], *spec.kernel_size)
    _assert_within(grad, expected, scale, dtype, allow_tf32, f"wgrad of concat_elu, {mask}")


@CUDA_KERNELS
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size"), PIXELCNN_PP_MASKS, ids=[m for m, _ in PIXELCNN_PP_MASKS])
def test_dropout_after_concat_elu(mask, kernel_size, precision):
    """With keep, every pass reads the dropped activation A = keep ? concat_elu(x) / (1 - p) : 0 (p = 0.5;
    C = 80: two channel blocks per part, the mask's bits gathered beside each tile), and dgrad's epilogue
    takes the gradient through the same dropout before concat_elu's backward."""
    shape = (2, 9, 11, 80, 72)
    dtype, allow_tf32, spec, x, weight, gout = _concat_elu_backward_inputs(mask, kernel_size, shape, precision)
    bias = torch.randn(shape[4], device=DEVICE).to(dtype)
    keep = draw_dropout_keep(x, 2 * shape[3], 0.5, torch.Generator(device=DEVICE).manual_seed(3))
    keep_rows, offsets, packed = _to_rows(keep).view(torch.uint8), tap_offsets(spec, 1), pack_weight(weight, spec)
    dropped = torch.ops.aten.native_dropout_backward(concat_elu(x.double()), keep, 2.0)

    out = cuda_ops().masked_conv2d_fwd(_to_rows(x), packed, bias, None, offsets, True, allow_tf32, keep_rows, 2.0)
    expected, scale = _conv_ref(dropped, weight, bias, spec, 1)
    _assert_within(out, expected, scale, dtype, allow_tf32, f"forward with dropout, {mask}")
    gated_weight = torch.cat([weight, weight], 0)
    _, preact = cuda_ops().masked_conv2d_fwd_gated(
        _to_rows(x), pack_weight(gated_weight, spec), None, None, None, None, offsets, True, GATE_CODES["sigmoid"], 1, True, allow_tf32, keep_rows, 2.0
    )
    expected, scale = _conv_ref(dropped, gated_weight, None, spec, 1)
    _assert_within(preact, expected, scale, dtype, allow_tf32, f"gated forward's pre-activation with dropout, {mask}")

    grad = _wgrad(x, gout, weight, spec, 1, True, allow_tf32, keep_rows, 2.0)
    expected, scale = _wgrad_ref(dropped, gout, weight, spec, 1)
    _assert_within(grad, expected, scale, dtype, allow_tf32, f"wgrad with dropout, {mask}")

    gx = cuda_ops().masked_conv2d_dgrad(_to_rows(gout), packed, _to_rows(x), offsets, allow_tf32, keep_rows, 2.0)
    x64 = x.double().requires_grad_()
    out64 = masked_conv2d_ref(x64, weight.double(), None, spec, input_activation="concat_elu", dropout_keep=keep, dropout_p=0.5)
    (expected,) = torch.autograd.grad(out64, x64, gout.double())
    activation = dropped.abs().requires_grad_()
    (activation_scale,) = torch.autograd.grad(masked_conv2d_ref(activation, weight.double().abs(), None, spec), activation, gout.double().abs())
    activation_scale = activation_scale * keep * 2.0  # through the dropout; elu' <= 1
    scale = activation_scale[:, : shape[3]] + activation_scale[:, shape[3] :]
    _assert_within(gx, _to_rows(expected), _to_rows(scale), dtype, allow_tf32, f"dgrad with dropout, {mask}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_over_2_31_elements(dtype):
    """x and gx of 2**31 + elements: the kernels' global offsets are 64-bit.

    The last image rows are checked against the reference on a slice of x (a
    vertical 3x3 mask reaches one row up, so the slice's top row is dropped).
    """
    spec = resolve_mask("vertical", 3, 1)
    batch, height, width, c_in, c_out = 1, 2049, 1040, 1024, 8
    assert batch * height * width * c_in > 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, height, width, c_in, device="cuda", generator=generator, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 3, device="cuda", generator=generator, dtype=dtype)
    wp, offsets = pack_weight(weight, spec), tap_offsets(spec, 1)
    out = cuda_ops().masked_conv2d_fwd(x, wp, None, None, offsets, False, True)
    tail = x[:, -3:].permute(0, 3, 1, 2)
    expected, scale = _conv_ref(tail, weight, None, spec, 1)
    _assert_within(out[:, -2:], expected[:, 1:], scale[:, 1:], dtype, True, "forward, last rows")

    gout = torch.randn(batch, height, width, c_out, device="cuda", generator=generator, dtype=dtype)
    del x, out, tail  # tail is a view of x: x's memory goes only with it
    gx = cuda_ops().masked_conv2d_dgrad(gout, wp, None, offsets, True)
    # gx[y] reads gout rows y and y + 1: the last two rows need only gout's last two.
    g_tail = gout[:, -2:].permute(0, 3, 1, 2).double()
    x_tail = torch.zeros(batch, c_in, 2, width, device="cuda", dtype=torch.float64, requires_grad=True)
    (expected_gx,) = torch.autograd.grad(masked_conv2d_ref(x_tail, weight.double(), None, spec, 1, 1), x_tail, g_tail)
    x_tail_abs = x_tail.detach().requires_grad_()
    (scale_gx,) = torch.autograd.grad(masked_conv2d_ref(x_tail_abs, weight.double().abs(), None, spec, 1, 1), x_tail_abs, g_tail.abs())
    _assert_within(gx[:, -2:], _to_rows(expected_gx), _to_rows(scale_gx), dtype, True, "dgrad, last rows")


def _valid_args(dtype=torch.float16):
    spec = resolve_mask("B", 3, 1)
    x = torch.randn(1, 4, 5, 8, device=DEVICE).to(dtype)
    wp = torch.randn(len(spec.taps), 8, 6, device=DEVICE).to(dtype)
    return x, wp, tap_offsets(spec, 1)


# The weight-gradient layout of _valid_args' mask B 3x3: its 5 taps' positions, no colour groups.
VALID_LAYOUT = ([0, 1, 2, 3, 4], [3, 3], None, -1)


@pytest.mark.gpu
def test_glue_rejects_contract_violations():
    ops = cuda_ops()
    x, wp, offsets = _valid_args()

    def fwd(x=x, wp=wp, bias=None, residual=None, offsets=offsets, concat_elu_input=False):
        return ops.masked_conv2d_fwd(x, wp, bias, residual, offsets, concat_elu_input, True)

    def fwd_gated(wp=wp, cond=None, residual=None, addend=None, gate=1, gate_groups=1):
        return ops.masked_conv2d_fwd_gated(x, wp, None, cond, residual, addend, offsets, False, gate, gate_groups, False, True)

    with pytest.raises(RuntimeError, match="offsets must hold"):
        fwd(offsets=offsets[:-1])
    with pytest.raises(RuntimeError, match="taps but offsets hold"):
        fwd(offsets=offsets[:-2])
    with pytest.raises(RuntimeError, match="1 to 49 active taps"):
        fwd(wp=wp.repeat(11, 1, 1), offsets=offsets * 11)
    with pytest.raises(RuntimeError, match="input channels"):
        fwd(x=x[..., :7].contiguous())
    with pytest.raises(RuntimeError, match="input channels"):
        fwd(concat_elu_input=True)  # concat_elu(x) has 16 channels, wp 8
    with pytest.raises(TypeError, match="must match"):
        fwd(wp=wp.float())
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(x=x.transpose(1, 2))
    with pytest.raises(RuntimeError, match="channels-last"):
        fwd(x=x[0])
    with pytest.raises(RuntimeError, match="bias must have shape"):
        fwd(bias=torch.zeros(5, device="cuda"))
    with pytest.raises(TypeError, match="bias must be float32"):
        fwd(bias=torch.zeros(6, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda"):
        fwd(bias=torch.zeros(6))
    with pytest.raises(RuntimeError, match="residual must have shape"):
        fwd(residual=torch.zeros(1, 4, 5, 8, device="cuda", dtype=x.dtype))
    with pytest.raises(TypeError, match="residual has dtype"):
        fwd(residual=torch.zeros(1, 4, 5, 6, device="cuda"))
    with pytest.raises(RuntimeError, match="residual must be contiguous"):
        fwd(residual=torch.zeros(1, 5, 4, 6, device="cuda", dtype=x.dtype).transpose(1, 2))
    with pytest.raises(RuntimeError, match="blocks of two halves; wp has Cout 5"):
        fwd_gated(wp=wp[..., :5].contiguous())
    for gate_groups in (0, 4):  # wp has Cout 6
        with pytest.raises(RuntimeError, match=f"gate_groups = {gate_groups} blocks of two halves; wp has Cout 6"):
            fwd_gated(gate_groups=gate_groups)
    with pytest.raises(RuntimeError, match="gate must be 1"):
        fwd_gated(gate=3)
    with pytest.raises(RuntimeError, match="cond must have shape"):
        fwd_gated(cond=torch.zeros(2, 6, device="cuda"))
    with pytest.raises(RuntimeError, match="residual must have shape"):
        fwd_gated(residual=torch.zeros(1, 4, 5, 6, device="cuda", dtype=x.dtype))
    with pytest.raises(RuntimeError, match="addend must have shape"):
        fwd_gated(addend=torch.zeros(1, 4, 5, 3, device="cuda", dtype=x.dtype))
    with pytest.raises(RuntimeError, match="output channels but gout has"):
        ops.masked_conv2d_dgrad(torch.zeros(1, 4, 5, 7, device="cuda", dtype=x.dtype), wp, None, offsets, True)
    with pytest.raises(RuntimeError, match=r"x must be \(N, H, W, Cin / 2\)"):
        ops.masked_conv2d_dgrad(torch.zeros(1, 4, 5, 6, device="cuda", dtype=x.dtype), wp, x, offsets, True)
    with pytest.raises(RuntimeError, match="must match x"):
        ops.masked_conv2d_wgrad(x, torch.zeros(1, 4, 6, 6, device="cuda", dtype=x.dtype), offsets, *VALID_LAYOUT, False, True)
    gout = torch.zeros(1, 4, 5, 6, device="cuda", dtype=x.dtype)
    with pytest.raises(RuntimeError, match="tap_positions has 4 entries but offsets hold 5 taps"):
        ops.masked_conv2d_wgrad(x, gout, offsets, [0, 1, 2, 3], [3, 3], None, -1, False, True)
    with pytest.raises(RuntimeError, match=r"tap_positions must lie in \[0, kh \* kw = 9\)"):
        ops.masked_conv2d_wgrad(x, gout, offsets, [0, 1, 2, 3, 9], [3, 3], None, -1, False, True)
    with pytest.raises(RuntimeError, match="kernel_size must be"):
        ops.masked_conv2d_wgrad(x, gout, offsets, VALID_LAYOUT[0], [3], None, -1, False, True)
    with pytest.raises(RuntimeError, match=r"hidden must be contiguous \(Cout, Cin\) = \(6, 8\)"):
        ops.masked_conv2d_wgrad(x, gout, offsets, *VALID_LAYOUT[:2], torch.zeros(8, 6, device="cuda", dtype=torch.uint8), 4, False, True)
    with pytest.raises(RuntimeError, match="anchor_tap must be a tap index"):
        ops.masked_conv2d_wgrad(x, gout, offsets, *VALID_LAYOUT[:2], torch.zeros(6, 8, device="cuda", dtype=torch.uint8), 5, False, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fwd(x=x.double(), wp=wp.double())


@pytest.mark.gpu
def test_glue_rejects_images_of_2_31_pixels():
    """The kernels index a pixel within its image in 32 bits (an uninitialised 4 GiB x: no kernel runs)."""
    x = torch.empty(1, 2**16, 2**15, 1, device="cuda", dtype=torch.bfloat16)
    wp = torch.empty(1, 1, 2, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="pixels per image"):
        cuda_ops().masked_conv2d_fwd(x, wp, None, None, [0, 0], False, True)


@CUDA_KERNELS
def test_empty_batch_and_no_pixels():
    """Zero pixels launch nothing; the weight gradient of no pixels is zero."""
    ops = cuda_ops()
    x, wp, offsets = _valid_args()
    empty = x[:0]
    assert ops.masked_conv2d_fwd(empty, wp, None, None, offsets, False, True).shape == (0, 4, 5, 6)
    assert ops.masked_conv2d_dgrad(torch.zeros(0, 4, 5, 6, device=DEVICE, dtype=x.dtype), wp, None, offsets, True).shape == (0, 4, 5, 8)
    grad = ops.masked_conv2d_wgrad(empty, torch.zeros(0, 4, 5, 6, device=DEVICE, dtype=x.dtype), offsets, *VALID_LAYOUT, False, True)
    assert grad.shape == (6, 8, 3, 3) and grad.dtype == x.dtype and not grad.any()
    # concat_elu: x has half of wp's input channels; the gradients keep x's and wp's shapes.
    half_x = empty[..., :4].contiguous()
    assert ops.masked_conv2d_fwd(half_x, wp, None, None, offsets, True, True).shape == (0, 4, 5, 6)
    assert ops.masked_conv2d_dgrad(torch.zeros(0, 4, 5, 6, device=DEVICE, dtype=x.dtype), wp, half_x, offsets, True).shape == (0, 4, 5, 4)
    grad = ops.masked_conv2d_wgrad(half_x, torch.zeros(0, 4, 5, 6, device=DEVICE, dtype=x.dtype), offsets, *VALID_LAYOUT, True, True)
    assert grad.shape == (6, 8, 3, 3) and not grad.any()
