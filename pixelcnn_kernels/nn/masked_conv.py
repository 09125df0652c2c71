"""``nn.Conv2d`` subclasses running the masked convolution ops."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from pixelcnn_kernels.masks import MaskSpec, check_color_channels, check_gated_color_channels, resolve_mask
from pixelcnn_kernels.ops.masked_conv import masked_conv2d, masked_conv2d_gated
from pixelcnn_kernels.reference.masked_conv import GATES
from pixelcnn_kernels.utils import activation_dtype, check_int, check_tensor


def weight_norm_hook(conv: nn.Module) -> WeightNorm | None:
    """The ``torch.nn.utils.weight_norm`` hook computing ``conv.weight``, if it has one."""
    hooks = [hook for hook in conv._forward_pre_hooks.values() if isinstance(hook, WeightNorm) and hook.name == "weight"]
    return hooks[0] if hooks else None


def weight_norm_parameters(conv: nn.Module) -> dict[str, nn.Parameter]:
    """The g and v Parameters, by name, that ``conv``'s ``torch.nn.utils.weight_norm`` hook computes its weight from ({} without one)."""
    hook = weight_norm_hook(conv)
    return {} if hook is None else {name: getattr(conv, name) for name in (f"{hook.name}_g", f"{hook.name}_v")}


def refresh_weight_norm(model: nn.Module) -> None:
    """Recomputes the weight of every ``torch.nn.utils.weight_norm`` module of ``model`` from its g and v.

    The hook sets that weight, a plain attribute, before each forward only: after a
    forward on substituted or since-restored Parameters it holds their result. As the
    hook does, with autograd (the weight's graph reaches g and v).
    """
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(module, hook.name, hook.compute_weight(module))


