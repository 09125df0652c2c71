"""Mask specs: active taps, anchors, padding and colour-group masks."""

import pytest
import torch

from pixelcnn_kernels.masks import NAMED_MASKS, MaskSpec, channel_group_mask, check_gated_color_channels, color_group_size, resolve_mask


@pytest.mark.parametrize(
    "name, kernel_size, taps",
    [
        ("A", 3, 4),
        ("B", 3, 5),
        ("A", 5, 12),
        ("B", 7, 25),
        ("vertical", 3, 6),
        ("vertical_A", 3, 3),
        ("horizontal", (1, 3), 2),
        ("horizontal_A", (1, 3), 1),
        ("down_shifted", None, 6),
        ("down_right_shifted", None, 4),
        ("full", 1, 1),
    ],
)
def test_named_masks_have_the_documented_number_of_taps(name, kernel_size, taps):
    spec = resolve_mask(name, kernel_size)
    assert len(spec.taps) == taps
    assert int(spec.tap_mask().sum()) == taps


def test_mask_b_3x3_layout():
    expected = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(resolve_mask("B", 3).tap_mask(), expected)


def test_vertical_includes_the_centre_row_and_vertical_a_excludes_it():
    assert resolve_mask("vertical", 3).tap_mask()[1].all()
    assert not resolve_mask("vertical_A", 3).tap_mask()[1].any()


@pytest.mark.parametrize("name, kernel_size", [("down_shifted", (2, 3)), ("down_right_shifted", (2, 2))])
def test_shifted_masks_pad_like_pixelcnn_pp(name, kernel_size):
    # PixelCNN++ pads (left, right, top, bottom) = ((kw-1)//2, (kw-1)//2, kh-1, 0) for down_shifted
    # and (kw-1, 0, kh-1, 0) for down_right_shifted, then runs a valid conv.
    kh, kw = kernel_size
    pixelcnn_pp = {"down_shifted": (kh - 1, 0, (kw - 1) // 2, (kw - 1) // 2), "down_right_shifted": (kh - 1, 0, kw - 1, 0)}
    spec = resolve_mask(name)
    assert spec.kernel_size == kernel_size
    assert spec.padding() == pixelcnn_pp[name]
    top, bottom, left, right = spec.padding(dilation=2)
    assert (top, bottom, left, right) == tuple(2 * p for p in pixelcnn_pp[name])


def test_colour_groups_activate_the_anchor_with_the_group_rule():
    spec_a = resolve_mask("A", 3, color_groups=3)
    spec_b = resolve_mask("B", 3, color_groups=3)
    assert (1, 1) in spec_a.taps and not spec_a.anchor_inclusive
    assert spec_b.anchor_inclusive
    centre_a = spec_a.weight_mask(6, 3)[:, :, 1, 1]
    centre_b = spec_b.weight_mask(6, 3)[:, :, 1, 1]
    # output groups of 2 channels (R, G, B) against input channels R, G, B
    assert centre_a.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert centre_b.tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    # every other tap stays fully on or off as in the spatial mask
    assert torch.equal(spec_a.weight_mask(6, 3)[:, :, 0, :], torch.ones(6, 3, 3))


def test_channel_group_mask_is_block_lower_triangular():
    mask = channel_group_mask(3, 3, 3, inclusive=False)
    assert torch.equal(mask, torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool))


def test_colour_groups_round_their_size_up_and_the_last_holds_the_rest():
    """8 channels: groups 3, 3, 2 (128: 43, 43, 42); the mask follows them on each side."""
    assert color_group_size(8, 3) == 3 and color_group_size(128, 3) == 43 and color_group_size(126, 3) == 42
    mask = channel_group_mask(8, 5, 3, inclusive=True)  # outputs 3, 3, 2; inputs 2, 2, 1
    out_group, in_group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 2])
    assert torch.equal(mask, in_group[None, :] <= out_group[:, None])


@pytest.mark.parametrize("channels, fits", [(126, True), (128, True), (127, False), (8, True), (4, False), (2, False), (3, True)])
def test_gated_colour_groups_need_the_pre_activation_in_pairs_of_groups(channels, fits):
    """A gated layer's 2C pre-activation channels split into groups twice the C outputs' (256: 86, 86, 84 for 128),
    and no group is empty: C ≡ 0 or 2 (mod 3) and at least 3."""
    if fits:
        check_gated_color_channels(channels, 3, "hidden")
        assert color_group_size(2 * channels, 3) == 2 * color_group_size(channels, 3)
    else:
        with pytest.raises(ValueError, match=rf"^hidden={channels} "):
            check_gated_color_channels(channels, 3, "hidden")
    check_gated_color_channels(channels, 1, "hidden")  # one group always fits


