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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Where kernel-backend tests put their tensors: the GPU, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
