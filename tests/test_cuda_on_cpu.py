"""The CUDA kernels on the CPU (``pixelcnn_kernels.cuda_on_cpu``): the build's source
rewriting, and the masked convolution's kernel paths through the public op (the
sanitizer builds: ``test_cuda_on_cpu_sanitizers.py``).

Without a GPU, the tests marked ``cuda_on_cpu`` (``op_table.CUDA``, ``op_table.CUDA_KERNELS``:
the cross-backend, gates, DMOL, masked-conv contract, layer, model and sampling tests' cuda
cases) run the CUDA kernels on CPU tensors. The masked convolution picks its tiles by the
channel counts (128 x 128 where 128-wide blocks pad no more than 64-wide ones; 128 pixels x
64 columns per half in the gated GEMMs), its arithmetic by dtype and TF32 setting (mma.sync
on bf16/fp16/TF32 fragments, or exact fp32 FMAs) and splits its weight gradient over the
pixels when its tiles are few: the cases below take each of those through
``pk.masked_conv2d``/``masked_conv2d_gated`` (packing, autograd), forward and backward,
against the reference in float64 (``test_masked_conv_cuda.py`` calls the ops' contract
directly). On a GPU the same cases run on it.
"""

from __future__ import annotations

import pytest
import torch
from op_table import CUDA_KERNELS, DEVICE, OPS, check_against_reference

from pixelcnn_kernels.cuda_on_cpu import translate

pytestmark = CUDA_KERNELS  # on the GPU there, else on the CPU


def test_launches_and_shared_memory_are_rewritten():
    source = """
    conv_kernel<decltype(tag), typename Math::type, 2>
        <<<grid, T::kThreads, 0, stream>>>(params);
    many<<<blocks, kThreads, kImages * per_image, stream>>>(s);
    extern __shared__ float shared[];
    __shared__ __align__(128) unsigned char smem[kA > kB ? kA : kB];
    """
    translated = translate(source)
    assert "<<<" not in translated and "__shared__" not in translated
    assert "::cuda_on_cpu::launch(grid, T::kThreads, 0, stream, [=](auto... params) { conv_kernel<decltype(tag), typename Math::type, 2>(params...); })(params);" in translated
    assert "::cuda_on_cpu::launch(blocks, kThreads, kImages * per_image, stream, [=](auto... params) { many(params...); })(s);" in translated
    assert "float* const shared = static_cast<float*>(::cuda_on_cpu::dynamic_shared());" in translated
    assert ("struct cuda_on_cpu_smem { __align__(128) unsigned char smem[kA > kB ? kA : kB]; }; "
            "auto& smem = ::cuda_on_cpu::block_shared<cuda_on_cpu_smem>().smem;") in translated


def test_a_launch_the_pattern_cannot_read_is_refused():
    with pytest.raises(ValueError, match="rewrote 0 of 1 kernel launches"):
        translate("kernel<<<grid, block, 0, stream>>> ;")


def test_a_shared_declaration_the_patterns_cannot_read_is_refused():
    with pytest.raises(ValueError, match="a __shared__ declaration the patterns do not read"):
        translate("__shared__ float total;")


def _conv_params(in_channels, out_channels, mask=("vertical", (3, 3)), **options):
    params = dict(batch=2, height=5, width=4, in_channels=in_channels, out_channels=out_channels, mask=mask, custom_taps=[True] * 9,
                  dilation=1, color_groups=1, bias=True, cond=False, addend=False, gate="tanh_sigmoid", residual=False, concat_elu=False)
    return params | options


# (op, params): each reaches a tile, a GEMM or an epilogue of csrc/masked_conv.cu.
CONV_CASES = {
    "small_tiles": ("masked_conv2d", _conv_params(5, 7, ("B", (3, 3)), residual=True)),
    "wide_tiles": ("masked_conv2d", _conv_params(128, 256, dilation=2)),  # 128 x 128 forward, input and weight gradients
    "wide_tiles_ragged": ("masked_conv2d", _conv_params(70, 200, ("down_right_shifted", (2, 2)))),  # 200 = 128 + 72 columns
    "weight_gradient_splits": ("masked_conv2d", dict(_conv_params(3, 4), batch=3, height=17, width=15)),  # 765 pixels over splits
    "concat_elu_input": ("masked_conv2d", _conv_params(6, 9, ("down_shifted", (2, 3)), concat_elu=True, residual=True)),
    "gated_two_halves": ("masked_conv2d_gated", _conv_params(12, 80, cond=True, addend=True)),
    "gated_sigmoid_concat_elu": ("masked_conv2d_gated", _conv_params(4, 160, ("down_shifted", (2, 3)), gate="sigmoid", concat_elu=True, residual=True)),
    "colour_groups": ("masked_conv2d", _conv_params(2, 3, ("A", (5, 5)), color_groups=3)),
    "unequal_colour_groups": ("masked_conv2d", _conv_params(2, 3, ("B", (3, 3)), color_groups=3, unequal_groups=True)),  # 5 -> 8 channels
}


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "exact"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_masked_conv_tiles_and_fp32_arithmetic(case, allow_tf32, monkeypatch):
    name, params = CONV_CASES[case]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    inputs = OPS[name].make(params, torch.float32, DEVICE, torch.Generator().manual_seed(0))
    check_against_reference(OPS[name], "cuda", inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["wide_tiles", "weight_gradient_splits", "gated_two_halves", "gated_sigmoid_concat_elu"])
def test_masked_conv_tiles_in_16_bits(case, dtype):
    name, params = CONV_CASES[case]
    inputs = OPS[name].make(params, dtype, DEVICE, torch.Generator().manual_seed(1))
    check_against_reference(OPS[name], "cuda", inputs, dtype)
