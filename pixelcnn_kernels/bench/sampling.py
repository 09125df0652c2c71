"""Benchmark cases of the samplers (issue 7): one ``model.sample`` call per timed unit.

Providers: ``triton`` / ``cuda`` run the cached sampler (``op``) with the ops on that
backend (``cached``: on the automatic backend), ``eager`` the naive sampler
(``reference``: one full forward per value), ``jacobi`` the Jacobi sampler. ``compile`` is the naive sampler
too: a sampling loop of H·W·C data-dependent forwards is no graph for
``torch.compile``, so the reference is excluded from compilation and the ``x compile``
column reads as the speed-up over naive sampling. Only the ``forward`` mode applies.

- Gated PixelCNN, the tutorial configuration (64 channels, 7 layers, kernel 3,
  1×28×28, 256-way softmax) at B ∈ {1, 16, 64, 256}: ``op`` is the cached sampler
  (goal at B = 64: ≤ 0.04 s per call on an H200);
- PixelCNN++ (160 filters, 5 resnets, 10 logistics, 3×32×32) at B = 64 (goal: ≤ 0.5 s).

The cached samplers are still the pure-PyTorch update path (many small launches per
step; the fused update kernels and CUDA-graph capture are to come).

Time per image is ``median / B``; time per step is ``median / (H·W·C)`` (softmax) or
``/ (H·W)`` (DMOL). The floor is the arithmetic of the cached sampler (each
activation computed once: one full forward, times C passes per pixel for RGB softmax)
at the matmul rate, and the noise read once. The naive sampler takes minutes per call
at these sizes: run these cases with ``--warmup 1 --repeats 3``.
"""

from __future__ import annotations

import functools

import torch

from pixelcnn_kernels.bench.harness import Case
from pixelcnn_kernels.bench.models import _count_flops
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNModel, PixelCNNPlusPlus


class _Models:
    """One model per (device, dtype), built once from one seed, in eval mode."""

    def __init__(self, build):
        self.build = build
        self.cache: dict = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> PixelCNNModel:
        key = (str(device), dtype)
        if key not in self.cache:
            torch.manual_seed(0)
            self.cache[key] = self.build().to(device, dtype).eval()
        return self.cache[key]


def _sampler(method: str, batch: int):
    """``model.sample`` with ``method`` on the noise inputs; inputs are (model, noise) or (model, u_mix, u_logistic)."""

    def run(model, *noise):
        return model.sample(batch, method=method, noise=noise[0] if len(noise) == 1 else noise, progress=False)

    return run


def _case(name: str, models: _Models, batch: int) -> Case:
    """Sampling ``batch`` images of ``models``' default size: cached vs naive, plus jacobi."""
    probe = models.get(torch.device("cpu"), torch.float32)
    channels, (height, width) = probe.in_channels, probe.default_sample_size()
    noise_shapes = [(batch, channels, height, width)] if probe.head == "softmax" else [(batch, probe.num_logistic_mix, height, width), (batch, channels, height, width)]
    passes_per_pixel = channels if probe.head == "softmax" else 1

    def make_inputs(device, dtype, generator):
        model = models.get(device, dtype)
        return (model, *(torch.rand(shape, device=device, generator=generator) for shape in noise_shapes))

    @functools.cache
    def cached_flops() -> int:
        images = torch.empty(batch, channels, height, width, dtype=torch.long, device="meta")
        return _count_flops(probe, (images,)) * passes_per_pixel

    def bytes_moved(mode: str, dtype: torch.dtype) -> int:
        return sum(4 * torch.Size(shape).numel() for shape in noise_shapes)

    naive_eager = torch.compiler.disable(_sampler("naive", batch))

    def naive(*inputs):
        # torch.compile unwraps a disabled function it is given directly: the call inside keeps it eager.
        return naive_eager(*inputs)

    return Case(
        family="sampling",
        name=f"{name}_b{batch}",
        config=f"B{batch} {channels}x{height}x{width}",
        make_inputs=make_inputs,
        op=_sampler("cached", batch),
        reference=naive,
        bytes_moved=bytes_moved,
        flops=lambda mode: cached_flops(),
        grad_inputs=(),
        modes=("forward",),
        # The cached sampler on the automatic backend too: the only row for it on a CPU.
        extra_providers={"cached": _sampler("cached", batch), "jacobi": _sampler("jacobi", batch)},
    )


def cases(on_gpu: bool) -> list[Case]:
    """The issue's sampling workloads on a GPU; tiny versions on the CPU."""
    if on_gpu:
        gated = _Models(lambda: GatedPixelCNN(1, hidden=64, layers=7, kernel_size=3, num_bins=256, image_size=(28, 28)))
        pixelcnn_pp = _Models(lambda: PixelCNNPlusPlus(nr_resnet=5, nr_filters=160, nr_logistic_mix=10, image_size=(32, 32)))
        gated_batches, pp_batch = (1, 16, 64, 256), 64
    else:
        gated = _Models(lambda: GatedPixelCNN(1, hidden=6, layers=2, kernel_size=3, num_bins=16, image_size=(6, 6)))
        pixelcnn_pp = _Models(lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=2, num_bins=16, image_size=(4, 4)))
        gated_batches, pp_batch = (1, 2), 2
    return [_case("sample_gated_pixelcnn", gated, batch) for batch in gated_batches] + [_case("sample_pixelcnn_pp", pixelcnn_pp, pp_batch)]
