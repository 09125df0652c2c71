"""The CUDA extension's argument checks raise Python exceptions; they never take the process down.

An error raised in the extension's glue (a TORCH_CHECK) unwinds through the
extension's own frames into PyTorch's. On the project's H200 machine, with the
extension built by that image's compiler, every such error killed the process with a
segmentation fault (2026-11-30, benchmarks/results/2026-11-30-h200.md), so a bad call
crashed instead of raising. The probe below reaches each op family's glue without a
GPU: it redispatches an op to its CUDA kernel with CPU tensors, which the glue
refuses. It runs in a child process, so a crash fails the test instead of the run.
The GPU check runs this file directly (``python tests/test_extension_errors.py``)
after building, under a debugger when it crashes, for the native backtrace.
"""

import subprocess
import sys

import pytest

from pixelcnn_kernels.backend import BackendUnavailableError, cuda_ops


def probe() -> None:
    """Calls each family's CUDA glue with CPU tensors and prints the error it raised."""
    import torch

    ops = cuda_ops()
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x = torch.randn(1, 4, 5, 8)
    calls = {
        "masked_conv2d_fwd": (x, torch.randn(3, 8, 6), None, None, [0, 0, 0, -1, -1, 0], False, True),
        "gate_forward": (torch.randn(2, 3, 4, 6), None, 1, True),
        "dmol_nll_forward": (torch.rand(1, 3, 2, 2) * 2 - 1, torch.randn(1, 30, 2, 2), 256),
    }
    for name, args in calls.items():
        try:
            getattr(ops, name).default.redispatch(cuda_kernel, *args)
        except RuntimeError as error:
            print(f"{name}: RuntimeError: {str(error).splitlines()[0]}", flush=True)
        else:
            raise AssertionError(f"{name} accepted CPU tensors")


def test_glue_errors_are_python_exceptions():
    try:
        cuda_ops()
    except BackendUnavailableError as missing:
        pytest.skip(str(missing))
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the probe died (exit {child.returncode}):\n{child.stdout}{child.stderr[-3000:]}"
    for name, tensor in (("masked_conv2d_fwd", "x"), ("gate_forward", "x"), ("dmol_nll_forward", "logits")):
        assert f"{name}: RuntimeError: {tensor} must be a CUDA tensor" in child.stdout


if __name__ == "__main__":
    probe()
