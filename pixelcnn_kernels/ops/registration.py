"""How the public ops are defined with ``torch.library`` and called.

- :func:`custom_op`: defines an op on an implementation that runs with autocast off
  (every backend then computes in its inputs' dtype, as the fakes say);
- :func:`eager_fast_path`: calls an op without torch.library's dispatch (tens of µs of
  host time a call) where nothing would intercept or record the call;
- :func:`autograd_inside_custom_op`: lets a reference backward take autograd through
  the reference forward inside an op's body.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from pixelcnn_kernels.utils import AUTOCAST_DEVICE_TYPES


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


def plain_eager(args: tuple) -> bool:
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


def without_autocast(impl: Callable) -> Callable:
    """``impl`` run with autocast off (its signature kept: torch.library reads the schema from it)."""

    @functools.wraps(impl)
    def run(*args):
        enabled = [device_type for device_type in AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(device_type)]
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
        return torch.library.custom_op(name, without_autocast(impl), mutates_args=(), schema=schema)

    return define


def eager_fast_path(op) -> Callable:
    """``op``, a ``torch.library.custom_op``, callable without torch.library's dispatch in plain eager calls.

    The dispatch costs 30–75 µs of host time per call (two trips through the dispatcher,
    the schema's defaults filled in Python, Dynamo-disabled wrappers), as long as many of
    the kernels behind it run on a GPU; a training step makes hundreds of calls. Plain
    eager calls (:func:`plain_eager`) run the op's own implementation instead, under an
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
            return impl(*args) if not torch.is_grad_enabled() and plain_eager(args) else op(*args)

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
        if not plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return impl(*args)  # no graph to record: not even the Function's ~15 µs

    return call
