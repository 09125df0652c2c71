"""The one-instruction exp and reciprocals of ``pixelcnn_kernels.triton.approx_math``, in the interpreter:
exactly, and with the GPU's approximation errors emulated (tests/gpu_math_emulation.py) or at their bounds."""

import numpy as np
import pytest
import torch

from pixelcnn_kernels.backend import triton_interpret

pytestmark = [
    pytest.mark.skipif(not triton_interpret(), reason="runs the helpers in the CPU interpreter (TRITON_INTERPRET=1); the GPU tests run them in the kernels"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NumPy's, for the edge inputs' overflows and divisions by 0, on purpose
]

triton = pytest.importorskip("triton")
tl = triton.language

from gpu_math_emulation import approximate_gpu_math, rsqrt_at_error_bound  # noqa: E402
from pixelcnn_kernels.triton.approx_math import exp_ftz, reciprocal_of_1_or_more, reciprocal_positive  # noqa: E402

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


@triton.jit
def _apply_kernel(x_ptr, exp_ptr, reciprocal_ptr, bounded_reciprocal_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(exp_ptr + offsets, exp_ftz(x), mask=mask)
    tl.store(reciprocal_ptr + offsets, reciprocal_positive(x), mask=mask)
    tl.store(bounded_reciprocal_ptr + offsets, reciprocal_of_1_or_more(x), mask=mask)


def _apply(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp_ftz, reciprocal_positive, reciprocal_of_1_or_more) of x."""
    outputs = tuple(torch.empty_like(x) for _ in range(3))
    _apply_kernel[(1,)](x, *outputs, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return outputs


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of float32's spacing at |exact|."""
    spacing = torch.from_numpy(np.spacing(exact.abs().float().numpy()).astype(np.float64))
    return (got.double() - exact).abs() / spacing


@pytest.mark.parametrize("emulated", [False, True], ids=["exact", "gpu_errors"])
def test_exp_ftz_is_exp_flushing_subnormal_results(emulated, monkeypatch):
    if emulated:
        approximate_gpu_math(monkeypatch, seed=3)
    x = torch.cat([torch.linspace(-87.0, 88.0, 2001), torch.tensor([-88.0, -100.0, -104.0, float("-inf"), 89.0, float("inf"), float("nan"), 0.0])])
    exp, _, _ = _apply(x)
    exact = torch.exp(x.double())
    normal = (exact >= TINY) & (exact <= torch.finfo(torch.float32).max)
    # The product x·log2 e is rounded before ex2 (on the GPU and here): up to |x·log2 e|·2^-24 relative, and ex2.approx 2^-22 more.
    allowed = (x.double().abs() * 1.4426950408889634 * 2.0**-24 + (2.0**-22 if emulated else 0.0)) / 2.0**-24 + 1
    assert (_ulps(exp[normal], exact[normal]) <= allowed[normal]).all()
    if emulated:  # the GPU flushes subnormal results to 0 (the interpreter's NumPy does not)
        assert (exp[(exact < TINY) & ~x.isnan()] == 0).all()
    assert exp[x == 89.0].isinf().all() and exp[x == float("inf")].isinf().all() and exp[x.isnan()].isnan().all()


@pytest.mark.parametrize("emulated", [False, True], ids=["exact", "gpu_errors"])
def test_reciprocals_are_within_6_ulps(emulated, monkeypatch):
    if emulated:
        approximate_gpu_math(monkeypatch, seed=4)
    generator = torch.Generator().manual_seed(0)
    d = torch.cat([torch.exp(torch.empty(4000).uniform_(-80.0, 80.0, generator=generator)), torch.tensor([1.0, 2.0, 0.5, 3.0])])
    _, reciprocal, bounded = _apply(d)
    # rsqrt's 2^-22.9 doubled by the square, and the roundings of r and of r·r.
    assert (_ulps(reciprocal, 1 / d.double()) <= 6).all()
    assert (_ulps(bounded[d >= 1], 1 / d[d >= 1].double()) <= 6).all()
    assert bounded[d == 1.0].eq(1.0).all()  # a saturated sigmoid's 1 / (1 + e) is exactly 1
    _, edges, bounded_edges = _apply(torch.tensor([float("inf"), 0.0, TINY / 4, float("nan")]))
    assert edges[0] == 0 and edges[1].isinf() and edges[2].isinf() and edges[3].isnan()  # a subnormal d counts as 0
    assert bounded_edges[0] == 0 and bounded_edges[3].isnan()


@pytest.mark.parametrize("direction", [1, -1], ids=["rsqrt_high", "rsqrt_low"])
def test_reciprocal_of_1_or_more_is_at_most_1_at_either_error_bound(direction, monkeypatch):
    """With rsqrt off by its whole bound (either way, every call), 1/d for d just above 1 stays at
    most 1 and within 6 ulps, and 1/1 is exactly 1: a sigmoid 1 / (1 + e) or tanh never passes 1
    (reciprocal_positive itself passes 1 there when rsqrt errs high)."""
    rsqrt_at_error_bound(monkeypatch, direction)
    d = 1.0 + torch.arange(0, 64, dtype=torch.float32) * torch.finfo(torch.float32).eps  # 1 and its next 63 floats
    _, raw, bounded = _apply(d)
    assert bounded[0] == 1.0 and (bounded <= 1.0).all()
    assert (_ulps(bounded, 1 / d.double()) <= 6).all()
    assert direction < 0 or (raw > 1.0).any()
