"""What every sampler shares: the validated problem, the statistics of a run, two helpers.

:meth:`pixelcnn_kernels.models.PixelCNNModel.sample` checks its arguments once and hands
a :class:`SamplingProblem` to the sampler that ``method`` names (``naive`` in
``models/base.py``, :mod:`~pixelcnn_kernels.sampling.cached_gated`,
:mod:`~pixelcnn_kernels.sampling.cached_pixelcnn_pp`, :mod:`~pixelcnn_kernels.sampling.jacobi`); the sampler fills ``problem.images`` in place
and returns the number of full network passes it ran. ``sample`` then records a
:class:`SamplingStats` as ``model.last_sample_stats``.
"""

from __future__ import annotations

import dataclasses

import torch

from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.reference.masked_conv import masked_weight


@dataclasses.dataclass
class SamplingProblem:
    """One ``sample`` call, its arguments checked.

    - ``images``: (n, C, H, W) int64, the prefix (or zeros) to be filled in place;
    - ``known``: (n, H, W) bool, the pixels never resampled (all False without a prefix);
    - ``noise``: the uniform noise of every value (the layout :meth:`~PixelCNNModel.sample`
      documents): a (n, C, H, W) tensor (softmax head) or a ``(u_mix, u_logistic)`` pair (DMOL);
    - ``cond``: class labels (n,) or None; ``class_vector``: their one-hot (n, num_classes)
      in the parameters' dtype, or None;
    - ``skip``: (H, W) bool or None: the pixels the samplers compute nothing at; None
      (the default): the pixels every image knows. A skipped pixel must be known in
      every image; a known one need not be skipped (its values are kept all the same).
      The repair of a cached draft (:mod:`~pixelcnn_kernels.sampling.verify`) reruns
      the cached sampler with more pixels known but the first run's ``skip``, so the
      same schedule (PixelCNN++'s tables) serves it.
    """

    images: torch.Tensor
    known: torch.Tensor
    noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    cond: torch.Tensor | None
    class_vector: torch.Tensor | None
    skip: torch.Tensor | None = None

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    def _noise_at(self, index):
        """``noise[index]``, in the layout of ``noise`` (a tensor, or the DMOL pair)."""
        if isinstance(self.noise, torch.Tensor):
            return self.noise[index]
        return tuple(u[index] for u in self.noise)

    def noise_window(self, row: int, col: int):
        """The noise of pixel (row, col) as 1×1 windows, in the layout of ``noise``."""
        return self._noise_at((slice(None), slice(None), slice(row, row + 1), slice(col, col + 1)))

    def subproblem(self, images: torch.Tensor, known: torch.Tensor) -> SamplingProblem:
        """The problem of the images at the indices ``images`` only, with ``known`` (their own) and this ``skip_mask``."""

        def rows(t):
            return None if t is None else t[images]

        return SamplingProblem(self.images[images], known, self._noise_at(images), rows(self.cond), rows(self.class_vector), self.skip_mask())

    def steps(self, steps_per_pixel: int, rows: slice = slice(None)) -> int:
        """The naive sampler's steps in ``rows``: ``steps_per_pixel`` for each pixel not known in every image."""
        return int((~self.known[:, rows].all(dim=0)).sum()) * steps_per_pixel

    def skip_mask(self) -> torch.Tensor:
        """(H, W) bool: ``skip``, by default the pixels every image knows."""
        return self.known.all(dim=0) if self.skip is None else self.skip

    def skipped_pixels(self) -> list[list[bool]]:
        """[row][col]: :meth:`skip_mask` read to the host once (not per step)."""
        return self.skip_mask().tolist()


@dataclasses.dataclass(frozen=True)
class SamplingStats:
    """What the last :meth:`~pixelcnn_kernels.models.PixelCNNModel.sample` call did (``model.last_sample_stats``).

    - ``method``: the sampler (``"naive"``, ``"cached"`` or ``"jacobi"``); ``block_rows``:
      the Jacobi window height, None for the whole image;
    - ``values``: the sequential steps the naive sampler takes for this problem: the
      values (the pixels, for the DMOL head, which draws a pixel's channels together)
      not known in every image, at most H·W·C;
    - ``network_passes``: full forward passes of the network: ``values`` for ``naive``,
      the Jacobi iterations for ``jacobi`` (at most ``values``); for ``cached`` (which
      computes one pixel's activations per step) the forwards that check and repair its
      draft, 1 when the draft was exact;
    - ``seconds``: wall time of the sampling loop (the device synchronised at its end);
    - ``redrawn_values``: ``cached`` only: the values that ended other than drafted
      (:mod:`~pixelcnn_kernels.sampling.verify`).
    """

    method: str
    images: int
    values: int
    network_passes: int
    seconds: float
    block_rows: int | None = None
    redrawn_values: int = 0


def write_values(problem: SamplingProblem, row: int, col: int, channels: slice, drawn: torch.Tensor) -> None:
    """Stores ``drawn`` (B, len(channels)) at pixel (row, col) of ``problem.images``, except in images that know the pixel."""
    keep = problem.known[:, row, col, None]
    problem.images[:, channels, row, col] = torch.where(keep, problem.images[:, channels, row, col], drawn)


def masked_operands(conv: MaskedConv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s masked weight and its bias, in ``dtype`` (what the reference masked conv computes with)."""
    return masked_weight(conv.weight.to(dtype), conv.spec), None if conv.bias is None else conv.bias.to(dtype)
