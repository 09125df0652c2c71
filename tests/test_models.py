"""The drop-in models: shapes, likelihoods, backends, causality, compile, autocast, config and the naive sampler."""

import copy
import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from op_table import CUDA
from scipy import stats

import pixelcnn_kernels
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus, build_model, model_from_config
from pixelcnn_kernels.ops import masked_conv as masked_conv_ops
from pixelcnn_kernels.reference.layers import REFERENCE_OPS, set_ops
from pixelcnn_kernels.testing import assert_close, tolerance
from pixelcnn_kernels.utils import channels_last, is_channels_last

# Tiny configurations: the fused ops' reference backend on a loaded 2-core CPU needs them tiny.
TINY = {
    "gated_grey": (lambda: GatedPixelCNN(1, hidden=6, layers=3, dilations=[1, 2, 1], num_bins=16), (1, 6, 6)),
    "gated_rgb": (lambda: GatedPixelCNN(3, hidden=8, layers=3, dilations=[1, 2, 1], num_bins=16), (3, 6, 6)),  # colour groups of 3, 3, 2
    "gated_dmol": (lambda: GatedPixelCNN(3, hidden=4, layers=3, dilations=[1, 2, 1], head="dmol", num_logistic_mix=2), (3, 6, 6)),
    "pp_grey": (lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=2, nr_logistic_mix=2, in_channels=1, dropout=0.0, num_bins=16), (1, 8, 8)),
    "pp_rgb": (lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=2, nr_logistic_mix=1, in_channels=3, dropout=0.0), (3, 8, 8)),
}


def tiny(name, dtype=torch.float32):
    make, shape = TINY[name]
    return make().to(dtype), shape


def images(model, shape, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.num_bins, (batch, *shape), generator=generator)


def loss_and_grads(model, x, cond=None):
    loss = model.loss(x, cond)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


# ---------------------------------------------------------------- shapes and likelihoods


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shapes_and_loss(name):
    model, shape = tiny(name)
    x = images(model, shape)
    logits = model(x)
    if model.head == "softmax":
        assert logits.shape == (2, model.num_bins, *shape)
    else:
        assert logits.shape == (2, (3 if shape[0] == 1 else 10) * model.num_logistic_mix, *shape[1:])
    nll = model.nll(x)
    assert nll.shape == (2,) and torch.isfinite(nll).all() and (nll > 0).all()
    assert_close(model.loss(x), nll.mean())
    assert_close(model.bits_per_dim(x), nll / (math.prod(shape) * math.log(2)))
    loss, grads = loss_and_grads(model, x)
    assert all(torch.isfinite(g).all() for g in grads)


def test_softmax_nll_is_the_categorical_log_likelihood():
    model, shape = tiny("gated_rgb", torch.float64)
    x = images(model, shape)
    log_probs = torch.log_softmax(model(x), dim=1)  # (B, bins, C, H, W)
    expected = -log_probs.gather(1, x.unsqueeze(1)).squeeze(1).sum(dim=(1, 2, 3))
    assert_close(model.nll(x), expected.float())


def test_inputs_are_mapped_to_minus_one_one():
    model, _ = tiny("gated_grey")
    x = torch.tensor([0, 5, 15]).reshape(1, 1, 1, 3)
    assert_close(model.to_inputs(x), torch.tensor([-1.0, -1.0 / 3.0, 1.0]).reshape(1, 1, 1, 3))
    assert torch.equal(model(x.to(torch.uint8)), model(x))


# ---------------------------------------------------------------- fused path == reference-built path


