"""Tests of the gated activations: gate_tanh_sigmoid, gate_sigmoid, concat_elu (issue 4).

Kernel backends are compared with the reference computed in float64 from the
same inputs (values, d/dx and d/dcond), with the project's tolerance for the
input dtype. On the CPU the Triton kernels run in the interpreter on tiny
shapes; tests marked ``gpu`` add the CUDA backend, larger shapes and a tensor of
more than 2**31 elements.
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch

import pixelcnn_kernels as pk
from gpu_math_emulation import approximate_gpu_math, rsqrt_at_error_bound
from op_table import CUDA
from pixelcnn_kernels.backend import BackendUnavailableError
from pixelcnn_kernels.nn import ConcatELU, GateSigmoid, GateTanhSigmoid
from pixelcnn_kernels.reference import gates as reference
from pixelcnn_kernels.testing import assert_close, tolerance

GATES = {
    "gate_tanh_sigmoid": (pk.gate_tanh_sigmoid, reference.gate_tanh_sigmoid),
    "gate_sigmoid": (pk.gate_sigmoid, reference.gate_sigmoid),
}
OPS = [*GATES, "concat_elu"]
KERNEL_BACKENDS = ["triton", CUDA]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXTREMES = [float("-inf"), -80.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 80.0, float("inf"), float("nan")]


def _ops(name: str) -> tuple[Callable, Callable]:
    """(public op, reference) of ``name``, both called as ``f(x, dim, cond)``."""
    if name == "concat_elu":
        return (lambda x, dim, cond=None: pk.concat_elu(x, dim)), (lambda x, dim, cond=None: reference.concat_elu(x, dim))
    return GATES[name]


def _forward_backward(fn: Callable, x: torch.Tensor, cond: torch.Tensor | None, grad_seed: int = 1, grad_values: torch.dtype | None = None):
    """``(y, dx, dcond)`` of ``fn(x, cond)`` with a random upstream gradient (dcond None without cond).

    The gradient's values are float32 normal draws rounded to ``grad_values`` (default:
    y's dtype), so that a float64 reference gets the very gradient a bf16 kernel got.
    """
    leaves = [x.detach().requires_grad_(True)] + ([cond.detach().requires_grad_(True)] if cond is not None else [])
    y = fn(*leaves)
    generator = torch.Generator(device=y.device).manual_seed(grad_seed)
    grad = torch.randn(y.shape, generator=generator, device=y.device, dtype=torch.float32).to(grad_values or y.dtype).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, grad)
    return y.detach(), grads[0], grads[1] if cond is not None else None


def _assert_sum_close(actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor, summed: list[int], dtype: torch.dtype, msg: str) -> None:
    """``actual``, a sum of ``terms`` over the dims ``summed``, against ``expected``: the terms'
    rounding errors add up in a sum, so the tolerance's rtol applies to Σ|terms|, not to the sum."""
    rtol, atol = tolerance(dtype)
    magnitude = terms.double().abs().sum(summed) if summed else terms.double().abs()
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs()
    agree = (error <= atol + rtol * magnitude) | (actual == expected) | (actual.isnan() & expected.isnan())
    assert agree.all(), f"{msg}: worst |error| / tolerance {(error / (atol + rtol * magnitude)).nan_to_num(float('inf')).max():.3g}"


