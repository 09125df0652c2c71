"""Drop-ins for the widely used PyTorch port of PixelCNN++ (pclucas14/pixel-cnn-pp ``utils.py``).

Same signatures and return values, so a training script changes one import::

    from pixelcnn_kernels.compat import discretized_mix_logistic_loss

The losses run the fused :func:`pixelcnn_kernels.discretized_mix_logistic_nll`
(with its validation; the keyword ``check_x=False`` skips the host read of x's
range, which on a GPU waits for the queued work every step); the samplers run
:func:`pixelcnn_kernels.sample_discretized_mix_logistic` unquantized, as the port
samples, with noise from the default generator.
"""

from __future__ import annotations

import torch

from pixelcnn_kernels.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic


def discretized_mix_logistic_loss(x: torch.Tensor, l: torch.Tensor, *, check_x: bool = True) -> torch.Tensor:  # noqa: E741 (the port's name)
    """Summed NLL of RGB images: x ``(B, 3, H, W)`` in [-1, 1], l ``(B, 10K, H, W)`` (NCHW, as the port takes them)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != 3:
        raise ValueError(f"x must have 3 colour channels (use discretized_mix_logistic_loss_1d for 1), got shape {tuple(x.shape)}")
    return discretized_mix_logistic_nll(x, l, 256, reduction="sum", check_x=check_x)


def discretized_mix_logistic_loss_1d(x: torch.Tensor, l: torch.Tensor, *, check_x: bool = True) -> torch.Tensor:  # noqa: E741
    """Summed NLL of grey images: x ``(B, 1, H, W)`` in [-1, 1], l ``(B, 3K, H, W)``."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != 1:
        raise ValueError(f"x must have 1 colour channel (use discretized_mix_logistic_loss for 3), got shape {tuple(x.shape)}")
    return discretized_mix_logistic_nll(x, l, 256, reduction="sum", check_x=check_x)


def _check_nr_mix(l: torch.Tensor, nr_mix: int, per_mixture: int) -> None:  # noqa: E741
    if isinstance(l, torch.Tensor) and l.dim() == 4 and l.shape[1] != per_mixture * nr_mix:
        raise ValueError(f"l must have {per_mixture} * nr_mix = {per_mixture * nr_mix} channels, got shape {tuple(l.shape)}")


def sample_from_discretized_mix_logistic(l: torch.Tensor, nr_mix: int) -> torch.Tensor:  # noqa: E741
    """A continuous RGB sample ``(B, 3, H, W)`` in [-1, 1] from l ``(B, 10 * nr_mix, H, W)``."""
    _check_nr_mix(l, nr_mix, 10)
    return sample_discretized_mix_logistic(l, quantize=False, channels=3)


def sample_from_discretized_mix_logistic_1d(l: torch.Tensor, nr_mix: int) -> torch.Tensor:  # noqa: E741
    """A continuous grey sample ``(B, 1, H, W)`` in [-1, 1] from l ``(B, 3 * nr_mix, H, W)``."""
    _check_nr_mix(l, nr_mix, 3)
    return sample_discretized_mix_logistic(l, quantize=False, channels=1)
