"""The masked-convolution CUDA kernels, called through torch.ops.pixelcnn_kernels_cuda.

The ops take the kernels' contract directly (channels-last x (N, H, W, Cin), the
packed weight wp (T, Cin, Cout), the taps' offsets), built with the op module's
packing helpers; every result is compared with a float64 evaluation of the
reference masked_conv2d_ref. The error allowed scales with the sum of the
magnitudes of the terms (the same convolution of |x|, |weight|, |bias|), the bound
a float32 accumulation meets, times the project's tolerance for the dtype.

CPU: the schemas the extension registers (when it is built). GPU (marked ``gpu``):
every mask kind and tap count, dilations 1/2/4, fp32 with and without TF32, fp16,
bf16, odd channel counts, N = 1, H != W, the gated epilogue, deterministic wgrad,
inputs over 2**31 elements and the glue's errors.
"""

from __future__ import annotations

import pytest
import torch

from pixelcnn_kernels import backend
from pixelcnn_kernels.backend import cuda_ops
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.ops.masked_conv import GATE_CODES, pack_weight, tap_offsets
from pixelcnn_kernels.reference.masked_conv import masked_conv2d_gated_ref, masked_conv2d_ref
from pixelcnn_kernels.testing import tolerance

SCHEMAS = {
    "masked_conv2d_fwd": "(Tensor x, Tensor wp, Tensor? bias, int[] offsets, bool allow_tf32) -> Tensor",
    "masked_conv2d_fwd_gated": (
        "(Tensor x, Tensor wp, Tensor? bias, Tensor? cond, int[] offsets, int gate, bool write_preact, bool allow_tf32) -> Tensor[]"
    ),
    "masked_conv2d_dgrad": "(Tensor gout, Tensor wp, int[] offsets, bool allow_tf32) -> Tensor",
    "masked_conv2d_wgrad": "(Tensor x, Tensor gout, int[] offsets, bool allow_tf32) -> Tensor",
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

# (N, H, W, Cin, Cout): two channel steps per tap (32 + 16) and two column blocks
# (64 + 8), multiples of 8 (the vectorised loads), channels divisible by 3 for the
# colour groups, H != W and a partial last pixel block (198 = 3 * 64 + 6).
SHAPE = (2, 9, 11, 48, 72)
# Odd channel counts (scalar loads and partial tiles everywhere), and N = 1.
ODD_SHAPES = [(2, 5, 7, 3, 5), (1, 6, 13, 64, 130)]


def _to_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous channels-last (N, H, W, C)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _make_inputs(shape, spec, dtype, *, seed=0):
    """x (N, Cin, H, W), weight (Cout, Cin, kh, kw), bias (Cout,) in ``dtype`` on the GPU, N(0, 1)."""
    batch, height, width, c_in, c_out = shape
    generator = torch.Generator(device="cuda").manual_seed(seed)
    kh, kw = spec.kernel_size

    def randn(*size):
        return torch.randn(*size, device="cuda", generator=generator).to(dtype)

    return randn(batch, c_in, height, width), randn(c_out, c_in, kh, kw), randn(c_out)


def _conv_ref(x, weight, bias, spec, dilation):
    """The float64 reference (N, H, W, Cout) and its error scale: the same conv of |x|, |weight|, |bias|."""
    x, weight = x.double(), weight.double()
    bias = None if bias is None else bias.double()
    exact = masked_conv2d_ref(x, weight, bias, spec, dilation, spec.color_groups)
    scale = masked_conv2d_ref(x.abs(), weight.abs(), None if bias is None else bias.abs(), spec, dilation, spec.color_groups)
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
    out = cuda_ops().masked_conv2d_fwd(_to_rows(x), pack_weight(weight, spec), bias, tap_offsets(spec, dilation), allow_tf32)
    expected, scale = _conv_ref(x, weight, bias, spec, dilation)
    assert out.dtype == dtype
    _assert_within(out, expected, scale, dtype, allow_tf32, f"forward {len(spec.taps)} taps")


def _check_dgrad(mask, kernel_size, color_groups, dilation, shape, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, color_groups)
    x, weight, _ = _make_inputs(shape, spec, dtype)
    gout = torch.randn(shape[0], shape[4], shape[1], shape[2], device="cuda").to(dtype)
    gx = cuda_ops().masked_conv2d_dgrad(_to_rows(gout), pack_weight(weight, spec), tap_offsets(spec, dilation), allow_tf32)

    def input_grad(x64, w64, g64):
        x64 = x64.detach().requires_grad_()
        (grad,) = torch.autograd.grad(masked_conv2d_ref(x64, w64, None, spec, dilation, spec.color_groups), x64, g64)
        return _to_rows(grad)

    expected = input_grad(x.double(), weight.double(), gout.double())
    scale = input_grad(x.double(), weight.double().abs(), gout.double().abs())
    assert gx.dtype == dtype
    _assert_within(gx, expected, scale, dtype, allow_tf32, f"dgrad {len(spec.taps)} taps")


def _wgrad_ref(x, gout, weight, spec, dilation):
    """(expected, scale) of the packed weight gradient, float64 (T, Cin, Cout)."""

    def packed_weight_grad(x64, g64):
        w64 = weight.double().detach().requires_grad_()
        (grad,) = torch.autograd.grad(masked_conv2d_ref(x64, w64, None, spec, dilation, spec.color_groups), w64, g64)
        return pack_weight(grad, spec)

    return packed_weight_grad(x.double(), gout.double()), packed_weight_grad(x.double().abs(), gout.double().abs())


def _check_wgrad(mask, kernel_size, dilation, shape, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask(mask, kernel_size, 1)  # the kernel's gwp has no colour-group zeros; the op applies them
    x, weight, _ = _make_inputs(shape, spec, dtype)
    gout = torch.randn(shape[0], shape[4], shape[1], shape[2], device="cuda").to(dtype)
    gwp = cuda_ops().masked_conv2d_wgrad(_to_rows(x), _to_rows(gout), tap_offsets(spec, dilation), allow_tf32)
    expected, scale = _wgrad_ref(x, gout, weight, spec, dilation)
    assert gwp.dtype == torch.float32
    # float32 whatever the input dtype, but accumulated on tensor cores (which truncate
    # inside an MMA) over all the pixels: the input dtype's tolerance, as for the forward.
    _assert_within(gwp, expected, scale, dtype, allow_tf32, f"wgrad {len(spec.taps)} taps")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), MASKS, ids=MASK_IDS)
