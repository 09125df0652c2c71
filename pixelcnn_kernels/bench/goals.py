"""The issues' performance goals, judged on a benchmark run's results.

Each goal reads rows of ``pixelcnn-kernels bench`` at the issues' GPU sizes (a
case, its config, dtype and mode) and compares the faster of the ``triton`` and
``cuda`` rows with a target: a time, a ratio to a baseline provider of the same
run (``eager``, ``compile``, ``cudnn_shift``), a fraction of the floor (bytes over
the measured copy bandwidth), the extra peak memory, or the same kernel in another
dtype. A goal whose rows the run lacks (another family, a CPU run, a run cut short)
reads "not measured"; nothing is judged from a row that failed.

The targets are issues 3-7's, set for the project's H200. ``pixelcnn-kernels bench``
prints the table after a GPU run (and writes ``goals.md`` beside its results); to
judge saved runs, e.g. the two calls of a GPU check together::

    python -m pixelcnn_kernels.bench.goals RUN/results.json [RUN2/results.json ...]

Rows timed as CUDA-graph replays (``bench --cuda-graph``: providers ``<name>+graph``)
are judged as their provider, and the table says they were replays.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from pixelcnn_kernels.bench.harness import KERNEL_PROVIDERS, Result

GRAPH_SUFFIX = "+graph"
# The DMOL case's logits: B = 64, 10 K = 100 channels, 32 × 32, float32 (issue 3's memory goal).
_DMOL_LOGITS_MIB = 64 * 100 * 32 * 32 * 4 / 2**20


@dataclasses.dataclass(frozen=True)
class Goal:
    """One target on the bench rows ``(name, config, dtype, mode)``.

    ``kind``: ``"ms"`` the faster kernel takes at most ``target`` ms; ``"speedup"`` the
    ``baseline`` provider's time over the kernel's is at least ``target``; ``"floor"`` the
    floor over the kernel's time is at least ``target``; ``"peak"`` the kernel's extra
    peak memory is at most ``target`` MiB; ``"dtype"`` the kernel takes at most
    ``target`` times the faster kernel's time in ``baseline``, another dtype.
    """

    issue: int
    what: str
    name: str
    config: str
    dtype: str
    mode: str
    kind: str
    target: float
    baseline: str = ""


def _goals() -> tuple[Goal, ...]:
    gates = "x=(64, 256, 32, 32) dim=1"
    dmol = "B=64 3x32x32 K=10"
    conv = "64x128x32x32->256 6/9"
    gated_train = "B64 3x32x32 h128 L7 softmax"
    pp_train = "B64 3x32x32 F160 R5 K10"
    goals = [
        Goal(3, "DMOL NLL forward+backward", "dmol_nll", dmol, "float32", "full", "ms", 0.06),
        Goal(3, "DMOL NLL forward+backward", "dmol_nll", dmol, "float32", "full", "speedup", 13.0, "compile"),
        Goal(3, "DMOL NLL forward+backward", "dmol_nll", dmol, "float32", "full", "speedup", 50.0, "eager"),
        Goal(3, "DMOL NLL forward+backward, extra peak ≤ 1.25× the logits", "dmol_nll", dmol, "float32", "full", "peak", 1.25 * _DMOL_LOGITS_MIB),
        Goal(3, "DMOL NLL forward+backward, bf16 logits no slower", "dmol_nll", dmol, "bfloat16", "full", "dtype", 1.0, "float32"),
        Goal(4, "tanh·σ forward+backward", "gate_tanh_sigmoid", gates, "float32", "full", "ms", 0.08),
    ]
    goals += [
        Goal(4, f"{name} forward+backward at ≥ 80% of copy bandwidth", name, gates, dtype, "full", "floor", 0.8)
        for name in ("gate_tanh_sigmoid", "gate_sigmoid", "concat_elu")
        for dtype in ("float32", "bfloat16")
    ]
    for dtype in ("float32", "bfloat16"):
        goals += [
            Goal(5, "masked conv (vertical 3×3) forward+backward vs cuDNN on masked weights", "mconv_vertical3x3", conv, dtype, "full", "speedup", 1.5, "eager"),
            Goal(5, "masked conv (vertical 3×3) forward+backward vs dense cuDNN on the taps' box", "mconv_vertical3x3", conv, dtype, "full", "speedup", 1.2, "cudnn_shift"),
            Goal(5, "fused Gated PixelCNN layer forward+backward", "gated_masked_conv2d", "64x128x32x32 d2 cond", dtype, "full", "speedup", 2.0, "compile"),
            Goal(5, "fused PixelCNN++ gated resnet forward+backward", "gated_resnet", "64x160x32x32 ul skip2", dtype, "full", "speedup", 2.0, "compile"),
            Goal(6, "Gated PixelCNN training step", "gated_pixelcnn_train", gated_train, dtype, "full", "speedup", 2.0, "compile"),
            Goal(6, "PixelCNN++ training step", "pixelcnn_pp_train", pp_train, dtype, "full", "speedup", 1.5, "compile"),
        ]
    goals += [
        Goal(6, "PixelCNN++ training step", "pixelcnn_pp_train", pp_train, "float32", "full", "ms", 77.0),
        Goal(6, "PixelCNN++ training step", "pixelcnn_pp_train", pp_train, "bfloat16", "full", "ms", 60.0),
        Goal(7, "Gated PixelCNN cached sampling, 64 images", "sample_gated_pixelcnn_b64", "B64 1x28x28 784 steps", "float32", "forward", "ms", 40.0),
        Goal(7, "PixelCNN++ cached sampling, 64 images", "sample_pixelcnn_pp_b64", "B64 3x32x32 1024 steps", "float32", "forward", "ms", 500.0),
    ]
    return tuple(sorted(goals, key=lambda goal: goal.issue))


GOALS = _goals()


@dataclasses.dataclass(frozen=True)
class Verdict:
    goal: Goal
    measured: str  # the figure judged, with the provider it came from; or why there is none
    met: bool | None  # None: not measured


def _index(results: list[Result]) -> dict[tuple[str, str, str, str, str], Result]:
    """Measured rows by (name, config, dtype, mode, provider without +graph); a later run's row replaces an earlier one's."""
    return {
        (r.name, r.config, r.dtype, r.mode, r.provider.removesuffix(GRAPH_SUFFIX)): r
        for r in results
        if not r.error and not math.isnan(r.median_ms)
    }


def _fastest_kernel(index: dict, name: str, config: str, dtype: str, mode: str) -> Result | None:
    rows = [index[key] for key in ((name, config, dtype, mode, p) for p in KERNEL_PROVIDERS) if key in index]
    return min(rows, key=lambda r: r.median_ms, default=None)


def _source(row: Result) -> str:
    """The row's provider, and whether it was timed as a CUDA-graph replay."""
    provider = row.provider.removesuffix(GRAPH_SUFFIX)
    return f"{provider} graph replay" if row.provider.endswith(GRAPH_SUFFIX) else provider


