"""The fused PixelCNN layers against the same layers built from the reference ops.

``pixelcnn_kernels.nn.layers`` and ``pixelcnn_kernels.reference.layers`` are one
implementation over two op sets; these tests check that the op sets agree at the layer
level (values and gradients), that the shifted (de)convolutions are PixelCNN++'s, and
that bad input is refused before any op runs.
"""


import pytest
import torch
from op_table import CUDA
import torch.nn.functional as F
from torch import nn

import pixelcnn_kernels
from pixelcnn_kernels.nn import layers as fused_layers
from pixelcnn_kernels.reference import layers as reference_layers
from pixelcnn_kernels.testing import CountedCustomOps, assert_close, tolerance


def layer_pair(class_name: str, *args, dtype=torch.float64, device="cpu", **kwargs):
    """(fused layer, reference-built layer) with the same parameters."""
    fused = getattr(fused_layers, class_name)(*args, **kwargs).to(device, dtype)
    reference = getattr(reference_layers, class_name)(*args, **kwargs).to(device, dtype)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def outputs_and_grads(layer, inputs: tuple, cotangent_dtype: torch.dtype | None = None, seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer's outputs and the gradients of a random projection of them w.r.t. inputs and parameters.

    The projection's weights are drawn in ``cotangent_dtype`` (default: each output's
    dtype), so layers in different dtypes can be given the same cotangents.
    """
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    outputs = layer(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    generator = torch.Generator(device=outputs[0].device).manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator, device=o.device).to(cotangent_dtype or o.dtype).to(o.dtype) for o in outputs]
    wrt = [t for t in leaves if t is not None] + list(layer.parameters())
    grads = torch.autograd.grad(outputs, wrt, cotangents)
    return [o.detach() for o in outputs], list(grads)


def assert_layers_agree(fused, reference, inputs, *, dtype=None, tf32=False):
    fused_out, fused_grads = outputs_and_grads(fused, inputs)
    ref_out, ref_grads = outputs_and_grads(reference, inputs)
    for i, (a, b) in enumerate(zip(fused_out, ref_out)):
        assert_close(a, b, dtype=dtype, tf32=tf32, msg=f"output {i}")
    for i, (a, b) in enumerate(zip(fused_grads, ref_grads)):
        assert_close(a, b, dtype=dtype, tf32=tf32, msg=f"gradient {i}")


def gated_inputs(channels, cond_channels=None, batch=2, size=(5, 6), dtype=torch.float64, device="cpu"):
    v = torch.randn(batch, channels, *size, dtype=dtype, device=device)
    h = torch.randn(batch, channels, *size, dtype=dtype, device=device)
    cond = None if cond_channels is None else torch.randn(batch, cond_channels, dtype=dtype, device=device)
    return v, h, cond


def resnet_inputs(channels, skip_streams=0, cond_channels=None, batch=2, size=(4, 6), dtype=torch.float64, device="cpu"):
    x = torch.randn(batch, channels, *size, dtype=dtype, device=device)
    skip = torch.randn(batch, skip_streams * channels, *size, dtype=dtype, device=device) if skip_streams else None
    cond = None if cond_channels is None else torch.randn(batch, cond_channels, dtype=dtype, device=device)
    return x, skip, cond


# ---------------------------------------------------------------- reference backend (float64)


@pytest.mark.parametrize("color_groups, dilation, cond_channels", [(1, 1, None), (1, 2, 4), (3, 1, 5), (3, 2, None)])
def test_gated_masked_conv_matches_the_reference_built_layer(color_groups, dilation, cond_channels):
    fused, reference = layer_pair("GatedMaskedConv2d", 6, 3, dilation, color_groups, cond_channels)
    with pixelcnn_kernels.use_backend("reference"):
        assert_layers_agree(fused, reference, gated_inputs(6, cond_channels))


@pytest.mark.parametrize("color_groups", [1, 3])
def test_gated_masked_conv_runs_its_gates_in_conv_epilogues(color_groups):
    """Each stack's gate in a conv epilogue, the colour-major horizontal one (gate_groups=3) too."""
    layer = fused_layers.GatedMaskedConv2d(6, 3, 1, color_groups, cond_channels=4)
    with CountedCustomOps() as counted, torch.no_grad():
        layer(*gated_inputs(6, 4, dtype=torch.float32))
    assert dict(counted.calls) == {"masked_conv2d_gated": 2, "masked_conv2d": 2}