def test_forward_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_forward(mask, kernel_size, color_groups, 1, SHAPE, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), DILATED_MASKS, ids=[MASK_IDS[MASKS.index(m)] for m in DILATED_MASKS])
def test_forward_dilated(mask, kernel_size, color_groups, dilation, precision):
    _check_forward(mask, kernel_size, color_groups, dilation, SHAPE, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[3]}to{s[4]}-n{s[0]}")
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), [MASKS[6], MASKS[9]], ids=["B-k3", "down_shifted"])
def test_forward_odd_channels(mask, kernel_size, color_groups, shape, precision):
    _check_forward(mask, kernel_size, color_groups, 2, shape, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), MASKS, ids=MASK_IDS)
def test_dgrad_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_dgrad(mask, kernel_size, color_groups, 1, SHAPE, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[3]}to{s[4]}-n{s[0]}")
@pytest.mark.parametrize("dilation", [2, 4])
def test_dgrad_dilated_odd_channels(dilation, shape, precision):
    _check_dgrad("vertical", 3, 1, dilation, shape, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("mask", "kernel_size", "color_groups"), [m for m in MASKS if m[2] == 1], ids=[i for m, i in zip(MASKS, MASK_IDS) if m[2] == 1])
def test_wgrad_every_tap_count(mask, kernel_size, color_groups, precision):
    _check_wgrad(mask, kernel_size, 1, SHAPE, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(4, 32, 40, 48, 72)], ids=["3to5", "64to130-n1", "split-k"])
