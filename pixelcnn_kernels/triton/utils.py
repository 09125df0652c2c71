"""Helpers shared by the Triton kernel modules.

Besides launch helpers, this keeps the registry of *compile cases*: every
kernel module registers each kernel with a concrete signature, and
``python -m pixelcnn_kernels.triton.compile_check`` compiles all of them for an
H100/H200 (sm_90) without a GPU, so compile errors surface in CI.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

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
) -> None:
    """Adds a kernel signature to the sm_90 ahead-of-time compile check.

    ``signature`` maps every non-constexpr argument to its Triton type
    (``"*fp32"``, ``"i32"``, ``"fp32"``); ``constexprs`` gives every constexpr.
    ``max_spill_bytes``: the register spill stores per thread the check lets pass (say why where not 0).
    ``divisible_ints``: whether launches pass multiples of 16 for the int arguments (channel counts,
    strides), as Triton then specialises; False for kernels taking counts such as K = 10 mixtures.
    ``launch_options``: the other compile options the launcher passes (``enable_fp_fusion``).
    """
    case = CompileCase(
        name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, max_spill_bytes, divisible_ints, dict(launch_options or {})
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