def _check_against_reference(name: str, backend: str, x: torch.Tensor, dim: int, cond: torch.Tensor | None) -> torch.Tensor:
    """Runs ``name`` on ``backend``; checks values and gradients against the float64 reference; returns y.

    d/dcond is the sum of d/dx over the broadcast dimensions, checked against the
    float64 sum of the op's own d/dx and against the reference's, with the tolerance
    of a sum (:func:`_assert_sum_close`).
    """
    op, ref = _ops(name)
    with pk.use_backend(backend):
        y, dx, dcond = _forward_backward(lambda x_, *c: op(x_, dim, *c), x, cond)
    double_cond = cond.double() if cond is not None else None
    y_ref, dx_ref, dcond_ref = _forward_backward(lambda x_, *c: ref(x_, dim, *c), x.double(), double_cond, grad_values=x.dtype)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert_close(y, y_ref, dtype=x.dtype, msg=f"{name} values")
    assert_close(dx, dx_ref, dtype=x.dtype, msg=f"{name} d/dx")
    if cond is not None:
        assert dcond.dtype == cond.dtype
        summed = [d for d in range(x.dim()) if d not in (0, dim % x.dim())]
        dx_sum = dx.sum(summed, dtype=torch.float64) if summed else dx.double()
        _assert_sum_close(dcond, dx_sum, dx, summed, x.dtype, f"{name} d/dcond vs sum of d/dx")
        _assert_sum_close(dcond, dcond_ref, dx_ref, summed, x.dtype, f"{name} d/dcond")
    return y


@dataclasses.dataclass(frozen=True)
class Layout:
    """One input layout: ``make(shape) -> x`` from a contiguous random tensor."""

    name: str
    shape: tuple[int, ...]
    dim: int
    make: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    with_cond: bool = True


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _strided_slice(t):
    # every other element of the last dim: neither contiguous nor dense
    return torch.cat([t, t], dim=-1)[..., ::2]


def _batch_inside_dim(t):
    # dense, but the batch dim is laid out inside the channel dim: (C, B, H, W) memory
    return t.transpose(0, 1).contiguous().transpose(0, 1)


# Odd channel halves (3, 5) and odd spatial sizes throughout.
LAYOUTS = [
    Layout("contiguous", (2, 6, 5, 3), 1),
    Layout("channels_last", (2, 6, 5, 3), 1, _channels_last),
    Layout("last_dim", (2, 3, 4, 10), -1),
    Layout("middle_dim_3d", (3, 6, 7), 1),
    Layout("matrix", (5, 6), 1),
    Layout("dim0", (6, 3, 5), 0, with_cond=False),
    Layout("strided_slice", (2, 6, 3, 5), 1, _strided_slice),
    Layout("batch_inside_dim", (3, 6, 2, 3), 1, _batch_inside_dim),
]
GPU_LAYOUTS = [
    Layout("large_contiguous", (4, 64, 16, 16), 1),
    Layout("large_channels_last", (4, 64, 16, 16), 1, _channels_last),
    Layout("large_odd", (3, 70, 9, 11), 1, _channels_last),
]


