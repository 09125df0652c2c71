"""The one-instruction exp and reciprocal of ``pixelcnn_kernels.triton.approx_math``, in the interpreter:
exactly, and with the GPU's approximation errors emulated (tests/gpu_math_emulation.py)."""

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

from gpu_math_emulation import approximate_gpu_math  # noqa: E402
from pixelcnn_kernels.triton.approx_math import exp_ftz, reciprocal_positive  # noqa: E402

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


@triton.jit
def _apply_kernel(x_ptr, exp_ptr, reciprocal_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(exp_ptr + offsets, exp_ftz(x), mask=mask)
    tl.store(reciprocal_ptr + offsets, reciprocal_positive(x), mask=mask)


def _apply(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    exp, reciprocal = torch.empty_like(x), torch.empty_like(x)
    _apply_kernel[(1,)](x, exp, reciprocal, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return exp, reciprocal


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of float32's spacing at |exact|."""
    spacing = torch.from_numpy(np.spacing(exact.abs().float().numpy()).astype(np.float64))
    return (got.double() - exact).abs() / spacing


@pytest.mark.parametrize("emulated", [False, True], ids=["exact", "gpu_errors"])
def test_exp_ftz_is_exp_flushing_subnormal_results(emulated, monkeypatch):
    if emulated:
        approximate_gpu_math(monkeypatch, seed=3)
    x = torch.cat([torch.linspace(-87.0, 88.0, 2001), torch.tensor([-88.0, -100.0, -104.0, float("-inf"), 89.0, float("inf"), float("nan"), 0.0])])
    exp, _ = _apply(x)
    exact = torch.exp(x.double())
    normal = (exact >= TINY) & (exact <= torch.finfo(torch.float32).max)
    # The product x·log2 e is rounded before ex2 (on the GPU and here): up to |x·log2 e|·2^-24 relative, and ex2.approx 2^-22 more.
    allowed = (x.double().abs() * 1.4426950408889634 * 2.0**-24 + (2.0**-22 if emulated else 0.0)) / 2.0**-24 + 1
    assert (_ulps(exp[normal], exact[normal]) <= allowed[normal]).all()
    if emulated:  # the GPU flushes subnormal results to 0 (the interpreter's NumPy does not)
        assert (exp[(exact < TINY) & ~x.isnan()] == 0).all()
    assert exp[x == 89.0].isinf().all() and exp[x == float("inf")].isinf().all() and exp[x.isnan()].isnan().all()


@pytest.mark.parametrize("emulated", [False, True], ids=["exact", "gpu_errors"])
def test_reciprocal_positive_is_within_6_ulps_and_exact_at_1(emulated, monkeypatch):
    if emulated:
        approximate_gpu_math(monkeypatch, seed=4)
    generator = torch.Generator().manual_seed(0)
    d = torch.cat([torch.exp(torch.empty(4000).uniform_(-80.0, 80.0, generator=generator)), torch.tensor([1.0, 2.0, 0.5, 3.0])])
    _, reciprocal = _apply(d)
    # rsqrt's 2^-22.9 doubled by the square, and the roundings of r and of r·r.
    assert (_ulps(reciprocal, 1 / d.double()) <= 6).all()
    assert reciprocal[d == 1.0].eq(1.0).all()  # a saturated sigmoid's 1 / (1 + e) is exactly 1
    _, edges = _apply(torch.tensor([float("inf"), 0.0, TINY / 4, float("nan")]))
    assert edges[0] == 0 and edges[1].isinf() and edges[2].isinf() and edges[3].isnan()  # a subnormal d counts as 0
