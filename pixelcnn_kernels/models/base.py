"""The API every drop-in model shares: inputs, likelihoods, config and the naive sampler.

Inputs are integer images (B, C, H, W) of bins 0..num_bins-1 (uint8, int32 or int64);
the network sees them as floats in [-1, 1] (``2·x/(num_bins-1) - 1``). Class-conditional
models take ``cond``: class labels (B,) of an integer dtype.

- ``model(x, cond=None)``: logits, (B, num_bins, C, H, W) for the softmax head,
  (B, P, H, W) discretized-mixture-of-logistics parameters for the DMOL head;
- ``model.nll(x, cond)``: (B,) negative log-likelihood in nats per image (summed over
  C·H·W); ``model.loss(x, cond)``: its batch mean; ``model.bits_per_dim(x, cond)``: (B,);
- ``model.config``: the constructor's keyword arguments (JSON-serialisable);
  :func:`pixelcnn_kernels.models.build_model` rebuilds the model from them;
- ``model.sample(n, method=...)``: the naive (one full forward per generated value),
  cached and Jacobi samplers; ``model.last_sample_stats`` describes the last call.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import json
import math
import operator
import time
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelcnn_kernels.nn.layers import FUSED_OPS
from pixelcnn_kernels.ops.dmol import MAX_NUM_BINS, every_value_is_a_bin, sample_discretized_mix_logistic, to_bins
from pixelcnn_kernels.reference.dmol import bins_to_values
from pixelcnn_kernels.reference.layers import OpSet
from pixelcnn_kernels.sampling.common import SamplingProblem, SamplingStats, write_values
from pixelcnn_kernels.utils import DTypeError, TrainingModes, channels_last, compute_dtype

HEADS = ("softmax", "dmol")
SAMPLING_METHODS = ("naive", "cached", "jacobi")
IMAGE_DTYPES = (torch.uint8, torch.int32, torch.int64)


def check_image_size(image_size: object, name: str = "image_size") -> tuple[int, int]:
    """``image_size`` as an (H, W) pair of positive ints, else ValueError naming it ``name``."""
    pair = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be (H, W), two positive ints, got {image_size!r}")
    return pair


def dmol_parameter_count(in_channels: int, num_logistic_mix: int) -> int:
    """Channels of a DMOL head: (π, μ, s) per mixture for grey, plus 3 colour coefficients for RGB."""
    return (3 if in_channels == 1 else 10) * num_logistic_mix


@contextlib.contextmanager
def exact_sampling_arithmetic():
    """Within the block, a network pass is a fixed function of its input, as the samplers' equality needs.

    cuDNN runs deterministic algorithms and does not benchmark (PixelCNN++'s transposed
    convolutions may otherwise sum with atomics, and benchmarking may pick another
    algorithm from one call to the next), and autocast is off: the cached steps compute
    in the parameters' dtype, so the full forwards must too. Both are restored after.
    """
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


class PixelCNNModel(nn.Module, abc.ABC):
    """Base class of the drop-in models; subclasses build the network and implement ``network``.

    A subclass calls ``super().__init__(config, in_channels=..., num_bins=..., head=...,
    num_classes=..., num_logistic_mix=...)`` (the last only matters for the DMOL head) with ``config`` the dict of its constructor's keyword arguments,
    and implements ``network(inputs, class_vector) -> logits`` on the [-1, 1] float
    inputs and the one-hot class vector (or None).
    """

    name: ClassVar[str]
    ops: ClassVar[OpSet] = FUSED_OPS

    def __init__(self, config: dict, *, in_channels: int, num_bins: int, head: str, num_classes: int | None, num_logistic_mix: int):
        super().__init__()
        if isinstance(in_channels, bool) or in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "dmol" and num_bins > MAX_NUM_BINS:
            raise ValueError(f"num_bins must be at most {MAX_NUM_BINS} with the DMOL head (its likelihood's range), got {num_bins}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not isinstance(num_logistic_mix, int) or num_logistic_mix < 1:
            raise ValueError(f"the number of logistic mixtures must be a positive int, got {num_logistic_mix!r}")
        # A JSON round trip both checks that the config is serialisable and turns tuples into lists.
        self._config = json.loads(json.dumps(config))
        self.in_channels = in_channels
        self.num_bins = num_bins
        self.head = head
        self.num_classes = num_classes
        self.num_logistic_mix = num_logistic_mix
        # What the last sample() call did (SamplingStats); None before the first.
        self.last_sample_stats: SamplingStats | None = None

    @property
    def config(self) -> dict:
        """The constructor's keyword arguments (a copy, JSON-serialisable)."""
        return copy.deepcopy(self._config)

    @abc.abstractmethod
    def network(self, inputs: torch.Tensor, class_vector: torch.Tensor | None) -> torch.Tensor:
        """Logits from the [-1, 1] float images (B, C, H, W) and the one-hot class vector (or None)."""

    def check_spatial_size(self, height: int, width: int) -> None:
        """Raises ValueError when the network cannot take images of this size (default: any)."""

    # ---- inputs ----

    def check_images(self, x: torch.Tensor, name: str = "x") -> None:
        """Checks type, dtype and shape of an integer image batch (values are not read: no device sync)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in IMAGE_DTYPES:
            raise DTypeError(f"{name} must hold integer bins (uint8, int32 or int64), got {str(x.dtype).removeprefix('torch.')}")
        if x.dim() != 4 or x.shape[1] != self.in_channels or 0 in x.shape[2:]:
            raise ValueError(f"{name} must be (B, {self.in_channels}, H, W) with H, W >= 1, got shape {tuple(x.shape)}")
        self.check_spatial_size(x.shape[2], x.shape[3])

    def class_vector(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The one-hot (B, num_classes) vector of class labels ``cond``, or None for an unconditional model."""
        if self.num_classes is None:
            if cond is not None:
                raise ValueError("cond was given but the model was built with num_classes=None")
            return None
        if cond is None:
            raise ValueError(f"the model is class-conditional (num_classes={self.num_classes}): pass cond, labels of shape ({batch},)")
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"cond must be a torch.Tensor of class labels, got {type(cond).__name__}")
        if cond.dtype not in IMAGE_DTYPES:
            raise DTypeError(f"cond must hold integer class labels, got {str(cond.dtype).removeprefix('torch.')}")
        if tuple(cond.shape) != (batch,):
            raise ValueError(f"cond must be ({batch},) class labels, got shape {tuple(cond.shape)}")
        parameter = next(self.parameters())
        if cond.device != parameter.device:
            raise ValueError(f"cond is on {cond.device} but the model is on {parameter.device}")
        # Checked on the device, as the DMOL head's bins (a host read would make the host wait for the GPU
        # every step; it traces under torch.compile): a RuntimeError naming cond.
        torch._assert_async(((cond >= 0) & (cond < self.num_classes)).all(), f"cond must hold class labels in [0, {self.num_classes - 1}]")
        return F.one_hot(cond.long(), self.num_classes).to(parameter.dtype)

    def parameter_dtype(self) -> torch.dtype:
        """The dtype of the parameters, which the network's inputs are given."""
        return next(self.parameters()).dtype

    def to_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Integer bins to floats in [-1, 1]: ``(2·x - L)/L`` with L = num_bins - 1, correctly rounded (the DMOL op's own mapping), in the parameters' dtype."""
        return bins_to_values(x, self.num_bins, self.parameter_dtype())

    # ---- likelihood ----

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_images(x)
        inputs = self.to_inputs(x)
        if inputs.is_cuda:
            # Channels-last from the start: each op's output keeps its input's layout and the
            # kernels work in NHWC (an NCHW network would convert every activation both ways),
            # cuDNN's tensor-core convolutions too. The CPU's convolutions are faster NCHW.
            inputs = channels_last(inputs)
        return self.network(inputs, self.class_vector(cond, x.shape[0]))

    def nll(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) negative log-likelihood of each image in nats, summed over C·H·W.

        Computed in float32 from float32/float16/bfloat16 logits, in float64 from float64 logits.
        """
        return self.nll_of_logits(x, self(x, cond))

    def nll_of_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B,) :meth:`nll` of the images ``x`` from the network's ``logits`` on them."""
        # The bins checked on the device (a host read of x's range would make the host wait for the
        # GPU every step): on a GPU a device-side assert, on the CPU a RuntimeError naming x.
        if not every_value_is_a_bin(x.dtype, self.num_bins):
            torch._assert_async(((x >= 0) & (x < self.num_bins)).all(), f"x must hold bins in [0, {self.num_bins - 1}]")
        if self.head == "softmax":
            # (B, bins, C, H, W) as (B·H·W·C, bins) rows: a view of channels-last logits, whose gradient
            # then comes back channels-last (the 5-D cross entropy's would not, and the head's conv copied it).
            bins = logits.shape[1]
            rows = logits.permute(0, 3, 4, 2, 1).reshape(-1, bins).to(compute_dtype(logits.dtype))
            targets = x.long().permute(0, 2, 3, 1).reshape(-1)
            values_per_image = x.shape[1] * x.shape[2] * x.shape[3]  # not -1: a batch of 0 images has any
            return F.cross_entropy(rows, targets, reduction="none").view(x.shape[0], values_per_image).sum(dim=1)
        return self.ops.discretized_mix_logistic_nll(x.long(), logits, num_bins=self.num_bins).sum(dim=(1, 2))

    def loss(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The batch mean of :meth:`nll` (nats per image): the training loss."""
        return self.nll(x, cond).mean()

    def bits_per_dim(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bits per sub-pixel: ``nll / (C·H·W·ln 2)``."""
        nll = self.nll(x, cond)  # checks x first
        return nll / (x.shape[1] * x.shape[2] * x.shape[3] * math.log(2.0))

    # ---- sampling ----

    def sample(
        self,
        n: int,
        method: str = "cached",
        cond: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        size: tuple[int, int] | None = None,
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """Draws ``n`` int64 images (n, C, H, W); ``model.last_sample_stats`` then says how.

        Values are generated in raster order (row by row, left to right); for the softmax
        head with RGB, channel by channel (R, G, B) inside each pixel; for the DMOL head
        a pixel's channels are drawn together by the DMOL sampler.

        - ``method``: ``"cached"`` (the default), incremental generation that computes
          only the new pixel's activations from per-layer caches (:mod:`pixelcnn_kernels.sampling.cached_gated`,
          :mod:`~pixelcnn_kernels.sampling.cached_pixelcnn_pp`), then one full forward that
          checks the draft against the naive draws, and a repair of the rare value drawn
          otherwise (:mod:`~pixelcnn_kernels.sampling.verify`); ``"naive"``, one full forward
          per generated value (the oracle); ``"jacobi"``, parallel forwards iterated to the
          fixed point (:mod:`pixelcnn_kernels.sampling.jacobi`). Given ``noise``, the three
          return the same image, bit for bit (see those modules for why).
        - ``cond``: class labels (n,) for a class-conditional model.
        - ``prefix`` (n, C, H, W) integer images and ``known``, a boolean (H, W) or
          (n, H, W) mask: the known pixels of ``prefix`` are kept, never resampled; the
          others are generated conditioned on them (completion). Give both or neither.
        - ``noise``: the uniform noise of every value, for reproducible draws. Softmax
          head: a (n, C, H, W) tensor in [0, 1); value (c, i, j) is the inverse CDF of
          its categorical at ``noise[:, c, i, j]`` (the first bin whose CDF exceeds it).
          DMOL head: the pair ``(u_mix (n, K, H, W), u_logistic (n, C, H, W))`` of
          float32 uniforms that :func:`~pixelcnn_kernels.sample_discretized_mix_logistic`
          takes for a whole image; pixel (i, j) is drawn with their ``[:, :, i, j]`` slices.
        - ``generator``: draws the noise when ``noise`` is None.
        - ``size``: (H, W) of the images when no ``prefix`` gives it; defaults to
          the size the model was built for, when it has one.
        - ``block_rows``: ``"jacobi"`` only: iterate inside windows of this many rows,
          top to bottom (None: the whole image at once).

        Sampling computes in the parameters' dtype whatever ``torch.autocast`` is on (cast
        the model for bf16 sampling) and with cuDNN's deterministic algorithms: see
        :func:`exact_sampling_arithmetic`.
        """
        if method not in SAMPLING_METHODS:
            raise ValueError(f"method must be one of {SAMPLING_METHODS}, got {method!r}")
        if block_rows is not None and method != "jacobi":
            raise ValueError(f"block_rows is an option of method='jacobi', got method={method!r}")
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
            raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
        if isinstance(n, bool) or not hasattr(type(n), "__index__") or operator.index(n) < 1:  # numpy and 0-d tensor ints too
            raise ValueError(f"n must be a positive int, got {n!r}")
        n = operator.index(n)
        from pixelcnn_kernels.sampling import cached_sampler, jacobi_sample, sample_cached_exactly  # the samplers build on this module

        run_cached = cached_sampler(self) if method == "cached" else None  # raises for a model without one
        problem = self._sampling_problem(n, cond, prefix, known, noise, generator, size)
        modes = TrainingModes(self)
        self.eval()
        try:
            with torch.no_grad(), exact_sampling_arithmetic():
                begin = time.perf_counter()
                redrawn_values = 0
                if method == "naive":
                    network_passes = self._sample_naive(problem, progress)
                elif method == "cached":
                    network_passes, redrawn_values = sample_cached_exactly(self, problem, run_cached, progress)
                else:
                    network_passes = jacobi_sample(self, problem, block_rows, progress)
                if problem.images.is_cuda:
                    torch.cuda.synchronize(problem.images.device)
                seconds = time.perf_counter() - begin
        finally:
            modes.restore()
        values = problem.steps(len(self.step_channels()))
        self.last_sample_stats = SamplingStats(method, n, values, network_passes, seconds, block_rows, redrawn_values)
        return problem.images

    def step_channels(self) -> list[slice]:
        """The channel slices of a pixel drawn one step each, in order: one per channel (softmax), all at once (DMOL)."""
        if self.head == "softmax":
            return [slice(c, c + 1) for c in range(self.in_channels)]
        return [slice(0, self.in_channels)]

    def draw_values(self, logits: torch.Tensor, noise: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The (B, C, h, w) int64 values that ``noise`` picks from ``logits`` of a window of h×w pixels.

        ``logits`` is the network's output on the window ((B, num_bins, C, h, w) softmax,
        (B, P, h, w) DMOL), ``noise`` the window of the noise (see :meth:`sample`). Every
        channel is drawn from its own logits, so for RGB softmax only the channel whose
        logits saw the others' final values is meaningful. The naive and Jacobi samplers
        call this on the whole image, so they run the same arithmetic on the same shapes.
        """
        if self.head == "softmax":
            bins = logits.shape[1]
            return _inverse_cdf(logits.movedim(1, -1).reshape(-1, bins), noise.reshape(-1)).view(noise.shape)
        values = sample_discretized_mix_logistic(logits, self.num_bins, noise=tuple(u.contiguous() for u in noise), quantize=True, channels=self.in_channels)
        return to_bins(values, self.num_bins)

    def _sample_naive(self, problem: SamplingProblem, progress: bool) -> int:
        """One full forward per generated value; returns the number of forwards."""
        skipped = problem.skipped_pixels()
        steps = [(i, j, channels) for i in range(problem.height) for j in range(problem.width) if not skipped[i][j] for channels in self.step_channels()]
        for i, j, channels in tqdm(steps, desc="sampling (naive)", unit="value", disable=not progress):
            drawn = self.draw_values(self(problem.images, problem.cond), problem.noise)
            write_values(problem, i, j, channels, drawn[:, channels, i, j])
        return len(steps)

    def default_sample_size(self) -> tuple[int, int] | None:
        """(H, W) sampled when neither ``prefix`` nor ``size`` is given (None: the caller must say)."""
        return None

    def _sampling_problem(self, n, cond, prefix, known, noise, generator, size) -> SamplingProblem:
        """Checks the arguments of :meth:`sample` (no forward runs before this) and gathers them."""
        device = next(self.parameters()).device
        height, width = self._sample_size(n, prefix, size)
        images = self._start_images(n, height, width, prefix, known, device)
        known_mask = self._known_mask(n, height, width, known, device)
        class_vector = self.class_vector(cond, n)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if noise is not None and generator is not None:
            raise ValueError("give noise or generator, not both: noise fixes every draw, and generator would go unused")
        if generator is not None and _draws_on(generator) != device:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}")
        noise = self._sample_noise(n, height, width, noise, generator, device)
        return SamplingProblem(images, known_mask, noise, cond, class_vector)

    def _sample_size(self, n: int, prefix: torch.Tensor | None, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is not None:
            size = check_image_size(size, "size")
        if prefix is not None:
            self.check_images(prefix, "prefix")
            if prefix.shape[0] != n:
                raise ValueError(f"prefix must hold n={n} images, got shape {tuple(prefix.shape)}")
            if size is not None and tuple(size) != tuple(prefix.shape[2:]):
                raise ValueError(f"size={tuple(size)} does not match prefix's spatial size {tuple(prefix.shape[2:])}")
            return prefix.shape[2], prefix.shape[3]
        size = self.default_sample_size() if size is None else size
        if size is None:
            raise ValueError("size=(H, W) is needed when no prefix is given")
        self.check_spatial_size(*size)
        return tuple(size)

    def _start_images(self, n, height, width, prefix, known, device) -> torch.Tensor:
        if (prefix is None) != (known is None):
            raise ValueError("prefix and known go together: give both (completion) or neither")
        if prefix is None:
            return torch.zeros(n, self.in_channels, height, width, dtype=torch.long, device=device)
        if prefix.device != device:
            raise ValueError(f"prefix is on {prefix.device} but the model is on {device}")
        if int(prefix.min()) < 0 or int(prefix.max()) >= self.num_bins:
            raise ValueError(f"prefix values must be bins in [0, {self.num_bins - 1}]")
        # A contiguous copy whatever the prefix's layout: the samplers index the images flat.
        return prefix.to(torch.long, memory_format=torch.contiguous_format, copy=True)

    def _known_mask(self, n, height, width, known, device) -> torch.Tensor:
        if known is None:
            return torch.zeros(n, height, width, dtype=torch.bool, device=device)
        if not isinstance(known, torch.Tensor) or known.dtype != torch.bool:
            raise TypeError("known must be a boolean tensor")
        if tuple(known.shape) not in ((height, width), (n, height, width)):
            raise ValueError(f"known must be ({height}, {width}) or ({n}, {height}, {width}), got shape {tuple(known.shape)}")
        if known.device != device:
            raise ValueError(f"known is on {known.device} but the model is on {device}")
        return known.expand(n, height, width)

    def _sample_noise(self, n, height, width, noise, generator, device):
        """The noise of every value (see :meth:`sample`), checked, or drawn with ``generator``."""
        if self.head == "softmax":
            expected = [("noise", (n, self.in_channels, height, width))]
        else:
            expected = [("noise[0] (u_mix)", (n, self.num_logistic_mix, height, width)), ("noise[1] (u_logistic)", (n, self.in_channels, height, width))]
        if noise is None:
            drawn = tuple(torch.rand(shape, generator=generator, device=device, dtype=torch.float32) for _, shape in expected)  # whatever the default dtype
            return drawn[0] if self.head == "softmax" else drawn
        given = [noise] if self.head == "softmax" else noise
        if self.head == "dmol" and (not isinstance(noise, (tuple, list)) or len(noise) != 2):
            raise TypeError("noise for the DMOL head must be a pair (u_mix, u_logistic) of tensors")
        for (name, shape), u in zip(expected, given):
            if not isinstance(u, torch.Tensor) or u.dtype != torch.float32:
                raise TypeError(f"{name} must be a float32 tensor of uniforms in [0, 1)")
            if tuple(u.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(u.shape)}")
            if u.device != device:
                raise ValueError(f"{name} is on {u.device} but the model is on {device}")
            if not bool(((u >= 0) & (u < 1)).all()):  # one host read per sample() call
                raise ValueError(f"{name} must hold uniforms in [0, 1); it has values outside (or NaN)")
        return noise


def _draws_on(generator: torch.Generator) -> torch.device:
    """The device ``generator`` draws on: a CUDA generator made for "cuda" has no index, and is the current device's."""
    device = generator.device
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The categorical draw of each row of ``logits`` (n, K) at ``uniforms`` (n,): the first k with CDF(k) > u.

    The CDF is computed in float64 and scaled by its last entry, so rounding cannot leave
    u above the whole CDF. A row with a non-finite logit (NaN, +inf, or every logit -inf)
    has a NaN CDF and no distribution: it draws 0, as the fused draws do.
    """
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.double()[:, None] * total, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)
    return drawn.masked_fill_(total.squeeze(1).isnan(), 0)


class TrainingLoss(nn.Module):
    """``model.loss(x, cond)`` as a module's forward: what DistributedDataParallel,
    ``torch.func.functional_call`` and ``torch.cuda.make_graphed_callables`` wrap."""

    def __init__(self, model: PixelCNNModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(x, cond)