@pytest.mark.parametrize("dilation", [1, 4])
def test_wgrad_dilated_odd_channels_and_split(dilation, shape, precision):
    _check_wgrad("down_shifted", (2, 3), dilation, shape, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_wgrad_is_deterministic(precision):
    """Split-K partials are summed in a fixed order: two runs agree bit for bit."""
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask("vertical", 3, 1)
    # 64 * 32 * 32 pixels: many splits on any GPU.
    x = torch.randn(64, 32, 32, 40, device="cuda").to(dtype)
    gout = torch.randn(64, 32, 32, 72, device="cuda").to(dtype)
    offsets = tap_offsets(spec, 1)
    first = cuda_ops().masked_conv2d_wgrad(x, gout, offsets, allow_tf32)
    second = cuda_ops().masked_conv2d_wgrad(x, gout, offsets, allow_tf32)
    assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("gate", GATE_CODES)
@pytest.mark.parametrize(("shape", "with_cond", "with_bias", "write_preact"), [
    (SHAPE, True, True, True),
    ((2, 9, 11, 48, 10), True, False, False),  # half = 5 columns
    ((1, 6, 13, 64, 130), False, True, True),  # half = 65: two column blocks per half
    ((2, 5, 7, 3, 256), True, True, False),
], ids=["48to72", "48to10-no-bias", "64to130-n1-no-cond", "3to256"])
def test_gated_forward(gate, shape, with_cond, with_bias, write_preact, precision):
    dtype, allow_tf32 = PRECISIONS[precision]
    spec = resolve_mask("vertical", 3, 1)
    x, weight, bias = _make_inputs(shape, spec, dtype)
    bias = bias if with_bias else None
    cond = torch.randn(shape[0], shape[4], device="cuda").to(dtype) if with_cond else None
    out, preact = cuda_ops().masked_conv2d_fwd_gated(
        _to_rows(x), pack_weight(weight, spec), bias, cond, tap_offsets(spec, 2), GATE_CODES[gate], write_preact, allow_tf32
    )

    cond64 = None if cond is None else cond.double()
    expected = _to_rows(masked_conv2d_gated_ref(x.double(), weight.double(), None if bias is None else bias.double(), spec, 2, 1, gate, cond64))
    pre, pre_scale = _conv_ref(x, weight, bias, spec, 2)
    if cond is not None:
        pre = pre + cond64[:, None, None, :]
        pre_scale = pre_scale + cond64.abs()[:, None, None, :]
    # The pre-activation error bounds carried through the gate: |d out / d a| <= 1 for both
    # gates and |d out / d b| <= max(1, |a|) / 4, here bounded by 1 + |a|.
    half = shape[4] // 2
    out_scale = pre_scale[..., :half] + pre_scale[..., half:] * (1 + pre[..., :half].abs())
    assert out.dtype == dtype and out.shape == (*shape[:3], half)
    _assert_within(out, expected, out_scale, dtype, allow_tf32, f"gated out, gate {gate}")
    if write_preact:
        _assert_within(preact, pre, pre_scale, dtype, allow_tf32, f"gated preact, gate {gate}")
    else:
        assert preact.numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_over_2_pow_31_elements(dtype):
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
    out = cuda_ops().masked_conv2d_fwd(x, wp, None, offsets, True)
    tail = x[:, -3:].permute(0, 3, 1, 2)
    expected, scale = _conv_ref(tail, weight, None, spec, 1)
    _assert_within(out[:, -2:], expected[:, 1:], scale[:, 1:], dtype, True, "forward, last rows")

    gout = torch.randn(batch, height, width, c_out, device="cuda", generator=generator, dtype=dtype)
    del x, out
    gx = cuda_ops().masked_conv2d_dgrad(gout, wp, offsets, True)
    # gx[y] reads gout rows y and y + 1: the last two rows need only gout's last two.
    g_tail = gout[:, -2:].permute(0, 3, 1, 2).double()
    x_tail = torch.zeros(batch, c_in, 2, width, device="cuda", dtype=torch.float64, requires_grad=True)
    (expected_gx,) = torch.autograd.grad(masked_conv2d_ref(x_tail, weight.double(), None, spec, 1, 1), x_tail, g_tail)
    x_tail_abs = x_tail.detach().requires_grad_()
    (scale_gx,) = torch.autograd.grad(masked_conv2d_ref(x_tail_abs, weight.double().abs(), None, spec, 1, 1), x_tail_abs, g_tail.abs())
    _assert_within(gx[:, -2:], _to_rows(expected_gx), _to_rows(scale_gx), dtype, True, "dgrad, last rows")


def _valid_args(dtype=torch.float16):
    spec = resolve_mask("B", 3, 1)
    x = torch.randn(1, 4, 5, 8, device="cuda").to(dtype)
    wp = torch.randn(len(spec.taps), 8, 6, device="cuda").to(dtype)
    return x, wp, tap_offsets(spec, 1)


@pytest.mark.gpu
def test_glue_rejects_contract_violations():
    ops = cuda_ops()
    x, wp, offsets = _valid_args()
    with pytest.raises(RuntimeError, match="offsets must hold"):
        ops.masked_conv2d_fwd(x, wp, None, offsets[:-1], True)
    with pytest.raises(RuntimeError, match="taps but offsets hold"):
        ops.masked_conv2d_fwd(x, wp, None, offsets[:-2], True)
    with pytest.raises(RuntimeError, match="1 to 49 active taps"):
        ops.masked_conv2d_fwd(x, wp.repeat(11, 1, 1), None, offsets * 11, True)
    with pytest.raises(RuntimeError, match="input channels"):
        ops.masked_conv2d_fwd(x[..., :7].contiguous(), wp, None, offsets, True)
    with pytest.raises(TypeError, match="must match"):
        ops.masked_conv2d_fwd(x, wp.float(), None, offsets, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.masked_conv2d_fwd(x.transpose(1, 2), wp, None, offsets, True)
    with pytest.raises(RuntimeError, match="channels-last"):
        ops.masked_conv2d_fwd(x[0], wp, None, offsets, True)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.masked_conv2d_fwd(x, wp, torch.zeros(5, device="cuda"), offsets, True)
    with pytest.raises(TypeError, match="bias must be float32"):
        ops.masked_conv2d_fwd(x, wp, torch.zeros(6, device="cuda", dtype=torch.bfloat16), offsets, True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ops.masked_conv2d_fwd(x, wp, torch.zeros(6), offsets, True)
    with pytest.raises(RuntimeError, match="odd Cout"):
        ops.masked_conv2d_fwd_gated(x, wp[..., :5].contiguous(), None, None, offsets, 1, False, True)
    with pytest.raises(RuntimeError, match="gate must be 1"):
        ops.masked_conv2d_fwd_gated(x, wp, None, None, offsets, 3, False, True)
    with pytest.raises(RuntimeError, match="cond must have shape"):
        ops.masked_conv2d_fwd_gated(x, wp, None, torch.zeros(2, 6, device="cuda"), offsets, 1, False, True)
    with pytest.raises(RuntimeError, match="output channels but gout has"):
        ops.masked_conv2d_dgrad(torch.zeros(1, 4, 5, 7, device="cuda", dtype=x.dtype), wp, offsets, True)
    with pytest.raises(RuntimeError, match="must match x"):
        ops.masked_conv2d_wgrad(x, torch.zeros(1, 4, 6, 6, device="cuda", dtype=x.dtype), offsets, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.masked_conv2d_fwd(x.double(), wp.double(), None, offsets, True)


@pytest.mark.gpu
def test_glue_rejects_images_of_2_pow_31_pixels():
    """The kernels index a pixel within its image in 32 bits (an uninitialised 4 GiB x: no kernel runs)."""
    x = torch.empty(1, 2**16, 2**15, 1, device="cuda", dtype=torch.bfloat16)
    wp = torch.empty(1, 1, 2, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="pixels per image"):
        cuda_ops().masked_conv2d_fwd(x, wp, None, [0, 0], True)


@pytest.mark.gpu
def test_empty_batch_and_no_pixels():
    """Zero pixels launch nothing; the weight gradient of no pixels is zero."""
    ops = cuda_ops()
    x, wp, offsets = _valid_args()
    empty = x[:0]
    assert ops.masked_conv2d_fwd(empty, wp, None, offsets, True).shape == (0, 4, 5, 6)
    assert ops.masked_conv2d_dgrad(torch.zeros(0, 4, 5, 6, device="cuda", dtype=x.dtype), wp, offsets, True).shape == (0, 4, 5, 8)
    gwp = ops.masked_conv2d_wgrad(empty, torch.zeros(0, 4, 5, 6, device="cuda", dtype=x.dtype), offsets, True)
    assert gwp.shape == wp.shape and gwp.dtype == torch.float32 and not gwp.any()
