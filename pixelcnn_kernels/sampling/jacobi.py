"""Jacobi sampling (Song, Meng, Liao & Ermon, ICML 2021): parallel forwards iterated to a fixed point.

The noise of every value is fixed up front (the layout of the naive sampler), so the
sample is the solution of a triangular system ``x = g(x)``: value v is the draw, at its
own noise, from the logits computed from the values before it. Each iteration runs one
full forward on the current image and redraws every value not known; when the image
stops changing it is the naive sampler's image. Causality bounds the iterations: after
iteration t the first t generated values (in the naive order) are final, so at most as
many iterations as generated values run, usually far fewer.

The block variant (``block_rows=R``) runs the iteration inside a window of R rows,
top to bottom: rows below the window stay as they are until their turn. Each iteration
still runs the forward on the whole image: a forward on a cropped image would run the
convolutions on other shapes, whose accumulation order (hence last bits) may differ.

**Exactness.** Given the noise, the image equals the naive sampler's bit for bit, in any
dtype: both draw with :meth:`~pixelcnn_kernels.models.PixelCNNModel.draw_values` on the
logits of a full forward of the same shape, and the logits of a position only depend on
the values before it (masked taps multiply them by an exact zero). This relies on the
forward being deterministic for a given input shape (true on the CPU and for the
package's kernels; ``model.sample`` keeps cuDNN to its deterministic algorithms), and on masked
taps adding exact zeros: true of the package's kernels (they skip them) and of direct
and GEMM convolutions; a Winograd or FFT algorithm (cuDNN may pick one for the
``reference`` backend's dense convolutions on a GPU) transforms the masked weights, and
later values could then move a logit's last bits.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pixelcnn_kernels.sampling.common import SamplingProblem


def jacobi_sample(model, problem: SamplingProblem, block_rows: int | None, progress: bool) -> int:
    """Fills ``problem.images`` with the Jacobi fixed point; returns the forwards (iterations) run.

    ``model`` is a :class:`~pixelcnn_kernels.models.PixelCNNModel` in eval mode, called
    under ``torch.no_grad``; ``block_rows`` is the window height (None: the whole image).
    """
    height = problem.height
    window = height if block_rows is None else min(block_rows, height)
    iterations = 0
    with tqdm(total=height, desc="sampling (jacobi)", unit="row", disable=not progress) as bar:
        for top in range(0, height, window):
            iterations += _iterate_window(model, problem, top, min(top + window, height))
            bar.update(min(window, height - top))
            bar.set_postfix(iterations=iterations)
    return iterations


def _iterate_window(model, problem: SamplingProblem, top: int, bottom: int) -> int:
    """Jacobi iterations on rows [top, bottom) until they stop changing; returns how many ran."""
    images = problem.images
    rows = slice(top, bottom)
    # After `bound` iterations every value of the window is final: no forward is spent confirming it.
    bound = problem.steps(len(model.step_channels()), rows)
    keep = problem.known[:, None, rows].expand(-1, images.shape[1], -1, -1)
    for iteration in range(1, bound + 1):
        drawn = model.draw_values(model(images, problem.cond), problem.noise)[:, :, rows]
        updated = torch.where(keep, images[:, :, rows], drawn)
        converged = torch.equal(updated, images[:, :, rows])
        images[:, :, rows] = updated
        if converged:
            return iteration
    return bound
