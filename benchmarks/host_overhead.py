"""Host time of a training step's forward and backward, with the kernel launches stubbed out.

A GPU step takes the longer of the GPU's work and the host's: Python, the dispatcher
and the launch of every kernel, which the GPU cannot start before the host issues
it. This measures the host's part without a GPU: the package's layers and models on
the ``triton`` backend with the interpreter's launch replaced by a no-op (no kernel
runs), on tiny CPU tensors (the aten ops around the kernels cost little more than
their dispatch). The real launch of each Triton kernel (~10-20 µs) and of each CUDA
kernel is not included: a lower bound of the host time of a step on this CPU. The
``reference`` rows run the reference ops the same way (PyTorch's own CPU kernels on
tiny tensors: about eager PyTorch's host time).

The workloads are issue 5's layers and issue 6's models (the architectures; the
channel counts are tiny, as they do not change the host's work).

    python benchmarks/host_overhead.py [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: CPU tensors reach the Triton launchers

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import pixelcnn_kernels as pk  # noqa: E402
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


def workloads():
    """(name, module, forward) of issue 5's layers and issue 6's models, tiny: a step is ``forward()`` (the
    layer on its inputs, the model's loss) and the backward of its outputs."""
    torch.manual_seed(0)
    side = 4

    def act(channels, batch=1):
        return torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    v, h, skip = act(6), act(6), act(8)
    x, cond = act(4), torch.randn(1, CLASSES)
    images = torch.randint(0, 256, (1, 3, side, side))
    gated_layer = GatedMaskedConv2d(6, 3, 2, cond_channels=CLASSES)
    resnet = GatedResnet(4, "down_right", 2, dropout=0.0)
    gated = GatedPixelCNN(3, hidden=6, layers=7, kernel_size=3, dilations=[1, 2, 1, 4, 1, 2, 1])
    pixelcnn_pp = PixelCNNPlusPlus(nr_resnet=5, nr_filters=4, nr_logistic_mix=10, dropout=0.0)
    # The benchmark's training step: dropout 0.5 after each gated resnet's second concat_elu.
    pixelcnn_pp_dropout = PixelCNNPlusPlus(nr_resnet=5, nr_filters=4, nr_logistic_mix=10, dropout=0.5)
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


def host_ms(forward, steps: int) -> tuple[float, int]:
    """(median ms of ``steps`` forward+backward calls, kernel launches per call)."""
    with StubbedLaunches() as launches:
        for _ in range(3):  # warm-up: the caches of masks, tables and layouts
            _step(forward)
        launches.count = 0
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            _step(forward)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), launches.count // steps


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=positive_int, default=30, help="timed forward+backward calls per row (default 30)")
    parser.add_argument("--out", type=Path, help="also write the table, with the date, CPU and versions, to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = Report(["| workload | ops | host ms (fwd+bwd) | Triton launches |", "|---|---|---:|---:|"],
                    f"cpu: {_cpu_name()}, torch.set_num_threads(1)", f"python benchmarks/host_overhead.py --steps {args.steps}", args.out)
    for name, module, forward in workloads():
        for ops in ("fused", "reference"):
            if ops == "reference":
                set_ops(module, REFERENCE_OPS)
            with pk.use_backend("triton"):
                ms, launches = host_ms(forward, args.steps)
            report.add(f"| {name} | {ops} | {ms:.2f} | {launches if ops == 'fused' else '-'} |")
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
