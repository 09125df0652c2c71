"""Determinism (issue 8, item 4): the same inputs give bitwise-identical outputs and gradients, run to run.

No kernel of the package uses atomics (a test below keeps it so): every
reduction across threads, e.g. the masked convolution's weight gradient split
over pixels, adds its partial sums in a fixed order. So determinism holds with
and without ``torch.use_deterministic_algorithms(True)``, and both are tested on
every op and every available backend. The reference backend on the GPU is
PyTorch's own code (cuDNN may pick a non-deterministic weight-gradient
algorithm), so there it is tested in deterministic mode only.

CPU: tiny shapes (the Triton kernels run in the interpreter). GPU (marked
``gpu``): realistic sizes, float32 and bfloat16.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from op_table import DEVICE, OPS, forward_backward, valid_inputs

import pixelcnn_kernels as pk
from pixelcnn_kernels.backend import use_backend

ROOT = Path(__file__).resolve().parent.parent

# Realistic sizes for the GPU runs: several pixel blocks, split weight-gradient reductions.
GPU_PARAMS = {
    "gate_tanh_sigmoid": dict(batch=16, size=64, height=32, width=32, last_dim=False, cond=True),
    "concat_elu": dict(batch=16, size=64, height=32, width=32, last_dim=False, cond=False),
    "discretized_mix_logistic_nll": dict(batch=16, height=32, width=32, channels=3, mixtures=10, num_bins=256, x_dtype=torch.uint8),
    "sample_discretized_mix_logistic": dict(batch=16, height=32, width=32, channels=3, mixtures=10, num_bins=256, quantize=True),
    "masked_conv2d": dict(
        batch=16, height=32, width=32, in_channels=64, out_channels=64, mask=("B", (5, 5)), custom_taps=[True] * 9, dilation=1, color_groups=1, bias=True, cond=False
    ),
}
GPU_PARAMS["gate_sigmoid"] = GPU_PARAMS["gate_tanh_sigmoid"]
GPU_PARAMS["masked_conv2d_gated"] = dict(GPU_PARAMS["masked_conv2d"], cond=True, addend=True, gate="tanh_sigmoid")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(enabled)`` for the block, restoring the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _params(backends_marks: dict[str, tuple], on_gpu: bool, extra_marks=lambda backend, deterministic: ()) -> list:
    """(name, backend, deterministic) for every op, backend and mode, but the reference on the GPU outside deterministic mode.

    There the reference backend is PyTorch's own code, deterministic only in deterministic mode.
    """
    params = []
    for name in OPS:
        for backend, marks in backends_marks.items():
            for deterministic in (False, True):
                if backend == "reference" and on_gpu and not deterministic:
                    continue
                mode = "deterministic_algorithms" if deterministic else "default"
                params.append(pytest.param(name, backend, deterministic, id=f"{name}-{backend}-{mode}", marks=marks + extra_marks(backend, deterministic)))
    return params


def assert_bitwise_reproducible(name: str, backend: str, inputs: dict[str, Any]) -> None:
    """Two runs of op ``name`` on ``backend``: identical outputs and gradients, bit for bit."""
    with use_backend(backend):
        first, first_grads = forward_backward(OPS[name], inputs)
        second, second_grads = forward_backward(OPS[name], inputs)
    assert torch.equal(first, second), f"{name} on {backend}: outputs differ between runs"
    assert first_grads.keys() == second_grads.keys()
    for arg in first_grads:
        assert torch.equal(first_grads[arg], second_grads[arg]), f"{name} on {backend}: d/d{arg} differs between runs"


GPU = (pytest.mark.gpu,)


def _sanitized(backend: str, deterministic: bool) -> tuple:
    """compute-sanitizer (memcheck, racecheck) runs every op's tiny inputs forward and backward on both kernel backends, once."""
    return (pytest.mark.sanitize,) if backend in ("triton", "cuda") and not deterministic else ()


@pytest.mark.parametrize("name, backend, deterministic", _params({"reference": (), "triton": (), "cuda": GPU}, DEVICE.type == "cuda", _sanitized))
def test_small_inputs_are_bitwise_reproducible(name, backend, deterministic):
    inputs = valid_inputs(name, DEVICE)
    with deterministic_algorithms(deterministic):
        assert_bitwise_reproducible(name, backend, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, backend, deterministic", _params(dict.fromkeys(("reference", "triton", "cuda"), GPU), on_gpu=True))
def test_realistic_sizes_are_bitwise_reproducible_on_the_gpu(name, backend, deterministic, dtype):
    inputs = OPS[name].make(GPU_PARAMS[name], dtype, DEVICE, torch.Generator().manual_seed(0))
    with deterministic_algorithms(deterministic):
        assert_bitwise_reproducible(name, backend, inputs)


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampler_with_a_seeded_generator_is_reproducible(backend):
    logits = valid_inputs("sample_discretized_mix_logistic", DEVICE)["logits"]
    with use_backend(backend):
        draws = [pk.sample_discretized_mix_logistic(logits, generator=torch.Generator(DEVICE).manual_seed(7), channels=3) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


# Atomic read-modify-writes in Triton (tl.atomic_add, ...) and CUDA (atomicAdd, ...).
ATOMICS = re.compile(r"\btl\.atomic_\w+|\batomic(Add|Sub|Exch|Min|Max|Inc|Dec|CAS|And|Or|Xor)\w*\s*\(")


def test_no_kernel_uses_atomics():
    """Kernels adding atomics must also honour torch.use_deterministic_algorithms(True) (a fixed-order path) and test it here."""
    sources = sorted((ROOT / "pixelcnn_kernels" / "triton").glob("*.py")) + sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*.h"))
    assert sources
    found = [f"{path.relative_to(ROOT)}:{number}" for path in sources for number, line in enumerate(path.read_text().splitlines(), 1) if ATOMICS.search(line)]
    assert not found, f"atomics found (add a deterministic path and test it): {found}"