@pytest.mark.parametrize("name", sorted(TINY))
def test_reference_ops_and_reference_backend_give_the_fused_models_results(name):
    model, shape = tiny(name, torch.float64)
    built = set_ops(copy.deepcopy(model), REFERENCE_OPS)
    x = images(model, shape)
    loss, grads = loss_and_grads(model, x)
    with pixelcnn_kernels.use_backend("reference"):
        forced_loss, forced_grads = loss_and_grads(model, x)
    built_loss, built_grads = loss_and_grads(built, x)
    for other_loss, other_grads in ((forced_loss, forced_grads), (built_loss, built_grads)):
        assert_close(other_loss, loss)
        for a, b in zip(other_grads, grads):
            assert_close(a, b)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: GatedPixelCNN(3, hidden=3, layers=1, num_bins=8), (3, 3, 3)),
        (lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=2, nr_logistic_mix=1, in_channels=1, dropout=0.0, num_bins=8), (1, 4, 4)),
    ],
    ids=["gated_rgb", "pixelcnn_pp"],
)
def test_triton_backend_matches_the_reference_built_model(make, shape, kernel_device):
    """Under the interpreter on the CPU: one tiny model of each kind, in float32 (on a GPU both
    sides' convolutions may run in TF32, PyTorch's default for convs)."""
    model = make().to(kernel_device)
    built = set_ops(copy.deepcopy(model), REFERENCE_OPS)
    x = images(model, shape, batch=1).to(kernel_device)
    with pixelcnn_kernels.use_backend("triton"):
        loss, grads = loss_and_grads(model, x)
    built_loss, built_grads = loss_and_grads(built, x)
    tf32 = kernel_device.type == "cuda"
    assert_close(loss, built_loss, tf32=tf32)
    for a, b in zip(grads, built_grads):
        assert_close(a, b, tf32=tf32)


@pytest.mark.parametrize("name", ["gated_rgb", "gated_dmol", "pp_rgb"])
def test_a_channels_last_network_keeps_every_activation_channels_last(name, kernel_device, monkeypatch):
    """What forward does on a GPU: from channels-last inputs every activation and gradient of the training
    loss reaches the masked convolutions channels-last (the kernels' layout), so none is converted in or
    out; except the output gradients of PixelCNN++'s three first convs, whose output shift's backward
    builds them NCHW (only their weight gradients read them)."""
    to_rows, from_rows, laid_out, converted = masked_conv_ops._channels_last_rows, masked_conv_ops._from_channels_last_rows, masked_conv_ops.channels_last, []

    def counted_to_rows(t):
        if not t.permute(0, 2, 3, 1).is_contiguous():
            converted.append(("in", tuple(t.shape)))
        return to_rows(t)

    def counted_from_rows(rows, like):
        if not is_channels_last(like):
            converted.append(("out", tuple(like.shape)))
        return from_rows(rows, like)

    def counted_laid_out(t):  # the conv backward's one layout of the output gradient
        if not is_channels_last(t):
            converted.append(("gradient", tuple(t.shape)))
        return laid_out(t)

    monkeypatch.setattr(masked_conv_ops, "_channels_last_rows", counted_to_rows)
    monkeypatch.setattr(masked_conv_ops, "_from_channels_last_rows", counted_from_rows)
    monkeypatch.setattr(masked_conv_ops, "channels_last", counted_laid_out)
    model, shape = tiny(name)
    model = model.to(kernel_device)
    x = images(model, shape).to(kernel_device)
    with pixelcnn_kernels.use_backend("triton"):
        logits = model.network(channels_last(model.to_inputs(x)), None)
        torch.autograd.grad(model.nll_of_logits(x, logits).mean(), list(model.parameters()))
    assert len(converted) == (3 if name.startswith("pp") else 0), converted


# ---------------------------------------------------------------- causality


def dependencies(model, shape, positions):
    """Boolean (P, C, H, W): the inputs the logits at each position (c, i, j) depend on (c ignored for DMOL).

    One forward and backward: the batch holds one copy of a random input per position,
    and each copy's gradient comes from its own position's logits only.
    """
    inputs = torch.randn(1, *shape, dtype=torch.float64).expand(len(positions), *shape).clone().requires_grad_(True)
    logits = model.network(inputs, None)
    selected = [logits[k, :, c, i, j] if model.head == "softmax" else logits[k, :, i, j] for k, (c, i, j) in enumerate(positions)]
    (grad,) = torch.autograd.grad(torch.stack(selected).sum(), inputs)
    return grad != 0


def allowed_inputs(shape, position, within_pixel: bool):
    """Everything before the pixel in raster order, plus the channels < c of the pixel when ``within_pixel``."""
    c, i, j = position
    allowed = torch.zeros(shape, dtype=torch.bool)
    allowed[:, :i] = True
    allowed[:, i, :j] = True
    if within_pixel:
        allowed[:c, i, j] = True
    return allowed


