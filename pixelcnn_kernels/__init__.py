"""pixelcnn-kernels: fused Triton and CUDA kernels for PixelCNN-family models.

Ops (each a ``torch.library`` custom op with autograd and a fake implementation,
running on the ``reference``, ``triton`` or ``cuda`` backend, see
:mod:`pixelcnn_kernels.backend`), their ``nn`` modules, drop-in models and tools.
"""

__version__ = "0.1.0"

from pixelcnn_kernels import models, nn
from pixelcnn_kernels.backend import BackendUnavailableError, available_backends, use_backend
from pixelcnn_kernels.causality import check_causality
from pixelcnn_kernels.convert import convert
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus
from pixelcnn_kernels.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic, to_bins
from pixelcnn_kernels.ops.gates import concat_elu, gate_sigmoid, gate_tanh_sigmoid
from pixelcnn_kernels.ops.masked_conv import masked_conv2d, masked_conv2d_gated
from pixelcnn_kernels.reference.masked_conv import draw_dropout_keep

__all__ = [
    "BackendUnavailableError",
    "GatedPixelCNN",
    "PixelCNNPlusPlus",
    "available_backends",
    "check_causality",
    "concat_elu",
    "convert",
    "discretized_mix_logistic_nll",
    "draw_dropout_keep",
    "gate_sigmoid",
    "gate_tanh_sigmoid",
    "masked_conv2d",
    "masked_conv2d_gated",
    "models",
    "nn",
    "sample_discretized_mix_logistic",
    "to_bins",
    "use_backend",
]
