"""A/B of Triton tile choices made without a GPU, kernel by kernel, in one GPU run.

Each row times one kernel launcher of the package with one tile choice, the choices of
a kernel side by side (the first is what the launcher did before the change, or does now
when the other is a candidate not taken), bf16 and fp32:

- masked convolution at the issue's shape (x 64×128×32×32 → 256 channels, the 3×3
  vertical mask's 6 taps; fp32 in TF32): forward and input gradient with ``64-col`` (the
  tiles before 2026-11-30's change: 128 × 64 at 4 warps) against ``current`` (128 × 128 at 8
  warps where the channels are multiples of 128); the weight gradient with
  ``channels-last-x`` (its TF32 operand x read from the channels-last rows, as before the
  second H200 run) against ``current`` (a pixel-major copy per tap; bf16 takes the rows either
  way); the gated forward (tanh·σ, two
  accumulators over 128 columns each) with ``current`` (64 pixels × 64 columns per half)
  against the candidate ``gated-128-rows`` (128 pixels at 8 warps: a third less L2
  traffic, 148 registers, one program per SM);
- DMOL NLL at B = 256, 3×32×32, K = 10: the forward and the gradient pass with ``padded``
  (one 16-wide tile of components) against ``current`` (8 + 2 over 64 pixels), and the
  gradient pass also with ``two-tiles-128`` (8 + 2 over 128 pixels: as many elements per
  thread as the forward; 1.78× faster than ``padded`` on the H200 on 2026-11-30, before the
  kernel's accurate exp and divisions, with which it spills on sm_90) and ``128-registers``
  (``current`` compiled with ptxas held to 128 registers: two 8-warp programs per SM instead
  of one, for 36-52 spilled bytes per thread, Triton 3.6).

Each call is timed by the bench harness's timer (CUDA events, L2 emptied and the GPU
spinning before each call, inputs rotated over three random sets), median of
``--repeats`` calls after warm-up. The rate counts the products of the active taps
(convolutions) or the logits read and written (DMOL). The predictions it checks are in
``masked_conv_perf_notes.md`` and ``dmol_and_gates_perf_notes.md``.

    python benchmarks/tile_choices.py [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pixelcnn_kernels.bench.harness import Report, _host_seconds, _Timer, time_rotating
from pixelcnn_kernels.cli import ArgumentParser, positive_int, report_user_errors
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.ops.masked_conv import pack_weight, tap_offsets, weight_grad_layout
from pixelcnn_kernels.triton import dmol
from pixelcnn_kernels.triton import masked_conv

BATCH, C_IN, C_OUT, SIDE = 64, 128, 256, 32
DMOL_BATCH, DMOL_MIXTURES, NUM_BINS = 256, 10, 256
INPUT_SETS = 3


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A launcher timed with each of ``choices``; ``make_calls(dtype, device, seed)`` gives one
    zero-argument call on fresh inputs; ``rate(ms, dtype)`` the row's throughput column."""

    name: str
    choices: tuple[str, ...]
    make_calls: Callable[[torch.dtype, torch.device, int], Callable[[], object]]
    rate: Callable[[float, torch.dtype], str]


class _LaunchedWith:
    """A Triton kernel whose launches (``kernel[grid](...)``) add the compile options ``options``."""

    def __init__(self, kernel, **options):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.options)


@contextlib.contextmanager
def tiles(choice: str):
    """Within the block the launchers use ``choice``'s tiles or operand layout ("current": their own)."""
    saved = (masked_conv._conv_tiles, masked_conv._tap_major_x, dmol._mixture_tiles, dmol._dmol_nll_kernel)
    conv_tiles, _, mixture_tiles, nll_kernel = saved
    if choice == "64-col":
        # Asked for 64 columns (not a multiple of 128) they pick the 64-column tiles.
        masked_conv._conv_tiles = lambda two_halves, dtype, precision, n_cols, gate_groups=1: conv_tiles(two_halves, dtype, precision, masked_conv._BLOCK_N, gate_groups)
    elif choice == "channels-last-x":
        masked_conv._tap_major_x = lambda precision, c_in, copy_elements: False
    elif choice == "gated-128-rows":
        masked_conv._conv_tiles = lambda two_halves, dtype, precision, n_cols, gate_groups=1: (
            (masked_conv._BLOCK_M, masked_conv._BLOCK_N, 2 * masked_conv._NUM_WARPS) if two_halves else conv_tiles(two_halves, dtype, precision, n_cols, gate_groups)
        )
    elif choice == "padded":  # K in one power-of-two tile
        dmol._mixture_tiles = lambda num_mix, compute_grad: dmol._padded_tile(num_mix)
    elif choice == "two-tiles-128":
        dmol._mixture_tiles = lambda num_mix, compute_grad: mixture_tiles(num_mix, False)[:2] + (128,)
    elif choice == "128-registers":
        dmol._dmol_nll_kernel = _LaunchedWith(nll_kernel, maxnreg=128)
    elif choice != "current":
        raise ValueError(f"unknown tile choice {choice!r}")
    try:
        yield
    finally:
        masked_conv._conv_tiles, masked_conv._tap_major_x, dmol._mixture_tiles, dmol._dmol_nll_kernel = saved


def _randn(device: torch.device, dtype: torch.dtype, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype, generator=generator)


