"""Gated PixelCNN (van den Oord et al. 2016) without blind spot, as in the UvA DL tutorial 12."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelcnn_kernels.masks import check_gated_color_channels
from pixelcnn_kernels.models.base import PixelCNNModel, check_image_size, dmol_parameter_count
from pixelcnn_kernels.nn.layers import GatedMaskedConv2d
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.reference.layers import apply_masked_conv
from pixelcnn_kernels.utils import check_int


class GatedPixelCNN(PixelCNNModel):
    """Vertical and horizontal stacks of :class:`~pixelcnn_kernels.nn.GatedMaskedConv2d`.

    Structure (the tutorial's ``PixelCNN``): a first ``vertical_A`` k×k conv and a first
    ``horizontal_A`` 1×k conv from the [-1, 1] image to ``hidden`` channels (they exclude
    the current row, resp. the current pixel), ``layers`` gated layers with the given
    ``dilations`` (default all 1), then ``conv_out(elu(h))``, a 1×1 conv to the logits.
    The vertical stack at row i sees rows < i only, the horizontal stack the pixels left
    of it in row i and, through the vertical link, everything above: no blind spot.

    Heads:

    - ``"softmax"``: logits (B, num_bins, C, H, W). For C = 3 the horizontal stack and
      the output are colour-grouped (``color_groups=3``): channel c's logits see
      channels < c of the same pixel (R → G → B inside each pixel). ``hidden`` must then
      be ≡ 0 or 2 mod 3 (128 splits 43/43/42, see
      :func:`~pixelcnn_kernels.masks.check_gated_color_channels`). ``conv_out`` emits
      its channels colour-major (all of R's bins, then G's, then B's), which is a
      transposed view of the returned layout.
    - ``"dmol"``: a discretized mixture of ``num_logistic_mix`` logistics, logits
      (B, 3K or 10K, H, W), scored by the DMOL op (which handles R → G → B itself).

    ``dropout``: each gated layer's dropout on its horizontal residual branch (training
    mode only; see :class:`~pixelcnn_kernels.nn.GatedMaskedConv2d`), default 0.

    ``num_classes``: class-conditional; ``cond`` are labels (B,), whose one-hot vector
    every gated layer projects onto both stacks' pre-activations. ``image_size`` is only
    the (H, W) :meth:`sample` draws by default; the network takes any size.
    """

    name = "gated_pixelcnn"

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        layers: int = 7,
        kernel_size: int = 3,
        dilations: list[int] | tuple[int, ...] | None = None,
        num_classes: int | None = None,
        head: str = "softmax",
        num_bins: int = 256,
        *,
        dropout: float = 0.0,
        num_logistic_mix: int = 10,
        image_size: tuple[int, int] = (28, 28),
    ):
        image_size = check_image_size(image_size)
        if dilations is not None and not isinstance(dilations, (list, tuple)):
            raise TypeError(f"dilations must be a list or tuple of ints (one per layer) or None, got {type(dilations).__name__}")
        if check_int(kernel_size, "kernel_size", 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the stacks' masks are centred on the pixel), got {kernel_size}")
        config = dict(
            in_channels=in_channels,
            hidden=hidden,
            layers=layers,
            kernel_size=kernel_size,
            dilations=None if dilations is None else list(dilations),
            dropout=dropout,
            num_classes=num_classes,
            head=head,
            num_bins=num_bins,
            num_logistic_mix=num_logistic_mix,
            image_size=list(image_size),
        )
        super().__init__(config, in_channels=in_channels, num_bins=num_bins, head=head, num_classes=num_classes, num_logistic_mix=num_logistic_mix)
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        dilations = [1] * layers if dilations is None else list(dilations)
        if len(dilations) != layers or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"dilations must be {layers} positive ints (one per layer), got {dilations!r}")
        self.color_groups = 3 if in_channels == 3 and head == "softmax" else 1
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        check_gated_color_channels(hidden, self.color_groups, "hidden")
        self.image_size = image_size
        self.conv_vstack = MaskedConv2d(in_channels, hidden, kernel_size, mask="vertical_A")
        self.conv_hstack = MaskedConv2d(in_channels, hidden, (1, kernel_size), mask="horizontal_A", color_groups=self.color_groups)
        self.conv_layers = nn.ModuleList(
            GatedMaskedConv2d(hidden, kernel_size, d, self.color_groups, num_classes, dropout) for d in dilations
        )
        out_channels = num_bins * in_channels if head == "softmax" else dmol_parameter_count(in_channels, num_logistic_mix)
        self.conv_out = MaskedConv2d(hidden, out_channels, 1, mask="full", color_groups=self.color_groups)

    def default_sample_size(self) -> tuple[int, int]:
        return self.image_size

    def network(self, inputs: torch.Tensor, class_vector: torch.Tensor | None) -> torch.Tensor:
        conv = self.ops.masked_conv2d
        v = apply_masked_conv(conv, self.conv_vstack, inputs)
        h = apply_masked_conv(conv, self.conv_hstack, inputs)
        for layer in self.conv_layers:
            v, h = layer(v, h, class_vector)
        logits = apply_masked_conv(conv, self.conv_out, F.elu(h))
        if self.head == "dmol":
            return logits
        return logits.unflatten(1, (self.in_channels, self.num_bins)).transpose(1, 2)
