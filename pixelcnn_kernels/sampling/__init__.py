"""Fast exact sampling of the drop-in models (issue 7): ``model.sample(n, method=...)``.

- ``naive`` (in :mod:`pixelcnn_kernels.models.base`): one full forward per value, the oracle;
- ``cached`` (:mod:`.cached_gated`, :mod:`.cached_pixelcnn_pp`): incremental generation
  from per-layer caches. On the ``triton`` and ``cuda`` backends the Gated PixelCNN's
  per-pixel step runs as fused kernels, and PixelCNN++'s as a table-driven step (a
  schedule of the positions each node computes at each pixel, precomputed once, read
  on the device: one fused kernel per gated resnet block, PyTorch gathers and products
  for its shifted and transposed convolutions); both are replayed as one CUDA graph per
  pixel on a GPU; one full forward then checks the draft against the naive draws and
  repairs the rare value drawn otherwise (:mod:`.verify`);
- ``jacobi`` (:mod:`.jacobi`): parallel forwards iterated to the fixed point, optionally
  in windows of rows.

Given the same noise the three return the same image, bit for bit; ``model.last_sample_stats`` (a
:class:`SamplingStats`) records what a call did. The ``pixelcnn-kernels sample`` command
is :mod:`.cli`.
"""

from __future__ import annotations

from collections.abc import Callable

from pixelcnn_kernels.sampling.cached_gated import sample_cached_gated
from pixelcnn_kernels.sampling.cached_pixelcnn_pp import sample_cached_pixelcnn_pp
from pixelcnn_kernels.sampling.common import SamplingProblem, SamplingStats
from pixelcnn_kernels.sampling.jacobi import jacobi_sample
from pixelcnn_kernels.sampling.verify import sample_cached_exactly

__all__ = ["CACHED_SAMPLERS", "SamplingProblem", "SamplingStats", "cached_sampler", "jacobi_sample", "sample_cached_exactly"]

# Model name -> its cached sampler (model, problem, progress) -> full network passes run.
CACHED_SAMPLERS: dict[str, Callable] = {"gated_pixelcnn": sample_cached_gated, "pixelcnn_pp": sample_cached_pixelcnn_pp}


def cached_sampler(model) -> Callable:
    """The cached sampler of ``model``'s class; ValueError when it has none yet."""
    if model.name not in CACHED_SAMPLERS:
        raise ValueError(f"method='cached' is implemented for {sorted(CACHED_SAMPLERS)} only, not yet for {model.name!r}: use 'naive' or 'jacobi'")
    return CACHED_SAMPLERS[model.name]
