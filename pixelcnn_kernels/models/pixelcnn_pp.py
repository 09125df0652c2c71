"""PixelCNN++ (Salimans et al. 2017): openai/pixel-cnn ``pixel_cnn_pp/model.py``.

Module structure and parameter shapes follow the PyTorch port pclucas14/pixel-cnn-pp
(``model.py`` / ``layers.py``), so a port checkpoint maps key by key, with these
differences (documented on :class:`PixelCNNPlusPlus`): no weight normalisation, the
shifted convs hold ``weight``/``bias`` directly (the port's ``<conv>.conv.weight_v``,
``weight_g`` and ``bias`` fold into ``<conv>.weight = weight_g · weight_v / ‖weight_v‖``
and ``<conv>.bias``), the 1×1 ``nin`` layers are 1×1 convs (weight (out, in, 1, 1)
instead of ``nin.lin_a``'s Linear (out, in)), and dropout is elementwise as in the
original TensorFlow code (the port drops whole channels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelcnn_kernels.models.base import PixelCNNModel, check_image_size, dmol_parameter_count
from pixelcnn_kernels.nn.layers import GatedResnet, ShiftedConv2d, ShiftedConvTranspose2d
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.reference.layers import apply_masked_conv
from pixelcnn_kernels.utils import in_layout_of

# Two down-sampling (and two up-sampling) stages: three resolutions.
STAGES = 3


class PixelCNNLayerUp(nn.Module):
    """One resolution of the up pass: ``nr_resnet`` gated resnets on each stream.

    The down-right stream's blocks take the down stream's output as skip input.
    Returns every block's outputs (the down pass consumes them as skips).
    """

    def __init__(self, nr_resnet: int, nr_filters: int, cond_channels: int | None, dropout: float):
        super().__init__()
        self.u_stream = nn.ModuleList(GatedResnet(nr_filters, "down", 0, cond_channels, dropout) for _ in range(nr_resnet))
        self.ul_stream = nn.ModuleList(GatedResnet(nr_filters, "down_right", 1, cond_channels, dropout) for _ in range(nr_resnet))

    def forward(self, u: torch.Tensor, ul: torch.Tensor, cond: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        u_list, ul_list = [], []
        for u_block, ul_block in zip(self.u_stream, self.ul_stream):
            u = u_block(u, cond=cond)
            ul = ul_block(ul, u, cond=cond)
            u_list.append(u)
            ul_list.append(ul)
        return u_list, ul_list


class PixelCNNLayerDown(nn.Module):
    """One resolution of the down pass: gated resnets whose skips are the up pass's outputs, last first."""

    def __init__(self, nr_resnet: int, nr_filters: int, cond_channels: int | None, dropout: float):
        super().__init__()
        self.u_stream = nn.ModuleList(GatedResnet(nr_filters, "down", 1, cond_channels, dropout) for _ in range(nr_resnet))
        self.ul_stream = nn.ModuleList(GatedResnet(nr_filters, "down_right", 2, cond_channels, dropout) for _ in range(nr_resnet))

    def forward(self, u, ul, u_list: list[torch.Tensor], ul_list: list[torch.Tensor], cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        for u_block, ul_block in zip(self.u_stream, self.ul_stream):
            u = u_block(u, u_list.pop(), cond=cond)
            ul = ul_block(ul, torch.cat((u, ul_list.pop()), dim=1), cond=cond)
        return u, ul


class PixelCNNPlusPlus(PixelCNNModel):
    """The PixelCNN++ network with a discretized-mixture-of-logistics head.

    A down-shifted stream ``u`` (sees the rows above) and a down-right-shifted stream
    ``ul`` (rows above and pixels to the left), started from the image concatenated with
    a channel of ones (so the zero padding is distinguishable). Up pass: three
    resolutions of ``nr_resnet`` :class:`~pixelcnn_kernels.nn.GatedResnet` blocks per
    stream, separated by two stride-2 shifted convs; down pass: three resolutions of
    ``nr_resnet`` then ``nr_resnet + 1`` blocks taking the up pass's outputs as skips,
    separated by two stride-2 shifted transposed convs; then ``nin_out(elu(ul))``, a 1×1
    conv to (B, 10·nr_logistic_mix, H, W) logits (3·nr_logistic_mix for one channel).
    H and W must be multiples of 4.

    ``num_classes``: class-conditional on labels ``cond`` (B,), whose one-hot vector
    every gated resnet projects onto its gate's pre-activation (the original's ``h``).
    ``image_size`` is only the (H, W) :meth:`sample` draws by default.

    Not supported: weight normalisation (the original and the port reparametrise every
    conv with it; here the folded weight is a plain parameter, see the module docstring
    for loading a port checkpoint) and the original's data-dependent initialisation.
    """

    name = "pixelcnn_pp"

    def __init__(
        self,
        nr_resnet: int = 5,
        nr_filters: int = 160,
        nr_logistic_mix: int = 10,
        in_channels: int = 3,
        num_classes: int | None = None,
        dropout: float = 0.5,
        num_bins: int = 256,
        image_size: tuple[int, int] = (32, 32),
    ):
        image_size = check_image_size(image_size)
        config = dict(
            nr_resnet=nr_resnet,
            nr_filters=nr_filters,
            nr_logistic_mix=nr_logistic_mix,
            in_channels=in_channels,
            num_classes=num_classes,
            dropout=dropout,
            num_bins=num_bins,
            image_size=list(image_size),
        )
        super().__init__(config, in_channels=in_channels, num_bins=num_bins, head="dmol", num_classes=num_classes, num_logistic_mix=nr_logistic_mix)
        for name, value in (("nr_resnet", nr_resnet), ("nr_filters", nr_filters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.check_spatial_size(*image_size)
        self.image_size = image_size
        self.up_layers = nn.ModuleList(PixelCNNLayerUp(nr_resnet, nr_filters, num_classes, dropout) for _ in range(STAGES))
        down_nr_resnet = [nr_resnet] + [nr_resnet + 1] * (STAGES - 1)
        self.down_layers = nn.ModuleList(PixelCNNLayerDown(count, nr_filters, num_classes, dropout) for count in down_nr_resnet)
        self.downsize_u_stream = nn.ModuleList(ShiftedConv2d(nr_filters, nr_filters, shift="down", stride=2) for _ in range(STAGES - 1))
        self.downsize_ul_stream = nn.ModuleList(ShiftedConv2d(nr_filters, nr_filters, shift="down_right", stride=2) for _ in range(STAGES - 1))
        self.upsize_u_stream = nn.ModuleList(ShiftedConvTranspose2d(nr_filters, nr_filters, shift="down") for _ in range(STAGES - 1))
        self.upsize_ul_stream = nn.ModuleList(ShiftedConvTranspose2d(nr_filters, nr_filters, shift="down_right") for _ in range(STAGES - 1))
        self.u_init = ShiftedConv2d(in_channels + 1, nr_filters, (2, 3), shift="down", shift_output=True)
        self.ul_init = nn.ModuleList(
            [
                ShiftedConv2d(in_channels + 1, nr_filters, (1, 3), shift="down", shift_output=True),
                ShiftedConv2d(in_channels + 1, nr_filters, (2, 1), shift="down_right", shift_output=True),
            ]
        )
        self.nin_out = MaskedConv2d(nr_filters, dmol_parameter_count(in_channels, nr_logistic_mix), 1, mask="full")

    def check_spatial_size(self, height: int, width: int) -> None:
        if height % 4 or width % 4:
            raise ValueError(f"PixelCNN++ down-samples twice by 2: H and W must be multiples of 4, got {(height, width)}")

    def default_sample_size(self) -> tuple[int, int]:
        return self.image_size

    def network(self, inputs: torch.Tensor, class_vector: torch.Tensor | None) -> torch.Tensor:
        # A channel of ones (the original's padding indicator); the concatenation keeps the
        # input's layout only where every part has it.
        x = in_layout_of(torch.cat((inputs, torch.ones_like(inputs[:, :1])), dim=1), inputs)
        u_list = [self.u_init(x)]
        ul_list = [self.ul_init[0](x) + self.ul_init[1](x)]
        for stage, up_layer in enumerate(self.up_layers):
            u_out, ul_out = up_layer(u_list[-1], ul_list[-1], class_vector)
            u_list += u_out
            ul_list += ul_out
            if stage < STAGES - 1:
                u_list.append(self.downsize_u_stream[stage](u_list[-1]))
                ul_list.append(self.downsize_ul_stream[stage](ul_list[-1]))
        u, ul = u_list.pop(), ul_list.pop()
        for stage, down_layer in enumerate(self.down_layers):
            u, ul = down_layer(u, ul, u_list, ul_list, class_vector)
            if stage < STAGES - 1:
                u = self.upsize_u_stream[stage](u)
                ul = self.upsize_ul_stream[stage](ul)
        return apply_masked_conv(self.ops.masked_conv2d, self.nin_out, F.elu(ul))
