"""The ``pixelcnn-kernels`` command (also ``python -m pixelcnn_kernels``).

Subcommands live beside the code they drive; each module in ``SUBCOMMAND_MODULES``
has ``register(subparsers)`` that adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pixelcnn_kernels.backend import BackendUnavailableError
from pixelcnn_kernels.bench import FAMILIES
from pixelcnn_kernels.utils import writable_directory

# Modules that add a subcommand, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = ("pixelcnn_kernels.cli", "pixelcnn_kernels.train", "pixelcnn_kernels.sampling.cli")


def _info(args: argparse.Namespace) -> int:
    from pixelcnn_kernels import __version__
    from pixelcnn_kernels.backend import available_backends, forced_backend, triton_interpret

    print(f"pixelcnn-kernels {__version__}")
    print(f"python           {platform.python_version()}")
    print(f"torch            {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton           {triton.__version__}{' (interpreter: TRITON_INTERPRET=1)' if triton_interpret() else ''}")
    except ImportError:
        print("triton           not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"device {i}         {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("device           CPU only (no CUDA device visible)")
    print("backends:")
    for name, reason in available_backends().items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        forced = forced_backend() or "none (automatic: CUDA tensors -> cuda, else triton; CPU -> reference)"
    except ValueError as exc:  # a bad PIXELCNN_KERNELS_BACKEND: one of the things info is for
        print(f"forced backend   invalid: {exc}")
        return 2
    print(f"forced backend   {forced}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pixelcnn_kernels.bench import cases_for
    from pixelcnn_kernels.bench.goals import goals_table
    from pixelcnn_kernels.bench.harness import KERNEL_PROVIDERS, format_table, run, write_results

    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    unknown = sorted(set(args.ops) - set(FAMILIES))
    if unknown:
        print(f"bench: unknown op families {unknown}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    families = args.ops or FAMILIES
    for option, value, least in (("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if value is not None and value < least:
            raise ValueError(f"{option} must be at least {least}, got {value}")
    if not on_gpu:
        if args.cuda_graph:
            print("bench: --cuda-graph needs a GPU", file=sys.stderr)
            return 2
        print("bench: no GPU here, timing small CPU sizes of the available providers; GPU numbers need a GPU.")
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "bfloat16"] if on_gpu else ["float32"]))]
    cases = [c for family in families for c in cases_for(family, on_gpu) if not args.k or args.k in c.name]
    if not cases:
        print(f"bench: -k {args.k!r} matches no case of {', '.join(families)}", file=sys.stderr)
        return 2
    if args.out is not None:
        try:
            writable_directory(args.out)  # before the first case: an unusable --out fails now, not after it
        except OSError as exc:
            raise ValueError(f"--out {args.out!r} is not a usable directory ({exc.strerror or exc})") from exc
    known_providers = {"eager", "compile", *KERNEL_PROVIDERS, *(name for case in cases for name in case.extra_providers)}
    unknown = sorted(set(args.providers or ()) - known_providers)
    if unknown:  # e.g. `--providers eager gates`: the family was taken for a provider
        print(f"bench: unknown providers {unknown} for these cases (put the families before --providers); "
              f"choose from {', '.join(sorted(known_providers))}", file=sys.stderr)
        return 2
    command = "pixelcnn-kernels " + " ".join(sys.argv[1:])

    finished: list = []  # the rows of the cases done so far, for a run cut short by Ctrl-C

    def save(results_so_far, meta, plot: bool = False) -> list[Path]:  # after every case: a run cut short keeps what it measured
        finished[:] = results_so_far
        return write_results(results_so_far, Path(args.out), {**meta, "command": command}, plot) if args.out else []

    try:
        results, meta = run(
            cases,
            dtypes,
            device,
            warmup=args.warmup if args.warmup is not None else (10 if on_gpu else 2),
            repeats=args.repeats if args.repeats is not None else (50 if on_gpu else 3),
            only=set(args.providers) if args.providers else None,
            after_case=save,
            cuda_graph=args.cuda_graph,
        )
    except KeyboardInterrupt:
        print(format_table(finished))
        kept = f"; they are in {args.out}" if args.out else " (--out saves them as each case ends)"
        print(f"bench: interrupted after {len(finished)} measurements{kept}", file=sys.stderr)
        return 130
    print(format_table(results))
    written = save(results, meta, plot=True)
    goals_path = Path(args.out) / "goals.md" if args.out else None
    if on_gpu:  # the issues' goals are set at the GPU sizes
        goals = goals_table(results)
        print(f"\nThe issues' goals (python -m pixelcnn_kernels.bench.goals judges saved runs):\n{goals}")
        if goals_path is not None:
            goals_path.write_text(goals + "\n")
            written.append(goals_path)
    elif goals_path is not None:
        goals_path.unlink(missing_ok=True)  # an earlier GPU run's verdicts, not this run's
    for path in written:
        print(f"wrote {path}")
    failed = [r for r in results if r.failed]
    if failed:
        print(f"bench: {len(failed)} measurements FAILED (tracebacks above)", file=sys.stderr)
    if not failed and not any(r.median_ms == r.median_ms for r in results):  # every row skipped (NaN: not measured)
        print("bench: nothing was measured: every provider asked for was unavailable here (the reasons are in the table)", file=sys.stderr)
        return 2
    return 1 if failed else 0


def register(subparsers) -> None:
    info = subparsers.add_parser(
        "info",
        help="versions, device, and which backends are available (and why not)",
        description="Print the Python, torch, Triton and CUDA versions, the visible GPUs, each backend's availability "
        "(with the reason where it is unavailable) and the backend forced by PIXELCNN_KERNELS_BACKEND, if any.",
    )
    info.set_defaults(func=_info)
    bench = subparsers.add_parser(
        "bench",
        help="time each op against eager PyTorch and torch.compile",
        description="Time the ops (and end-to-end workloads) per provider: eager reference, torch.compile of the "
        "reference, the triton and cuda backends. Prints median/p20/p80, peak memory, the floor and the "
        "ratio to torch.compile; --out also writes CSV, JSON and, where torch.compile was timed and matplotlib is "
        "installed, a PNG plot of the ratios. On a GPU it then judges the issues' "
        "performance goals on the rows it measured (goals.md with --out).",
    )
    bench.add_argument("ops", nargs="*", metavar="FAMILY", help=f"op families to run (default: all): {', '.join(FAMILIES)}")
    bench.add_argument("-k", default="", help="only cases whose name contains this string")
    bench.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"], help="dtypes (repeatable; default float32 and bfloat16 on a GPU)")
    bench.add_argument("--providers", nargs="+", help="only these providers (eager, compile, triton, cuda, ...)")
    bench.add_argument("--warmup", type=int, help="warm-up calls per measurement (default 10 on GPU, 2 on CPU; fewer than 2 run 2: the time budget is the last one's)")
    bench.add_argument("--repeats", type=int, help="timed calls per measurement (default 50 on GPU, 3 on CPU); where calls are slow, "
                       "fewer of both (at least 3 timed), about 20 s a measurement")
    bench.add_argument("--cpu", action="store_true", help="time the CPU sizes even when a GPU is present")
    bench.add_argument("--cuda-graph", action="store_true", help="capture each provider's call in a CUDA graph and time the replays "
                       "(providers named <name>+graph): the GPU's work without the host's launch overhead")
    bench.add_argument("--out", help="directory for results.csv, results.json, table.txt and ratio_to_compile.png (when the compile provider ran)")
    bench.set_defaults(func=_bench)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming the problem (and ``--help``), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pixelcnn-kernels",
        description="Fused Triton and CUDA kernels for PixelCNN-family models: inspect the install, benchmark the ops, train and sample models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


# What a command raises for bad input or a bad file (ValueError covers CheckpointError; OSError
# missing or unwritable paths; BackendUnavailableError a --backend that cannot run here): one line
# naming the problem, not a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, BackendUnavailableError)
DEBUG_ENV_VAR = "PIXELCNN_KERNELS_DEBUG"


def report_user_errors(program: str, run: Callable[[], int | None]) -> int:
    """``run()``'s exit status (None: 0); bad input or a bad file (USER_ERRORS) is one line on stderr
    naming ``program``, and status 2 (the python/ examples' ``__main__`` uses it too)."""
    try:
        return run() or 0
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's exit flush does not fail again
        return 0
    except USER_ERRORS as exc:
        if os.environ.get(DEBUG_ENV_VAR):
            raise
        print(f"{program}: {exc} ({type(exc).__name__}; {DEBUG_ENV_VAR}=1 shows the traceback)", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive int, else the option's error ("argument --n: ... got '0'")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def available_device(text: str) -> torch.device:
    """An argparse ``type``: "cpu", or "cuda" where a CUDA device is visible."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no CUDA device is visible")
    return torch.device(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return report_user_errors(f"pixelcnn-kernels {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