def test_gated_masked_conv_dropout_drops_the_horizontal_residual_branch_in_training_only():
    """Dropout p scales the kept elements of the horizontal gated output by 1/(1 - p) and zeroes the others.

    ``conv_horiz_1x1`` is made the identity without bias, so ``h_out - h`` is the (dropped)
    gated output itself; the vertical stack and eval mode are untouched by dropout.
    """
    fused, reference = layer_pair("GatedMaskedConv2d", 4, 3, 1, 1, None, dropout=0.5)
    plain = fused_layers.GatedMaskedConv2d(4).double()
    with torch.no_grad():
        fused.conv_horiz_1x1.weight.copy_(torch.eye(4)[:, :, None, None])
        fused.conv_horiz_1x1.bias.zero_()
    reference.load_state_dict(fused.state_dict())
    plain.load_state_dict(fused.state_dict())
    v, h, _ = gated_inputs(4)
    with pixelcnn_kernels.use_backend("reference"):
        v_plain, h_plain = plain(v, h)
        v_eval, h_eval = fused.eval()(v, h)
        assert torch.equal(v_eval, v_plain) and torch.equal(h_eval, h_plain)
        # Seeded alike, the fused and the reference-built layer drop the same elements.
        torch.manual_seed(0)
        (v_train, h_train), fused_grads = outputs_and_grads(fused.train(), (v, h, None))
        torch.manual_seed(0)
        reference_outputs, reference_grads = outputs_and_grads(reference.train(), (v, h, None))
    for a, b in zip([v_train, h_train, *fused_grads], reference_outputs + reference_grads, strict=True):
        assert_close(a, b)
    assert torch.equal(v_train, v_plain)
    branch, plain_branch = h_train - h, h_plain - h
    dropped = branch == 0
    assert 0 < dropped.sum() < dropped.numel()
    assert_close(branch[~dropped], 2 * plain_branch[~dropped])


@pytest.mark.parametrize("shift, skip_streams, cond_channels", [("down", 0, None), ("down", 1, 3), ("down_right", 1, None), ("down_right", 2, 3)])
def test_gated_resnet_matches_the_reference_built_layer(shift, skip_streams, cond_channels):
    fused, reference = layer_pair("GatedResnet", 4, shift, skip_streams, cond_channels, dropout=0.0)
    with pixelcnn_kernels.use_backend("reference"):
        assert_layers_agree(fused, reference, resnet_inputs(4, skip_streams, cond_channels))


def test_gated_resnet_with_dropout_matches_the_reference_built_layer_in_training_and_eval():
    """Training with dropout: concat_elu and dropout both read as ``conv_out`` loads its input; eval: concat_elu only."""
    fused, reference = layer_pair("GatedResnet", 4, "down", 1, 3, dropout=0.5)
    inputs = resnet_inputs(4, 1, 3)
    with pixelcnn_kernels.use_backend("reference"):
        torch.manual_seed(0)
        fused_train = outputs_and_grads(fused.train(), inputs)
        torch.manual_seed(0)
        reference_train = outputs_and_grads(reference.train(), inputs)
        fused_eval, reference_eval = outputs_and_grads(fused.eval(), inputs), outputs_and_grads(reference.eval(), inputs)
    for (fused_out, fused_grads), (ref_out, ref_grads) in ((fused_train, reference_train), (fused_eval, reference_eval)):
        for a, b in zip(fused_out + fused_grads, ref_out + ref_grads, strict=True):
            assert_close(a, b)
    assert not torch.allclose(fused_train[0][0], fused_eval[0][0])  # dropout was active in training


