"""Smoke tests of the python/ example programs: each runs with tiny arguments in a subprocess."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixelcnn_kernels.cli import build_parser
from pixelcnn_kernels.data import load_digits
from pixelcnn_kernels.train import train

EXAMPLES = Path(__file__).resolve().parent.parent / "python"


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_convert_tutorial_pixelcnn(tmp_path):
    out = run_example("convert_tutorial_pixelcnn.py", "--device", "cpu", "--batch", "2", "--size", "8", "--hidden", "8", "--layers", "2",
                      "--repeats", "3", cwd=tmp_path)
    # 2 first-layer stacks + 2 convs per gated layer + the mask-B conv; the 1×1 convs are plain.
    assert "convert: 7 replaced, 0 skipped" in out
    difference = float(out.split("max |logits difference| after conversion: ")[1].split()[0])
    assert difference < 1e-4
    assert "ms before" in out and "ms after" in out


def test_train_class_conditional(tmp_path):
    out = run_example("train_class_conditional.py", "--device", "cpu", "--epochs", "1", "--hidden", "8", "--layers", "1", "--per-class", "1",
                      "--train-images", "64", "--out", "grid.png", cwd=tmp_path)
    assert "held-out" in out and (tmp_path / "grid.png").is_file()


@pytest.mark.gpu
def test_train_class_conditional_with_cuda_graphs(tmp_path):
    out = run_example("train_class_conditional.py", "--device", "cuda", "--cuda-graph", "--epochs", "2", "--hidden", "8", "--layers", "1",
                      "--per-class", "1", "--train-images", "72", "--batch-size", "16", "--out", "grid.png", cwd=tmp_path)
    assert out.count("held-out") == 2 and (tmp_path / "grid.png").is_file()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny model trained one epoch on 40 digits (the example reloads that data set)."""
    tmp_path = tmp_path_factory.mktemp("tiny_run")
    digits = load_digits()
    data = tmp_path / "digits40.npz"
    np.savez(data, images=digits.train[:40, 0].numpy(), labels=digits.train_labels[:40].numpy(), num_bins=17)
    args = build_parser().parse_args(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--hidden", "8",
                                      "--layers", "1", "--kernel-size", "3", "--samples", "0", "--no-progress"])
    train(args)
    return tmp_path / "run" / "best.pt"


def test_complete_images(tmp_path, tiny_checkpoint):
    out = run_example("complete_images.py", "--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--images", "2", "--completions", "2",
                      "--out", "done.png", cwd=tmp_path)
    assert "kept top 4 rows" in out and (tmp_path / "done.png").is_file()


def run_failing_example(name: str, *args: str, cwd: Path) -> str:
    """The one-line error (last stderr line) of an example run with bad input: exit status 2, no traceback."""
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_complete_images_rejects_bad_rows(tmp_path, tiny_checkpoint):
    error = run_failing_example("complete_images.py", "--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--keep-rows", "9", cwd=tmp_path)
    assert "--keep-rows must be between 0 and the height 8" in error


@pytest.mark.parametrize("name", ["complete_images.py", "train_class_conditional.py"])
def test_examples_refuse_an_unusable_out_before_the_work(tmp_path, name):
    """--out's directory is created if missing (as `pixelcnn-kernels sample --out`); one that cannot be is an error before any work."""
    (tmp_path / "a_file").write_text("")
    error = run_failing_example(name, "--out", "a_file/grid.png", "--device", "cpu", cwd=tmp_path)
    assert error.startswith(f"{name}: ") and "a_file" in error and "(FileExistsError;" in error


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("complete_images.py", ("--images", "-1"), "argument --images: must be a positive int, got '-1'"),
        ("complete_images.py", ("--checkpoint", "missing.pt", "--device", "cpu"), "complete_images.py: checkpoint missing.pt does not exist"),
        ("train_class_conditional.py", ("--batch-size", "0"), "argument --batch-size: must be a positive int, got '0'"),
        ("train_class_conditional.py", ("--device", "tpu"), "argument --device: must be cpu or cuda, got 'tpu'"),
        ("convert_tutorial_pixelcnn.py", ("--size", "zero"), "argument --size: must be a positive int, got 'zero'"),
    ],
)
def test_examples_report_bad_input_in_one_line(tmp_path, name, args, message):
    assert message in run_failing_example(name, *args, cwd=tmp_path)
