"""The GPU's approximate float32 exp, exp2, rsqrt and division, emulated in the Triton interpreter.

On a GPU, Triton compiles ``tl.exp(x)`` to ``ex2.approx(x · log2 e)``: the product is rounded
to float32 first (an error growing with |x|), then ex2.approx adds up to 2^-22 relative.
A float32 ``/`` is ``div.full``: up to 2 ulp. ``tl.exp2`` and ``tl.math.rsqrt`` are ``ex2.approx.ftz``
(2^-22 relative) and ``rsqrt.approx.ftz`` (2^-22.9), subnormal arguments and results flushed to
zero (the gates' math, :mod:`pixelcnn_kernels.triton.gates`). The interpreter computes them exactly (NumPy),
so a kernel whose accuracy rests on them passes on the CPU and fails on the GPU: the DMOL
gradient did (2026-11-30). :func:`approximate_gpu_math` makes the interpreter compute them
as the GPU may (the approximation errors drawn at random within their bounds), and FMA
exactly, as the GPU does (the interpreter rounds the product first).
"""

from __future__ import annotations

import numpy as np
import pytest
from triton.runtime import interpreter

_LOG2_E = np.float32(1.4426950408889634)
RSQRT_ERROR = 2.0**-22.9  # rsqrt.approx's relative error bound (PTX ISA)


def approximate_gpu_math(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """For the rest of the test, the interpreter's float32 exp, exp2, rsqrt, division and FMA as the GPU's."""
    rng = np.random.default_rng(seed)

    def exp(x):
        if x.dtype != np.float32:
            return np.exp(x)
        power = (x * _LOG2_E).astype(np.float32)
        return (np.exp2(power.astype(np.float64)) * (1 + rng.uniform(-1, 1, x.shape) * 2.0**-22)).astype(np.float32)

    def flush(v):
        return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0), v).astype(np.float32)

    def exp2(x):
        if x.dtype != np.float32:
            return np.exp2(x)
        with np.errstate(over="ignore"):  # past float32's range: inf, as on the GPU
            return flush((np.exp2(flush(x).astype(np.float64)) * (1 + rng.uniform(-1, 1, x.shape) * 2.0**-22)).astype(np.float32))

    def rsqrt(x):
        if x.dtype != np.float32:
            return 1 / np.sqrt(x)
        with np.errstate(all="ignore"):
            return (1 / np.sqrt(flush(x).astype(np.float64)) * (1 + rng.uniform(-1, 1, x.shape) * RSQRT_ERROR)).astype(np.float32)

    def divide(a, b):
        if a.dtype != np.float32:
            return np.divide(a, b)
        with np.errstate(all="ignore"):
            quotient = (a.astype(np.float64) / b).astype(np.float32)
            return (quotient * (1 + rng.uniform(-2, 2, quotient.shape) * 2.0**-23)).astype(np.float32)

    def fma(self, x, y, z):
        exact = x.data.astype(np.float64) * y.data + z.data
        return interpreter.TensorHandle(exact.astype(z.data.dtype), z.dtype.scalar)

    builder = interpreter.InterpreterBuilder
    monkeypatch.setattr(builder, "create_exp", lambda self, arg: self.unary_op(arg, exp))
    monkeypatch.setattr(builder, "create_exp2", lambda self, arg: self.unary_op(arg, exp2))
    monkeypatch.setattr(builder, "create_rsqrt", lambda self, arg: self.unary_op(arg, rsqrt))
    monkeypatch.setattr(builder, "create_fdiv", lambda self, lhs, rhs: self.binary_op(lhs, rhs, divide))
    monkeypatch.setattr(builder, "create_fma", fma)


def rsqrt_at_error_bound(monkeypatch: pytest.MonkeyPatch, direction: int) -> None:
    """For the rest of the test, the interpreter's rsqrt off by its whole error bound at every
    call, upwards (``direction`` 1) or downwards (-1): the approximate reciprocal's worst case."""
    exact_rsqrt = interpreter.InterpreterBuilder.create_rsqrt

    def rsqrt(self, arg):
        value = exact_rsqrt(self, arg)
        return interpreter.TensorHandle((value.data.astype(np.float64) * (1 + direction * RSQRT_ERROR)).astype(value.data.dtype), value.dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_rsqrt", rsqrt)