def _timed(row: Result) -> str:
    """The row's provider and median; and its host time where that is longer: the GPU's work of the
    call, timed behind a spin, which a run of such calls without CUDA graphs would not reach."""
    host = f" (host {row.host_ms:.4g} ms)" if row.host_ms > row.median_ms else ""
    return f"{_source(row)} {row.median_ms:.4g} ms{host}"


def judge(goal: Goal, index: dict) -> Verdict:
    """The verdict on ``goal`` from ``index`` (:func:`_index` of a run's results)."""
    kernel = _fastest_kernel(index, goal.name, goal.config, goal.dtype, goal.mode)
    if kernel is None:
        return Verdict(goal, "not measured", None)
    if goal.kind == "ms":
        return Verdict(goal, _timed(kernel), kernel.median_ms <= goal.target)
    if goal.kind == "floor":
        if math.isnan(kernel.floor_ms):
            return Verdict(goal, "no floor (a CPU run)", None)
        fraction = kernel.floor_ms / kernel.median_ms
        return Verdict(goal, f"{fraction:.3g} of floor ({_timed(kernel)}, floor {kernel.floor_ms:.4g} ms)", fraction >= goal.target)
    if goal.kind == "peak":
        if math.isnan(kernel.peak_mib):
            return Verdict(goal, "peak memory not measured", None)
        return Verdict(goal, f"{kernel.peak_mib:.4g} MiB ({_source(kernel)})", kernel.peak_mib <= goal.target)
    if goal.kind == "speedup":
        base = index.get((goal.name, goal.config, goal.dtype, goal.mode, goal.baseline))
        if base is None:
            return Verdict(goal, f"{goal.baseline} not measured", None)
        speedup = base.median_ms / kernel.median_ms
        return Verdict(goal, f"{speedup:.3g}× ({_timed(kernel)}; {_timed(base)})", speedup >= goal.target)
    if goal.kind == "dtype":
        other = _fastest_kernel(index, goal.name, goal.config, goal.baseline, goal.mode)
        if other is None:
            return Verdict(goal, f"{goal.baseline} not measured", None)
        ratio = kernel.median_ms / other.median_ms
        return Verdict(goal, f"{ratio:.3g}× ({_timed(kernel)}; {goal.baseline}: {_timed(other)})", ratio <= goal.target)
    raise ValueError(f"unknown goal kind {goal.kind!r}")


