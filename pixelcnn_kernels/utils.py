"""Argument checks, dtype helpers and custom-op plumbing shared by every op.

Every public op validates its inputs here first, so bad input raises a
ValueError/TypeError naming the argument instead of reaching a kernel.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

    An NCHW one-channel result gets the channel stride H·W an empty NCHW tensor has
    (the custom ops' fake implementations' strides), not the 1 that
    :func:`is_channels_last` would read as channels-last.
    """
    if is_channels_last(like):
        return channels_last(t)
    t = t.contiguous()
    n, c, h, w = t.shape
    return t.as_strided(t.shape, (c * h * w, h * w, w, 1)) if c == 1 else t


@contextlib.contextmanager
def autograd_inside_custom_op():
    """Lets the reference backward take autograd through the reference forward.

    A custom op's body runs with the autograd dispatch keys excluded, where
    ``torch.enable_grad()`` alone records nothing; this lifts the exclusion for
    the block. (``torch.func.vjp`` would not need it, but fails under
    ``opcheck``'s fake-tensor cross-check.) Uses private torch API (functorch's guards).
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA, torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _no_context(ctx, inputs, output) -> None:
    """The ``setup_context`` of an op whose backward needs nothing saved."""


def _plain_eager(args: tuple) -> bool:
    """Whether nothing would intercept or record a custom op called on ``args``: not torch.compile
    nor jit tracing, no dispatch or torch-function mode (FakeTensor, make_fx, FlopCounterMode,
    ``with torch.device(...)``), no functorch transform, no forward-mode AD level, the profiler
    off (its traces name the ops), plain tensors."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or is_in_torch_dispatch_mode()
        or torch._C._len_torch_function_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
        or torch.autograd._profiler_enabled()
    ):
        return False
    return all(type(a) in _PLAIN_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


# The device types with autocast (torch.is_autocast_enabled raises for others, e.g. meta).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def _without_autocast(impl: Callable) -> Callable:
    """``impl`` run with autocast off (its signature kept: torch.library reads the schema from it)."""

    @functools.wraps(impl)
    def run(*args):
        enabled = [device_type for device_type in _AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(device_type)]
        if not enabled:
            return impl(*args)
        with contextlib.ExitStack() as stack:
            for device_type in enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return impl(*args)

    return run


def custom_op(name: str) -> Callable[[Callable], object]:
    """``torch.library.custom_op(name, mutates_args=())`` on an implementation that runs with autocast off.

    Autocast passes by a custom op without an autocast rule, but would cast the ops inside
    its implementation: under bfloat16 autocast the reference backend's F.conv2d of float32
    inputs returned bfloat16, where the kernel backends and the fake implementation give
    the inputs' dtype. The ops compute in their inputs' dtype on every backend; the layers
    cast their operands to autocast's dtype themselves.
    """

    def define(impl: Callable):
        # The schema from impl itself: inferred from the wrapper, string annotations would be
        # evaluated in this module's globals instead of impl's.
        schema = torch.library.infer_schema(impl, mutates_args=())
        return torch.library.custom_op(name, _without_autocast(impl), mutates_args=(), schema=schema)

    return define


def eager_fast_path(op) -> Callable:
    """``op``, a ``torch.library.custom_op``, callable without torch.library's dispatch in plain eager calls.

    The dispatch costs 30–75 µs of host time per call (two trips through the dispatcher,
    the schema's defaults filled in Python, Dynamo-disabled wrappers), as long as many of
    the kernels behind it run on a GPU; a training step makes hundreds of calls. Plain
    eager calls (:func:`_plain_eager`) run the op's own implementation instead, under an
    autograd.Function made of its registered ``setup_context`` and ``backward``: the same
    code, values and gradients. An op without autograd runs it directly when grad mode is
    off (inside a backward pass), else as the op. Everything else (torch.compile, fake
    tensors, opcheck, vmap, jit tracing, a torch-function mode, the profiler, forward AD)
    calls ``op``. Register the op's autograd before wrapping it.
    Reads the op's implementation from ``CustomOpDef``'s private fields; without them
    (another torch), every call goes through ``op``. Positional arguments only.
    """
    impl = getattr(op, "_init_fn", None)
    backward = getattr(op, "_backward_fn", None)
    if impl is None:
        return op
    if backward is None:

        def call_without_autograd(*args):
            return impl(*args) if not torch.is_grad_enabled() and _plain_eager(args) else op(*args)

        return call_without_autograd
    setup_context = op._setup_context_fn or _no_context

    def forward(ctx, *args):
        # forward(ctx, ...), not a separate setup_context: apply then binds the arguments
        # to the signature with inspect, ~60 µs a call.
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{op._name}_function", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if not _plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return impl(*args)  # no graph to record: not even the Function's ~15 µs

    return call
