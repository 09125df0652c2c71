"""Build script: the Python package always, the CUDA extension when it can be built.

The extension (``pixelcnn_kernels._C``) is compiled from ``csrc/`` when torch was
built with CUDA and ``nvcc`` is found, unless ``PIXELCNN_KERNELS_SKIP_CUDA=1``.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0``) and
``MAX_JOBS`` the parallel compile jobs, as for any torch extension.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0"


def _cuda_skip_reason():
    """Why the CUDA extension cannot be built here, or None if it can."""
    if os.environ.get("PIXELCNN_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return "PIXELCNN_KERNELS_SKIP_CUDA is set"
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    # torch.utils.cpp_extension reads CUDA_HOME when first imported.
    os.environ["CUDA_HOME"] = cuda_home
    return None


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc's toolkit.

    A toolkit counts only if it holds bin/nvcc and include/cuda_runtime.h; an
    `nvcc` on PATH may be a wrapper script, so its own location is checked too.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _package_module(name):
    """pixelcnn_kernels.<name>, loaded by path: the package's __init__ imports torch and the
    extension, neither of which a build may need."""
    spec = importlib.util.spec_from_file_location(name, os.path.join("pixelcnn_kernels", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csrc_digest():
    return _package_module("extension_sources").csrc_digest("csrc")


def _record_build(reason):
    """Writes why the extension was not built (None: it was) into the package, where
    ``pixelcnn-kernels info`` quotes it (pip shows a build's own output only with -v),
    and the digest of the sources it is built from (pixelcnn_kernels.backend checks it)."""
    digest = _csrc_digest() if reason is None else None
    with open(os.path.join("pixelcnn_kernels", "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py at install time."""\n\nCUDA_EXTENSION_SKIPPED = {reason!r}\nCSRC_DIGEST = {digest!r}\n')


def _extensions():
    reason = _cuda_skip_reason()
    _record_build(reason)
    if reason is not None:
        print(f"pixelcnn-kernels: installing without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    print(
        f"pixelcnn-kernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        file=sys.stderr,
    )

    class BuildSharingTorchsCxxRuntime(BuildExtension):
        """Refuses an extension that carries its own libstdc++ (pixelcnn_kernels/extension_linkage.py says why)."""

        def build_extension(self, ext):
            super().build_extension(ext)
            if _package_module("extension_linkage").carries_its_own_cxx_runtime(self.get_ext_fullpath(ext.name)):
                compiler = getattr(self.compiler, "compiler_cxx", None) or [os.environ.get("CXX", "c++")]
                raise RuntimeError(
                    f"pixelcnn-kernels: the C++ compiler ({compiler[0]}) linked its own copy of libstdc++ into "
                    "the CUDA extension, which makes its error messages crash the process; build with a compiler that links the "
                    "shared libstdc++ as torch does (e.g. CXX=/usr/bin/g++), or set PIXELCNN_KERNELS_SKIP_CUDA=1"
                )

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        name="pixelcnn_kernels._C",
        sources=sources,
        # No --use_fast_math: the kernels must match the reference to rounding;
        # where an approximate intrinsic is good enough the kernel uses it by name.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        # The shared libstdc++ by name, ahead of the driver's own -lstdc++: a compiler that links
        # libstdc++ statically (-static-libstdc++) then finds every symbol already resolved.
        extra_link_args=["-lstdc++"],
    )
    return [extension], {"build_ext": BuildSharingTorchsCxxRuntime}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
