"""The pixel loop the fused cached samplers share: eager steps, or one step replayed as a CUDA graph.

A fused cached sampler (:class:`~pixelcnn_kernels.sampling.cached_gated.FusedCachedGatedPixelCNN`,
:class:`~pixelcnn_kernels.sampling.cached_pixelcnn_pp.TableCachedPixelCNNPlusPlus`)
keeps the pixel being generated in a device tensor and launches the same work on the
same addresses at every pixel, so the step of one pixel, captured once, can be replayed
for all the others with no Python and no host sync per pixel.
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from pixelcnn_kernels.sampling.common import SamplingProblem

__all__ = ["PixelStepSampler"]


class PixelStepSampler:
    """Base of the fused cached samplers: :meth:`sample` runs their pixel steps in raster order.

    Holds the run's ``model``, ``problem`` and the pixel being generated, ``pixel``
    (int64 (1,) on the images' device, p = i·W + j), and draws and writes a pixel's
    values with device indices (:meth:`draw_pixel`). A subclass defines
    :meth:`pixel_step` and, if it has per-row work, :meth:`start_row`.
    """

    def __init__(self, model, problem: SamplingProblem):
        images = problem.images
        batch, channels, height, width = images.shape
        self.model, self.problem = model, problem
        self.pixel = torch.zeros(1, dtype=torch.int64, device=images.device)
        # (B, C or K, H·W), read and written at the pixel: views of the images, contiguous copies
        # of known and noise where they are not contiguous (a fused draw reads them by index).
        self.images_flat = images.view(batch, channels, height * width)
        self.known_flat = problem.known.reshape(batch, height * width).contiguous()
        noise = problem.noise
        self.noise_flat = noise.flatten(2).contiguous() if isinstance(noise, torch.Tensor) else tuple(u.flatten(2) for u in noise)

    def draw_pixel(self, logits: torch.Tensor, channels: slice) -> torch.Tensor:
        """Draws ``channels`` of the pixel from the head's ``logits`` at its noise; returns the values (B, c, 1).

        The values are written to the images, except where the pixel is known, where
        they are the known values (no host sync: the known mask is read on the device).
        """
        pixel = self.pixel
        noise_flat = self.noise_flat
        noise = noise_flat.index_select(2, pixel)[..., None] if isinstance(noise_flat, torch.Tensor) else tuple(u.index_select(2, pixel)[..., None] for u in noise_flat)
        drawn = self.model.draw_values(logits, noise)[:, channels, :, 0]
        images = self.images_flat[:, channels]
        keep = self.known_flat.index_select(1, pixel)[:, :, None]
        values = torch.where(keep, images.index_select(2, pixel), drawn)
        images.index_copy_(2, pixel, values)
        return values

    def start_row(self, row: int) -> None:
        """Work done once per row, eagerly, before the row's first pixel (default: none)."""

    def pixel_step(self, draw: bool = True) -> None:
        """Generates the pixel at ``pixel`` (``draw=False``: a pixel every image knows) and adds 1 to ``pixel``."""
        raise NotImplementedError

    def sample(self, progress: bool, cuda_graph: bool | None = None) -> bool:
        """Fills ``problem.images`` pixel by pixel; returns whether the steps after the first ran as a CUDA graph.

        ``cuda_graph``: True captures one pixel step in a CUDA graph after running the
        first pixel eagerly, and replays it for the others (raises where the capture
        fails); False runs every step eagerly; None (default): a graph on a CUDA
        device, falling back to eager steps, with a warning, where the capture fails.
        Both give the same images (the same kernels on the same values).
        """
        problem = self.problem
        if cuda_graph and not problem.images.is_cuda:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {problem.images.device}")
        strict = bool(cuda_graph)
        capture = problem.images.is_cuda if cuda_graph is None else cuda_graph
        all_known = problem.pixels_all_known()
        graph = None
        with tqdm(total=problem.height * problem.width, desc="sampling (cached, fused)", unit="pixel", disable=not progress) as bar:
            for i in range(problem.height):
                self.start_row(i)
                for j in range(problem.width):
                    if graph is not None:
                        graph.replay()
                    elif capture:
                        graph = self._step_and_capture(strict)
                        capture = graph is not None
                    else:
                        self.pixel_step(draw=not all_known[i][j])
                    bar.update()
        return graph is not None

    def _step_and_capture(self, strict: bool) -> torch.cuda.CUDAGraph | None:
        """Runs this pixel's step eagerly, then captures the next pixel's step in a CUDA graph.

        Both on one side stream, so that whatever the step's ops initialise lazily
        (Triton modules, cuBLAS and cuDNN state for that stream) exists before the
        capture. Returns None, after a warning, where the capture fails and not ``strict``.
        """
        device = self.pixel.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.pixel_step()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                self.pixel_step()
        except RuntimeError as error:
            if strict:
                raise
            warnings.warn(f"cached sampling: capturing the pixel step in a CUDA graph failed, running it without one: {error}", RuntimeWarning, stacklevel=3)
            graph = None
        torch.cuda.current_stream(device).wait_stream(stream)
        return graph
