"""``python -m pixelcnn_kernels.cuda_on_cpu --sanitizer address|thread``: the CUDA kernels' tests
on the CPU with the kernels built with a sanitizer, and the count of its reports.

AddressSanitizer stands in for compute-sanitizer's memcheck (an access outside an allocation),
ThreadSanitizer, told by the runtime which orderings CUDA gives, for its racecheck (two CUDA
threads' accesses to one address, one a write, that no barrier orders). Each report names
the kernel's source line and, for a race, the CUDA threads and blocks. They go to files in
``--reports`` (pytest's capture would swallow them), and any report fails the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pixelcnn_kernels import cuda_on_cpu

REPORT_HEADERS = {"address": "ERROR: AddressSanitizer", "thread": "WARNING: ThreadSanitizer"}


def sanitizer_environment(tool: str, reports: Path) -> dict[str, str]:
    """The environment of a process whose CUDA kernels on the CPU run under sanitizer ``tool``."""
    preload = [cuda_on_cpu.sanitizer_runtime(tool)]
    # the C++ runtime too, loaded before Python needs it, so the sanitizer finds what it intercepts there (exceptions)
    preload.append(cuda_on_cpu.compiler_library("libstdc++.so.6"))
    options = {
        # Python's and torch's own allocations, and the fibers' stacks, are not the kernels' concern
        "address": "detect_leaks=0:detect_stack_use_after_return=0",
        # torch's uninstrumented code (and its own threads) is not the kernels' concern
        "thread": "ignore_noninstrumented_modules=1",
    }[tool]
    return os.environ | {
        "LD_PRELOAD": " ".join(preload),
        cuda_on_cpu.SANITIZER_ENV_VAR: tool,
        f"{'A' if tool == 'address' else 'T'}SAN_OPTIONS": f"{options}:log_path={reports / tool}",
        "OMP_NUM_THREADS": "1",
    }


def count_reports(tool: str, reports: Path) -> int:
    return sum(path.read_text(errors="replace").count(REPORT_HEADERS[tool]) for path in reports.glob(f"{tool}.*"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pixelcnn_kernels.cuda_on_cpu",
        usage="%(prog)s [-h] --sanitizer {address,thread} [--reports DIR] [pytest arguments ...]",
        description=__doc__.replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other arguments go to pytest, in place of the default '-m cuda_on_cpu tests' "
        "(e.g. '-n 2 -m cuda_on_cpu tests', or one test file). Needs a checkout or editable install, "
        "the CUDA toolkit's headers, and a compiler with the sanitizer's runtime (gcc, clang).",
    )
    parser.add_argument("--sanitizer", choices=cuda_on_cpu.SANITIZERS, required=True,
                        help="address: out-of-bounds and use-after-free accesses; thread: races between CUDA threads")
    parser.add_argument("--reports", type=Path, default=Path("build") / "sanitizer-reports", metavar="DIR",
                        help="directory for the sanitizer's report files (default: build/sanitizer-reports)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = build_parser().parse_known_args(argv)
    reason = cuda_on_cpu.sanitizer_unavailable_reason(args.sanitizer)
    if reason is not None:
        print(f"cannot run the kernels under the {args.sanitizer} sanitizer: {reason}", file=sys.stderr)
        return 2
    reports = args.reports.resolve()
    reports.mkdir(parents=True, exist_ok=True)
    for old in reports.glob(f"{args.sanitizer}.*"):
        old.unlink()
    tests = subprocess.run([sys.executable, "-m", "pytest", *(pytest_args or ["-m", "cuda_on_cpu", "tests"])],
                           env=sanitizer_environment(args.sanitizer, reports))
    found = count_reports(args.sanitizer, reports)
    print(f"{args.sanitizer} sanitizer: {found} report{'s' * (found != 1)}" + (f" in {reports}" if found else "")
          + ("" if tests.returncode == 0 else f"; pytest exited with {tests.returncode}"))
    return 1 if found or tests.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
