"""Host time of a training step's forward and backward: with the kernel launches stubbed out, or on a GPU.

A GPU step takes the longer of the GPU's work and the host's: Python, the dispatcher
and the launch of every kernel, which the GPU cannot start before the host issues
it. By default this measures the host's part without a GPU: the package's layers and
models on the ``triton`` backend with the interpreter's launch replaced by a no-op (no
kernel runs), on tiny CPU tensors (the aten ops around the kernels cost little more than
their dispatch). The real launch of each Triton kernel (~10 µs) and of each CUDA
kernel is not included: a lower bound of the host time of a step on this CPU. The
``reference`` rows run the reference ops the same way (PyTorch's own CPU kernels on
tiny tensors: about eager PyTorch's host time).

With ``--gpu`` the same tiny workloads run on the GPU with every kernel launched, on the
``triton`` and ``cuda`` backends and the reference ops (eager PyTorch on the GPU, cuDNN's
convolutions included): their GPU work is microseconds, so a step's time is the host's,
as the bench's ``host ms`` column measures it at full size (on the H200's host on
2026-11-30 the Gated PixelCNN layer's forward+backward took 4.8 ms of host time on
the triton backend, 3.5 on cuda, 3.7 eager, where this CPU-only count gives 0.7, 0.4
reference: the launches and the CUDA side of torch are most of it there). ``--profile N``
also lists each fused row's N functions of most host time (cProfile, its own time per
call; the profiled steps are separate from the timed ones).

The workloads are issue 5's layers and issue 6's models (the architectures; the
channel counts are tiny, as they do not change the host's work).

    python benchmarks/host_overhead.py [--steps N] [--gpu] [--profile N] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

# Read before anything is imported: the Triton interpreter must be chosen before any kernel is defined.
ON_GPU = "--gpu" in sys.argv[1:]
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton launchers

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import pixelcnn_kernels as pk  # noqa: E402
from pixelcnn_kernels.backend import unavailable_reason  # noqa: E402
from pixelcnn_kernels.bench.harness import Report  # noqa: E402
from pixelcnn_kernels.cli import ArgumentParser, positive_int, report_user_errors  # noqa: E402
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus  # noqa: E402
from pixelcnn_kernels.nn.layers import GatedMaskedConv2d, GatedResnet  # noqa: E402
from pixelcnn_kernels.reference.layers import REFERENCE_OPS, set_ops  # noqa: E402

CLASSES = 10


class StubbedLaunches:
    """Within the block, ``kernel[grid](...)`` of every Triton kernel counts the launch and returns."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self._original = InterpretedFunction.__getitem__
        InterpretedFunction.__getitem__ = lambda kernel, grid: self._launch
        return self

    def _launch(self, *args, **kwargs):
        self.count += 1

    def __exit__(self, *exc):
        InterpretedFunction.__getitem__ = self._original


