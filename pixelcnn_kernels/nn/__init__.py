"""``nn.Module`` wrappers of the ops and the fused PixelCNN layers."""

from pixelcnn_kernels.nn.dmol import DiscretizedMixLogisticNLL
from pixelcnn_kernels.nn.gates import ConcatELU, GateSigmoid, GateTanhSigmoid
from pixelcnn_kernels.nn.layers import GatedMaskedConv2d, GatedResnet, ShiftedConv2d, ShiftedConvTranspose2d
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d, MaskedConv2dGated

__all__ = [
    "ConcatELU",
    "DiscretizedMixLogisticNLL",
    "GateSigmoid",
    "GateTanhSigmoid",
    "GatedMaskedConv2d",
    "GatedResnet",
    "MaskedConv2d",
    "MaskedConv2dGated",
    "ShiftedConv2d",
    "ShiftedConvTranspose2d",
]
