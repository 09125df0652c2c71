"""Data loading, checkpoints and the ``train`` command (short runs of tiny models on the CPU)."""

import contextlib
import json
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

import pixelcnn_kernels.train as train_module
from pixelcnn_kernels.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from pixelcnn_kernels.cli import build_parser, main
from pixelcnn_kernels.data import load_dataset, load_digits, load_images, load_photos, quantize, save_image_grid
from pixelcnn_kernels.train import Distributed, evaluate, train

TINY_MODEL = ["--hidden", "8", "--layers", "1", "--kernel-size", "3", "--batch-size", "16", "--no-progress", "--samples", "0"]


def train_args(tmp_path, *extra):
    """float32 unless ``extra`` asks for bfloat16: the default precision depends on the machine (native_bfloat16)."""
    precision = [] if "--bf16" in extra else ["--fp32"]
    return build_parser().parse_args(["train", "--out", str(tmp_path / "run"), *TINY_MODEL, *precision, *extra])


def digits_npz(directory, count: int) -> str:
    """The first ``count`` training digits and their labels as an .npz data set."""
    digits = load_digits()
    path = directory / f"digits{count}.npz"
    np.savez(path, images=digits.train[:count, 0].numpy(), labels=digits.train_labels[:count].numpy(), num_bins=17)
    return str(path)


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory):
    """160 digits (144 train / 16 held out): enough steps to see learning."""
    return digits_npz(tmp_path_factory.mktemp("data"), 160)


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """40 digits (36 train / 4 held out): three steps of 16 per epoch."""
    return digits_npz(tmp_path_factory.mktemp("data"), 40)


# ---- data ----


def test_digits_split_is_fixed_and_seeded():
    digits = load_digits()
    assert (len(digits.train), len(digits.held_out)) == (1500, 297)
    assert digits.image_shape == (1, 8, 8) and digits.num_bins == 17 and digits.num_classes == 10
    assert digits.train.dtype == torch.uint8 and int(digits.train.max()) == 16
    assert torch.equal(load_digits().train, digits.train)
    assert not torch.equal(load_digits(seed=1).train, digits.train)
    assert set(digits.train_labels.tolist()) == set(range(10))


def test_photos_load_offline_as_rgb_patches():
    photos = load_photos(num_bins=8)
    assert photos.image_shape == (3, 32, 32) and photos.num_bins == 8
    assert len(photos.train) > 1000 and len(photos.held_out) > 100
    assert int(photos.train.max()) == 7 and photos.train_labels is None


def test_quantize():
    images = torch.tensor([0, 1, 15, 16], dtype=torch.uint8)
    assert quantize(images, 17, 17) is images
    assert quantize(images, 17, 4).tolist() == [0, 0, 3, 3]
    with pytest.raises(ValueError, match="num_bins"):
        quantize(images, 17, 18)


def test_folder_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_images(tmp_path, num_bins=16)
    assert data.image_shape == (3, 6, 7) and data.num_bins == 16
    assert len(data.train) + len(data.held_out) == 5 and data.train_labels is None
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="one size"):
        load_images(tmp_path)


