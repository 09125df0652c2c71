"""What the fused sampling-step tests share (``test_sampling_step.py``, ``test_sampling_step_pp.py``).

Where a step runs (on the CPU the interpreter and the CUDA kernels built for it, both kernel backends on a GPU), a fixture
making PyTorch's GPU convolutions compute as the fused steps do, the comparison at
the expected's scale with :mod:`pixelcnn_kernels.testing`'s tolerance table, and the
widest step a size predicate allows.
"""

import pytest
import torch

from pixelcnn_kernels.backend import unavailable_reason, use_backend
from pixelcnn_kernels.testing import tolerance

GPU = (pytest.mark.gpu,)


def step_backends(*cuda_marks) -> list:
    """(backend, device) of the step: on the CPU the interpreter and the CUDA kernels built for it, both kernel backends on a GPU."""
    return [
        pytest.param("triton", "cpu", id="triton-cpu"),
        pytest.param("cuda", "cpu", id="cuda-cpu", marks=pytest.mark.cuda_on_cpu),
        pytest.param("triton", "cuda", id="triton-gpu", marks=GPU),
        pytest.param("cuda", "cuda", id="cuda", marks=GPU + cuda_marks),
    ]


@pytest.fixture
def exact_gpu_convs(monkeypatch):
    """On a GPU, PyTorch's and the naive sampler's convolutions in full fp32 (no TF32) and deterministic, as the fused steps compute."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


def kernel_backend(backend: str, device: str) -> use_backend:
    """Forces ``backend``; skips only where it cannot run on ``device`` at all (no GPU, extension not built)."""
    reason = unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    return use_backend(backend)


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "", atol: float | None = None) -> None:
    """The project tolerance of ``dtype`` (or ``atol``) on both tensors divided by the expected's largest magnitude."""
    scale = expected.abs().max().item()
    rtol, table_atol = tolerance(dtype)
    atol = table_atol if atol is None else atol
    torch.testing.assert_close(actual.double() / scale, expected.double() / scale, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def widest(fits) -> int:
    """The largest width below 2^15 that ``fits`` (one of :mod:`pixelcnn_kernels.ops.sampling`'s monotone ``*_fits`` predicates) allows."""
    return max(width for width in range(1, 1 << 15) if fits(width))
