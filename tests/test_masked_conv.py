"""Tests of the masked convolutions (issue 5): masked_conv2d, masked_conv2d_gated, the modules.

CPU: the reference against independent formulations, the Triton kernels under the
interpreter on tiny shapes against the float64 reference (every mask kind,
dilations, colour groups, odd channel counts; the fused residual and concat_elu
input, with and without the gate), causality by gradients, exact zero gradients of
masked-out weights, layouts, opcheck, torch.compile, state_dict round-trips, bad
input. GPU (marked ``gpu``): the triton and cuda backends in float32 (TF32 and
IEEE), float16, bfloat16 at realistic sizes, the fusions, and > 2**31 elements.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pixelcnn_kernels
from pixelcnn_kernels import backend as backend_module
from pixelcnn_kernels.backend import BackendUnavailableError, cuda_ops, unavailable_reason, use_backend
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.nn import MaskedConv2d, MaskedConv2dGated
from pixelcnn_kernels.ops import masked_conv as ops
from pixelcnn_kernels.reference.masked_conv import masked_conv2d_gated_ref, masked_conv2d_ref
from pixelcnn_kernels.reference.gates import concat_elu
from pixelcnn_kernels.testing import assert_close, tolerance
from pixelcnn_kernels.utils import channels_last, is_channels_last

masked_conv2d = pixelcnn_kernels.masked_conv2d
masked_conv2d_gated = pixelcnn_kernels.masked_conv2d_gated
GPU_BACKENDS = ("triton", "cuda")

# (mask, kernel size, dilation, colour groups, Cin, Cout, N, H, W): every mask kind,
# dilations 1/2/4, colour groups under masks A and B, odd channel counts, B = 1, H != W.
CONV_CASES = [
    ("A", 3, 1, 1, 3, 5, 2, 5, 6),
    ("B", 3, 1, 1, 3, 4, 2, 9, 10),  # 180 pixels: two pixel blocks, an image boundary inside the first
    ("B", 3, 2, 1, 4, 6, 1, 6, 5),
    ("B", 5, 1, 3, 6, 9, 2, 6, 7),
    ("A", 7, 1, 3, 3, 6, 1, 7, 6),
    ("A", 5, 4, 1, 5, 3, 1, 7, 9),
    ("vertical", 3, 1, 1, 3, 5, 2, 4, 5),
    ("vertical_A", 5, 2, 1, 2, 4, 1, 6, 5),
    ("horizontal", (1, 3), 1, 3, 6, 6, 2, 3, 5),
    ("horizontal_A", (1, 5), 2, 1, 3, 2, 1, 4, 7),
    ("down_shifted", (2, 3), 1, 1, 4, 5, 2, 5, 4),
    ("down_right_shifted", (2, 2), 1, 1, 3, 4, 1, 5, 6),
    ("full", 1, 1, 3, 3, 6, 2, 3, 4),
    ("full", 3, 2, 1, 2, 3, 1, 5, 5),
]
CASE_IDS = [f"{c[0]}-k{c[1]}-d{c[2]}-g{c[3]}-{c[4]}to{c[5]}" for c in CONV_CASES]


def as_pair(kernel_size):
    return (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size


def make_conv_inputs(c_in, c_out, kernel_size, batch, height, width, *, dtype=torch.float32, device="cpu", seed=0):
    """x ~ N(0, 1); weight ~ N(0, 1/fan-in), as a trained conv's, so outputs are O(1); bias."""
    generator = torch.Generator().manual_seed(seed)
    kh, kw = kernel_size
    x = torch.randn(batch, c_in, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kh, kw, generator=generator, dtype=torch.float64) / (c_in * kh * kw) ** 0.5
    bias = torch.randn(c_out, generator=generator, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def conv_and_grads(fn, x, weight, bias, grad_out, **kwargs):
    """(output, grad x, grad weight, grad bias) of fn(x, weight, bias, **kwargs) against grad_out."""
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    out = fn(*leaves, **kwargs)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def run_backend(backend):
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    return use_backend(backend)


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize("dilation", [1, 2])
def test_reference_full_mask_is_a_same_padded_conv(dilation):
    x, weight, bias = make_conv_inputs(3, 4, (3, 5), 2, 6, 7, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias, padding="same", dilation=dilation)
    torch.testing.assert_close(masked_conv2d_ref(x, weight, bias, "full", dilation), expected, rtol=0, atol=1e-12)


def test_reference_down_shifted_is_pixelcnn_pp_pad_then_conv():
    """PixelCNN++'s down_shifted_conv2d: pad (left, right, top) = ((kw-1)/2, (kw-1)/2, kh-1), then a valid conv."""
    x, weight, bias = make_conv_inputs(3, 4, (2, 3), 2, 5, 6, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 0)), weight, bias)
    torch.testing.assert_close(masked_conv2d_ref(x, weight, bias, "down_shifted"), expected, rtol=0, atol=1e-12)


def test_reference_mask_b_is_mask_a_plus_the_centre_tap():
    x, weight, bias = make_conv_inputs(3, 4, (3, 3), 2, 5, 5, dtype=torch.float64)
    centre_only = torch.zeros_like(weight)
    centre_only[:, :, 1, 1] = weight[:, :, 1, 1]
    expected = masked_conv2d_ref(x, weight, bias, "A") + F.conv2d(x, centre_only, padding=1)
    torch.testing.assert_close(masked_conv2d_ref(x, weight, bias, "B"), expected, rtol=0, atol=1e-12)


def test_reference_never_reads_masked_out_weights():
    """As the kernels: NaN in the masked-out weights (taps and hidden colour pairs) and in the output's
    gradient leave the output finite and the masked-out weights' gradient exactly zero."""
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 4, 4, dtype=torch.float64)
    hidden = resolve_mask("A", 3, 3).weight_mask(6, 3) == 0
    poisoned = weight.masked_fill(hidden, float("nan")).requires_grad_(True)
    out = masked_conv2d_ref(x, poisoned, bias, "A", 1, 3)
    torch.testing.assert_close(out, masked_conv2d_ref(x, weight, bias, "A", 1, 3), rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    grad_out[0, 0, 2, 2] = float("nan")
    (grad_weight,) = torch.autograd.grad(out, poisoned, grad_out)
    assert torch.equal(grad_weight[hidden], torch.zeros(int(hidden.sum()), dtype=torch.float64))


def test_reference_gradcheck():
    x, weight, bias = (t.requires_grad_(True) for t in make_conv_inputs(3, 3, (3, 3), 1, 4, 5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: masked_conv2d_ref(*a, "B", 1, 3), (x, weight, bias))


def test_reference_concat_elu_input_and_residual_are_pixelcnn_pp_pad_then_conv():
    """PixelCNN++'s ``x + down_shifted_conv(concat_elu(x))``: elu(cat([x, -x])), pad, valid conv, then the residual."""
    x, weight, bias = make_conv_inputs(3, 4, (2, 3), 2, 5, 6, dtype=torch.float64)
    residual = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    weight = torch.cat([weight, weight.flip(0)], 1)  # 2C = 6 input channels
    activation = F.elu(torch.cat([x, -x], 1))
    expected = F.conv2d(F.pad(activation, (1, 1, 1, 0)), weight, bias) + residual
    got = masked_conv2d_ref(x, weight, bias, "down_shifted", residual=residual, input_activation="concat_elu")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_reference_gated_residual_is_added_after_the_gate():
    x, weight, bias = make_conv_inputs(4, 6, (3, 3), 2, 4, 5, dtype=torch.float64)
    x = x[:, :2]  # concat_elu: 2C = 4 input channels
    residual = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    masked_weight = weight * resolve_mask("vertical", 3).weight_mask(6, 4, dtype=torch.float64)
    pre = F.conv2d(F.pad(F.elu(torch.cat([x, -x], 1)), (1, 1, 1, 1)), masked_weight, bias)
    expected = pre[:, :3] * torch.sigmoid(pre[:, 3:]) + residual
    got = masked_conv2d_gated_ref(x, weight, bias, "vertical", gate="sigmoid", residual=residual, input_activation="concat_elu")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_reference_gradcheck_residual_and_concat_elu(gated):
    x, weight, bias = make_conv_inputs(2, 4, (2, 2), 1, 3, 4, dtype=torch.float64)
    weight = torch.cat([weight, -weight], 1)
    out_channels = 2 if gated else 4
    residual = torch.randn(1, out_channels, 3, 4, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias, residual)]
    if gated:
        cond = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)

        def fn(x, weight, bias, residual, cond):
            return masked_conv2d_gated_ref(x, weight, bias, "down_right_shifted", cond=cond, residual=residual, input_activation="concat_elu")

        leaves.append(cond)
    else:

        def fn(x, weight, bias, residual):
            return masked_conv2d_ref(x, weight, bias, "down_right_shifted", residual=residual, input_activation="concat_elu")

    assert torch.autograd.gradcheck(fn, tuple(leaves))


# ------------------------------------------------------------------ kernels against the reference


@pytest.mark.parametrize("mask, kernel_size, dilation, color_groups, c_in, c_out, batch, height, width", CONV_CASES, ids=CASE_IDS)
def test_triton_matches_float64_reference(mask, kernel_size, dilation, color_groups, c_in, c_out, batch, height, width):
    kernel_size = as_pair(kernel_size)
    x, weight, bias = make_conv_inputs(c_in, c_out, kernel_size, batch, height, width)
    grad_out = torch.randn(batch, c_out, height, width)
    options = dict(mask=mask, dilation=dilation, color_groups=color_groups)
    with run_backend("triton"):
        got = conv_and_grads(masked_conv2d, x, weight, bias, grad_out, **options)
    expected = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), bias.double(), grad_out.double(), **options)
    assert_float32_results_close(("out", "grad x", "grad weight", "grad bias"), got, expected)
    hidden = resolve_mask(mask, kernel_size, color_groups).weight_mask(c_out, c_in) == 0
    assert torch.equal(got[2][hidden], torch.zeros(int(hidden.sum())))


