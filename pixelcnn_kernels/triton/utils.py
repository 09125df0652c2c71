"""Helpers shared by the Triton kernel modules.

Besides launch helpers, this keeps the registry of *compile cases*: every
kernel module registers each kernel with a concrete signature, and
``python -m pixelcnn_kernels.triton.compile_check`` compiles all of them for an
H100/H200 (sm_90) without a GPU, so compile errors surface in CI. Under the CPU
interpreter it mends the interpreter's bfloat16 (:func:`_mend_interpreter_bfloat16`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from pixelcnn_kernels.backend import triton_interpret

_TRITON_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.uint8: "*u8",
}


def pointer_type(dtype: torch.dtype) -> str:
    """Triton signature string of a pointer to ``dtype`` (``"*fp32"``)."""
    return _TRITON_POINTER_TYPES[dtype]


@dataclass(frozen=True)
class CompileCase:
    """One kernel with a concrete signature, compiled ahead of time in CI."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    max_spill_bytes: int = 0
    divisible_ints: bool = True
    launch_options: dict[str, object] = field(default_factory=dict)
    min_copy_bytes: int = 0
    flushing_math: bool = False


COMPILE_CASES: list[CompileCase] = []


def register_compile_case(
    name: str,
    kernel,
    signature: dict[str, str],
    constexprs: dict | None = None,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    max_spill_bytes: int = 0,
    divisible_ints: bool = True,
    launch_options: dict | None = None,
    min_copy_bytes: int = 0,
    flushing_math: bool = False,
) -> None:
    """Adds a kernel signature to the sm_90 ahead-of-time compile check.

    ``signature`` maps every non-constexpr argument to its Triton type
    (``"*fp32"``, ``"i32"``, ``"fp32"``); ``constexprs`` gives every constexpr.
    ``max_spill_bytes``: the register spill stores per thread the check lets pass (say why where not 0).
    ``divisible_ints``: whether launches pass multiples of 16 for the int arguments (channel counts,
    strides), as Triton then specialises; False for kernels taking counts such as K = 10 mixtures.
    ``launch_options``: the other compile options the launcher passes (``enable_fp_fusion``).
    ``min_copy_bytes``: the narrowest global-to-shared ``cp.async`` the kernel may issue (0: not
    checked); 16 for a GEMM whose operands are aligned and contiguous along the reduction, where
    anything narrower, or no ``cp.async`` at all, means an operand lost its alignment or
    contiguity and the loop its 16-byte pipelined copies (the TF32 weight gradient's x rows took
    4-byte ones, 2026-11-30).
    ``flushing_math``: the kernel's float32 exponentials and divisions must be the one-instruction
    flushing forms (``ex2.approx.ftz``, no ``div.full``/``div.rn``), whose extra subnormal handling
    would take an elementwise bf16 kernel past what an H200 issues at copy bandwidth (gates.py).
    """
    case = CompileCase(
        name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, max_spill_bytes, divisible_ints, dict(launch_options or {}),
        min_copy_bytes, flushing_math,
    )
    COMPILE_CASES.append(case)


def launch_device(t: torch.Tensor):
    """Context making ``t``'s GPU the current device for a launch.

    Triton launches on the current device and its current stream, not on the tensors'
    device: without this, tensors on cuda:1 under current device 0 would be read by a
    kernel on GPU 0. A no-op for CPU tensors (the interpreter).
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Launch arithmetic on the host in plain Python: Triton 3.8 makes ``triton.cdiv`` and
# ``triton.next_power_of_2`` constexpr functions, ~2 µs a call from host code, and a
# training step makes hundreds of such calls.


def cdiv(n: int, d: int) -> int:
    """⌈n / d⌉ for non-negative ints."""
    return -(-n // d)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def needs_int64_index(*tensors: torch.Tensor) -> bool:
    """True when any offset into these tensors can exceed 2**31 - 1 elements."""
    return any(t.numel() >= 2**31 for t in tensors if t is not None)


def _mend_interpreter_bfloat16() -> None:
    """Makes the CPU interpreter compute bfloat16 as the GPU does, for the two uses the kernels make of it.

    Triton's interpreter (``TRITON_INTERPRET=1``; 3.6 and 3.8 alike) keeps bfloat16
    values as their uint16 bits, and (1) hands those bits to ``np.matmul`` in
    ``tl.dot``, which multiplies them as integers: every bfloat16 tile product came out
    as garbage, silently; (2) converts float32 to bfloat16 by truncation, where the GPU
    (``.to(tl.bfloat16)``, like torch) rounds to nearest even: stored results were up
    to an ulp off, in half of the elements. Mended here: dot operands are widened to
    float32 (exact: a bfloat16 is the upper half of a float32), which is what the
    tensor cores compute (exact products, float32 sums); float32 to bfloat16 rounds to
    nearest even, NaN to the canonical NaN 0x7FFF (as ``cvt.rn.bf16.f32``). The
    interpreter's bfloat16 arithmetic itself stays wrong and unused: the kernels
    convert every load that is not a ``tl.dot`` operand to float32 at once.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    create_dot, cast_impl = getattr(builder, "create_dot", None), getattr(builder, "cast_impl", None)
    if create_dot is None or cast_impl is None or getattr(create_dot, "mended_bfloat16", False):
        return

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    @functools.wraps(create_dot)
    def create_dot_of_widened_bfloat16(self, a, b, d, *args, **kwargs):
        return create_dot(self, widened(a), widened(b), d, *args, **kwargs)

    @functools.wraps(cast_impl)
    def cast_rounding_to_bfloat16(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return cast_impl(self, src, dst_type)
        values = np.asarray(src.data, dtype=np.float32)
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16  # to nearest, ties to even
        return interpreter.TensorHandle(np.where(np.isnan(values), np.uint32(0x7FFF), rounded).astype(np.uint16), tl.bfloat16)

    create_dot_of_widened_bfloat16.mended_bfloat16 = True
    builder.create_dot = create_dot_of_widened_bfloat16
    builder.cast_impl = cast_rounding_to_bfloat16


if triton_interpret():
    _mend_interpreter_bfloat16()
