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

``PIXELCNN_KERNELS_CUDA_ON_CPU_SANITIZER=address|thread`` builds the kernels with a
sanitizer instead (its runtime loaded first, ``LD_PRELOAD``): AddressSanitizer finds
their out-of-bounds and use-after-free accesses (compute-sanitizer's memcheck);
ThreadSanitizer, told by the runtime which orderings CUDA gives (launch, ``__syncthreads``,
warp-synchronous ops, the grid's end), finds accesses of two CUDA threads to one address,
one a write, that nothing orders (its racecheck). ``python -m pixelcnn_kernels.cuda_on_cpu
--sanitizer thread`` runs the CUDA kernels' tests so and counts the reports.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import subprocess
from pathlib import Path

import torch

from pixelcnn_kernels.extension_sources import csrc_digest

ENV_VAR = "PIXELCNN_KERNELS_CUDA_ON_CPU"
SANITIZER_ENV_VAR = "PIXELCNN_KERNELS_CUDA_ON_CPU_SANITIZER"
SANITIZERS = ("address", "thread")
OPS_NAMESPACE = "pixelcnn_kernels_cuda_on_cpu"
CSRC = Path(__file__).resolve().parents[2] / "csrc"

# `kernel<...><<<grid, block, shared, stream>>>(args)` -> `::cuda_on_cpu::launch(grid, block, shared, stream,
# [=](auto... params) { kernel<...>(params...); })(args)`: the kernel's remaining template arguments are deduced as nvcc does
_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^;{}<>]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(")
# `extern __shared__ T name[];` -> a pointer to the block's dynamic shared memory
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?P<type>\w+)\s+(?P<name>\w+)\[\];")
# `__shared__ T name[n];` -> `struct S { T name[n]; }; auto& name = block_shared<S>().name;`: the running block's array
_STATIC_SHARED = re.compile(r"__shared__\s+(?P<declaration>[^;{}]*?\b(?P<name>\w+)\s*(?:\[[^;\]]*\])+;)")


def enabled() -> bool:
    """True when ``PIXELCNN_KERNELS_CUDA_ON_CPU`` asks for the CUDA kernels on CPU tensors."""
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


def translate(source: str) -> str:
    """A ``.cu`` file's text as C++ for cuda_on_cpu.h: kernel launches and shared memory rewritten."""
    launches = source.count("<<<")
    source, rewritten = _LAUNCH.subn(lambda m: f"::cuda_on_cpu::launch({m['config']}, [=](auto... params) {{ {m['kernel']}(params...); }})(", source)
    if rewritten != launches:
        raise ValueError(f"rewrote {rewritten} of {launches} kernel launches: a launch the pattern does not read")
    source = _EXTERN_SHARED.sub(lambda m: f"{m['type']}* const {m['name']} = static_cast<{m['type']}*>(::cuda_on_cpu::dynamic_shared());", source)
    source = _STATIC_SHARED.sub(lambda m: f"struct cuda_on_cpu_{m['name']} {{ {m['declaration']} }}; auto& {m['name']} = ::cuda_on_cpu::block_shared<cuda_on_cpu_{m['name']}>().{m['name']};", source)
    if "__shared__" in source:
        raise ValueError("a __shared__ declaration the patterns do not read (an array `__shared__ T name[n];`, or `extern __shared__ T name[];`)")
    return source


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


def sanitizer() -> str | None:
    """The sanitizer ``PIXELCNN_KERNELS_CUDA_ON_CPU_SANITIZER`` names ("address", "thread"), or None."""
    name = os.environ.get(SANITIZER_ENV_VAR, "")
    if name and name not in SANITIZERS:
        raise ValueError(f"{SANITIZER_ENV_VAR} must be one of {', '.join(SANITIZERS)} or unset, got {name!r}")
    return name or None


def sanitizer_unavailable_reason(tool: str) -> str | None:
    """Why the CPU build cannot run under sanitizer ``tool`` here, or None."""
    reason = unavailable_reason()
    if reason is None and not Path(sanitizer_runtime(tool)).is_absolute():  # the compiler prints the bare name
        reason = f"the compiler has no {tool} sanitizer runtime"
    return reason


def sanitizer_runtime(tool: str) -> str:
    """The path of the compiler's runtime library of sanitizer ``tool``, for ``LD_PRELOAD`` (the bare name: none)."""
    return compiler_library({"address": "libasan.so", "thread": "libtsan.so"}[tool])


def compiler_library(name: str) -> str:
    """The path of the compiler's library ``name``; the bare name when the compiler has none."""
    return subprocess.run([compiler(), f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


def compiler() -> str:
    """The host C++ compiler: ``CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def compile_flags(tool: str | None) -> list[str]:
    """The host compiler's flags for the kernels (translated ``.cu`` files) and the glue, with sanitizer ``tool`` or none."""
    flags = ["-std=c++20", "-fno-fast-math", "-ffp-contract=off", f"-I{CSRC}", f"-I{_cuda_include_dir()}",
             "-include", str(CSRC / "cuda_on_cpu" / "cuda_on_cpu.h"),
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]  # torch's: the runtime is built apart
    if tool is None:
        return [*flags, "-O2"]
    flags += ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={tool}"]
    return [*flags, "-DCUDA_ON_CPU_RACECHECK=1"] if tool == "thread" else flags


def runtime_object(tool: str | None, build: Path) -> Path:
    """``csrc/cuda_on_cpu/runtime.cpp`` compiled for sanitizer ``tool`` into ``build`` (once per change of it or the shim).

    With ThreadSanitizer the runtime stays uninstrumented: it plays the hardware, telling
    the sanitizer which orderings CUDA gives, its own steps unseen."""
    flags = compile_flags(tool)
    if tool == "thread":
        flags.remove("-fsanitize=thread")
    source = CSRC / "cuda_on_cpu" / "runtime.cpp"
    inputs = b"".join(p.read_bytes() for p in (source, CSRC / "cuda_on_cpu" / "cuda_on_cpu.h"))
    target = build / f"runtime-{hashlib.sha256(inputs + ' '.join(flags).encode()).hexdigest()[:12]}.o"
    if not target.is_file():
        build.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.o")
        with _compilers_without_preload():
            subprocess.run([compiler(), *flags, "-fPIC", "-c", str(source), "-o", str(partial)], check=True)
        os.replace(partial, target)  # whole, for other processes (pytest-xdist's workers) building it at once
    return target


@contextlib.contextmanager
def _compilers_without_preload():
    """Lets the compilers run without ``LD_PRELOAD`` (a sanitizer's runtime preloaded fails them); this process keeps it."""
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        yield
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """Builds (once per source change) and loads the CPU build; returns ``torch.ops.pixelcnn_kernels_cuda_on_cpu``."""
    from torch.utils.cpp_extension import load as load_extension

    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    tool = sanitizer()
    if tool is not None:
        library = sanitizer_runtime(tool)
        if Path(library).name not in Path("/proc/self/maps").read_text():
            raise RuntimeError(f"{SANITIZER_ENV_VAR}={tool} needs the sanitizer's runtime loaded first: LD_PRELOAD={library}")
    build = CSRC.parent / "build" / ("cuda_on_cpu" if tool is None else f"cuda_on_cpu-{tool}")
    translated = build / "translated"
    translated.mkdir(parents=True, exist_ok=True)
    sources = sorted(CSRC.glob("*_ops.cpp"))
    for cu in sorted(CSRC.glob("*.cu")):
        target = translated / f"{cu.stem}_cu.cpp"
        text = f'#line 1 "{cu}"\n' + translate(cu.read_text())  # diagnostics and reports name the .cu file
        if not target.is_file() or target.read_text() != text:  # unchanged files keep their timestamps: no recompile
            partial = target.with_suffix(f".{os.getpid()}.cpp")
            partial.write_text(text)
            os.replace(partial, target)  # whole, for another process compiling it meanwhile
        sources.append(target)
    flags = compile_flags(tool)
    runtime = runtime_object(tool, build)
    with _compilers_without_preload():
        load_extension(
            name=f"{OPS_NAMESPACE}_{csrc_digest(CSRC)[:12]}" + (f"_{tool}" if tool else ""),
            sources=[str(s) for s in sources],
            extra_cflags=flags,
            extra_ldflags=[str(runtime), *(f for f in flags if f.startswith("-fsanitize"))],
            build_directory=str(build),
            is_python_module=False,
            verbose=verbose,
        )
    return getattr(torch.ops, OPS_NAMESPACE)
