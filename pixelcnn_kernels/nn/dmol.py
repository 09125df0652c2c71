"""``nn.Module`` wrapper of the discretized logistic mixture loss."""

from __future__ import annotations

import torch
from torch import nn

from pixelcnn_kernels.ops.dmol import REDUCTIONS, check_num_bins, discretized_mix_logistic_nll


class DiscretizedMixLogisticNLL(nn.Module):
    """PixelCNN++'s discretized logistic mixture NLL as a loss module.

    ``forward(x, logits)`` is :func:`pixelcnn_kernels.discretized_mix_logistic_nll`
    with this module's ``num_bins``, ``reduction`` (``"none"``, ``"sum"``,
    ``"mean"`` or ``"bpd"``; default ``"mean"``, as torch's losses) and ``check_x``
    (False: no host read of x's range, which on a GPU waits for the queued work).
    """

    def __init__(self, num_bins: int = 256, reduction: str = "mean", *, check_x: bool = True):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(check_x, bool):
            raise TypeError(f"check_x must be a bool, got {type(check_x).__name__}")
        self.num_bins = check_num_bins(num_bins)
        self.reduction = reduction
        self.check_x = check_x

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return discretized_mix_logistic_nll(x, logits, self.num_bins, self.reduction, check_x=self.check_x)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, reduction={self.reduction!r}" + ("" if self.check_x else ", check_x=False")