CAUSALITY_MODELS = {
    "gated_grey": TINY["gated_grey"],
    "gated_rgb": TINY["gated_rgb"],
    "gated_dmol": TINY["gated_dmol"],
    # Two blocks per resolution: one leaves the top row's last pixel out of reach of the next row's first.
    "pp_grey": (lambda: PixelCNNPlusPlus(nr_resnet=2, nr_filters=4, nr_logistic_mix=1, in_channels=1, dropout=0.0), (1, 8, 8)),
    "pp_rgb": (lambda: PixelCNNPlusPlus(nr_resnet=2, nr_filters=4, nr_logistic_mix=1, in_channels=3, dropout=0.0), (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CAUSALITY_MODELS))
def test_no_leak_and_no_blind_spot(name):
    """Each output depends on every earlier value (raster order, then colour order for the softmax head) and on nothing else.

    Checked on the reference-built twin (plain autograd, fast); the fused model computes
    the same function (test_reference_ops_and_reference_backend_give_the_fused_models_results).
    """
    make, shape = CAUSALITY_MODELS[name]
    model = set_ops(make().double().eval(), REFERENCE_OPS)
    channels = shape[0] if model.head == "softmax" else 1
    positions = [(c, i, j) for i in range(shape[1]) for j in range(shape[2]) for c in range(channels)]
    seen = dependencies(model, shape, positions)
    for k, position in enumerate(positions):
        allowed = allowed_inputs(shape, position, within_pixel=model.head == "softmax")
        assert torch.equal(seen[k], allowed), f"output {position}: leaks {(seen[k] & ~allowed).nonzero().tolist()}, misses {(allowed & ~seen[k]).nonzero().tolist()}"


def test_dropout_in_training_mode_leaks_nothing():
    """Dropout (elementwise, on the gated layers' horizontal residual branch) keeps each output's inputs before it."""
    shape = (1, 6, 6)
    model = set_ops(GatedPixelCNN(1, hidden=6, layers=3, dilations=[1, 2, 1], dropout=0.5, num_bins=16).double().train(), REFERENCE_OPS)
    positions = [(0, i, j) for i in range(shape[1]) for j in range(shape[2])]
    torch.manual_seed(0)
    seen = dependencies(model, shape, positions)
    for k, position in enumerate(positions):
        allowed = allowed_inputs(shape, position, within_pixel=True)
        assert not (seen[k] & ~allowed).any(), f"output {position} leaks {(seen[k] & ~allowed).nonzero().tolist()}"


def test_dropout_is_off_when_sampling():
    """Every sampler draws the image of the same model without dropout, even when called in training mode."""
    model = GatedPixelCNN(1, hidden=6, layers=2, dilations=[1, 2], dropout=0.5, num_bins=8, image_size=(4, 4)).double()
    without_dropout = GatedPixelCNN(1, hidden=6, layers=2, dilations=[1, 2], num_bins=8, image_size=(4, 4)).double()
    without_dropout.load_state_dict(model.state_dict())
    noise = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = without_dropout.sample(2, method="naive", noise=noise, progress=False)
    model.train()
    for method in ("naive", "cached", "jacobi"):
        assert torch.equal(model.sample(2, method=method, noise=noise, progress=False), expected), method
    assert model.training


# ---------------------------------------------------------------- compile, autocast, conditioning, config


@pytest.mark.parametrize("name", ["gated_rgb", "pp_rgb"])
def test_compiles_with_fullgraph(name):
    model, shape = tiny(name)
    x = images(model, shape)
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    eager_loss, eager_grads = loss_and_grads(model, x)
    assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["gated_rgb", "pp_rgb"])
