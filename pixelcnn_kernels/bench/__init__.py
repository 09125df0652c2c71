"""Benchmarks: the harness plus one module of cases per op family.

Each family module (``gates``, ``dmol``, ``masked_conv``, ...) defines
``cases(on_gpu: bool) -> list[harness.Case]``: the sizes the issues quote on a
GPU, small sizes on the CPU.
"""

from __future__ import annotations

import importlib

FAMILIES = ("gates", "dmol", "masked_conv", "models", "sampling")


def available_families() -> list[str]:
    """Families whose benchmark module exists in this install."""
    found = []
    for family in FAMILIES:
        try:
            importlib.import_module(f"pixelcnn_kernels.bench.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pixelcnn_kernels.bench.{family}":
                raise
            continue
        found.append(family)
    return found


def cases_for(family: str, on_gpu: bool):
    """The benchmark cases of one family."""
    return importlib.import_module(f"pixelcnn_kernels.bench.{family}").cases(on_gpu)
