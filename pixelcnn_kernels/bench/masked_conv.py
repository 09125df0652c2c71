"""Benchmark cases of the masked convolutions (issue 5).

Providers beside the harness's own: ``eager`` is the reference, i.e. cuDNN on the
masked weight (the formulation that spends FLOPs on zeros), and
``cudnn_shift`` is the best dense cuDNN formulation without wasted taps: a conv
over the bounding box of the active taps after padding the input so that the
box sits where the mask puts it (PixelCNN++'s pad-and-shift convs; for a 3×3
vertical mask, a 2×3 conv after padding the top). It slices the box out of the
full weight inside the timed call, which costs one small weight copy.

Case names start with ``mconv_``; the config reads ``NxCinxHxW->Cout
active/all taps``. Inputs are channels-last (the kernels' and cuDNN's fast
layout); FLOPs count the active taps only: 2·N·H·W·Cin·Cout·T per pass, the backward being two passes.
``mconv_fused_down2x3`` is PixelCNN++'s shifted conv with both fusions:
x has Cin / 2 channels, the conv reads concat_elu(x), and a residual is added (the
reference materialises concat_elu(x) and adds the residual in passes of their own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelcnn_kernels.bench.harness import Case
from pixelcnn_kernels.masks import MaskSpec, resolve_mask
from pixelcnn_kernels.ops.masked_conv import masked_conv2d, masked_conv2d_gated
from pixelcnn_kernels.reference.masked_conv import masked_conv2d_gated_ref, masked_conv2d_ref

# (name, mask, kernel size, batch, Cin, Cout, H, W) at the sizes; the CPU
# sizes keep the kernel and channel structure at a few pixels.
_GPU_SHAPES = (
    ("mconv_vertical3x3", "vertical", (3, 3), 64, 128, 256, 32, 32),
    ("mconv_horizontal1x3", "horizontal", (1, 3), 64, 128, 256, 32, 32),
    ("mconv_down_shifted2x3", "down_shifted", (2, 3), 64, 160, 160, 32, 32),
)
_CPU_SIZE = {"batch": 2, "height": 8, "width": 8, "channels": 16}


def _bounding_box_conv(spec: MaskSpec):
    """``cudnn_shift``: a dense conv over the active taps' bounding box, or None if the box has holes."""
    rows = [i for i, _ in spec.taps]
    cols = [j for _, j in spec.taps]
    top, bottom, left, right = min(rows), max(rows), min(cols), max(cols)
    if len(spec.taps) != (bottom - top + 1) * (right - left + 1):
        return None
    ai, aj = spec.anchor
    padding = (aj - left, right - aj, ai - top, bottom - ai)  # F.pad order: left, right, top, bottom

    def conv(x, weight, bias):
        return F.conv2d(F.pad(x, padding), weight[:, :, top : bottom + 1, left : right + 1], bias)

    return conv


def _conv_case(
    name: str, mask: str, kernel_size: tuple[int, int], batch: int, c_in: int, c_out: int, height: int, width: int, gated: bool, fused: bool = False
) -> Case:
    """A masked conv (``gated``: with the tanh·σ gate and cond) or, ``fused``, a conv of concat_elu(x) plus a residual."""
    spec = resolve_mask(mask, kernel_size)
    taps = len(spec.taps)
    pixels = batch * height * width
    out_channels = c_out // 2 if gated else c_out
    x_channels = c_in // 2 if fused else c_in

    def make_inputs(device, dtype, generator):
        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

        x = randn(batch, x_channels, height, width).contiguous(memory_format=torch.channels_last)
        weight = randn(c_out, c_in, *kernel_size) / (c_in * taps) ** 0.5
        inputs = (x, weight, randn(c_out))
        if gated:
            return inputs + (randn(batch, c_out),)
        if fused:
            return inputs + (randn(batch, c_out, height, width).contiguous(memory_format=torch.channels_last),)
        return inputs

    def bytes_moved(mode: str, dtype: torch.dtype) -> int:
        weight = taps * c_in * c_out
        forward = pixels * (x_channels + out_channels + (out_channels if fused else 0)) + weight
        # The backward reads the output gradient (and, gated, the pre-activation), x
        # and the weight, and writes the input and weight gradients (the residual's
        # is the output gradient itself).
        backward = pixels * (out_channels + (c_out if gated else 0) + 2 * x_channels) + 2 * weight
        elements = {"forward": forward, "backward": backward, "full": forward + backward}[mode]
        return elements * dtype.itemsize

    def flops(mode: str) -> int:
        one_pass = 2 * pixels * c_in * c_out * taps
        return {"forward": one_pass, "backward": 2 * one_pass, "full": 3 * one_pass}[mode]

    if gated:
        op = lambda x, weight, bias, cond: masked_conv2d_gated(x, weight, bias, spec, cond=cond)  # noqa: E731
        reference = lambda x, weight, bias, cond: masked_conv2d_gated_ref(x, weight, bias, spec, cond=cond)  # noqa: E731
        extra = {}
    elif fused:
        op = lambda x, weight, bias, residual: masked_conv2d(x, weight, bias, spec, residual=residual, input_activation="concat_elu")  # noqa: E731
        reference = lambda x, weight, bias, residual: masked_conv2d_ref(x, weight, bias, spec, residual=residual, input_activation="concat_elu")  # noqa: E731
        extra = {}
    else:
        op = lambda x, weight, bias: masked_conv2d(x, weight, bias, spec)  # noqa: E731
        reference = lambda x, weight, bias: masked_conv2d_ref(x, weight, bias, spec)  # noqa: E731
        shifted = _bounding_box_conv(spec)
        extra = {"cudnn_shift": shifted} if shifted is not None else {}
    config = f"{batch}x{x_channels}x{height}x{width}->{out_channels} {taps}/{kernel_size[0] * kernel_size[1]}"
    return Case(
        family="masked_conv",
        name=name,
        config=config,
        make_inputs=make_inputs,
        op=op,
        reference=reference,
        bytes_moved=bytes_moved,
        flops=flops,
        grad_inputs=(0, 1, 2, 3) if gated or fused else (0, 1, 2),
        extra_providers=extra,
    )


def cases(on_gpu: bool) -> list[Case]:
    """The issue's shapes on a GPU (vertical 3×3, horizontal 1×3, PixelCNN++ 2×3, gated 3×3, fused 2×3), tiny ones on the CPU."""
    shapes = _GPU_SHAPES
    if not on_gpu:
        size = _CPU_SIZE
        shapes = tuple((name, mask, kernel, size["batch"], size["channels"], 2 * size["channels"], size["height"], size["width"]) for name, mask, kernel, *_ in shapes)
    result = [_conv_case(*shape, gated=False) for shape in shapes]
    name, mask, kernel, *sizes = shapes[0]
    result.append(_conv_case("mconv_gated_vertical3x3", mask, kernel, *sizes, gated=True))
    # The same GEMM as mconv_down_shifted2x3, its input concat_elu of half the channels.
    name, mask, kernel, *sizes = shapes[2]
    result.append(_conv_case("mconv_fused_down2x3", mask, kernel, *sizes, gated=False, fused=True))
    return result