@pytest.mark.parametrize(
    "c_in, c_out, mask, wide",
    # 64 -> 130: several column and reduction blocks, a partial last block. 128 -> 256: the forward's
    # 256 columns and the input gradient's 128 in the 128-column tiles, the weight gradient in 128 x 128.
    [(64, 130, "B", False), (128, 256, "vertical", True)],
    ids=["partial_blocks", "wide_tiles"],
)
def test_triton_many_channels_and_blocks(c_in, c_out, mask, wide):
    from pixelcnn_kernels.triton import masked_conv as kernels

    assert (kernels._conv_tiles(False, torch.float32, "tf32", c_out)[1] == kernels._BLOCK_N_WIDE) == wide
    assert (kernels._conv_tiles(False, torch.float32, "tf32", c_in)[1] == kernels._BLOCK_N_WIDE) == wide
    assert (kernels._wgrad_tiles(c_in, c_out)[:2] == (kernels._WGRAD_BLOCK_WIDE,) * 2) == wide
    x, weight, bias = make_conv_inputs(c_in, c_out, (3, 3), 1, 3, 4)
    grad_out = torch.randn(1, c_out, 3, 4)
    with run_backend("triton"):
        got = conv_and_grads(masked_conv2d, x, weight, bias, grad_out, mask=mask)
    expected = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), bias.double(), grad_out.double(), mask=mask)
    assert_float32_results_close(("out", "grad x", "grad weight", "grad bias"), got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_precision(dtype):
    """16-bit tiles into tl.dot, fp32 accumulation (bfloat16 in the interpreter: triton.utils' widened dot)."""
    x, weight, bias = make_conv_inputs(5, 6, (3, 3), 2, 4, 5, dtype=dtype)
    grad_out = torch.randn(2, 6, 4, 5, dtype=dtype)
    with run_backend("triton"):
        got = conv_and_grads(masked_conv2d, x, weight, bias, grad_out, mask="A")
    expected = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), bias.double(), grad_out.double(), mask="A")
    for name, g, e in zip(("out", "grad x", "grad weight", "grad bias"), got, expected):
        assert g.dtype == dtype
        assert_close(g, e, dtype=dtype, msg=name)


def test_triton_custom_tensor_mask():
    spatial = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    x, weight, bias = make_conv_inputs(3, 4, (3, 3), 2, 5, 4)
    with run_backend("triton"):
        got = masked_conv2d(x, weight, bias, spatial, 2)
    assert_close(got, masked_conv2d_ref(x.double(), weight.double(), bias.double(), spatial, 2), dtype=torch.float32)


def test_triton_never_reads_masked_out_weights():
    """NaN in every masked-out weight (taps and hidden colour pairs) leaves the kernels' results finite."""
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 4, 4)
    hidden = resolve_mask("A", 3, 3).weight_mask(6, 3) == 0
    poisoned = weight.masked_fill(hidden, float("nan"))
    grad_out = torch.randn(1, 6, 4, 4)
    with run_backend("triton"):
        out, grad_x, grad_weight, _ = conv_and_grads(masked_conv2d, x, poisoned, bias, grad_out, mask="A", color_groups=3)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    assert torch.equal(grad_weight[hidden], torch.zeros(int(hidden.sum())))
    assert_close(out, masked_conv2d_ref(x.double(), weight.double(), bias.double(), "A", 1, 3), dtype=torch.float32)


def _moved_by_tap(x_rows: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x_rows (N, H, W, C) read at each pixel moved by (dy, dx), zeros where that leaves the image."""
    _, height, width, _ = x_rows.shape
    moved = torch.zeros_like(x_rows)
    moved[:, max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = x_rows[:, max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)]
    return moved


@pytest.mark.parametrize("input_activation, dropout", [(None, False), ("concat_elu", False), ("concat_elu", True)], ids=["x", "concat_elu", "concat_elu_dropout"])
@pytest.mark.parametrize("mask, kernel_size, dilation", [("vertical", 3, 1), ("down_shifted", None, 1), ("B", 3, 2)])
def test_triton_tf32_weight_grad_reads_x_copied_per_tap(mask, kernel_size, dilation, input_activation, dropout):
    """With TF32 products (and 64 or more input channels) the weight gradient reads its input from a
    copy moved by each tap, pixel-major, concat_elu and its dropout computed by the copy: the copy is
    the input moved (zeros outside the image), and the gradient the one read from the materialised
    channels-last rows, bit for bit in the interpreter (whose TF32 is exact)."""
    from pixelcnn_kernels.triton import masked_conv as kernels

    concat_elu_input = input_activation is not None
    spec = resolve_mask(mask, kernel_size)
    channels = 32 if concat_elu_input else 64  # 64 input channels either way
    x, weight, _ = make_conv_inputs(channels, 16, spec.kernel_size, 2, 5, 6)
    if concat_elu_input:
        weight = torch.cat([weight, weight], 1)
    offsets = ops.tap_offsets(spec, dilation)
    x_rows = x.permute(0, 2, 3, 1).contiguous()
    keep = pixelcnn_kernels.draw_dropout_keep(x, 64, 0.5, torch.Generator().manual_seed(1)) if dropout else None
    keep_rows, keep_scale = ops._keep_rows(keep), ops.dropout_scale(0.5 if dropout else 0.0)
    grad_out = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(3))
    grad_rows = grad_out.permute(0, 2, 3, 1).contiguous()
    assert kernels._tap_major_x("tf32", 64, 1) and not kernels._tap_major_x("ieee", 64, 1) and not kernels._tap_major_x("tf32", 64, 2**31)
    with run_backend("triton"):
        copy = kernels._tap_major_rows(x_rows, offsets, concat_elu_input, keep_rows, keep_scale)
        layout = ops.weight_grad_layout(spec, weight)
        tf32 = kernels.masked_conv2d_wgrad(x_rows, grad_rows, offsets, *layout, concat_elu_input, True, keep_rows, keep_scale)
        ieee = kernels.masked_conv2d_wgrad(x_rows, grad_rows, offsets, *layout, concat_elu_input, False, keep_rows, keep_scale)
        input_rows = kernels._concat_elu_rows(x_rows, keep_rows, keep_scale) if concat_elu_input else x_rows
    moved = [_moved_by_tap(input_rows, dy, dx).permute(3, 0, 1, 2).reshape(64, -1) for dy, dx in zip(offsets[0::2], offsets[1::2])]
    assert torch.equal(copy, torch.stack(moved))
    assert torch.equal(tf32, ieee)
    dropout_args = dict(dropout_keep=keep, dropout_p=0.5) if dropout else {}
    _, _, expected, _ = conv_and_grads(
        masked_conv2d_ref, x.double(), weight.double(), torch.zeros(16, dtype=torch.float64), grad_out.double(), mask=spec, dilation=dilation,
        input_activation=input_activation, **dropout_args,
    )  # fmt: skip
    assert_close_at_scale(tf32, expected, dtype=torch.float32)


@pytest.mark.parametrize("input_activation", [None, "concat_elu"])
@pytest.mark.parametrize(
    "batch, height, width",
    # A 32-pixel block steps 5 rows and 2 columns on to the next image; a row wider than a block;
    # a block spanning several 2x3 images. Each program of the split runs several blocks.
    [(2, 7, 6), (1, 5, 40), (20, 2, 3)],
)
def test_triton_weight_grad_split_reduction_is_deterministic_and_correct(input_activation, batch, height, width):
    """Split in partial sums or not, the weight gradient matches the reference; a split run repeats bit for bit.

    The kernel advances each pixel's row and column from block to block (no division in its loop):
    the sizes make those steps wrap across rows and images. 11 splits (some of them empty) take the
    finishing pass over more than one step of _FINISH_BLOCK_SPLITS."""
    from pixelcnn_kernels.triton import masked_conv as kernels

    concat_elu_input = input_activation is not None
    x, weight, _ = make_conv_inputs(4, 5, (3, 3), batch, height, width)
    if concat_elu_input:
        weight = torch.cat([weight, weight], 1)
    spec = resolve_mask("B", 3)
    grad_out = torch.randn(batch, 5, height, width)
    x_rows, grad_rows = x.permute(0, 2, 3, 1).contiguous(), grad_out.permute(0, 2, 3, 1).contiguous()
    args = (ops.tap_offsets(spec, 1), *ops.weight_grad_layout(spec, weight), concat_elu_input, False)
    with run_backend("triton"):
        whole = kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, num_splits=1)
        split = kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, num_splits=3)
        assert torch.equal(split, kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, num_splits=3))
        many = kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, num_splits=11)
    assert 11 > kernels._FINISH_BLOCK_SPLITS
    _, _, expected, _ = conv_and_grads(
        masked_conv2d_ref, x.double(), weight.double(), torch.zeros(5, dtype=torch.float64), grad_out.double(), mask=spec, input_activation=input_activation
    )
    for grad in (whole, split, many):  # sums over 200-240 pixels: held to the sums' scale, not each result's
        assert_close_at_scale(grad, expected, dtype=torch.float32)


def test_triton_tf32_weight_grad_reads_a_pixel_major_gout():
    """With TF32 allowed and a full tile of input channels the weight gradient reads a pixel-major
    copy of gout (_pixel_major_gout); the interpreter's products are exact, so it matches the
    channels-last read bit for bit, and the reference."""
    from pixelcnn_kernels.triton import masked_conv as kernels

    x, weight, _ = make_conv_inputs(64, 16, (1, 3), 2, 3, 5)
    spec = resolve_mask("horizontal", (1, 3))
    grad_out = torch.randn(2, 16, 3, 5)
    x_rows, grad_rows = x.permute(0, 2, 3, 1).contiguous(), grad_out.permute(0, 2, 3, 1).contiguous()
    args = (ops.tap_offsets(spec, 1), *ops.weight_grad_layout(spec, weight), False)
    assert kernels._pixel_major_gout("tf32", False, 64) and not kernels._pixel_major_gout("ieee", False, 64)
    with run_backend("triton"):
        pixel_major = kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, True)
        channels_last = kernels.masked_conv2d_wgrad(x_rows, grad_rows, *args, False)
    assert torch.equal(pixel_major, channels_last)
    _, _, expected, _ = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), torch.zeros(16, dtype=torch.float64), grad_out.double(), mask=spec)
    assert_close(pixel_major, expected, dtype=torch.float32)


@pytest.mark.parametrize("gate", ["tanh_sigmoid", "sigmoid"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_matches_float64_reference(gate, backend):
    """2·6·7 = 84 pixels: two of the gated kernel's pixel blocks."""
    x, weight, bias = make_conv_inputs(3, 8, (3, 3), 2, 6, 7)
    cond = torch.randn(2, 8)
    grad_out = torch.randn(2, 4, 6, 7)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias, cond)]
    with run_backend(backend):
        out = masked_conv2d_gated(*leaves[:3], "vertical", gate=gate, cond=leaves[3])
        got = (out, *torch.autograd.grad(out, leaves, grad_out))
        no_grad_out = masked_conv2d_gated(*(t.detach() for t in leaves[:3]), "vertical", gate=gate, cond=cond.detach())
    doubles = [t.detach().double().requires_grad_(True) for t in leaves]
    expected_out = masked_conv2d_gated_ref(*doubles[:3], "vertical", gate=gate, cond=doubles[3])
    expected = (expected_out, *torch.autograd.grad(expected_out, doubles, grad_out.double()))
    assert_float32_results_close(("out", "grad x", "grad weight", "grad bias", "grad cond"), got, expected)
    assert torch.equal(no_grad_out, out.detach())