def test_custom_tensor_mask_is_anchored_at_the_centre():
    custom = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 0]])
    spec = resolve_mask(custom)
    assert spec.name == "custom" and spec.anchor == (1, 1) and spec.taps == ((0, 0), (0, 2), (1, 0))


def test_mask_spec_passes_through():
    spec = resolve_mask("B", 5)
    assert resolve_mask(spec) is spec
    assert isinstance(spec, MaskSpec)


@pytest.mark.parametrize(
    "mask, kernel_size, color_groups, error, match",
    [
        ("C", 3, 1, ValueError, "mask must be one of"),
        ("A", 4, 1, ValueError, "odd kernel sizes"),
        ("horizontal", 3, 1, ValueError, "1×k"),
        ("A", None, 1, ValueError, "needs a kernel_size"),
        ("A", 3, 2, ValueError, "color_groups must be 1 or 3"),
        ("A", 3, True, ValueError, "color_groups must be 1 or 3"),
        (torch.ones(3, 3), 5, 1, ValueError, "kernel_size"),
        (torch.full((3, 3), 2.0), None, 1, ValueError, "only 0 and 1"),
        (torch.zeros(3, 3), None, 1, ValueError, "no active tap"),
        (3, 3, 1, TypeError, "mask must be a str"),
        ("A", (3, 0), 1, ValueError, "kernel_size must be"),
        ("A", 3.0, 1, ValueError, "kernel_size must be a positive int or a pair of them, got 3.0"),
    ],
)
def test_bad_masks_raise_naming_the_problem(mask, kernel_size, color_groups, error, match):
    with pytest.raises(error, match=match):
        resolve_mask(mask, kernel_size, color_groups)


@pytest.mark.parametrize(
    "taps, anchor, color_groups, match",
    [
        ((), (1, 1), 1, "has no active tap"),
        (((0, 0), (0, 0), (1, 1)), (1, 1), 1, r"taps must be distinct \(row, col\) positions of the 3×3 kernel in row-major order"),
        (((1, 1), (0, 0)), (1, 1), 1, "row-major order"),
        (((0, 0), (3, 1)), (1, 1), 1, "positions of the 3×3 kernel"),
        (((-1, 0), (1, 1)), (1, 1), 1, "positions of the 3×3 kernel"),
        (((0, 0), (1, 1)), (1, 3), 1, r"anchor must be a \(row, col\) position"),
        (((0, 0),), (1, 1), 3, "must include the anchor"),
        (((0, 0), (1, 1)), (1, 1), 2, "color_groups must be 1 or 3"),
    ],
)
def test_a_hand_built_mask_spec_is_checked_as_resolved_ones_are(taps, anchor, color_groups, match):
    """The kernels index a spec's taps as given: a duplicate or outside tap would be silent garbage."""
    with pytest.raises(ValueError, match=match):
        MaskSpec("custom", (3, 3), taps, anchor, color_groups)


@pytest.mark.parametrize("name, shape", [("down_shifted", (2, 3)), ("down_right_shifted", (2, 2)), ("down_shifted", (2, 5))])
def test_an_even_sided_mask_tensor_anchors_as_pixelcnn_pp_shifts(name, shape):
    """Along an even side a tensor's anchor is its last row or column: a tensor of ones is the shifted spec."""
    named, custom = resolve_mask(name, shape), resolve_mask(torch.ones(shape, dtype=torch.bool))
    assert (custom.taps, custom.anchor, custom.padding(2)) == (named.taps, named.anchor, named.padding(2))


def test_every_named_mask_resolves():
    for name in NAMED_MASKS:
        kernel_size = {"horizontal": (1, 3), "horizontal_A": (1, 3)}.get(name, None if name.startswith("down") else 3)
        assert resolve_mask(name, kernel_size).taps


def test_weight_mask_is_built_once_per_shape_dtype_and_device():
    """The reference convolution asks for the mask on every call: it must not be rebuilt (and, on a GPU, copied) each time."""
    spec = resolve_mask("A", 3, 3)
    mask = spec.weight_mask(6, 3)
    assert spec.weight_mask(6, 3) is mask and resolve_mask("A", 3, 3).weight_mask(6, 3) is mask  # equal specs share it
    assert spec.weight_mask(6, 3, torch.float64) is not mask and torch.equal(spec.weight_mask(6, 3, torch.float64), mask.double())
