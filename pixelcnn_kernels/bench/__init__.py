"""Benchmarks: the harness plus one module of cases per op family.

Each family module (``gates``, ``dmol``, ``masked_conv``, ...) defines
``cases(on_gpu: bool) -> list[harness.Case]``: the sizes the issues quote on a
GPU, small sizes on the CPU.
"""

from __future__ import annotations

import importlib

FAMILIES = ("gates", "dmol", "masked_conv", "models", "sampling")


def cases_for(family: str, on_gpu: bool):
    """The benchmark cases of one family."""
    return importlib.import_module(f"pixelcnn_kernels.bench.{family}").cases(on_gpu)
