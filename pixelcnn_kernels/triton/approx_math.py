"""float32 exp and reciprocal in the one-instruction forms an sm_90 GPU runs them in.

Triton compiles ``tl.exp(x)`` to ``ex2.approx.f32`` of x·log2 e and ``a / b`` to
``div.full.f32``; around their one MUFU instruction these handle subnormal arguments and
results, 3 and 6 instructions more (SASS, Triton 3.6). ``tl.exp2`` is ``ex2.approx.ftz.f32``
and ``tl.math.rsqrt`` ``rsqrt.approx.ftz.f32``: one instruction each, subnormals flushed to
zero. The elementwise kernels are bound by instruction issue where their arithmetic passes
what an H200 issues while their bytes stream (the bf16 gates, the DMOL NLL:
``benchmarks/dmol_and_gates_perf_notes.md``), and their subnormal intermediates are far
below anything their results show, so they use these. Both run in the Triton interpreter
(exactly; ``tests/gpu_math_emulation.py`` gives it the GPU's errors).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp_ftz(x):
    """``exp(x)`` as ``tl.exp`` computes it on the GPU (ex2.approx of the rounded x·log2 e, 2^-22
    relative), a subnormal result flushed to 0: only the flush differs."""
    return tl.exp2(x * LOG2_E)


@triton.jit
def reciprocal_positive(d):
    """``1 / d`` for ``d > 0`` (or +inf, NaN) as ``rsqrt(d)**2``: within 6 fp32 ulps (rsqrt.approx
    is 2^-22.9 relative, doubled by the square); +inf gives 0, NaN NaN, 0 or a subnormal ``d``
    +inf. Where 6 ulps are too many, correct it by the FMA residual (``triton/dmol.py``)."""
    r = tl.math.rsqrt(d)
    return r * r


@triton.jit
def reciprocal_of_1_or_more(d):
    """:func:`reciprocal_positive` for ``d >= 1`` (or +inf, NaN), never past 1 and exactly 1 at
    ``d`` = 1, where the approximation may land an ulp or two either side: a sigmoid
    ``1 / (1 + e)`` or a tanh ``-e / (e + 2)`` stays within [-1, 1], and a saturated one is
    exactly 1, as PyTorch's."""
    q = reciprocal_positive(d)
    return tl.where((q > 1.0) | (d == 1.0), 1.0, q)