def _inputs(layout: Layout, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = layout.make((3 * torch.randn(layout.shape, device=device)).to(dtype))
    with_cond = layout.with_cond and name != "concat_elu"
    cond = torch.randn(layout.shape[0], layout.shape[layout.dim], device=device).to(dtype) if with_cond else None
    return x, cond


# ----------------------------------------------------------------------- reference


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dim", [1, -1])
def test_reference_gradcheck_float64(name, dim):
    _, ref = _ops(name)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    if name == "concat_elu":
        assert torch.autograd.gradcheck(lambda x_: ref(x_, dim), (x,))
    else:
        cond = torch.randn(2, x.shape[dim], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x_, c: ref(x_, dim, c), (x, cond))


@pytest.mark.parametrize("name", list(GATES))
def test_reference_cond_is_a_bias_on_both_halves(name):
    _, ref = _ops(name)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    cond = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(ref(x, 1, cond), ref(x + cond[:, :, None, None], 1))
    # the first half of cond goes with a: shifting only a by cond[:, :3] changes y as shifting x's first half
    shifted = x.clone()
    shifted[:, :3] += cond[:, :3, None, None]
    torch.testing.assert_close(ref(x, 1, torch.cat([cond[:, :3], torch.zeros_like(cond[:, 3:])], 1)), ref(shifted, 1))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("layout", LAYOUTS[:4], ids=lambda layout: layout.name)
def test_reference_backend_matches_reference(name, layout):
    """The op on the reference backend, float64: values, d/dx and d/dcond through its backward op."""
    x, cond = _inputs(layout, name, torch.float64, "cpu")
    _check_against_reference(name, "reference", x, layout.dim, cond)


# ------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS + [pytest.param(layout, marks=pytest.mark.gpu) for layout in GPU_LAYOUTS], ids=lambda layout: layout.name)
@pytest.mark.parametrize("name", OPS)
def test_kernels_match_reference(name, layout, dtype, backend, kernel_device):
    x, cond = _inputs(layout, name, dtype, kernel_device)
    y = _check_against_reference(name, backend, x, layout.dim, cond)
    if layout.name.endswith("channels_last"):
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 = nan, on purpose
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_kernels_extreme_inputs_propagate_like_pytorch(name, backend, kernel_device):
    """+-80, +-inf and NaN, every (a, b) pair: same values, infinities and NaNs as PyTorch in float32."""
    values = torch.tensor(EXTREMES, device=kernel_device)
    if name == "concat_elu":
        x = values.reshape(1, -1)
    else:  # x (1, 2, n*n): a takes every value against every b
        a, b = torch.meshgrid(values, values, indexing="ij")
        x = torch.stack([a.flatten(), b.flatten()]).unsqueeze(0)
    op, ref = _ops(name)
    with pk.use_backend(backend):
        y, dx, _ = _forward_backward(lambda x_: op(x_, 1), x, None)
    y_ref, dx_ref, _ = _forward_backward(lambda x_: ref(x_, 1), x, None)
    assert_close(y, y_ref, msg=f"{name} values")
    assert_close(dx, dx_ref, msg=f"{name} d/dx")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_concat_elu_keeps_the_signed_zeros_of_f_elu(backend, dtype, kernel_device):
    """elu(+0) = +0 and elu(-0) = -0, so concat_elu(+0) = (+0, -0) and concat_elu(-0) = (-0, +0); the gradient
    at either zero is grad_pos - grad_neg. (The Triton kernel's single expm1(-|x|) gave -0 for both once.)"""
    x = torch.tensor([[0.0, -0.0]], dtype=dtype, device=kernel_device).requires_grad_(True)
    grad = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=dtype, device=kernel_device)
    with pk.use_backend(backend):
        y = pk.concat_elu(x, 1)
        (dx,) = torch.autograd.grad(y, x, grad)
    expected = torch.nn.functional.elu(torch.cat([x, -x], 1).detach())
    assert torch.equal(y, expected) and torch.equal(torch.signbit(y), torch.signbit(expected)), (y, expected)
    assert torch.equal(dx, torch.tensor([[1.0 - 4.0, 2.0 - 8.0]], dtype=dtype, device=kernel_device))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_are_accurate_near_zero(backend, kernel_device):
    """tanh and expm1 keep fp32 relative accuracy for tiny inputs (where the tolerance's atol would hide a loss)."""
    magnitudes = torch.logspace(-30, 0.5, 1024, dtype=torch.float64, device=kernel_device)
    values = torch.cat([magnitudes, -magnitudes]).float()
    # b = +inf makes sigmoid(b) exactly 1, so the gate is tanh(a)
    x = torch.stack([values, torch.full_like(values, float("inf"))]).unsqueeze(0)
    with pk.use_backend(backend):
        tanh = pk.gate_tanh_sigmoid(x, 1)
        elu_pos, elu_neg = pk.concat_elu(values.unsqueeze(0), 1).chunk(2, 1)
    exact = values.double()
    torch.testing.assert_close(tanh.squeeze().double(), torch.tanh(exact), rtol=2e-6, atol=0)
    torch.testing.assert_close(elu_pos.squeeze().double(), torch.nn.functional.elu(exact), rtol=2e-6, atol=0)
    torch.testing.assert_close(elu_neg.squeeze().double(), torch.nn.functional.elu(-exact), rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", sorted(GATES))
def test_gate_grads_are_accurate_where_sigmoid_saturates(name, backend, kernel_device):
    """d/db carries sigmoid'(b) = (1 - s)·s: 1 - s taken from a rounded s near 1 loses fp32's relative
    accuracy (1.5e-4 off at b = 7.7, 17% at b = 15); the kernels keep it up to where s rounds to 1."""
    b = torch.linspace(0.5, 15.0, 1024, dtype=torch.float64, device=kernel_device).float()
    x = torch.stack([torch.full_like(b, 0.75), b]).unsqueeze(0)
    op, ref = GATES[name]
    with pk.use_backend(backend):
        _, dx, _ = _forward_backward(lambda x_: op(x_, 1), x, None)
    _, dx_ref, _ = _forward_backward(lambda x_: ref(x_, 1), x.double(), None, grad_values=torch.float32)
    torch.testing.assert_close(dx[0, 1].double(), dx_ref[0, 1], rtol=4e-6, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates on the CPU a GPU whose reciprocal errs high")
@pytest.mark.parametrize("name", sorted(GATES))
def test_gates_hold_where_the_reciprocal_rounds_up_to_1(name, monkeypatch):
    """The reciprocal (rsqrt squared) may round ``sigmoid(b)`` to exactly 1 a few ulps before PyTorch's
    ``1 / (1 + e)`` does (b ~ 15): ``1 - s`` must not then drop to 0; and tanh's magnitude past 1.
    Here the interpreter's rsqrt errs by its whole bound, upwards, at every call."""
    rsqrt_at_error_bound(monkeypatch, 1)
    test_gate_grads_are_accurate_where_sigmoid_saturates(name, "triton", torch.device("cpu"))
    # Nor may tanh or sigmoid pass 1 (as they did for a fifth of |a| in (0, 12) and b in (0, 20)).
    values = torch.linspace(0.0, 20.0, 2001)
    tanh_of_a = torch.stack([values, torch.full_like(values, float("inf"))]).unsqueeze(0)  # sigmoid(+inf) = 1
    sigmoid_of_b = torch.stack([torch.ones_like(values), values]).unsqueeze(0)  # a = 1 (tanh(1) < 1 for the tanh gate)
    with pk.use_backend("triton"):
        assert GATES[name][0](tanh_of_a if name == "gate_tanh_sigmoid" else sigmoid_of_b, 1).max() <= 1.0
        assert GATES[name][0](sigmoid_of_b, 1).max() <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulates on the CPU what the same tests check on the GPU")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 = nan, on purpose
@pytest.mark.parametrize("seed", [1, 2])
def test_triton_float32_accuracy_holds_under_the_gpus_approximate_math(seed, monkeypatch):
    """The float32 tests above on the Triton kernels with exp2, rsqrt, exp and division as inexact as
    the GPU's, subnormals flushed (tests/gpu_math_emulation.py): the interpreter's exact NumPy math
    would pass a kernel whose accuracy rests on them (the gates' reciprocal is rsqrt(d)**2)."""
    approximate_gpu_math(monkeypatch, seed)
    cpu = torch.device("cpu")
    test_kernels_are_accurate_near_zero("triton", cpu)
    for name in OPS:
        test_kernels_extreme_inputs_propagate_like_pytorch(name, "triton", cpu)
        for layout in LAYOUTS[:3]:
            test_kernels_match_reference(name, layout, torch.float32, "triton", cpu)
    for name in sorted(GATES):
        test_gate_grads_are_accurate_where_sigmoid_saturates(name, "triton", cpu)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 4, 0), (2, 0, 3)])