# (mask, kernel size, dilation, colour groups, C (x's channels), Cout, N, H, W, residual, input_activation):
# PixelCNN++'s shifted convs and its 1×1 nin on concat_elu(x); C = 20 puts the boundary
# between elu(x) and elu(-x) inside a reduction block (2C = 40: blocks of 32), and a
# column block of the fused input gradient; the residual alone with colour groups.
FUSED_CASES = [
    ("down_shifted", (2, 3), 1, 1, 3, 5, 2, 5, 4, True, "concat_elu"),
    ("down_right_shifted", (2, 2), 1, 1, 4, 4, 1, 5, 6, False, "concat_elu"),
    ("full", 1, 1, 1, 20, 6, 1, 3, 4, True, "concat_elu"),
    ("B", 3, 2, 3, 6, 9, 2, 4, 5, True, None),
]
FUSED_IDS = [f"{c[0]}-g{c[3]}-{c[4]}to{c[5]}{'-residual' if c[9] else ''}{'-concat_elu' if c[10] else ''}" for c in FUSED_CASES]


def make_fused_inputs(c_x, c_out, kernel_size, batch, height, width, input_activation, residual_channels, *, dtype=torch.float32, device="cpu"):
    """x (N, C, H, W); weight (Cout, C or 2C, kh, kw); bias; a residual (N, residual_channels, H, W) or None."""
    c_in = 2 * c_x if input_activation == "concat_elu" else c_x
    x, weight, bias = make_conv_inputs(c_in, c_out, kernel_size, batch, height, width, dtype=dtype, device=device)
    residual = None if residual_channels is None else torch.randn(batch, residual_channels, height, width, dtype=dtype, device=device)
    return x[:, :c_x].contiguous(), weight, bias, residual


def gated_with_cond(fn, **gate_options):
    """The gated conv ``fn`` as f(x, weight, bias, cond, **kwargs), cond positional as fused_and_grads passes it."""
    return lambda x, weight, bias, cond, **kwargs: fn(x, weight, bias, cond=cond, **gate_options, **kwargs)


def fused_and_grads(fn, tensors, grad_out, **kwargs):
    """fn(*tensors, **kwargs) with residual= the last tensor (if any), and its gradients w.r.t. every tensor."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in tensors]
    *args, residual = leaves
    out = fn(*args, residual=residual, **kwargs)
    present = [t for t in leaves if t is not None]
    return (out, *torch.autograd.grad(out, present, grad_out))


@pytest.mark.parametrize(
    "mask, kernel_size, dilation, color_groups, c_x, c_out, batch, height, width, with_residual, input_activation", FUSED_CASES, ids=FUSED_IDS
)
def test_triton_fused_matches_float64_reference(mask, kernel_size, dilation, color_groups, c_x, c_out, batch, height, width, with_residual, input_activation):
    kernel_size = as_pair(kernel_size)
    x, weight, bias, residual = make_fused_inputs(c_x, c_out, kernel_size, batch, height, width, input_activation, c_out if with_residual else None)
    grad_out = torch.randn(batch, c_out, height, width)
    options = dict(mask=mask, dilation=dilation, color_groups=color_groups, input_activation=input_activation)
    with run_backend("triton"):
        got = fused_and_grads(masked_conv2d, (x, weight, bias, residual), grad_out, **options)
    doubles = [None if t is None else t.double() for t in (x, weight, bias, residual)]
    expected = fused_and_grads(masked_conv2d_ref, doubles, grad_out.double(), **options)
    names = ("out", "grad x", "grad weight", "grad bias", "grad residual")[: len(got)]
    assert_float32_results_close(names, got, expected)
    if with_residual:
        assert torch.equal(got[-1], grad_out)


@pytest.mark.parametrize("with_residual, input_activation", [(True, None), (False, "concat_elu"), (True, "concat_elu")], ids=["residual", "concat_elu", "both"])
@pytest.mark.parametrize("gate", ["tanh_sigmoid", "sigmoid"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_fused_matches_float64_reference(backend, gate, with_residual, input_activation):
    """The gated conv with a residual after the gate and/or a concat_elu input (2·5·7 pixels: two pixel blocks)."""
    x, weight, bias, residual = make_fused_inputs(3, 8, (2, 3), 2, 5, 7, input_activation, 4 if with_residual else None)
    cond = torch.randn(2, 8)
    grad_out = torch.randn(2, 4, 5, 7)
    options = dict(mask="down_shifted", gate=gate, input_activation=input_activation)

    with run_backend(backend):
        got = fused_and_grads(gated_with_cond(masked_conv2d_gated), (x, weight, bias, cond, residual), grad_out, **options)
        with torch.no_grad():
            inference = masked_conv2d_gated(x, weight, bias, cond=cond, residual=residual, **options)
    doubles = [None if t is None else t.double() for t in (x, weight, bias, cond, residual)]
    expected = fused_and_grads(gated_with_cond(masked_conv2d_gated_ref), doubles, grad_out.double(), **options)
    names = ("out", "grad x", "grad weight", "grad bias", "grad cond", "grad residual")[: len(got)]
    assert_float32_results_close(names, got, expected)
    assert torch.equal(inference, got[0].detach())


def test_reference_dropout_after_concat_elu_is_dropout_of_the_activation():
    """dropout_keep: the conv reads concat_elu(x) with the dropped elements 0 and the kept ones times 1 / (1 - p)."""
    x, weight, bias = make_conv_inputs(6, 5, (2, 3), 2, 4, 5, dtype=torch.float64)
    x = x[:, :3]
    keep = pixelcnn_kernels.draw_dropout_keep(x, 6, 0.3, torch.Generator().manual_seed(1))
    assert keep.dtype == torch.bool and keep.shape == (2, 6, 4, 5) and keep.is_contiguous(memory_format=torch.channels_last)
    assert 0 < keep.sum() < keep.numel()
    dropped = torch.where(keep, concat_elu(x, 1) / 0.7, 0.0)
    got = masked_conv2d_ref(x, weight, bias, "down_shifted", input_activation="concat_elu", dropout_keep=keep, dropout_p=0.3)
    assert_close(got, masked_conv2d_ref(dropped, weight, bias, "down_shifted"), dtype=torch.float64)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dropout_after_concat_elu_matches_float64_reference(backend, gated, dtype=torch.float32):
    """PixelCNN++'s concat_elu → dropout → conv in one op (2·5·7 pixels, C = 20: the elu(x) / elu(-x) boundary
    inside a reduction block): output and every gradient against float64, and different from the undropped conv.
    In 16 bits the dropped activation is rounded as a materialised one would be, which no per-op tolerance
    bounds: the layers' tests check that the fused layer is as accurate as the reference-built one there."""
    x, weight, bias, residual = make_fused_inputs(20, 8, (2, 3), 2, 5, 7, "concat_elu", 4 if gated else 8, dtype=dtype)
    cond = torch.randn(2, 8, dtype=dtype) if gated else None
    grad_out = torch.randn(2, 4 if gated else 8, 5, 7, dtype=dtype)
    keep = pixelcnn_kernels.draw_dropout_keep(x, 40, 0.5, torch.Generator().manual_seed(0))
    dropout = dict(dropout_keep=keep, dropout_p=0.5)
    options = dict(mask="down_shifted", input_activation="concat_elu", **({"gate": "sigmoid"} if gated else {}))
    op, ref = (gated_with_cond(masked_conv2d_gated), gated_with_cond(masked_conv2d_gated_ref)) if gated else (masked_conv2d, masked_conv2d_ref)
    tensors = (x, weight, bias, cond, residual) if gated else (x, weight, bias, residual)
    with run_backend(backend):
        got = fused_and_grads(op, tensors, grad_out, **options, **dropout)
        undropped = fused_and_grads(op, tensors, grad_out, **options)
    doubles = [None if t is None else t.double() for t in tensors]
    expected = fused_and_grads(ref, doubles, grad_out.double(), **options, **dropout)
    names = ("out", "grad x", "grad weight", "grad bias", "grad cond", "grad residual") if gated else ("out", "grad x", "grad weight", "grad bias", "grad residual")
    for name, g, e in zip(names, got, expected, strict=True):
        # The parameters' gradients sum over every pixel: at the scale of their terms (exp's argument
        # is rounded on the GPU, and in the interpreter, before ex2: ~2^-21 relative at |x| ~ 10).
        check = assert_close_at_scale if name in ("grad weight", "grad bias", "grad cond") else assert_close
        check(g, e, dtype=dtype, msg=name)
    for name, g, u in zip(names[:3], got, undropped):
        assert not torch.allclose(g, u), name  # the mask was applied, forward and backward


