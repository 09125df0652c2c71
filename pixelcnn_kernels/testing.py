"""Tolerances for comparing a kernel backend with the reference, and a counter of the custom ops.

One table for the whole project: tests, the property tests, ``convert()``'s
probe check and the models' backend-equivalence checks all read it. Values are
(rtol, atol) for outputs computed from inputs of that dtype with fp32 math
inside; gradients get the same table (they are one more fused pass).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# Matrix-unit products (convolutions) in fp32 may run in TF32 on the GPU.
TF32_TOLERANCE: tuple[float, float] = (5e-3, 5e-3)


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> tuple[float, float]:
    """(rtol, atol) for a result computed from ``dtype`` inputs."""
    if tf32 and dtype == torch.float32:
        return TF32_TOLERANCE
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None, tf32: bool = False, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the project's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``; NaNs must match position by position.
    """
    rtol, atol = tolerance(dtype or actual.dtype, tf32=tf32)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=True, msg=(lambda m: f"{msg}\n{m}") if msg else None
    )


class CountedCustomOps(TorchDispatchMode):
    """Counts, by name, the package's custom ops (``pixelcnn_kernels::*``) that reach the dispatcher
    in the block; being a dispatch mode, it sends every op call there (off the eager fast path)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pixelcnn_kernels":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))
