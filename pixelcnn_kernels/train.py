"""``pixelcnn-kernels train``: train a PixelCNN on an embedded data set or your images.

Run with no arguments it trains a Gated PixelCNN on scikit-learn's 8×8 digits and
writes, under ``--out``: ``last.pt`` (resumable), ``best.pt`` (best held-out
bits/dim), ``metrics.json`` (per-epoch train and held-out bits/dim) and
``samples.png`` (a grid drawn from the best model).

Launched under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) it trains with
DistributedDataParallel: the NCCL process group on CUDA, gloo on the CPU. Every
epoch shuffles with a :class:`~torch.utils.data.DistributedSampler` seeded by
``--seed``, so rank r of W takes every W-th image of the same permutation a
single process uses, and a step of W processes sees the same global batch of
``--batch-size`` images as one process (gradients are averaged across ranks).
Only rank 0 writes files and shows the progress bar.

On one GPU, ``--cuda-graph`` replays the model's forward and backward from a CUDA
graph (:class:`GraphedLoss`): a step then costs the host a few calls instead of a
few hundred Python-level op calls and kernel launches.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pixelcnn_kernels.backend import BACKENDS, use_backend
from pixelcnn_kernels.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from pixelcnn_kernels.data import ImageDataset, load_dataset, save_image_grid
from pixelcnn_kernels.masks import check_gated_color_channels
from pixelcnn_kernels.models import TrainingLoss, model_from_config
from pixelcnn_kernels.utils import writable_directory

MODEL_NAMES = {"gated": "gated_pixelcnn", "pixelcnnpp": "pixelcnn_pp"}  # --model choice -> models.MODELS name
# The gated defaults were chosen on the digits (best held-out bits/dim, seed 0; about ±0.005 run to run).
# First, 20 epochs on a cosine schedule: hidden 64 without dropout overfits (1.756); dilations 1, 2, ... with
# dropout 0.2: 1.729; hidden 96 with dropout 0.4 and --ema-decay 0.995: 1.716, the average beating the last
# weights all along. Then, none better than noise: 6 layers (1.710 in 4.4 min in float32), 7 layers, batch
# 32, weight decay 0.05, dropout on the vertical stack (1.730), kernel 5 (1.728), a DMOL head (1.721),
# ±1-pixel shifts of the training images (behind all along), a learned per-position bias (1.713), dropout
# before the head (1.712). What did move it: bfloat16 autocast (native_bfloat16) trains to the same 1.716
# in 0.55 of the time, which pays for 6 layers with dropout 0.5; on a cosine over 30 epochs the average's
# best came at epoch 18 (1.702), where the rate was still high, and the last epochs memorised the training
# set (train 1.46, held-out 1.746). So: a constant rate, the average annealing, and weight decay 0.5
# slowing the memorisation: 1.696 at epoch 21 (seed 1, another split: 1.697 against 1.705 on the cosine);
# weight decay 1.0 learns slower (1.709 at epoch 20), 2.0 underfits (1.731 after 30).
DEFAULTS = {
    "hidden": {"gated": 96, "pixelcnnpp": 64},
    "layers": {"gated": 6, "pixelcnnpp": 2},
    "dropout": {"gated": 0.5, "pixelcnnpp": 0.5},
    "epochs": {"gated": 24, "pixelcnnpp": 20},
    "weight_decay": {"gated": 0.5, "pixelcnnpp": 0.0},
    "lr_schedule": {"gated": "constant", "pixelcnnpp": "cosine"},
}
DEFAULT_EMA_DECAY = 0.995
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "samples.png")  # what a run writes in --out
# The defaults of the options whose parser default is None (given or not tells a resumed run which to take
# from its checkpoint); DEFAULTS' depend on --model, filled in once the model is known (after --resume).
FIXED_DEFAULTS = {"data": "digits", "model": "gated", "kernel_size": 3, "num_logistic_mix": 5, "batch_size": 64, "lr": 3e-3,
                  "ema_decay": DEFAULT_EMA_DECAY, "seed": 0}
# --lr-schedule: the factor on --lr at a step of a run of total_steps.
LR_SCHEDULES = {
    "constant": lambda step, total_steps: 1.0,
    "cosine": lambda step, total_steps: 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))),
}
SAMPLE_COUNT = 64
PROGRESS_SECONDS = 1.0  # the least time between the progress bar's reads of the loss (each waits for the GPU)
DEFAULT_OUT = "runs/train"


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU of sm_80 or newer, a CPU with AVX512-BF16 or AMX (as oneDNN reports it).

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    mkldnn_reports_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device.type == "cpu" and mkldnn_reports_bf16 is not None and mkldnn_reports_bf16()


def autocast_dtype(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: bfloat16 for ``"bf16"``, none for ``"fp32"``; by default bfloat16 where it is native.

    On the digits, bfloat16 autocast reaches the held-out bits/dim of float32 (1.7158
    both, the defaults of the time) in 0.55 of the time on a 2-core AVX512-BF16 CPU.
    """
    if precision is None:
        precision = "bf16" if native_bfloat16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options (shared by the subcommand and the python/ examples)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="'digits' (sklearn 8×8, 17 grey levels; default), 'photos' (32×32 RGB patches of "
                      "scikit-image's sample photographs), a folder of PNG/JPEG images, or an .npz file with an 'images' array")
    data.add_argument("--num-bins", type=int, help="quantise the data to this many levels per channel (default: the data's own: 17 for digits, 256 otherwise)")
    data.add_argument("--class-conditional", action="store_true", help="condition on the data set's class labels (digits: 0..9; .npz: its 'labels')")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=tuple(MODEL_NAMES), help="gated: Gated PixelCNN with a softmax head (default); pixelcnnpp: PixelCNN++ with a logistic-mixture head")
    model.add_argument("--hidden", type=int, help=f"channels per layer (default {DEFAULTS['hidden']['gated']} gated, {DEFAULTS['hidden']['pixelcnnpp']} pixelcnnpp); "
                       "gated on RGB data: 0 or 2 more than a multiple of 3 (e.g. 96, 128), as its colour groups split a layer's "
                       "channels and twice as many gate inputs alike")
    model.add_argument("--layers", type=int, help=f"gated layers (gated, default {DEFAULTS['layers']['gated']}) or resnet blocks per resolution (pixelcnnpp, default {DEFAULTS['layers']['pixelcnnpp']})")
    model.add_argument("--kernel-size", type=int, help="kernel size of the gated model's convolutions, odd (default 3)")
    model.add_argument("--dilations", type=int, nargs="+", metavar="D", help="gated: one dilation per layer (default 1, 2, 1, 2, ...)")
    model.add_argument("--dropout", type=float, help=f"dropout in the gated layers' residual branch (gated, default {DEFAULTS['dropout']['gated']}) "
                       f"or the pixelcnnpp blocks (default {DEFAULTS['dropout']['pixelcnnpp']})")
    model.add_argument("--num-logistic-mix", type=int, help="logistic mixture components of the pixelcnnpp head (default 5)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help=f"epochs to train (default {DEFAULTS['epochs']['gated']} gated, {DEFAULTS['epochs']['pixelcnnpp']} pixelcnnpp); "
                       "with --resume, the total including those already done")
    optim.add_argument("--batch-size", type=int, help="global batch size, split evenly across torchrun processes (default 64)")
    optim.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3)")
    optim.add_argument("--lr-schedule", choices=tuple(LR_SCHEDULES),
                       help="constant: --lr throughout, the weight average (--ema-decay) doing the annealing (default gated); "
                       "cosine: decayed to 0 over the run (default pixelcnnpp)")
    optim.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {DEFAULTS['weight_decay']['gated']} gated, "
                       f"{DEFAULTS['weight_decay']['pixelcnnpp']} pixelcnnpp)")
    optim.add_argument("--ema-decay", type=float, help="evaluate, save and sample an exponential moving average "
                       f"of the weights with this decay per step, capped by (1 + t) / (10 + t) at step t (default {DEFAULT_EMA_DECAY}; "
                       "0: the trained weights themselves)")
    optim.add_argument("--max-minutes", type=float, help="stop after the epoch during which this much training time has passed (default: no limit)")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, help="seeds the initialisation, the data split, the shuffling and the samples (default 0)")
    precision = run.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="run the forward and loss under bfloat16 autocast (parameters and optimizer stay fp32); "
                           "the default where the device computes bfloat16 natively (CUDA sm_80+, CPUs with AVX512-BF16 or AMX)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="no autocast: float32 throughout (the default elsewhere)")
    run.add_argument("--backend", choices=BACKENDS, help="force the ops onto one backend (default: automatic, cuda/triton on a GPU, reference on the CPU)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (default: cuda when available)")
    run.add_argument("--cuda-graph", action="store_true", help="replay the model's forward and backward from a CUDA graph every step: "
                     "the host's per-step Python and kernel launches gone (one GPU, one process)")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"directory for last.pt, best.pt, metrics.json and samples.png (default {DEFAULT_OUT})")
    run.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its checkpoints, metrics and samples are removed); "
                     "without it such an --out is refused")
    run.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT", help="continue from a checkpoint (default: OUT/last.pt); the data, model and optimisation options "
                     "(--lr, --batch-size, --seed, ...) are the checkpoint's, and another value given for one is an error")
    run.add_argument("--samples", type=int, default=SAMPLE_COUNT, help=f"images in the final samples.png grid (default {SAMPLE_COUNT}; 0: none)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a PixelCNN (default: a Gated PixelCNN on the bundled 8×8 digits, a few minutes on a CPU)",
        description="Train a PixelCNN and write OUT/last.pt (resumable), OUT/best.pt (best held-out bits/dim), "
        "OUT/metrics.json and OUT/samples.png. With no options: a Gated PixelCNN on scikit-learn's 8×8 digits. "
        "Launched under torchrun it trains with DistributedDataParallel (NCCL on CUDA, gloo on the CPU).",
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def _setup_distributed(device_choice: str) -> Distributed:
    """Joins the torchrun process group when launched by torchrun; picks the device."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def _model_spec(args: argparse.Namespace, data: ImageDataset) -> dict:
    """``{"name", "config"}`` of the model the options (their defaults filled in) describe, for ``models.model_from_config``."""
    channels, height, width = data.image_shape
    hidden, layers, dropout = args.hidden, args.layers, args.dropout
    num_classes = data.num_classes if args.class_conditional else None
    if args.class_conditional and not data.num_classes:
        raise ValueError(f"--class-conditional needs labels, and the {data.name} data set has none")
    if args.dilations is not None and args.model != "gated":
        raise ValueError(f"--dilations is an option of --model gated, not {args.model}")
    if args.dilations is not None and len(args.dilations) != layers:
        raise ValueError(f"--dilations takes one value per gated layer ({layers}), got {args.dilations}")
    if args.model == "gated" and channels == 3:  # colour groups (the default 96 splits in thirds)
        check_gated_color_channels(hidden, 3, "--hidden")
    if args.model == "gated":
        # Dilation 2 every other layer widens the receptive field at no cost: five 3×3 layers then see the whole
        # 8×8 digit above and to the left, which measurably lowers the held-out bits/dim (kernel 5 does too, but slowly).
        dilations = args.dilations or [1 + layer % 2 for layer in range(layers)]
        config = dict(in_channels=channels, hidden=hidden, layers=layers, kernel_size=args.kernel_size, dilations=dilations,
                      dropout=dropout, num_classes=num_classes, head="softmax", num_bins=data.num_bins, image_size=[height, width])
    else:
        config = dict(nr_resnet=layers, nr_filters=hidden, nr_logistic_mix=args.num_logistic_mix, in_channels=channels,
                      num_classes=num_classes, dropout=dropout, num_bins=data.num_bins, image_size=[height, width])
    return {"name": MODEL_NAMES[args.model], "config": config}


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


def _mean_over_ranks(total: torch.Tensor, count: torch.Tensor, run: Distributed) -> float:
    """sum(total) / sum(count) over every rank."""
    both = torch.stack([total.double(), count.double()])
    if run.world_size > 1:
        dist.all_reduce(both)
    return (both[0] / both[1]).item()


def _means_over_ranks(values: list[torch.Tensor], run: Distributed) -> list[float]:
    """Each of ``values`` (0-d, one per step) averaged over the ranks: one all-reduce and one read for all of them."""
    if not values:
        return []
    stacked = torch.stack(values).double()
    if run.world_size > 1:
        dist.all_reduce(stacked)
    return (stacked / run.world_size).tolist()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; to a GPU from pinned memory without waiting.

    A copy from pageable memory makes the host wait until the GPU has finished every
    step queued before it, so the host could not prepare the next step while the GPU
    runs this one.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def evaluate(model, images: torch.Tensor, labels: torch.Tensor | None, run: Distributed, batch_size: int, autocast) -> float:
    """Held-out bits/dim of ``model`` on ``images`` (each rank takes every world_size-th image)."""
    shard = list(range(run.rank, len(images), run.world_size))
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        for batch in _batches(shard, batch_size):
            x = _to_device(images[batch], run.device)
            cond = None if labels is None else _to_device(labels[batch], run.device)
            total += model.bits_per_dim(x, cond).double().sum()
    model.train(was_training)
    return _mean_over_ranks(total, torch.tensor(float(len(shard)), device=run.device), run)


def _adopt_best_checkpoint(resume_path: Path, out: Path, run: Distributed) -> None:
    """A run resumed into a new --out starts there with its best.pt so far (the run's best, not only the new epochs')."""
    source = resume_path.parent / "best.pt"
    if run.is_main and source.exists() and not (out / "best.pt").exists():
        shutil.copyfile(source, out / "best.pt")
    if run.world_size > 1:
        dist.barrier()  # every rank then sees the same out/best.pt


def _resume_path(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    return Path(args.resume) if args.resume else Path(args.out) / "last.pt"


class GraphedLoss:
    """``model.loss(x, cond)`` with its forward and backward captured in CUDA graphs and replayed.

    A training step of a PixelCNN issues hundreds of small kernels, and on the fused
    kernels the host's Python and launches can take longer than the GPU's work
    (``benchmarks/results/*-host-overhead-cpu.md``). ``torch.cuda.make_graphed_callables``
    captures the loss's forward and its backward to the parameters once, after warm-up
    runs on ``example_x`` / ``example_cond``; each call then copies the batch into the
    graph's inputs and replays, and ``loss.backward()`` replays the backward and adds
    the gradients to the parameters' ``.grad`` as usual. The optimiser runs outside.

    - A batch of another shape (an epoch's last, smaller one), or a call while the model
      is not in the training mode it was captured in, runs the plain loss.
    - The returned loss is the graph's output buffer, overwritten by the next call:
      clone it to keep it.
    - Under autocast, capture and call it in ``torch.autocast(..., cache_enabled=False)``,
      as CUDA graphs need.
    - One process (DistributedDataParallel's gradient hooks are not captured). Dropout
      draws new numbers at each replay.
    """

    def __init__(self, model: torch.nn.Module, example_x: torch.Tensor, example_cond: torch.Tensor | None = None):
        if not model.training:
            raise ValueError("GraphedLoss captures a training step: call model.train() first")
        if not example_x.is_cuda:
            raise ValueError(f"GraphedLoss needs CUDA tensors: example_x is on {example_x.device}")
        self.model = model
        self.conditional = example_cond is not None
        example = (example_x, example_cond) if self.conditional else (example_x,)
        self.shapes = tuple(t.shape for t in example)
        # A module comes back with its forward replaced by the graphs' (the captured one while in the
        # training mode it was captured in): a wrapper of its own, so model.loss stays the plain loss.
        self.graphed = torch.cuda.make_graphed_callables(TrainingLoss(model), example, allow_unused_input=True)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (cond is not None) != self.conditional:
            raise ValueError(f"cond must be {'given' if self.conditional else 'None'}, as when the loss was captured")
        inputs = (x, cond) if self.conditional else (x,)
        if not self.model.training or tuple(t.shape for t in inputs) != self.shapes:
            return self.model.loss(x, cond)
        return self.graphed(*inputs)


# Options a resumed run takes from its checkpoint: they fix the data, the model, the shuffling and
# the optimisation (the optimizer's state brings back its learning rate and weight decay).
_FIXED_ON_RESUME = ("data", "num_bins", "class_conditional", "model", "hidden", "layers", "kernel_size", "dilations", "dropout",
                    "num_logistic_mix", "seed", "batch_size", "ema_decay", "lr_schedule", "lr", "weight_decay")


def _with_defaults(options: dict) -> dict:
    """``options`` (the train options by name) with every one left None given its default (DEFAULTS: the model's)."""
    options = {**options, **{k: v for k, v in FIXED_DEFAULTS.items() if options.get(k) is None}}
    return {**options, **{k: by_model[options["model"]] for k, by_model in DEFAULTS.items() if options.get(k) is None}}


def _resumed_args(args: argparse.Namespace, saved: dict) -> argparse.Namespace:
    """``args`` with the options the checkpoint fixes taken from its ``saved`` args, and ``--epochs``
    the checkpoint's target unless given.

    An option given (not None; a flag: set) with another value than the checkpoint's is refused
    (ValueError) rather than silently dropped; both are compared with their defaults filled in.
    """
    saved = {"ema_decay": 0.0, "lr_schedule": "cosine", **saved}  # checkpoints written before those options: none, the cosine
    saved = _with_defaults({k: saved.get(k) for k in (*_FIXED_ON_RESUME, "epochs")})
    given = _with_defaults({**vars(args), "model": args.model or saved["model"]})
    for name in _FIXED_ON_RESUME:
        value = getattr(args, name)
        if value is not None and value is not False and given[name] != saved[name]:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {value} differs from the resumed checkpoint's {saved[name]}: a resumed run keeps the checkpoint's "
                             f"data, model and optimisation options; drop {option}, or start a new run with another --out")
    epochs = saved["epochs"] if args.epochs is None else args.epochs
    return argparse.Namespace(**{**vars(args), **{k: saved[k] for k in _FIXED_ON_RESUME}, "epochs": epochs})


@torch.no_grad()
def _update_average(average: torch.nn.Module, model: torch.nn.Module, decay: float, steps_done: int) -> None:
    """One step of the exponential moving average: average <- d·average + (1 - d)·model.

    d = min(decay, (1 + steps_done) / (10 + steps_done)), as TensorFlow's
    ExponentialMovingAverage with num_updates: early steps average over fewer steps, so
    the random initialisation does not linger in the average of a short run. One
    foreach call for all parameters (on a GPU a few kernels, not one per parameter).
    """
    step_decay = min(decay, (1 + steps_done) / (10 + steps_done))
    averaged, trained = list(average.parameters()), list(model.parameters())
    if len(averaged) != len(trained):
        raise ValueError(f"the average has {len(averaged)} parameters, the model {len(trained)}")
    torch._foreach_lerp_(averaged, trained, 1.0 - step_decay)


def _saved_args(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key != "func"}


def _write_metrics(path: Path, metrics: list[dict], spec: dict, summary: dict | None = None) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"model": spec, "epochs": metrics, "summary": summary}, indent=1))
    os.replace(temporary, path)


def _save_samples(model, data: ImageDataset, args: argparse.Namespace, path: Path, run: Distributed) -> None:
    count = args.samples
    cond = torch.arange(count, device=run.device) % data.num_classes if args.class_conditional else None
    generator = torch.Generator(run.device).manual_seed(args.seed)
    images = model.sample(count, method="cached", cond=cond, size=data.image_shape[1:], generator=generator, progress=not args.no_progress)
    save_image_grid(images.cpu(), data.num_bins, path)
    print(f"train: wrote {path}", flush=True)


def _check_args(args: argparse.Namespace) -> None:
    """ValueError naming the option for values no run can use (before any data is loaded)."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--hidden": args.hidden, "--layers": args.layers,
                "--kernel-size": args.kernel_size, "--num-logistic-mix": args.num_logistic_mix}
    for option, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if args.kernel_size is not None and args.kernel_size % 2 == 0:
        raise ValueError(f"--kernel-size must be odd (a masked kernel is centred on its pixel), got {args.kernel_size}")
    if args.dilations is not None and min(args.dilations) < 1:
        raise ValueError(f"--dilations must all be at least 1, got {args.dilations}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    non_negative = {"--lr": args.lr, "--weight-decay": args.weight_decay, "--max-minutes": args.max_minutes, "--samples": args.samples}
    for option, value in non_negative.items():
        if value is not None and value < 0:
            raise ValueError(f"{option} must not be negative, got {value}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.cuda_graph and (args.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("--cuda-graph needs a CUDA device")
    if args.cuda_graph and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--cuda-graph trains in one process: DistributedDataParallel's gradient all-reduce is not captured")


def train(args: argparse.Namespace) -> dict:
    """Runs the training the options describe; returns the summary (rank 0 also writes the files)."""
    _check_args(args)
    if args.data not in (None, "digits", "photos"):  # saved with the checkpoints: --resume from another directory finds it
        args.data = str(Path(args.data).resolve())
    run = _setup_distributed(args.device)
    try:
        with use_backend(args.backend) if args.backend else nullcontext():
            return _train(args, run)
    finally:
        if run.world_size > 1:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, run: Distributed) -> dict:
    out = Path(args.out)
    try:  # before any work, on every rank (one that went on alone would die in DDP's set-up instead)
        writable_directory(out)
    except OSError as exc:
        raise ValueError(f"--out {out} is not a usable directory ({exc.strerror or exc})") from exc
    resume_path = _resume_path(args)
    if resume_path is None and (out / "last.pt").exists():
        if not args.overwrite:
            raise ValueError(f"--out {out} already holds a run ({out / 'last.pt'}): continue it with --resume, "
                             "keep it and choose another --out, or replace it with --overwrite")
        if run.is_main:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    if resume_path is not None and resume_path.exists() and (out / "last.pt").exists() and not (out / "last.pt").samefile(resume_path):
        raise ValueError(f"--out {out} holds another run's checkpoints ({out / 'last.pt'}): resume that run with --resume, "
                         f"or continue {resume_path} in a new --out")
    resumed = load_checkpoint(resume_path) if resume_path is not None else None
    if resumed is not None:
        training_state = resumed["optimizer"]
        if not isinstance(training_state, dict) or not {"optimizer", "schedule"} <= set(training_state):
            raise CheckpointError(f"checkpoint {resume_path} holds no training state to resume from (its optimizer entry is {type(training_state).__name__})")
        args = _resumed_args(args, resumed.get("args") or {})
        _adopt_best_checkpoint(resume_path, out, run)
    args = argparse.Namespace(**_with_defaults(vars(args)))
    if args.batch_size % run.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {run.world_size} processes")
    local_batch = args.batch_size // run.world_size

    torch.manual_seed(args.seed)
    data = load_dataset(args.data, num_bins=args.num_bins, seed=args.seed)
    spec = resumed["model"] if resumed is not None else _model_spec(args, data)
    model = model_from_config(spec).to(run.device)
    # With --ema-decay the average is what is evaluated, saved as the checkpoints' state_dict and sampled;
    # the trained weights then travel in the checkpoint's optimizer entry, for --resume.
    average = copy.deepcopy(model).requires_grad_(False) if args.ema_decay else None
    evaluated = model if average is None else average
    # On a GPU the fused AdamW: one multi-tensor kernel per step, without a host read of the step counters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=run.device.type == "cuda" or None)
    sampler = DistributedSampler(range(len(data.train)), num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=args.seed)
    total_steps = args.epochs * math.ceil(len(sampler) / local_batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(LR_SCHEDULES[args.lr_schedule], total_steps=total_steps))
    metrics: list[dict] = []
    start_epoch = 0
    if resumed is not None:
        evaluated.load_state_dict(resumed["state_dict"])
        if average is not None:
            model.load_state_dict(resumed["optimizer"]["trained_state_dict"])
        saved = resumed["optimizer"]["optimizer"]
        # load_state_dict takes the saved groups' options, "fused" among them: keep this run's (fused on a GPU only).
        saved = {**saved, "param_groups": [{**group, "fused": optimizer.defaults["fused"]} for group in saved["param_groups"]]}
        optimizer.load_state_dict(saved)
        schedule.load_state_dict(resumed["optimizer"]["schedule"])
        metrics = resumed["metrics"]
        start_epoch = resumed["epoch"]
        set_rng_state(resumed["rng"])
    autocast_to = autocast_dtype(args.precision, run.device)
    # CUDA graphs replay autocast's casts of the weights: its cache (cast weights kept across calls) must be off.
    autocast = (lambda: torch.autocast(run.device.type, dtype=autocast_to, cache_enabled=not args.cuda_graph)) if autocast_to is not None else nullcontext
    train_labels = data.train_labels if args.class_conditional else None
    loss_fn = TrainingLoss(model)
    if run.world_size > 1:
        loss_fn = DistributedDataParallel(loss_fn)
    elif args.cuda_graph:
        model.train()
        example = slice(0, min(local_batch, len(data.train)))
        with autocast():
            loss_fn = GraphedLoss(model, _to_device(data.train[example], run.device),
                                  None if train_labels is None else _to_device(train_labels[example], run.device))
    held_out_labels = data.held_out_labels if args.class_conditional else None
    nats_per_bit_dim = math.prod(data.image_shape) * math.log(2.0)  # loss (nats per image) / this = bits/dim
    if run.is_main:
        print(f"train: {data}; model {spec['name']} {spec['config']}; {sum(p.numel() for p in model.parameters())} parameters; "
              f"{run.world_size} process(es) on {run.device}, {'bfloat16 autocast' if autocast_to else 'float32'}", flush=True)

    elapsed_before = sum(m["seconds"] for m in metrics)
    started = time.perf_counter()
    # best.pt holds the best epoch so far; without one here (resumed from a run that has none) the next epoch writes it.
    best = min((m["held_out_bpd"] for m in metrics), default=math.inf) if (out / "best.pt").exists() else math.inf
    if start_epoch >= args.epochs and run.is_main:
        print(f"train: the run has done {start_epoch} of --epochs {args.epochs}: nothing to train (a larger --epochs continues it)", flush=True)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        epoch_started = time.perf_counter()
        model.train()
        nats = torch.zeros((), dtype=torch.float64, device=run.device)
        # Kept on the device and read once per epoch (and by the progress bar at most every
        # PROGRESS_SECONDS): a read each step would make the host wait for the GPU every step.
        step_losses: list[torch.Tensor] = []
        shown = time.perf_counter()
        bar = tqdm(_batches(list(sampler), local_batch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=args.no_progress or not run.is_main, leave=False)
        for batch in bar:
            x = _to_device(data.train[batch], run.device)
            cond = None if train_labels is None else _to_device(train_labels[batch], run.device)
            with autocast():
                loss = loss_fn(x, cond)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if average is not None:
                _update_average(average, model, args.ema_decay, schedule.last_epoch)
            nats += loss.detach().double() * len(batch)
            step_losses.append(loss.detach().clone())  # a graphed loss's buffer is overwritten by the next step
            if not bar.disable and time.perf_counter() - shown > PROGRESS_SECONDS:
                bar.set_postfix(bpd=f"{step_losses[-1].item() / nats_per_bit_dim:.3f}")  # this rank's loss
                shown = time.perf_counter()
        train_bpd = _mean_over_ranks(nats, torch.tensor(float(len(sampler)), device=run.device), run) / nats_per_bit_dim
        held_out_bpd = evaluate(evaluated, data.held_out, held_out_labels, run, 4 * local_batch, autocast)
        metrics.append({
            "epoch": epoch + 1, "train_bpd": train_bpd, "held_out_bpd": held_out_bpd,
            "seconds": time.perf_counter() - epoch_started, "lr": schedule.get_last_lr()[0], "step_losses": _means_over_ranks(step_losses, run),
        })
        if not (math.isfinite(train_bpd) and math.isfinite(held_out_bpd)):
            raise ValueError(f"training diverged in epoch {epoch + 1} (train {train_bpd} bits/dim, held-out {held_out_bpd}): "
                             f"try a lower --lr than {args.lr}; the checkpoints of the epochs before are in {out}")
        improved = held_out_bpd < best
        best = min(best, held_out_bpd)
        if run.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}: train {train_bpd:.4f} bits/dim, held-out {held_out_bpd:.4f} bits/dim"
                  f"{' (best)' if improved else ''}, {metrics[-1]['seconds']:.1f} s", flush=True)
            training_state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
            if average is not None:
                training_state["trained_state_dict"] = model.state_dict()
            state = dict(model_spec=spec, state_dict=evaluated.state_dict(), epoch=epoch + 1, metrics=metrics, args=_saved_args(args),
                         optimizer=training_state)
            save_checkpoint(out / "last.pt", **state)
            if improved:
                save_checkpoint(out / "best.pt", **state)
            _write_metrics(out / "metrics.json", metrics, spec)
        if args.max_minutes is not None and epoch + 1 < args.epochs and elapsed_before + time.perf_counter() - started > 60 * args.max_minutes:
            if run.is_main:
                print(f"train: stopping after epoch {epoch + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    summary = {"best_held_out_bpd": best, "epochs_done": len(metrics), "minutes": (elapsed_before + time.perf_counter() - started) / 60}
    if run.is_main and metrics:
        _write_metrics(out / "metrics.json", metrics, spec, summary)
        print(f"train: best held-out {best:.4f} bits/dim after {len(metrics)} epoch{'s' * (len(metrics) != 1)}, {summary['minutes']:.1f} min; "
              f"checkpoints in {out}", flush=True)
        if args.samples > 0:
            best_model = model_from_config(spec).to(run.device)
            best_model.load_state_dict(load_checkpoint(out / "best.pt", run.device)["state_dict"])
            _save_samples(best_model, data, args, out / "samples.png", run)
    return summary


def main(args: argparse.Namespace) -> int:
    try:
        train(args)
    except KeyboardInterrupt:  # the checkpoints are written whole (a temporary file renamed), so they stand
        print(f"train: interrupted; {args.out} holds the checkpoints of the finished epochs: continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    return 0
