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

On a GPU both cached samplers run their pixel step inside a CUDA graph replayed per
pixel, on the ``triton`` and ``cuda`` providers alike: the Gated PixelCNN's fused step
(one kernel per layer per value and one for the head and draw,
:mod:`pixelcnn_kernels.ops.sampling`; its vertical stack's row step is a graph
replayed per row too), and
PixelCNN++'s table-driven step (one fused kernel per gated resnet block for all its
positions of the pixel, gathers and batched products for its shifted and transposed
convolutions, positions read from tables on the device). PixelCNN++'s tables are built
on the first call for a model and image size (the demand resolution run on the host,
one to two seconds at 3×32×32) and reused by later calls: the warm-up call pays it.

The config column gives the steps of one call: H·W·C values (softmax) or H·W pixels
(DMOL); time per step is ``median / steps``. Each row ends with the last call's full
network passes: the Jacobi sampler's iterations (the naive sampler's are its steps,
the cached sampler's forwards that check and repair its draft, 1 when the draft is
exact, with the values repaired, :mod:`pixelcnn_kernels.sampling.verify`). The floor is the larger of the cached
sampler's arithmetic at the matmul rate (each activation computed once: one full
forward, times C passes per pixel for RGB softmax, plus the checking forward) and its least traffic at the copy
rate: the noise read once and, for the Gated PixelCNN, the weights each step reads (the
horizontal stack's active taps, its 1×1 link and output convs, and the head) once per
step plus the vertical stack's once per row. At the tutorial's size a step reads
1.1 MB of fp32 weights: 0.27 µs at 4.1 TB/s, so the 784 steps of a call need at least
0.21 ms, whatever the batch. The naive sampler takes minutes per call at these sizes:
run these cases with ``--warmup 1 --repeats 3``.

At the tutorial's size the step is bound by latency, not by that floor: a replayed
graph runs its kernels one after another, each a couple of microseconds. Prediction,
not yet measured (2026-11-29): with the head and draw as PyTorch ops a value took 8
layer kernels plus about 19 small ops (elu, the 1×1, the float64 softmax, cumsum and
search, the noise, known and image gathers and writes), ~55 µs, so ~45 ms per call at
B = 64, over the 40 ms goal; the fused draw makes it 10 kernels, ~25 µs a value and
~20 ms a call. The vertical stack's rows ran as eager PyTorch: about 45 launches a row,
7 of them the gate's custom op at tens of µs of Python each, ~0.4 ms a row and ~10 ms
a call; replayed as a graph from the third row on, ~0.1 ms a row and ~3 ms a call.
PixelCNN++'s step is about 64 block kernels, 12 other nodes and the head and draw:
with each node reading its five device tables apart and gathering a per-position copy
of its weight, and the draw and writes as ~16 PyTorch ops, ~230 launches, ~0.55 ms a
step and ~0.57 s a call (goal 0.5 s); one packed table per node, the shifted convs'
weights used as they are and the fused draw make it ~175, ~0.45 s a call (prediction,
not yet measured, 2026-11-29).

The check of an exact cached draft (one full forward of the batch and a redraw of
every value) adds, for the Gated PixelCNN at B = 64, 62 GFLOP (0.16 ms at ~380 TFLOP/s
TF32; ~0.4 ms at the kernels' expected third of it) and a float64 softmax over
64·784·256 logits (~0.2 ms): ~0.6 ms, 2–3% of a 20–45 ms call; for PixelCNN++ at
B = 64, 3.1 TFLOP (8 ms at the TF32 rate, ~20 ms expected): ~4% of a ~0.5 s call.
A repair round costs another such check and about one cached pass over the images it
touches (PixelCNN++'s tables reused): rare in float32 (FLOPs counted by the harness's
counter; times predicted, not yet measured, 2026-11-29).
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


def _weight_bytes(model: PixelCNNModel, height: int, steps: int, dtype: torch.dtype) -> int:
    """The weights a Gated PixelCNN's cached sampler reads at least: per step, per row (0 for another model).

    A step reads the active taps of the first horizontal conv and of each layer's
    horizontal conv, the layer's 1×1 link and output conv, and the head; each row reads
    the vertical stack's active taps.
    """
    if not isinstance(model, GatedPixelCNN):
        return 0

    def active(conv) -> int:
        return conv.in_channels * conv.out_channels * len(conv.spec.taps)

    per_step = active(model.conv_hstack) + active(model.conv_out)
    per_step += sum(active(layer.conv_horiz) + active(layer.conv_vert_to_horiz) + active(layer.conv_horiz_1x1) for layer in model.conv_layers)
    per_row = active(model.conv_vstack) + sum(active(layer.conv_vert) for layer in model.conv_layers)
    return (steps * per_step + height * per_row) * dtype.itemsize


def _case(name: str, models: _Models, batch: int) -> Case:
    """Sampling ``batch`` images of ``models``' default size: cached vs naive, plus jacobi."""
    probe = models.get(torch.device("cpu"), torch.float32)
    channels, (height, width) = probe.in_channels, probe.default_sample_size()
    noise_shapes = [(batch, channels, height, width)] if probe.head == "softmax" else [(batch, probe.num_logistic_mix, height, width), (batch, channels, height, width)]
    passes_per_pixel = channels if probe.head == "softmax" else 1
    steps = height * width * passes_per_pixel

    def make_inputs(device, dtype, generator):
        model = models.get(device, dtype)
        return (model, *(torch.rand(shape, device=device, generator=generator) for shape in noise_shapes))

    @functools.cache
    def cached_flops() -> int:
        images = torch.empty(batch, channels, height, width, dtype=torch.long, device="meta")
        return _count_flops(probe, (images,)) * (passes_per_pixel + 1)  # + the checking forward

    def bytes_moved(mode: str, dtype: torch.dtype) -> int:
        return sum(4 * torch.Size(shape).numel() for shape in noise_shapes) + _weight_bytes(probe, height, steps, dtype)

    def note(device, dtype) -> str:
        """The last call's full network passes: the Jacobi sampler's iterations, the naive sampler's values, the cached sampler's check and repairs."""
        stats = models.get(device, dtype).last_sample_stats
        if stats.method == "jacobi":
            return f"{stats.network_passes} iterations"
        passes = f"{stats.network_passes} network pass{'es' if stats.network_passes != 1 else ''}"
        return f"{passes}, {stats.redrawn_values} values repaired" if stats.method == "cached" else passes

    naive_eager = torch.compiler.disable(_sampler("naive", batch))

    def naive(*inputs):
        # torch.compile unwraps a disabled function it is given directly: the call inside keeps it eager.
        return naive_eager(*inputs)

    return Case(
        family="sampling",
        name=f"{name}_b{batch}",
        config=f"B{batch} {channels}x{height}x{width} {steps} steps",
        make_inputs=make_inputs,
        op=_sampler("cached", batch),
        reference=naive,
        bytes_moved=bytes_moved,
        flops=lambda mode: cached_flops(),
        grad_inputs=(),
        modes=("forward",),
        # The cached sampler on the automatic backend too: the only row for it on a CPU.
        extra_providers={"cached": _sampler("cached", batch), "jacobi": _sampler("jacobi", batch)},
        note=note,
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