def test_dropout_keep_bad_input():
    x, weight, bias = make_conv_inputs(6, 4, (2, 3), 2, 3, 4)
    x = x[:, :3]
    keep = torch.ones(2, 6, 3, 4, dtype=torch.bool)
    options = dict(mask="down_shifted", input_activation="concat_elu")
    with pytest.raises(ValueError, match="dropout_keep needs input_activation='concat_elu'"):
        masked_conv2d(torch.cat([x, x], 1), weight, bias, "down_shifted", dropout_keep=keep, dropout_p=0.5)
    with pytest.raises(TypeError, match="^dropout_keep must have dtype bool"):
        masked_conv2d(x, weight, bias, **options, dropout_keep=keep.float(), dropout_p=0.5)
    with pytest.raises(ValueError, match=r"dropout_keep must have the convolution input's shape \(N, Cin, H, W\) = \(2, 6, 3, 4\)"):
        masked_conv2d(x, weight, bias, **options, dropout_keep=keep[:, :3], dropout_p=0.5)
    for p in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="dropout_p must be a float in"):
            masked_conv2d_gated(x, weight, bias, **options, dropout_keep=keep, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_keep is on meta but x is on cpu"):
        masked_conv2d(x, weight, bias, **options, dropout_keep=keep.to("meta"), dropout_p=0.5)
    with pytest.raises(ValueError, match="dropout_p=0.5 needs dropout_keep"):
        masked_conv2d(x, weight, bias, **options, dropout_p=0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_finite_values_at_dropped_elements_stay_non_finite(backend):
    """Dropout multiplies by its mask (nn.Dropout's and the reference's 0·NaN = NaN): a NaN in x whose
    activations are both dropped still reaches the outputs that read it, as in the reference."""
    x, weight, bias, _ = make_fused_inputs(3, 6, (2, 3), 2, 4, 5, "concat_elu", None)
    x[0, 0, 3, 2] = float("nan")
    keep = pixelcnn_kernels.draw_dropout_keep(x, 6, 0.5, torch.Generator().manual_seed(0))
    keep[0, (0, 3), 3, 2] = False
    options = dict(mask="down_shifted", input_activation="concat_elu", dropout_keep=keep, dropout_p=0.5)
    expected = masked_conv2d_ref(x.double(), weight.double(), bias.double(), **options)
    with run_backend(backend):
        got = masked_conv2d(x, weight, bias, **options)
    assert torch.equal(got.isnan(), expected.isnan()) and int(got.isnan().sum()) > 0


@pytest.mark.parametrize("cond_grad", [True, False], ids=["cond_grad", "cond_constant"])
@pytest.mark.parametrize("used", ["both", "out", "pre"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_addend_and_preactivation_match_float64_reference(backend, used, cond_grad):
    """Gated PixelCNN's stacks: an addend before the gate, the pre-activation returned; either output or both feed the loss.

    With a constant cond (or none), the gate's backward adds pre's own gradient in its pass (``accumulate``)."""
    x, weight, bias = make_conv_inputs(3, 8, (1, 3), 2, 6, 7)
    cond, addend = torch.randn(2, 8), torch.randn(2, 8, 6, 7)
    grads_out = {"out": torch.randn(2, 4, 6, 7), "pre": torch.randn(2, 8, 6, 7)}
    weights = {"both": (1, 1), "out": (1, 0), "pre": (0, 1)}[used]

    def outputs_and_grads(fn, tensors):
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        cond = leaves[3] if cond_grad else leaves[3].detach()
        out, pre = fn(*leaves[:3], "horizontal", cond=cond, addend=leaves[4], return_preactivation=True)
        loss = sum(w * (t * grads_out[name].to(t.dtype)).sum() for w, name, t in zip(weights, ("out", "pre"), (out, pre)) if w)
        return (out, pre, *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))

    with run_backend(backend):
        got = outputs_and_grads(masked_conv2d_gated, (x, weight, bias, cond, addend))
        with torch.no_grad():
            inference = masked_conv2d_gated(x, weight, bias, "horizontal", cond=cond, addend=addend, return_preactivation=True)
    expected = outputs_and_grads(masked_conv2d_gated_ref, [t.double() for t in (x, weight, bias, cond, addend)])
    names = ("out", "pre", "grad x", "grad weight", "grad bias", "grad cond", "grad addend")
    assert_float32_results_close(names, got, expected)
    assert all(torch.equal(i, g.detach()) for i, g in zip(inference, got[:2]))
    if used == "pre":  # no gradient through the gate: pre's gradient reaches addend unchanged, cond gets none
        assert torch.equal(got[-1], grads_out["pre"]) and torch.equal(got[-2], torch.zeros_like(cond))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_residual_alone_needs_no_preactivation(backend):
    """Only the residual asks for a gradient: the forward keeps no pre-activation, and the backward passes grad_out on."""
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 4, 4)
    residual = torch.randn(1, 3, 4, 4, requires_grad=True)
    grad_out = torch.randn(1, 3, 4, 4)
    with run_backend(backend):
        out = masked_conv2d_gated(x, weight, bias, "B", residual=residual)
        (grad_residual,) = torch.autograd.grad(out, residual, grad_out)
    assert torch.equal(grad_residual, grad_out)


@pytest.mark.parametrize("c_out, blocks", [(12, (4, 4, 4)), (16, (6, 6, 4))], ids=["thirds", "43-43-42-like"])
def test_reference_gated_conv_in_groups_is_the_gated_conv_of_each_group(c_out, blocks):
    """gate_groups=3: each block [a_g b_g], twice the output's colour group g (8 channels: 3, 3, 2), is gated as a
    conv of its own; the outputs in order."""
    x, weight, bias = make_conv_inputs(3, c_out, (1, 3), 2, 4, 5, dtype=torch.float64)
    cond, addend, residual = torch.randn(2, c_out, dtype=torch.float64), torch.randn(2, c_out, 4, 5, dtype=torch.float64), torch.randn(2, c_out // 2, 4, 5, dtype=torch.float64)
    out, pre = masked_conv2d_gated_ref(x, weight, bias, "horizontal", cond=cond, addend=addend, residual=residual, return_preactivation=True, gate_groups=3)
    starts = (0, blocks[0], blocks[0] + blocks[1], c_out)
    block_slices = [slice(starts[g], starts[g + 1]) for g in range(3)]
    per_group = [masked_conv2d_gated_ref(x, weight[s], bias[s], "horizontal", cond=cond[:, s], addend=addend[:, s]) for s in block_slices]
    assert_close(out, torch.cat(per_group, 1) + residual)
    assert torch.equal(pre, masked_conv2d_ref(x, weight, bias, "horizontal", residual=addend))


# (mask, kernel size, colour groups, Cin, Cout): Colour Gated PixelCNN's horizontal link (a
# 1×1 without colour mask gating a colour-major pre-activation) and a colour-masked
# horizontal conv gated per colour, in equal groups (9 channels) and not (8: 3, 3, 2);
# 2·5·7 = 70 pixels: two of the gated kernel's pixel blocks.
GATED_IN_GROUPS_CASES = [("full", 1, 1, 6, 12), ("horizontal", (1, 3), 3, 3, 18), ("horizontal", (1, 3), 3, 3, 16)]


@pytest.mark.parametrize("cond_grad", [True, False], ids=["cond_grad", "cond_constant"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mask, kernel_size, color_groups, c_in, c_out", GATED_IN_GROUPS_CASES, ids=["link", "colour_masked", "colour_masked_unequal"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_in_three_groups_matches_float64_reference(backend, mask, kernel_size, color_groups, c_in, c_out, layout, cond_grad):
    """bias, cond, addend and the returned pre-activation in the colour-major layout; gradients of every input;
    channels-last activations (the models' layout on a GPU) give channels-last outputs. A constant cond: the
    gate's backward adds pre's own gradient in its pass, through the same grouped view."""
    in_layout = channels_last if layout == "channels_last" else (lambda t: t)
    x, weight, bias = make_conv_inputs(c_in, c_out, as_pair(kernel_size), 2, 5, 7)
    cond, addend, residual = torch.randn(2, c_out), torch.randn(2, c_out, 5, 7), torch.randn(2, c_out // 2, 5, 7)
    x, addend, residual = in_layout(x), in_layout(addend), in_layout(residual)
    grads_out = (torch.randn(2, c_out // 2, 5, 7), torch.randn(2, c_out, 5, 7))
    options = dict(mask=mask, color_groups=color_groups, gate_groups=3, return_preactivation=True)

    def outputs_and_grads(fn, tensors):
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        x, weight, bias, cond, addend, residual = leaves
        out, pre = fn(x, weight, bias, cond=cond if cond_grad else cond.detach(), addend=addend, residual=residual, **options)
        loss = (out * grads_out[0].to(out.dtype)).sum() + (pre * grads_out[1].to(pre.dtype)).sum()
        return (out, pre, *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))

    tensors = (x, weight, bias, cond, addend, residual)
    with run_backend(backend):
        got = outputs_and_grads(masked_conv2d_gated, tensors)
        with torch.no_grad():
            inference = masked_conv2d_gated(x, weight, bias, cond=cond, addend=addend, residual=residual, **options)
    expected = outputs_and_grads(masked_conv2d_gated_ref, [t.double() for t in tensors])
    names = ("out", "pre", "grad x", "grad weight", "grad bias", "grad cond", "grad addend", "grad residual")
    for name, g, e in zip(names, got, expected, strict=True):
        if name == "grad cond" and not cond_grad:
            assert torch.equal(g, torch.zeros_like(g))
            continue
        # At the scale of each result: the weight's and cond's gradients sum 70 and 35 products that may cancel.
        assert_close_at_scale(g, e, dtype=torch.float32, msg=name)
    assert all(torch.equal(i, g.detach()) for i, g in zip(inference, got[:2]))
    assert all(is_channels_last(t) == (layout == "channels_last") for t in got[:3])  # out, pre, grad x
    if color_groups > 1:
        hidden = resolve_mask(mask, kernel_size, 3).weight_mask(c_out, c_in) == 0
        assert hidden.any() and torch.all(got[3][hidden] == 0)  # colour-masked weights get exact zeros


# ------------------------------------------------------------------ causality and masked-out weights


def must_see(spec, c_out, c_in, height, width, y0, x0, co, dilation=1):
    """Boolean (Cin, H, W): the inputs output (co, y0, x0) depends on under the spec."""
    weight_mask = spec.weight_mask(c_out, c_in).bool()
    seen = torch.zeros(c_in, height, width, dtype=torch.bool)
    ai, aj = spec.anchor
    for i, j in spec.taps:
        y, x = y0 + (i - ai) * dilation, x0 + (j - aj) * dilation
        if 0 <= y < height and 0 <= x < width:
            seen[:, y, x] |= weight_mask[co, :, i, j]
    return seen


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "mask, kernel_size, color_groups, dilation",
    [("A", 3, 3, 1), ("B", 5, 3, 2), ("vertical_A", 3, 1, 1), ("horizontal", (1, 3), 3, 1), ("down_shifted", (2, 3), 1, 1)],
)
def test_causality(backend, mask, kernel_size, color_groups, dilation):
    """d out[co, y0, x0] / d x is exactly zero where the mask hides the input, non-zero where it shows it."""
    kernel_size = as_pair(kernel_size)
    c_in, c_out, height, width = 3, 6, 6, 6
    spec = resolve_mask(mask, kernel_size, color_groups)
    x, weight, bias = make_conv_inputs(c_in, c_out, kernel_size, 1, height, width)
    x.requires_grad_(True)
    with run_backend(backend):
        out = masked_conv2d(x, weight, bias, mask, dilation, color_groups)
        for co, (y0, x0) in zip(range(0, c_out, 2), [(3, 3), (0, 5), (5, 0)]):
            (grad,) = torch.autograd.grad(out[0, co, y0, x0], x, retain_graph=True)
            seen = must_see(spec, c_out, c_in, height, width, y0, x0, co, dilation)
            assert torch.equal(grad[0][~seen], torch.zeros(int((~seen).sum()))), f"output {(co, y0, x0)} sees a hidden input"
            assert (grad[0][seen] != 0).all(), f"output {(co, y0, x0)} misses an input it must see"


# ------------------------------------------------------------------ layouts and packing


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_output_keeps_the_input_memory_format(backend):
    x, weight, bias = make_conv_inputs(3, 4, (3, 3), 2, 4, 5)
    with run_backend(backend):
        plain = masked_conv2d(x, weight, bias, "B")
        channels_last = masked_conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, "B")
    assert plain.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    assert_close(channels_last, plain)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_one_channel_input_laid_out_channels_last_gives_a_channels_last_output(backend):
    """Both layouts fit a one-channel tensor; the channel stride decides, as for PyTorch's convolutions
    (a grey image entering a model): 1, as utils.channels_last lays it out, is channels-last."""
    x, weight, bias = make_conv_inputs(1, 4, (3, 3), 2, 4, 5)
    marked = channels_last(x)
    assert torch.equal(marked, x) and marked.stride(1) == 1 and is_channels_last(marked) and not is_channels_last(x)
    assert channels_last(marked) is marked
    with run_backend(backend):
        plain, from_marked = (masked_conv2d(t, weight, bias, "B") for t in (x, marked))
    assert plain.is_contiguous() and is_channels_last(from_marked)
    assert_close(from_marked, plain)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("channels, height, width", [(1, 4, 5), (3, 1, 1)], ids=["one_channel", "one_pixel"])
def test_outputs_and_gradients_that_fit_both_layouts_have_the_fakes_strides(backend, layout, channels, height, width):
    """A one-channel or one-pixel tensor fits both layouts, and is_channels_last says which: the real outputs'
    strides, also along dimensions of size 1, must be the fake implementations' (``_empty_nchw``), or
    torch.compile's inductor rejects the graph."""
    x, weight, bias = make_conv_inputs(channels, channels, (3, 3), 2, height, width)
    x = channels_last(x) if layout == "channels_last" else x
    x.requires_grad_(True)
    with run_backend(backend):
        outputs = [masked_conv2d(x, weight, bias, "B"), masked_conv2d_gated(x, torch.randn(2 * channels, channels, 3, 3), torch.randn(2 * channels), "B")]
        outputs += [torch.autograd.grad(out.sum(), x)[0] for out in outputs]  # each op's own input gradient
    fake_stride = ops._empty_nchw(x, channels).stride()
    assert [t.stride() for t in outputs] == [fake_stride] * 4
    assert is_channels_last(outputs[0]) == is_channels_last(x)


def test_packed_weight_and_the_weight_grad_layout_follow_the_tap_order():
    spec = resolve_mask("B", 3, 3)
    weight = torch.randn(6, 3, 3, 3)
    packed = ops.pack_weight(weight, spec)
    assert packed.shape == (len(spec.taps), 3, 6) and packed.is_contiguous()
    mask = spec.weight_mask(6, 3)
    for t, (i, j) in enumerate(spec.taps):
        assert torch.equal(packed[t], (weight * mask)[:, :, i, j].T)
    positions, kernel_size, hidden, anchor_tap = ops.weight_grad_layout(spec, weight)
    assert positions == [i * 3 + j for i, j in spec.taps] and kernel_size == [3, 3]
    # The pairs the colour groups hide at the anchor tap: where the mask is 0 there.
    assert spec.taps[anchor_tap] == spec.anchor == (1, 1)
    assert hidden.dtype == torch.uint8 and torch.equal(hidden.bool(), ~mask[:, :, 1, 1].bool())
    assert ops.weight_grad_layout(resolve_mask("B", 3), weight)[2:] == (None, -1)
    assert ops.tap_offsets(resolve_mask("down_shifted"), 2) == [-2, -2, -2, 0, -2, 2, 0, -2, 0, 0, 0, 2]


@pytest.mark.parametrize("halves_first", [
    [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11],  # groups of 2 gated channels: blocks of 4
    [0, 1, 2, 6, 7, 8, 12, 13, 3, 4, 5, 9, 10, 11, 14, 15],  # 8 gated channels in groups of 3, 3, 2: blocks of 6, 6, 4
], ids=["equal_groups", "smaller_last_group"])  # fmt: skip
def test_packed_gated_weight_in_groups_comes_halves_first(halves_first):
    """[a_R b_R | a_G b_G | a_B b_B] packed as [a_R a_G a_B | b_R b_G b_B]: the kernels pair column n with n + Cout / 2."""
    c_out = len(halves_first)
    spec = resolve_mask("horizontal", (1, 3), 3)
    weight = torch.randn(c_out, 3, 1, 3)
    packed = ops.pack_weight(weight, spec, gate_groups=3)
    assert packed.shape == (len(spec.taps), 3, c_out) and packed.is_contiguous()
    masked = weight * spec.weight_mask(c_out, 3)
    for t, (i, j) in enumerate(spec.taps):
        assert torch.equal(packed[t], masked[halves_first, :, i, j].T)


def test_tf32_follows_pytorch_conv_setting(monkeypatch):
    from pixelcnn_kernels.triton.masked_conv import dot_precision

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert ops.conv_allows_tf32()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not ops.conv_allows_tf32()
    if hasattr(torch.backends.cudnn, "conv"):  # the per-op settings: "none" defers to cuDNN's, then the global one
        settings = (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends)
        saved = [owner.fp32_precision for owner in settings]
        try:
            for values, expected in ((("tf32", "ieee", "ieee"), True), (("ieee", "tf32", "tf32"), False), (("none", "tf32", "ieee"), True), (("none", "none", "ieee"), False)):
                for owner, value in zip(settings, values):
                    owner.fp32_precision = value
                assert ops.conv_allows_tf32() is expected, values
        finally:
            for owner, value in zip(settings, saved):
                owner.fp32_precision = value
    assert (dot_precision(torch.float32, True), dot_precision(torch.float32, False), dot_precision(torch.bfloat16, True)) == ("tf32", "ieee", "ieee")


# ------------------------------------------------------------------ backend choice


@pytest.fixture
def cuda_backend_without_ops(monkeypatch):
    """The op module seeing a 'cuda' backend whose extension registers no masked_conv2d op (the fallback is the backend module's)."""
    monkeypatch.setattr(backend_module, "resolve_backend", lambda *tensors: "cuda")
    monkeypatch.setattr(backend_module, "cuda_ops", lambda: types.SimpleNamespace())
    monkeypatch.setattr(backend_module, "unavailable_reason", lambda backend, device=None: None)
    return monkeypatch


def test_missing_cuda_op_falls_back_to_triton_when_automatic(cuda_backend_without_ops):
    x = torch.zeros(1, 1, 1, 1)
    assert ops._choose_backend("masked_conv2d_fwd", x) == "triton"


def test_missing_cuda_op_raises_when_cuda_is_forced(cuda_backend_without_ops):
    cuda_backend_without_ops.setattr(backend_module, "forced_backend", lambda: "cuda")
    with pytest.raises(BackendUnavailableError, match="no masked_conv2d_fwd op"):
        ops._choose_backend("masked_conv2d_fwd", torch.zeros(1, 1, 1, 1))


@pytest.fixture
def triton_as_cuda_ops(monkeypatch):
    """A 'cuda' backend whose extension ops are the Triton launchers (the same contract); records each call."""
    if unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(unavailable_reason("triton", torch.device("cpu")))
    from pixelcnn_kernels.triton import masked_conv as kernels

    calls = []

    def recorded(name):
        def op(*args):
            calls.append((name, args))
            return getattr(kernels, name)(*args)

        return op

    names = ("masked_conv2d_fwd", "masked_conv2d_dgrad", "masked_conv2d_wgrad", "masked_conv2d_fwd_gated")
    extension = types.SimpleNamespace(**{name: recorded(name) for name in names})
    monkeypatch.setattr(backend_module, "resolve_backend", lambda *tensors: "cuda")
    # This extension has every op, built or not (torch without CUDA builds none).
    monkeypatch.setattr(ops, "backend_with_cuda_op", lambda backend, cuda_op, device: backend)
    monkeypatch.setattr(ops, "cuda_ops", lambda: extension)
    return calls


def test_cuda_backend_gets_the_contract_arguments(triton_as_cuda_ops):
    """x and gradients as contiguous (N, H, W, C), wp as contiguous (T, Cin, Cout), offsets as a list of ints."""
    spec = resolve_mask("B", 3, 3)
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 2, 4, 5)
    grad_out = torch.randn(2, 6, 4, 5)
    got = conv_and_grads(masked_conv2d, x, weight, bias, grad_out, mask="B", color_groups=3)
    expected = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), bias.double(), grad_out.double(), mask="B", color_groups=3)
    assert_float32_results_close(("out", "grad x", "grad weight", "grad bias"), got, expected)
    assert [name for name, _ in triton_as_cuda_ops] == ["masked_conv2d_fwd", "masked_conv2d_dgrad", "masked_conv2d_wgrad"]
    (_, forward_args), (_, dgrad_args), (_, wgrad_args) = triton_as_cuda_ops
    x_rows, packed, bias_arg, residual_arg, offsets, concat_elu_input, tf32, keep, _ = forward_args
    grad_rows, packed_again, dgrad_x, offsets_again, _, dgrad_keep, _ = dgrad_args
    x_again, grad_again, _, tap_positions, kernel_size, hidden, anchor_tap, wgrad_concat_elu_input, _, wgrad_keep, _ = wgrad_args
    assert keep is None and dgrad_keep is None and wgrad_keep is None  # no dropout
    for rows, channels in ((x_rows, 3), (grad_rows, 6), (x_again, 3), (grad_again, 6)):
        assert rows.shape == (2, 4, 5, channels) and rows.is_contiguous()
    assert packed.shape == (len(spec.taps), 3, 6) and packed.is_contiguous() and torch.equal(packed, packed_again)
    assert offsets == offsets_again == ops.tap_offsets(spec, 1) and all(type(d) is int for d in offsets)
    assert bias_arg.shape == (6,) and tf32 is ops.conv_allows_tf32()
    assert residual_arg is None and dgrad_x is None and concat_elu_input is False and wgrad_concat_elu_input is False
    # The weight gradient's layout: the taps' kernel positions, and the colour groups' hidden pairs at the anchor tap.
    assert (tap_positions, kernel_size) == ([i * 3 + j for i, j in spec.taps], [3, 3]) and spec.taps[anchor_tap] == spec.anchor
    assert hidden.shape == (6, 3) and hidden.dtype == torch.uint8 and hidden.is_contiguous()

    triton_as_cuda_ops.clear()
    x, weight, bias = make_conv_inputs(3, 8, (3, 3), 2, 4, 5)
    cond = torch.randn(2, 8)
    with torch.no_grad():
        fused = masked_conv2d_gated(x, weight, bias, "vertical", cond=cond)
    trained = masked_conv2d_gated(x, weight.requires_grad_(True), bias, "vertical", cond=cond)
    (_, inference_args), (_, training_args) = triton_as_cuda_ops
    assert inference_args[3].shape == (2, 8) and inference_args[4] is None and inference_args[5] is None
    assert inference_args[7:11] == (False, ops.GATE_CODES["tanh_sigmoid"], 1, False)
    assert training_args[10] is True
    expected = masked_conv2d_gated_ref(x.double(), weight.detach().double(), bias.double(), "vertical", cond=cond.double())
    assert_close(fused, expected, dtype=torch.float32)
    assert_close(trained, expected, dtype=torch.float32)


def test_cuda_backend_gets_the_fused_contract_arguments(triton_as_cuda_ops):
    """A residual as contiguous rows; concat_elu: the flag to the forward and wgrad, x to dgrad; gated: the same."""
    x, weight, bias, residual = make_fused_inputs(3, 4, (2, 3), 2, 4, 5, "concat_elu", 4)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 4, 4, 5)
    options = dict(mask="down_shifted", input_activation="concat_elu")
    got = fused_and_grads(masked_conv2d, (x, weight, bias, residual), grad_out, **options)
    expected = fused_and_grads(masked_conv2d_ref, [t.double() for t in (x, weight, bias, residual)], grad_out.double(), **options)
    assert_float32_results_close(("out", "grad x", "grad weight", "grad bias", "grad residual"), got, expected)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)
    (_, forward_args), (_, dgrad_args), (_, wgrad_args) = triton_as_cuda_ops
    x_rows, packed, _, residual_rows, _, concat_elu_input, *_ = forward_args
    assert x_rows.shape == (2, 4, 5, 3) and packed.shape == (6, 6, 4) and concat_elu_input is True
    assert residual_rows.shape == (2, 4, 5, 4) and residual_rows.is_contiguous() and torch.equal(residual_rows, residual.permute(0, 2, 3, 1))
    assert torch.equal(dgrad_args[2], x_rows) and wgrad_args[7] is True

    triton_as_cuda_ops.clear()
    gated_weight = torch.cat([weight, weight], 0)
    addend = torch.randn(2, 8, 4, 5).contiguous(memory_format=torch.channels_last)
    gated_options = dict(gate="sigmoid", input_activation="concat_elu")
    gated_out = masked_conv2d_gated(x, gated_weight, None, "down_shifted", residual=residual, addend=addend, **gated_options)
    (_, gated_args), = triton_as_cuda_ops
    assert gated_args[4].shape == (2, 4, 5, 4) and gated_args[7] is True and gated_args[8] == ops.GATE_CODES["sigmoid"]
    assert gated_args[5].is_contiguous() and torch.equal(gated_args[5], addend.permute(0, 2, 3, 1))
    expected_gated = masked_conv2d_gated_ref(
        x.double(), gated_weight.double(), None, "down_shifted", residual=residual.double(), addend=addend.double(), **gated_options
    )
    assert_close(gated_out, expected_gated, dtype=torch.float32)


