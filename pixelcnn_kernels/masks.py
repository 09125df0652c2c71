"""Mask specifications of masked convolutions.

A mask is resolved once, on the host, to a :class:`MaskSpec`: the kernel size,
the active taps (what the kernels loop over: masked-out taps are never loaded),
the *anchor* (the kernel position aligned with the output pixel, which fixes the
"same" padding) and, with colour groups, the rule applied at the anchor tap.

Named specs for a kernel of size (kh, kw), centre (ci, cj) = (kh // 2, kw // 2):

- ``"A"`` / ``"B"``: PixelCNN's mask: every row above the centre, the centre row
  left of the centre; the centre excluded (A) or included (B).
- ``"vertical"`` / ``"vertical_A"``: Gated PixelCNN's vertical stack on a k×k
  kernel: rows at and above the centre row (``_A``: strictly above, for the first
  layer).
- ``"horizontal"`` / ``"horizontal_A"``: the horizontal stack on a 1×k kernel:
  the centre and its left (``_A``: strictly left, for the first layer).
- ``"down_shifted"``: PixelCNN++'s down-shifted convolution (2×3 by default):
  every tap, the output aligned with the last kernel row and the centre column,
  as its pad(top=kh-1, left=right=(kw-1)/2)-then-conv code does.
- ``"down_right_shifted"``: PixelCNN++'s down-right-shifted convolution (2×2):
  every tap, the output aligned with the bottom-right tap.
- ``"full"``: every tap, centred (an ordinary "same" convolution, e.g. 1×1).

Any boolean (kh, kw) tensor is also a spec, anchored at the centre; along an
even side at its last row or column, as PixelCNN++'s shifted convolutions are (a
2×3 tensor of ones is ``"down_shifted"``, a 2×2 one ``"down_right_shifted"``).

Colour groups (``color_groups=3``): input and output channels are split into
contiguous R, G, B groups of ``color_group_size`` channels, the last one smaller
when the groups do not divide the channels (128 channels: 43, 43, 42). At the
anchor tap output group g sees input groups < g when the spatial mask excludes
the anchor (mask A) and ≤ g when it includes it (mask B); the anchor tap is then
active with that channel mask.

Rounding the group size up, rather than spreading the remainder, is what lets a
gated convolution's 2C pre-activation channels split into the same groups as its
C outputs, each group twice as wide (:func:`check_gated_color_channels`).
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass

import torch

NAMED_MASKS = ("A", "B", "vertical", "vertical_A", "horizontal", "horizontal_A", "down_shifted", "down_right_shifted", "full")

# Kernel sizes implied by a name when the caller gives none.
_DEFAULT_KERNEL_SIZE = {"down_shifted": (2, 3), "down_right_shifted": (2, 2)}


@dataclass(frozen=True)
class MaskSpec:
    """A resolved mask: what the kernels are specialised on.

    ``taps`` are the active (row, col) kernel positions in row-major order,
    ``anchor`` the kernel position over the output pixel, ``color_groups`` the
    number of channel groups and ``anchor_inclusive`` whether output group g sees
    input group g at the anchor (only meaningful when ``color_groups > 1``).
    """

    name: str
    kernel_size: tuple[int, int]
    taps: tuple[tuple[int, int], ...]
    anchor: tuple[int, int]
    color_groups: int = 1
    anchor_inclusive: bool = True

    def __post_init__(self):
        # The kernels index the taps as given: a hand-built spec is checked as resolve_mask's are.
        kh, kw = _as_pair(self.kernel_size, "MaskSpec.kernel_size")
        if not self.taps:
            raise ValueError(f"mask {self.name!r} with kernel_size {(kh, kw)} has no active tap")

        def inside(position) -> bool:
            return len(position) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in position) and 0 <= position[0] < kh and 0 <= position[1] < kw

        if not all(inside(tap) for tap in self.taps) or list(self.taps) != sorted(set(map(tuple, self.taps))):
            raise ValueError(f"MaskSpec.taps must be distinct (row, col) positions of the {kh}×{kw} kernel in row-major order, got {self.taps!r}")
        if not inside(self.anchor):
            raise ValueError(f"MaskSpec.anchor must be a (row, col) position of the {kh}×{kw} kernel, got {self.anchor!r}")
        check_color_groups(self.color_groups)
        if self.color_groups > 1 and tuple(self.anchor) not in map(tuple, self.taps):
            raise ValueError(f"MaskSpec.taps must include the anchor {self.anchor!r} with color_groups={self.color_groups} (its channel-group rule applies there)")
        if not isinstance(self.anchor_inclusive, bool):
            raise TypeError(f"MaskSpec.anchor_inclusive must be a bool, got {type(self.anchor_inclusive).__name__}")

    def tap_mask(self) -> torch.Tensor:
        """The spatial mask as a boolean (kh, kw) tensor (True = active tap)."""
        mask = torch.zeros(self.kernel_size, dtype=torch.bool)
        for i, j in self.taps:
            mask[i, j] = True
        return mask

    def padding(self, dilation: int = 1) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding giving a same-size output."""
        kh, kw = self.kernel_size
        ai, aj = self.anchor
        return (ai * dilation, (kh - 1 - ai) * dilation, aj * dilation, (kw - 1 - aj) * dilation)

    def weight_mask(self, out_channels: int, in_channels: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The 0/1 mask of an nn.Conv2d weight (out, in, kh, kw) implementing this spec.

        Outside torch.compile the tensor is cached per (shape, dtype, device) and shared:
        do not modify it in place. Built on the host, a GPU mask would cost every call of
        the reference convolution a Python loop and a pageable copy that waits for the GPU.
        """
        if torch.compiler.is_compiling():
            return self._build_weight_mask(out_channels, in_channels, dtype, device)
        return _cached_weight_mask(self, out_channels, in_channels, dtype, None if device is None else torch.device(device))

    def _build_weight_mask(self, out_channels: int, in_channels: int, dtype: torch.dtype, device) -> torch.Tensor:
        mask = self.tap_mask().to(dtype=dtype, device=device).expand(out_channels, in_channels, *self.kernel_size).clone()
        if self.color_groups > 1:
            mask[:, :, self.anchor[0], self.anchor[1]] = channel_group_mask(
                out_channels, in_channels, self.color_groups, self.anchor_inclusive
            ).to(dtype=dtype, device=device)
        return mask


@functools.lru_cache(maxsize=256)
def _cached_weight_mask(spec: MaskSpec, out_channels: int, in_channels: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return spec._build_weight_mask(out_channels, in_channels, dtype, device)


def channel_group_mask(out_channels: int, in_channels: int, groups: int, inclusive: bool) -> torch.Tensor:
    """Boolean (out, in): output group g may see input group h iff h < g (or h <= g if inclusive)."""
    out_group = torch.arange(out_channels) // color_group_size(out_channels, groups)
    in_group = torch.arange(in_channels) // color_group_size(in_channels, groups)
    seen = in_group[None, :] <= out_group[:, None] if inclusive else in_group[None, :] < out_group[:, None]
    return seen


def color_group_size(channels: int, groups: int) -> int:
    """Channels per colour group: channel c is in group c // size; the last group holds the rest."""
    return -(-channels // groups)


def splits_into_color_groups(channels: int, groups: int) -> bool:
    """Whether ``channels`` split into ``groups`` non-empty colour groups."""
    return (groups - 1) * color_group_size(channels, groups) < channels


def check_color_channels(channels: int, groups: int, name: str) -> None:
    """ValueError naming ``name`` unless ``channels`` split into ``groups`` non-empty colour groups."""
    if not splits_into_color_groups(channels, groups):
        size = color_group_size(channels, groups)
        raise ValueError(
            f"{name}={channels} leaves a colour group empty ({groups} groups of {size} channels, rounded up, the "
            f"last one holding the rest); use e.g. {groups * size}"
        )


def check_gated_color_channels(channels: int, groups: int, name: str) -> None:
    """ValueError naming ``name`` unless a gated conv with ``channels`` outputs can be colour-grouped.

    Its pre-activation has 2·channels channels, in groups [a_1 b_1 | a_2 b_2 | ...]
    of two halves the width of the output's groups. That holds when rounding
    2·channels / groups up gives twice the output's group size: with 3 groups, for
    channel counts ≡ 0 or 2 (mod 3) (126 and 128, not 127).
    """
    check_color_channels(channels, groups, name)
    if not _gated_groups_pair_up(channels, groups):
        below = next((c for c in range(channels - 1, 0, -1) if _gated_groups_pair_up(c, groups)), None)
        above = next(c for c in itertools.count(channels + 1) if _gated_groups_pair_up(c, groups))
        raise ValueError(
            f"{name}={channels} can't be split into {groups} colour groups of a gated layer: its {2 * channels} "
            f"pre-activation channels would form groups of {color_group_size(2 * channels, groups)}, not twice "
            f"{color_group_size(channels, groups)}; use {' or '.join(str(c) for c in (below, above) if c is not None)}"
        )


def halves_first_channels(channels: int, groups: int) -> torch.Tensor:
    """Where the halves-first order [a_1 a_2 ... | b_1 b_2 ...] of a gated pre-activation in
    ``groups`` blocks [a_1 b_1 | a_2 b_2 | ...] (block g twice output group g of ``channels``)
    takes each of its 2·``channels`` channels from: a long tensor of channel indices."""
    size = color_group_size(channels, groups)
    n = torch.arange(channels)
    group = n // size
    a = group * size + n  # block g starts at 2·size·g; its a half's column n - size·g
    return torch.cat([a, a + (channels - group * size).clamp(max=size)])


def _gated_groups_pair_up(channels: int, groups: int) -> bool:
    return splits_into_color_groups(channels, groups) and color_group_size(2 * channels, groups) == 2 * color_group_size(channels, groups)


def _named_tap_mask(name: str, kh: int, kw: int) -> tuple[torch.Tensor, tuple[int, int]]:
    ci, cj = kh // 2, kw // 2
    rows = torch.arange(kh)[:, None]
    cols = torch.arange(kw)[None, :]
    if name in ("A", "B", "vertical", "vertical_A", "horizontal", "horizontal_A", "full") and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"mask {name!r} needs odd kernel sizes, got kernel_size={(kh, kw)}")
    if name in ("horizontal", "horizontal_A") and kh != 1:
        raise ValueError(f"mask {name!r} is a 1×k mask, got kernel_size={(kh, kw)}")
    if name == "A":
        return (rows < ci) | ((rows == ci) & (cols < cj)), (ci, cj)
    if name == "B":
        return (rows < ci) | ((rows == ci) & (cols <= cj)), (ci, cj)
    if name == "vertical":
        return (rows <= ci).expand(kh, kw), (ci, cj)
    if name == "vertical_A":
        return (rows < ci).expand(kh, kw), (ci, cj)
    if name == "horizontal":
        return (cols <= cj).expand(kh, kw), (ci, cj)
    if name == "horizontal_A":
        return (cols < cj).expand(kh, kw), (ci, cj)
    if name == "down_shifted":
        if kw % 2 == 0:
            raise ValueError(f"mask 'down_shifted' needs an odd kernel width, got kernel_size={(kh, kw)}")
        return torch.ones(kh, kw, dtype=torch.bool), (kh - 1, cj)
    if name == "down_right_shifted":
        return torch.ones(kh, kw, dtype=torch.bool), (kh - 1, kw - 1)
    return torch.ones(kh, kw, dtype=torch.bool), (ci, cj)  # "full"


def _as_pair(kernel_size: int | tuple[int, int], name: str = "kernel_size") -> tuple[int, int]:
    pair = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {kernel_size!r}")
    return pair


def default_kernel_size(mask: str | torch.Tensor, kernel_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The kernel size of a mask: given, implied by the name, or the tensor's shape."""
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            raise ValueError(f"mask tensor must be 2-d (kh, kw), got shape {tuple(mask.shape)}")
        shape = tuple(mask.shape)
        if kernel_size is not None and _as_pair(kernel_size) != shape:
            raise ValueError(f"mask has shape {shape} but kernel_size is {_as_pair(kernel_size)}")
        return shape
    if kernel_size is None:
        if mask not in _DEFAULT_KERNEL_SIZE:
            raise ValueError(f"mask {mask!r} needs a kernel_size")
        return _DEFAULT_KERNEL_SIZE[mask]
    return _as_pair(kernel_size)


def check_color_groups(color_groups: int) -> int:
    """``color_groups`` (1 or 3, else ValueError) as an int torch.compile specialises on.

    Dynamo traces an int argument that changed between calls as a SymInt; a mask is a
    compile-time constant, so ``operator.index`` makes Dynamo guard on the value instead.
    """
    if isinstance(color_groups, bool) or not isinstance(color_groups, int) or color_groups not in (1, 3):
        raise ValueError(f"color_groups must be 1 or 3, got {color_groups!r}")
    return operator.index(color_groups)


def resolve_mask(mask: str | torch.Tensor | MaskSpec, kernel_size: int | tuple[int, int] | None = None, color_groups: int = 1) -> MaskSpec:
    """Turns a named spec, a boolean tensor or a MaskSpec into a validated MaskSpec."""
    if isinstance(mask, MaskSpec):
        if kernel_size is not None and _as_pair(kernel_size) != mask.kernel_size:
            raise ValueError(f"mask has kernel size {mask.kernel_size} but kernel_size is {_as_pair(kernel_size)}")
        if color_groups != mask.color_groups:
            raise ValueError(f"mask was resolved for color_groups={mask.color_groups}, got color_groups={color_groups}")
        return mask
    color_groups = check_color_groups(color_groups)
    kh, kw = default_kernel_size(mask, kernel_size)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask tensor must be boolean or hold only 0 and 1")
        anchor = tuple(size // 2 if size % 2 else size - 1 for size in (kh, kw))
        spatial, name = mask.detach().to("cpu", torch.bool), "custom"
    elif isinstance(mask, str):
        if mask not in NAMED_MASKS:
            raise ValueError(f"mask must be one of {NAMED_MASKS} or a boolean (kh, kw) tensor, got {mask!r}")
        spatial, anchor = _named_tap_mask(mask, kh, kw)
        name = mask
    else:
        raise TypeError(f"mask must be a str, a boolean tensor or a MaskSpec, got {type(mask).__name__}")
    inclusive = bool(spatial[anchor])
    if color_groups > 1:
        spatial = spatial.clone()
        spatial[anchor] = True  # the anchor tap is active with a channel-group mask
    taps = tuple((i, j) for i in range(kh) for j in range(kw) if spatial[i, j])
    return MaskSpec(name, (kh, kw), taps, anchor, color_groups, inclusive)
