"""Which implementation runs an op: ``reference``, ``triton`` or ``cuda``.

Default, per call: CUDA tensors go to ``cuda`` when the extension is built, else
to ``triton``; CPU tensors go to ``reference``. A backend can be forced with
:func:`use_backend` (a context manager that also works as a plain call) or the
environment variable ``PIXELCNN_KERNELS_BACKEND``. With ``TRITON_INTERPRET=1``
the ``triton`` backend accepts CPU tensors (that is how CI runs the kernels).

Forcing a backend that cannot run raises :class:`BackendUnavailableError` with
the reason, e.g. ``cuda backend unavailable: extension not built because torch
has no CUDA``.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

from pixelcnn_kernels import cuda_on_cpu
from pixelcnn_kernels.extension_sources import csrc_digest

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "PIXELCNN_KERNELS_BACKEND"

# Namespace of the ops the CUDA extension registers (csrc/*_ops.cpp).
CUDA_OPS_NAMESPACE = "pixelcnn_kernels_cuda"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the op here; the message says why."""


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def _build_info():
    """setup.py's record of the install (``_build_info.CUDA_EXTENSION_SKIPPED``), or None for an install without one."""
    try:
        return importlib.import_module("pixelcnn_kernels._build_info")
    except ImportError:
        return None


def _cuda_extension_error() -> str | None:
    """Why the compiled extension is unusable, or None; with PIXELCNN_KERNELS_CUDA_ON_CPU=1, its build for the CPU."""
    return _cuda_on_cpu_error() if cuda_on_cpu.enabled() else _compiled_extension_error()


@functools.lru_cache(maxsize=None)
def _cuda_on_cpu_error() -> str | None:
    """Builds and loads the CUDA kernels' build for the CPU once; returns why that failed, or None."""
    try:
        cuda_on_cpu.load()
    except Exception as exc:  # a compile error, or no toolkit headers: said as a missing extension is
        return f"{cuda_on_cpu.ENV_VAR} is set, but the CUDA kernels' build for the CPU failed: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_extension_error() -> str | None:
    """Loads the compiled extension once; returns why it is unusable, or None."""
    if torch.version.cuda is None:
        return f"extension not built because torch {torch.__version__} has no CUDA"
    try:
        importlib.import_module("pixelcnn_kernels._C")
    except ImportError as exc:
        if "No module named" in str(exc):
            skipped = getattr(_build_info(), "CUDA_EXTENSION_SKIPPED", None)
            why = f"at install time {skipped}" if skipped else "nvcc not found at install time, or PIXELCNN_KERNELS_SKIP_CUDA was set"
            return f"extension not built ({why}); reinstall with CUDA_HOME pointing at the CUDA toolkit"
        return f"extension failed to load: {exc}"
    return _stale_extension_reason(_CSRC)


# The extension's sources, where an editable install or a checkout has them beside the package.
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _stale_extension_reason(csrc: Path) -> str | None:
    """Why the built extension is out of date: built from other sources than ``csrc`` holds now
    (its ops' schemas may differ from the calls). None where that cannot be told (no sources
    at hand, no digest recorded) or it is current."""
    recorded = getattr(_build_info(), "CSRC_DIGEST", None)
    if recorded is None or not csrc.is_dir() or csrc_digest(csrc) == recorded:
        return None
    return f"extension out of date: built from other sources than {csrc} holds now; rebuild it (pip install --no-build-isolation -e .)"


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None: it can).

    Without a device, says whether the backend can run anywhere on this machine.
    """
    _check_name(backend)
    if backend == "reference":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
        on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
        if on_cpu and not triton_interpret():
            return "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU"
        return None
    error = _cuda_extension_error()
    if error is not None:
        return error
    if cuda_on_cpu.enabled():
        if device is not None and device.type != "cpu":
            return f"with {cuda_on_cpu.ENV_VAR}=1 the CUDA kernels run on CPU tensors, got tensors on {device}"
        return None
    if device is not None and device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got tensors on {device}"
    if device is None and not torch.cuda.is_available():
        return "extension built, but no CUDA device is visible"
    return None


def available_backends() -> dict[str, str | None]:
    """Every backend mapped to None (usable here) or the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# The use_backend calls in force, oldest first; the last one decides. Process-wide, not per thread:
