"""The benchmark harness behind ``pixelcnn-kernels bench``.

Each op family contributes :class:`Case` objects (``pixelcnn_kernels/bench/<family>.py``).
For every case, dtype, mode (``forward``, ``backward``, ``full``) and provider it
measures the median, p20 and p80 time and the extra peak memory, and prints the
ratio to ``compile`` and the floor beside each time:

- providers: ``eager`` (the reference), ``compile`` (``torch.compile`` of the
  reference), ``triton`` and ``cuda`` (the package's op on that backend), plus
  any extra formulations a case names (e.g. a dense cuDNN conv);
- floor: ``max(bytes / copy bandwidth, FLOPs / matmul rate)``, with both
  ceilings measured on this machine at start;
- host: the median time the host takes to issue one call (Python, dispatch, kernel
  launches), beside the GPU's: a call whose GPU time is close to its host time is
  bound by the host, and a faster kernel would not show;
- ``cuda_graph=True``: every provider's call is captured once per input set in a CUDA
  graph and the replays are timed (providers ``<name>+graph``): the GPU's work without
  the host's, for every provider alike;
- GPU timing: CUDA events around each call, warm-up first, inputs rotated over
  enough sets that they do not sit in L2, random data (never zeros); a call of up
  to 10 ms follows an untimed call of the same step on the previous set, behind a
  spin that hides the host's issuing time (see _timing_plan).

Without a GPU it times small CPU sizes with the host clock and says that GPU
numbers need a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
from tqdm.auto import tqdm

from pixelcnn_kernels.backend import unavailable_reason, use_backend
from pixelcnn_kernels.utils import writable_directory

MODES = ("forward", "backward", "full")
KERNEL_PROVIDERS = ("triton", "cuda")
L2_BYTES = 60 * 2**20  # a little above the H200's 50 MiB L2
MEASURE_SECONDS = 20.0  # about the most one measurement takes where calls are slow ...
MIN_REPEATS = 3  # ... with at least this many timed calls


@dataclasses.dataclass
class Case:
    """One benchmark workload.

    ``make_inputs(device, dtype, generator)`` returns a fresh tuple of random
    inputs; ``grad_inputs`` are the indices of those that receive gradients.
    ``op`` runs the package's public op (the harness picks the backend),
    ``reference`` the pure-PyTorch reference. ``bytes_moved(mode, dtype)`` and
    ``flops(mode)`` give the least traffic and arithmetic the mode needs.
    ``extra_providers`` are other formulations timed alongside (name -> fn, run with the
    automatic backend choice, or name -> (fn, backend) to force one, as the kernel providers are).
    ``note(device, dtype)``, after a provider's runs, describes its last run in a few
    words for the table (e.g. how many iterations the Jacobi sampler took).
    ``optimized_inputs``: inputs (a model's parameters, among ``grad_inputs``) that a
    ``full`` call also updates with a fused AdamW step, as a training step does.
    """

    family: str
    name: str
    config: str
    make_inputs: Callable[[torch.device, torch.dtype, torch.Generator], tuple]
    op: Callable[..., object]
    reference: Callable[..., object]
    bytes_moved: Callable[[str, torch.dtype], int]
    flops: Callable[[str], int] = lambda mode: 0
    grad_inputs: tuple[int, ...] = (0,)
    modes: tuple[str, ...] = MODES
    extra_providers: dict[str, Callable[..., object] | tuple[Callable[..., object], str]] = dataclasses.field(default_factory=dict)
    note: Callable[[torch.device, torch.dtype], str] = lambda device, dtype: ""
    optimized_inputs: tuple[int, ...] = ()


@dataclasses.dataclass
class Ceilings:
    """Measured machine ceilings the floors are computed from."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float]

    def floor_s(self, bytes_moved: int, flops: int, dtype: torch.dtype) -> float:
        rate = self.matmul_flops_per_s.get(str(dtype).removeprefix("torch."), 0.0)
        compute_s = flops / rate if rate and flops else 0.0
        return max(bytes_moved / self.copy_bytes_per_s, compute_s)


@dataclasses.dataclass
class Result:
    family: str
    name: str
    config: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float
    floor_ms: float
    host_ms: float = float("nan")
    ratio_to_compile: float = float("nan")
    error: str = ""
    note: str = ""
    failed: bool = False  # the provider raised (``error`` says what); else an error is why it could not run here


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)]


