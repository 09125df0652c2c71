"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in the interpreter: TRITON_INTERPRET
must be set before any kernel is defined, so it is set here, before
pixelcnn_kernels is imported by any test. And tests marked ``cuda_on_cpu``
(``op_table.CUDA``, the cuda backend's cases; ``op_table.CUDA_KERNELS``, the CUDA
kernels' own tests) run the CUDA kernels on CPU tensors, built for the CPU by
:mod:`pixelcnn_kernels.cuda_on_cpu`; on a GPU they run there instead.
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
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """Appends each failed test to $PIXELCNN_KERNELS_FAILURE_LOG as it is reported, when that is set.

    The GPU check reads the list from there: a run cut at its time limit, or an xdist
    controller that dies after a worker crashed, still leaves every failure seen so far
    (pytest's own summary is printed only at the end). With xdist the controller writes,
    as it receives each worker's report; a worker that crashed is reported as a failure.
    """
    path = os.environ.get("PIXELCNN_KERNELS_FAILURE_LOG")
    if not path or not report.failed or "PYTEST_XDIST_WORKER" in os.environ:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    reason = crash.message if crash is not None else str(report.longrepr)
    first_line = (reason.strip().splitlines() or [""])[0]
    with open(path, "a") as log:
        log.write(f"FAILED {report.nodeid} ({report.when}): {first_line[:300]}\n")
        log.write("".join(f"    {line}\n" for line in report.longreprtext.splitlines()[-40:]))


@pytest.fixture(autouse=True)
def _return_cached_gpu_memory():
    """Hands a test's cached GPU memory back when it is large, so parallel workers do not starve each other."""
    yield
    if HAS_CUDA and torch.cuda.memory_reserved() > 4 * 2**30:
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _cuda_kernels_on_cpu(request, monkeypatch):
    """Without a GPU, a test marked cuda_on_cpu forces nothing but lets the cuda backend take CPU tensors."""
    if not HAS_CUDA and request.node.get_closest_marker("cuda_on_cpu") is not None:
        from pixelcnn_kernels import cuda_on_cpu

        monkeypatch.setenv(cuda_on_cpu.ENV_VAR, "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Where kernel-backend tests put their tensors: the GPU, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
