"""Reference gated activations: the definitions the kernels are tested against.

- ``gate_tanh_sigmoid(x, dim, cond, groups)``: Gated PixelCNN's ``tanh(a) * sigmoid(b)``;
- ``gate_sigmoid(x, dim, cond, groups)``: PixelCNN++'s gated-resnet ``a * sigmoid(b)``;
- ``concat_elu(x, dim)``: PixelCNN++'s ``elu(cat([x, -x], dim))``.

``a, b = x.chunk(2, dim)``: ``a`` is the first half of ``x`` along ``dim``,
``b`` the second. ``cond``, optional, is a per-(batch, channel) bias of shape
``(x.shape[0], x.shape[dim])`` (class-conditional PixelCNN's ``V h`` term)
added to ``x`` before the split, broadcast over every other dimension: ``a``
gets ``cond[:, :C]`` and ``b`` gets ``cond[:, C:]``, where ``C = x.shape[dim] // 2``.

``groups`` > 1 (Gated PixelCNN's colour groups): the 2C channels along ``dim`` are
``groups`` contiguous blocks, each split into halves, [a_1 b_1 | a_2 b_2 | ...],
block g twice output group g (:func:`~pixelcnn_kernels.masks.color_group_size` of
C: 128 outputs in groups of 43, 43, 42 from blocks of 86, 86, 84); the output is the
blocks' gates in order, [gate_1 | gate_2 | ...]. ``cond`` is in x's channel order.

Plain PyTorch in the input's dtype, written for clarity; autograd gives the
gradients. Arguments are not validated here (the public ops do that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixelcnn_kernels.masks import halves_first_channels


def _gate_halves(x: torch.Tensor, dim: int, cond: torch.Tensor | None, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``: the two halves of ``x + cond`` along ``dim``, in ``groups`` blocks."""
    if cond is not None:
        # (B, 2C) -> (B, 1, .., 2C, 1, ..): batch on dim 0, channels on `dim`.
        shape = [1] * x.dim()
        shape[0], shape[dim] = cond.shape
        x = x + cond.reshape(shape)
    if groups == 1:
        return x.chunk(2, dim)
    halves_first = halves_first_channels(x.shape[dim] // 2, groups).to(x.device)
    return x.index_select(dim, halves_first).chunk(2, dim)


def gate_tanh_sigmoid(x: torch.Tensor, dim: int = 1, cond: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """``tanh(a) * sigmoid(b)`` with ``a, b = (x + cond).chunk(2, dim)`` (in ``groups`` blocks); the result has half of ``x``'s size along ``dim``."""
    a, b = _gate_halves(x, dim, cond, groups)
    return torch.tanh(a) * torch.sigmoid(b)


def gate_sigmoid(x: torch.Tensor, dim: int = 1, cond: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """``a * sigmoid(b)`` with ``a, b = (x + cond).chunk(2, dim)`` (in ``groups`` blocks); the result has half of ``x``'s size along ``dim``."""
    a, b = _gate_halves(x, dim, cond, groups)
    return a * torch.sigmoid(b)


def concat_elu(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``elu(cat([x, -x], dim))``; the result has twice ``x``'s size along ``dim``."""
    return F.elu(torch.cat([x, -x], dim))