def _target_text(goal: Goal) -> str:
    return {
        "ms": f"≤ {goal.target:g} ms",
        "speedup": f"≥ {goal.target:g}× {goal.baseline}",
        "floor": f"≥ {goal.target:g} of floor",
        "peak": f"≤ {goal.target:.4g} MiB",
        "dtype": f"≤ {goal.target:g}× {goal.baseline}",
    }[goal.kind]


def goals_table(results: list[Result]) -> str:
    """A markdown table of every goal's verdict on ``results``, with a count of those met."""
    index = _index(results)
    verdicts = [judge(goal, index) for goal in GOALS]
    lines = ["| issue | goal | dtype | target | measured (the faster kernel; the baseline) | verdict |", "| ---: | --- | --- | --- | --- | --- |"]
    for v in verdicts:
        verdict = {True: "met", False: "**not met**", None: "-"}[v.met]
        lines.append(f"| {v.goal.issue} | {v.goal.what} | {v.goal.dtype} | {_target_text(v.goal)} | {v.measured} | {verdict} |")
    judged = [v for v in verdicts if v.met is not None]
    lines.append("")
    lines.append(f"{sum(v.met for v in judged)} of {len(judged)} goals judged are met; {len(verdicts) - len(judged)} not measured in this run.")
    if any("(host " in v.measured for v in verdicts):
        lines.append("A time followed by a longer host time is the GPU's work alone; the host takes longer to issue the call, "
                     "so a run of such calls without CUDA graphs is bound by the host.")
    return "\n".join(lines)


def load_results(path: Path) -> tuple[list[Result], str]:
    """The rows of a ``results.json`` that ``pixelcnn-kernels bench --out`` wrote (null: not measured),
    and the device it names ("" when its meta does not say)."""
    saved = json.loads(Path(path).read_text())
    if not isinstance(saved, dict) or not isinstance(saved.get("results"), list):
        raise ValueError("not a results.json of pixelcnn-kernels bench --out (an object with a 'results' list)")
    rows = [Result(**{k: float("nan") if v is None else v for k, v in row.items()}) for row in saved["results"]]
    return rows, str((saved.get("meta") or {}).get("device", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pixelcnn_kernels.bench.goals",
        description="Judge the issues' performance goals on saved benchmark runs (results.json files of `pixelcnn-kernels bench --out`); "
        "rows of later files replace the same rows of earlier ones.",
    )
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    args = parser.parse_args(argv)
    results, on_cpu = [], []
    for path in args.results:
        try:
            rows, device = load_results(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"goals: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        results += rows
        if device.startswith("CPU"):
            on_cpu.append(str(path))
    if on_cpu:
        print(f"goals: {', '.join(on_cpu)} measured on a CPU, at the CPU sizes: the goals are set at the GPU sizes, so none is judged from it")
    print(goals_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
