"""Benchmark cases of the gated activations (issue 4).

On a GPU, the issue's x (64, 256, 32, 32), split (or concatenated) along the
channels; on the CPU a tiny (2, 16, 8, 8). The floor is the traffic each mode
must move at copy bandwidth: elements read and written per element of x. One more
case gates x channels-last in three colour groups (128 gated channels: 43, 43, 42),
as the colour Gated PixelCNN's horizontal stack does: it should run at the plain
gate's rate.
"""

from __future__ import annotations

import math

import torch

from pixelcnn_kernels.bench.harness import Case
from pixelcnn_kernels.ops.gates import concat_elu, gate_sigmoid, gate_tanh_sigmoid
from pixelcnn_kernels.reference import gates as reference

GPU_SHAPE = (64, 256, 32, 32)
CPU_SHAPE = (2, 16, 8, 8)

# Elements moved per element of x. Gate: forward reads x, writes y (x/2);
# backward reads x and grad (x/2), writes dx. concat_elu: forward reads x,
# writes y (2x); backward reads x and grad (2x), writes dx. "full" is both.
_GATE_TRAFFIC = {"forward": 1.5, "backward": 2.5, "full": 4.0}
_CONCAT_ELU_TRAFFIC = {"forward": 3.0, "backward": 4.0, "full": 7.0}


def _random_x(shape: tuple[int, ...], memory_format: torch.memory_format = torch.contiguous_format):
    def make_inputs(device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor]:
        return ((2 * torch.randn(shape, generator=generator, device=device)).to(dtype).contiguous(memory_format=memory_format),)

    return make_inputs


def _bytes_moved(shape: tuple[int, ...], traffic: dict[str, float]):
    numel = math.prod(shape)
    return lambda mode, dtype: int(traffic[mode] * numel * dtype.itemsize)


def cases(on_gpu: bool) -> list[Case]:
    """The three ops on x of the issue's shape (GPU) or a tiny one (CPU), dim=1, no cond."""
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    config = f"x={shape} dim=1"
    ops = (
        ("gate_tanh_sigmoid", gate_tanh_sigmoid, reference.gate_tanh_sigmoid, _GATE_TRAFFIC),
        ("gate_sigmoid", gate_sigmoid, reference.gate_sigmoid, _GATE_TRAFFIC),
        ("concat_elu", concat_elu, reference.concat_elu, _CONCAT_ELU_TRAFFIC),
    )
    plain = [Case("gates", name, config, _random_x(shape), op, ref, _bytes_moved(shape, traffic)) for name, op, ref, traffic in ops]
    colour = Case(
        "gates", "gate_tanh_sigmoid", f"x={shape} dim=1 groups=3 NHWC", _random_x(shape, torch.channels_last),
        lambda x: gate_tanh_sigmoid(x, 1, None, 3), lambda x: reference.gate_tanh_sigmoid(x, 1, None, 3), _bytes_moved(shape, _GATE_TRAFFIC),
    )  # fmt: skip
    return plain + [colour]
