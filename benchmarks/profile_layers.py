"""Where a fused layer's or model's GPU time goes: the CUDA kernels of its training step, by total time.

The bench times the layers' forward+backward and the models' training steps whole; on the
H200 on 2026-11-30 (second run) the layers' backward was the slow part (the Gated PixelCNN
layer's bf16 backward took 2.05 ms on the triton backend and 1.15 on cuda against 0.51 under
``torch.compile``, the PixelCNN++ gated resnet's fp32 backward 4.3-4.9 against 1.6), and the
Gated PixelCNN's training step took 26.9 ms against 16.2 (then at 126 channels, which compile
without 16-byte pipelined copies; it now runs the issue's 128: benchmarks/masked_conv_perf_notes.md). This runs the bench's own
cases (:mod:`pixelcnn_kernels.bench.models`: ``gated_pixelcnn_train``, ``gated_masked_conv2d``,
``gated_resnet``) in its ``full`` mode (forward, the gradients of the inputs and parameters,
and for the model the optimiser's step) on each kernel backend and dtype, a few steps after
warm-up under ``torch.profiler``, and prints each run's kernels by their total GPU time: which
kernel to look at first, and how much of the step the kernels leave idle (the GPU's total
against the steps' wall time).

    python benchmarks/profile_layers.py [-k NAME] [--dtype D ...] [--backends B ...] [--steps N] [--top N] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pixelcnn_kernels.backend import use_backend
from pixelcnn_kernels.bench import cases_for
from pixelcnn_kernels.bench.harness import Report, _prepare, _step
from pixelcnn_kernels.cli import ArgumentParser, positive_int, report_user_errors

# The model first: a run cut short (the GPU check's time) still has it.
PROFILED_CASES = ("gated_pixelcnn_train", "gated_masked_conv2d", "gated_resnet")
WARMUP_STEPS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kernel_times(case, backend: str, dtype: torch.dtype, device: torch.device, steps: int) -> tuple[list[tuple[str, int, float]], float]:
    """([(kernel, calls per step, GPU ms per step)] by time, wall ms per step) of ``steps`` full steps of ``case``."""
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = _prepare(case.make_inputs(device, dtype, generator), case.grad_inputs, "full", case.optimized_inputs)
    with use_backend(backend):
        step = _step(case.op, inputs, case.grad_inputs, "full", {}, case.optimized_inputs)
        for _ in range(WARMUP_STEPS):  # compiles the Triton kernels, fills the allocator's cache
            step()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            begin = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
            wall_ms = (time.perf_counter() - begin) * 1e3 / steps
    kernels = [(event.key, event.count // steps, event.self_device_time_total / 1e3 / steps) for event in profiler.key_averages() if event.self_device_time_total > 0]
    return sorted(kernels, key=lambda kernel: -kernel[2]), wall_ms


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-k", dest="name", help=f"only the cases whose name contains this ({', '.join(PROFILED_CASES)})")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float32"], help="dtypes (default bfloat16 float32)")
    parser.add_argument("--backends", nargs="+", choices=["triton", "cuda"], default=["triton", "cuda"], help="kernel backends (default triton cuda)")
    parser.add_argument("--steps", type=positive_int, default=5, help="profiled steps per run, after %d of warm-up (default 5)" % WARMUP_STEPS)
    parser.add_argument("--top", type=positive_int, default=12, help="kernels listed per run (default 12)")
    parser.add_argument("--out", type=Path, help="also write the report, with the date, GPU and versions, to this file")
    args = parser.parse_args(argv)
    by_name = {case.name: case for case in cases_for("models", on_gpu=True)}
    cases = [by_name[name] for name in PROFILED_CASES if args.name is None or args.name in name]
    if not cases:
        raise ValueError(f"-k {args.name!r} matches none of {', '.join(PROFILED_CASES)}")
    if not torch.cuda.is_available():
        print("profile_layers: needs a CUDA GPU (it profiles GPU kernels); nothing run", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    command = f"python benchmarks/profile_layers.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    report = Report(["| case | backend | dtype | kernel | calls | ms per step | share |", "|---|---|---|---|---:|---:|---:|"],
                    f"gpu: {torch.cuda.get_device_name(device)}", command, args.out, ("mode: full (forward, backward; the model's optimiser step), per step",))
    for case in cases:
        for dtype_name in args.dtype:
            for backend in args.backends:
                kernels, wall_ms = kernel_times(case, backend, DTYPES[dtype_name], device, args.steps)
                busy_ms = sum(ms for _, _, ms in kernels)
                label = f"| {case.name} {case.config} | {backend} | {dtype_name} |"
                report.add(f"{label} all kernels; wall time | {sum(calls for _, calls, _ in kernels)} | {busy_ms:.4f}; {wall_ms:.4f} | {busy_ms / wall_ms:.0%} busy |")
                for name, calls, ms in kernels[: args.top]:
                    report.add(f"{label} {name[:90]} | {calls} | {ms:.4f} | {ms / busy_ms:.0%} |")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors("profile_layers.py", main))
