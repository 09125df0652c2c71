"""Every registered Triton kernel compiles for sm_90 (H100/H200) without a GPU."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton backend is optional; without triton there is nothing to compile")


def test_all_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pixelcnn_kernels.triton.compile_check"], capture_output=True, text=True, env=env, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " 0 failed for sm_90" in result.stdout


def test_every_tap_set_the_drop_in_models_launch_is_compiled():
    """The masked convolutions of both models (first layers included), at dilation 1: a dilation
    changes the offsets' values, not the kernel's structure."""
    from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus
    from pixelcnn_kernels.nn import MaskedConv2d
    from pixelcnn_kernels.ops.masked_conv import tap_offsets
    from pixelcnn_kernels.triton.compile_check import _load_cases
    from pixelcnn_kernels.triton.masked_conv import _masked_conv_kernel

    compiled = {tuple(case.constexprs["OFFSETS"]) for case in _load_cases() if case.kernel is _masked_conv_kernel}
    models = [GatedPixelCNN(3, hidden=6, layers=1), GatedPixelCNN(1, hidden=4, layers=1, head="dmol"), PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=1)]
    launched = {
        (type(model).__name__, name): tuple(tap_offsets(module.spec, 1))
        for model in models
        for name, module in model.named_modules()
        if isinstance(module, MaskedConv2d) and module.stride == (1, 1)  # strided (ShiftedConv2d): F.conv2d
    }
    assert not {key for key, offsets in launched.items() if offsets not in compiled}


# The check's guard, run on the kernel as the TF32 weight gradient was before it read x copied
# per tap: its x tiles then came in 4-byte copies, which the check must refuse.
CHANNELS_LAST_X_WGRAD = """
import sys
import pixelcnn_kernels.triton.masked_conv as kernels
from pixelcnn_kernels.triton import compile_check, utils
kernels._tap_major_x = lambda precision, c_in, copy_elements: False
utils.COMPILE_CASES.clear()
kernels._register_compile_cases()
sys.exit(compile_check.main(["-k", "masked_conv_wgrad_wide_vertical3x3"]))
"""


def test_the_check_refuses_a_gemm_whose_operand_copies_narrow():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHANNELS_LAST_X_WGRAD], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL  masked_conv_wgrad_wide_vertical3x3_float32: 4-byte cp.async copies, its case wants 16-byte ones" in result.stdout
    assert "ok    masked_conv_wgrad_wide_vertical3x3_bfloat16" in result.stdout


# The check's guard, run on the gates as they were before their math took the flushing forms:
# tl.exp and a division, whose subnormal handling cost the bf16 tanh·σ 15 of its 52 instructions
# an element, the check must refuse.
SUBNORMAL_HANDLING_GATES = """
import sys
import triton
import triton.language as tl
from pixelcnn_kernels.triton import compile_check, gates


@triton.jit
def exp_with_subnormals(x):
    return tl.exp(x)


@triton.jit
def divided(d):
    return 1.0 / d


gates.exp_ftz, gates.reciprocal_of_1_or_more = exp_with_subnormals, divided
sys.exit(compile_check.main(["-k", "gates_tanh_sigmoid_forward"]))
"""


def test_the_check_refuses_gates_whose_math_handles_subnormals(tmp_path):
    script = tmp_path / "gates_with_subnormal_math.py"  # Triton takes @jit functions from files only
    script.write_text(SUBNORMAL_HANDLING_GATES)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    for dtype in ("float32", "bfloat16"):
        assert f"FAIL  gates_tanh_sigmoid_forward_{dtype}: div.full.f32, ex2.approx.f32 in its PTX, its case wants the flushing forms" in result.stdout
