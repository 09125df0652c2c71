"""Benchmark cases of the fused layers and the drop-in models (issues 5 and 6).

Every case times a module twice: as built (the fused layers, on the ``triton`` or
``cuda`` backend) and as the reference-built twin (the same parameters with
:data:`~pixelcnn_kernels.reference.layers.REFERENCE_OPS`: the ``eager`` provider, and
``compile`` = ``torch.compile`` of it). The parameters are inputs of the timed call
(through ``torch.func.functional_call``), so ``full`` mode (forward + backward to the
inputs) is a training step's forward and backward; for the models it is the whole
training step issue 6 times: forward, backward and a fused AdamW update (the same
optimiser for every provider).

- layers (issue 5): one ``GatedMaskedConv2d`` of 128 channels (dilation 2, class
  conditioning) and one PixelCNN++ ``GatedResnet`` of 160 channels (down-right stream,
  two skip streams), at 32×32, batch 64, on channels-last activations (the layout the
  drop-in models run in: the kernels' own, and cuDNN's fast one for the reference);
- models (issue 6): Gated PixelCNN, 7 gated layers of 128 channels (RGB colour groups
  of 43, 43 and 42, :func:`~pixelcnn_kernels.masks.color_group_size`), dilations 1,2,1,4,1,2,1,
  RGB 32×32, 256-way softmax, batch 64; PixelCNN++ (nr_filters 160, nr_resnet 5,
  10 logistics), RGB 32×32, batch 64 (dropout 0.5, in training mode).

The models run in the benchmark dtype (parameters included). Images/s is
``batch / median time`` of the ``full`` rows. On the CPU the same cases run at tiny sizes.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pixelcnn_kernels.bench.harness import Case
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus, TrainingLoss
from pixelcnn_kernels.nn.layers import GatedMaskedConv2d, GatedResnet
from pixelcnn_kernels.reference.layers import REFERENCE_OPS, OpSet, set_ops
from pixelcnn_kernels.utils import channels_last

# A backward pass costs about twice the forward's arithmetic.
BACKWARD_FLOP_FACTOR = 2
# Parameter-sized reads and writes of an AdamW update: parameter, gradient and two moments in, three out.
ADAMW_PASSES = 7


class _Twins:
    """A module and its reference-built twin, per (device, dtype), built once from one seed."""

    def __init__(self, build: Callable[[], nn.Module]):
        self.build = build
        self.cache: dict = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        device = torch.device(device)
        key = (device.type, device.index or 0, dtype)  # "cuda" and a tensor's "cuda:0" are one device
        if key not in self.cache:
            torch.manual_seed(0)
            fused = self.build().to(device, dtype)
            self.cache[key] = (fused, set_ops(copy.deepcopy(fused), REFERENCE_OPS))
        return self.cache[key]


def _functional(twins: _Twins, which: int, data_count: int) -> Callable:
    """Calls twin ``which`` with data inputs ``args[:data_count]`` and parameters ``args[data_count:]``."""

    def call(*args):
        data, params = args[:data_count], args[data_count:]
        module = twins.get(data[0].device, params[0].dtype)[which]
        names = [name for name, _ in module.named_parameters()]
        return torch.func.functional_call(module, dict(zip(names, params)), data)

    return call


def _count_flops(module: nn.Module, data: tuple) -> int:
    """Forward FLOPs of ``module`` on ``data``, counting only the active taps of the masked convs.

    The module runs on the meta device with an op set whose masked convolutions add
    ``2·N·H·W·Cout·Cin·taps`` to the count and return an empty output of the right
    shape (masked-out taps are not work); ``FlopCounterMode`` counts every other op
    (strided and transposed convs, the 1×1 links computed by ``F.linear``).
    """
    masked_flops = 0

    def count(x, weight, mask, out_channels):
        nonlocal masked_flops
        batch, _, height, width = x.shape
        # The weight's input channels: 2C when the conv reads concat_elu of a C-channel x.
        masked_flops += 2 * batch * height * width * weight.shape[0] * weight.shape[1] * len(mask.taps)
        return x.new_empty(batch, out_channels, height, width)

    def masked_conv2d(x, weight, bias=None, mask=None, dilation=1, color_groups=1, *, residual=None, input_activation=None, dropout_keep=None, dropout_p=0.0):
        return count(x, weight, mask, weight.shape[0])

    def masked_conv2d_gated(
        x, weight, bias=None, mask=None, dilation=1, color_groups=1, gate="tanh_sigmoid", cond=None, *,
        residual=None, input_activation=None, addend=None, return_preactivation=False, gate_groups=1, dropout_keep=None, dropout_p=0.0,
    ):  # fmt: skip
        out = count(x, weight, mask, weight.shape[0] // 2)
        return (out, out.new_empty(out.shape[0], weight.shape[0], *out.shape[2:])) if return_preactivation else out

    counting_ops = OpSet(**{**REFERENCE_OPS.__dict__, "masked_conv2d": masked_conv2d, "masked_conv2d_gated": masked_conv2d_gated})
    meta_module = set_ops(copy.deepcopy(module).to("meta"), counting_ops)
    meta_data = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in data)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_module(*meta_data)
    return masked_flops + counter.get_total_flops()


def _case(name: str, config: str, twins: _Twins, make_data: Callable, grad_data: tuple[int, ...], modes: tuple[str, ...], train_step: bool = False) -> Case:
    """A case timing ``twins`` on ``make_data(device, dtype, generator)`` with the parameters as extra inputs;
    with ``train_step`` a ``full`` call is a training step: forward, backward and a fused AdamW update."""
    data_count = len(make_data(torch.device("meta"), torch.float32, None))

    def make_inputs(device, dtype, generator):
        fused, _ = twins.get(device, dtype)
        return make_data(device, dtype, generator) + tuple(p.detach().clone() for p in fused.parameters())

    @functools.cache
    def forward_flops() -> int:
        fused, _ = twins.get(torch.device("cpu"), torch.float32)
        return _count_flops(fused, make_data(torch.device("meta"), torch.float32, None))

    def flops(mode: str) -> int:
        return forward_flops() * {"forward": 1, "backward": BACKWARD_FLOP_FACTOR, "full": 1 + BACKWARD_FLOP_FACTOR}[mode]

    def bytes_moved(mode: str, dtype: torch.dtype) -> int:
        # The least traffic: read the data and the parameters once; a gradient pass also writes a gradient of each.
        fused, _ = twins.get(torch.device("cpu"), torch.float32)
        param_bytes = sum(p.numel() for p in fused.parameters()) * dtype.itemsize
        data_bytes = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in make_data(torch.device("meta"), dtype, None))
        # AdamW reads each parameter, its gradient and two moments and writes three of them back.
        update_passes = ADAMW_PASSES if train_step and mode == "full" else 0
        return data_bytes + param_bytes * ((1 if mode == "forward" else 2) + update_passes)

    param_indices = tuple(range(data_count, data_count + sum(1 for _ in twins.get(torch.device("cpu"), torch.float32)[0].parameters())))
    return Case(
        family="models",
        name=name,
        config=config,
        make_inputs=make_inputs,
        op=_functional(twins, 0, data_count),
        reference=_functional(twins, 1, data_count),
        bytes_moved=bytes_moved,
        flops=flops,
        grad_inputs=grad_data + param_indices,
        modes=modes,
        optimized_inputs=param_indices if train_step else (),
    )


def _randn(device, dtype, generator, *shape):
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def _images(device, generator, num_bins, *shape):
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=torch.long)
    return torch.randint(0, num_bins, shape, device=device, generator=generator)


def cases(on_gpu: bool) -> list[Case]:
    """The issue's layer and training-step workloads on a GPU; tiny versions on the CPU."""
    batch, size = (64, 32) if on_gpu else (2, 8)
    gated_channels, resnet_channels, hidden = (128, 160, 128) if on_gpu else (6, 4, 8)
    nr_resnet, nr_filters = (5, 160) if on_gpu else (1, 4)
    classes = 10

    def activations(device, dtype, generator, channels):
        return channels_last(_randn(device, dtype, generator, batch, channels, size, size))

    def gated_data(device, dtype, generator):
        v, h = (activations(device, dtype, generator, gated_channels) for _ in range(2))
        return (v, h, _randn(device, dtype, generator, batch, classes))

    def resnet_data(device, dtype, generator):
        return (activations(device, dtype, generator, resnet_channels), activations(device, dtype, generator, 2 * resnet_channels))

    def rgb_images(device, dtype, generator):
        return (_images(device, generator, 256, batch, 3, size, size),)

    gated_pixelcnn = _Twins(lambda: TrainingLoss(GatedPixelCNN(3, hidden=hidden, layers=7, kernel_size=3, dilations=[1, 2, 1, 4, 1, 2, 1])))
    pixelcnn_pp = _Twins(lambda: TrainingLoss(PixelCNNPlusPlus(nr_resnet=nr_resnet, nr_filters=nr_filters, nr_logistic_mix=10)))
    every_mode = ("forward", "backward", "full")
    return [
        _case("gated_masked_conv2d", f"{batch}x{gated_channels}x{size}x{size} d2 cond", _Twins(lambda: GatedMaskedConv2d(gated_channels, 3, 2, cond_channels=classes)), gated_data, (0, 1, 2), every_mode),
        _case("gated_resnet", f"{batch}x{resnet_channels}x{size}x{size} ul skip2", _Twins(lambda: GatedResnet(resnet_channels, "down_right", 2, dropout=0.0)), resnet_data, (0, 1), every_mode),
        _case("gated_pixelcnn_train", f"B{batch} 3x{size}x{size} h{hidden} L7 softmax", gated_pixelcnn, rgb_images, (), ("forward", "full"), train_step=True),
        _case("pixelcnn_pp_train", f"B{batch} 3x{size}x{size} F{nr_filters} R{nr_resnet} K10", pixelcnn_pp, rgb_images, (), ("forward", "full"), train_step=True),
    ]
