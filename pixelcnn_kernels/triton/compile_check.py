"""Compile every registered Triton kernel for sm_90 (H100/H200) without a GPU.

Run as ``python -m pixelcnn_kernels.triton.compile_check``; exits non-zero and
names the kernel when one fails. It must run without ``TRITON_INTERPRET``
(interpreted kernels cannot be compiled), so the test suite starts it in a
subprocess.

A kernel fails when it needs more shared memory than a block may have, when it
spills more registers than its case allows (none unless registered otherwise), or when
its case asks for 16-byte pipelined operand copies (``cp.async``) and it issues narrower
ones or none, or when its case asks for flushing float32 math and it computes an exponential
or a division in a form that handles subnormals (several instructions more each): the
registers and spill stores are those Triton's own ptxas reports (``-v``) for the
kernel's PTX, the figures a GPU would run with, found without one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import traceback

KERNEL_MODULES = ("gates", "dmol", "masked_conv", "sampling")
# Shared memory one block may use (opted in; Triton opts in at launch) per compute capability:
# a kernel needing more compiles, then fails at its first launch with OutOfResources.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _load_cases():
    from pixelcnn_kernels.triton.utils import COMPILE_CASES

    for module in KERNEL_MODULES:
        importlib.import_module(f"pixelcnn_kernels.triton.{module}")
    return COMPILE_CASES


def compile_case(case, capability: int = 90, warp_size: int = 32):
    """Compiles one case to a cubin for the given compute capability."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = dict(case.signature)
    for name in case.constexprs:
        signature[name] = "constexpr"
    # Specialise as a launch does: torch's allocations are 16-byte aligned, so a launch marks pointers
    # divisible by 16, and ints too where they are (the models' channel counts and strides; a case
    # whose ints are not says so). Without the hint, 16-bit loads are neither vectorised nor
    # pipelined and the shared memory is a fraction of a launch's.
    hinted = ("i32", "i64") if case.divisible_ints else ()
    attrs = {(case.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in case.signature.items() if kind.startswith("*") or kind in hinted}
    source = triton.compiler.ASTSource(fn=case.kernel, signature=signature, constexprs=case.constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", capability, warp_size), options={"num_warps": case.num_warps, "num_stages": case.num_stages, **case.launch_options}
    )


def register_usage(compiled, capability: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of a compiled kernel, from Triton's ptxas ``-v`` on its PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        result = subprocess.run(
            [get_ptxas(capability).path, f"-arch={sm_arch_from_capability(capability)}", "-v", ptx.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = result.stdout + result.stderr
    return int(re.search(r"Used (\d+) registers", report).group(1)), int(re.search(r"(\d+) bytes spill stores", report).group(1))


def async_copy_bytes(compiled) -> list[int]:
    """The size in bytes of every global-to-shared ``cp.async`` in a compiled kernel's PTX."""
    return [int(size, 0) for size in re.findall(r"cp\.async\.\w+\.shared\.global\S* \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", compiled.asm["ptx"])]


# float32 exponentials and divisions with subnormal handling around their one MUFU instruction.
_SUBNORMAL_HANDLING_MATH = re.compile(r"\b(ex2\.approx\.f32|div\.full\.f32|div\.rn\.f32)\b")


def subnormal_handling_math(compiled) -> list[str]:
    """The float32 ``ex2``/``div`` instructions of a compiled kernel's PTX that are not the flushing one-instruction forms."""
    return sorted(set(_SUBNORMAL_HANDLING_MATH.findall(compiled.asm["ptx"])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("-k", default="", help="only cases whose name contains this string")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    cases = [c for c in _load_cases() if args.k in c.name]
    failures = 0
    for case in cases:
        try:
            compiled = compile_case(case, args.capability)
            shared, limit = compiled.metadata.shared, MAX_SHARED_BYTES.get(args.capability)
            registers, spilled = register_usage(compiled, args.capability)
            usage = f"shared {shared} B, {registers} registers, {spilled} B spilled"
            copies = async_copy_bytes(compiled) if case.min_copy_bytes else []
            slow_math = subnormal_handling_math(compiled) if case.flushing_math else []
            if limit is not None and shared > limit:
                failures += 1
                print(f"FAIL  {case.name}: needs {shared} B of shared memory, sm_{args.capability} allows {limit} B")
            elif spilled > case.max_spill_bytes:
                failures += 1
                print(f"FAIL  {case.name}: spills {spilled} B of registers per thread, its case allows {case.max_spill_bytes} B ({usage})")
            elif case.min_copy_bytes and (not copies or min(copies) < case.min_copy_bytes):
                failures += 1
                found = f"{min(copies)}-byte cp.async copies" if copies else "no cp.async at all"
                print(f"FAIL  {case.name}: {found}, its case wants {case.min_copy_bytes}-byte ones ({usage})")
            elif slow_math:
                failures += 1
                print(f"FAIL  {case.name}: {', '.join(slow_math)} in its PTX, its case wants the flushing forms ({usage})")
            else:
                print(f"ok    {case.name}  ({usage})")
        except Exception:  # report every failing kernel, not just the first
            failures += 1
            print(f"FAIL  {case.name}\n{traceback.format_exc()}")
    print(f"{len(cases) - failures} compiled, {failures} failed for sm_{args.capability}")
    return 1 if failures or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
