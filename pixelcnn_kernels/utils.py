"""Argument checks, dtype and layout helpers shared by every op, a snapshot of modules' modes, and the commands' output-directory check.

Every public op validates its inputs here first, so bad input raises a
ValueError/TypeError naming the argument instead of reaching a kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The device types with autocast (torch.is_autocast_enabled raises for others, e.g. meta).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


class DTypeError(TypeError, ValueError):
    """A tensor argument of the wrong dtype: a TypeError, and a ValueError as the issues word a bad argument."""


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    allow_float64: bool = True,
) -> torch.Tensor:
    """Checks that ``t`` is a tensor of an accepted dtype and rank; returns it.

    float64 is accepted by default because the reference backend computes in it
    (kernel backends upcast their result check to it in tests).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        accepted = dtypes + ((torch.float64,) if allow_float64 and torch.float64 not in dtypes else ())
        if t.dtype not in accepted:
            names = ", ".join(str(d).removeprefix("torch.") for d in accepted)
            raise DTypeError(f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in ranks:
            expected = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {expected} dimensions, got shape {tuple(t.shape)}")
    return t


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's dtype when autocast is on for ``x``'s device.

    The custom ops are not autocast-aware, so the modules cast their operands themselves;
    doing it here for both op sets keeps the fused and reference-built layers identical.
    """
    device_type = x.device.type
    # The device types named, not torch.amp.is_autocast_available: torch 2.11's Dynamo cannot
    # trace that (a graph break per layer under torch.compile), 2.13's can.
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def writable_directory(path: str | Path) -> Path:
    """``path``, created if missing, after writing and removing a file in it: a command checks its
    output directory before the work, so that an unusable one fails now, not after it (OSError)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()
    return directory


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_dropout_rate(value: object, name: str) -> float:
    """``value`` as a float if it is a dropout rate in [0, 1) (not a bool); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Checks that all given tensors share one device; returns it."""
    present = {name: t for name, t in tensors.items() if t is not None}
    (first_name, first), *rest = present.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
    return first.device


def check_same_dtype(x: torch.Tensor, /, x_name: str = "x", **others: torch.Tensor | None) -> None:
    """DTypeError naming the first of ``others`` (None: absent) whose dtype is not ``x``'s (called ``x_name``)."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match")


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    """``dim`` as a non-negative index into a tensor of rank ``ndim``."""
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimensions")
    return dim % ndim


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(t: torch.Tensor) -> bool:
    """True when a 4-d tensor is stored channels-last (NHWC).

    With one channel both layouts fit; as PyTorch's convolutions do, the channel's
    stride decides: 1 (how :func:`channels_last` lays it out) is channels-last.
    """
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    return not t.is_contiguous() or (t.shape[1] == 1 and t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) stored channels-last (NHWC), as :func:`is_channels_last` reads it: ``t`` itself if it is.

    ``t.contiguous(memory_format=torch.channels_last)`` leaves a one-channel tensor
    as it is (both layouts fit), so its convolutions' outputs would be NCHW.
    """
    if is_channels_last(t):
        return t
    n, c, h, w = t.shape
    return torch.empty_strided(t.shape, (h * w * c, 1, w * c, c), dtype=t.dtype, device=t.device).copy_(t)


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) dense in ``like``'s layout: :func:`channels_last`, or NCHW-contiguous.

    An NCHW result gets the strides an empty NCHW tensor has (the custom ops' fake
    implementations'), also along dimensions of size 1, where a channels-last result
    is NCHW-contiguous too: a one-channel result's channel stride is H·W, not the 1 that
    :func:`is_channels_last` would read as channels-last.
    """
    if is_channels_last(like):
        return channels_last(t)
    t = t.contiguous()
    n, c, h, w = t.shape
    strides = (c * h * w, h * w, w, 1)
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


class TrainingModes:
    """The training flag of every submodule of ``modules`` as it is now.

    ``set(training)`` sets them all, ``restore()`` puts each one's back: by assignment, not
    ``Module.train()``, whose override could rebuild state from weights a caller substituted,
    and each module's own (one layer may be in eval mode inside a training model).
    """

    def __init__(self, *modules: torch.nn.Module):
        self.saved = {submodule: submodule.training for module in modules for submodule in module.modules()}

    def set(self, training: bool) -> None:
        for module in self.saved:
            module.training = training

    def restore(self) -> None:
        for module, training in self.saved.items():
            module.training = training
