"""Makes a cached sample the naive sampler's image bit for bit: one full forward checks it, rare values are repaired.

A cached step computes each activation from the same values as the full forward but
on other shapes, so its logits can differ from the full forward's in the last bits
(:mod:`~pixelcnn_kernels.sampling.cached_gated`, "Exactness"); a noise value within
that rounding of a category boundary then draws another value than the naive sampler
would, and the values after it are drawn from that other value. The naive sampler's own
arithmetic settles it, as in Jacobi sampling (:mod:`~pixelcnn_kernels.sampling.jacobi`):
a full forward on the drafted images and a redraw of every value at its noise. The
logits of a value depend only on the values before it (in the naive order: pixels in
raster order, then the steps of a pixel), so if the redraw equals the draft everywhere,
the draft is the naive image (by induction along that order), and that one forward is
the whole cost.

Otherwise, in each image whose redraw differs, the first differing value was drawn
from a prefix that is the naive one: its redraw is the naive value. It is written, the
later steps of its pixel (softmax RGB: the later colours) are drawn by naive steps, and
the cached sampler runs again on those images from the next pixel, every pixel up to
this one known (scheduled as in the first run, so PixelCNN++'s tables are reused). Each
round fixes at least one more value of every image it touches and costs about one
cached pass, where Jacobi iterations from the draft would spend a full forward per step
of the changes' spread through the later values. After :data:`MAX_REPAIR_ROUNDS` rounds
(a draft far from the naive image) Jacobi iterations finish the image: their fixed
point is the naive image too, reached within as many forwards as values.

A float64 draft needs no round in practice, a float32 one rarely. In bf16 and fp16 it
depends on the model. Measured on the CPU (3 images of 3×4×4, 256 bins, random weights
doubled, 6 seeds): a Gated PixelCNN (6 channels, 2 layers) needed no round, a PixelCNN++
(4 filters, 1 block per stage, 2 logistics) redrew 20 to 30 of its 48 values every time,
9 to 12 full forwards; its cached logits are about as accurate as its full forward's (an
error of ~0.02 against float64), and the bins are 2/255 wide. The image is the naive one
either way; only the time grows. Like Jacobi sampling this relies on a forward that is
a deterministic function of its input for a given shape (the package's kernels, the
CPU; cuDNN with ``torch.backends.cudnn.deterministic``, which ``model.sample`` sets:
:func:`~pixelcnn_kernels.models.base.exact_sampling_arithmetic`) whose masked taps add
exact zeros (:mod:`~pixelcnn_kernels.sampling.jacobi` says when).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pixelcnn_kernels.sampling.common import SamplingProblem
from pixelcnn_kernels.sampling.jacobi import jacobi_sample

__all__ = ["MAX_REPAIR_ROUNDS", "sample_cached_exactly"]

# Rounds of repair (each about one cached pass) before Jacobi iterations finish the image.
MAX_REPAIR_ROUNDS = 4


def sample_cached_exactly(model, problem: SamplingProblem, run_cached: Callable, progress: bool) -> tuple[int, int]:
    """Fills ``problem.images`` with ``run_cached`` and makes the draft the naive image.

    ``model`` is a :class:`~pixelcnn_kernels.models.PixelCNNModel` in eval mode, called
    under ``torch.no_grad``; ``run_cached(model, problem, progress)`` is its cached
    sampler. Returns (full forwards run, values that ended other than drafted): (1, 0)
    when the draft was exact, (0, 0) when every image knows every pixel.
    """
    run_cached(model, problem, progress)
    if bool(problem.known.all()):
        return 0, 0
    draft = problem.images.clone()
    steps = model.step_channels()
    passes = 0
    for repair_round in range(MAX_REPAIR_ROUNDS + 1):
        drawn = model.draw_values(model(problem.images, problem.cond), problem.noise)
        passes += 1
        first = _first_differences(problem, drawn, len(steps))
        if not first:
            break
        if repair_round == MAX_REPAIR_ROUNDS:  # a draft far from the naive image: Jacobi iterations finish it
            passes += jacobi_sample(model, problem, None, progress)
            break
        for image, (pixel, step) in first.items():
            _write(problem, drawn, image, pixel, steps[step])
        passes += _finish_pixels(model, problem, first, steps)
        _resample_after(model, problem, run_cached, first, progress)
    return passes, _changed_values(problem.images, draft, len(steps))


def _differing_values(images: torch.Tensor, other: torch.Tensor, step_count: int) -> torch.Tensor:
    """(B, steps, H, W) bool: where a value (a naive step) of ``images`` differs from ``other``'s.

    The steps are the colours (softmax head), or one per pixel (the DMOL head draws a
    pixel's channels as one value).
    """
    differs = images != other
    return differs.any(dim=1, keepdim=True) if step_count == 1 else differs


def _changed_values(images: torch.Tensor, draft: torch.Tensor, step_count: int) -> int:
    """How many values (naive steps) of ``images`` differ from ``draft``."""
    return int(_differing_values(images, draft, step_count).sum())


def _first_differences(problem: SamplingProblem, drawn: torch.Tensor, step_count: int) -> dict[int, tuple[int, int]]:
    """{image: (pixel, step)}: the first value (naive order) whose redraw differs from the draft, per image that has one.

    A pixel is ``i·W + j``; a step indexes :meth:`~PixelCNNModel.step_channels` (one per
    colour for the softmax head, one per pixel for DMOL). Known pixels never differ.
    """
    differs = _differing_values(drawn, problem.images, step_count) & ~problem.known[:, None]
    in_naive_order = differs.flatten(2).transpose(1, 2).flatten(1)  # (B, H·W·steps): pixel-major, then step
    has_difference = in_naive_order.any(dim=1)
    first = in_naive_order.to(torch.uint8).argmax(dim=1)
    images = has_difference.nonzero().flatten().tolist()
    return {image: divmod(position, step_count) for image, position in zip(images, first[images].tolist())}


def _write(problem: SamplingProblem, drawn: torch.Tensor, image: int, pixel: int, channels: slice) -> None:
    """Writes ``drawn``'s values of ``channels`` at ``pixel`` of image ``image`` into the images."""
    row, col = divmod(pixel, problem.width)
    problem.images[image, channels, row, col] = drawn[image, channels, row, col]


def _finish_pixels(model, problem: SamplingProblem, first: dict[int, tuple[int, int]], steps: list[slice]) -> int:
    """Draws, by naive steps, the steps after the repaired one in each repaired pixel; returns the forwards run."""
    passes = 0
    for step in range(1, len(steps)):
        pending = [(image, pixel) for image, (pixel, repaired_step) in first.items() if repaired_step < step]
        if not pending:
            continue
        drawn = model.draw_values(model(problem.images, problem.cond), problem.noise)
        passes += 1
        for image, pixel in pending:
            _write(problem, drawn, image, pixel, steps[step])
    return passes


def _resample_after(model, problem: SamplingProblem, run_cached: Callable, first: dict[int, tuple[int, int]], progress: bool) -> None:
    """Runs the cached sampler again on the repaired images, every pixel up to the repaired one known."""
    images = torch.tensor(list(first), device=problem.images.device)
    last_fixed = torch.tensor([pixel for pixel, _ in first.values()], device=problem.images.device)
    pixels = torch.arange(problem.height * problem.width, device=problem.images.device)
    fixed = (pixels[None, :] <= last_fixed[:, None]).view(-1, problem.height, problem.width)
    known = problem.known[images] | fixed
    if bool(known.all()):
        return
    again = problem.subproblem(images, known)
    run_cached(model, again, progress)
    problem.images[images] = again.images