def test_gated_masked_conv_is_the_tutorial_layer():
    """Written out with F.conv2d on explicitly masked weights (the UvA tutorial's formulation)."""
    layer = fused_layers.GatedMaskedConv2d(4, kernel_size=3, dilation=2, cond_channels=3).double()
    v, h, cond = gated_inputs(4, 3)
    vert_mask = torch.zeros(3, 3, dtype=torch.float64)
    vert_mask[:2] = 1  # rows up to the centre
    horiz_mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # centre and left

    def gate(pre):
        return torch.tanh(pre[:, :4]) * torch.sigmoid(pre[:, 4:])

    v_conv = F.conv2d(F.pad(v, (2, 2, 2, 2)), layer.conv_vert.weight * vert_mask, layer.conv_vert.bias, dilation=2)
    v_expected = gate(v_conv + (cond @ layer.cond_vert.weight.T)[:, :, None, None])
    h_pre = F.conv2d(F.pad(h, (2, 2, 0, 0)), layer.conv_horiz.weight * horiz_mask, layer.conv_horiz.bias, dilation=2)
    h_pre = h_pre + F.conv2d(v_conv, layer.conv_vert_to_horiz.weight, layer.conv_vert_to_horiz.bias)
    h_pre = h_pre + (cond @ layer.cond_horiz.weight.T)[:, :, None, None]
    h_expected = h + F.conv2d(gate(h_pre), layer.conv_horiz_1x1.weight, layer.conv_horiz_1x1.bias)
    with torch.no_grad(), pixelcnn_kernels.use_backend("reference"):
        v_out, h_out = layer(v, h, cond)
    assert_close(v_out, v_expected)
    assert_close(h_out, h_expected)


