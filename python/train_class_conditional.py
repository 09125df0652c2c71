"""Train a class-conditional Gated PixelCNN on the bundled 8×8 digits, then draw each digit.

A plain training loop on the library's pieces (the ``pixelcnn-kernels train``
command does the same with checkpoints, torchrun and more): the model takes the
class labels as ``cond``, and sampling with ``cond`` set to a digit draws that
digit. Writes a grid with one row per digit.

    python python/train_class_conditional.py --epochs 15 --out digits_by_class.png

On a GPU, ``--cuda-graph`` replays each step's forward and backward from a CUDA graph
(:class:`pixelcnn_kernels.train.GraphedLoss`): at this model's size the host's Python
and launches take longer than the GPU's work, and the graph removes them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pixelcnn_kernels.cli import ArgumentParser, available_device, positive_int, report_user_errors
from pixelcnn_kernels.data import load_digits, save_image_grid
from pixelcnn_kernels.models import GatedPixelCNN
from pixelcnn_kernels.train import GraphedLoss
from pixelcnn_kernels.utils import writable_directory


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=15, help="epochs over the 1500 training digits (default 15)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="channels (default 64)")
    parser.add_argument("--layers", type=positive_int, default=5, help="gated layers (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    parser.add_argument("--per-class", type=positive_int, default=8, help="samples drawn per digit (default 8)")
    parser.add_argument("--train-images", type=positive_int, help="train on only the first N training digits (a quick try; default all 1500)")
    parser.add_argument("--out", default="digits_by_class.png", help="the PNG grid to write (default digits_by_class.png)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu", help="where to train (default: cuda if available)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each step's forward and backward from a CUDA graph (GPU only)")
    args = parser.parse_args(argv)
    if args.cuda_graph and args.device.type != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    writable_directory(Path(args.out).parent)  # before the work: an unusable --out fails now, not after it

    torch.manual_seed(0)
    device = args.device
    digits = load_digits()
    model = GatedPixelCNN(in_channels=1, hidden=args.hidden, layers=args.layers, kernel_size=5, num_classes=digits.num_classes,
                          num_bins=digits.num_bins, image_size=(8, 8)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = digits.train[: args.train_images].to(device), digits.train_labels[: args.train_images].to(device)
    # The graph is captured on one batch's shapes; an epoch's smaller last batch runs the plain loss.
    loss_fn = GraphedLoss(model.train(), images[: args.batch_size], labels[: args.batch_size]) if args.cuda_graph else model.loss
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(images), device=device).split(args.batch_size):
            loss = loss_fn(images[batch], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            held_out = model.bits_per_dim(digits.held_out.to(device), cond=digits.held_out_labels.to(device)).mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}: held-out {held_out:.3f} bits/dim given the class")

    classes = torch.arange(digits.num_classes, device=device).repeat_interleave(args.per_class)
    samples = model.sample(len(classes), cond=classes, generator=torch.Generator(device).manual_seed(0))
    save_image_grid(samples.cpu(), digits.num_bins, args.out, columns=args.per_class)
    print(f"wrote {args.out}: row k holds samples of digit k")


if __name__ == "__main__":
    sys.exit(report_user_errors("train_class_conditional.py", main))
