"""Reference masked convolution: a dense ``F.conv2d`` on the masked weight.

This is the formulation the kernels replace (it multiplies every masked-out tap
by zero); it is the source of truth for tests and the ``eager`` benchmark
provider, and runs in any dtype (float64 included) on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelcnn_kernels.masks import MaskSpec, resolve_mask
from pixelcnn_kernels.reference.gates import gate_sigmoid, gate_tanh_sigmoid

# The gates of masked_conv2d_gated, by name (the gates family's references).
GATE_FUNCTIONS = {"tanh_sigmoid": gate_tanh_sigmoid, "sigmoid": gate_sigmoid}
GATES = tuple(GATE_FUNCTIONS)


def masked_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
) -> torch.Tensor:
    """Stride-1, same-size masked convolution of ``x`` (N, Cin, H, W).

    ``weight`` is (Cout, Cin, kh, kw) as in ``nn.Conv2d``; it is multiplied by the
    spec's 0/1 weight mask, so the gradient of a masked-out weight is exactly zero.
    The input is zero-padded by the spec's (possibly asymmetric) padding.
    """
    out_channels, in_channels, kh, kw = weight.shape
    spec = resolve_mask(mask, (kh, kw), color_groups)
    weight_mask = spec.weight_mask(out_channels, in_channels, dtype=weight.dtype, device=weight.device)
    top, bottom, left, right = spec.padding(dilation)
    padded = F.pad(x, (left, right, top, bottom))
    return F.conv2d(padded, weight * weight_mask, bias, dilation=dilation)


def masked_conv2d_gated_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
    gate: str = "tanh_sigmoid",
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gate(masked_conv2d_ref(x, weight, bias) + cond[:, :, None, None])``; cond is (N, Cout).

    The gate splits the channels into halves a (first), b (second) and returns
    tanh(a)·σ(b) (``"tanh_sigmoid"``) or a·σ(b) (``"sigmoid"``).
    """
    return GATE_FUNCTIONS[gate](masked_conv2d_ref(x, weight, bias, mask, dilation, color_groups), 1, cond)