def test_colour_grouped_gated_masked_conv_is_the_written_out_layer():
    """Three colour groups written out: colour-masked horizontal convs, each third of the
    2C pre-activation holding its colour's a and b halves, the gate per colour."""
    channels, per_colour = 6, 2
    layer = fused_layers.GatedMaskedConv2d(channels, kernel_size=3, color_groups=3, cond_channels=3).double()
    v, h, cond = gated_inputs(channels, 3)
    vert_mask = torch.zeros(3, 3, dtype=torch.float64)
    vert_mask[:2] = 1

    def colour_mask(out_channels, in_channels, kernel_width):
        """Earlier taps see every colour; the centre tap, output colour g sees input colours <= g."""
        mask = torch.ones(out_channels, in_channels, 1, kernel_width, dtype=torch.float64)
        mask[..., kernel_width // 2 + 1 :] = 0
        mask[:, :, 0, kernel_width // 2] = (torch.arange(out_channels)[:, None] // (out_channels // 3) >= torch.arange(in_channels)[None, :] // (in_channels // 3)).double()
        return mask

    def colour_gate(pre):
        thirds = pre.unflatten(1, (3, 2 * per_colour))
        return (torch.tanh(thirds[:, :, :per_colour]) * torch.sigmoid(thirds[:, :, per_colour:])).flatten(1, 2)

    v_conv = F.conv2d(F.pad(v, (1, 1, 1, 1)), layer.conv_vert.weight * vert_mask, layer.conv_vert.bias)
    h_pre = F.conv2d(F.pad(h, (1, 1, 0, 0)), layer.conv_horiz.weight * colour_mask(2 * channels, channels, 3), layer.conv_horiz.bias)
    h_pre = h_pre + F.conv2d(v_conv, layer.conv_vert_to_horiz.weight, layer.conv_vert_to_horiz.bias)
    h_pre = h_pre + (cond @ layer.cond_horiz.weight.T)[:, :, None, None]
    h_expected = h + F.conv2d(colour_gate(h_pre), layer.conv_horiz_1x1.weight * colour_mask(channels, channels, 1), layer.conv_horiz_1x1.bias)
    with pixelcnn_kernels.use_backend("reference"):
        _, h_out = layer(v, h, cond)
    assert_close(h_out.detach(), h_expected.detach())
    h_out.sum().backward()
    assert torch.all(layer.conv_horiz.weight.grad[colour_mask(2 * channels, channels, 3) == 0] == 0)  # masked-out weights
    assert torch.all(layer.conv_horiz_1x1.weight.grad[colour_mask(channels, channels, 1) == 0] == 0)


def test_gated_resnet_is_pixelcnn_plus_plus_block():
    """Written out as the original: pad-then-conv shifted convs, concat_elu, a·σ(b), residual."""
    layer = fused_layers.GatedResnet(3, "down", skip_streams=1, cond_channels=2, dropout=0.0).double()
    x, skip, cond = resnet_inputs(3, 1, 2)

    def concat_elu(t):
        return F.elu(torch.cat([t, -t], dim=1))

    def down_shifted(t, conv):  # pad left = right = 1, top = 1 for a 2×3 kernel
        return F.conv2d(F.pad(t, (1, 1, 1, 0)), conv.weight, conv.bias)

    c = down_shifted(concat_elu(x), layer.conv_input) + F.conv2d(concat_elu(skip), layer.nin_skip.weight, layer.nin_skip.bias)
    c = down_shifted(concat_elu(c), layer.conv_out) + (cond @ layer.cond_proj.weight.T)[:, :, None, None]
    expected = x + c[:, :3] * torch.sigmoid(c[:, 3:])
    with torch.no_grad(), pixelcnn_kernels.use_backend("reference"):
        assert_close(layer(x, skip, cond), expected)


def test_colour_groups_keep_the_channel_order_inside_a_pixel():
    """Output group g at a pixel depends on input groups <= g of that pixel only (both stacks' inputs)."""
    layer = fused_layers.GatedMaskedConv2d(6, kernel_size=3, color_groups=3).double()
    v, h, _ = gated_inputs(6, batch=1, size=(3, 3))
    h.requires_grad_(True)
    v.requires_grad_(True)
    _, h_out = layer(v, h)
    for group in range(3):
        grad_h, grad_v = torch.autograd.grad(h_out[0, 2 * group : 2 * group + 2, 1, 1].sum(), (h, v), retain_graph=True)
        seen_groups = grad_h[0, :, 1, 1].abs().reshape(3, 2).sum(1) != 0
        assert seen_groups.tolist() == [g <= group for g in range(3)]
        assert torch.all(grad_h[0, :, 1, 2] == 0) and torch.all(grad_h[0, :, 2, :] == 0)  # nothing right or below
        assert torch.all(grad_v[0, :, 2, :] == 0)  # the vertical input at rows <= 1 only


def test_shifted_conv_is_pad_then_conv():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    for shift, padding in (("down", (1, 1, 1, 0)), ("down_right", (1, 0, 1, 0))):
        for stride in (1, 2):
            conv = fused_layers.ShiftedConv2d(3, 4, shift=shift, stride=stride).double()
            expected = F.conv2d(F.pad(x, padding), conv.weight, conv.bias, stride=stride)
            with torch.no_grad(), pixelcnn_kernels.use_backend("reference"):
                assert_close(conv(x), expected)


def test_shifted_conv_output_shift_moves_rows_down_or_columns_right():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    down = fused_layers.ShiftedConv2d(2, 3, (1, 3), shift="down", shift_output=True).double()
    right = fused_layers.ShiftedConv2d(2, 3, (2, 1), shift="down_right", shift_output=True).double()
    with torch.no_grad(), pixelcnn_kernels.use_backend("reference"):
        unshifted_down = F.conv2d(F.pad(x, (1, 1, 0, 0)), down.weight, down.bias)
        unshifted_right = F.conv2d(F.pad(x, (0, 0, 1, 0)), right.weight, right.bias)
        assert_close(down(x)[:, :, 1:], unshifted_down[:, :, :-1])
        assert torch.all(down(x)[:, :, 0] == 0)
        assert_close(right(x)[:, :, :, 1:], unshifted_right[:, :, :, :-1])
        assert torch.all(right(x)[:, :, :, 0] == 0)


@pytest.mark.parametrize("shift", ["down", "down_right"])
def test_shifted_deconv_doubles_the_size_and_only_reads_up_and_left(shift):
    deconv = fused_layers.ShiftedConvTranspose2d(2, 3, shift=shift).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    out = deconv(x)
    assert out.shape == (1, 3, 6, 8)
    for i in range(6):
        for j in range(8):
            (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
            rows, cols = (grad[0].abs().sum(0) != 0).nonzero(as_tuple=True)
            assert set(rows.tolist()) == {i // 2}
            expected_cols = {j // 2} if shift == "down_right" else {s for s in range(4) if 2 * s - 1 <= j <= 2 * s + 1}
            assert set(cols.tolist()) == expected_cols


def test_set_ops_switches_a_built_module_to_the_reference_functions():
    layer = fused_layers.GatedResnet(2, dropout=0.0)
    assert layer.ops is fused_layers.FUSED_OPS
    reference_layers.set_ops(layer, reference_layers.REFERENCE_OPS)
    assert layer.ops is reference_layers.REFERENCE_OPS
    assert fused_layers.GatedResnet.ops is fused_layers.FUSED_OPS  # the class is left alone


def test_layers_follow_autocast():
    """Under autocast the ops get operands in autocast's dtype (they are not autocast-aware themselves)."""
    layer = fused_layers.GatedMaskedConv2d(3)
    v, h, _ = gated_inputs(3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_out, h_out = layer(v, h)
    assert v_out.dtype == torch.bfloat16
    assert h_out.dtype == torch.float32  # the residual stream keeps the input's dtype
    v_want, h_want = layer(v, h)
    assert_close(v_out, v_want, dtype=torch.bfloat16)
    assert_close(h_out, h_want, dtype=torch.bfloat16)
    resnet = fused_layers.GatedResnet(3, dropout=0.0)
    x = torch.randn(1, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resnet(x)
    assert_close(out, resnet(x), dtype=torch.bfloat16)


@pytest.mark.parametrize("make_layer, make_inputs", [
    (lambda: fused_layers.GatedResnet(2, "down_right", skip_streams=1, cond_channels=2, dropout=0.0), lambda: resnet_inputs(2, 1, 2, dtype=torch.float32)),
    (lambda: fused_layers.GatedMaskedConv2d(4, cond_channels=2), lambda: gated_inputs(4, 2, dtype=torch.float32)),
    (lambda: fused_layers.GatedMaskedConv2d(3, color_groups=3, cond_channels=2), lambda: gated_inputs(3, 2, dtype=torch.float32)),
], ids=["gated_resnet", "gated_masked_conv", "gated_masked_conv_rgb"])  # fmt: skip
def test_layer_compiles_with_fullgraph(make_layer, make_inputs):
    """Forward and backward (every input and parameter) of the compiled layer are the eager layer's."""
    layer, inputs = make_layer(), make_inputs()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out, eager_grads = outputs_and_grads(layer, inputs)
    compiled_out, compiled_grads = outputs_and_grads(compiled, inputs)
    for got, expected in zip(compiled_out + compiled_grads, eager_out + eager_grads, strict=True):
        assert_close(got, expected)


# ---------------------------------------------------------------- bad input


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="channels"):
        fused_layers.GatedMaskedConv2d(0)
    with pytest.raises(ValueError, match="kernel_size"):
        fused_layers.GatedMaskedConv2d(3, kernel_size=4)
    with pytest.raises(ValueError, match="color_groups"):
        fused_layers.GatedMaskedConv2d(6, color_groups=2)
    with pytest.raises(ValueError, match=r"channels=4 leaves a colour group empty"):
        fused_layers.GatedMaskedConv2d(4, color_groups=3)
    with pytest.raises(ValueError, match=r"channels=7 can't be split .* use 6 or 8"):
        fused_layers.GatedMaskedConv2d(7, color_groups=3)
    with pytest.raises(ValueError, match="cond_channels"):
        fused_layers.GatedMaskedConv2d(3, cond_channels=0)
    for dropout in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            fused_layers.GatedMaskedConv2d(3, dropout=dropout)
    with pytest.raises(ValueError, match="shift"):
        fused_layers.GatedResnet(3, shift="up")
    with pytest.raises(ValueError, match="skip_streams"):
        fused_layers.GatedResnet(3, skip_streams=-1)
    with pytest.raises(ValueError, match="dropout"):
        fused_layers.GatedResnet(3, dropout=1.0)
    with pytest.raises(ValueError, match="stride"):
        fused_layers.ShiftedConv2d(3, 3, stride=0)
    with pytest.raises(ValueError, match="shift"):
        fused_layers.ShiftedConvTranspose2d(3, 3, shift="left")
    # bools and tuples where an int is meant; an even width of a "down" shift; ShiftedConv2d's own constructor
    for build, error, message in (
        (lambda: fused_layers.GatedResnet(3, skip_streams=True), TypeError, "skip_streams must be an int"),
        (lambda: fused_layers.GatedMaskedConv2d(3, cond_channels=True), TypeError, "cond_channels must be an int"),
        (lambda: fused_layers.GatedMaskedConv2d(True), TypeError, "channels must be an int"),
        (lambda: fused_layers.ShiftedConv2d(3, 3, stride=True), TypeError, "stride must be an int"),
        (lambda: fused_layers.ShiftedConv2d(3, 3, shift_output="no"), TypeError, "shift_output must be a bool"),
        (lambda: fused_layers.ShiftedConvTranspose2d(3, 3, stride=(2, 2)), TypeError, "stride must be an int"),
        (lambda: fused_layers.ShiftedConvTranspose2d(3, 3, stride=0), ValueError, "stride must be >= 1"),
        (lambda: fused_layers.ShiftedConvTranspose2d(3, 3, (2, 4)), ValueError, "needs an odd kernel width"),
        (lambda: fused_layers.ShiftedConv2d.from_conv(nn.Conv2d(3, 3, (2, 3))), TypeError, "use MaskedConv2d.from_conv"),
    ):
        with pytest.raises(error, match=message):
            build()


def test_shifted_conv_reports_its_stride_as_conv2d_does():
    strided = fused_layers.ShiftedConv2d(3, 4, stride=2)
    assert strided.stride == (2, 2) and strided(torch.randn(1, 3, 6, 5)).shape == (1, 4, 3, 3)
    assert repr(strided).endswith("shift='down', stride=2)")
    assert repr(fused_layers.ShiftedConv2d(3, 4, shift="down_right", shift_output=True)).endswith("shift='down_right', shift_output=True)")


def test_gated_resnet_dropout_follows_its_own_mode():
    """As nn.Dropout: an eval-mode block whose dropout is in training mode drops (Monte Carlo dropout), and back."""
    layer = fused_layers.GatedResnet(3, dropout=0.5).eval()
    x = torch.randn(1, 3, 4, 4)
    with pixelcnn_kernels.use_backend("reference"):
        layer.dropout.train()
        assert not torch.equal(layer(x), layer(x))
        layer.train().dropout.eval()
        assert torch.equal(layer(x), layer(x))


def test_bad_forward_arguments():
    gated = fused_layers.GatedMaskedConv2d(3, cond_channels=2)
    v, h, cond = gated_inputs(3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="v must be"):
        gated(v[:, :2], h, cond)
    with pytest.raises(ValueError, match="one shape"):
        gated(v, h[:, :, :4], cond)
    with pytest.raises(ValueError, match="cond"):
        gated(v, h)
    with pytest.raises(ValueError, match="cond must be"):
        gated(v, h, cond[:, :1])
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        gated(v, h.numpy(), cond)
    with pytest.raises(TypeError, match="^h has dtype torch.float64 but v has torch.float32"):
        gated(v, h.double(), cond)
    with pytest.raises(ValueError, match="^h is on meta but v is on cpu"):
        gated(v, h.to("meta"), cond)
    with pytest.raises(ValueError, match=r"v must be \(N, 3, H, W\) with H, W >= 1"):
        gated(v[:, :, :0], h[:, :, :0], cond)
    bins = torch.randint(0, 4, (1, 4, 4, 4))
    for layer in (fused_layers.ShiftedConv2d(4, 6), fused_layers.ShiftedConv2d(4, 6, stride=2), fused_layers.ShiftedConvTranspose2d(4, 6)):
        with pytest.raises(TypeError, match="^x must have dtype float32, float16, bfloat16, float64; got int64"):
            layer(bins)  # cast to int64, the weights would be zeros
    resnet = fused_layers.GatedResnet(3, skip_streams=1, dropout=0.0)
    x, skip, _ = resnet_inputs(3, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="skip input"):
        resnet(x)
    with pytest.raises(ValueError, match="skip must be"):
        resnet(x, skip[:, :2])
    with pytest.raises(ValueError, match="skip was given"):
        fused_layers.GatedResnet(3, dropout=0.0)(x, skip)
    with pytest.raises(ValueError, match="cond was given"):
        resnet(x, skip, torch.randn(2, 2))
    with pytest.raises(ValueError, match="x must be"):
        fused_layers.ShiftedConv2d(3, 4)(torch.randn(1, 2, 4, 4))


# ---------------------------------------------------------------- kernel backends


@pytest.mark.parametrize("backend", ["triton", CUDA])
def test_fused_layers_on_the_kernel_backends_match_the_reference_built_layers(backend, kernel_device):
    """Tiny shapes on the CPU (Triton's interpreter, the CUDA kernels built for it; the GPU tests cover
    realistic sizes); the CUDA kernels' convolutions, and on a GPU both sides', may run in TF32
    (PyTorch's default for convs)."""
    dtype = torch.float32
    tf32 = kernel_device.type == "cuda" or backend == "cuda"
    # One colour group and three (the horizontal gate pairs channels within each colour third).
    for channels, dilation, color_groups in ((4, 2, 1), (3, 1, 3)):
        fused, reference = layer_pair("GatedMaskedConv2d", channels, 3, dilation, color_groups, 2, dtype=dtype, device=kernel_device)
        with pixelcnn_kernels.use_backend(backend):
            assert_layers_agree(fused, reference, gated_inputs(channels, 2, batch=1, size=(3, 4), dtype=dtype, device=kernel_device), tf32=tf32)
    fused, reference = layer_pair("GatedResnet", 2, "down_right", 1, 2, dropout=0.0, dtype=dtype, device=kernel_device)
    with pixelcnn_kernels.use_backend(backend):
        assert_layers_agree(fused, reference, resnet_inputs(2, 1, 2, batch=1, size=(3, 4), dtype=dtype, device=kernel_device), tf32=tf32)


def assert_as_accurate(results: dict[str, list[torch.Tensor]], exact: list[torch.Tensor], dtype: torch.dtype, factor: float = 2.0):
    """Each fused result is within ``factor`` × the reference-built layer's error from the float64 result.

    A layer chains several ops, each rounding to ``dtype``; the table's per-op tolerance
    does not bound the chain, the reference ops' own error in that dtype does.
    """
    _, atol = tolerance(dtype, tf32=True)
    for i, (fused, built, want) in enumerate(zip(results["fused"], results["reference"], exact)):
        built_error = (built.double() - want).abs().max().item()
        fused_error = (fused.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert fused_error <= factor * built_error + atol * max(scale, 1.0), f"result {i}: fused error {fused_error:.3g}, reference-built {built_error:.3g}"


def assert_fused_layer_as_accurate(class_name: str, args: tuple, inputs: tuple, dtype: torch.dtype, backend: str) -> None:
    """The fused layer on ``backend``, outputs and every gradient, is as accurate in ``dtype`` as the
    reference-built layer in ``dtype`` (:func:`assert_as_accurate`), both against float64."""
    device = inputs[0].device
    fused, reference = layer_pair(class_name, *args, dtype=dtype, device=device)
    exact_layer = getattr(reference_layers, class_name)(*args).to(device, torch.float64)
    exact_layer.load_state_dict(fused.state_dict())
    # Seeded before each: a layer with dropout draws the same mask in all three.
    torch.manual_seed(0)
    with pixelcnn_kernels.use_backend(backend):
        fused_out, fused_grads = outputs_and_grads(fused, inputs)
    torch.manual_seed(0)
    ref_out, ref_grads = outputs_and_grads(reference, inputs)
    torch.manual_seed(0)
    exact_out, exact_grads = outputs_and_grads(exact_layer, tuple(None if t is None else t.double() for t in inputs), cotangent_dtype=dtype)
    assert_as_accurate({"fused": fused_out + fused_grads, "reference": ref_out + ref_grads}, exact_out + exact_grads, dtype)


# name -> (layer class, constructor args, inputs(dtype, device)): the layer sizes.
GPU_LAYER_CASES = {
    "gated_masked_conv": ("GatedMaskedConv2d", (128, 3, 2, 1, 10), lambda d, dev: gated_inputs(128, 10, batch=16, size=(32, 32), dtype=d, device=dev)),
    "gated_masked_conv_rgb": ("GatedMaskedConv2d", (126, 3, 1, 3, None), lambda d, dev: gated_inputs(126, None, batch=16, size=(32, 32), dtype=d, device=dev)),
    "gated_resnet": ("GatedResnet", (160, "down_right", 2, 10, 0.0), lambda d, dev: resnet_inputs(160, 2, 10, batch=8, size=(32, 32), dtype=d, device=dev)),
    # In training: the dropout after the second concat_elu, fused into conv_out.
    "gated_resnet_dropout": ("GatedResnet", (160, "down", 1, None, 0.5), lambda d, dev: resnet_inputs(160, 1, None, batch=8, size=(32, 32), dtype=d, device=dev)),
}
# The same layers at interpreter sizes: the 16-bit paths of every fused kernel they use, on the CPU too.
TINY_LAYER_CASES = {
    "gated_masked_conv": ("GatedMaskedConv2d", (4, 3, 2, 1, 3), lambda d, dev: gated_inputs(4, 3, batch=2, size=(4, 5), dtype=d, device=dev)),
    "gated_masked_conv_rgb": ("GatedMaskedConv2d", (6, 3, 1, 3, None), lambda d, dev: gated_inputs(6, None, batch=2, size=(4, 5), dtype=d, device=dev)),
    "gated_resnet": ("GatedResnet", (4, "down_right", 2, 3, 0.0), lambda d, dev: resnet_inputs(4, 2, 3, batch=2, size=(4, 5), dtype=d, device=dev)),
    "gated_resnet_dropout": ("GatedResnet", (4, "down", 1, None, 0.5), lambda d, dev: resnet_inputs(4, 1, None, batch=2, size=(4, 5), dtype=d, device=dev)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(TINY_LAYER_CASES))
@pytest.mark.parametrize("backend", ["triton", CUDA])
def test_fused_layers_in_half_precision_on_the_kernel_backends(backend, case, dtype, kernel_device):
    """Tiny shapes: the fused layer's 16-bit path is as accurate as the reference-built layer's (bf16 in the
    interpreter through triton.utils' widened tl.dot)."""
    class_name, args, make_inputs = TINY_LAYER_CASES[case]
    assert_fused_layer_as_accurate(class_name, args, make_inputs(dtype, kernel_device), dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(GPU_LAYER_CASES))
def test_fused_layers_on_the_gpu(case, dtype, backend):
    """Issue sizes: the fused layer on ``backend`` is as accurate as the reference-built layer (TF32/bf16)."""
    reason = pixelcnn_kernels.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    class_name, args, make_inputs = GPU_LAYER_CASES[case]
    assert_fused_layer_as_accurate(class_name, args, make_inputs(dtype, "cuda"), dtype, backend)
