"""The issues' performance goals (pixelcnn_kernels/bench/goals.py): judged on bench rows, never made up."""

import dataclasses

import pytest
import torch

from pixelcnn_kernels.bench import FAMILIES, cases_for
from pixelcnn_kernels.bench.goals import GOALS, Goal, _index, goals_table, judge, main
from pixelcnn_kernels.bench.harness import Result, write_results
from pixelcnn_kernels.cli import main as cli_main

NAN = float("nan")


def _row(name="dmol_nll", config="B=64 3x32x32 K=10", dtype="float32", mode="full", provider="triton", ms=1.0, floor=NAN, peak=NAN, error=""):
    return Result("f", name, config, dtype, mode, provider, ms, ms, ms, peak, floor, error=error)


def test_every_goal_reads_rows_the_gpu_bench_makes():
    """A goal whose case, config, mode or baseline the GPU bench does not produce could never be judged."""
    cases = {(c.name, c.config): c for family in FAMILIES for c in cases_for(family, on_gpu=True)}
    for goal in GOALS:
        case = cases.get((goal.name, goal.config))
        assert case is not None, goal
        assert goal.mode in case.modes and goal.dtype in ("float32", "bfloat16"), goal  # the GPU bench's default dtypes
        if goal.kind == "speedup":
            assert goal.baseline in ("eager", "compile", *case.extra_providers), goal
    assert {goal.issue for goal in GOALS} == {3, 4, 5, 6, 7}


def test_the_fastest_kernel_is_judged_against_each_kind_of_target():
    rows = [
        _row(provider="triton", ms=0.05, floor=0.045, peak=20.0),
        _row(provider="cuda", ms=0.08),
        _row(provider="eager", ms=3.0),
        _row(provider="compile", ms=0.5),
        _row(dtype="bfloat16", provider="cuda", ms=0.055),
    ]
    index = _index(rows)
    goal = Goal(3, "t", "dmol_nll", "B=64 3x32x32 K=10", "float32", "full", "ms", 0.06)
    verdict = judge(goal, index)
    assert verdict.met is True and verdict.measured == "triton 0.05 ms"
    assert judge(dataclasses.replace(goal, target=0.04), index).met is False
    assert judge(dataclasses.replace(goal, kind="speedup", target=10.0, baseline="compile"), index).met is True  # 0.5 / 0.05
    assert judge(dataclasses.replace(goal, kind="speedup", target=100.0, baseline="eager"), index).met is False  # 60×
    assert judge(dataclasses.replace(goal, kind="floor", target=0.8), index).met is True  # 0.045 / 0.05
    assert judge(dataclasses.replace(goal, kind="peak", target=19.0), index).met is False
    slower_bf16 = judge(dataclasses.replace(goal, dtype="bfloat16", kind="dtype", target=1.0, baseline="float32"), index)
    assert slower_bf16.met is False and slower_bf16.measured == "1.1× (cuda 0.055 ms; float32: triton 0.05 ms)"


def test_a_time_the_host_takes_longer_to_issue_says_so():
    """The harness times a layer's GPU work behind a spin; where its host time is longer the verdict shows both."""
    host_bound = dataclasses.replace(_row(provider="triton", ms=0.6), host_ms=2.5)
    goal = Goal(5, "t", "dmol_nll", "B=64 3x32x32 K=10", "float32", "full", "speedup", 2.0, "compile")
    verdict = judge(goal, _index([host_bound, dataclasses.replace(_row(provider="compile", ms=1.5), host_ms=1.0)]))
    assert verdict.met is True and verdict.measured == "2.5× (triton 0.6 ms (host 2.5 ms); compile 1.5 ms)"
    assert "bound by the host" in goals_table([host_bound])
    assert "bound by the host" not in goals_table([_row(provider="triton", ms=0.6)])


def test_missing_and_failed_rows_are_not_measured_and_graph_replays_count_as_their_provider():
    goal = Goal(3, "t", "dmol_nll", "B=64 3x32x32 K=10", "float32", "full", "speedup", 2.0, "compile")
    assert judge(goal, _index([])).met is None
    failed = [_row(provider="triton", ms=NAN, error="RuntimeError: boom"), _row(provider="compile", ms=1.0)]
    assert judge(goal, _index(failed)).measured == "not measured"
    no_baseline = judge(goal, _index([_row(provider="cuda", ms=0.1)]))
    assert no_baseline.met is None and no_baseline.measured == "compile not measured"
    replays = judge(goal, _index([_row(provider="cuda+graph", ms=0.1), _row(provider="compile+graph", ms=0.3)]))
    assert replays.met is True and replays.measured == "3× (cuda graph replay 0.1 ms; compile graph replay 0.3 ms)"
    cpu_floor = judge(dataclasses.replace(goal, kind="floor", target=0.8), _index([_row(provider="cuda", ms=0.1)]))
    assert cpu_floor.met is None


def test_the_table_counts_the_goals_met():
    rows = [_row(provider="triton", ms=0.05), _row(provider="compile", ms=0.1), _row(provider="eager", ms=10.0)]
    table = goals_table(rows)
    judged = [line for line in table.splitlines() if line.endswith("| met |") or line.endswith("| **not met** |")]
    assert len(judged) == 3  # DMOL fp32 time (met), ×compile (not met), ×eager (met); its peak and bf16 rows lack data
    assert f"2 of 3 goals judged are met; {len(GOALS) - 3} not measured in this run." in table


def test_goals_command_judges_saved_runs_the_later_run_winning(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    meta = {"torch": torch.__version__}
    write_results([_row(provider="cuda", ms=0.5), _row(provider="compile", ms=0.6)], first, meta, plot=False)
    write_results([_row(provider="cuda", ms=0.05)], second, meta, plot=False)
    assert main([str(first / "results.json")]) == 0
    assert "| ≤ 0.06 ms | cuda 0.5 ms | **not met** |" in capsys.readouterr().out
    assert main([str(first / "results.json"), str(second / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "| ≤ 0.06 ms | cuda 0.05 ms | met |" in out and "| ≥ 13× compile | 12× (cuda 0.05 ms; compile 0.6 ms) | **not met** |" in out
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "goals: cannot read" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("{}")
    assert main([str(tmp_path / "empty.json")]) == 2
    assert "not a results.json of pixelcnn-kernels bench --out" in capsys.readouterr().err
    write_results([_row(provider="cuda", ms=0.05)], tmp_path / "cpu", {"device": "CPU (x86_64)"}, plot=False)
    assert main([str(tmp_path / "cpu" / "results.json")]) == 0
    assert "measured on a CPU, at the CPU sizes" in capsys.readouterr().out


def test_goals_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "results.json" in capsys.readouterr().out


def test_bench_judges_no_goals_on_the_cpu(tmp_path, capsys):
    """The goals are set at the GPU sizes: a CPU run writes its tables and no goals.md."""
    assert cli_main(["bench", "gates", "-k", "gate_sigmoid", "--providers", "eager", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.txt").exists() and not (tmp_path / "goals.md").exists()
    assert "The issues' goals" not in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_on_the_gpu_writes_the_goals_it_measured(tmp_path, capsys):
    args = ["bench", "gates", "-k", "gate_sigmoid", "--providers", "triton", "cuda", "--dtype", "float32", "--warmup", "2", "--repeats", "5", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    goals = (tmp_path / "goals.md").read_text()
    assert goals in capsys.readouterr().out
    floor_goal = next(line for line in goals.splitlines() if "gate_sigmoid forward+backward" in line and "| float32 |" in line)
    assert "of floor (" in floor_goal and floor_goal.endswith(("| met |", "| **not met** |"))