def conv_operands(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x`` (a float tensor), ``conv.weight`` and ``conv.bias`` cast to the activation dtype of ``x``:
    autocast's, else ``x``'s (the modules compute in their input's dtype, whatever their parameters')."""
    # Checked here, not left to the op: under autocast an integer x would be cast to a float and pass it.
    dtype = activation_dtype(check_tensor(x, "x"))
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return x.to(dtype), conv.weight.to(dtype), bias


class MaskedConv2d(nn.Conv2d):
    """A stride-1, same-size masked convolution with ``nn.Conv2d``'s parameters.

    ``weight`` (out, in, kh, kw) and ``bias`` are the Conv2d Parameters under the
    same state_dict keys, so a Conv2d checkpoint loads as is; masked-out weights
    are kept but never read by the convolution, and their gradient from it is exactly
    zero (what else reads them still does: weight norm's ‖v‖ counts them, weight decay
    shrinks them). ``forward`` computes in its input's dtype, or autocast's where
    autocast is on, as the package's layers do: the Parameters are cast to it. ``mask`` is a
    named spec (``kernel_size`` may then be implied, e.g. 2×3 for
    ``"down_shifted"``), a boolean (kh, kw) tensor or a MaskSpec; it is resolved
    once, here, to ``self.spec``. Conv2d's ``padding`` stays 0: the spec's
    padding (``self.spec.padding(dilation)``, asymmetric for e.g. 2×3 kernels) is
    applied by the op, which ``forward`` calls instead of Conv2d's forward.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] | None = None,
        mask: str | torch.Tensor | MaskSpec = "B",
        dilation: int = 1,
        color_groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        spec = resolve_mask(mask, kernel_size, color_groups)
        check_int(dilation, "dilation", 1)
        check_color_channels(in_channels, spec.color_groups, "in_channels")
        check_color_channels(out_channels, spec.color_groups, "out_channels")
        super().__init__(in_channels, out_channels, spec.kernel_size, stride=1, padding=0, dilation=dilation, bias=bias, device=device, dtype=dtype)
        self.spec = spec

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: str | torch.Tensor | MaskSpec | None = None, dilation: int | None = None, **options) -> "MaskedConv2d":
        """Wraps ``conv``'s own Parameter objects (no copy) in this class.

        ``mask``: as the constructor's; None is ``conv``'s own spec when it is a
        MaskedConv2d, else ``"B"``. ``conv`` must have stride 1, one group, zero padding mode and equal
        dilations (``dilation``, if given, must be that value); its ``padding``
        is ignored (the mask fixes the padding). A weight that ``conv`` computes
        (``torch.nn.utils.weight_norm``, or a ``torch.nn.utils.parametrize``
        parametrization such as ``parametrizations.weight_norm``) is computed the
        same way, by the same hook or parametrization modules, from the same
        Parameters under the same names. ``options`` are the constructor's
        remaining keywords (``color_groups``; ``gate`` for MaskedConv2dGated).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters()):
            raise ValueError("conv is a lazy conv whose Parameters are not yet initialised: run it on an input first")
        if any(isinstance(hook, SpectralNorm) for hook in conv._forward_pre_hooks.values()):
            raise ValueError("conv has torch.nn.utils.spectral_norm's hook, which the masked conv would not run: "
                             "use torch.nn.utils.parametrizations.spectral_norm, which it carries over")
        if mask is None:
            mask = conv.spec if isinstance(conv, MaskedConv2d) else "B"
        if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"conv must have stride 1, groups 1 and zero padding, got stride={conv.stride}, groups={conv.groups}, padding_mode={conv.padding_mode!r}")
        if conv.dilation[0] != conv.dilation[1]:
            raise ValueError(f"conv must have equal dilations, got {conv.dilation}")
        if dilation is not None and dilation != conv.dilation[0]:
            raise ValueError(f"dilation={dilation} differs from the conv's dilation {conv.dilation}")
        if parametrize.is_parametrized(conv) and set(conv.parametrizations) != {"weight"}:
            raise ValueError(f"conv must have parametrizations of its weight only, got {sorted(conv.parametrizations)}")
        # Built on the meta device: no memory or initialisation for Parameters that are replaced at once.
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            mask,
            conv.dilation[0],
            bias=conv.bias is not None,
            device="meta",
            dtype=conv.weight.dtype,
            **options,
        )
        module.bias = conv.bias
        weight_norm = weight_norm_hook(conv)
        if weight_norm is not None:
            del module.weight  # a plain attribute from now on, which the hook sets before each forward
            for name, parameter in weight_norm_parameters(conv).items():
                module.register_parameter(name, parameter)
            module.weight = weight_norm.compute_weight(module)
            module.register_forward_pre_hook(weight_norm)
        elif parametrize.is_parametrized(conv, "weight"):
            chain = conv.parametrizations.weight
            for parametrization in chain:
                parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
            for name, original in chain.named_parameters(recurse=False):
                setattr(module.parametrizations.weight, name, original)
        else:
            module.weight = conv.weight
        return module.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = conv_operands(self, x)
        return masked_conv2d(x, weight, bias, self.spec, self.dilation[0], self.spec.color_groups)

    def extra_repr(self) -> str:
        kh, kw = self.spec.kernel_size
        text = f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), mask={self.spec.name!r}, taps={len(self.spec.taps)}/{kh * kw}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation[0]}"
        if self.spec.color_groups > 1:
            text += f", color_groups={self.spec.color_groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class MaskedConv2dGated(MaskedConv2d):
    """A masked convolution to ``out_channels`` (even) channels, gated to half as many.

    ``forward(x, cond=None)`` = gate(conv(x) + cond[:, :, None, None]) with the
    conv's output split into halves a, b: tanh(a)·σ(b) (``"tanh_sigmoid"``) or
    a·σ(b) (``"sigmoid"``), fused in one pass; ``cond`` is (N, out_channels) or
    None; the output has out_channels / 2 channels. ``weight`` is (out_channels,
    in_channels, kh, kw) as in the plain MaskedConv2d. With ``color_groups=3`` the
    conv is colour-masked as MaskedConv2d's, its output channels are R, G, B groups
    each holding its colour's halves, [a_R b_R | a_G b_G | a_B b_B], gated per colour
    (``gate_groups=3``), and the output is in R, G, B groups (out_channels / 2 must be
    ≡ 0 or 2 mod 3, :func:`~pixelcnn_kernels.masks.check_gated_color_channels`).
    ``color_groups`` comes last, after ``dtype``, so that the
    positional arguments before it keep their places.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] | None = None,
        mask: str | torch.Tensor | MaskSpec = "B",
        dilation: int = 1,
        gate: str = "tanh_sigmoid",
        bias: bool = True,
        device=None,
        dtype=None,
        color_groups: int = 1,
    ):
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        super().__init__(in_channels, out_channels, kernel_size, mask, dilation, color_groups, bias, device, dtype)
        if out_channels % 2:
            raise ValueError(f"out_channels must be even (the gate's two halves), got {out_channels}")
        check_gated_color_channels(out_channels // 2, color_groups, "out_channels // 2 (gated channels)")
        self.gate = gate

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        groups = self.spec.color_groups
        x, weight, bias = conv_operands(self, x)
        cond = None if cond is None else cond.to(x.dtype)
        return masked_conv2d_gated(x, weight, bias, self.spec, self.dilation[0], groups, self.gate, cond, gate_groups=groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate!r}"