def test_folder_of_16_bit_and_mixed_images(tmp_path):
    """16-bit grey is rescaled to 8 bits (PIL's convert("L") clips it at 255); grey among colour becomes R = G = B;
    each file is closed before the next is opened (a folder larger than the open-file limit loads)."""
    from PIL import Image

    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5957)  # 0 .. 65527
    Image.fromarray(sixteen).save(tmp_path / "a.png")
    Image.fromarray(np.full((3, 4), 200, dtype=np.uint8)).save(tmp_path / "b.png")
    grey = torch.cat([load_images(tmp_path).train, load_images(tmp_path).held_out])
    expected = torch.from_numpy((sixteen.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert any(torch.equal(image[0], expected) for image in grey) and int(expected.max()) == 255
    Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    rgb = load_images(tmp_path)
    assert rgb.image_shape == (3, 3, 4)
    every = torch.cat([rgb.train, rgb.held_out])
    assert any(torch.equal(image, torch.full((3, 3, 4), 200, dtype=torch.uint8)) for image in every)
    opened = []
    real_open = Image.open

    def tracking_open(*args, **kwargs):
        image = real_open(*args, **kwargs)
        opened.append(image)
        assert sum(im.fp is not None for im in opened) <= 1, "a file was left open"
        return image

    import unittest.mock

    with unittest.mock.patch.object(Image, "open", tracking_open):
        load_images(tmp_path)
    assert len(opened) == 3


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path, layout):
    images = np.random.default_rng(0).integers(0, 5, (10, 1, 4, 6))
    stored = {"NHW": images[:, 0], "NHWC": images.transpose(0, 2, 3, 1), "NCHW": images}[layout]
    np.savez(tmp_path / "d.npz", images=stored, labels=np.arange(10) % 3, num_bins=5)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.image_shape == (1, 4, 6) and data.num_bins == 5 and data.num_classes == 3
    merged = torch.cat([data.train, data.held_out]).long()
    assert sorted(map(tuple, merged.flatten(1).tolist())) == sorted(map(tuple, torch.from_numpy(images).flatten(1).tolist()))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", pixels=np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a\.npz: an \.npz data set needs an 'images' array, found arrays \['pixels'\]$"):
        load_images(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="integer"):
        load_images(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=np.full((3, 4, 4), 9), num_bins=5)
    with pytest.raises(ValueError, match="0..4"):
        load_images(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 5, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_images(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="missing.npz does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))
    for bins in (0, 8.5):  # not the default, nor "8.5 bins"
        with pytest.raises(ValueError, match=rf"num_bins \(--num-bins\) must be between 2 and the data's 17 bins, got {bins}"):
            load_dataset("digits", num_bins=bins)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text\.npz: not a readable \.npz file"):
        load_dataset(str(tmp_path / "text.npz"))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npz: not a readable \.npz file"):
        load_dataset(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz: not a readable \.npz file"):
        load_dataset(str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "flat.npz", images=np.zeros((10, 0, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"flat\.npz: 'images' must have a height and width >= 1"):
        load_images(tmp_path / "flat.npz")
    np.savez(tmp_path / "bins.npz", images=np.zeros((3, 4, 4), dtype=np.uint8), num_bins=np.array([4, 4]))
    with pytest.raises(ValueError, match=r"bins\.npz: 'num_bins' must be one integer"):
        load_images(tmp_path / "bins.npz")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        load_dataset(str(tmp_path / "folder"))


def test_image_grid(tmp_path):
    from PIL import Image

    images = torch.randint(0, 17, (10, 1, 8, 8))
    path = save_image_grid(images, 17, tmp_path / "grid.png", columns=4, scale=2)
    with Image.open(path) as grid:
        assert grid.size == ((4 * 9 + 1) * 2, (3 * 9 + 1) * 2) and grid.mode == "L"


# ---- checkpoints ----


def small_checkpoint(path):
    return save_checkpoint(
        path, model_spec={"name": "gated_pixelcnn", "config": {"hidden": 4, "layers": 1, "num_bins": 4}},
        state_dict={"w": torch.arange(3.0)}, optimizer=None, epoch=2, metrics=[{"held_out_bpd": 1.5}],
    )


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    path = small_checkpoint(tmp_path / "c.pt")
    payload = load_checkpoint(path)
    assert payload["epoch"] == 2 and torch.equal(payload["state_dict"]["w"], torch.arange(3.0))
    assert payload["rng"]["torch"].dtype == torch.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_tampered_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"format": "pixelcnn_kernels.checkpoint", "state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt was refused.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    data = small_checkpoint(tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_a_file_that_is_no_checkpoint_gives_a_one_line_error(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "metrics.json").write_text('{"epochs": []}')
    for name, kind in (("empty.pt", "an empty file"), ("metrics.json", "another kind of file")):
        with pytest.raises(CheckpointError, match=rf"^checkpoint .*{name} is not a pixelcnn-kernels checkpoint: not the zip archive torch.save writes \({kind}\)$"):
            load_checkpoint(tmp_path / name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            load_checkpoint(small_checkpoint(tmp_path / "c.pt"), "cuda")


def test_flipped_bytes_in_a_checkpoint_fail_its_checksum(tmp_path):
    """torch.load does not check the zip CRCs: flipped bits in a tensor would load as wrong weights."""
    data = bytearray(small_checkpoint(tmp_path / "c.pt").read_bytes())
    stored = torch.arange(3.0).numpy().tobytes()
    at = data.index(stored)
    data[at + 5] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"flipped\.pt is corrupt: the stored data of .* fails its checksum"):
        load_checkpoint(tmp_path / "flipped.pt")


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="this torch always writes CRCs")
def test_a_checkpoint_written_without_crcs_loads(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = small_checkpoint(tmp_path / "c.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(path)["epoch"] == 2


@pytest.mark.parametrize("version", ["1", None, [1], True, 0, 99])
def test_a_checkpoint_without_a_readable_format_version_is_refused(tmp_path, version):
    payload = torch.load(small_checkpoint(tmp_path / "c.pt"), weights_only=True)
    payload["version"] = version
    torch.save(payload, tmp_path / "v.pt")
    expected = "has format version 99; this pixelcnn-kernels reads up to" if version == 99 else r"has no valid format version \(a positive int\)"
    with pytest.raises(CheckpointError, match=rf"v\.pt {expected}"):
        load_checkpoint(tmp_path / "v.pt")


def test_a_checkpoint_whose_weights_do_not_fit_its_model_says_so(tmp_path):
    path = small_checkpoint(tmp_path / "c.pt")  # its state_dict holds only "w"
    with pytest.raises(CheckpointError, match=r"c\.pt: its model entry and weights do not build a model: Error\(s\) in loading state_dict"):
        load_model(path)


def test_foreign_or_missing_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pixelcnn-kernels checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


# ---- training ----


def test_short_run_learns_and_writes_its_files(tmp_path, digits_subset):
    summary = train(train_args(tmp_path, "--data", digits_subset, "--epochs", "3", "--lr", "0.01", "--samples", "4"))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [loss for epoch in metrics["epochs"] for loss in epoch["step_losses"]]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    uniform_bpd = np.log2(17)
    assert metrics["summary"]["best_held_out_bpd"] == summary["best_held_out_bpd"] < uniform_bpd - 0.3
    assert (run / "samples.png").is_file() and (run / "best.pt").is_file()
    model = load_model(run / "best.pt")
    assert model.num_bins == 17 and model.config["hidden"] == 8


@pytest.mark.parametrize("dropout, ema_decay", [("0", "0"), ("0.3", "0.9")], ids=["plain", "dropout_ema"])
def test_resume_continues_exactly(tmp_path, tiny_digits, dropout, ema_decay):
    options = ["--dropout", dropout, "--ema-decay", ema_decay]
    straight = train(train_args(tmp_path / "a", "--data", tiny_digits, "--epochs", "2", *options))
    # --max-minutes 0 stops after the first epoch, as an interruption would.
    train(train_args(tmp_path / "b", "--data", tiny_digits, "--epochs", "2", "--max-minutes", "0", *options))
    assert load_checkpoint(tmp_path / "b" / "run" / "last.pt")["epoch"] == 1
    resumed = train(train_args(tmp_path / "b", "--data", tiny_digits, "--epochs", "2", "--resume"))
    assert resumed["best_held_out_bpd"] == straight["best_held_out_bpd"]
    a, b = (load_checkpoint(tmp_path / run / "run" / "last.pt") for run in ("a", "b"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    if float(ema_decay):  # the trained weights, beside the average
        trained = a["optimizer"]["trained_state_dict"]
        assert all(torch.equal(trained[k], b["optimizer"]["trained_state_dict"][k]) for k in trained)


@pytest.mark.parametrize("model", ["gated", "pixelcnnpp"])
def test_training_steps_do_not_wait_for_their_losses(tmp_path, digits_subset, monkeypatch, model):
    """No read of a device value per step (on a GPU each would make the host wait for the GPU):
    the step losses are read once per epoch, the progress bar's at most once a second."""
    reads = []
    item = torch.Tensor.item

    def counted_item(t):
        caller = traceback.extract_stack(limit=2)[0]
        if f"torch{os.sep}optim" not in caller.filename:  # the optimiser reads its step counters, kept on the host
            reads.append(f"{caller.filename}:{caller.lineno}")
        return item(t)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 3600.0)
    args = train_args(tmp_path, "--data", digits_subset, "--epochs", "2", "--batch-size", "8", "--model", model, "--layers", "1", "--hidden", "8")
    args.no_progress = False
    summary = train(args)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    steps = sum(len(epoch["step_losses"]) for epoch in metrics["epochs"])
    assert steps == 2 * 18 and all(isinstance(loss, float) for epoch in metrics["epochs"] for loss in epoch["step_losses"])
    assert len(reads) <= 2 * summary["epochs_done"], reads  # the train and held-out means of each epoch


def test_resume_refuses_options_that_contradict_the_checkpoint(tmp_path, tiny_digits, capsys):
    """The checkpoint fixes the data, model and optimisation: a different value given is an error, not silently dropped."""
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1", "--lr", "0.01"))
    for option, value in (("--lr", "30"), ("--weight-decay", "0"), ("--hidden", "6"), ("--batch-size", "8"), ("--seed", "3")):
        with pytest.raises(ValueError, match=f"^{option} .* differs from the resumed checkpoint's"):
            train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "2", "--resume", option, value))
    # Left at their defaults, they are the checkpoint's (lr 0.01, not the default 3e-3).
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "2", "--resume"))
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["lr"] == 0.01
    assert checkpoint["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.01
    # A value given equal to the parser's default is still given (the run used batch size 16, not 64), and
    # one equal to the checkpoint's default-filled value (hidden: TINY_MODEL's 8) is the checkpoint's.
    with pytest.raises(ValueError, match="^--batch-size 64 differs from the resumed checkpoint's 16"):
        train(train_args(tmp_path, "--data", tiny_digits, "--resume", "--batch-size", "64"))
    with pytest.raises(ValueError, match="^--data digits differs from the resumed checkpoint's"):
        train(train_args(tmp_path, "--resume", "--data", "digits"))
    # A bare --resume keeps the run's own --epochs (2, done): nothing more, not the model's default 24.
    summary = train(train_args(tmp_path, "--resume", "--hidden", "8"))
    assert summary["epochs_done"] == 2 and load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert "train: the run has done 2 of --epochs 2: nothing to train" in capsys.readouterr().out


def test_an_interrupted_run_says_how_to_continue(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", "--out", str(tmp_path / "run")]) == 130
    assert f"train: interrupted; {tmp_path / 'run'} holds the checkpoints of the finished epochs: continue with --resume" in capsys.readouterr().err


def test_a_new_run_into_an_out_holding_one_needs_overwrite(tmp_path, tiny_digits):
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1", "--samples", "1"))
    assert (tmp_path / "run" / "samples.png").exists()
    with pytest.raises(ValueError, match=r"already holds a run .* continue it with --resume, keep it and choose another --out, or replace it with --overwrite"):
        train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1"))
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1", "--overwrite"))  # TINY_MODEL: --samples 0
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "samples.png").exists()


def test_resume_into_a_new_out_starts_it_with_the_runs_best_checkpoint(tmp_path, tiny_digits):
    first = tmp_path / "first" / "run"
    train(train_args(tmp_path / "first", "--data", tiny_digits, "--epochs", "2"))
    args = train_args(tmp_path / "second", "--data", tiny_digits, "--epochs", "3", "--resume", str(first / "last.pt"))
    args.samples = 2  # sampled from the new directory's best.pt
    train(args)
    second = tmp_path / "second" / "run"
    assert (second / "best.pt").is_file() and (second / "samples.png").is_file()
    best = min(m["held_out_bpd"] for m in load_checkpoint(second / "last.pt")["metrics"])
    assert min(m["held_out_bpd"] for m in load_checkpoint(second / "best.pt")["metrics"]) == best
    # A directory holding another run's checkpoints is not overwritten by a resumed one.
    with pytest.raises(ValueError, match="holds another run's checkpoints"):
        train(train_args(tmp_path / "second", "--data", tiny_digits, "--epochs", "4", "--resume", str(first / "last.pt")))


def test_resume_keeps_this_runs_choice_of_fused_adamw(tmp_path, tiny_digits, monkeypatch):
    """A checkpoint's optimizer state carries its run's "fused" option (e.g. a GPU run's); the resumed run keeps its own."""
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1"))
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    for group in checkpoint["optimizer"]["optimizer"]["param_groups"]:
        group["fused"] = True
    fields = dict(model_spec=checkpoint["model"], state_dict=checkpoint["state_dict"], optimizer=checkpoint["optimizer"], epoch=checkpoint["epoch"],
                  metrics=checkpoint["metrics"], args=checkpoint["args"])
    save_checkpoint(tmp_path / "run" / "last.pt", **fields)
    built = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "2", "--resume"))
    assert [group["fused"] for group in built[0].param_groups] == [None]  # not fused on the CPU


def test_graphed_loss_needs_cuda_tensors_and_training_mode():
    from pixelcnn_kernels.models import GatedPixelCNN
    from pixelcnn_kernels.train import GraphedLoss

    model = GatedPixelCNN(1, hidden=4, layers=1)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        GraphedLoss(model, torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="model.train"):
        GraphedLoss(model.eval(), torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_ema_is_what_is_evaluated_and_saved(tmp_path, tiny_digits):
    """With --ema-decay the checkpoints' state_dict is the average, the held-out bits/dim its score."""
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1", "--ema-decay", "0.5", "--dropout", "0.2", "--dilations", "2"))
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    average, trained = checkpoint["state_dict"], checkpoint["optimizer"]["trained_state_dict"]
    assert not all(torch.equal(average[k], trained[k]) for k in average)
    model = load_model(tmp_path / "run" / "last.pt")
    assert model.config["dilations"] == [2] and model.config["dropout"] == 0.2
    held_out = load_dataset(tiny_digits, seed=0).held_out
    single = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    assert evaluate(model, held_out, None, single, 64, contextlib.nullcontext) == pytest.approx(checkpoint["metrics"][0]["held_out_bpd"], rel=1e-12)


def test_class_conditional_and_bf16(tmp_path, tiny_digits):
    summary = train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "1", "--class-conditional", "--bf16", "--samples", "3"))
    assert np.isfinite(summary["best_held_out_bpd"])
    assert load_model(tmp_path / "run" / "best.pt").num_classes == 10


def test_bad_options(tmp_path, tiny_digits):
    bad = (("--epochs", "0"), ("--batch-size", "-2"), ("--lr", "-1"), ("--dropout", "1.5"), ("--ema-decay", "1"), ("--dilations", "0"), ("--dilations", "1 2"),
           ("--kernel-size", "4"))
    for option, value in bad:
        with pytest.raises(ValueError, match=option):
            train(train_args(tmp_path, "--data", tiny_digits, option, *value.split()))
    with pytest.raises(ValueError, match="--class-conditional needs labels"):
        train(train_args(tmp_path, "--data", "photos", "--num-bins", "4", "--class-conditional"))
    with pytest.raises(ValueError, match="^--hidden=7 can't be split into 3 colour groups of a gated layer.*; use 6 or 8$"):
        train(train_args(tmp_path, "--data", "photos", "--num-bins", "4", "--hidden", "7"))
    with pytest.raises(FileNotFoundError, match="last.pt"):
        train(train_args(tmp_path, "--data", tiny_digits, "--resume"))
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        train(train_args(tmp_path, "--data", tiny_digits, "--cuda-graph", "--device", "cpu"))
    with pytest.raises(CheckpointError, match="holds no training state to resume from"):
        train(train_args(tmp_path, "--data", tiny_digits, "--resume", str(small_checkpoint(tmp_path / "weights_only.pt"))))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"^--out .*a_file/run is not a usable directory"):  # before any data is loaded or epoch run
        train(build_parser().parse_args(["train", "--out", str(tmp_path / "a_file" / "run"), "--data", tiny_digits]))


