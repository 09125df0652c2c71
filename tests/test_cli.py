"""The pixelcnn-kernels command: every subcommand has --help, info and bench run."""

import subprocess
import sys

import pytest

from pixelcnn_kernels.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_info_reports_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cuda"):
        assert f"  {name}" in out
    assert "torch" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pixelcnn_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().out


def test_a_bad_option_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", "x.pt", "--method", "bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pixelcnn-kernels sample: argument --method: invalid choice: 'bogus'")
    assert err.endswith("(see pixelcnn-kernels sample --help)\n")


def test_info_reports_a_bad_backend_variable_as_its_last_line(monkeypatch, capsys):
    monkeypatch.setenv("PIXELCNN_KERNELS_BACKEND", "bogus")
    assert main(["info"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert "backends:" in out and out[-1].startswith("forced backend   invalid: the environment variable PIXELCNN_KERNELS_BACKEND must be one of")


def test_output_into_a_closed_pipe_ends_quietly():
    """`pixelcnn-kernels info | head -1`: the reader leaves early; no error, status 0."""
    command = [sys.executable, "-c", "import sys; from pixelcnn_kernels.cli import main; sys.exit(main(['info']))"]
    info = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info.stdout.close()  # before it writes: every write meets a closed pipe
    assert info.wait(timeout=120) == 0
    assert info.stderr.read() == b""