# What the GPU's L2 holds when a timed call starts. The flush (a write of twice the L2) leaves
# the L2 full of dirty lines, and a call right after it would write them back to memory as
# it evicts them: up to 50 MB, ~12 µs on the H200, charged to a call whose floor counts only
# its own bytes (the bf16 gates move 50 MB in ~12 µs). So each timed call follows an untimed
# call of the same step on the previous input set, as in a run of that step: the timed call
# writes back what its predecessor left dirty (as much as it leaves itself), and its own
# inputs, last touched before the flush, come from memory.
#
# The GPU's spin before the two calls (torch.cuda._sleep counts clock cycles, ~2 GHz on an
# H200): _timing_plan asks for twice their time found in the warm-up, which bounds the host's
# time issuing them, so the host has queued both when the GPU reaches them. A call taking
# longer than _MAX_SPIN_MS / 4 (the models' training steps, whose L2 state at the start is a
# fraction of a percent of their time) has no predecessor, keeps _MIN_SPIN_MS and is timed as
# back-to-back steps run, max(host, GPU): the host ms column says which. The layers' calls
# (up to ~6 ms, host included) stay under it, so that every provider of a layer is timed
# alike: with a 5 ms cap on 2026-11-30 a provider whose host took longer (the triton layer's
# backward, 2.5 ms of host time) was timed back to back while `compile`'s GPU work was timed
# alone. (Before that every call had the minimum: rows whose host time passed it, such as the
# gates' backward, mixed host time into the GPU's; their p20 was far below their median.)
_MIN_SPIN_MS, _MAX_SPIN_MS = 0.5, 40.0
_SPIN_CYCLES_PER_MS = 2_000_000


def _timing_plan(call_seconds: float) -> tuple[float, bool]:
    """(the spin in ms, whether an untimed predecessor runs) for a call that took ``call_seconds`` (host and GPU) in its warm-up."""
    covering = 2e3 * 2 * call_seconds  # twice the predecessor's and the timed call's time
    if covering <= _MAX_SPIN_MS:
        return max(_MIN_SPIN_MS, covering), True
    return _MIN_SPIN_MS, False


class _Timer:
    """CUDA events on the GPU, the host clock on the CPU.

    On the GPU each call starts with L2 emptied (a write of twice its size) behind a spin
    of the GPU (``spin_ms``) during which the host queues the call, after an untimed
    ``predecessor`` if given (see _timing_plan): the events then time the GPU's work on
    inputs from memory, not the host's launch latency.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.l2_flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.int8, device=device)

    def time_ms(self, fn: Callable[[], object], predecessor: Callable[[], object] | None = None) -> float:
        return self.time_call(fn, predecessor=predecessor)[0]

    def time_call(self, fn: Callable[[], object], spin_ms: float = _MIN_SPIN_MS, predecessor: Callable[[], object] | None = None) -> tuple[float, float]:
        """(the call's time in ms, the host's time issuing it in ms): the same on the CPU, where no predecessor runs."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.l2_flush.zero_()
            torch.cuda._sleep(int(spin_ms * _SPIN_CYCLES_PER_MS))
            if predecessor is not None:
                predecessor()
            start.record()
            begin = time.perf_counter()
            fn()
            host_ms = (time.perf_counter() - begin) * 1e3
            end.record()
            end.synchronize()
            return start.elapsed_time(end), host_ms
        begin = time.perf_counter()
        fn()
        wall_ms = (time.perf_counter() - begin) * 1e3
        return wall_ms, wall_ms


def measure_ceilings(timer: _Timer, device: torch.device) -> Ceilings:
    """Copy bandwidth and matmul rates measured on ``device`` (GPU only)."""
    rates = {
        "bfloat16": _matmul_rate(timer, device, torch.bfloat16, tf32=False),
        "float16": _matmul_rate(timer, device, torch.float16, tf32=False),
        "float32": _matmul_rate(timer, device, torch.float32, tf32=True),  # what fp32 convolutions get by default
    }
    return Ceilings(copy_bytes_per_s=_copy_rate(timer, device), matmul_flops_per_s=rates)