def test_a_diverging_run_stops_with_a_message(tmp_path, tiny_digits):
    with pytest.raises(ValueError, match="training diverged in epoch 1 .* try a lower --lr"):
        train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "2", "--lr", "1e9", "--ema-decay", "0", "--samples", "0"))


def test_command_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "run")]) == 2
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing.pt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in "".join(lines)
    assert lines[0].startswith("pixelcnn-kernels train: data must be") and "nothing.npz does not exist (ValueError;" in lines[0]
    assert lines[1].startswith("pixelcnn-kernels sample: checkpoint") and "nothing.pt does not exist" in lines[1]


def test_backends_train_to_the_same_curve(tmp_path, tiny_digits):
    reference = train(train_args(tmp_path / "r", "--data", tiny_digits, "--epochs", "1", "--backend", "reference"))
    fused = train(train_args(tmp_path / "t", "--data", tiny_digits, "--epochs", "1", "--backend", "triton"))
    curves = [json.loads((tmp_path / d / "run" / "metrics.json").read_text())["epochs"][0]["step_losses"] for d in ("r", "t")]
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-3)
    assert abs(reference["best_held_out_bpd"] - fused["best_held_out_bpd"]) < 1e-3


def test_ddp_with_two_processes_matches_one(tmp_path, tiny_digits):
    # Without dropout: each rank draws the dropout masks of its half batch from its own generator.
    common = ["--data", tiny_digits, "--epochs", "1", *TINY_MODEL, "--dropout", "0", "--fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pixelcnn_kernels", "train"]
    subprocess.run([*command, "--out", str(tmp_path / "ddp"), *common], check=True, env=env, capture_output=True, timeout=300)
    train(build_parser().parse_args(["train", "--out", str(tmp_path / "one"), *common]))
    ddp, one = (json.loads((tmp_path / d / "metrics.json").read_text())["epochs"][0] for d in ("ddp", "one"))
    np.testing.assert_allclose(ddp["step_losses"], one["step_losses"], rtol=1e-4)
    assert ddp["held_out_bpd"] == pytest.approx(one["held_out_bpd"], rel=1e-4)


