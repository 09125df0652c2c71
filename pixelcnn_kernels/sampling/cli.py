"""``pixelcnn-kernels sample``: draw a grid of images from a trained checkpoint.

Loads a checkpoint written by ``pixelcnn-kernels train`` (through
:func:`pixelcnn_kernels.checkpoint.load_model`), samples with a progress bar, writes a
PNG grid and prints the time and images/s (and the Jacobi iterations).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch

from pixelcnn_kernels.backend import BACKENDS, use_backend
from pixelcnn_kernels.cli import positive_int
from pixelcnn_kernels.models.base import SAMPLING_METHODS
from pixelcnn_kernels.utils import writable_directory


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="draw images from a trained checkpoint into a PNG grid",
        description="Sample a checkpoint written by 'pixelcnn-kernels train' and write a PNG grid. "
        "Methods: naive (one full forward per value), cached (incremental, from per-layer caches; the default), "
        "jacobi (parallel forwards iterated to the fixed point). Prints the time and images/s.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by 'pixelcnn-kernels train' (e.g. runs/train/best.pt)")
    parser.add_argument("--n", type=positive_int, default=64, help="images to draw (default 64)")
    parser.add_argument("--method", choices=SAMPLING_METHODS, default="cached", help="sampler (default: cached)")
    parser.add_argument("--block-rows", type=int, help="jacobi only: iterate in windows of this many rows (default: the whole image)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the size the model was built for)")
    parser.add_argument("--label", type=int, help="class-conditional models: draw every image of this class (default: classes 0, 1, ... in turn)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to sample (default: cuda when available)")
    parser.add_argument("--backend", choices=BACKENDS, help="force the ops onto one backend (default: automatic)")
    parser.add_argument("--out", default="samples.png", help="the PNG grid to write (default samples.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pixelcnn_kernels.checkpoint import load_model
    from pixelcnn_kernels.data import save_image_grid

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible")
    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"--out must name a .png file, got {args.out}")
    writable_directory(out.parent)  # before sampling: an unusable path fails now, not after the work
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    model = load_model(args.checkpoint, map_location=device)
    cond = None
    if model.num_classes is not None:
        if args.label is not None and not 0 <= args.label < model.num_classes:
            raise ValueError(f"--label must be a class in [0, {model.num_classes - 1}], got {args.label}")
        labels = torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % model.num_classes
        cond = labels.to(device)
    elif args.label is not None:
        raise ValueError("--label is for class-conditional models; this one has no classes")
    generator = torch.Generator(device).manual_seed(args.seed)
    with use_backend(args.backend) if args.backend else nullcontext():  # a bad option for this model raises ValueError
        images = model.sample(
            args.n, method=args.method, cond=cond, generator=generator, progress=not args.no_progress,
            size=tuple(args.size) if args.size else None, block_rows=args.block_rows,
        )
    stats = model.last_sample_stats
    path = save_image_grid(images.cpu(), model.num_bins, out)
    line = f"sample: {stats.images} images by {args.method} in {stats.seconds:.3f} s ({stats.images / stats.seconds:.1f} images/s"
    if args.method == "jacobi":
        line += f"; {stats.network_passes} Jacobi iterations for {stats.values} values"
    elif args.method == "cached" and stats.redrawn_values:
        line += f"; {stats.network_passes} full forwards checked the draft and repaired {stats.redrawn_values} values"
    print(line + f"); wrote {path}")
    return 0
