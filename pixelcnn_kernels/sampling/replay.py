"""The pixel loop the fused cached samplers share: eager steps, or steps replayed as CUDA graphs.

A fused cached sampler (:class:`~pixelcnn_kernels.sampling.cached_gated.FusedCachedGatedPixelCNN`,
:class:`~pixelcnn_kernels.sampling.cached_pixelcnn_pp.TableCachedPixelCNNPlusPlus`)
keeps the pixel being generated in a device tensor and launches the same work on the
same addresses at every pixel, so the step of one pixel, captured once, can be replayed
for all the others with no Python and no host sync per pixel. A sampler with per-row
work that keeps its row in a device tensor too (:attr:`PixelStepSampler.graph_rows`)
has that work captured the same way, at the second row, and replayed from the third.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pixelcnn_kernels.ops.sampling import bin_inputs
from pixelcnn_kernels.sampling.common import SamplingProblem

__all__ = ["PixelStepSampler"]


class PixelStepSampler:
    """Base of the fused cached samplers: :meth:`sample` runs their pixel steps in raster order.

    Holds the run's ``model``, ``problem`` and the pixel being generated, ``pixel``
    (int64 (1,) on the images' device, p = i·W + j), and the images, known mask and
    noise laid out (B, ·, H·W) and the bins' network inputs for the fused draws. A subclass defines
    :meth:`pixel_step` and, if it has per-row work, :meth:`start_row`.
    """

    # Whether start_row launches the same work on the same addresses at every row after the
    # first (its row a device tensor), so that one CUDA graph can replay it for those rows.
    graph_rows = False

    def __init__(self, model, problem: SamplingProblem):
        images = problem.images
        batch, channels, height, width = images.shape
        self.model, self.problem = model, problem
        self.pixel = torch.zeros(1, dtype=torch.int64, device=images.device)
        # (B, C or K, H·W), read and written at the pixel by the fused draws
        # (pixelcnn_kernels.ops.sampling): a view of the images, contiguous known and noise.
        self.images_flat = images.view(batch, channels, height * width)
        self.known_flat = problem.known.reshape(batch, height * width).contiguous()
        noise = problem.noise
        self.noise_flat = noise.flatten(2).contiguous() if isinstance(noise, torch.Tensor) else tuple(u.flatten(2).contiguous() for u in noise)
        # Each bin's network input, the table the fused draws write the network's input from.
        self.bin_inputs = bin_inputs(model.num_bins, model.parameter_dtype(), images.device)

    def start_row(self, row: int) -> None:
        """Work done once per row ``row``, before the row's first pixel (default: none); see :attr:`graph_rows`."""

    def pixel_step(self, draw: bool = True) -> None:
        """Generates the pixel at ``pixel`` (``draw=False``: a pixel every image knows) and adds 1 to ``pixel``."""
        raise NotImplementedError

    def sample(self, progress: bool, cuda_graph: bool | None = None) -> bool:
        """Fills ``problem.images`` pixel by pixel; returns whether the pixel steps after the first ran as a CUDA graph.

        ``cuda_graph``: True captures one pixel step in a CUDA graph after running the
        first pixel eagerly, and replays it for the others (with :attr:`graph_rows`, the
        row step too, from the third row on), raising where a capture fails; False runs
        every step eagerly; None (default): graphs on a CUDA device, falling back to
        eager steps, with a warning, where a capture fails. All give the same images
        (the same kernels on the same values).
        """
        problem = self.problem
        if cuda_graph and not problem.images.is_cuda:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {problem.images.device}")
        strict = bool(cuda_graph)
        capture = problem.images.is_cuda if cuda_graph is None else cuda_graph
        skipped = problem.skipped_pixels()
        device = problem.images.device
        rows = _ReplayedStep(self.start_row, "row", device, capture and self.graph_rows, strict)
        pixels = _ReplayedStep(self.pixel_step, "pixel", device, capture, strict)
        with tqdm(total=problem.height * problem.width, desc="sampling (cached, fused)", unit="pixel", disable=not progress) as bar:
            for i in range(problem.height):
                if i == 0:
                    self.start_row(0)  # the first row has no row above it: not the later rows' work
                else:
                    rows((i,), capture_args=(i + 1,))
                for j in range(problem.width):
                    # A captured step draws (known values are kept where every image knows the pixel), so
                    # the eager step before the capture draws too: the capture then meets no kernel
                    # for the first time (a first launch loads its module, which a capture forbids).
                    draws = not skipped[i][j] or pixels.will_capture()
                    pixels((draws,), capture_args=())
                    bar.update()
        return pixels.graph is not None


class _ReplayedStep:
    """A sampler step run eagerly or, once ``capture``, run eagerly one last time and captured in a CUDA graph replayed ever after."""

    def __init__(self, step: Callable[..., None], name: str, device: torch.device, capture: bool, strict: bool):
        self.step, self.name, self.device, self.capture, self.strict = step, name, device, capture, strict
        self.graph: torch.cuda.CUDAGraph | None = None

    def will_capture(self) -> bool:
        """Whether the next call runs the step eagerly and then captures it."""
        return self.graph is None and self.capture

    def __call__(self, args: tuple, capture_args: tuple) -> None:
        """This step with ``args``; the graph captures the next one, with ``capture_args``."""
        if self.graph is not None:
            self.graph.replay()
        elif self.capture:
            self.graph = self._step_and_capture(args, capture_args)
            self.capture = self.graph is not None
        else:
            self.step(*args)

    def _step_and_capture(self, args: tuple, capture_args: tuple) -> torch.cuda.CUDAGraph | None:
        """Runs this step eagerly, then captures the next one in a CUDA graph.

        Both on one side stream, so that whatever the step's ops initialise lazily
        (Triton modules, cuBLAS and cuDNN state for that stream) exists before the
        capture. Returns None, after a warning, where the capture fails and not ``strict``.
        The caller's stream is current again afterwards, a failed capture included: the
        outer stream context restores it (``torch.cuda.graph``'s own does not when its
        capture fails).
        """
        device = self.device
        caller = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self.step(*args)  # its errors are the step's, not the capture's: raised as they are
            try:
                with torch.cuda.graph(graph, stream=stream):
                    self.step(*capture_args)
            except RuntimeError as error:
                if self.strict:
                    raise
                warnings.warn(f"cached sampling: capturing the {self.name} step in a CUDA graph failed, running it without one: {error}", RuntimeWarning, stacklevel=4)
                graph = None
        caller.wait_stream(stream)
        return graph
