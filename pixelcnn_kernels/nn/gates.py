"""``nn.Module`` wrappers of the gated activations (:mod:`pixelcnn_kernels.ops.gates`)."""

from __future__ import annotations

import torch
from torch import nn

from pixelcnn_kernels.ops.gates import concat_elu, gate_sigmoid, gate_tanh_sigmoid
from pixelcnn_kernels.utils import check_int


class _SplitGate(nn.Module):
    """A gate over the two halves of its input along ``dim``; subclasses name the op."""

    _gate = None  # the op, a staticmethod set by each subclass

    def __init__(self, dim: int = 1, groups: int = 1):
        super().__init__()
        self.dim = check_int(dim, "dim")
        self.groups = check_int(groups, "groups", 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._gate(x, self.dim, cond, self.groups)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (f", groups={self.groups}" if self.groups > 1 else "")


class GateTanhSigmoid(_SplitGate):
    """``tanh(a) * sigmoid(b)`` of the halves of ``x + cond`` along ``dim``: see :func:`~pixelcnn_kernels.gate_tanh_sigmoid`.

    ``forward(x, cond=None)``: ``x`` with an even size along ``dim``; ``cond``
    an optional ``(x.shape[0], x.shape[dim])`` per-(batch, channel) bias. ``groups``:
    the halves in colour groups, [a_1 b_1 | a_2 b_2 | ...] (a colour-masked conv's output).
    """

    _gate = staticmethod(gate_tanh_sigmoid)


class GateSigmoid(_SplitGate):
    """``a * sigmoid(b)`` of the halves of ``x + cond`` along ``dim``: see :func:`~pixelcnn_kernels.gate_sigmoid`.

    ``forward(x, cond=None)`` as in :class:`GateTanhSigmoid`.
    """

    _gate = staticmethod(gate_sigmoid)


class ConcatELU(nn.Module):
    """``elu(cat([x, -x], dim))``: see :func:`~pixelcnn_kernels.concat_elu`."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = check_int(dim, "dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return concat_elu(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
