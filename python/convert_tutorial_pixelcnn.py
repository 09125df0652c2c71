"""Convert a tutorial-style Gated PixelCNN to the fused masked convolutions and time it.

The model below is written the way tutorials write it, with nothing from
pixelcnn-kernels: masked convolutions as a wrapper holding an ``nn.Conv2d`` and a
``mask`` buffer that it multiplies into the weight in place (the vertical and
horizontal stacks), and as an ``nn.Conv2d`` subclass masking its weight
functionally (the first and last layers). ``pixelcnn_kernels.convert`` finds
them by what they hold, checks each replacement on random probes, and swaps it
in, keeping the Parameters and the ``state_dict`` keys.

The gate, ``torch.tanh(a) * torch.sigmoid(b)``, is code, not a module: in your
own model change that line to ``pixelcnn_kernels.gate_tanh_sigmoid(x, dim=1)``
(``x`` the concatenated pre-activation) to fuse it too.

    python python/convert_tutorial_pixelcnn.py --device cuda --batch 64 --size 28
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pixelcnn_kernels
from pixelcnn_kernels.backend import resolve_backend
from pixelcnn_kernels.cli import ArgumentParser, available_device, positive_int, report_user_errors


class MaskedConvolution(nn.Module):
    """Tutorial wrapper: an nn.Conv2d and a spatial 0/1 mask, applied in place before each call."""

    def __init__(self, c_in, c_out, mask, dilation=1):
        super().__init__()
        kernel_size = tuple(mask.shape)
        padding = tuple(dilation * (k - 1) // 2 for k in kernel_size)
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=padding, dilation=dilation)
        self.register_buffer("mask", mask[None, None])

    def forward(self, x):
        self.conv.weight.data *= self.mask
        return self.conv(x)


class MaskedConv2d(nn.Conv2d):
    """Classic PixelCNN masked conv ("A" excludes the centre pixel, "B" includes it), masked functionally."""

    def __init__(self, mask_type, c_in, c_out, kernel_size):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        mask = torch.ones(kernel_size, kernel_size)
        mask[kernel_size // 2, kernel_size // 2 + (mask_type == "B") :] = 0
        mask[kernel_size // 2 + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


def vertical_mask(k, include_centre_row=True):
    mask = torch.ones(k, k)
    mask[k // 2 + include_centre_row :] = 0
    return mask


def horizontal_mask(k, include_centre=True):
    mask = torch.ones(1, k)
    mask[0, k // 2 + include_centre :] = 0
    return mask


class GatedMaskedConv(nn.Module):
    def __init__(self, channels, k=3, dilation=1):
        super().__init__()
        self.conv_vert = MaskedConvolution(channels, 2 * channels, vertical_mask(k), dilation)
        self.conv_horiz = MaskedConvolution(channels, 2 * channels, horizontal_mask(k), dilation)
        self.conv_vert_to_horiz = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.conv_horiz_1x1 = nn.Conv2d(channels, channels, 1)

    def forward(self, v_stack, h_stack):
        v_features = self.conv_vert(v_stack)
        a, b = v_features.chunk(2, dim=1)
        v_out = torch.tanh(a) * torch.sigmoid(b)
        # The vertical stack at row i sees only rows above i (its first layer excludes the centre row).
        h_features = self.conv_horiz(h_stack) + self.conv_vert_to_horiz(v_features)
        a, b = h_features.chunk(2, dim=1)
        h_out = self.conv_horiz_1x1(torch.tanh(a) * torch.sigmoid(b)) + h_stack
        return v_out, h_out


class TutorialPixelCNN(nn.Module):
    def __init__(self, c_in=1, hidden=64, layers=5, num_bins=256):
        super().__init__()
        self.num_bins = num_bins
        self.conv_vstack = MaskedConvolution(c_in, hidden, vertical_mask(3, include_centre_row=False))
        self.conv_hstack = MaskedConvolution(c_in, hidden, horizontal_mask(3, include_centre=False))
        self.layers = nn.ModuleList(GatedMaskedConv(hidden, dilation=d) for d in ([1, 2, 1, 4, 1] * layers)[:layers])
        self.conv_mid = MaskedConv2d("B", hidden, hidden, 3)
        self.conv_out = nn.Conv2d(hidden, c_in * num_bins, 1)

    def forward(self, x):
        x = x.float() / (self.num_bins - 1) * 2 - 1
        v, h = self.conv_vstack(x), self.conv_hstack(x)
        for layer in self.layers:
            v, h = layer(v, h)
        out = self.conv_out(F.elu(self.conv_mid(F.elu(h))))
        return out.unflatten(1, (x.shape[1], self.num_bins)).transpose(1, 2)


def time_training_step(model, images, repeats):
    """Median seconds of one forward + backward of the cross-entropy loss."""

    def step():
        loss = F.cross_entropy(model(images), images.long())
        loss.backward()

    for _ in range(2):  # warm-up (compilation, autotuning, allocator)
        step()
    times = []
    for _ in range(repeats):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu", help="where to run (default: cuda if available)")
    parser.add_argument("--batch", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument("--size", type=positive_int, default=28, help="image height and width (default 28)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="channels (default 64)")
    parser.add_argument("--layers", type=positive_int, default=5, help="gated layers (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (default 5, at least 3)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats must be at least 3 for a median, got {args.repeats}")

    torch.manual_seed(0)
    device = args.device
    model = TutorialPixelCNN(hidden=args.hidden, layers=args.layers).to(device)
    images = torch.randint(0, model.num_bins, (args.batch, 1, args.size, args.size), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # built before conversion: it must keep working
    keys_before = list(model.state_dict())
    with torch.no_grad():
        logits_before = model(images)
    before = time_training_step(model, images, args.repeats)

    report = pixelcnn_kernels.convert(model)
    print(report)
    assert list(model.state_dict()) == keys_before, "state_dict keys changed"
    with torch.no_grad():
        difference = (model(images) - logits_before).abs().max().item()
    optimizer.zero_grad()
    after = time_training_step(model, images, args.repeats)
    optimizer.step()
    print(f"max |logits difference| after conversion: {difference:.3g}")
    backend = resolve_backend(images.float())
    print(f"forward+backward, batch {args.batch} of {args.size}×{args.size} on {device}, converted convs on the {backend} backend: "
          f"{before * 1e3:.1f} ms before, {after * 1e3:.1f} ms after ({before / after:.2f}×)")
    if backend == "reference":
        print("(the reference backend runs the PyTorch reference ops, not fused kernels: timings need a GPU; on the CPU, TRITON_INTERPRET=1 with PIXELCNN_KERNELS_BACKEND=triton exercises the Triton kernels)")
    print("next: replace `torch.tanh(a) * torch.sigmoid(b)` with `pixelcnn_kernels.gate_tanh_sigmoid(x, dim=1)` to fuse the gates")


if __name__ == "__main__":
    sys.exit(report_user_errors("convert_tutorial_pixelcnn.py", main))