def test_kernels_empty_input(name, backend, kernel_device, shape):
    x = torch.randn(shape, device=kernel_device)
    op, _ = _ops(name)
    with pk.use_backend(backend):
        y, dx, _ = _forward_backward(lambda x_: op(x_, 1), x, None)
    channels = 2 * shape[1] if name == "concat_elu" else shape[1] // 2
    assert y.shape == (shape[0], channels, shape[2]) and dx.shape == x.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_float64_runs_the_reference_unless_a_kernel_backend_is_forced(name, backend, kernel_device):
    op, ref = _ops(name)
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=kernel_device)
    torch.testing.assert_close(op(x, 1), ref(x, 1), rtol=0, atol=0)
    with pk.use_backend(backend), pytest.raises(BackendUnavailableError, match=f"^{backend} backend unavailable: its activation kernels take float32"):
        op(x, 1)


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2]], ids=lambda layout: layout.name)
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_outputs_and_grads_keep_the_input_layout(layout, backend, kernel_device):
    x, cond = _inputs(layout, "gate_tanh_sigmoid", torch.float32, kernel_device)
    with pk.use_backend(backend):
        y, dx, _ = _forward_backward(lambda x_, c: pk.gate_tanh_sigmoid(x_, layout.dim, c), x, cond)
        y_elu, dx_elu, _ = _forward_backward(lambda x_: pk.concat_elu(x_, layout.dim), x, None)
    assert dx.stride() == x.stride() and dx_elu.stride() == x.stride()
    for out in (y, y_elu):  # same order of dimensions in memory as x
        assert sorted(range(x.dim()), key=lambda d: -out.stride(d)) == sorted(range(x.dim()), key=lambda d: -x.stride(d))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout",  # the GPU's also run the CUDA kernel's 16-byte vector loads
    [LAYOUTS[0], LAYOUTS[1], LAYOUTS[2], LAYOUTS[6], *(pytest.param(layout, marks=pytest.mark.gpu) for layout in GPU_LAYOUTS[:2])],
    ids=lambda layout: layout.name,
)
@pytest.mark.parametrize("name", list(GATES))
def test_backward_adds_accumulate(name, layout, dtype, backend, kernel_device):
    """``<gate>_backward(grad, x, dim, cond, accumulate)`` is x's gradient plus ``accumulate`` (x's gradient from its
    other uses: a gated conv's kept pre-activation); on the kernel backends summed in fp32 before the one
    rounding, bit for bit, within the table of the float64 gradient plus ``accumulate``. The reference adds it
    to its own gradient, eager autograd in x's dtype, whose bf16 and fp16 roundings the table does not bound
    (1 - sigma(b) cancels; and the sum can: 1 of 65536 bf16 sums missed it on the H200, 2026-11-30); its
    accuracy is test_reference_gradcheck_float64's. A contiguous accumulate beside a channels-last x
    is read in x's layout, and the result keeps x's strides."""
    from pixelcnn_kernels.ops import gates as gate_ops

    backward = getattr(gate_ops, f"{name}_backward")
    x, cond = _inputs(layout, name, dtype, kernel_device)
    dim = layout.dim % x.dim()  # as the forward's autograd passes it
    grad = torch.randn(*(size // 2 if d == dim else size for d, size in enumerate(x.shape)), device=kernel_device).to(dtype)
    accumulate = torch.randn(x.shape, device=kernel_device).to(dtype)
    with pk.use_backend(backend):
        dx = backward(grad, x, dim, cond, accumulate)
        if backend != "reference" and dtype != torch.float32:  # the same sum in fp32, rounded once
            grad32, x32, cond32, accumulate32 = (None if t is None else t.float() for t in (grad, x, cond, accumulate))
            assert torch.equal(dx, backward(grad32, x32, dim, cond32, accumulate32).to(dtype))
    x64 = x.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(GATES[name][1](x64, dim, None if cond is None else cond.double()), x64, grad.double())
    assert dx.dtype == dtype
    if backend == "reference":
        with pk.use_backend(backend):
            assert torch.equal(dx, backward(grad, x, dim, cond, None) + accumulate)
    if backend != "reference" or dtype == torch.float32:
        assert_close(dx, expected + accumulate.double(), dtype=dtype)
    if layout.name != "strided_slice":  # a non-dense x is copied once, in its own memory order
        assert dx.stride() == x.stride()


# Colour groups: 8 gated channels in groups of 3, 3, 2 (blocks 6, 6, 4 of x's 16; contiguous, each
# group's 3 x 16 elements fill the CUDA kernel's fp32 vectors of 4), 6 in 2, 2, 2 (2 x 15: scalar).
GROUPED_SHAPES = [pytest.param((2, 16, 4, 4), id="groups_3_3_2"), pytest.param((2, 12, 3, 5), id="groups_2_2_2")]


@pytest.mark.parametrize("shape", GROUPED_SHAPES)
@pytest.mark.parametrize("name", list(GATES))
def test_reference_groups_gate_each_block(name, shape):
    """groups=3: each block [a_g b_g], twice output colour group g, is gated on its own; the outputs in order."""
    x, cond = torch.randn(shape, dtype=torch.float64), torch.randn(shape[:2], dtype=torch.float64)
    size = -(-shape[1] // 2 // 3)  # masks.color_group_size of the gated channels
    starts = [0, 2 * size, 4 * size, shape[1]]
    blocks = [slice(starts[g], starts[g + 1]) for g in range(3)]
    expected = torch.cat([GATES[name][1](x[:, s], 1, cond[:, s]) for s in blocks], 1)
    assert_close(GATES[name][1](x, 1, cond, 3), expected, dtype=torch.float64)  # vectorised tanh may differ in the last bit


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", GROUPED_SHAPES)
@pytest.mark.parametrize("name", list(GATES))
def test_kernels_in_colour_groups_match_reference(name, shape, layout, backend, kernel_device):
    """Values, d/dx (also with accumulate, summed before the rounding) and d/dcond in colour groups, as the
    gated convs' backward calls them; channels-last rows cross a group boundary inside a row."""
    from pixelcnn_kernels.ops import gates as gate_ops

    x = 3 * torch.randn(shape, device=kernel_device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    cond = torch.randn(shape[:2], device=kernel_device)
    op, ref = GATES[name]
    with pk.use_backend(backend):
        y, dx, dcond = _forward_backward(lambda x_, c: op(x_, 1, c, 3), x, cond)
    y_ref, dx_ref, dcond_ref = _forward_backward(lambda x_, c: ref(x_, 1, c, 3), x.double(), cond.double(), grad_values=x.dtype)
    assert_close(y, y_ref, dtype=x.dtype, msg=f"{name} values")
    assert_close(dx, dx_ref, dtype=x.dtype, msg=f"{name} d/dx")
    _assert_sum_close(dcond, dcond_ref, dx_ref, [2, 3], x.dtype, f"{name} d/dcond")
    assert y.stride() == op(x, 1, cond, 3).stride() and dx.stride() == x.stride()
    backward = getattr(gate_ops, f"{name}_backward")
    grad, accumulate = torch.randn_like(y), torch.randn_like(x)
    with pk.use_backend(backend):
        dx_accumulated = backward(grad, x, 1, cond, accumulate, 3)
    x64 = x.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref(x64, 1, cond.double(), 3), x64, grad.double())
    assert_close(dx_accumulated, expected + accumulate.double(), dtype=x.dtype, msg=f"{name} d/dx + accumulate")


@pytest.mark.parametrize("channels, groups, error, match", [
    (6, 0, ValueError, "^groups must be >= 1, got 0"),
    (6, True, TypeError, "^groups must be an int, got bool"),
    (14, 3, ValueError, r"^x.shape\[1\] // 2 \(gated channels\)=7 can't be split into 3 colour groups .*; use 6 or 8$"),
    (4, 3, ValueError, r"^x.shape\[1\] // 2 \(gated channels\)=2 leaves a colour group empty"),
])  # fmt: skip
def test_groups_that_do_not_split_the_channels_raise(channels, groups, error, match):
    with pytest.raises(error, match=match):
        pk.gate_tanh_sigmoid(torch.randn(2, channels, 3), 1, None, groups)


@pytest.mark.parametrize("accumulate, error, match", [
    (torch.randn(2, 6, 3, 5), ValueError, r"^accumulate must have x's shape \(2, 6, 5, 3\)"),
    (torch.randn(2, 6, 5, 3, dtype=torch.float64), TypeError, "^accumulate has dtype torch.float64 but x has torch.float32"),
])
def test_backward_rejects_an_accumulate_unlike_x(accumulate, error, match):
    from pixelcnn_kernels.ops import gates as gate_ops

    with pytest.raises(error, match=match):
        gate_ops.gate_sigmoid_backward(torch.randn(2, 3, 5, 3), torch.randn(2, 6, 5, 3), 1, None, accumulate)


# ---------------------------------------------------------------- op registration


def _opcheck_cases(name: str, device) -> list[tuple]:
    """(op, args) of the forward and the backward op, on a contiguous and a channels-last input."""
    cases = []
    for make in (lambda t: t, _channels_last):
        x = make(torch.randn(2, 6, 3, 5, device=device))
        if name == "concat_elu":
            forward, forward_args = torch.ops.pixelcnn_kernels.concat_elu.default, (x.requires_grad_(), 1)
            backward = torch.ops.pixelcnn_kernels.concat_elu_backward.default
            backward_args = (torch.randn(2, 12, 3, 5, device=device), x.detach(), 1)
        else:
            cond = torch.randn(2, 6, device=device, requires_grad=True)
            forward, forward_args = getattr(torch.ops.pixelcnn_kernels, name).default, (x.requires_grad_(), 1, cond)
            backward = getattr(torch.ops.pixelcnn_kernels, f"{name}_backward").default
            backward_args = (torch.randn(2, 3, 3, 5, device=device), x.detach(), 1, cond.detach())
            cases.append((backward, (*backward_args, torch.randn(2, 6, 3, 5, device=device))))  # with accumulate
        cases += [(forward, forward_args), (backward, backward_args)]
    return cases


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, backend, kernel_device):
    with pk.use_backend(backend):
        for op, args in _opcheck_cases(name, kernel_device):
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    cond = torch.randn(2, 6, dtype=torch.float64)

    def loss(x, cond):
        gated = pk.gate_tanh_sigmoid(x, 1, cond)
        return pk.gate_sigmoid(x, -1).square().sum() + pk.concat_elu(gated, 1).square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with pk.use_backend("reference"):
        eager_value, *eager_grads = _value_and_grads(loss, x, cond)
        compiled_value, *compiled_grads = _value_and_grads(compiled, x, cond)
    torch.testing.assert_close(compiled_value, eager_value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def _value_and_grads(fn, *inputs):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    value = fn(*leaves)
    return (value.detach(), *torch.autograd.grad(value, leaves))


# ------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "module, name", [(GateTanhSigmoid(dim=-1), "gate_tanh_sigmoid"), (GateSigmoid(dim=-1), "gate_sigmoid"), (ConcatELU(dim=-1), "concat_elu")]
)
def test_modules_wrap_the_ops(module, name):
    op, _ = _ops(name)
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(module(x), op(x, -1), rtol=0, atol=0)
    assert "dim=-1" in repr(module)
    if name != "concat_elu":
        cond = torch.randn(2, 6)
        torch.testing.assert_close(module(x, cond), op(x, -1, cond), rtol=0, atol=0)


@pytest.mark.parametrize("module", [GateTanhSigmoid, GateSigmoid, ConcatELU])
def test_modules_reject_a_non_int_dim(module):
    with pytest.raises(TypeError, match="dim"):
        module(dim=1.0)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(GATES))
def test_gate_odd_split_size_raises(name):
    op, _ = _ops(name)
    with pytest.raises(ValueError, match=r"x.shape\[1\] must be even"):
        op(torch.randn(2, 5, 3), 1)
    with pytest.raises(ValueError, match=r"x.shape\[2\] must be even"):
        op(torch.randn(2, 4, 3), -1)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(
    "x, dim, error, match",
    [
        ([[1.0, 2.0]], 1, TypeError, "x must be a torch.Tensor"),
        (torch.ones(2, 4, dtype=torch.int64), 1, TypeError, "x must have dtype"),
        (torch.ones(2, 4), 2, ValueError, "dim=2 is out of range"),
        (torch.ones(2, 4), 1.0, TypeError, "dim must be an int"),
        (torch.ones(2, 4), True, TypeError, "dim must be an int"),
        (torch.tensor(1.0), 0, ValueError, "out of range"),
    ],
)
def test_bad_x_or_dim_raises(name, x, dim, error, match):
    op, _ = _ops(name)
    with pytest.raises(error, match=match):
        op(x, dim)


@pytest.mark.parametrize("name", list(GATES))
@pytest.mark.parametrize(
    "cond, dim, error, match",
    [
        (torch.ones(2, 3), 1, ValueError, r"cond must have shape \(x.shape\[0\], x.shape\[dim\]\) = \(2, 6\)"),
        (torch.ones(2, 6, 1), 1, ValueError, "cond must have shape"),
        (torch.ones(2, 6, dtype=torch.float64), 1, TypeError, "cond must have x's dtype"),
        (torch.ones(2, 6, dtype=torch.int32), 1, TypeError, "cond must have dtype"),
        (torch.ones(2, 6, device="meta"), 1, ValueError, "cond is on meta"),
        (torch.ones(6, 6), 0, ValueError, "dim must not be 0"),
        ("bias", 1, TypeError, "cond must be a torch.Tensor"),
    ],
)
def test_bad_cond_raises(name, cond, dim, error, match):
    op, _ = _ops(name)
    with pytest.raises(error, match=match):
        op(torch.ones(2, 6, 3) if dim == 1 else torch.ones(6, 6, 3), dim, cond)


# -------------------------------------------------------------------- GPU, large


def _check_slices(y: torch.Tensor, expected: Callable[[slice], torch.Tensor], length: int, crossing: int) -> None:
    """Compares 256-wide slices ``y[..., s]`` with ``expected(s)``: at the start, around ``crossing`` and at the end."""
    for start in (0, crossing - 128, length - 256):
        s = slice(start, start + 256)
        assert_close(y[..., s], expected(s), dtype=y.dtype, msg=f"slice {s}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gate_beyond_2_31_elements(backend):
    """x (1, 2, 2**30 + 96) bf16, 2**31 + 192 elements: b's offsets and dx's pass 2**31."""
    length = 2**30 + 96
    x = torch.randn(1, 2, length, device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(1, 2, device="cuda", dtype=torch.bfloat16)
    with pk.use_backend(backend):
        y, dx, dcond = _forward_backward(lambda x_, c: pk.gate_tanh_sigmoid(x_, 1, c), x, cond)
    grad = torch.randn(y.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda").to(y.dtype)

    def reference_slice(s: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x_slice = x[..., s].double().requires_grad_(True)
        y_slice = reference.gate_tanh_sigmoid(x_slice, 1, cond.double())
        (dx_slice,) = torch.autograd.grad(y_slice, x_slice, grad[..., s].double())
        return y_slice.detach(), dx_slice

    crossing = 2**31 - length  # b[..., crossing] (and dx's) sits at element 2**31 of x
    _check_slices(y, lambda s: reference_slice(s)[0], length, crossing)
    _check_slices(dx, lambda s: reference_slice(s)[1], length, crossing)
    assert_close(dcond, dx.sum(-1, dtype=torch.float64), dtype=torch.bfloat16, msg="d/dcond")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_concat_elu_beyond_2_31_elements(backend):
    """x (1, 2**30 + 64) bf16: the output, 2**31 + 128 elements, has its -x half past 2**31."""
    length = 2**30 + 64
    x = torch.randn(1, length, device="cuda", dtype=torch.bfloat16)
    with pk.use_backend(backend):
        y = pk.concat_elu(x, 1)
    y_pos, y_neg = y[:, :length], y[:, length:]
    crossing = 2**31 - length  # y_neg[:, crossing] sits at element 2**31 of y
    _check_slices(y_pos, lambda s: reference.concat_elu(x[..., s].double(), 1)[:, :256], length, crossing)
    _check_slices(y_neg, lambda s: reference.concat_elu(x[..., s].double(), 1)[:, 256:], length, crossing)
