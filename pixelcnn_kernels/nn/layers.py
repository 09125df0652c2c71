"""The fused PixelCNN layers: :mod:`pixelcnn_kernels.reference.layers` on the package's ops.

Each class here is its reference-built namesake with ``ops`` = :data:`FUSED_OPS`, the
public custom ops (which run the ``cuda``, ``triton`` or ``reference`` backend, see
:mod:`pixelcnn_kernels.backend`). What the kernels fuse:

- :class:`GatedResnet`: every concat_elu into the conv reading it (one elementwise pass
  just before the forward and the weight gradient; never kept for the backward; its
  backward in the input gradient's epilogue), and in training the dropout after the
  second one too (in that same pass, and in the input gradient's epilogue); ``nin_skip``'s add of
  ``c`` into its epilogue; the second conv, bias, conditioning, gate and the residual
  ``x + ·`` into one ``masked_conv2d_gated``. The dropout's fusion, priced for the
  benchmark's PixelCNN++ training step (160 channels, batch 64, 32×32: 1.88 M
  resnet-pixels), per resnet-pixel in fp32: a concat_elu pass (1920 B), a dropout pass
  (2880 B), their two backward passes (2880 + 2560 B) and the conv passes' 2C-channel
  reads and write (3 × 1280 B) become a drawn mask (320 B) and the convs' reads of x and
  the mask (3 × 960 B) and x's gradient's write (640 B): 10.2 KB less, 19.3 GB a step,
  ≈ 5 ms at ~4 TB/s of the 77 ms fp32 goal (~1.5 ms of the bf16 one), 3 launches fewer
  per block, and the 2C-channel activation no longer kept for the backward (2.4 GB in
  fp32). The input pass gives back 2.56 KB of it per pass (x and the mask read, 2C
  written, the GEMM then reading 2C instead of x and the mask), 5.1 KB in all: computed
  inside the GEMM's loads it made the H200's bf16 forward 4.6× slower in Triton, 2.9× in
  CUDA (benchmarks/results/2026-11-30-h200.md);
- :class:`GatedMaskedConv2d`: the vertical conv, bias, conditioning and gate into one
  ``masked_conv2d_gated`` that also writes the pre-activation the link reads; the
  link (1×1 of that pre-activation), the add of ``conv_horiz(h)``, the conditioning
  and the gate into another (with colour groups the gate pairs channels within each
  colour third: ``gate_groups=3``); the residual ``h`` into the 1×1 output conv's
  epilogue.

Under autocast a residual kept in a wider dtype than the convs' is added separately.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from pixelcnn_kernels.ops.dmol import discretized_mix_logistic_nll
from pixelcnn_kernels.ops.gates import concat_elu, gate_tanh_sigmoid
from pixelcnn_kernels.ops.masked_conv import masked_conv2d, masked_conv2d_gated
from pixelcnn_kernels.reference import layers as reference_layers
from pixelcnn_kernels.reference.layers import OpSet, ShiftedConvTranspose2d, set_ops

__all__ = ["FUSED_OPS", "GatedMaskedConv2d", "GatedResnet", "ShiftedConv2d", "ShiftedConvTranspose2d", "set_ops"]

FUSED_OPS = OpSet(
    masked_conv2d=masked_conv2d,
    masked_conv2d_gated=masked_conv2d_gated,
    gate_tanh_sigmoid=gate_tanh_sigmoid,
    concat_elu=concat_elu,
    # The models check their images' values on the device (a read of x's range would make the host
    # wait for the GPU every step).
    discretized_mix_logistic_nll=functools.partial(discretized_mix_logistic_nll, reduction="none", check_x=False),
)


class GatedMaskedConv2d(reference_layers.GatedMaskedConv2d):
    __doc__ = reference_layers.GatedMaskedConv2d.__doc__
    ops: ClassVar[OpSet] = FUSED_OPS


class GatedResnet(reference_layers.GatedResnet):
    __doc__ = reference_layers.GatedResnet.__doc__
    ops: ClassVar[OpSet] = FUSED_OPS


class ShiftedConv2d(reference_layers.ShiftedConv2d):
    __doc__ = reference_layers.ShiftedConv2d.__doc__
    ops: ClassVar[OpSet] = FUSED_OPS