def test_cuda_backend_gets_the_dropout_mask_as_uint8_rows(triton_as_cuda_ops):
    """dropout_keep: (N, H, W, 2C) uint8 rows and 1 / (1 - p) to the forward, both backward passes and the gated forward."""
    x, weight, bias, residual = make_fused_inputs(3, 4, (2, 3), 2, 4, 5, "concat_elu", 4)
    keep = pixelcnn_kernels.draw_dropout_keep(x, 6, 0.25, torch.Generator().manual_seed(0))
    options = dict(mask="down_shifted", input_activation="concat_elu", dropout_keep=keep, dropout_p=0.25)
    got = fused_and_grads(masked_conv2d, (x, weight, bias, residual), torch.randn(2, 4, 4, 5), **options)
    assert_close(got[0], masked_conv2d_ref(*(t.double() for t in (x, weight, bias)), residual=residual.double(), **options), dtype=torch.float32)
    masked_conv2d_gated(x, torch.cat([weight, weight], 0), None, **options)
    assert [name for name, _ in triton_as_cuda_ops] == ["masked_conv2d_fwd", "masked_conv2d_dgrad", "masked_conv2d_wgrad", "masked_conv2d_fwd_gated"]
    for _, args in triton_as_cuda_ops:
        keep_rows, keep_scale = args[-2:]
        assert keep_rows.dtype == torch.uint8 and keep_rows.is_contiguous() and torch.equal(keep_rows.bool(), keep.permute(0, 2, 3, 1))
        assert keep_scale == 1 / 0.75


