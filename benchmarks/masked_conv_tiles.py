"""A/B of the Triton masked convolution's tile choices, kernel by kernel, on a GPU.

Times the launchers of ``pixelcnn_kernels.triton.masked_conv`` at the issue's shape (x
64×128×32×32 → 256 channels, the 3×3 vertical mask's 6 taps), bf16 and fp32 (TF32),
each kernel with its tile choices in the same run:

- forward, input gradient, weight gradient: ``64-col``, the tiles before 2026-11-30's
  change (128 × 64 at 4 warps; the weight gradient's 64 × 64 at 4 warps, 4 programs
  per SM), against ``current``, what the launchers pick (128 × 128 at 8 warps where the
  channels are multiples of 128);
- the gated forward (tanh·σ, two accumulators over 128 columns each): ``current`` (64
  pixels × 64 columns per half) against ``gated-128-rows``, a candidate not yet taken
  (128 pixels at 8 warps: a third less L2 traffic, but 148 registers, one program per SM).

Each call is timed by the bench harness's timer (CUDA events, L2 emptied and the GPU
spinning before each call, inputs rotated over three random sets), median of
``--repeats`` calls after warm-up; ``TFLOP/s`` counts the active taps' products only.
The predictions it checks are in ``masked_conv_perf_notes.md``.

    python benchmarks/masked_conv_tiles.py [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from pixelcnn_kernels.bench.harness import _median, _percentile, _spin_ms, _Timer, print_report
from pixelcnn_kernels.cli import positive_int
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.ops.masked_conv import pack_weight, tap_offsets
from pixelcnn_kernels.triton import masked_conv as kernels

BATCH, C_IN, C_OUT, SIDE = 64, 128, 256, 32
INPUT_SETS = 3


@contextlib.contextmanager
def tiles(choice: str):
    """Within the block the launchers use ``choice``'s tiles ("current": their own)."""
    conv_tiles, wgrad_tiles = kernels._conv_tiles, kernels._wgrad_tiles
    if choice == "64-col":
        # Asked for 64 columns (not a multiple of 128) they pick the 64-column tiles.
        kernels._conv_tiles = lambda two_halves, dtype, precision, n_cols, gate_groups=1: conv_tiles(two_halves, dtype, precision, kernels._BLOCK_N, gate_groups)
        kernels._wgrad_tiles = lambda c_in, c_out: wgrad_tiles(kernels._WGRAD_BLOCK, kernels._WGRAD_BLOCK)
    elif choice == "gated-128-rows":
        kernels._conv_tiles = lambda two_halves, dtype, precision, n_cols, gate_groups=1: (
            (kernels._BLOCK_M, kernels._BLOCK_N, 2 * kernels._NUM_WARPS) if two_halves else conv_tiles(two_halves, dtype, precision, n_cols, gate_groups)
        )
    elif choice != "current":
        raise ValueError(f"unknown tile choice {choice!r}")
    try:
        yield
    finally:
        kernels._conv_tiles, kernels._wgrad_tiles = conv_tiles, wgrad_tiles


def kernel_calls(dtype: torch.dtype, device: torch.device) -> dict[str, tuple[tuple[str, ...], list]]:
    """kernel name -> (its tile choices, one zero-argument call per input set)."""
    spec = resolve_mask("vertical", 3)
    offsets = tap_offsets(spec, 1)
    plain, gated = ("64-col", "current"), ("current", "gated-128-rows")
    calls = {"forward": (plain, []), "input grad": (plain, []), "weight grad": (plain, []), "gated forward": (gated, [])}
    for seed in range(INPUT_SETS):
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(BATCH, SIDE, SIDE, C_IN, device=device, dtype=dtype, generator=generator)
        gout = torch.randn(BATCH, SIDE, SIDE, C_OUT, device=device, dtype=dtype, generator=generator)
        weight = torch.randn(C_OUT, C_IN, 3, 3, device=device, dtype=dtype, generator=generator) / (C_IN * 6) ** 0.5
        bias, cond = (torch.randn(*shape, device=device, dtype=dtype, generator=generator) for shape in ((C_OUT,), (BATCH, C_OUT)))
        wp = pack_weight(weight, spec)
        calls["forward"][1].append(lambda x=x, wp=wp: kernels.masked_conv2d_fwd(x, wp, None, None, offsets, False, True))
        calls["input grad"][1].append(lambda gout=gout, wp=wp: kernels.masked_conv2d_dgrad(gout, wp, None, offsets, True))
        calls["weight grad"][1].append(lambda x=x, gout=gout: kernels.masked_conv2d_wgrad(x, gout, offsets, False, True))
        calls["gated forward"][1].append(
            lambda x=x, wp=wp, bias=bias, cond=cond: kernels.masked_conv2d_fwd_gated(
                x, wp, bias, cond, None, None, offsets, False, kernels.GATE_TANH_SIGMOID, 1, True, True
            )
        )
    return calls


def time_calls(timer: _Timer, calls: list, repeats: int) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``repeats`` calls rotating over ``calls``, after a warm-up of each."""
    begin = time.perf_counter()
    for call in calls:
        call()
    torch.cuda.synchronize()
    spin = _spin_ms((time.perf_counter() - begin) / len(calls))
    times = [timer.time_call(calls[i % len(calls)], spin)[0] for i in range(repeats)]
    return _median(times), _percentile(times, 0.2), _percentile(times, 0.8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed calls per row (default 30)")
    parser.add_argument("--out", type=Path, help="also write the table, with the date, GPU and versions, to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("masked_conv_tiles: needs a CUDA GPU (it times GPU kernels); nothing run", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    timer = _Timer(device)
    flops = 2 * BATCH * SIDE * SIDE * C_IN * C_OUT * len(resolve_mask("vertical", 3).taps)
    lines = ["| kernel | dtype | tiles | median ms | p20 | p80 | TFLOP/s |", "|---|---|---|---:|---:|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float32):
        calls = kernel_calls(dtype, device)
        for name, (choices, set_calls) in calls.items():
            for choice in choices:
                with tiles(choice):
                    median, p20, p80 = time_calls(timer, set_calls, args.repeats)
                lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {choice} | {median:.4f} | {p20:.4f} | {p80:.4f} | {flops / median * 1e-9:.0f} |")
                print(lines[-1], flush=True)
    notes = (f"shape: x {BATCH}x{C_IN}x{SIDE}x{SIDE} -> {C_OUT}, vertical 3x3 (6 taps); fp32 in TF32",)
    print_report(lines, f"gpu: {torch.cuda.get_device_name(device)}", f"python benchmarks/masked_conv_tiles.py --repeats {args.repeats}", args.out, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
