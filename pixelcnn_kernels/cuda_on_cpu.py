"""The CUDA backend's kernels compiled for the CPU: ``PIXELCNN_KERNELS_CUDA_ON_CPU=1``.

As ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors, this runs the CUDA
C++ kernels of ``csrc/`` on them, so that a machine without a GPU (CI's) tests what
the ``cuda`` backend computes: every ``.cu`` file is compiled as C++ with
``csrc/cuda_on_cpu/cuda_on_cpu.h`` standing in for the CUDA it uses (each CUDA thread
a fiber, blocks in turn; tensor-core instructions emulated from the PTX ISA's fragment
layouts) together with the unchanged torch glue (``csrc/*_ops.cpp``), which then
registers the ops as ``torch.ops.pixelcnn_kernels_cuda_on_cpu.*`` for CPU tensors. With
the variable set, a forced ``cuda`` backend accepts CPU tensors and calls them.

The build needs the package's ``csrc/`` (a checkout or an editable install), a C++20
compiler, ninja and the CUDA toolkit's headers (``cuda_runtime.h``, ``cuda_bf16.h``: no
GPU, no nvcc). It takes about 30 s on 2 cores, once: the library is kept in
``build/cuda_on_cpu/`` beside ``csrc/`` and its changed sources recompiled. Every CUDA
thread runs one after another on one CPU core: small shapes only, as for the interpreter.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from pixelcnn_kernels.extension_sources import csrc_digest

ENV_VAR = "PIXELCNN_KERNELS_CUDA_ON_CPU"
OPS_NAMESPACE = "pixelcnn_kernels_cuda_on_cpu"
CSRC = Path(__file__).resolve().parent.parent / "csrc"

# `kernel<...><<<grid, block, shared, stream>>>(args)` -> `::cuda_on_cpu::launch(grid, block, shared, stream,
# [=](auto... params) { kernel<...>(params...); })(args)`: the kernel's remaining template arguments are deduced as nvcc does
_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^;{}<>]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(")
# `extern __shared__ T name[];` -> a pointer to the block's dynamic shared memory
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?P<type>\w+)\s+(?P<name>\w+)\[\];")


def enabled() -> bool:
    """True when ``PIXELCNN_KERNELS_CUDA_ON_CPU`` asks for the CUDA kernels on CPU tensors."""
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


def translate(source: str) -> str:
    """A ``.cu`` file's text as C++ for cuda_on_cpu.h: kernel launches and dynamic shared memory rewritten."""
    launches = source.count("<<<")
    source, rewritten = _LAUNCH.subn(lambda m: f"::cuda_on_cpu::launch({m['config']}, [=](auto... params) {{ {m['kernel']}(params...); }})(", source)
    if rewritten != launches:
        raise ValueError(f"rewrote {rewritten} of {launches} kernel launches: a launch the pattern does not read")
    return _EXTERN_SHARED.sub(lambda m: f"{m['type']}* const {m['name']} = static_cast<{m['type']}*>(::cuda_on_cpu::dynamic_shared());", source)


def _cuda_include_dir() -> Path | None:
    """A directory holding the CUDA toolkit's ``cuda_runtime.h`` and ``cuda_bf16.h``: the toolkit's, or the pip wheels'."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots = [Path(c) / "include" for c in candidates if c]
    try:
        import nvidia

        roots += [Path(p) / sub / "include" for p in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_runtime")]
    except ImportError:
        pass
    return next((r for r in roots if (r / "cuda_runtime.h").is_file() and (r / "cuda_bf16.h").is_file()), None)


def unavailable_reason() -> str | None:
    """Why the CPU build cannot be made here, or None."""
    if not (CSRC / "cuda_on_cpu" / "cuda_on_cpu.h").is_file():
        return f"the CUDA sources are not at hand ({CSRC}: install the package editable, from a checkout)"
    if _cuda_include_dir() is None:
        return "the CUDA toolkit's headers (cuda_runtime.h, cuda_bf16.h) were not found: set CUDA_HOME"
    return None


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """Builds (once per source change) and loads the CPU build; returns ``torch.ops.pixelcnn_kernels_cuda_on_cpu``."""
    from torch.utils.cpp_extension import load as load_extension

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    build = CSRC.parent / "build" / "cuda_on_cpu"
    translated = build / "translated"
    translated.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "cuda_on_cpu" / "runtime.cpp", *sorted(CSRC.glob("*_ops.cpp"))]
    for cu in sorted(CSRC.glob("*.cu")):
        target = translated / f"{cu.stem}_cu.cpp"
        text = translate(cu.read_text())
        if not target.is_file() or target.read_text() != text:  # unchanged files keep their timestamps: no recompile
            target.write_text(text)
        sources.append(target)
    shim = CSRC / "cuda_on_cpu" / "cuda_on_cpu.h"
    flags = ["-O2", "-std=c++20", "-fno-fast-math", "-ffp-contract=off", f"-I{CSRC}", f"-I{_cuda_include_dir()}", "-include", str(shim)]
    load_extension(
        name=f"{OPS_NAMESPACE}_{csrc_digest(CSRC)[:12]}",
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    return getattr(torch.ops, OPS_NAMESPACE)