def _copy_rate(timer: _Timer, device: torch.device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src, other_src = torch.rand(2, 2**28, device=device)
    dst, other_dst = torch.empty_like(src), torch.empty_like(src)
    copy_ms = _median([timer.time_ms(lambda: dst.copy_(src), predecessor=lambda: other_dst.copy_(other_src)) for _ in range(20)])
    return 2 * src.numel() * src.element_size() / (copy_ms * 1e-3)


def _matmul_rate(timer: _Timer, device: torch.device, dtype: torch.dtype, *, tf32: bool) -> float:
    """FLOP/s of an 8192³ matrix product on random data."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for _ in range(3):
            a @ b
        ms = _median([timer.time_ms(lambda: a @ b) for _ in range(10)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / (ms * 1e-3)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _input_sets(case: Case, device, dtype, seed: int) -> list[tuple]:
    """Enough independent random input sets that rotating them defeats the L2."""
    generator = torch.Generator(device=device).manual_seed(seed)
    first = case.make_inputs(device, dtype, generator)
    set_bytes = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    count = 1 if device.type != "cuda" else max(2, min(8, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))
    return [first] + [case.make_inputs(device, dtype, generator) for _ in range(count - 1)]


def _prepare(inputs: tuple, grad_inputs: tuple[int, ...], mode: str, optimized_inputs: tuple[int, ...] = ()) -> tuple:
    """``inputs`` as leaves for ``mode``; copies of those a full call's optimiser updates, so each provider starts from the same values."""
    if mode == "forward":
        return inputs
    updated = optimized_inputs if mode == "full" else ()
    return tuple((t.detach().clone() if i in updated else t.detach()).requires_grad_(True) if i in grad_inputs else t for i, t in enumerate(inputs))


# The AdamW learning rate of the ``full`` calls of cases with ``optimized_inputs``: small, so
# that a few hundred updates on random data leave the parameters at their scale.
BENCH_LR = 1e-5


def _training_step(fn: Callable, inputs: tuple, wrt: list, grads: list, optimized: list, capturable: bool) -> Callable[[], None]:
    """Forward, backward into the ``.grad`` of ``wrt``, and a fused AdamW step of ``optimized`` (``capturable`` in a CUDA graph)."""
    optimizer = torch.optim.AdamW(optimized, lr=BENCH_LR, fused=optimized[0].is_cuda or None, capturable=capturable)

    def step():
        for t in wrt:
            t.grad = None
        torch.autograd.backward(_outputs(fn(*inputs)), grads)
        optimizer.step()

    return step


def _step(
    fn: Callable, inputs: tuple, grad_inputs: tuple[int, ...], mode: str, cache: dict, optimized_inputs: tuple[int, ...] = (), capturable: bool = False
) -> Callable[[], object]:
    """A zero-argument callable doing one timed unit of work for ``mode`` (``capturable``: to be captured in a CUDA graph)."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    wrt = [inputs[i] for i in grad_inputs]
    key = id(inputs)
    if key not in cache:  # the output gradients, and for backward the forward graph: made once, outside the timing
        with torch.no_grad() if mode == "full" else contextlib.nullcontext():
            outs = _outputs(fn(*inputs))
        cache[key] = (outs if mode == "backward" else None, [torch.randn_like(o) for o in outs])
    outs, grads = cache[key]
    if mode == "full" and optimized_inputs:
        return _training_step(fn, inputs, wrt, grads, [inputs[i] for i in optimized_inputs], capturable)
    if mode == "full":
        return lambda: torch.autograd.grad(_outputs(fn(*inputs)), wrt, grads)
    return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)


def _providers(case: Case, device: torch.device, compiled: Callable) -> dict[str, tuple[Callable, str | None] | str]:
    """Provider name -> (function, the backend forced while it is timed, or None: the automatic choice),
    or -> reason string when it cannot run here. ``compiled``: ``torch.compile(case.reference)``."""
    providers: dict[str, tuple[Callable, str | None] | str] = {"eager": (case.reference, None), "compile": (compiled, None)}
    for backend in KERNEL_PROVIDERS:
        reason = unavailable_reason(backend, device)
        providers[backend] = reason if reason else (case.op, backend)
    for name, provider in case.extra_providers.items():
        fn, backend = provider if isinstance(provider, tuple) else (provider, None)
        reason = unavailable_reason(backend, device) if backend is not None else None
        providers[name] = reason if reason else (fn, backend)
    return providers


def run_case(
    case: Case,
    dtype: torch.dtype,
    device: torch.device,
    ceilings: Ceilings | None,
    timer: _Timer,
    *,
    warmup: int,
    repeats: int,
    seed: int,
    only: set[str] | None = None,
    cuda_graph: bool = False,
) -> list[Result]:
    """Times every provider on one case and dtype, in every mode of the case (as CUDA-graph replays with ``cuda_graph``)."""
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        input_sets = _input_sets(case, device, dtype, seed)
    except Exception as exc:  # e.g. out of memory: one row says so, the run goes on
        return [Result(case.family, case.name, case.config, dtype_name, "-", "inputs", *(5 * [float("nan")]), error=_error_text(exc))]
    results = []
    compiled = torch.compile(case.reference)  # one for every mode of the case
    for mode in case.modes:
        floor_ms = ceilings.floor_s(case.bytes_moved(mode, dtype), case.flops(mode), dtype) * 1e3 if ceilings else float("nan")
        for provider, choice in _providers(case, device, compiled).items():
            if only and provider not in only:
                continue
            label = f"{provider}+graph" if cuda_graph else provider
            row = Result(case.family, case.name, case.config, dtype_name, mode, label, *(4 * [float("nan")]), floor_ms)
            if isinstance(choice, str):
                row.error = choice
            elif cuda_graph and device.type != "cuda":
                row.error = "CUDA graphs need a GPU"
            else:
                fn, backend = choice
                try:
                    # The whole measurement under the provider's backend: a backward pass picks its backend when it runs.
                    with use_backend(backend):
                        _measure(row, fn, case, mode, input_sets, device, timer, warmup, repeats, cuda_graph)
                    row.note = case.note(device, dtype)
                except Exception as exc:  # a failing provider is reported in the table, the run goes on
                    traceback.print_exc()
                    row.error, row.failed = _error_text(exc), True
            results.append(row)
    compile_time = {(r.mode): r.median_ms for r in results if r.provider in ("compile", "compile+graph")}
    for r in results:
        r.ratio_to_compile = compile_time.get(r.mode, float("nan")) / r.median_ms if r.median_ms == r.median_ms else float("nan")
    return results


def _measure(
    row: Result, fn: Callable, case: Case, mode: str, input_sets, device: torch.device, timer: _Timer, warmup: int, repeats: int, cuda_graph: bool = False
) -> None:
    """Times ``fn`` in ``mode`` into ``row``: median, p20 and p80 of ``repeats`` calls after ``warmup``, rotating
    the input sets, and the peak memory of the timed calls. Slow calls get fewer of both (at least two warm-ups
    and MIN_REPEATS timed calls), so a measurement takes about MEASURE_SECONDS (a naive sampler's calls take a minute).
    With ``cuda_graph`` each set's call is captured in a CUDA graph and its replays are timed; the peak memory
    is then that of the captures (the replays allocate nothing)."""
    sets = [_prepare(inputs, case.grad_inputs, mode, case.optimized_inputs) for inputs in input_sets]
    graph_cache: dict = {}
    if cuda_graph:
        baseline = _memory_baseline()
        # One side stream for everything the captures touch: autograd runs a backward op on its forward
        # op's stream, so backward mode's forward graph is built on the stream that captures its backward.
        capture_stream = torch.cuda.Stream()
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture_stream):
            steps = [_captured(_step(fn, inputs, case.grad_inputs, mode, graph_cache, case.optimized_inputs, capturable=True), capture_stream) for inputs in sets]
        torch.cuda.current_stream().wait_stream(capture_stream)
        row.peak_mib = _peak_mib_since(baseline)
    else:
        steps = [_step(fn, inputs, case.grad_inputs, mode, graph_cache, case.optimized_inputs) for inputs in sets]
    call_s = 0.0
    for i in range(max(warmup, 2)):  # at least 2: the budget is the last call's time, after any compilation
        call_s = _host_seconds(steps[i % len(steps)], device)
        if i >= 1 and (i + 1) * call_s > MEASURE_SECONDS:
            break
    repeats = min(repeats, max(MIN_REPEATS, int(MEASURE_SECONDS / max(call_s, 1e-9))))
    measure_memory = device.type == "cuda" and not cuda_graph
    if measure_memory:  # after the warm-up: compilation and first-call workspaces are not the op's
        baseline = _memory_baseline()
    row.median_ms, row.p20_ms, row.p80_ms, row.host_ms = time_rotating(timer, steps, repeats, call_s)
    if measure_memory:
        row.peak_mib = _peak_mib_since(baseline)


def time_rotating(timer: _Timer, steps: list[Callable[[], object]], repeats: int, call_seconds: float) -> tuple[float, float, float, float]:
    """(median, p20, p80, the host's median) ms of ``repeats`` timed calls rotating over ``steps``, each
    as _timing_plan says for a call of ``call_seconds`` (a warm-up call's time, after any compilation);
    a predecessor is the step before in the rotation, none with one step (its inputs would be in L2)."""
    spin_ms, with_predecessor = _timing_plan(call_seconds)

    def predecessor(i: int) -> Callable[[], object] | None:
        return steps[(i - 1) % len(steps)] if with_predecessor and len(steps) > 1 else None

    times, host_times = zip(*(timer.time_call(steps[i % len(steps)], spin_ms, predecessor(i)) for i in range(repeats)))
    return _median(times), _percentile(times, 0.2), _percentile(times, 0.8), _median(host_times)


def _memory_baseline() -> int:
    """The GPU memory allocated now, the peak counter reset to it (after the queued work)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib_since(baseline: int) -> float:
    """MiB allocated at the peak since :func:`_memory_baseline` returned ``baseline``, beyond it."""
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


# Calls before a capture, on the capturing side stream: lazy initialisation, compilation, caches.
CAPTURE_WARMUP = 3


def _captured(step: Callable[[], object], stream: torch.cuda.Stream) -> Callable[[], object]:
    """``step`` captured in a CUDA graph on ``stream``, the current one (after warm-up calls on it); returns the graph's replay."""
    for _ in range(CAPTURE_WARMUP):
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    return graph.replay


def _host_seconds(fn: Callable[[], object], device: torch.device) -> float:
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


_TEXT_COLUMNS = (("op", "name", 26), ("config", "config", 26), ("dtype", "dtype", 9), ("mode", "mode", 9), ("provider", "provider", 14))


def format_table(results: list[Result]) -> str:
    """A fixed-width table: one row per (case, dtype, mode, provider).

    The text columns are at least their usual width and widen to their longest entry, so
    that a column is always followed by a space.
    """
    widths = [max([minimum] + [len(getattr(r, field)) + 1 for r in results]) for _, field, minimum in _TEXT_COLUMNS]

    def text(values) -> str:
        return "".join(f"{value:<{width}}" for value, width in zip(values, widths))

    header = text(title for title, _, _ in _TEXT_COLUMNS) + f"{'median ms':>11}{'p20':>9}{'p80':>9}{'host ms':>9}{'peak MiB':>10}{'floor ms':>10}{'x compile':>10}"
    lines = [header, "-" * len(header)]
    for r in results:
        row = text(getattr(r, field) for _, field, _ in _TEXT_COLUMNS)
        if r.error:
            lines.append(f"{row}  {'FAILED' if r.failed else 'skipped'}: {r.error}")
            continue
        lines.append(
            f"{row}{_cell(r.median_ms, 11, 4)}{_cell(r.p20_ms, 9, 4)}{_cell(r.p80_ms, 9, 4)}{_cell(r.host_ms, 9, 4)}"
            f"{_cell(r.peak_mib, 10, 1)}{_cell(r.floor_ms, 10, 4)}{_cell(r.ratio_to_compile, 10, 2)}{'  ' + r.note if r.note else ''}"
        )
    return "\n".join(lines)


def _cell(value: float, width: int, decimals: int) -> str:
    """A right-aligned number, or '-' where it was not measured (NaN: no GPU, no compile row)."""
    text = "-" if math.isnan(value) else f"{value:.{decimals}f}"
    return f"{text:>{width}}" if len(text) < width else f" {text}"  # a wide number still leaves a space


def write_results(results: list[Result], out_dir: Path, meta: dict, plot: bool = True) -> list[Path]:
    """Writes results.csv, results.json (with ``meta``), table.txt and, if ``plot``, the ratio plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in results]
    csv_path, json_path, table_path = out_dir / "results.csv", out_dir / "results.json", out_dir / "table.txt"
    fields = [f.name for f in dataclasses.fields(Result)]
    unmeasured_as_null = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]  # strict JSON has no NaN
    with csv_path.open("w", newline="") as stream:  # quoted where a field holds a comma; unmeasured: empty
        writer = csv.DictWriter(stream, fields)
        writer.writeheader()
        writer.writerows(unmeasured_as_null)
    json_path.write_text(json.dumps({"meta": meta, "results": unmeasured_as_null}, indent=1))
    table_path.write_text("\n".join(f"# {k}: {v}" for k, v in meta.items()) + "\n" + format_table(results) + "\n")
    written = [csv_path, json_path, table_path]
    plot_path = _plot(results, out_dir / "ratio_to_compile.png") if plot else None
    if plot and plot_path is None:  # no compile rows (or no matplotlib): an older run's plot would mislead
        (out_dir / "ratio_to_compile.png").unlink(missing_ok=True)
    return written + ([plot_path] if plot_path else [])


def _plot(results: list[Result], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in results if not r.error and r.ratio_to_compile == r.ratio_to_compile]
    if not timed:
        return None
    labels = [f"{r.name} {r.dtype} {r.mode} {r.provider}" for r in timed]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(timed))))
    ax.barh(range(len(timed)), [r.ratio_to_compile for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=6)
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("speed-up over torch.compile of the reference (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment(device: torch.device, ceilings: Ceilings | None) -> dict:
    """Date, device and versions recorded with every result file."""
    import platform

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),  # CPU timings depend on it, and on what else runs
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if ceilings:
        meta["copy_GBps"] = round(ceilings.copy_bytes_per_s / 1e9, 1)
        meta.update({f"matmul_TFLOPs_{k}": round(v / 1e12, 1) for k, v in ceilings.matmul_flops_per_s.items()})
    return meta


class Report:
    """A benchmark script's markdown report: made before the work, it checks ``out`` and prints the
    header (date, ``machine``, versions, ``notes``, ``command``) and the table's ``columns`` rows;
    ``add`` prints each row as it is measured; ``finish`` writes header and table to ``out``."""

    def __init__(self, columns: list[str], machine: str, command: str, out: Path | None, notes: tuple[str, ...] = ()):
        import platform

        import triton

        if out is not None:
            if out.is_dir():
                raise ValueError(f"--out {str(out)!r} is a directory; name the report's file")
            writable_directory(out.parent)  # an unusable --out fails now, not after the work
        self.out = out
        self.header = [
            f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
            machine,
            f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}",
            *notes,
            f"command: {command}",
        ]
        self.table = list(columns)
        print("\n".join(self.header + [""] + self.table), flush=True)

    def add(self, row: str) -> None:
        self.table.append(row)
        print(row, flush=True)

    def finish(self) -> None:
        if self.out is not None:
            self.out.write_text("\n".join(self.header) + "\n\n" + "\n".join(self.table) + "\n")


def run(
    cases: list[Case],
    dtypes: list[torch.dtype],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    seed: int = 0,
    only: set[str] | None = None,
    after_case: Callable[[list[Result], dict], None] | None = None,
    cuda_graph: bool = False,
) -> tuple[list[Result], dict]:
    """Runs ``cases`` with a progress bar; returns the results and the environment.

    ``after_case(results_so_far, environment)`` runs after each (case, dtype), so a
    caller can save partial results of a run that may be cut short.
    """
    timer = _Timer(device)  # one for the run: on a GPU it holds the L2-sized flush buffer
    ceilings = measure_ceilings(timer, device) if device.type == "cuda" else None
    meta = environment(device, ceilings)
    results: list[Result] = []
    work = [(case, dtype) for case in cases for dtype in dict.fromkeys(dtypes)]
    # Backward mode replays one compiled forward graph (retain_graph=True), which donated buffers forbid.
    with torch._functorch.config.patch(donated_buffer=False):
        for case, dtype in tqdm(work, desc="bench", unit="case"):
            # Cases and dtypes share reference functions (one code object), each (case, dtype) compiling
            # up to 3 entries (forward, grad mode, inputs that need grad): past Dynamo's recompile limit
            # (8 per code object) the "compile" rows would silently run eagerly. So a fresh start for each.
            torch._dynamo.reset()
            results += run_case(case, dtype, device, ceilings, timer, warmup=warmup, repeats=repeats, seed=seed, only=only, cuda_graph=cuda_graph)
            if after_case is not None:
                after_case(results, meta)
    return results, meta
