"""The package's mend of Triton's CPU interpreter for bfloat16 (``pixelcnn_kernels.triton.utils``).

Unmended, the interpreter multiplies bfloat16 ``tl.dot`` operands as their uint16 bits and
truncates float32 to bfloat16; mended, both are what a GPU computes, so the kernels'
bfloat16 paths are tested on the CPU. On a GPU machine there is no interpreter to mend.
"""

import numpy as np
import pytest
import torch

from pixelcnn_kernels.backend import triton_interpret

pytestmark = pytest.mark.skipif(not triton_interpret(), reason="a mend of the CPU interpreter (TRITON_INTERPRET=1); a GPU needs none")

triton = pytest.importorskip("triton")
tl = triton.language

from pixelcnn_kernels.triton.utils import _mend_interpreter_bfloat16  # noqa: E402  (importing it mends the interpreter)


@triton.jit
def _to_bfloat16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(tl.bfloat16), mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    tile = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def test_float32_to_bfloat16_rounds_to_nearest_even_as_torch():
    """Ties (down to even and up to even), a carry into the next binade, the largest finite float
    rounding to inf, ±0, subnormals, ±inf and 2^16 random bit patterns: torch's bits; NaN: the
    canonical NaN a GPU's conversion gives."""
    edges = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000000, 0x80000000,
             0x00000001, 0x007FFFFF, 0x80008000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001]  # fmt: skip
    random = np.random.default_rng(0).integers(0, 2**32, 2**16, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(np.concatenate([np.array(edges, dtype=np.uint32), random]).view(np.float32))
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    block = 4096
    _to_bfloat16_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    numbers = ~torch.isnan(x)
    assert torch.equal(y[numbers].view(torch.int16), x[numbers].to(torch.bfloat16).view(torch.int16))
    assert torch.all(y[~numbers].view(torch.int16) == 0x7FFF)


def test_bfloat16_dot_multiplies_numbers():
    """Exact products summed in float32, as the tensor cores do."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=generator).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)


def test_the_mend_is_applied_at_import_and_once():
    builder = triton.runtime.interpreter.InterpreterBuilder
    mended = builder.create_dot, builder.cast_impl
    assert getattr(mended[0], "mended_bfloat16", False)
    _mend_interpreter_bfloat16()  # a second import path, e.g. a reload: no second wrapper
    assert (builder.create_dot, builder.cast_impl) == mended
