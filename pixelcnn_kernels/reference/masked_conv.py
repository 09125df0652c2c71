"""Reference masked convolution: a dense ``F.conv2d`` on the masked weight.

This is the formulation the kernels replace (it multiplies every masked-out tap
by zero, materialises concat_elu's 2C-channel input and adds the residual in a
pass of its own); it is the source of truth for tests and the ``eager``
benchmark provider, and runs in any dtype (float64 included) on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelcnn_kernels.masks import MaskSpec, resolve_mask
from pixelcnn_kernels.reference.gates import concat_elu, gate_sigmoid, gate_tanh_sigmoid

# The gates of masked_conv2d_gated, by name (the gates family's references).
GATE_FUNCTIONS = {"tanh_sigmoid": gate_tanh_sigmoid, "sigmoid": gate_sigmoid}
GATES = tuple(GATE_FUNCTIONS)
# The activations the convolutions can apply to x as they read it (``input_activation``).
INPUT_ACTIVATIONS = ("concat_elu",)


def _conv_input(x: torch.Tensor, input_activation: str | None, dropout_keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """What the convolution reads: ``x``, or concat_elu(x) = elu(cat([x, -x], 1)) (2C channels),
    then with ``dropout_keep`` (boolean, that shape) dropout: kept elements times 1 / (1 - dropout_p)
    (one rounding to x's dtype, as ``nn.Dropout``), the others 0."""
    activated = x if input_activation is None else concat_elu(x, 1)
    if dropout_keep is None:
        return activated
    # activated · keep · scale in one pass: the second half of nn.Dropout's own forward
    # (native_dropout draws the mask, then scales by it with this op), and differentiable.
    return torch.ops.aten.native_dropout_backward(activated, dropout_keep, dropout_scale(dropout_p))


def dropout_scale(dropout_p: float) -> float:
    """What dropout multiplies kept elements by: 1 / (1 - p), in double (the ops round it to the compute dtype)."""
    return 1.0 / (1.0 - dropout_p)


def draw_dropout_keep(x: torch.Tensor, channels: int, dropout_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean (N, channels, H, W) dropout mask for the convolutions' ``dropout_keep``: each element True
    (kept) with probability 1 - ``dropout_p``, drawn on x's device.

    Laid out channels-last, as the kernels read it (they take it without a copy); one byte per element.
    """
    n, _, h, w = x.shape
    return torch.empty((n, h, w, channels), dtype=torch.bool, device=x.device).bernoulli_(1.0 - dropout_p, generator=generator).permute(0, 3, 1, 2)


def masked_weight(weight: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """``weight`` (Cout, Cin, kh, kw) with the weights ``spec`` masks out set to zero.

    A fill, not a multiply by the 0/1 mask: the masked-out weights and their gradients are
    exact zeros even where they or the output's gradient are not finite, as in the kernels,
    which never read them.
    """
    hidden = spec.weight_mask(weight.shape[0], weight.shape[1], dtype=torch.bool, device=weight.device).logical_not()
    return weight.masked_fill(hidden, 0)


def masked_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
    *,
    residual: torch.Tensor | None = None,
    input_activation: str | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Stride-1, same-size masked convolution of ``x`` (N, C, H, W), plus ``residual``.

    ``weight`` is (Cout, Cin, kh, kw) as in ``nn.Conv2d``; its masked-out weights are
    replaced by zeros (:func:`masked_weight`), so their gradient is exactly zero.
    The convolution reads ``x`` (Cin = C) or, with ``input_activation="concat_elu"``,
    concat_elu(x) (Cin = 2C), zero-padded by the spec's (possibly asymmetric)
    padding; with ``dropout_keep`` (a boolean (N, Cin, H, W) tensor, True = kept) that
    input passes through dropout of rate ``dropout_p`` first (PixelCNN++'s concat_elu →
    dropout → conv). ``residual`` (N, Cout, H, W) or None is added to the output, after the bias.
    """
    spec = resolve_mask(mask, tuple(weight.shape[2:]), color_groups)
    top, bottom, left, right = spec.padding(dilation)
    padded = F.pad(_conv_input(x, input_activation, dropout_keep, dropout_p), (left, right, top, bottom))
    out = F.conv2d(padded, masked_weight(weight, spec), bias, dilation=dilation)
    return out if residual is None else out + residual


def masked_conv2d_gated_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: str | torch.Tensor | MaskSpec = "B",
    dilation: int = 1,
    color_groups: int = 1,
    gate: str = "tanh_sigmoid",
    cond: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    input_activation: str | None = None,
    addend: torch.Tensor | None = None,
    return_preactivation: bool = False,
    gate_groups: int = 1,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``gate(pre + cond[:, :, None, None]) + residual`` with ``pre = masked_conv2d_ref(x, weight, bias) + addend``.

    The gate splits the channels into halves a (first), b (second) and returns
    tanh(a)·σ(b) (``"tanh_sigmoid"``) or a·σ(b) (``"sigmoid"``); with ``gate_groups``
    > 1 it does so within each group (colour-major [a_R b_R | a_G b_G | a_B b_B], see
    :mod:`pixelcnn_kernels.reference.gates`). ``cond`` (N, Cout),
    ``addend`` (N, Cout, H, W) and ``residual`` (N, Cout / 2, H, W) may each be None.
    ``input_activation``, ``dropout_keep`` and ``dropout_p`` as in :func:`masked_conv2d_ref`. With ``return_preactivation``
    returns ``(out, pre)``: the layer that also feeds ``pre`` elsewhere (Gated
    PixelCNN's vertical stack) gets it from the same call.
    """
    preactivation = masked_conv2d_ref(
        x, weight, bias, mask, dilation, color_groups, residual=addend, input_activation=input_activation, dropout_keep=dropout_keep, dropout_p=dropout_p
    )
    out = GATE_FUNCTIONS[gate](preactivation, 1, cond, gate_groups)
    if residual is not None:
        out = out + residual
    return (out, preactivation) if return_preactivation else out