def kernels() -> list[Kernel]:
    spec = resolve_mask("vertical", 3)
    offsets = tap_offsets(spec, 1)
    layout = weight_grad_layout(spec, torch.empty(C_OUT, C_IN, 3, 3, device="meta"))
    conv_flops = 2 * BATCH * SIDE * SIDE * C_IN * C_OUT * len(spec.taps)

    def conv_inputs(dtype, device, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        x, gout = _randn(device, dtype, generator, BATCH, SIDE, SIDE, C_IN), _randn(device, dtype, generator, BATCH, SIDE, SIDE, C_OUT)
        wp = pack_weight(_randn(device, dtype, generator, C_OUT, C_IN, 3, 3) / (C_IN * len(spec.taps)) ** 0.5, spec)
        return x, gout, wp, _randn(device, dtype, generator, C_OUT), _randn(device, dtype, generator, BATCH, C_OUT)

    def dmol_inputs(dtype, device, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        logits = _randn(device, dtype, generator, DMOL_BATCH, DMOL_MIXTURES * 10, SIDE, SIDE)
        bins = torch.randint(0, NUM_BINS, (DMOL_BATCH, 3, SIDE, SIDE), device=device, dtype=torch.uint8, generator=generator)
        return bins, logits, torch.rand(DMOL_BATCH, SIDE, SIDE, device=device, generator=generator)

    def conv(launch):
        def make(dtype, device, seed):
            x, gout, wp, bias, cond = conv_inputs(dtype, device, seed)
            return lambda: launch(x, gout, wp, bias, cond)

        return make

    def tflops(ms, dtype):
        return f"{conv_flops / ms * 1e-9:.0f} TFLOP/s"

    def logits_rate(passes):
        def rate(ms, dtype):
            return f"{passes * DMOL_BATCH * DMOL_MIXTURES * 10 * SIDE * SIDE * dtype.itemsize / ms * 1e-9:.2f} TB/s"

        return rate

    def nll_forward(dtype, device, seed):
        bins, logits, _ = dmol_inputs(dtype, device, seed)
        nll = torch.empty(DMOL_BATCH, SIDE, SIDE, device=device)
        return lambda: dmol.nll_forward(bins, logits, NUM_BINS, nll)

    def nll_gradient(dtype, device, seed):
        bins, logits, grad_nll = dmol_inputs(dtype, device, seed)
        grad_logits = torch.empty_like(logits)
        return lambda: dmol.nll_backward(bins, logits, grad_nll, NUM_BINS, grad_logits)

    plain, gated = ("64-col", "current"), ("current", "gated-128-rows")
    return [
        Kernel("conv forward", plain, conv(lambda x, gout, wp, bias, cond: masked_conv.masked_conv2d_fwd(x, wp, None, None, offsets, False, True)), tflops),
        Kernel("conv input grad", plain, conv(lambda x, gout, wp, bias, cond: masked_conv.masked_conv2d_dgrad(gout, wp, None, offsets, True)), tflops),
        Kernel("conv weight grad", ("channels-last-x", "current"), conv(lambda x, gout, wp, bias, cond: masked_conv.masked_conv2d_wgrad(x, gout, offsets, *layout, False, True)), tflops),
        Kernel(
            "conv gated forward", gated,
            conv(lambda x, gout, wp, bias, cond: masked_conv.masked_conv2d_fwd_gated(x, wp, bias, cond, None, None, offsets, False, masked_conv.GATE_TANH_SIGMOID, 1, True, True)),
            tflops,
        ),  # fmt: skip
        Kernel("dmol nll forward", ("padded", "current"), nll_forward, logits_rate(1)),
        Kernel("dmol nll gradient", ("padded", "current", "two-tiles-128", "128-registers"), nll_gradient, logits_rate(2)),
    ]


def time_calls(timer: _Timer, calls: list, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``repeats`` calls rotating over ``calls``, after a warm-up of each (which
    compiles the choice's kernels); the GPU's spin covers a call timed after that warm-up."""
    for call in calls:
        call()
    median, p20, p80, _ = time_rotating(timer, calls, repeats, _host_seconds(calls[0], device))
    return median, p20, p80


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed calls per row (default 30)")
    parser.add_argument("--out", type=Path, help="also write the table, with the date, GPU and versions, to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tile_choices: needs a CUDA GPU (it times GPU kernels); nothing run", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    notes = (
        f"masked conv: x {BATCH}x{C_IN}x{SIDE}x{SIDE} -> {C_OUT}, vertical 3x3 (6 taps), fp32 in TF32",
        f"DMOL: B = {DMOL_BATCH}, 3x{SIDE}x{SIDE}, K = {DMOL_MIXTURES}, uint8 bins",
    )
    report = Report(["| kernel | dtype | tiles | median ms | p20 | p80 | rate |", "|---|---|---|---:|---:|---:|---:|"],
                    f"gpu: {torch.cuda.get_device_name(device)}", f"python benchmarks/tile_choices.py --repeats {args.repeats}", args.out, notes)
    timer = _Timer(device)
    for kernel in kernels():
        for dtype in (torch.bfloat16, torch.float32):
            calls = [kernel.make_calls(dtype, device, seed) for seed in range(INPUT_SETS)]
            for choice in kernel.choices:
                with tiles(choice):
                    median, p20, p80 = time_calls(timer, calls, args.repeats, device)
                report.add(f"| {kernel.name} | {str(dtype).removeprefix('torch.')} | {choice} | {median:.4f} | {p20:.4f} | {p80:.4f} | {kernel.rate(median, dtype)} |")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors("tile_choices.py", main))
