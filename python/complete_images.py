"""Complete images whose bottom rows are hidden, with a model trained by ``pixelcnn-kernels train``.

Loads a checkpoint (``weights_only``, see ``pixelcnn_kernels.checkpoint``), takes
held-out images of the data set it was trained on, keeps their top rows and lets
the model draw the rest, several times per image. Writes a grid: per image, the
original, the kept part (hidden rows grey), then the completions.

    pixelcnn-kernels train                     # writes runs/train/best.pt
    python python/complete_images.py --checkpoint runs/train/best.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pixelcnn_kernels.checkpoint import load_checkpoint, load_model
from pixelcnn_kernels.cli import ArgumentParser, available_device, positive_int, report_user_errors
from pixelcnn_kernels.data import load_dataset, save_image_grid
from pixelcnn_kernels.utils import writable_directory


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/train/best.pt", help="a checkpoint written by `pixelcnn-kernels train` (default runs/train/best.pt)")
    parser.add_argument("--images", type=positive_int, default=8, help="held-out images to complete (default 8)")
    parser.add_argument("--completions", type=positive_int, default=5, help="completions per image (default 5)")
    parser.add_argument("--keep-rows", type=int, help="top rows kept (default: half the height)")
    parser.add_argument("--out", default="completions.png", help="the PNG grid to write (default completions.png)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu", help="where to sample (default: cuda if available)")
    args = parser.parse_args(argv)
    writable_directory(Path(args.out).parent)  # before the work: an unusable --out fails now, not after it

    device = args.device
    saved = load_checkpoint(args.checkpoint)["args"]  # the data options the model was trained with
    model = load_model(args.checkpoint, device).eval()
    data = load_dataset(saved["data"], num_bins=saved["num_bins"], seed=saved["seed"])
    originals = data.held_out[: args.images].long().to(device)
    n, channels, height, width = originals.shape
    keep_rows = height // 2 if args.keep_rows is None else args.keep_rows
    if not 0 <= keep_rows <= height:
        raise ValueError(f"--keep-rows must be between 0 and the height {height}, got {keep_rows}")
    known = torch.zeros(height, width, dtype=torch.bool, device=device)
    known[:keep_rows] = True

    prefix = originals.repeat_interleave(args.completions, dim=0)
    cond = None
    if model.num_classes is not None:
        cond = data.held_out_labels[: args.images].to(device).repeat_interleave(args.completions)
    completed = model.sample(len(prefix), prefix=prefix, known=known, cond=cond, generator=torch.Generator(device).manual_seed(0))

    kept = torch.where(known, originals, (data.num_bins - 1) // 2)
    rows = torch.cat([originals[:, None], kept[:, None], completed.view(n, args.completions, channels, height, width)], dim=1)
    save_image_grid(rows.flatten(0, 1).cpu(), data.num_bins, args.out, columns=2 + args.completions)
    print(f"wrote {args.out}: per row the original, the kept top {keep_rows} rows, then {args.completions} completions")


if __name__ == "__main__":
    sys.exit(report_user_errors("complete_images.py", main))