def workloads(device: torch.device):
    """(name, module, forward) of issue 5's layers and issue 6's models, tiny, on ``device``: a step is
    ``forward()`` (the layer on its inputs, the model's loss) and the backward of its outputs."""
    torch.manual_seed(0)
    side = 4

    def act(channels, batch=1):
        return torch.randn(batch, channels, side, side, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    v, h, skip = act(6), act(6), act(8)
    x, cond = act(4), torch.randn(1, CLASSES, device=device)
    images = torch.randint(0, 256, (1, 3, side, side), device=device)
    gated_layer = GatedMaskedConv2d(6, 3, 2, cond_channels=CLASSES).to(device)
    resnet = GatedResnet(4, "down_right", 2, dropout=0.0).to(device)
    gated = GatedPixelCNN(3, hidden=6, layers=7, kernel_size=3, dilations=[1, 2, 1, 4, 1, 2, 1]).to(device)
    pixelcnn_pp = PixelCNNPlusPlus(nr_resnet=5, nr_filters=4, nr_logistic_mix=10, dropout=0.0).to(device)
    # The benchmark's training step: dropout 0.5 after each gated resnet's second concat_elu.
    pixelcnn_pp_dropout = PixelCNNPlusPlus(nr_resnet=5, nr_filters=4, nr_logistic_mix=10, dropout=0.5).to(device)
    return [
        ("GatedMaskedConv2d d2 cond", gated_layer, lambda: gated_layer(v, h, cond)),
        ("GatedResnet down_right skip2", resnet, lambda: resnet(x, skip)),
        ("GatedPixelCNN RGB L7 softmax", gated, lambda: gated.loss(images)),
        ("PixelCNN++ R5 K10", pixelcnn_pp, lambda: pixelcnn_pp.loss(images)),
        ("PixelCNN++ R5 K10 dropout 0.5", pixelcnn_pp_dropout, lambda: pixelcnn_pp_dropout.loss(images)),
    ]


def _step(forward) -> None:
    outputs = forward()
    loss = sum(o.float().sum() for o in outputs) if isinstance(outputs, tuple) else outputs.float().sum()
    loss.backward()


def host_ms(forward, steps: int, on_gpu: bool) -> tuple[float, int | None]:
    """(median ms of ``steps`` forward+backward calls, kernel launches per call: None on the GPU, not counted there).

    On the GPU each call is timed on the host clock and the GPU drained after it (its work on
    these sizes is microseconds): the time the host takes to issue a step."""
    with _launches(on_gpu) as launches:
        for _ in range(3):  # warm-up: compilation, the caches of masks, tables and layouts
            _step(forward)
        _drain(on_gpu)
        if not on_gpu:
            launches.count = 0
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            _step(forward)
            times.append((time.perf_counter() - begin) * 1e3)
            _drain(on_gpu)
    return statistics.median(times), None if on_gpu else launches.count // steps


def _launches(on_gpu: bool):
    """The GPU's own launches; on the CPU the interpreter's, stubbed out and counted."""
    return contextlib.nullcontext() if on_gpu else StubbedLaunches()


def _drain(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def host_profile(forward, steps: int, on_gpu: bool, top: int) -> str:
    """The ``top`` functions of most host time of their own over ``steps`` forward+backward calls (cProfile),
    per step: µs in the function itself, µs with what it calls, calls."""
    profiler = cProfile.Profile()
    with _launches(on_gpu):
        for _ in range(steps):
            profiler.enable()
            _step(forward)
            profiler.disable()
            _drain(on_gpu)
    entries = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:top]
    lines = [f"{'own µs':>9} {'total µs':>9} {'calls':>7}  function"]
    for (filename, line, function), (_, calls, own, total, _) in entries:
        where = function if filename == "~" else f"{_short_path(filename)}:{line}({function})"
        lines.append(f"{own / steps * 1e6:9.1f} {total / steps * 1e6:9.1f} {calls / steps:7.1f}  {where}")
    return "\n".join(lines)


def _short_path(filename: str) -> str:
    """``filename`` from its package on: .../site-packages/triton/runtime/jit.py -> triton/runtime/jit.py,
    .../lib/python3.12/inspect.py -> inspect.py, <checkout>/pixelcnn_kernels/ops/dmol.py -> pixelcnn_kernels/ops/dmol.py."""
    parts = Path(filename).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "site-packages" or parts[i].startswith("python3") or parts[i + 1] in ("pixelcnn_kernels", "benchmarks"):
            return "/".join(parts[i + 1 :])
    return filename


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=positive_int, default=30, help="timed forward+backward calls per row (default 30)")
    parser.add_argument("--gpu", action="store_true", help="run the workloads on the GPU with every kernel launched, on the triton and cuda "
                        "backends (default: on the CPU with the Triton launches stubbed out)")
    parser.add_argument("--profile", type=positive_int, metavar="N", help="also list each fused row's N functions of most host time (cProfile)")
    parser.add_argument("--out", type=Path, help="also write the table, with the date, CPU and versions, to this file")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("host_overhead.py: --gpu needs a CUDA GPU; nothing run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(1)
    machine = f"cpu: {_cpu_name()}, torch.set_num_threads(1)" + (f"; gpu: {torch.cuda.get_device_name(device)}" if args.gpu else "")
    command = "python benchmarks/host_overhead.py " + " ".join(a for a in (f"--steps {args.steps}", "--gpu" if args.gpu else "",
                                                                             f"--profile {args.profile}" if args.profile else "") if a)
    report = Report(["| workload | ops | host ms (fwd+bwd) | Triton launches |", "|---|---|---:|---:|"], machine, command, args.out)
    profiles = []
    for name, module, forward in workloads(device):
        for ops, backend in ((("triton", "triton"), ("cuda", "cuda")) if args.gpu else (("fused", "triton"),)) + (("reference", "triton"),):
            if unavailable_reason(backend, device) is not None:
                report.add(f"| {name} | {ops} | - ({unavailable_reason(backend, device)}) | - |")
                continue
            if ops == "reference":
                set_ops(module, REFERENCE_OPS)
            with pk.use_backend(backend):
                ms, launches = host_ms(forward, args.steps, args.gpu)
                if args.profile and ops != "reference":
                    listing = host_profile(forward, args.steps, args.gpu, args.profile)
                    profiles.append(f"\nHost time by function, {name}, {ops} ({args.steps} steps, cProfile):\n```\n{listing}\n```")
            report.add(f"| {name} | {ops} | {ms:.2f} | {'-' if launches is None or ops == 'reference' else launches} |")
            if args.profile and ops != "reference":
                print(profiles[-1], flush=True)  # as it is made: a run cut short keeps it in its log
    report.table.extend(profiles)  # after the table, in the file
    report.finish()
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(report_user_errors("host_overhead.py", main))