def test_float64_on_a_forced_kernel_backend_raises():
    x, weight, bias = make_conv_inputs(2, 2, (3, 3), 1, 3, 3, dtype=torch.float64)
    with run_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        masked_conv2d(x, weight, bias)


# ------------------------------------------------------------------ opcheck and torch.compile


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 2, 4, 5)
    conv_args = ops._validate(x, weight, bias, "A", 2, 3)
    gated_args = ops._validate(x, weight, bias, "vertical", 1, 1)
    grad_out = torch.randn(2, 6, 4, 5)
    cond = torch.randn(2, 6)
    with run_backend(backend):
        trainable = [t.clone().requires_grad_(True) for t in (x, weight, bias, cond)]
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d, (*trainable[:3], None, *conv_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_input, (grad_out, x, weight, *conv_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_weight, (grad_out, x, weight, *conv_args))
        addend = torch.randn(2, 6, 4, 5, requires_grad=True)
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (*trainable, None, None, *gated_args, 1, 1, True))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (*trainable, None, addend, *gated_args, 1, 1, True))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (*trainable, None, addend, *gated_args, 1, 3, True))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (x, weight, bias, cond, None, None, *gated_args, 2, 1, False))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_residual_and_concat_elu(backend):
    x, weight, bias, residual = make_fused_inputs(3, 6, (2, 3), 2, 4, 5, "concat_elu", 6)
    x = x.contiguous(memory_format=torch.channels_last)
    conv_args = ops._validate(x, weight, bias, "down_shifted", 1, 1, "concat_elu")
    grad_out = torch.randn(2, 6, 4, 5)
    cond = torch.randn(2, 6)
    with run_backend(backend):
        trainable = [t.clone().requires_grad_(True) for t in (x, weight, bias, cond, residual[:, :3])]
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d, (*trainable[:3], residual.clone().requires_grad_(True), *conv_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_input, (grad_out, x, weight, *conv_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_weight, (grad_out, x, weight, *conv_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (*trainable, None, *conv_args, 2, 1, True))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (x, weight, bias, None, residual[:, :3], None, *conv_args, 1, 1, False))
        # With the dropout after concat_elu (PixelCNN++ in training).
        keep = pixelcnn_kernels.draw_dropout_keep(x, 6, 0.5, torch.Generator().manual_seed(0))
        dropout_args = ops._validate(x, weight, bias, "down_shifted", 1, 1, "concat_elu", keep, 0.5)
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d, (*trainable[:3], None, *dropout_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_input, (grad_out, x, weight, *dropout_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_grad_weight, (grad_out, x, weight, *dropout_args))
        torch.library.opcheck(torch.ops.pixelcnn_kernels.masked_conv2d_gated, (*trainable, None, *dropout_args, 2, 1, True))


def test_torch_compile_fullgraph_with_dropout():
    x, weight, bias, residual = make_fused_inputs(3, 6, (2, 3), 2, 4, 5, "concat_elu", 3)
    keep = pixelcnn_kernels.draw_dropout_keep(x, 6, 0.5, torch.Generator().manual_seed(0))

    def block(x, weight, bias, residual, keep):
        return masked_conv2d_gated(x, weight, bias, "down_shifted", gate="sigmoid", residual=residual, input_activation="concat_elu", dropout_keep=keep, dropout_p=0.5)

    leaves = [t.requires_grad_(True) for t in (x, weight, bias, residual)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, expected = compiled(*leaves, keep), block(*leaves, keep)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 2, 4, 5)
    gated_weight, gated_bias = make_conv_inputs(6, 4, (1, 3), 1, 1, 1)[1:]
    cond = torch.randn(2, 4)

    def layer(x, weight, bias, gated_weight, gated_bias, cond):
        h = masked_conv2d(x, weight, bias, "B", 2, 3, residual=x.repeat(1, 2, 1, 1))
        return masked_conv2d_gated(h[:, :3], gated_weight, gated_bias, "horizontal", cond=cond, residual=x[:, :2], input_activation="concat_elu")

    leaves = [t.requires_grad_(True) for t in (x, weight, bias, gated_weight, gated_bias, cond)]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    expected = layer(*leaves)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)



def test_torch_compile_fullgraph_of_a_function_whose_int_arguments_change():
    # After a call with other values Dynamo traces the ints as SymInts: color_groups must still
    # resolve the (constant) mask, dilation and gate_groups reach the ops symbolically.
    x, weight = make_conv_inputs(6, 6, (3, 3), 1, 4, 5)[:2]

    def layer(x, weight, color_groups, dilation):
        h = masked_conv2d(x, weight, None, "B", dilation, color_groups)
        return masked_conv2d_gated(h, weight, None, "B", dilation, color_groups, gate_groups=color_groups)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for color_groups, dilation in ((3, 1), (1, 2), (3, 2), (1, 1)):
        torch.testing.assert_close(compiled(x, weight, color_groups, dilation), layer(x, weight, color_groups, dilation), rtol=0, atol=0)


def test_torch_compile_fullgraph_dynamic_shapes():
    """dynamic=True: the kernel size (the mask's structure) is specialised on, the batch and image sizes are not."""
    weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 1, 1)[1:]

    def layer(x, weight, bias):
        return masked_conv2d_gated(masked_conv2d(x, weight[:3], bias[:3], "vertical"), weight, bias, "B")

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, height, width in ((2, 4, 5), (3, 6, 2)):
        x = torch.randn(batch, 3, height, width)
        torch.testing.assert_close(compiled(x, weight, bias), layer(x, weight, bias), rtol=0, atol=0)