@pytest.mark.parametrize("schedule, last_lr", [("constant", 0.01), ("cosine", 0.0)])
def test_lr_schedule(tmp_path, tiny_digits, schedule, last_lr):
    train(train_args(tmp_path, "--data", tiny_digits, "--epochs", "2", "--lr", "0.01", "--lr-schedule", schedule))
    epochs = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert epochs[0]["lr"] == pytest.approx(0.01 if schedule == "constant" else 0.005, abs=1e-3)  # half way, the cosine is at half
    assert epochs[-1]["lr"] == pytest.approx(last_lr, abs=1e-12)


@pytest.mark.parametrize("native", [True, False])
def test_precision_defaults_to_bfloat16_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: native)
    cpu = torch.device("cpu")
    assert train_module.autocast_dtype(None, cpu) == (torch.bfloat16 if native else None)
    assert train_module.autocast_dtype("bf16", cpu) == torch.bfloat16 and train_module.autocast_dtype("fp32", cpu) is None
    assert build_parser().parse_args(["train"]).precision is None
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["train", "--bf16", "--fp32"])


def test_train_help_lists_every_option():
    result = subprocess.run([sys.executable, "-m", "pixelcnn_kernels", "train", "--help"], capture_output=True, text=True, check=True)
    for option in ("--data", "--model", "--hidden", "--layers", "--epochs", "--batch-size", "--lr", "--seed", "--bf16", "--fp32", "--lr-schedule", "--backend", "--out", "--resume", "--class-conditional", "--max-minutes",
                   "--dropout", "--dilations", "--ema-decay", "--cuda-graph"):
        assert option in result.stdout


