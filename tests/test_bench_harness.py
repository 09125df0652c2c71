"""The benchmark harness on the CPU: every mode and provider is measured or says why not."""

import csv
import dataclasses
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelcnn_kernels.backend import forced_backend
from pixelcnn_kernels.bench import FAMILIES, cases_for
from pixelcnn_kernels.bench import harness
from pixelcnn_kernels.bench.harness import MODES, Case, format_table, run, write_results
from pixelcnn_kernels.cli import main
from pixelcnn_kernels.reference import dmol as reference_dmol


def _toy_case():
    # The harness only needs callables; torch.tanh stands for an op and its reference.
    return Case(
        family="toy",
        name="tanh",
        config="4x8",
        make_inputs=lambda device, dtype, generator: (torch.randn(4, 8, device=device, dtype=dtype, generator=generator),),
        op=torch.tanh,
        reference=torch.tanh,
        bytes_moved=lambda mode, dtype: 2 * 32 * dtype.itemsize,
    )


def test_harness_times_every_mode_and_provider(tmp_path):
    results, meta = run([_toy_case()], [torch.float32], torch.device("cpu"), warmup=1, repeats=3)
    by_key = {(r.mode, r.provider): r for r in results}
    for mode in MODES:
        for provider in ("eager", "compile", "triton", "cuda"):
            assert (mode, provider) in by_key
        assert by_key[(mode, "eager")].median_ms > 0
        assert by_key[(mode, "eager")].p20_ms <= by_key[(mode, "eager")].p80_ms
        assert by_key[(mode, "eager")].host_ms == by_key[(mode, "eager")].median_ms  # the CPU's wall time is the host's
    assert by_key[("full", "cuda")].error  # no GPU here: the reason is reported instead of a time
    table = format_table(results)
    assert "skipped:" in table and "tanh" in table and "host ms" in table
    written = write_results(results, tmp_path, meta)
    with (tmp_path / "results.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(results) and rows[0]["config"] == "4x8" and meta["torch_threads"] == torch.get_num_threads()
    assert {row["median_ms"] for row in rows if row["provider"] == "cuda"} == {""}  # not measured: empty, as JSON's null
    payload = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert payload["meta"]["torch"] == torch.__version__ and len(payload["results"]) == len(results)
    assert all(path.exists() for path in written)


def test_cuda_graph_rows_say_they_need_a_gpu_on_the_cpu(capsys):
    results, _ = run([_toy_case()], [torch.float32], torch.device("cpu"), warmup=1, repeats=1, cuda_graph=True)
    assert {r.provider for r in results} == {"eager+graph", "compile+graph", "triton+graph", "cuda+graph"}
    assert all(r.error and r.median_ms != r.median_ms for r in results)  # a reason, no time
    assert {r.error for r in results if r.provider == "eager+graph"} == {"CUDA graphs need a GPU"}
    assert main(["bench", "gates", "--cpu", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_graph_replays_are_timed_on_the_gpu():
    results, _ = run([_toy_case()], [torch.float32], torch.device("cuda"), warmup=1, repeats=3, only={"eager", "triton"}, cuda_graph=True)
    assert {r.provider for r in results} == {"eager+graph", "triton+graph"}
    for r in results:
        assert not r.error and r.median_ms > 0 and r.host_ms > 0, (r.provider, r.mode, r.error)


class _RecordsBackwardBackend(torch.autograd.Function):
    """tanh whose backward records the backend in force when it runs."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        _RecordsBackwardBackend.seen.append(forced_backend())
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


def test_a_kernel_provider_times_its_backward_on_its_backend_too():
    """The backward pass picks its backend when it runs: the whole measurement is under the provider's."""
    _RecordsBackwardBackend.seen.clear()
    case = dataclasses.replace(_toy_case(), op=_RecordsBackwardBackend.apply)
    results, _ = run([case], [torch.float32], torch.device("cpu"), warmup=1, repeats=2, only={"triton"})
    assert all(not r.error for r in results)
    assert _RecordsBackwardBackend.seen and set(_RecordsBackwardBackend.seen) == {"triton"}


def test_a_failing_provider_is_marked_failed_apart_from_one_that_cannot_run():
    def broken(x):
        raise RuntimeError("a kernel bug (a stand-in)")

    results, _ = run([dataclasses.replace(_toy_case(), op=broken)], [torch.float32], torch.device("cpu"), warmup=1, repeats=2, only={"triton", "cuda"})
    by_provider = {(r.mode, r.provider): r for r in results}
    assert by_provider[("forward", "triton")].failed and "a kernel bug" in by_provider[("forward", "triton")].error
    assert not by_provider[("forward", "cuda")].failed and by_provider[("forward", "cuda")].error  # no GPU here
    table = format_table(results)
    assert "FAILED: RuntimeError: a kernel bug" in table and "skipped:" in table


def test_an_extra_provider_may_force_a_backend():
    """name -> (fn, backend): timed with that backend forced, as the kernel providers are; one that cannot run here
    is a row with the reason. name -> fn runs with the automatic choice."""
    from pixelcnn_kernels.backend import forced_backend

    seen = {}

    def recording(name):
        def tanh(x):
            seen[name] = forced_backend()
            return torch.tanh(x)

        return tanh

    case = dataclasses.replace(_toy_case(), modes=("forward",), extra_providers={
        "automatic": recording("automatic"), "forced": (recording("forced"), "reference"), "unavailable": (torch.tanh, "cuda")})
    results, _ = run([case], [torch.float32], torch.device("cpu"), warmup=1, repeats=1, only={"automatic", "forced", "unavailable"})
    rows = {r.provider: r for r in results}
    assert seen == {"automatic": None, "forced": "reference"}
    assert not rows["forced"].error and rows["forced"].median_ms > 0
    assert rows["unavailable"].error and rows["unavailable"].median_ms != rows["unavailable"].median_ms


def test_slow_calls_get_fewer_warmups_and_repeats(monkeypatch):
    """Past the measurement's time budget: two warm-up calls (the second one timed, after any compilation) and MIN_REPEATS timed ones."""
    monkeypatch.setattr(harness, "MEASURE_SECONDS", 0.0)
    calls = []
    case = dataclasses.replace(_toy_case(), reference=lambda x: calls.append(1) or torch.tanh(x), modes=("forward",))
    results, _ = run([case], [torch.float32], torch.device("cpu"), warmup=5, repeats=10, only={"eager"})
    assert not results[0].error and len(calls) == 2 + harness.MIN_REPEATS


def test_the_gpu_spin_covers_a_call_and_its_predecessor_that_fit_it_and_stays_short_past_that():
    """Twice the warm-up time of the timed call and its untimed predecessor, at least _MIN_SPIN_MS, so the
    events time the GPU's work alone; a call too long for _MAX_SPIN_MS keeps the minimum, has no
    predecessor and is timed as back-to-back calls run, max(host, GPU)."""
    assert harness._timing_plan(1e-5) == (harness._MIN_SPIN_MS, True)
    assert harness._timing_plan(1e-3) == (4.0, True)
    assert harness._timing_plan(harness._MAX_SPIN_MS / 4e3) == (harness._MAX_SPIN_MS, True)
    assert harness._timing_plan(0.03) == (harness._MIN_SPIN_MS, False)


class _RecordingTimer:
    """Stands in for _Timer: records (timed step, its predecessor, spin) and returns 1 ms."""

    def __init__(self):
        self.calls = []

    def time_call(self, fn, spin_ms, predecessor=None):
        self.calls.append((fn, predecessor, spin_ms))
        return 1.0, 0.1


def test_each_timed_call_follows_the_previous_input_sets_step():
    """The predecessor leaves the L2 as a run of the step does, on other inputs than the timed call's."""
    steps = [lambda: None for _ in range(3)]
    timer = _RecordingTimer()
    harness.time_rotating(timer, steps, 7, call_seconds=1e-4)
    assert [(steps.index(fn), steps.index(before)) for fn, before, _ in timer.calls] == [(i % 3, (i - 1) % 3) for i in range(7)]


def test_no_predecessor_for_one_input_set_or_a_long_call():
    timer = _RecordingTimer()
    harness.time_rotating(timer, [lambda: None], 3, call_seconds=1e-4)
    harness.time_rotating(timer, [lambda: None, lambda: None], 3, call_seconds=0.03)
    assert [before for _, before, _ in timer.calls] == [None] * 6


def test_partial_results_are_handed_over_after_each_case():
    seen = []
    results, meta = run([_toy_case(), _toy_case()], [torch.float32], torch.device("cpu"), warmup=1, repeats=2,
                        only={"eager"}, after_case=lambda so_far, env: seen.append((len(so_far), env)))
    per_case = len(results) // 2
    assert [count for count, _ in seen] == [per_case, 2 * per_case]
    assert all(env is meta for _, env in seen)


def test_a_case_whose_inputs_fail_is_one_row_and_the_run_goes_on():
    def out_of_memory(device, dtype, generator):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    failing = dataclasses.replace(_toy_case(), name="too_big", make_inputs=out_of_memory)
    results, _ = run([failing, _toy_case()], [torch.float32], torch.device("cpu"), warmup=1, repeats=2, only={"eager"})
    assert [(r.name, r.provider, r.error) for r in results if r.name == "too_big"] == [("too_big", "inputs", "RuntimeError: CUDA out of memory (a stand-in)")]
    assert all(r.median_ms > 0 for r in results if r.name == "tanh")


def test_sampling_rows_say_how_many_network_passes_each_sampler_ran():
    """The Jacobi sampler's iterations are in its row (the issue asks for them beside its time); naive runs one pass per step, cached one to check its draft."""
    case = cases_for("sampling", on_gpu=False)[0]
    results, _ = run([case], [torch.float32], torch.device("cpu"), warmup=0, repeats=1, only={"eager", "cached", "jacobi"})
    notes = {r.provider: r.note for r in results}
    steps = int(case.config.split()[2])
    assert notes["eager"] == f"{steps} network passes" and notes["cached"] == "1 network pass, 0 values repaired"
    iterations = int(notes["jacobi"].removesuffix(" iterations"))
    assert 1 <= iterations <= steps
    assert notes["jacobi"] in format_table(results)


def test_a_full_call_of_a_training_case_updates_its_parameters_with_adamw():
    x, weight = torch.randn(4, 8), torch.randn(8, requires_grad=True)
    step = harness._step(lambda x, w: (x * w).tanh(), (x.requires_grad_(True), weight), (0, 1), "full", {}, optimized_inputs=(1,))
    before = weight.detach().clone()
    step()
    assert x.grad is not None and weight.grad is not None
    first = weight.detach().clone()
    step()  # the gradients are replaced, not accumulated
    assert not torch.equal(before, first) and not torch.equal(first, weight.detach())
    assert (first - before).abs().max() <= 1.05 * harness.BENCH_LR  # AdamW's first step moves each weight by about lr (float32 rounding aside)


def test_each_provider_updates_its_own_copy_of_the_parameters():
    x, weight = torch.randn(4, 8), torch.randn(8)
    full = harness._prepare((x, weight), (0, 1), "full", optimized_inputs=(1,))
    assert full[1].data_ptr() != weight.data_ptr() and torch.equal(full[1], weight) and full[1].requires_grad
    assert full[0].data_ptr() == x.data_ptr()  # not updated: shared
    assert harness._prepare((x, weight), (0, 1), "backward", optimized_inputs=(1,))[1].data_ptr() == weight.data_ptr()


def test_the_models_training_steps_run_on_the_cpu():
    """Eager for both models, the fused ops (the Triton interpreter) for the Gated PixelCNN's."""
    cases = {case.name: case for case in cases_for("models", on_gpu=False) if case.name.endswith("_train")}
    assert set(cases) == {"gated_pixelcnn_train", "pixelcnn_pp_train"} and all(case.optimized_inputs for case in cases.values())
    results, _ = run([cases["pixelcnn_pp_train"]], [torch.float32], torch.device("cpu"), warmup=1, repeats=1, only={"eager"})
    results += run([cases["gated_pixelcnn_train"]], [torch.float32], torch.device("cpu"), warmup=1, repeats=1, only={"eager", "triton"})[0]
    full = [r for r in results if r.mode == "full"]
    assert len(full) == 3 and all(not r.error and r.median_ms > 0 for r in full), [(r.name, r.provider, r.error) for r in full]


def test_every_family_defines_cpu_cases():
    for family in FAMILIES:
        cases = cases_for(family, on_gpu=False)
        assert cases, family
        for case in cases:
            assert case.family == family and case.name and case.config


def test_gpu_check_script_is_valid_bash():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_names_a_family_taken_for_a_provider(capsys):
    assert main(["bench", "gates", "--providers", "eager", "dmol"]) == 2
    assert "unknown providers ['dmol']" in capsys.readouterr().err


def test_bench_refuses_a_filter_matching_nothing_and_an_unusable_out_before_measuring(tmp_path, capsys):
    assert main(["bench", "gates", "-k", "no such case"]) == 2
    assert "bench: -k 'no such case' matches no case of gates" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["bench", "gates", "--out", str(tmp_path / "a_file")]) == 2  # a file where the results' directory would go
    assert "pixelcnn-kernels bench: " in capsys.readouterr().err and not list(tmp_path.glob("*.csv"))


def test_each_dtype_of_a_case_compiles_afresh(monkeypatch):
    """Each (case, dtype) compiles up to 3 Dynamo entries of the shared reference: without a reset per dtype,
    three dtypes passed Dynamo's recompile limit of 8 and the last "compile" rows ran eagerly."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(harness, "run_case", lambda *args, **kwargs: [])
    run([_toy_case()], [torch.float32, torch.float16, torch.float32], torch.device("cpu"), warmup=1, repeats=1)
    assert len(resets) == 2  # float32 and float16: a dtype given twice is run once


def test_a_csv_field_with_commas_round_trips_and_a_stale_plot_goes(tmp_path):
    row = dataclasses.replace(run([_toy_case()], [torch.float32], torch.device("cpu"), warmup=1, repeats=1, only={"eager"})[0][0], config="x=(2, 3)")
    (tmp_path / "ratio_to_compile.png").write_bytes(b"an earlier run's")
    write_results([row], tmp_path, {}, plot=True)  # no compile row: no plot, and not the earlier one
    with (tmp_path / "results.csv").open(newline="") as stream:
        assert next(csv.DictReader(stream))["config"] == "x=(2, 3)"
    assert not (tmp_path / "ratio_to_compile.png").exists()


def test_bench_that_measures_nothing_says_so(capsys):
    assert main(["bench", "gates", "-k", "gate_sigmoid", "--providers", "cuda", "--warmup", "1", "--repeats", "1"]) == 2
    assert "bench: nothing was measured: every provider asked for was unavailable here" in capsys.readouterr().err


def test_bench_cut_by_ctrl_c_prints_and_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    real_run_case = harness.run_case
    calls = []

    def interrupted_after_one_case(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(harness, "run_case", interrupted_after_one_case)
    assert main(["bench", "gates", "-k", "gate_sigmoid", "--providers", "eager", "--dtype", "float32", "--dtype", "float16",
                 "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert "gate_sigmoid" in captured.out and f"bench: interrupted after 3 measurements; they are in {tmp_path}" in captured.err
    assert len(json.loads((tmp_path / "results.json").read_text())["results"]) == 3


def test_host_overhead_script_times_every_workload_fused_and_reference(tmp_path):
    """benchmarks/host_overhead.py, one step per row: every workload's two rows, the fused ones with their launch
    counts, and with --profile each fused row's functions of most host time."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    out = tmp_path / "host.md"
    result = subprocess.run([sys.executable, str(script), "--steps", "1", "--profile", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[1].strip() for row in rows] == ["fused", "reference"] * 5
    for workload, ops, host_ms, launches in rows:
        assert float(host_ms) > 0, workload
        assert int(launches) > 0 if ops.strip() == "fused" else launches.strip() == "-"
    command = "command: python benchmarks/host_overhead.py --steps 1 --profile 3"
    assert command in out.read_text()
    profiles = out.read_text().split("Host time by function, ")[1:]
    assert [p.split(" (", 1)[0] for p in profiles] == [f"{row[0].strip()}, fused" for row in rows if row[1].strip() == "fused"]
    for profile in profiles:  # a header, then the 3 functions of most own time, most first
        header, *functions = profile.split("```")[1].strip().splitlines()
        assert header.split()[:4] == ["own", "µs", "total", "µs"] and len(functions) == 3
        own = [float(line.split()[0]) for line in functions]
        assert own == sorted(own, reverse=True) and own[0] > 0
    printed = result.stdout.splitlines()  # the header and the column row first, then the rows as measured
    columns = printed.index("| workload | ops | host ms (fwd+bwd) | Triton launches |")
    first_row = min(i for i, line in enumerate(printed) if line.startswith("| ") and "| fused |" in line)
    assert printed.index(command) < columns < first_row
    refused = subprocess.run([sys.executable, str(script), "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "is a directory; name the report's file" in refused.stderr and "| workload" not in refused.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_host_overhead_script_needs_a_gpu_for_gpu():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    refused = subprocess.run([sys.executable, str(script), "--gpu"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--gpu needs a CUDA GPU" in refused.stderr


def test_ncu_script_takes_kernel_backends_and_needs_a_gpu():
    """benchmarks/ncu_masked_conv.py: --backends takes kernel backends only; without a GPU it runs nothing and says why."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_masked_conv.py"
    result = subprocess.run([sys.executable, str(script), "--backends", "reference"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "invalid choice: 'reference'" in result.stderr
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return path, module


def test_tile_choices_script_switches_the_tiles_and_needs_a_gpu():
    """benchmarks/tile_choices.py: each tile choice makes the launchers pick its tiles (or operand layout) and restores
    theirs after; without a GPU it runs nothing and says why."""
    from pixelcnn_kernels.triton import dmol
    from pixelcnn_kernels.triton import masked_conv as kernels

    path, script = _load_script("tile_choices")

    def picks():
        return (
            kernels._conv_tiles(False, torch.bfloat16, "ieee", 256), kernels._conv_tiles(True, torch.bfloat16, "ieee", 128), kernels._tap_major_x("tf32", 128, 1),
            dmol._mixture_tiles(10, False), dmol._mixture_tiles(10, True),
        )  # fmt: skip

    current = picks()
    assert current[0][1] == kernels._BLOCK_N_WIDE and current[1][0] == kernels._BLOCK_M_TWO_HALVES
    assert current[2] is True and current[3] == current[4] == (8, 2, 64)
    expected = {
        "current": current,
        "64-col": ((128, kernels._BLOCK_N, kernels._NUM_WARPS),) + current[1:],
        "channels-last-x": current[:2] + (False,) + current[3:],
        "gated-128-rows": (current[0], (kernels._BLOCK_M, kernels._BLOCK_N, 2 * kernels._NUM_WARPS)) + current[2:],
        "padded": current[:3] + ((16, 0, 32), (16, 0, 32)),
        "two-tiles-128": current[:3] + ((8, 2, 128), (8, 2, 128)),
        "128-registers": current,  # the same tiles, compiled with ptxas held to 128 registers
    }
    for choice, picked in expected.items():
        with script.tiles(choice):
            assert picks() == picked, choice
    nll_kernel = dmol._dmol_nll_kernel
    with script.tiles("128-registers"):
        assert dmol._dmol_nll_kernel.kernel is nll_kernel and dmol._dmol_nll_kernel.options == {"maxnreg": 128}
        if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter takes the launch (and ignores the option)
            logits, bins = torch.randn(1, 10, 2, 3), torch.randint(0, 256, (1, 3, 2, 3))  # C = 3, K = 1
            nll = torch.empty(1, 2, 3)
            dmol.nll_forward(bins, logits, 256, nll)
            torch.testing.assert_close(nll.double(), reference_dmol.discretized_mix_logistic_nll(bins, logits.double()))
    assert dmol._dmol_nll_kernel is nll_kernel
    with pytest.raises(ValueError, match="unknown tile choice"), script.tiles("no such"):
        pass
    assert picks() == current
    assert {choice for kernel in script.kernels() for choice in kernel.choices} == set(expected)
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(path), "--repeats", "1"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_profile_layers_script_picks_the_bench_cases_and_needs_a_gpu():
    path, script = _load_script("profile_layers")
    assert set(script.PROFILED_CASES) <= {case.name for case in cases_for("models", on_gpu=True)}  # the bench still has them
    with pytest.raises(ValueError, match="-k 'no such' matches none of gated_pixelcnn_train, gated_masked_conv2d, gated_resnet"):
        script.main(["-k", "no such"])
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(path), "-k", "resnet", "--steps", "1"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_table_columns_stay_apart_when_an_entry_is_wider_than_its_column():
    """A config longer than its column once ran into the dtype ('h126 L7 softmaxfloat32')."""
    nan = float("nan")
    row = harness.Result("models", "gated_pixelcnn_train", "B64 3x32x32 h126 L7 softmax", "float32", "full", "triton", 33.3, 33.0, 34.0, nan, nan)
    table = format_table([row])
    assert "h126 L7 softmax float32  full     triton" in table
    assert table.splitlines()[0].index("dtype") == table.splitlines()[2].index("float32")
