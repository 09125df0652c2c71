"""check_causality: leaks, blind spots, colour order, the receptive-field PNG and bad input."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pixelcnn_kernels import check_causality
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus
from pixelcnn_kernels.nn import MaskedConv2d


def masked_stack(first_mask: str, *, channels: int = 1, hidden: int = 12, layers: int = 3, color_groups: int = 1) -> nn.Sequential:
    """A plain PixelCNN: a first 3×3 conv with ``first_mask``, then 3×3 mask-B convs, ReLU between."""
    modules = [MaskedConv2d(channels, hidden, 3, mask=first_mask, color_groups=color_groups)]
    for _ in range(layers - 1):
        modules += [nn.ReLU(), MaskedConv2d(hidden, hidden, 3, mask="B", color_groups=color_groups)]
    modules += [nn.ReLU(), MaskedConv2d(hidden, 2 * channels, 1, mask="B", color_groups=color_groups)]
    return nn.Sequential(*modules)


def test_plain_mask_b_stack_has_the_upper_right_blind_spot():
    report = check_causality(masked_stack("A"), (1, 8, 8), positions=[(0, 3, 3), (0, 0, 5), (0, 1, 3), (0, 6, 1)])
    assert not report.leaks
    blind = {finding.output: set(finding.inputs) for finding in report.blind_spots}
    # One row up and two columns right is never reached by 3×3 mask-B convs, while
    # two rows up and two columns right is: the classic blind spot.
    assert (0, 2, 5) in blind[(0, 3, 3)]
    assert report.receptive_field((0, 3, 3))[0, 1, 5] != 0
    # The first rows' outputs see every earlier input they can: no blind spot there.
    assert (0, 0, 5) not in blind and (0, 1, 3) not in blind
    assert not report.ok
    assert "blind spot" in str(report)


def test_first_layer_mask_b_leaks_the_current_pixel():
    report = check_causality(masked_stack("B"), (1, 4, 4))
    leaks = {finding.output: finding.inputs for finding in report.leaks}
    assert len(leaks) == 16
    assert leaks[(0, 2, 3)] == ((0, 2, 3),)
    assert "leak" in str(report)


def test_colour_groups_follow_the_channel_order():
    report = check_causality(masked_stack("A", channels=3, color_groups=3), (3, 5, 5), output_groups=3, positions=[(0, 3, 3), (1, 3, 3), (2, 3, 3)])
    assert not report.leaks
    own_pixel = report.receptive_field((2, 3, 3))[:, 3, 3]
    assert own_pixel[0] != 0 and own_pixel[1] != 0 and own_pixel[2] == 0  # B sees R and G of its pixel, not itself
    assert torch.all(report.receptive_field((0, 3, 3))[:, 3, 3] == 0)  # R sees nothing of its pixel


def test_colour_mask_b_first_layer_leaks_each_channel_into_itself():
    report = check_causality(masked_stack("B", channels=3, color_groups=3), (3, 4, 4), output_groups=3, positions=[(1, 2, 2)])
    assert [finding.inputs for finding in report.leaks] == [((1, 2, 2),)]


def test_whole_pixel_outputs_may_not_see_any_channel_of_their_pixel():
    # With one output group every output channel predicts the whole pixel (like a
    # mixture-of-logistics head), so mask A's within-pixel colour links are leaks.
    report = check_causality(masked_stack("A", channels=3, color_groups=3), (3, 4, 4), output_groups=1, positions=[(0, 2, 2)])
    assert [finding.inputs for finding in report.leaks] == [((0, 2, 2), (1, 2, 2))]


def test_gated_pixelcnn_has_no_leak_and_no_blind_spot():
    model = GatedPixelCNN(in_channels=1, hidden=4, layers=2, num_bins=4)
    report = check_causality(model, (1, 8, 8))
    assert report.ok, str(report)
    # Its receptive field reaches the upper right that the plain stack misses.
    assert report.receptive_field((0, 3, 3))[0, 2, 5] != 0


@pytest.mark.parametrize("hidden", [6, 8], ids=["equal_colour_groups", "groups_3_3_2"])
def test_gated_pixelcnn_colour_and_class_conditional(hidden):
    model = GatedPixelCNN(in_channels=3, hidden=hidden, layers=2, num_bins=4, num_classes=3)
    report = check_causality(model, (3, 5, 5), trials=2)
    assert report.ok, str(report)
    assert report.receptive_field((1, 2, 2))[0, 2, 2] != 0


def test_pixelcnn_plus_plus_does_not_leak():
    # Its mixture head predicts whole pixels: one output group, earlier pixels only. (With one
    # block per resolution on 8×8 images some far-right inputs of the previous rows are out of
    # reach while the coarser resolutions see farther up: depth-limited holes, reported as blind spots.)
    model = PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=1, in_channels=1, num_bins=4, dropout=0.0)
    report = check_causality(model, (1, 8, 8), positions=[(0, i, 7 - i) for i in range(8)] + [(0, 6, 3)], trials=2)
    assert report.output_groups == 1
    assert not report.leaks, str(report)
    assert report.receptive_field((0, 6, 3))[0, 5, 5] != 0


def test_model_is_left_untouched():
    model = masked_stack("A")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    model.train()
    check_causality(model, (1, 4, 4))
    assert model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name])


class Wrapped(nn.Module):
    """A third-party model: ``net`` called by ``forward(net, x)``, e.g. casting or quantising x first."""

    def __init__(self, net: nn.Module, forward: Callable[[nn.Module, torch.Tensor], object]):
        super().__init__()
        self.net = net
        self.wrapped_forward = forward

    def forward(self, x):
        return self.wrapped_forward(self.net, x)


def casts_its_input(net: nn.Module) -> Wrapped:
    """As ``x.float()`` in most forwards: checked in float32."""
    return Wrapped(net, lambda net, x: net(x.float()))


def test_a_model_casting_its_input_to_float32_is_checked_in_float32():
    report = check_causality(casts_its_input(masked_stack("B")), (1, 4, 4), positions=[(0, 2, 1)])
    assert [finding.inputs for finding in report.leaks] == [((0, 2, 1),)]  # mask B's first layer sees its own pixel
    assert report.receptive_field((0, 2, 1)).dtype == torch.bool
    assert not check_causality(casts_its_input(masked_stack("A")), (1, 4, 4)).leaks


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_old_style_weight_norm_models_are_checked_untouched():
    """torch.nn.utils.weight_norm modules cannot be deep-copied; the check substitutes float64 weights instead, and leaves the model's as they were."""
    model = masked_stack("A")
    model[0] = nn.utils.weight_norm(model[0])
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert not check_causality(model, (1, 5, 5)).leaks
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    # The hook's weight attribute is the model's own again, not the check's CPU float64 one.
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight.detach(), torch._weight_norm(model[0].weight_v, model[0].weight_g, 0).detach())