@pytest.mark.gpu
def test_gpu_backends_and_bf16_train_alike(tmp_path, tiny_digits):
    # Without dropout: CUDA draws a bfloat16 tensor's dropout mask differently from a float32 one's.
    common = ["--data", tiny_digits, "--epochs", "2", "--device", "cuda", "--dropout", "0"]
    runs = {}
    for name, extra in {"reference": ["--backend", "reference"], "cuda": ["--backend", "cuda"], "bf16": ["--backend", "cuda", "--bf16"]}.items():
        runs[name] = train(train_args(tmp_path / name, *common, *extra))
    curves = {name: json.loads((tmp_path / name / "run" / "metrics.json").read_text())["epochs"][0]["step_losses"] for name in runs}
    # Both fp32 runs may use TF32 matrix units; bf16 rounds every activation.
    np.testing.assert_allclose(curves["cuda"], curves["reference"], rtol=5e-3)
    np.testing.assert_allclose(curves["bf16"], curves["reference"], rtol=5e-2)
    assert abs(runs["bf16"]["best_held_out_bpd"] - runs["reference"]["best_held_out_bpd"]) < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["gated", "pixelcnnpp"])
def test_cuda_graph_training_follows_the_eager_curve(tmp_path, tiny_digits, model):
    """36 train digits in batches of 16: two replayed steps and a smaller last batch run eagerly, per epoch."""
    common = ["--data", tiny_digits, "--epochs", "2", "--device", "cuda", "--dropout", "0", "--model", model, "--class-conditional"]
    runs = {name: train(train_args(tmp_path / name, *common, *extra)) for name, extra in {"eager": [], "graph": ["--cuda-graph"]}.items()}
    curves = {name: [loss for epoch in json.loads((tmp_path / name / "run" / "metrics.json").read_text())["epochs"] for loss in epoch["step_losses"]]
              for name in runs}
    assert len(curves["graph"]) == 6 and len(set(curves["graph"])) == 6  # every step's own loss, not the graph's last
    np.testing.assert_allclose(curves["graph"], curves["eager"], rtol=1e-4)
    assert runs["graph"]["best_held_out_bpd"] == pytest.approx(runs["eager"]["best_held_out_bpd"], rel=1e-4)


