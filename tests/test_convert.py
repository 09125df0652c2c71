"""convert(): the three ways people write masked convolutions, what must be skipped, and state-dict compatibility.

The modules below are written the way third-party PixelCNNs write them (hand-made
masks, in-place or functional masking, pad-then-conv), not with this package.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelcnn_kernels import convert, use_backend
from pixelcnn_kernels.convert import MaskedConvWrapper
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.nn import MaskedConv2d
from pixelcnn_kernels.testing import assert_close


def pixelcnn_mask(kind: str, k: int) -> torch.Tensor:
    """The classic hand-made (k, k) PixelCNN mask: rows above, and left of the centre (plus the centre for B)."""
    mask = torch.ones(k, k)
    mask[k // 2, k // 2 + (kind == "B") :] = 0
    mask[k // 2 + 1 :] = 0
    return mask


class InPlaceMaskedConv(nn.Conv2d):
    """Masks its weight in place before each call; the mask has the weight's full shape."""

    def __init__(self, c_in, c_out, k, kind="B", dilation=1):
        super().__init__(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation)
        self.register_buffer("mask", pixelcnn_mask(kind, k).expand_as(self.weight).clone())

    def forward(self, x):
        self.weight.data *= self.mask
        return super().forward(x)


class FunctionalMaskedConv(nn.Conv2d):
    """Masks functionally with a (k, k) mask held as ``conv_mask`` (a frozen Parameter or a buffer)."""

    def __init__(self, c_in, c_out, mask, as_parameter=False, bias=True):
        super().__init__(c_in, c_out, tuple(mask.shape), padding=tuple(s // 2 for s in mask.shape), bias=bias)
        if as_parameter:
            self.conv_mask = nn.Parameter(mask, requires_grad=False)
        else:
            self.register_buffer("conv_mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.conv_mask, self.bias, padding=self.padding)


class ColourMaskedConv(nn.Conv2d):
    """A colour PixelCNN conv: full (out, in, k, k) mask with the R, G, B channel rule at the centre."""

    def __init__(self, c_in, c_out, k, kind, interleaved=False, balanced=False):
        super().__init__(c_in, c_out, k, padding=k // 2)
        mask = resolve_mask(kind, k, color_groups=3).weight_mask(c_out, c_in)
        if interleaved:  # channel c of colour c % 3, not c // (C / 3)
            mask = mask[torch.arange(c_out).view(3, -1).T.flatten()][:, torch.arange(c_in).view(3, -1).T.flatten()]
        if balanced:  # unequal groups with the remainder spread over the last ones (c · 3 // C): 7 channels 3, 2, 2
            out_group, in_group = (torch.arange(c) * 3 // c for c in (c_out, c_in))
            mask[:, :, k // 2, k // 2] = (in_group[None, :] <= out_group[:, None]).float()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class MaskWrapper(nn.Module):
    """Tutorial style: holds an nn.Conv2d and a (1, 1, kh, kw) mask, masks the conv's weight in place."""

    def __init__(self, c_in, c_out, mask, dilation=1):
        super().__init__()
        padding = tuple(dilation * (s - 1) // 2 for s in mask.shape)
        self.conv = nn.Conv2d(c_in, c_out, tuple(mask.shape), padding=padding, dilation=dilation)
        self.register_buffer("mask", mask[None, None])

    def forward(self, x):
        self.conv.weight.data *= self.mask
        return self.conv(x)


# PixelCNN++'s down_shift / right_shift of a first layer's output: one row down, or one column right.
OUTPUT_SHIFTS = {None: lambda x: x, "down": lambda x: F.pad(x, (0, 0, 1, 0))[:, :, :-1], "right": lambda x: F.pad(x, (1, 0, 0, 0))[..., :-1]}


class DownShiftedConv(nn.Module):
    """PixelCNN++ style: zero-pad the top (and both sides), then an unpadded conv, then maybe an output shift."""

    def __init__(self, c_in, c_out, kernel=(2, 3), stride=1, weight_norm=False, shift_output=None):
        super().__init__()
        self.pad = nn.ZeroPad2d(((kernel[1] - 1) // 2, (kernel[1] - 1) // 2, kernel[0] - 1, 0))
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride)
        if weight_norm:
            self.conv = nn.utils.parametrizations.weight_norm(self.conv)
        self.shift_output = shift_output

    def forward(self, x):
        return OUTPUT_SHIFTS[self.shift_output](self.conv(self.pad(x)))


class DownRightShiftedConv(nn.Module):
    """PixelCNN++ style down-right shift written with F.pad in forward (no pad module)."""

    def __init__(self, c_in, c_out, kernel=(2, 2), shift_output=None):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(c_in, c_out, kernel)
        self.shift_output = shift_output

    def forward(self, x):
        return OUTPUT_SHIFTS[self.shift_output](self.conv(F.pad(x, (self.kernel[1] - 1, 0, self.kernel[0] - 1, 0))))


class UnappliedMaskConv(nn.Conv2d):
    """Holds a mask but forgets to apply it: must not be converted."""

    def __init__(self, c_in, c_out, k):
        super().__init__(c_in, c_out, k, padding=k // 2)
        self.register_buffer("mask", pixelcnn_mask("A", k))


def third_party_pixelcnn() -> nn.Module:
    return nn.ModuleDict({
        "first": InPlaceMaskedConv(3, 6, 5, "A"),
        "dilated": InPlaceMaskedConv(6, 6, 3, "B", dilation=2),
        "frozen_param": FunctionalMaskedConv(6, 6, pixelcnn_mask("B", 3), as_parameter=True),
        "colour": ColourMaskedConv(6, 6, 3, "B"),
        "vertical": MaskWrapper(6, 6, torch.tensor([[1.0, 1, 1], [1, 1, 1], [0, 0, 0]])),
        "horizontal": MaskWrapper(6, 6, torch.tensor([[1.0, 1, 0]]), dilation=2),
        "down": DownShiftedConv(6, 6),
        "down_right": DownRightShiftedConv(6, 6),
        "leaky": UnappliedMaskConv(6, 6, 3),
        "strided": DownShiftedConv(6, 6, stride=2),
        "weight_normed": DownShiftedConv(6, 6, weight_norm=True),
        "shifted_output": DownShiftedConv(6, 6, shift_output="down"),
        "right_shifted_output": DownRightShiftedConv(6, 6, kernel=(2, 1), shift_output="right"),
        "wrongly_shifted_output": DownShiftedConv(6, 6, shift_output="right"),  # not PixelCNN++'s pairing
    })


def run_all(model: nn.ModuleDict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: module(x if name == "first" else x.repeat(1, 2, 1, 1)) for name, module in model.items()}


EXPECTED_MASKS = {
    "first": "A 5×5",
    "dilated": "B 3×3, dilation 2",
    "frozen_param": "B 3×3",
    "colour": "B 3×3, colour groups 3",
    "vertical": "vertical 3×3",
    "horizontal": "horizontal 1×3, dilation 2",
    "down": "down_shifted 2×3",
    "down_right": "down_right_shifted 2×2",
    "weight_normed": "down_shifted 2×3",
    "shifted_output": "down_shifted 2×3, output shifted down",
    "right_shifted_output": "down_right_shifted 2×1, output shifted right",
}
EXPECTED_REASONS = {
    "leaky": "output differs from the masked conv",
    "strided": "stride (2, 2)",
    "wrongly_shifted_output": "as down_shifted 2×3: output differs from the masked conv on a probe",
}


def test_recognises_every_style_and_skips_with_reasons():
    model = third_party_pixelcnn()
    x = torch.randn(2, 3, 8, 8)
    before = run_all(model, x)
    report = convert(model)
    assert {r.name: r.mask for r in report.replaced} == EXPECTED_MASKS
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == set(EXPECTED_REASONS)
    for name, reason in EXPECTED_REASONS.items():
        assert reason in skipped[name], skipped[name]
    for name in EXPECTED_MASKS:
        module = model[name]
        assert isinstance(module, (MaskedConv2d, MaskedConvWrapper)), name
    after = run_all(model, x)
    for name in before:
        assert_close(after[name], before[name], msg=name)
    table = str(report)
    assert "convert: 11 replaced, 3 skipped" in table and "down_right_shifted 2×2" in table and "stride (2, 2)" in table


def test_same_parameters_keep_an_optimizer_working():
    model = third_party_pixelcnn()
    params_before = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert(model)
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[name] is p for name, p in params_before.items())
    weight = model["first"].weight
    old = weight.detach().clone()
    loss = model["first"](torch.randn(1, 3, 6, 6)).square().sum()
    loss.backward()
    optimizer.step()
    assert not torch.equal(weight, old)


def test_state_dict_loads_both_ways():
    original = third_party_pixelcnn()
    converted = convert(third_party_pixelcnn(), inplace=True).model
    assert list(converted.state_dict()) == list(original.state_dict())
    converted.load_state_dict(original.state_dict())
    for name, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), name
    fresh = third_party_pixelcnn()
    fresh.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for name, out in run_all(fresh, x).items():
        assert_close(run_all(converted, x)[name], out, msg=name)


def test_loading_a_different_mask_into_a_converted_conv_fails():
    converted = convert(nn.Sequential(InPlaceMaskedConv(2, 2, 3, "B"))).model
    state = converted.state_dict()
    state["0.mask"] = torch.ones_like(state["0.mask"])
    with pytest.raises(ValueError, match="differs from the mask this converted conv implements"):
        converted.load_state_dict(state)


def test_a_converted_conv_moved_to_another_dtype_loads_its_checkpoint():
    """The mask check compares on the CPU in the mask's first dtype: the model may move after the conversion."""
    converted = convert(nn.Sequential(InPlaceMaskedConv(2, 2, 3, "B"))).model.double()
    converted.load_state_dict(converted.state_dict())
    state = converted.state_dict()
    state["0.mask"] = torch.ones_like(state["0.mask"])
    with pytest.raises(ValueError, match="differs from the mask"):
        converted.load_state_dict(state)


def test_a_module_held_at_two_names_is_replaced_at_both():
    """Tied layers: one replacement at every name, so the model still holds one module there."""
    model = nn.Sequential(FunctionalMaskedConv(2, 2, pixelcnn_mask("B", 3)), nn.ReLU())
    model.append(model[0])
    keys, x = list(model.state_dict()), torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        expected = model(x)
    report = convert(model)
    assert model[0] is model[2] and isinstance(model[0], MaskedConv2d)
    assert [r.name for r in report.replaced] == ["0", "2"] and "the module at '0' again" in report.replaced[1].mask
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert_close(model(x), expected)


class ConditionalMaskedConv(FunctionalMaskedConv):
    """A class-conditional conv: forward(x, h) adds a per-channel bias."""

    def forward(self, x, h):
        return super().forward(x) + h[:, :, None, None]


class PairMaskedConv(FunctionalMaskedConv):
    def forward(self, x):
        out = super().forward(x)
        return out, out


def test_candidates_that_cannot_be_probed_or_are_hooked_are_skipped_with_reasons():
    backward_hooked = FunctionalMaskedConv(2, 2, pixelcnn_mask("A", 3))
    backward_hooked.register_full_backward_pre_hook(lambda module, grad_output: None)
    model = nn.ModuleList([ConditionalMaskedConv(2, 2, pixelcnn_mask("A", 3)), PairMaskedConv(2, 2, pixelcnn_mask("A", 3)), backward_hooked])
    report = convert(model)
    assert not report.replaced
    reasons = [s.reason for s in report.skipped]
    assert "cannot run on an image batch alone (TypeError" in reasons[0]
    assert "returns a tuple, not a tensor" in reasons[1]
    assert "hooks" in reasons[2]


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("style", ["hook", "parametrization"])
def test_weight_normalised_convs_keep_their_normalisation(style):
    """PixelCNN++'s torch.nn.utils.weight_norm (a hook) or parametrizations.weight_norm: the replacement
    computes its weight the same way from the same g and v Parameters, which get the gradients."""
    module = DownShiftedConv(2, 3)
    module.conv = nn.utils.weight_norm(module.conv) if style == "hook" else nn.utils.parametrizations.weight_norm(module.conv)
    model = nn.Sequential(module)
    sources = [p for name, p in model.named_parameters() if "bias" not in name]
    keys, x = list(model.state_dict()), torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        expected = model(x)
    report = convert(model)
    assert [r.mask for r in report.replaced] == ["down_shifted 2×3"] and isinstance(model[0], MaskedConvWrapper)
    assert list(model.state_dict()) == keys and [p for name, p in model.named_parameters() if "bias" not in name] == sources
    output = model(x)
    assert_close(output, expected)
    output.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sources)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_weight_norm_conv_moved_since_its_last_forward_converts_with_its_own_weight():
    """weight norm's weight is a plain attribute its hook sets before a forward: after .double() it is stale
    float32, and after the probes it would hold their random Parameters' result."""
    module = DownShiftedConv(2, 3)
    module.conv = nn.utils.weight_norm(module.conv)
    model = nn.Sequential(module).double()
    weight = torch._weight_norm(module.conv.weight_v, module.conv.weight_g, 0).detach()
    report = convert(model)
    assert [r.mask for r in report.replaced] == ["down_shifted 2×3"]
    assert model[0].conv.weight.dtype == torch.float64 and torch.equal(model[0].conv.weight.detach(), weight)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spectral_normalised_convs_convert_and_keep_their_power_iteration_state(training):
    """parametrizations.spectral_norm updates its vectors at every training-mode forward, and even when
    its weight is read: the probes start from and leave the model's state; the converted model then
    takes the same steps as the original."""
    torch.manual_seed(0)

    def build():
        model = nn.Sequential(FunctionalMaskedConv(2, 4, pixelcnn_mask("A", 3)), nn.ReLU(), FunctionalMaskedConv(4, 4, pixelcnn_mask("B", 3)))
        for i in (0, 2):
            nn.utils.parametrizations.spectral_norm(model[i])
        return model

    model, x = build(), torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        for _ in range(3):
            model(x)  # the vectors away from their initial values
    original = build()
    original.load_state_dict(model.state_dict())
    model.train(training)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    report = convert(model)
    assert [r.mask for r in report.replaced] == ["A 3×3", "B 3×3"]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    for mode in (True, False):  # a training step's forward (advancing the vectors), then evaluation
        model.train(mode), original.train(mode)
        with torch.no_grad():
            assert_close(model(x), original(x))
        assert all(torch.equal(value, original.state_dict()[key]) for key, value in model.state_dict().items())


def test_a_parametrized_bias_is_skipped():
    module = DownShiftedConv(2, 2)
    torch.nn.utils.parametrize.register_parametrization(module.conv, "bias", nn.Identity())
    report = convert(nn.Sequential(module))
    assert not report.replaced and "parametrizations of ['bias']" in report.skipped[0].reason


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_not_inplace_on_a_model_pytorch_cannot_copy_says_so():
    module = DownShiftedConv(2, 2)
    module.conv = nn.utils.weight_norm(module.conv)
    with pytest.raises(ValueError, match="cannot deep-copy this model"):
        convert(nn.Sequential(module), inplace=False)


def test_not_inplace_converts_a_copy():
    model = nn.Sequential(InPlaceMaskedConv(2, 4, 3, "A"), nn.ReLU(), MaskWrapper(4, 4, pixelcnn_mask("B", 3)))
    report = convert(model, inplace=False)
    assert type(model[0]) is InPlaceMaskedConv and type(model[2]) is MaskWrapper
    assert isinstance(report.model[0], MaskedConv2d) and isinstance(report.model[2], MaskedConvWrapper)
    assert report.model[0].weight is not model[0].weight
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert_close(report.model(x), model(x))


def test_probes_leave_weights_unchanged():
    conv = InPlaceMaskedConv(2, 2, 3, "A")
    model = nn.Sequential(conv)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # non-zero at masked taps: the in-place forward would zero them
    convert(model)
    assert torch.all(model[0].weight == 1.0)


class DroppingMaskedConv(FunctionalMaskedConv):
    """A masked conv with dropout on its output in training mode: held as a child module, or called functionally."""

    def __init__(self, c_in, c_out, as_child):
        super().__init__(c_in, c_out, pixelcnn_mask("B", 3))
        self.as_child = as_child
        if as_child:
            self.drop = nn.Dropout(0.5)

    def forward(self, x):
        out = super().forward(x)
        return self.drop(out) if self.as_child else F.dropout(out, 0.5, training=self.training)


@pytest.mark.parametrize("training", [True, False])
def test_training_only_behaviour_is_not_dropped_and_the_random_streams_are_left_alone(training):
    """Probed in both modes, whatever the model's: the dropout of a model converted in eval mode would vanish in training."""
    model = nn.Sequential(DroppingMaskedConv(2, 2, as_child=True), DroppingMaskedConv(2, 2, as_child=False), InPlaceMaskedConv(2, 2, 3, "B"))
    model.train(training)
    state = torch.get_rng_state()
    report = convert(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert [r.name for r in report.replaced] == ["2"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert "also holds ['Dropout']" in reasons["0"]
    assert "output differs from the masked conv on a probe with current weights in training mode" in reasons["1"]
    assert all(module.training == training for module in model.modules())


class EvalCachedMaskedConv(FunctionalMaskedConv):
    """Masks its weight once when put in eval mode (an inference cache); holds a counter convert() cannot keep."""

    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, pixelcnn_mask("B", 3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.eval_weight = None

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self.eval_weight = (self.weight * self.conv_mask).detach()
        return self

    def forward(self, x):
        weight = self.weight * self.conv_mask if self.training else self.eval_weight
        return F.conv2d(x, weight, self.bias, padding=self.padding)


def test_a_skipped_module_with_a_train_override_is_left_as_it_was():
    """The probes switch modes without calling train(): an override would cache the probe's random weights."""
    model = nn.Sequential(EvalCachedMaskedConv(2, 4)).eval()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        before = model(x)
    report = convert(model)
    assert not report.replaced and len(report.skipped) == 1  # its eval forward ignores the probe's weights
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize(
    "module, reason",
    [
        (FunctionalMaskedConv(2, 2, torch.tensor([[0.0, 0.5, 0], [1, 1, 0], [0, 0, 0]])), "values other than 0 and 1"),
        (FunctionalMaskedConv(2, 2, pixelcnn_mask("B", 3)[:2]), "centred mask needs odd kernel sizes"),
        # colour groups of interleaved channels R, G, B, R, G, B (the kernels' groups are contiguous thirds)
        (ColourMaskedConv(6, 6, 3, "B", interleaved=True), "channels interleaved R,G,B,R,... are not supported"),
        # 7 outputs in groups of 3, 2, 2, not the kernels' 3, 3, 1
        (ColourMaskedConv(6, 7, 3, "B", balanced=True), "as pixelcnn_kernels.masks splits them"),
    ],
)
def test_unusable_masks_are_skipped(module, reason):
    report = convert(nn.Sequential(module))
    assert not report.replaced and reason in report.skipped[0].reason


def test_colour_groups_of_unequal_sizes_are_converted():
    """8 outputs in colour groups of 3, 3, 2 (masks.color_group_size): replaced, and the same outputs."""
    model = nn.Sequential(ColourMaskedConv(6, 8, 3, "B"))
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        before = model(x)
    report = convert(model)
    assert [r.mask for r in report.replaced] == ["B 3×3, colour groups 3"]
    with torch.no_grad():
        assert_close(model(x), before)


def test_uncentred_padding_and_hooks_are_skipped():
    uncentred = InPlaceMaskedConv(2, 2, 3, "B")
    uncentred.padding = (0, 0)
    hooked = InPlaceMaskedConv(2, 2, 3, "B")
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    report = convert(nn.Sequential(uncentred, hooked))
    reasons = [s.reason for s in report.skipped]
    assert "not the centred padding" in reasons[0] and "hooks" in reasons[1]


def test_the_model_itself_is_not_replaced():
    report = convert(InPlaceMaskedConv(2, 2, 3, "A"))
    assert not report.replaced and "model itself" in report.skipped[0].reason


def test_plain_modules_are_not_candidates():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()))
    report = convert(model)
    assert not report.replaced and not report.skipped
    assert str(report).startswith("convert: 0 replaced, 0 skipped; no masked convolution found. convert recognises")


def test_converted_model_runs_on_the_triton_backend():
    model = nn.Sequential(InPlaceMaskedConv(2, 4, 3, "A"), nn.ReLU(), DownShiftedConv(4, 2))
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        expected = model(x)
    convert(model)
    with use_backend("triton"), torch.no_grad():
        assert_close(model(x), expected)


def test_converted_model_compiles():
    model = nn.Sequential(InPlaceMaskedConv(2, 4, 3, "A"), nn.ReLU(), MaskWrapper(4, 4, pixelcnn_mask("B", 3)), DownRightShiftedConv(4, 2))
    convert(model)
    x = torch.randn(2, 2, 6, 6)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), model(x))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        convert("model")
    with pytest.raises(TypeError, match="inplace"):
        convert(nn.Sequential(), inplace="yes")
    with pytest.raises(TypeError, match="^seed must be an int, got float"):
        convert(nn.Sequential(), seed=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_on_the_gpu(dtype):
    model = third_party_pixelcnn().to("cuda", dtype)
    x = torch.randn(4, 3, 16, 16, device="cuda", dtype=dtype)
    before = run_all(model, x)
    report = convert(model)
    assert {r.name for r in report.replaced} == set(EXPECTED_MASKS), str(report)
    after = run_all(model, x)
    for name in before:
        assert_close(after[name], before[name], tf32=True, msg=name)


def test_converting_twice_changes_nothing_more():
    model = third_party_pixelcnn()
    convert(model)
    again = convert(model)
    assert not again.replaced and {s.name for s in again.skipped} == set(EXPECTED_REASONS)


def test_an_unapplied_mask_is_caught_even_when_the_weights_are_already_masked():
    conv = UnappliedMaskConv(2, 2, 3)
    with torch.no_grad():
        conv.weight *= conv.mask  # the current weights agree with the mask: only random weights reveal the bug
    report = convert(nn.Sequential(conv))
    assert not report.replaced and "probe with random weights" in report.skipped[0].reason