def test_tied_layers_are_checked():
    """functional_call needs one substitute per tensor: a layer held twice shares its weights."""
    shared = MaskedConv2d(4, 4, 3, mask="B")
    model = nn.Sequential(MaskedConv2d(1, 4, 3, mask="A"), nn.ReLU(), shared, nn.ReLU(), shared)
    report = check_causality(model, (1, 5, 5))
    assert not report.leaks and report.receptive_field((0, 4, 4))[0, 3, 3] != 0


def test_a_forward_without_a_gradient_path_or_tensor_output_asks_for_forward_fn():
    """A leaky model that quantises its input would show no influence at all, so no leak: an error instead, as for a pair of outputs."""
    with pytest.raises(ValueError, match="no output depends on the input through gradients.*forward_fn"):
        check_causality(Wrapped(masked_stack("B"), lambda net, x: net(torch.round(x * 127.5 + 127.5) / 127.5 - 1)), (1, 4, 4))
    returns_a_pair = lambda net, x: (net(x), net(x).mean())  # noqa: E731
    with pytest.raises(TypeError, match="returned a tuple, not a tensor; pass forward_fn"):
        check_causality(Wrapped(masked_stack("A"), returns_a_pair), (1, 4, 4))
    model = Wrapped(masked_stack("B"), returns_a_pair)
    assert check_causality(model, (1, 4, 4), forward_fn=lambda m, x: m(x)[0]).leaks


def test_a_colour_output_with_a_multiple_of_c_channels_needs_output_groups():
    """3K channels from RGB may be K logits per colour group or a K-component mixture's parameters: the caller says which."""
    with pytest.raises(ValueError, match="output_groups is needed for a \\(B, 6, H, W\\) output of a 3-channel input"):
        check_causality(masked_stack("A", channels=3, color_groups=3), (3, 4, 4))


def test_receptive_field_png(tmp_path):
    from PIL import Image

    report = check_causality(masked_stack("A", channels=3, color_groups=3), (3, 6, 6), output_groups=3, positions=[(1, 4, 3)])
    path = report.save_receptive_field_png(tmp_path / "field.png", (1, 4, 3))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100
    category = report.categories((1, 4, 3))
    assert category[0, 4, 3] == 1 and category[1, 4, 3] == 0  # R of its own pixel influences, G itself does not
    with pytest.raises(ValueError, match="was not checked"):
        report.save_receptive_field_png(tmp_path / "other.png", (0, 0, 0))
    for not_png in ("field", "field.jpg"):  # matplotlib would have written field.png, or a JPEG
        with pytest.raises(ValueError, match="path must name a .png file"):
            report.save_receptive_field_png(tmp_path / not_png, (1, 4, 3))


def test_forward_fn_for_integer_image_models():
    model = GatedPixelCNN(in_channels=1, hidden=4, layers=1, num_bins=4)
    report = check_causality(model, (1, 4, 4), forward_fn=lambda m, x: m.network(x, None), positions=[(0, 3, 3)])
    assert report.ok
    assert report.receptive_field((0, 3, 3))[0, 3, 2] != 0


def test_bad_arguments():
    model = masked_stack("A")
    with pytest.raises(TypeError, match="model"):
        check_causality(lambda x: x, (1, 4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        check_causality(model, (4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        check_causality(model, (1, 0, 4))
    with pytest.raises(ValueError, match="positions"):
        check_causality(model, (1, 4, 4), positions=[(0, 4, 0)])
    with pytest.raises(ValueError, match="trials"):
        check_causality(model, (1, 4, 4), trials=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        check_causality(PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=1, in_channels=1, num_bins=4, dropout=0.0), (1, 6, 6))
    with pytest.raises(ValueError, match="input_shape must hold positive ints"):
        check_causality(model, (True, 4, 4))
    for name, value in (("trials", True), ("batch_size", 2.0), ("seed", 1.5), ("output_groups", "1")):
        with pytest.raises(TypeError, match=f"^{name} must be an int, got"):
            check_causality(model, (1, 4, 4), **{name: value})
    for positions in ((0, 1, 1), [(0, 1.5, 1)]):
        with pytest.raises(ValueError, match="positions must be"):
            check_causality(model, (1, 4, 4), positions=positions)
    with pytest.raises(ValueError, match="output_groups"):
        check_causality(model, (1, 4, 4), output_groups=3)
    with pytest.raises(ValueError, match="output must be"):
        check_causality(nn.Flatten(), (1, 4, 4))
    with pytest.raises(TypeError, match="forward_fn"):
        check_causality(model, (1, 4, 4), forward_fn=3)