@pytest.mark.gpu
def test_graphed_loss_replays_the_loss_and_its_gradients():
    from pixelcnn_kernels.models import GatedPixelCNN
    from pixelcnn_kernels.train import GraphedLoss

    torch.manual_seed(0)
    model = GatedPixelCNN(3, hidden=6, layers=2, dropout=0.0).cuda()
    batches = [torch.randint(0, 256, (4, 3, 8, 8), device="cuda") for _ in range(3)]
    graphed = GraphedLoss(model, batches[0])
    for x in batches + [batches[0][:3]]:  # the last, of another shape, runs the plain loss
        model.zero_grad(set_to_none=True)
        loss = graphed(x)
        loss.backward()
        got = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        expected_loss = model.loss(x)
        expected_loss.backward()
        torch.testing.assert_close(got[0], expected_loss.detach())
        for grad, p in zip(got[1], model.parameters()):
            torch.testing.assert_close(grad, p.grad)
    model.eval()  # not the mode captured: the plain loss
    with torch.no_grad():
        torch.testing.assert_close(graphed(batches[1]), model.loss(batches[1]))


def test_pixelcnn_plus_plus_trains(tmp_path, tiny_digits):
    args = build_parser().parse_args(["train", "--data", tiny_digits, "--model", "pixelcnnpp", "--hidden", "4", "--layers", "1",
                                      "--num-logistic-mix", "2", "--epochs", "1", "--batch-size", "16", "--no-progress", "--samples", "0",
                                      "--out", str(tmp_path / "run")])
    summary = train(args)
    assert np.isfinite(summary["best_held_out_bpd"])
    model = load_model(tmp_path / "run" / "best.pt")
    assert type(model).__name__ == "PixelCNNPlusPlus" and model.config["nr_logistic_mix"] == 2