def test_torch_compile_asks_for_a_mask_spec_in_place_of_a_mask_tensor():
    """Tracing cannot read a mask tensor's values: the error says what to pass; the resolved spec compiles."""
    x, weight = make_conv_inputs(3, 4, (2, 3), 2, 4, 5)[:2]
    taps = torch.ones(2, 3, dtype=torch.bool)
    compiled = torch.compile(lambda x, weight, mask: masked_conv2d(x, weight, None, mask), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"under torch.compile a mask tensor's values cannot be read; resolve it"):
        compiled(x, weight, taps)
    spec = resolve_mask(taps)
    torch.testing.assert_close(compiled(x, weight, spec), masked_conv2d(x, weight, None, taps), rtol=0, atol=0)


# ------------------------------------------------------------------ modules


def test_modules_compute_in_autocasts_dtype_as_conv2d_does():
    """Under autocast their output has autocast's dtype, as nn.Conv2d's, and is the op of the cast operands;
    outside it they compute in their input's dtype, whatever their parameters'."""
    x, cond = torch.randn(2, 3, 4, 5), torch.randn(2, 8)
    plain, gated = MaskedConv2d(3, 8, 3, mask="A"), MaskedConv2dGated(3, 8, 3, mask="B")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = plain(x), gated(x, cond)
        assert plain(x).dtype == torch.nn.Conv2d(3, 8, 3)(x).dtype == torch.bfloat16
    bf16 = [t.bfloat16() for t in (x, plain.weight, plain.bias, gated.weight, gated.bias, cond)]
    expected = masked_conv2d(*bf16[:3], "A"), masked_conv2d_gated(bf16[0], *bf16[3:5], "B", cond=bf16[5])
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16 and torch.equal(g, e)
    assert plain.double()(x).dtype == torch.float32 and gated.half()(x.double(), cond).dtype == torch.float64
    with pytest.raises(TypeError, match="x must have dtype"):
        plain(x.long())


def test_module_loads_a_conv2d_state_dict_and_back():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    module = MaskedConv2d(4, 6, 3, mask="B")
    assert set(module.state_dict()) == set(conv.state_dict())
    module.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, conv.weight * module.spec.weight_mask(6, 4), conv.bias, padding=1)
    torch.testing.assert_close(module(x), expected)
    round_trip = nn.Conv2d(4, 6, 3, padding=1)
    round_trip.load_state_dict(module.state_dict())
    assert torch.equal(round_trip.weight, conv.weight) and torch.equal(round_trip.bias, conv.bias)


def test_module_from_conv_keeps_the_parameter_objects():
    conv = nn.Conv2d(3, 6, (2, 3), dilation=2, bias=False).eval()
    module = MaskedConv2d.from_conv(conv, "down_shifted", color_groups=1)
    assert module.weight is conv.weight and module.bias is None and not module.training
    assert module.dilation == (2, 2) and module.spec.kernel_size == (2, 3)
    x = torch.randn(1, 3, 6, 5)
    torch.testing.assert_close(module(x), masked_conv2d_ref(x, conv.weight, None, "down_shifted", 2))
    with pytest.raises(ValueError, match="stride"):
        MaskedConv2d.from_conv(nn.Conv2d(3, 6, 3, stride=2))
    with pytest.raises(ValueError, match="dilation"):
        MaskedConv2d.from_conv(conv, "down_shifted", dilation=1)


def test_module_from_conv_keeps_a_masked_convs_mask_and_refuses_what_it_cannot_carry_over():
    """A MaskedConv2d keeps its own mask (not the default "B", which would let mask A's pixel see itself);
    a lazy conv has no Parameters yet; spectral_norm's hook would not run (its parametrization is carried over)."""
    assert MaskedConv2d.from_conv(MaskedConv2d(3, 6, 3, mask="A", color_groups=3), color_groups=3).spec == resolve_mask("A", 3, 3)
    with pytest.raises(ValueError, match="lazy conv"):
        MaskedConv2d.from_conv(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match="spectral_norm's hook"):
        MaskedConv2d.from_conv(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)))
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(MaskedConv2d.from_conv(conv).eval()(x), masked_conv2d_ref(x, conv.weight, conv.bias, "B"))


def test_module_repr_and_implied_kernel_size():
    module = MaskedConv2d(3, 6, mask="down_shifted", dilation=2)
    assert module.weight.shape == (6, 3, 2, 3)
    assert repr(module) == "MaskedConv2d(3, 6, kernel_size=(2, 3), mask='down_shifted', taps=6/6, dilation=2)"
    colour = MaskedConv2d(3, 6, 5, mask="A", color_groups=3, bias=False)
    assert "mask='A', taps=13/25, color_groups=3, bias=False" in repr(colour)


def test_gated_module():
    module = MaskedConv2dGated(3, 8, 3, mask="vertical", gate="sigmoid")
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 8)
    expected = masked_conv2d_gated_ref(x, module.weight, module.bias, "vertical", gate="sigmoid", cond=cond)
    torch.testing.assert_close(module(x, cond), expected)
    assert "gate='sigmoid'" in repr(module)
    colour = MaskedConv2dGated(3, 12, (1, 3), mask="horizontal", color_groups=3)
    expected = masked_conv2d_gated_ref(x, colour.weight, colour.bias, "horizontal", color_groups=3, cond=torch.cat([cond, cond[:, :4]], 1), gate_groups=3)
    torch.testing.assert_close(colour(x, torch.cat([cond, cond[:, :4]], 1)), expected)
    assert "color_groups=3" in repr(colour)
    with pytest.raises(ValueError, match=r"^out_channels must be even \(the gate's two halves\), got 5"):
        MaskedConv2dGated(3, 5, 3)
    with pytest.raises(ValueError, match=r"^out_channels // 2 \(gated channels\)=7 can't be split into 3 colour groups"):
        MaskedConv2dGated(3, 14, 3, color_groups=3)
    with pytest.raises(ValueError, match="gate"):
        MaskedConv2dGated(3, 4, 3, gate="relu")


# ------------------------------------------------------------------ bad input


def _bad_input_cases():
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 4, 4)
    return [
        ("mask shape", dict(mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "mask has shape"),
        ("colour groups", dict(weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4), color_groups=3), ValueError, r"^weight.shape\[0\] \(output channels\)=4 leaves a colour group empty"),
        ("colour groups value", dict(color_groups=2), ValueError, "color_groups"),
        ("x dtype", dict(x=x.to(torch.int32)), ValueError, "x must have dtype"),  # DTypeError: a TypeError too (test_bad_inputs)
        ("weight dtype", dict(weight=weight.double()), ValueError, "weight has dtype"),
        ("device", dict(weight=weight.to("meta")), ValueError, "device"),
        ("x rank", dict(x=x[0]), ValueError, "x must have 4 dimensions"),
        ("channels", dict(x=torch.randn(1, 4, 4, 4)), ValueError, "x has 4 channels"),
        ("bias shape", dict(bias=torch.randn(5)), ValueError, "bias has 5 elements"),
        ("dilation type", dict(dilation=1.5), TypeError, "dilation"),
        ("dilation value", dict(dilation=0), ValueError, "dilation"),
        ("mask name", dict(mask="C"), ValueError, "mask must be one of"),
        ("even kernel", dict(weight=torch.randn(6, 3, 2, 2), mask="B"), ValueError, "odd kernel"),
        ("residual shape", dict(residual=torch.randn(1, 5, 4, 4)), ValueError, r"^residual must have the output's shape \(1, 6, 4, 4\)"),
        ("residual rank", dict(residual=torch.randn(6, 4, 4)), ValueError, "^residual must have 4 dimensions"),
        ("residual dtype", dict(residual=torch.randn(1, 6, 4, 4, dtype=torch.float64)), TypeError, "^residual has dtype torch.float64 but x has"),
        ("residual type", dict(residual=[0.0]), TypeError, "^residual must be a torch.Tensor"),
        ("residual device", dict(residual=torch.randn(1, 6, 4, 4, device="meta")), ValueError, "^residual is on meta but x is on cpu"),
        ("input activation", dict(input_activation="elu"), ValueError, "^input_activation must be None or one of"),
        ("concat_elu channels", dict(input_activation="concat_elu"), ValueError, r"^x has 3 channels, 6 after input_activation='concat_elu', but weight expects 3"),
        ("concat_elu colour groups", dict(weight=torch.randn(6, 6, 3, 3), input_activation="concat_elu", color_groups=3), ValueError, "^input_activation='concat_elu' needs color_groups=1"),
    ], dict(x=x, weight=weight, bias=bias, mask="B", dilation=1, color_groups=1)


@pytest.mark.parametrize("index", range(len(_bad_input_cases()[0])), ids=[case[0] for case in _bad_input_cases()[0]])
def test_bad_input_raises_before_any_kernel(index):
    cases, good = _bad_input_cases()
    _, change, error, match = cases[index]
    with pytest.raises(error, match=match):
        masked_conv2d(**{**good, **change})


