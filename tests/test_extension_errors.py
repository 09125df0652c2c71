"""The CUDA extension's argument checks raise Python exceptions, numbers and all; they never take the process down.

An error raised in the extension's glue (a TORCH_CHECK) unwinds through the
extension's own frames into PyTorch's. On the project's H200 machine, with the
extension built by that image's compiler, such errors killed the process with a
segmentation fault (2026-11-30, benchmarks/results/2026-11-30-h200.md). The cause,
found by the second GPU check's backtrace (benchmarks/results/2026-11-30-h200-second-run.md):
that compiler linked its own copy of libstdc++ into the extension, which crashed
formatting the message's number (pixelcnn_kernels/extension_linkage.py; setup.py now
links the shared one, tests/test_extension_linkage.py). The probe below reaches each op
family's glue without a GPU: it redispatches an op to its CUDA kernel with CPU tensors,
which the glue refuses. It runs in a child process, so a crash fails the test instead of
the run.

``--after-cuda`` first runs a kernel of each family on the GPU with each kernel backend
(CUDA context, Triton's driver and the extension's kernels loaded, as in a test worker),
then probes with CPU tensors and with CUDA tensors that break the glue's contract past
its device checks, where the messages carry numbers. The GPU check runs both probes
directly (``python tests/test_extension_errors.py [--after-cuda]``) after building,
under a debugger when one dies, for the native backtrace.
"""

import subprocess
import sys

import pytest

from pixelcnn_kernels.backend import BackendUnavailableError, cuda_ops

# (op, the argument the glue names) of each family's probe with CPU tensors.
CPU_PROBES = (("masked_conv2d_fwd", "x"), ("gate_forward", "x"), ("dmol_nll_forward", "logits"))


def _expect_runtime_error(name: str, call) -> None:
    try:
        call()
    except RuntimeError as error:
        print(f"{name}: RuntimeError: {str(error).splitlines()[0]}", flush=True)
    else:
        raise AssertionError(f"{name} broke the glue's contract and was accepted")


def _run_kernels_on_gpu() -> None:
    """One forward and backward of each op family on the GPU with each kernel backend."""
    import torch

    import pixelcnn_kernels as pk

    x = torch.randn(2, 8, 5, 5, device="cuda", requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, device="cuda", requires_grad=True)
    for backend in ("triton", "cuda"):
        with pk.use_backend(backend):
            outputs = (
                pk.masked_conv2d(x, weight, mask="B"),
                pk.gate_tanh_sigmoid(x),
                pk.discretized_mix_logistic_nll(torch.rand(2, 3, 5, 5, device="cuda") * 2 - 1, torch.randn(2, 30, 5, 5, device="cuda")),
            )
            sum(output.sum() for output in outputs).backward()
    torch.cuda.synchronize()
    print("ran each family's kernels on the GPU with the triton and cuda backends", flush=True)


def probe(after_cuda: bool = False) -> None:
    """Calls each family's CUDA glue with tensors it refuses and prints the error it raised."""
    import torch

    ops = cuda_ops()
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    if after_cuda:
        _run_kernels_on_gpu()
    x = torch.randn(1, 4, 5, 8)
    calls = {
        "masked_conv2d_fwd": (x, torch.randn(3, 8, 6), None, None, [0, 0, 0, -1, -1, 0], False, True),
        "gate_forward": (torch.randn(2, 3, 4, 6), None, 1, True, 4),
        "dmol_nll_forward": (torch.rand(1, 3, 2, 2) * 2 - 1, torch.randn(1, 30, 2, 2), 256),
    }
    for name, args in calls.items():
        _expect_runtime_error(name, lambda: getattr(ops, name).default.redispatch(cuda_kernel, *args))
    if after_cuda:  # the first check of test_masked_conv_cuda.py's contract test, whose number crashed on 2026-11-30
        x, wp = x.cuda().half(), torch.randn(3, 8, 6, device="cuda").half()
        _expect_runtime_error("masked_conv2d_fwd on CUDA tensors", lambda: ops.masked_conv2d_fwd(x, wp, None, None, [0, 0, 0, -1, -1], False, True))


@pytest.mark.parametrize("after_cuda", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["cpu_tensors", "after_cuda"])
def test_glue_errors_are_python_exceptions(after_cuda):
    try:
        cuda_ops()
    except BackendUnavailableError as missing:
        pytest.skip(str(missing))
    child = subprocess.run([sys.executable, __file__, *(["--after-cuda"] if after_cuda else [])], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the probe died (exit {child.returncode}):\n{child.stdout}{child.stderr[-3000:]}"
    for name, tensor in CPU_PROBES:
        assert f"{name}: RuntimeError: {tensor} must be a CUDA tensor" in child.stdout
    if after_cuda:
        assert "masked_conv2d_fwd on CUDA tensors: RuntimeError: offsets must hold (dy, dx) pairs, got 5 entries" in child.stdout


if __name__ == "__main__":
    probe(after_cuda="--after-cuda" in sys.argv[1:])
