"""The masked convolution's forward and backward on each kernel backend, for Nsight Compute.

Static SASS cannot tell an issue-bound loop from a latency-bound one (see
``masked_conv_perf_notes.md``: the first GPU run's CUDA forward sat 8× below both static
bounds); ``ncu`` can. This runs the bench's ``mconv_vertical3x3`` shape (x 64×128×32×32 →
256 channels, the 3×3 vertical mask's 6 taps; channels-last, as the models run) once per
backend (``cuda``, ``triton``) and dtype (bf16; fp32, in TF32 as PyTorch allows for
convolutions by default): a warm-up call first (Triton compiles), then one forward and
backward between ``torch.cuda.profiler.start()`` and ``stop()``, so that

    ncu --profile-from-start off --section SpeedOfLight --section SchedulerStats \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python benchmarks/ncu_masked_conv.py

profiles those calls' kernels only, in the order this script prints. ``gpu_check.sh``'s
``ncu`` step runs that and puts the figures that decide (SM and memory throughput,
issued warps per scheduler, cycles per issued instruction, occupancy, registers) in its
summary.

    python benchmarks/ncu_masked_conv.py [--backends cuda triton]
"""

from __future__ import annotations

import argparse
import sys

import torch

import pixelcnn_kernels as pk
from pixelcnn_kernels.backend import BACKENDS, unavailable_reason

BATCH, C_IN, C_OUT, SIDE = 64, 128, 256, 32
DTYPES = (torch.bfloat16, torch.float32)


def forward_backward(dtype: torch.dtype, seed: int) -> None:
    """One masked conv forward and backward (input, weight and bias gradients) on fresh inputs."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=generator) * scale).to(dtype)

    x = randn(BATCH, C_IN, SIDE, SIDE).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = randn(C_OUT, C_IN, 3, 3, scale=(6 * C_IN) ** -0.5).requires_grad_()
    bias = randn(C_OUT).requires_grad_()
    out = pk.masked_conv2d(x, weight, bias, "vertical")
    out.backward(torch.randn_like(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--backends", nargs="+", choices=[b for b in BACKENDS if b != "reference"], default=["cuda", "triton"], help="kernel backends to profile (default: cuda triton)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_masked_conv.py needs a CUDA GPU (it runs the kernels for Nsight Compute to profile)", file=sys.stderr)
        return 2
    for backend in args.backends:
        reason = unavailable_reason(backend, torch.device("cuda"))
        if reason is not None:
            print(f"{backend}: skipped ({reason})", flush=True)
            continue
        with pk.use_backend(backend):
            for dtype in DTYPES:
                forward_backward(dtype, seed=0)  # warm-up: compilation, caches
                torch.cuda.synchronize()
                print(f"profiled: {backend} {str(dtype).removeprefix('torch.')} forward, then backward", flush=True)
                torch.cuda.profiler.start()
                forward_backward(dtype, seed=1)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