def test_gated_bad_input():
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 2, 4, 4)
    with pytest.raises(ValueError, match="gate must be one of"):
        masked_conv2d_gated(x, weight, bias, gate="relu")
    with pytest.raises(ValueError, match=r"^weight must have an even number of output channels \(the gate's two halves\), got 5"):
        masked_conv2d_gated(x, weight[:5], bias[:5])
    with pytest.raises(ValueError, match=r"^weight.shape\[0\] // 2 \(gated channels\)=3 can't be split into 2 colour groups of a gated layer"):
        masked_conv2d_gated(x, weight, bias, gate_groups=2)
    for gate_groups, error, match in ((0, ValueError, "^gate_groups must be >= 1, got 0"), (1.0, TypeError, "^gate_groups must be an int, got float"), (True, TypeError, "^gate_groups must be an int, got bool")):
        with pytest.raises(error, match=match):
            masked_conv2d_gated(x, weight, bias, gate_groups=gate_groups)
    with pytest.raises(ValueError, match=r"^color_groups=3 needs gate_groups=3 \(a gate would pair channels of two colours\), got 1"):
        masked_conv2d_gated(x, weight, bias, color_groups=3)
    with pytest.raises(ValueError, match=r"cond must have shape \(N, Cout\)"):
        masked_conv2d_gated(x, weight, bias, cond=torch.randn(2, 3))
    with pytest.raises(TypeError, match="cond has dtype"):
        masked_conv2d_gated(x, weight, bias, cond=torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^residual must have the output's shape \(2, 3, 4, 4\)"):
        masked_conv2d_gated(x, weight, bias, residual=torch.randn(2, 6, 4, 4))
    with pytest.raises(TypeError, match="^residual has dtype"):
        masked_conv2d_gated(x, weight, bias, residual=torch.randn(2, 3, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="^residual is on meta"):
        masked_conv2d_gated(x, weight, bias, residual=torch.randn(2, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="after input_activation='concat_elu'"):
        masked_conv2d_gated(x, weight, bias, input_activation="concat_elu")
    with pytest.raises(ValueError, match=r"^addend must have the pre-activation's shape \(2, 6, 4, 4\)"):
        masked_conv2d_gated(x, weight, bias, addend=torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="^addend has dtype"):
        masked_conv2d_gated(x, weight, bias, addend=torch.randn(2, 6, 4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="^return_preactivation must be a bool"):
        masked_conv2d_gated(x, weight, bias, return_preactivation=1)


def test_gated_op_without_preactivation_refuses_a_backward():
    x, weight, bias = make_conv_inputs(3, 6, (3, 3), 1, 4, 4)
    weight.requires_grad_(True)
    out, _ = torch.ops.pixelcnn_kernels.masked_conv2d_gated(x, weight, bias, None, None, None, *ops._validate(x, weight, bias, "B", 1, 1), 1, 1, False)
    with pytest.raises(RuntimeError, match="keep_preactivation"):
        out.sum().backward()


# ------------------------------------------------------------------ GPU


def gpu_backend(backend):
    """Forces ``backend``; skips only when the backend cannot run at all (cuda: extension not built)."""
    reason = unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    return use_backend(backend)


# The gradients that are sums over every pixel (of the weight, the bias, cond).
PIXEL_SUMS = ("grad weight", "grad bias", "grad cond")


def assert_float32_results_close(names, got, expected):
    """Each float32 result close to its float64 expectation: elementwise, or at the sums' scale
    for the gradients summed over the pixels, whose rounding error grows with their terms (a
    weight's gradient cancelling to 0.045 from terms of order 1 was off by 2e-6 on one CPU)."""
    for name, g, e in zip(names, got, expected, strict=True):
        if name in PIXEL_SUMS:
            assert_close_at_scale(g, e, dtype=torch.float32, msg=name)
        else:
            assert_close(g, e, dtype=torch.float32, msg=name)


def assert_close_at_scale(got, expected, *, dtype, tf32=False, msg=""):
    """The project tolerance on both tensors divided by the expected's largest magnitude.

    At realistic sizes every result is a sum of hundreds to thousands of products,
    whose rounding error grows with the size of the terms, not of each (possibly
    cancelling) result. fp32 without TF32 gets an atol of 1e-5 of that scale: a
    4096-term fp32 sum is off by up to ~sqrt(4096) ulps of its partial sums. An expectation
    of zeros only (no terms) is held to the absolute tolerance.
    """
    scale = expected.abs().max().item() or 1.0
    rtol, atol = tolerance(dtype, tf32=tf32)
    if dtype == torch.float32 and not tf32:
        atol = 1e-5
    torch.testing.assert_close(got.to(expected.dtype) / scale, expected / scale, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype, tf32", [(torch.float32, True), (torch.float32, False), (torch.float16, False), (torch.bfloat16, False)], ids=["tf32", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "mask, kernel_size, dilation, color_groups, c_in, c_out",
    [("B", 3, 1, 1, 64, 130), ("vertical", 3, 1, 1, 64, 130), ("down_shifted", (2, 3), 1, 1, 160, 160), ("A", 5, 2, 3, 66, 129), ("horizontal", (1, 3), 4, 1, 3, 5)],
)
def test_gpu_backends_match_reference(backend, dtype, tf32, mask, kernel_size, dilation, color_groups, c_in, c_out, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    kernel_size = as_pair(kernel_size)
    x, weight, bias = make_conv_inputs(c_in, c_out, kernel_size, 4, 32, 32, dtype=dtype, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, c_out, 32, 32, device="cuda", dtype=dtype)
    options = dict(mask=mask, dilation=dilation, color_groups=color_groups)
    with gpu_backend(backend):
        got = conv_and_grads(masked_conv2d, x, weight, bias, grad_out, **options)
    expected = conv_and_grads(masked_conv2d_ref, x.double(), weight.double(), bias.double(), grad_out.double(), **options)
    for name, g, e in zip(("out", "grad x", "grad weight", "grad bias"), got, expected):
        assert g.dtype == dtype
        assert_close_at_scale(g, e, dtype=dtype, tf32=tf32, msg=name)
    hidden = resolve_mask(mask, kernel_size, color_groups).weight_mask(c_out, c_in, device="cuda") == 0
    assert (got[2][hidden] == 0).all()
    assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["tanh_sigmoid", "sigmoid"])
def test_gpu_gated_matches_reference(backend, dtype, gate):
    x, weight, bias = make_conv_inputs(64, 256, (3, 3), 4, 32, 32, dtype=dtype, device="cuda")
    cond = torch.randn(4, 256, device="cuda", dtype=dtype)
    grad_out = torch.randn(4, 128, 32, 32, device="cuda", dtype=dtype)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias, cond)]
    with gpu_backend(backend):
        if backend == "cuda" and not hasattr(cuda_ops(), "masked_conv2d_fwd_gated"):
            # The fused CUDA op is optional: forcing cuda without it must say so.
            with pytest.raises(BackendUnavailableError, match="masked_conv2d_fwd_gated"):
                masked_conv2d_gated(*leaves[:3], "vertical", gate=gate, cond=leaves[3])
            return
        out = masked_conv2d_gated(*leaves[:3], "vertical", gate=gate, cond=leaves[3])
        got = (out, *torch.autograd.grad(out, leaves, grad_out))
        with torch.no_grad():
            inference = masked_conv2d_gated(*leaves[:3], "vertical", gate=gate, cond=leaves[3])
    doubles = [t.detach().double().requires_grad_(True) for t in leaves]
    expected_out = masked_conv2d_gated_ref(*doubles[:3], "vertical", gate=gate, cond=doubles[3])
    expected = (expected_out, *torch.autograd.grad(expected_out, doubles, grad_out.double()))
    tf32 = ops.conv_allows_tf32()
    for name, g, e in zip(("out", "grad x", "grad weight", "grad bias", "grad cond"), got, expected):
        assert_close_at_scale(g, e, dtype=dtype, tf32=tf32, msg=name)
    assert_close_at_scale(inference, expected_out, dtype=dtype, tf32=tf32, msg="no-grad output")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gpu_fused_residual_and_concat_elu_match_reference(backend, dtype, gated):
    """PixelCNN++'s shifted conv at the issue's size: concat_elu of 80 channels (160 in), plus a residual, forward and backward."""
    c_out = 160 if gated else 80
    x, weight, bias, residual = make_fused_inputs(80, c_out, (2, 3), 4, 32, 32, "concat_elu", 80, dtype=dtype, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 80, 32, 32, device="cuda", dtype=dtype)
    options = dict(mask="down_shifted", input_activation="concat_elu")
    if gated:
        tensors = (x, weight, bias, torch.randn(4, c_out, device="cuda", dtype=dtype), residual)
        fn, reference = gated_with_cond(masked_conv2d_gated, gate="sigmoid"), gated_with_cond(masked_conv2d_gated_ref, gate="sigmoid")
    else:
        tensors, fn, reference = (x, weight, bias, residual), masked_conv2d, masked_conv2d_ref
    with gpu_backend(backend):
        got = fused_and_grads(fn, tensors, grad_out, **options)
    expected = fused_and_grads(reference, [t.double() for t in tensors], grad_out.double(), **options)
    tf32 = ops.conv_allows_tf32()
    names = ("out", "grad x", "grad weight", "grad bias") + (("grad cond",) if gated else ()) + ("grad residual",)
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.dtype == dtype
        assert_close_at_scale(g, e, dtype=dtype, tf32=tf32, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_causality(backend):
    c_in, c_out, size = 6, 12, 9
    spec = resolve_mask("B", 5, 3)
    x, weight, bias = make_conv_inputs(c_in, c_out, (5, 5), 1, size, size, device="cuda")
    x.requires_grad_(True)
    with gpu_backend(backend):
        out = masked_conv2d(x, weight, bias, "B", 2, 3)
        for co, (y0, x0) in zip(range(0, c_out, 4), [(4, 4), (0, 8), (8, 0)]):
            (grad,) = torch.autograd.grad(out[0, co, y0, x0], x, retain_graph=True)
            seen = must_see(spec, c_out, c_in, size, size, y0, x0, co, dilation=2).cuda()
            assert (grad[0][~seen] == 0).all() and (grad[0][seen] != 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_more_than_2_31_elements(backend):
    """bf16 x (513, 16, 512, 512): 2.15e9 elements; the last image's pixels sit past 2**31."""
    batch, channels, size = 513, 16, 512
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    weight = torch.randn(channels, channels, 3, 3, device="cuda", dtype=torch.bfloat16, generator=generator) / 12
    grad_out = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    with gpu_backend(backend):
        out = masked_conv2d(x, weight, None, "B")
        grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad_out)
    last = slice(batch - 1, batch)
    no_bias = torch.zeros(channels, device="cuda", dtype=torch.float64)
    out_ref, grad_x_ref, _, _ = conv_and_grads(masked_conv2d_ref, x[last].double(), weight.double(), no_bias, grad_out[last].double(), mask="B")
    assert_close_at_scale(out[last], out_ref, dtype=torch.bfloat16, msg="out")
    assert_close_at_scale(grad_x[last], grad_x_ref, dtype=torch.bfloat16, msg="grad x")
    # The weight gradient sums over every pixel; cuDNN's in fp32 (bf16 inputs: exact products) is the reference here.
    _, _, grad_weight_ref, _ = conv_and_grads(masked_conv2d_ref, x.detach().float(), weight.detach().float(), no_bias.float(), grad_out.float(), mask="B")
    assert_close_at_scale(grad_weight, grad_weight_ref, dtype=torch.bfloat16, msg="grad weight")
