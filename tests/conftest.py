"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in the interpreter: TRITON_INTERPRET
must be set before any kernel is defined, so it is set here, before
pixelcnn_kernels is imported by any test.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        # Tests taking kernel_device, and the op-table modules (their DEVICE), run their kernels on the GPU here: part of `pytest -m gpu`.
        on_device = "kernel_device" in getattr(item, "fixturenames", ()) or getattr(getattr(item, "module", None), "DEVICE", None) == torch.device("cuda")
        if HAS_CUDA and on_device:
            item.add_marker(pytest.mark.gpu)
        if HAS_CUDA and "2_31" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("beyond_2_31"))  # 10-70 GB each: one worker, one after the other
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _return_cached_gpu_memory():
    """Hands a test's cached GPU memory back when it is large, so parallel workers do not starve each other."""
    yield
    if HAS_CUDA and torch.cuda.memory_reserved() > 4 * 2**30:
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Where kernel-backend tests put their tensors: the GPU, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
