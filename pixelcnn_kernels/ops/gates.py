"""The gated activations as custom ops: ``gate_tanh_sigmoid``, ``gate_sigmoid``, ``concat_elu``.

Definitions (and the ``cond`` and colour ``groups`` conventions) in :mod:`pixelcnn_kernels.reference.gates`.
Each public function validates its arguments, then calls a
``torch.library`` custom op (``pixelcnn_kernels::<name>``) that runs on the
backend :func:`~pixelcnn_kernels.backend.resolve_backend` picks; its backward is
the custom op ``pixelcnn_kernels::<name>_backward``, which recomputes from ``x``
(the forward saves no activations).

Layouts: the kernels see ``x`` in memory order as rows ``(outer, size, inner)``
around ``dim``, which any dense tensor gives without a copy (contiguous with
any ``dim``, channels-last, or any other permutation of dimensions); the output
has ``x``'s dimension order in memory, so channels-last stays channels-last.
A tensor that is not dense (a slice, an expanded tensor) is copied once, as is
one whose batch dimension is laid out inside ``dim`` when ``cond`` is given.
float64 inputs (for checking: the kernels take float32, float16 and bfloat16)
run the reference when the backend is chosen automatically; a forced kernel
backend refuses them.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from pixelcnn_kernels.backend import cuda_ops, resolve_kernel_backend
from pixelcnn_kernels.masks import check_gated_color_channels, color_group_size
from pixelcnn_kernels.ops.registration import autograd_inside_custom_op, custom_op, eager_fast_path
from pixelcnn_kernels.reference import gates as reference
from pixelcnn_kernels.utils import DTypeError, check_int, check_same_device, check_same_dtype, check_tensor, compute_dtype, normalize_dim

__all__ = ["concat_elu", "gate_sigmoid", "gate_tanh_sigmoid"]


# --------------------------------------------------------------------- validation


def _check_x_and_dim(x: torch.Tensor, dim: int) -> int:
    """Checks ``x`` and ``dim``; returns ``dim`` as a non-negative index."""
    check_tensor(x, "x")
    return normalize_dim(check_int(dim, "dim"), x.dim())


def _check_gate_args(x: torch.Tensor, dim: int, cond: torch.Tensor | None, groups: int) -> int:
    """Checks a gate's arguments; returns ``dim`` as a non-negative index."""
    dim = _check_x_and_dim(x, dim)
    if x.shape[dim] % 2:
        raise ValueError(f"x.shape[{dim}] must be even to split x into two halves along dim={dim}, got shape {tuple(x.shape)}")
    check_int(groups, "groups", 1)
    if x.shape[dim]:
        check_gated_color_channels(x.shape[dim] // 2, groups, f"x.shape[{dim}] // 2 (gated channels)")
    if cond is not None:
        check_tensor(cond, "cond")
        if cond.dtype != x.dtype:
            raise DTypeError(f"cond must have x's dtype {x.dtype}, got {cond.dtype}")
        check_same_device(x=x, cond=cond)
        if dim == 0:
            raise ValueError("cond is a per-(batch, channel) bias, so dim must not be 0 (the batch dimension) when cond is given")
        expected = (x.shape[0], x.shape[dim])
        if tuple(cond.shape) != expected:
            raise ValueError(f"cond must have shape (x.shape[0], x.shape[dim]) = {expected}, got {tuple(cond.shape)}")
    return dim


# ------------------------------------------------------------------------ layouts


def _memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """x's dimensions from the largest stride to the smallest.

    A stable sort: size-1 dimensions, whose strides are arbitrary, keep their
    place. ``x.permute(_memory_order(x))`` is contiguous exactly when x is dense
    and non-overlapping.
    """
    return tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


def _resized(shape: Sequence[int], dim: int, size: int) -> list[int]:
    return [size if d == dim else s for d, s in enumerate(shape)]


@dataclasses.dataclass(frozen=True)
class _RowsLayout:
    """A dense tensor seen in memory order as ``(outer, size along dim, inner)``.

    ``perm`` lists the dimensions from the slowest to the fastest in memory, so
    ``t.permute(perm)`` of a tensor in this layout is contiguous.
    """

    perm: tuple[int, ...]
    outer: int
    inner: int

    @classmethod
    def of(cls, x: torch.Tensor, dim: int) -> "_RowsLayout":
        perm = _memory_order(x)
        at = perm.index(dim)
        return cls(perm, math.prod(x.shape[d] for d in perm[:at]), math.prod(x.shape[d] for d in perm[at + 1 :]))

    def rows(self, t: torch.Tensor, *middle: int) -> torch.Tensor:
        """``t`` as a contiguous ``(outer, *middle, inner)``: a view when ``t`` is in this layout, else one copy."""
        return t.permute(self.perm).reshape(self.outer, *middle, self.inner).contiguous()

    def from_rows(self, rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The contiguous ``rows`` viewed as a tensor of ``shape`` in this layout."""
        return rows.view([shape[d] for d in self.perm]).permute(self._inverse_perm())

    def empty(self, like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in this layout, with ``like``'s dtype and device."""
        return self.from_rows(like.new_empty([shape[d] for d in self.perm]), shape)

    def _inverse_perm(self) -> list[int]:
        inverse = [0] * len(self.perm)
        for position, d in enumerate(self.perm):
            inverse[d] = position
        return inverse


def _dense_input(x: torch.Tensor, dim: int, cond: torch.Tensor | None) -> torch.Tensor:
    """``x``, or one copy of it, in a layout the kernels index as rows.

    The copy keeps x's memory format where torch can tell it (``preserve_format``);
    with ``cond``, the kernels find a row's batch index as ``row // batch_div``,
    which needs the batch dimension outside ``dim`` in memory.
    """
    if not x.permute(_memory_order(x)).is_contiguous():
        x = x.clone(memory_format=torch.preserve_format)
    if cond is not None and x.shape[0] > 1 and x.stride(0) < x.stride(dim):
        x = x.contiguous()
    return x


def _batch_div(x: torch.Tensor, dim: int, layout: _RowsLayout) -> int:
    """Rows of ``(outer, ...)`` per batch element: row ``o`` is in batch ``(o // batch_div) % batch``
    (1 for one image, and for an empty x, which has no rows)."""
    return x.stride(0) // (x.shape[dim] * layout.inner) if x.shape[0] > 1 and x.numel() > 0 else 1


def _kernels(backend: str):
    """The launchers of a kernel backend; the Triton module and the CUDA ops share their names."""
    if backend == "triton":
        from pixelcnn_kernels.triton import gates

        return gates
    return cuda_ops()


def _reference_input_grad(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad``'s vector-Jacobian product with ``forward`` at ``x``, by autograd."""
    with autograd_inside_custom_op():
        x_leaf = x.detach().requires_grad_(True)
        (dx,) = torch.autograd.grad(forward(x_leaf), x_leaf, grad)
    return dx


def _check_accumulate(accumulate: torch.Tensor | None, x: torch.Tensor) -> None:
    """A gate backward's ``accumulate``, if given, must be like x: its shape, dtype and device."""
    if accumulate is None:
        return
    check_same_dtype(x, accumulate=accumulate)
    check_same_device(x=x, accumulate=accumulate)
    if accumulate.shape != x.shape:
        raise ValueError(f"accumulate must have x's shape {tuple(x.shape)}, got {tuple(accumulate.shape)}")


def _cond_grad(dx: torch.Tensor, dim: int, cond: torch.Tensor) -> torch.Tensor:
    """d loss / d cond: ``dx`` (the gradient of ``x + cond``) summed over all but dims 0 and ``dim``."""
    summed = [d for d in range(dx.dim()) if d not in (0, dim)]
    if not summed:  # sum over an empty list of dims would sum everything
        return dx.to(cond.dtype)
    return dx.sum(summed, dtype=compute_dtype(dx.dtype)).to(cond.dtype)


# -------------------------------------------------------------------------- gates


def _define_gate(name: str, tanh_gate: bool, reference_gate: Callable) -> tuple[Callable, Callable]:
    """Defines the custom ops ``pixelcnn_kernels::<name>`` and ``<name>_backward``; returns both (:func:`eager_fast_path`)."""

    @custom_op(f"pixelcnn_kernels::{name}")
    def forward_op(x: torch.Tensor, dim: int, cond: Optional[torch.Tensor], groups: int = 1) -> torch.Tensor:
        x = _dense_input(x, dim, cond)
        layout = _RowsLayout.of(x, dim)
        half = x.shape[dim] // 2
        out_shape = _resized(x.shape, dim, half)
        backend = resolve_kernel_backend(x.dtype, "activation", x, cond)
        if backend == "reference":
            return layout.empty(x, out_shape).copy_(reference_gate(x, dim, cond, groups))
        y_rows = _kernels(backend).gate_forward(layout.rows(x, 2, half), cond, _batch_div(x, dim, layout), tanh_gate, color_group_size(half, groups))
        return layout.from_rows(y_rows, out_shape)

    @forward_op.register_fake
    def _(x, dim, cond, groups=1):
        x = _dense_input(x, dim, cond)
        return _RowsLayout.of(x, dim).empty(x, _resized(x.shape, dim, x.shape[dim] // 2))

    @custom_op(f"pixelcnn_kernels::{name}_backward")
    def backward_op(
        grad: torch.Tensor, x: torch.Tensor, dim: int, cond: Optional[torch.Tensor], accumulate: Optional[torch.Tensor] = None, groups: int = 1
    ) -> torch.Tensor:
        """The gradient w.r.t. x (and x + cond) given the output's ``grad``, plus ``accumulate`` (x's shape,
        dtype and device, or None: x's gradient from its other uses); the kernel backends add it in the
        same pass, in fp32 before the one rounding (the reference adds it to the rounded gradient)."""
        _check_accumulate(accumulate, x)
        x = _dense_input(x, dim, cond)
        layout = _RowsLayout.of(x, dim)
        backend = resolve_kernel_backend(x.dtype, "activation", grad, x, cond, accumulate)
        if backend == "reference":
            dx = _reference_input_grad(lambda x_leaf: reference_gate(x_leaf, dim, cond, groups), x, grad)
            return layout.empty(x, x.shape).copy_(dx if accumulate is None else dx + accumulate)
        half = x.shape[dim] // 2
        accumulate_rows = None if accumulate is None else layout.rows(accumulate, 2, half)
        dx_rows = _kernels(backend).gate_backward(
            layout.rows(grad, half), layout.rows(x, 2, half), cond, accumulate_rows, _batch_div(x, dim, layout), tanh_gate,
            color_group_size(half, groups),
        )  # fmt: skip
        return layout.from_rows(dx_rows, x.shape)

    @backward_op.register_fake
    def _(grad, x, dim, cond, accumulate=None, groups=1):
        _check_accumulate(accumulate, x)
        x = _dense_input(x, dim, cond)
        return _RowsLayout.of(x, dim).empty(x, x.shape)

    def setup_context(ctx, inputs, output):
        x, ctx.dim, cond, ctx.groups = inputs
        ctx.save_for_backward(x, cond)

    backward_call = eager_fast_path(backward_op)

    def backward(ctx, grad):
        x, cond = ctx.saved_tensors
        dx = backward_call(grad, x, ctx.dim, cond, None, ctx.groups)
        dcond = _cond_grad(dx, ctx.dim, cond) if cond is not None and ctx.needs_input_grad[2] else None
        return dx, None, dcond, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return eager_fast_path(forward_op), backward_call


_gate_tanh_sigmoid_call, gate_tanh_sigmoid_backward = _define_gate("gate_tanh_sigmoid", True, reference.gate_tanh_sigmoid)
_gate_sigmoid_call, gate_sigmoid_backward = _define_gate("gate_sigmoid", False, reference.gate_sigmoid)


def gate_tanh_sigmoid(x: torch.Tensor, dim: int = 1, cond: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """Gated PixelCNN's gate ``tanh(a) * sigmoid(b)``, ``a, b = (x + cond).chunk(2, dim)``.

    Args:
        x: float32, float16, bfloat16 (or float64, reference only) tensor of any
            rank and layout whose size along ``dim`` is even.
        dim: the dimension split in two halves (default 1, the channels of NCHW).
        cond: optional per-(batch, channel) bias of shape ``(x.shape[0],
            x.shape[dim])`` and x's dtype, broadcast over the other dimensions:
            ``a`` gets ``cond[:, :C]``, ``b`` gets ``cond[:, C:]``. Needs ``dim != 0``.
        groups: 1, or the colour groups of a colour-masked conv's output: the channels
            along ``dim`` are ``groups`` blocks [a_1 b_1 | a_2 b_2 | ...], each twice an
            output colour group (:mod:`pixelcnn_kernels.reference.gates`); ``cond`` in
            the same order.

    Returns:
        ``x``'s shape with ``dim`` halved, in ``x``'s dtype and memory layout.

    Raises:
        TypeError: ``x`` or ``cond`` is not a floating tensor, or their dtypes differ, or ``dim`` or ``groups`` is not an int.
        ValueError: ``dim`` is out of range, ``x.shape[dim]`` is odd or does not split into ``groups`` blocks of two
            halves, or ``cond`` has the wrong shape or device.
    """
    dim = _check_gate_args(x, dim, cond, groups)
    return _gate_tanh_sigmoid_call(x, dim, cond, groups)


def gate_sigmoid(x: torch.Tensor, dim: int = 1, cond: torch.Tensor | None = None, groups: int = 1) -> torch.Tensor:
    """PixelCNN++'s gate ``a * sigmoid(b)``, ``a, b = (x + cond).chunk(2, dim)``.

    Arguments, result and errors as in :func:`gate_tanh_sigmoid`.
    """
    dim = _check_gate_args(x, dim, cond, groups)
    return _gate_sigmoid_call(x, dim, cond, groups)


# ---------------------------------------------------------------------- concat_elu


@custom_op("pixelcnn_kernels::concat_elu")
def _concat_elu_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = _dense_input(x, dim, None)
    layout = _RowsLayout.of(x, dim)
    out_shape = _resized(x.shape, dim, 2 * x.shape[dim])
    backend = resolve_kernel_backend(x.dtype, "activation", x)
    if backend == "reference":
        return layout.empty(x, out_shape).copy_(reference.concat_elu(x, dim))
    x_rows = layout.rows(x, x.shape[dim]).view(layout.outer, x.shape[dim] * layout.inner)
    y_rows = _kernels(backend).concat_elu_forward(x_rows)
    return layout.from_rows(y_rows, out_shape)


@_concat_elu_op.register_fake
def _(x, dim):
    x = _dense_input(x, dim, None)
    return _RowsLayout.of(x, dim).empty(x, _resized(x.shape, dim, 2 * x.shape[dim]))


@custom_op("pixelcnn_kernels::concat_elu_backward")
def _concat_elu_backward_op(grad: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    x = _dense_input(x, dim, None)
    layout = _RowsLayout.of(x, dim)
    backend = resolve_kernel_backend(x.dtype, "activation", grad, x)
    if backend == "reference":
        dx = _reference_input_grad(lambda x_leaf: reference.concat_elu(x_leaf, dim), x, grad)
        return layout.empty(x, x.shape).copy_(dx)
    size = x.shape[dim]
    x_rows = layout.rows(x, size).view(layout.outer, size * layout.inner)
    grad_rows = layout.rows(grad, 2 * size).view(layout.outer, 2, size * layout.inner)
    return layout.from_rows(_kernels(backend).concat_elu_backward(grad_rows, x_rows), x.shape)


@_concat_elu_backward_op.register_fake
def _(grad, x, dim):
    x = _dense_input(x, dim, None)
    return _RowsLayout.of(x, dim).empty(x, x.shape)


def _concat_elu_setup_context(ctx, inputs, output):
    x, ctx.dim = inputs
    ctx.save_for_backward(x)


_concat_elu_backward_call = eager_fast_path(_concat_elu_backward_op)


def _concat_elu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _concat_elu_backward_call(grad, x, ctx.dim), None


_concat_elu_op.register_autograd(_concat_elu_backward, setup_context=_concat_elu_setup_context)
_concat_elu_call = eager_fast_path(_concat_elu_op)


def concat_elu(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """PixelCNN++'s ``concat_elu(x) = elu(cat([x, -x], dim))``.

    Args:
        x: float32, float16, bfloat16 (or float64, reference only) tensor of any rank and layout.
        dim: the dimension along which ``x`` and ``-x`` are concatenated (default 1).

    Returns:
        ``x``'s shape with ``dim`` doubled, in ``x``'s dtype and memory layout.

    Raises:
        TypeError: ``x`` is not a floating tensor or ``dim`` is not an int.
        ValueError: ``dim`` is out of range.
    """
    dim = _check_x_and_dim(x, dim)
    return _concat_elu_call(x, dim)