# autograd runs a CUDA backward on its own device threads, which must see the backend forced around
# ``loss.backward()`` as the forward's thread does. A context leaves by removing its own entry, so
# contexts that threads leave in any order still end with the choice made before them.
_in_force: list["use_backend"] = []


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or the environment, or None."""
    forced = _in_force[-1].backend if _in_force else None
    if forced is not None:
        return forced
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        if from_env not in BACKENDS:
            raise ValueError(f"the environment variable {ENV_VAR} must be one of {BACKENDS} (or unset), got {from_env!r}")
        return from_env
    return None


class use_backend:
    """Force every op onto one backend.

    As a context manager it restores the previous choice on exit::

        with pixelcnn_kernels.use_backend("triton"):
            y = model(x)

    As a plain call it stays in force until the next call; ``use_backend(None)``
    returns to the automatic choice. The choice is process-wide, like
    ``torch.backends`` flags: a backward pass run inside it (on autograd's threads
    too) runs on that backend, one run after it on whatever is in force then; and
    threads forcing different backends at once see the latest one entered.
    """

    def __init__(self, backend: str | None):
        if backend is not None:
            _check_name(backend)
            reason = unavailable_reason(backend)
            if reason is not None:
                raise BackendUnavailableError(f"{backend} backend unavailable: {reason}")
        self.backend = backend
        _in_force.append(self)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc_info) -> None:
        _in_force.remove(self)


def resolve_backend(*tensors: torch.Tensor | None) -> str:
    """The backend to run an op on ``tensors`` (None entries are ignored).

    Raises ValueError when the tensors are on different devices and
    BackendUnavailableError when the forced backend cannot run them. Meta tensors
    (shapes without data: nothing to compute) take the reference, whatever is forced.
    """
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "meta":
        return "reference"
    forced = forced_backend()
    if forced is not None:
        reason = unavailable_reason(forced, device)
        if reason is not None:
            raise BackendUnavailableError(f"{forced} backend unavailable: {reason}")
        return forced
    if device.type != "cuda":
        return "reference"
    # On every call of an op: cached checks only (the CUDA kernels' build for the CPU takes no CUDA tensors).
    if not cuda_on_cpu.enabled() and _cuda_extension_error() is None:
        return "cuda"
    if _triton_import_error() is None:
        return "triton"
    return "reference"


def resolve_kernel_backend(dtype: torch.dtype, kernels: str, *tensors: torch.Tensor | None) -> str:
    """:func:`resolve_backend`, for an op whose kernels take ``dtype`` float32, float16 or bfloat16 only.

    float64 (for checking) runs the reference when the backend is chosen automatically; a
    forced kernel backend raises BackendUnavailableError naming the ``kernels`` that refuse it.
    """
    backend = resolve_backend(*tensors)
    if backend == "reference" or dtype != torch.float64:
        return backend
    if forced_backend() is not None:
        raise BackendUnavailableError(f"{backend} backend unavailable: its {kernels} kernels take float32, float16 or bfloat16, got float64")
    return "reference"


def backend_with_cuda_op(backend: str, cuda_op: str, device: torch.device) -> str:
    """``backend``, unless it is ``cuda`` and the built extension lacks the op ``cuda_op``.

    An extension built before the op existed lacks it: then a forced ``cuda`` raises
    BackendUnavailableError saying so, and an automatic choice falls back to ``triton``
    (``reference`` where Triton cannot run on ``device``).
    """
    if backend != "cuda" or hasattr(cuda_ops(), cuda_op):
        return backend
    if forced_backend() is not None:
        raise BackendUnavailableError(f"cuda backend unavailable: the extension has no {cuda_op} op (rebuild it)")
    return "triton" if unavailable_reason("triton", device) is None else "reference"


def cuda_ops():
    """``torch.ops.pixelcnn_kernels_cuda`` after making sure the extension is loaded
    (with PIXELCNN_KERNELS_CUDA_ON_CPU=1, ``torch.ops.pixelcnn_kernels_cuda_on_cpu``)."""
    error = _cuda_extension_error()
    if error is not None:
        raise BackendUnavailableError(f"cuda backend unavailable: {error}")
    return getattr(torch.ops, cuda_on_cpu.OPS_NAMESPACE if cuda_on_cpu.enabled() else CUDA_OPS_NAMESPACE)