def test_runs_under_autocast(name):
    model, shape = tiny(name)
    x = images(model, shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float32
    assert_close(loss, model.loss(x), dtype=torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("model", [GatedPixelCNN(1, hidden=4, layers=1, num_classes=3, num_bins=8), PixelCNNPlusPlus(1, 2, 1, 1, num_classes=3, dropout=0.0)])
def test_class_conditioning(model):
    x = torch.randint(0, model.num_bins, (2, 1, 4, 4))
    first = model(x, torch.tensor([0, 0]))
    second = model(x, torch.tensor([2, 0]))
    assert not torch.allclose(first[0], second[0])
    assert_close(first[1], second[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x)
    with pytest.raises(ValueError, match=r"cond must be \(2,\)"):
        model(x, torch.tensor([0]))
    with pytest.raises(TypeError, match="integer class labels"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="cond is on meta but the model is on cpu"):
        model(x, torch.tensor([0, 1], device="meta"))
    for label in (3, -1):  # checked on the device (an error here; a device-side assert on a GPU)
        with pytest.raises(RuntimeError, match=r"cond must hold class labels in \[0, 2\]"):
            model(x, torch.tensor([0, label]))


@pytest.mark.parametrize("name", sorted(TINY))
def test_config_rebuilds_the_model(name):
    model, shape = tiny(name)
    spec = json.loads(json.dumps({"name": model.name, "config": model.config}))
    rebuilt = model_from_config(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = images(model, shape)
    assert torch.equal(rebuilt(x), model(x))
    assert type(build_model(model.name, model.config)) is type(model)


def test_config_without_dropout_rebuilds_a_model_without_dropout():
    """Configs saved before the gated model had a dropout option (no "dropout" key) still load."""
    model = GatedPixelCNN(1, hidden=6, layers=2, dropout=0.25)
    assert model.config["dropout"] == 0.25 and all(layer.dropout.p == 0.25 for layer in model.conv_layers)
    config = {key: value for key, value in model.config.items() if key != "dropout"}
    rebuilt = model_from_config({"name": model.name, "config": config})
    assert all(layer.dropout.p == 0.0 for layer in rebuilt.conv_layers)


def test_constructors_take_the_issues_argument_order():
    """GatedPixelCNN(in_channels, hidden, layers, kernel_size, dilations, num_classes, head, num_bins) and
    PixelCNNPlusPlus(nr_resnet, nr_filters, nr_logistic_mix, in_channels, num_classes, dropout) in position."""
    gated = GatedPixelCNN(3, 6, 2, 5, [1, 2], 4, "dmol", 16)
    assert gated.config.items() >= dict(in_channels=3, hidden=6, layers=2, kernel_size=5, dilations=[1, 2], num_classes=4, head="dmol", num_bins=16).items()
    pixelcnn_pp = PixelCNNPlusPlus(1, 4, 2, 1, 3, 0.25)
    assert pixelcnn_pp.config.items() >= dict(nr_resnet=1, nr_filters=4, nr_logistic_mix=2, in_channels=1, num_classes=3, dropout=0.25).items()


# ---------------------------------------------------------------- bad input


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        GatedPixelCNN(2)
    with pytest.raises(ValueError, match=r"^hidden=127 can't be split into 3 colour groups of a gated layer.* use 126 or 128$"):
        GatedPixelCNN(3, hidden=127)
    with pytest.raises(ValueError, match="dilations"):
        GatedPixelCNN(1, layers=2, dilations=[1])
    with pytest.raises(ValueError, match="dropout"):
        GatedPixelCNN(1, dropout=1.0)
    with pytest.raises(ValueError, match="head"):
        GatedPixelCNN(1, head="logistic")
    with pytest.raises(ValueError, match="num_bins"):
        GatedPixelCNN(1, num_bins=1)
    with pytest.raises(ValueError, match="nr_filters"):
        PixelCNNPlusPlus(nr_filters=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        PixelCNNPlusPlus(image_size=(30, 32))
    with pytest.raises(ValueError, match="name"):
        build_model("pixelsnail", {})
    with pytest.raises(ValueError, match="spec"):
        model_from_config({"config": {}})
    # image_size, bools where ints are meant, the DMOL head's bin limit: at construction, not at the first sample or loss
    for build, error, message in (
        (lambda: GatedPixelCNN(1, image_size=(4, 4, 4)), ValueError, r"image_size must be \(H, W\), two positive ints"),
        (lambda: GatedPixelCNN(1, image_size=(4.5, 4)), ValueError, "image_size must be"),
        (lambda: PixelCNNPlusPlus(image_size=(-4, 4)), ValueError, "image_size must be"),
        (lambda: model_from_config({"name": "gated_pixelcnn", "config": {"image_size": "ab"}}), ValueError, "image_size must be"),
        (lambda: GatedPixelCNN(True), ValueError, "in_channels must be 1 or 3, got True"),
        (lambda: GatedPixelCNN(1, num_classes=True), ValueError, "num_classes must be a positive int or None, got True"),
        (lambda: GatedPixelCNN(1, head="dmol", num_bins=3000), ValueError, "num_bins must be at most 2000 with the DMOL head"),
        (lambda: PixelCNNPlusPlus(num_bins=3000), ValueError, "num_bins must be at most 2000"),
        (lambda: GatedPixelCNN(1, layers=1, dilations=3), TypeError, "dilations must be a list or tuple"),
        (lambda: GatedPixelCNN(1, kernel_size=(3, 3)), TypeError, "kernel_size must be an int"),
        (lambda: GatedPixelCNN(1, kernel_size=4), ValueError, "kernel_size must be odd"),
    ):
        with pytest.raises(error, match=message):
            build()


def test_bad_images():
    model, shape = tiny("gated_grey")
    with pytest.raises(TypeError, match="integer bins"):
        model(torch.rand(1, *shape))
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0]])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.bits_per_dim([[0]])  # x checked before its shape is read
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\)"):
        model.bits_per_dim(torch.zeros(1, *shape[1:], dtype=torch.long))
    pp, pp_shape = tiny("pp_grey")
    with pytest.raises(ValueError, match="multiples of 4"):
        pp(torch.zeros(1, 1, 6, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \(B, 1, H, W\) with H, W >= 1, got shape \(1, 1, 0, 4\)"):
        model(torch.zeros(1, 1, 0, 4, dtype=torch.long))
    # Bins out of range: both heads check them on the device (an error here; a device-side assert on a GPU).
    for head, head_shape in ((pp, pp_shape), (model, shape)):
        for value in (head.num_bins, -1):
            with pytest.raises(RuntimeError, match=rf"x must hold bins in \[0, {head.num_bins - 1}\]"):
                head.loss(torch.full((1, *head_shape), value, dtype=torch.long))


# ---------------------------------------------------------------- naive sampler


def test_softmax_sampler_draws_the_models_categorical():
    """Chi-square at the first pixel of a grey model: its distribution does not depend on the image."""
    model = GatedPixelCNN(1, hidden=3, layers=1, num_bins=6)
    with torch.no_grad():
        model.conv_out.bias.copy_(torch.tensor([1.0, -0.5, 0.0, 0.7, -1.0, 0.3]))
        probs = torch.softmax(model(torch.zeros(1, 1, 1, 1, dtype=torch.long))[0, :, 0, 0, 0].double(), dim=0)
    draws = model.sample(4000, method="naive", size=(1, 1), generator=torch.Generator().manual_seed(0), progress=False)
    counts = torch.bincount(draws.flatten(), minlength=6).double()
    assert stats.chisquare(counts.numpy(), (probs * 4000).numpy()).pvalue > 1e-3


def test_dmol_sampler_draws_the_models_mixture():
    """Chi-square at the last pixel of a PixelCNN++ given every other pixel."""
    model = PixelCNNPlusPlus(nr_resnet=1, nr_filters=2, nr_logistic_mix=2, in_channels=1, dropout=0.0, num_bins=5)
    prefix = torch.randint(0, 5, (1, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    candidates = prefix.repeat(5, 1, 1, 1)
    candidates[:, 0, 3, 3] = torch.arange(5)
    with torch.no_grad():
        log_probs = -model.nll(candidates).double()  # the other pixels' terms are the same for every candidate
    probs = torch.softmax(log_probs, dim=0)
    known = torch.ones(4, 4, dtype=torch.bool)
    known[3, 3] = False
    n = 3000
    draws = model.sample(n, method="naive", prefix=prefix.repeat(n, 1, 1, 1), known=known, generator=torch.Generator().manual_seed(0), progress=False)
    counts = torch.bincount(draws[:, 0, 3, 3], minlength=5).double()
    assert stats.chisquare(counts.numpy(), (probs * n).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("name", ["gated_rgb", "gated_dmol", "pp_grey"])
def test_completion_keeps_known_pixels_and_only_looks_back(name):
    """Rows 0 and 2.. are known (so is the last pixel, after every generated one); row 1 is generated."""
    model, (channels, height, width) = tiny(name)
    height, width = (4, 4) if isinstance(model, PixelCNNPlusPlus) else (3, 3)
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, model.num_bins, (2, channels, height, width), generator=generator)
    known = torch.ones(height, width, dtype=torch.bool)
    known[1] = False
    if model.head == "softmax":
        noise = torch.rand(2, channels, height, width, generator=generator)
    else:
        noise = (torch.rand(2, model.num_logistic_mix, height, width, generator=generator), torch.rand(2, channels, height, width, generator=generator))
    first = model.sample(2, method="naive", prefix=prefix, known=known, noise=noise, progress=False)
    assert torch.equal(first[:, :, known], prefix[:, :, known])
    assert int(first.min()) >= 0 and int(first.max()) < model.num_bins
    changed = prefix.clone()
    changed[:, :, height - 1, width - 1] = (changed[:, :, height - 1, width - 1] + 1) % model.num_bins
    second = model.sample(2, method="naive", prefix=changed, known=known, noise=noise, progress=False)
    assert torch.equal(first[:, :, ~known], second[:, :, ~known])  # a later pixel changes nothing generated


def test_sampler_is_reproducible_and_leaves_the_model_in_training_mode():
    model, (channels, height, width) = tiny("gated_rgb")
    model.train()
    first = model.sample(2, method="naive", size=(2, 2), generator=torch.Generator().manual_seed(5), progress=False)
    second = model.sample(2, method="naive", size=(2, 2), generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(first, second) and first.dtype == torch.int64 and first.shape == (2, 3, 2, 2)
    assert model.training


def test_class_conditional_sampling():
    model = GatedPixelCNN(1, hidden=3, layers=1, num_bins=4, num_classes=2, image_size=(2, 2))
    draws = model.sample(3, method="naive", cond=torch.tensor([0, 1, 1]), progress=False)
    assert draws.shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(3, progress=False)
    cuda_generator = mock.Mock(spec=torch.Generator, device=torch.device("cuda", 0))  # stands in for one on a machine without a GPU
    with pytest.raises(ValueError, match="generator is on cuda:0 but the model is on cpu"):
        model.sample(3, cond=torch.tensor([0, 1, 1]), generator=cuda_generator, progress=False)


@pytest.mark.gpu
def test_a_generator_made_for_cuda_draws_for_a_model_on_the_current_device():
    """torch.Generator("cuda") has no device index; it draws on the current device, cuda:0 here."""
    model = GatedPixelCNN(1, hidden=3, layers=1, num_bins=4, image_size=(2, 2)).cuda()
    first, second = (model.sample(2, method="naive", generator=torch.Generator("cuda").manual_seed(3), progress=False) for _ in range(2))
    assert torch.equal(first, second) and first.device == torch.device("cuda", 0)


def test_bad_sampler_arguments():
    model, _ = tiny("gated_grey")
    with pytest.raises(ValueError, match="method must be one of"):
        model.sample(1, method="parallel")
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    with pytest.raises(ValueError, match="n must be a positive int, got True"):
        model.sample(True)
    for size in (4, (4, 4.0), (True, 4)):
        with pytest.raises(ValueError, match=r"size must be \(H, W\), two positive ints"):
            model.sample(1, size=size)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model.sample(1, size=(2, 2), generator=1)
    prefix = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix and known"):
        model.sample(1, prefix=prefix)
    with pytest.raises(ValueError, match="known must be"):
        model.sample(1, prefix=prefix, known=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        model.sample(1, prefix=prefix, known=torch.ones(3, 3))
    with pytest.raises(ValueError, match="prefix values"):
        model.sample(1, prefix=prefix + 99, known=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise must have shape"):
        model.sample(1, size=(3, 3), noise=torch.rand(1, 1, 2, 3))
    with pytest.raises(ValueError, match="size"):
        model.sample(1, prefix=prefix, known=torch.ones(3, 3, dtype=torch.bool), size=(4, 4))
    dmol, _ = tiny("gated_dmol")
    with pytest.raises(TypeError, match="pair"):
        dmol.sample(1, size=(2, 2), noise=torch.rand(1, 3, 2, 2))
    for bad in (float("nan"), 1.0, -0.5):  # the draws' inverse CDFs need uniforms in [0, 1)
        with pytest.raises(ValueError, match=r"noise must hold uniforms in \[0, 1\)"):
            model.sample(1, size=(2, 2), noise=torch.full((1, 1, 2, 2), bad), progress=False)
    with pytest.raises(ValueError, match="give noise or generator, not both"):
        model.sample(1, size=(2, 2), noise=torch.rand(1, 1, 2, 2), generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="n must be a positive int, got 2.0"):
        model.sample(2.0)
    assert model.sample(np.int64(2), size=(2, 2), progress=False).shape == model.sample(torch.tensor(2), size=(2, 2), progress=False).shape == (2, 1, 2, 2)


@pytest.mark.parametrize("name", ["gated_grey", "gated_dmol", "pp_grey"])
def test_an_empty_batch_has_an_empty_likelihood(name):
    model, shape = tiny(name)
    empty = torch.zeros(0, *shape, dtype=torch.long)
    assert model.nll(empty).shape == model.bits_per_dim(empty).shape == (0,)


# ---------------------------------------------------------------- GPU: the issue's configurations


def issue_models():
    return {
        # The issue's 128 channels: RGB colour groups of 43, 43 and 42.
        "gated_pixelcnn": GatedPixelCNN(3, hidden=128, layers=7, kernel_size=3, dilations=[1, 2, 1, 4, 1, 2, 1]),
        "pixelcnn_pp": PixelCNNPlusPlus(nr_resnet=5, nr_filters=160, nr_logistic_mix=10, dropout=0.0),
    }


def assert_fused_model_as_accurate(model, x: torch.Tensor, dtype: torch.dtype, backend: str) -> None:
    """Loss and gradients of ``model`` in ``dtype`` on ``backend`` are within twice the reference-built
    model's error in ``dtype`` (plus the dtype's tolerance at their scale), both against float64."""
    exact = model.to(x.device, torch.float64)
    fused = copy.deepcopy(exact).to(dtype)
    exact.load_state_dict(fused.state_dict())  # the exact model holds the rounded parameters
    built = set_ops(copy.deepcopy(fused), REFERENCE_OPS)
    set_ops(exact, REFERENCE_OPS)
    with pixelcnn_kernels.use_backend(backend):
        fused_loss, fused_grads = loss_and_grads(fused, x)
    built_loss, built_grads = loss_and_grads(built, x)
    exact_loss, exact_grads = loss_and_grads(exact, x)
    _, atol = tolerance(dtype, tf32=True)
    for label, got, ref, want in [("loss", fused_loss, built_loss, exact_loss)] + [(f"grad {n}", a, b, c) for n, a, b, c in zip([n for n, _ in fused.named_parameters()], fused_grads, built_grads, exact_grads)]:
        fused_error = (got.double() - want).abs().max().item()
        built_error = (ref.double() - want).abs().max().item()
        scale = max(want.abs().max().item(), 1.0)
        assert fused_error <= 2 * built_error + atol * scale, f"{label}: fused error {fused_error:.3g}, reference-built {built_error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gated_rgb", "gated_dmol", "pp_rgb"])
@pytest.mark.parametrize("backend", ["triton", CUDA])
def test_kernel_backends_in_half_precision_are_as_accurate_as_the_reference_built_model(backend, name, dtype, kernel_device):
    """Tiny models: the 16-bit path of every fused kernel a model uses (bf16 in the interpreter through
    triton.utils' widened tl.dot), loss and every gradient, against float64."""
    torch.manual_seed(0)
    model, shape = tiny(name)
    assert_fused_model_as_accurate(model, images(model, shape).to(kernel_device), dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gated_pixelcnn", "pixelcnn_pp"])
def test_issue_models_on_the_gpu_match_the_reference_built_model(name, dtype, backend):
    """Loss and gradients of the fused model are as accurate as the reference-built model's, against float64."""
    reason = pixelcnn_kernels.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    torch.manual_seed(0)
    assert_fused_model_as_accurate(issue_models()[name], torch.randint(0, 256, (4, 3, 32, 32), device="cuda"), dtype, backend)


# ---------------------------------------------------------------- benchmark cases


def test_benchmark_cases_time_the_fused_model_against_its_reference_twin():
    from pixelcnn_kernels.bench.models import cases

    for case in cases(on_gpu=False):
        inputs = case.make_inputs(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
        fused, reference = case.op(*inputs), case.reference(*inputs)
        if case.name != "pixelcnn_pp_train":  # PixelCNN++ trains with dropout: its two runs differ
            for a, b in zip(*(out if isinstance(out, tuple) else (out,) for out in (fused, reference))):
                assert_close(a, b)
        assert case.flops("full") == 3 * case.flops("forward") > 0
        assert case.bytes_moved("full", torch.float32) > case.bytes_moved("forward", torch.float32) > 0
