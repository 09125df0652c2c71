"""Issue 7: the fused per-pixel step of cached Gated PixelCNN sampling and its CUDA graph.

The references: the masked convolution's reference (:func:`masked_conv2d_ref`) for the
plain step, the PyTorch step (:class:`CachedGatedPixelCNN`) for every layer of a model,
and the naive sampler for the images. On the CPU the Triton kernel runs in the
interpreter on tiny float32 models; the ``gpu`` tests run the CUDA and Triton kernels
on a GPU, the CUDA graph against eager steps, and larger layers.
"""

import pytest
import torch

from sampling_step_helpers import assert_close_at_scale, exact_gpu_convs, kernel_backend, step_backends, widest

from pixelcnn_kernels.backend import BackendUnavailableError, use_backend
from pixelcnn_kernels.models import GatedPixelCNN
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.sampling import (
    MAX_DRAW_BINS,
    GatedLayerStepWeights,
    HorizontalStepWeights,
    SoftmaxHeadWeights,
    bin_inputs,
    dmol_draw_step,
    gated_layer_step,
    horizontal_conv_step,
    pixel_step_fits,
    softmax_draw_fits,
    softmax_draw_step,
    step_backend,
)
from pixelcnn_kernels.reference.masked_conv import masked_conv2d_ref
from pixelcnn_kernels.sampling import SamplingProblem
from pixelcnn_kernels.sampling.cached_gated import CachedGatedPixelCNN, FusedCachedGatedPixelCNN, fused_steps_fit
from pixelcnn_kernels.triton import sampling as triton_sampling

N = 2
STEP_BACKENDS = step_backends()
# name -> GatedPixelCNN keyword arguments; every variant has 2 layers, 8 bins and a 4×5 image.
VARIANTS = {
    "grey": dict(in_channels=1, hidden=6),
    "rgb": dict(in_channels=3, hidden=6),
    "dmol_rgb": dict(in_channels=3, hidden=6, head="dmol", num_logistic_mix=2),
    "rgb_cond_dilated": dict(in_channels=3, hidden=8, dilations=[1, 2], num_classes=3),  # colour groups of 3, 3, 2
}
HEIGHT, WIDTH = 4, 5


pytestmark = pytest.mark.usefixtures(exact_gpu_convs.__name__)


def build(name: str, dtype=torch.float32, device="cpu", scale=3.0, **overrides):
    """The variant (parameters × ``scale``: draws that depend on the context) in ``dtype`` and its cond labels."""
    torch.manual_seed(0)
    config = {"num_bins": 8, **VARIANTS[name], **overrides}
    model = GatedPixelCNN(layers=2, image_size=(HEIGHT, WIDTH), **config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    cond = torch.tensor([2, 0])[:N] if model.num_classes else None
    return model.to(device, dtype).eval(), None if cond is None else cond.to(device)


def noise_for(model, batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if model.head == "softmax":
        return torch.rand(batch, model.in_channels, HEIGHT, WIDTH, generator=generator).to(device)
    return tuple(torch.rand(batch, c, HEIGHT, WIDTH, generator=generator).to(device) for c in (model.num_logistic_mix, model.in_channels))


def known_problem(model, cond, batch: int = N) -> SamplingProblem:
    """Random images every pixel of which is known: each step's activations are a function of them."""
    device = next(model.parameters()).device
    images = torch.randint(0, model.num_bins, (batch, model.in_channels, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(4)).to(device)
    known = torch.ones(batch, HEIGHT, WIDTH, dtype=torch.bool, device=device)
    return SamplingProblem(images, known, noise_for(model, batch), cond, model.class_vector(cond, batch))


def every_pixel(run) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's last horizontal stack and logits, in raster order, from a PyTorch or fused cached run."""
    stacks, logits = [], []
    for i in range(HEIGHT):
        run.start_row(i)
        for j in range(WIDTH):
            if isinstance(run, CachedGatedPixelCNN):
                h = run.horizontal_stack(i, j)
            else:
                h = run.horizontal_stack().clone()  # a view of the run's output buffer
                run.pixel += 1
            stacks.append(h)
            logits.append(run.logits(h))
    return torch.stack(stacks), torch.stack(logits)


# ---------------------------------------------------------------- the plain step: one pixel of a masked conv


@pytest.mark.parametrize("backend, device", step_backends(pytest.mark.sanitize))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_horizontal_conv_step_is_the_masked_conv_at_its_pixel_only(backend, device, dtype):
    """Pixel by pixel, each step writes its pixel of the reference convolution and nothing else (compute-sanitizer runs the CUDA kernel here)."""
    conv = MaskedConv2d(6, 9, (1, 5), mask="horizontal", dilation=2, color_groups=3).to(device, dtype)
    x = torch.randn(3, 6, HEIGHT, WIDTH, device=device).to(dtype)
    expected = masked_conv2d_ref(x.double(), conv.weight.double(), conv.bias.double(), conv.spec, 2, 3)
    out = torch.full((3, HEIGHT, WIDTH, 9), float("nan"), device=device, dtype=dtype)
    pixel = torch.zeros(1, dtype=torch.int64, device=device)
    weights = HorizontalStepWeights.from_conv(conv, dtype)
    with kernel_backend(backend, device):
        for p in range(HEIGHT * WIDTH):
            horizontal_conv_step(pixel, x.permute(0, 2, 3, 1), weights, out)
            assert not out.flatten(1, 2)[:, : p + 1].isnan().any() and out.flatten(1, 2)[:, p + 1 :].isnan().all()
            pixel += 1
        done = out.clone()
        for outside in (HEIGHT * WIDTH, -1):
            horizontal_conv_step(pixel.fill_(outside), x.permute(0, 2, 3, 1), weights, out)
    assert torch.equal(out, done)
    assert_close_at_scale(out.permute(0, 3, 1, 2), expected, dtype)


def test_triton_pixel_step_names_a_width_past_its_limit():
    """Past MAX_PIXEL_STEP_CHANNELS the Triton step's tiles would not fit shared memory: a ValueError, not an OutOfResources at launch."""
    channels = triton_sampling.MAX_PIXEL_STEP_CHANNELS + 1
    x = torch.zeros(1, 1, 2, 4)
    out = torch.zeros(1, 1, 2, channels)
    with pytest.raises(ValueError, match=f"out has {channels} channels"):
        triton_sampling.gated_pixel_step(torch.zeros(1, dtype=torch.int64), x, torch.zeros(1, 4, channels), None, [0], None, None, None, None, None, None, 0, out)


@pytest.mark.gpu
def test_gpu_cuda_gated_step_takes_the_widths_pixel_step_fits_allows():
    """The widest 1×3 gated layer :func:`pixel_step_fits` allows the cuda backend writes its pixel; one channel more, the glue refuses (its shared memory)."""
    taps = 2  # a 1×3 horizontal mask: the pixel and its left neighbour
    channels = widest(lambda width: pixel_step_fits("cuda", taps, width, width, gated=True))
    pixel = torch.ones(1, dtype=torch.int64, device="cuda")  # the middle one of 3 columns

    def weight(*shape):  # products with unit-normal inputs stay near unit scale
        return torch.randn(*shape, device="cuda") / shape[-2] ** 0.5

    with kernel_backend("cuda", "cuda"):
        for width in (channels, channels + 1):
            weights = GatedLayerStepWeights(HorizontalStepWeights(weight(taps, width, 2 * width), None, (-1, 0)), weight(2 * width, 2 * width), None, weight(width, width), None, 1)
            x = torch.randn(2, 1, 3, width, device="cuda")
            v_pre = torch.randn(2, 3, 2 * width, device="cuda")
            out = torch.full_like(x, float("nan"))
            if width == channels:
                gated_layer_step(pixel, x, v_pre, None, weights, out)
                assert out[:, 0, 1].isfinite().all() and out[:, 0, [0, 2]].isnan().all()
            else:
                with pytest.raises(RuntimeError, match="shared memory"):
                    gated_layer_step(pixel, x, v_pre, None, weights, out)


# ---------------------------------------------------------------- the softmax head's draw against the PyTorch head and draw


def draw_operands(model, batch: int, seed: int = 5):
    """A random last horizontal stack h (B, hidden) and the draw's noise, known, images and inputs, (B, ·, H·W) each."""
    generator = torch.Generator().manual_seed(seed)
    device, dtype = next(model.parameters()).device, model.parameter_dtype()
    pixels = HEIGHT * WIDTH
    h = (3 * torch.randn(batch, model.conv_out.in_channels, generator=generator)).to(device, dtype)
    noise = torch.rand(batch, model.in_channels, pixels, generator=generator).to(device)
    known = (torch.rand(batch, pixels, generator=generator) < 0.3).to(device)
    images = torch.randint(0, model.num_bins, (batch, model.in_channels, pixels), generator=generator).to(device)
    return h, noise, known, images, model.to_inputs(images)


@pytest.mark.parametrize("backend, device", step_backends(pytest.mark.sanitize))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["grey", "rgb_cond_dilated"])
def test_softmax_draw_step_is_the_pytorch_head_and_draw_at_its_value_only(name, dtype, backend, device):
    """Each launch writes the PyTorch draw (a known value where known) and its network input at its value, nothing else (compute-sanitizer runs the CUDA kernel here)."""
    model, cond = build(name, dtype, device)
    batch = 7
    h, noise, known, images, inputs = draw_operands(model, batch)
    # The PyTorch head on the CPU, which rounds a bf16 1×1 conv's sum and bias once, as the
    # kernels do (cuDNN adds the bias to the rounded sum: a second rounding moves some draws).
    cpu_model = model.cpu()
    logits = CachedGatedPixelCNN(cpu_model, known_problem(cpu_model, None if cond is None else cond.cpu())).logits(h.cpu()[:, :, None, None]).to(device)
    model.to(device)
    pixel = torch.zeros(1, dtype=torch.int64, device=device)
    weights, table = SoftmaxHeadWeights.from_model(model, dtype), bin_inputs(model.num_bins, dtype, device)
    drawn_somewhere = False
    with kernel_backend(backend, device):
        for p in (0, 7, HEIGHT * WIDTH - 1):
            for channel in range(model.in_channels):
                drawn = model.draw_values(logits, noise[:, :, p, None, None])[:, channel, 0, 0]
                expected_images = images.clone()
                expected_images[:, channel, p] = torch.where(known[:, p], images[:, channel, p], drawn)
                expected_inputs = inputs.clone()
                expected_inputs[:, channel, p] = model.to_inputs(expected_images[:, channel, p])
                softmax_draw_step(pixel.fill_(p), channel, h, weights, noise, known, images, inputs, table)
                assert torch.equal(images, expected_images) and torch.equal(inputs, expected_inputs)
                drawn_somewhere |= bool((drawn != drawn[0]).any())
        done = images.clone(), inputs.clone()
        for outside in (HEIGHT * WIDTH, -1):
            softmax_draw_step(pixel.fill_(outside), 0, h, weights, noise, known, images, inputs, table)
    assert torch.equal(images, done[0]) and torch.equal(inputs, done[1])
    assert drawn_somewhere  # the draws depend on the noise: not one bin everywhere


@pytest.mark.parametrize("backend, device", step_backends())
@pytest.mark.parametrize("bad_logit", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_softmax_draw_of_non_finite_logits_is_bin_0_on_every_backend(bad_logit, backend, device):
    """A NaN or +inf logit leaves no distribution to draw from: both kernels draw bin 0, as the PyTorch draw does."""
    model, _ = build("grey", device=device)
    h, noise, known, images, inputs = draw_operands(model, 5)
    weights = SoftmaxHeadWeights.from_model(model, torch.float32)
    bias = weights.bias.clone()
    bias[3] = bad_logit
    expected = torch.where(known[:, 0], images[:, 0, 0], 0)
    with kernel_backend(backend, device):
        softmax_draw_step(torch.zeros(1, dtype=torch.int64, device=device), 0, h, SoftmaxHeadWeights(weights.weight, bias), noise, known, images, inputs, bin_inputs(model.num_bins, torch.float32, device))
    assert torch.equal(images[:, 0, 0], expected)


@pytest.mark.parametrize("bad_logit", [float("inf"), float("nan"), "all -inf"])
def test_pytorch_draws_of_non_finite_logits_are_bin_0_as_the_fused_ones(bad_logit):
    softmax_model, _ = build("grey")
    logits = torch.randn(3, softmax_model.num_bins, 1, 1, 2)
    if bad_logit == "all -inf":
        logits[1, :, 0, 0, 1] = -float("inf")
    else:
        logits[1, 7, 0, 0, 1] = bad_logit
    noise = torch.rand(3, 1, 1, 2)
    drawn = softmax_model.draw_values(logits, noise)
    assert drawn[1, 0, 0, 1] == 0
    finite = torch.ones_like(drawn, dtype=torch.bool)
    finite[1, 0, 0, 1] = False
    assert (drawn[finite] > 0).any()  # the other values are drawn as usual
    dmol_model = GatedPixelCNN(in_channels=3, hidden=8, layers=1, kernel_size=3, head="dmol", num_logistic_mix=2)
    dmol_logits = torch.randn(1, 2 * 10, 1, 2)  # K = 2 mixtures of 10 parameters
    dmol_logits[0, 2:4, 0, 1] = float("nan")  # the red means: a NaN red draw is bin 0, and green and blue see its value
    dmol_noise = (torch.rand(1, 2, 1, 2), torch.rand(1, 3, 1, 2))
    dmol_drawn = dmol_model.draw_values(dmol_logits, dmol_noise)
    assert dmol_drawn[0, 0, 0, 1] == 0 and ((0 <= dmol_drawn) & (dmol_drawn < dmol_model.num_bins)).all()


@pytest.mark.gpu
def test_gpu_cuda_softmax_draw_takes_the_widths_softmax_draw_fits_allows():
    """The widest head into 256 bins :func:`softmax_draw_fits` allows the cuda backend draws; one hidden unit more, the glue refuses (its shared memory)."""
    num_bins, batch, pixels = 256, 3, 4
    hidden = widest(lambda width: softmax_draw_fits("cuda", width, num_bins))
    pixel = torch.zeros(1, dtype=torch.int64, device="cuda")
    noise, known = torch.rand(batch, 1, pixels, device="cuda"), torch.zeros(batch, pixels, dtype=torch.bool, device="cuda")
    table = bin_inputs(num_bins, torch.float32, "cuda")
    with kernel_backend("cuda", "cuda"):
        for width in (hidden, hidden + 1):
            weights = SoftmaxHeadWeights(torch.randn(width, num_bins, device="cuda") / width**0.5, None)
            h = torch.randn(batch, width, device="cuda")
            images, inputs = torch.full((batch, 1, pixels), -1, device="cuda"), torch.zeros(batch, 1, pixels, device="cuda")
            if width == hidden:
                softmax_draw_step(pixel, 0, h, weights, noise, known, images, inputs, table)
                drawn = images[:, 0, 0]
                assert ((0 <= drawn) & (drawn < num_bins)).all() and torch.equal(inputs[:, 0, 0], table[drawn]) and (images[:, 0, 1:] == -1).all()
            else:
                with pytest.raises(RuntimeError, match="shared memory"):
                    softmax_draw_step(pixel, 0, h, weights, noise, known, images, inputs, table)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("in_channels, hidden", [(1, 64), (3, 66)])
def test_gpu_softmax_draw_step_at_the_tutorial_size(backend, in_channels, hidden):
    """256 bins (more than the CUDA kernel's threads' first pass over them), a batch of 70: the PyTorch head and draw, value for value."""
    model, _ = build("grey", device="cuda", scale=1.0, in_channels=in_channels, hidden=hidden, num_bins=256)
    batch = 70
    h, noise, known, images, inputs = draw_operands(model, batch)
    logits = CachedGatedPixelCNN(model, known_problem(model, None, batch=batch)).logits(h[:, :, None, None])
    pixel = torch.full((1,), 3, dtype=torch.int64, device="cuda")
    channel = in_channels - 1
    drawn = model.draw_values(logits, noise[:, :, 3, None, None])[:, channel, 0, 0]
    expected = torch.where(known[:, 3], images[:, channel, 3], drawn)
    with kernel_backend(backend, "cuda"):
        softmax_draw_step(pixel, channel, h, SoftmaxHeadWeights.from_model(model, torch.float32), noise, known, images, inputs, bin_inputs(model.num_bins, torch.float32, "cuda"))
    assert torch.equal(images[:, channel, 3], expected) and expected.unique().numel() > 10
    assert torch.equal(inputs[:, channel, 3], model.to_inputs(expected))


def test_bad_draw_inputs_name_the_argument():
    model, _ = build("rgb")
    weights, table = SoftmaxHeadWeights.from_model(model, torch.float32), bin_inputs(model.num_bins, torch.float32, "cpu")
    h, noise, known, images, inputs = draw_operands(model, N)
    pixel = torch.zeros(1, dtype=torch.int64)
    with use_backend("triton"):
        softmax_draw_step(pixel, 2, h, weights, noise, known, images, inputs, table)  # the valid call
        with pytest.raises(ValueError, match=r"channel must be an int in \[0, 3\)"):
            softmax_draw_step(pixel, 3, h, weights, noise, known, images, inputs, table)
        with pytest.raises(TypeError, match="noise must have dtype float32"):
            softmax_draw_step(pixel, 0, h, weights, noise.double(), known, images, inputs, table)
        with pytest.raises(ValueError, match="known must be contiguous of shape"):
            softmax_draw_step(pixel, 0, h, weights, noise, known[:, :-1], images, inputs, table)
        with pytest.raises(TypeError, match="images must have dtype int64"):
            softmax_draw_step(pixel, 0, h, weights, noise, known, images.int(), inputs, table)
        with pytest.raises(TypeError, match="weights.weight has dtype torch.float16 but h has torch.float32"):
            softmax_draw_step(pixel, 0, h, SoftmaxHeadWeights(weights.weight.half(), weights.bias), noise, known, images, inputs, table)
        with pytest.raises(ValueError, match="weights.weight must have shape"):
            softmax_draw_step(pixel, 0, h[:, :3].contiguous(), weights, noise, known, images, inputs, table)
        with pytest.raises(ValueError, match="inputs must have shape"):
            softmax_draw_step(pixel, 0, h, weights, noise, known, images, inputs[:, :2], table)
        with pytest.raises(ValueError, match="model must have the softmax head"):
            SoftmaxHeadWeights.from_model(build("dmol_rgb")[0], torch.float32)
        too_many = bin_inputs(MAX_DRAW_BINS + 1, torch.float32, "cpu")
        with pytest.raises(ValueError, match=f"bin_inputs must be contiguous and hold 2 to {MAX_DRAW_BINS} bins"):
            softmax_draw_step(pixel, 0, h, weights, noise, known, images, inputs, too_many)
    with pytest.raises(BackendUnavailableError, match="runs on the triton or cuda backend"):
        softmax_draw_step(pixel, 0, h, weights, noise, known, images, inputs, table)  # CPU tensors: the reference backend


@pytest.mark.parametrize("backend, device", step_backends(pytest.mark.sanitize))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_channels, into_cache", [(1, False), (3, True)], ids=["grey", "rgb-cache"])
def test_dmol_draw_step_is_the_pytorch_draw_at_its_pixel_only(in_channels, into_cache, dtype, backend, device):
    """Each launch writes the reference sampler's draw (known values where known) and its network input at its pixel, nothing else;
    ``into_cache``: the inputs are a channels-last cache with more channels and positions than pixels, as PixelCNN++'s (compute-sanitizer runs the CUDA kernel here)."""
    model, _ = build("dmol_rgb", dtype, device, in_channels=in_channels)
    batch, pixels = 7, HEIGHT * WIDTH
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(batch, model.conv_out.out_channels, generator=generator)).to(device, dtype)
    u_mix = torch.rand(batch, model.num_logistic_mix, pixels, generator=generator).to(device)
    u_logistic = torch.rand(batch, in_channels, pixels, generator=generator).to(device)
    known = (torch.rand(batch, pixels, generator=generator) < 0.3).to(device)
    images = torch.randint(0, model.num_bins, (batch, in_channels, pixels), generator=generator).to(device)
    if into_cache:
        cache = torch.randn(batch, pixels + 3, in_channels + 2, generator=generator).to(device, dtype)
        input_index = torch.randperm(pixels + 3, generator=generator)[:pixels].to(device)
        target = lambda tensor: tensor[:, :, :in_channels].transpose(1, 2)  # noqa: E731
    else:
        cache, input_index = model.to_inputs(images), None
        target = lambda tensor: tensor  # noqa: E731
    table = bin_inputs(model.num_bins, dtype, device)
    pixel = torch.zeros(1, dtype=torch.int64, device=device)
    drawn_somewhere = False
    for p in (0, 7, pixels - 1):
        with use_backend("reference"):
            drawn = model.draw_values(logits[:, :, None, None], (u_mix[:, :, p, None, None], u_logistic[:, :, p, None, None]))[:, :, 0, 0]
        expected_images, expected_cache = images.clone(), cache.clone()
        expected_images[:, :, p] = torch.where(known[:, p, None], images[:, :, p], drawn)
        target(expected_cache)[:, :, p if input_index is None else input_index[p]] = model.to_inputs(expected_images[:, :, p])
        with kernel_backend(backend, device):
            dmol_draw_step(pixel.fill_(p), logits, (u_mix, u_logistic), known, images, target(cache), table, input_index)
        assert torch.equal(images, expected_images) and torch.equal(cache, expected_cache)
        drawn_somewhere |= bool((drawn != drawn[0]).any())
    done = images.clone(), cache.clone()
    with kernel_backend(backend, device):
        for outside in (pixels, -1):
            dmol_draw_step(pixel.fill_(outside), logits, (u_mix, u_logistic), known, images, target(cache), table, input_index)
    assert torch.equal(images, done[0]) and torch.equal(cache, done[1])
    assert drawn_somewhere  # the draws depend on the logits and noise: not one value everywhere


@pytest.mark.parametrize("backend, device", step_backends(pytest.mark.sanitize))
def test_dmol_draw_step_writes_no_input_at_a_position_outside_inputs(backend, device):
    """input_index is read on the device, not checked: a position past inputs writes the image but no input (compute-sanitizer runs the CUDA kernel here)."""
    model, _ = build("dmol_rgb", device=device)
    pixels = HEIGHT * WIDTH
    logits = torch.randn(N, model.conv_out.out_channels).to(device)
    noise = (torch.rand(N, model.num_logistic_mix, pixels).to(device), torch.rand(N, 3, pixels).to(device))
    known, images = torch.zeros(N, pixels, dtype=torch.bool, device=device), torch.full((N, 3, pixels), -1, device=device)
    inputs = torch.zeros(N, 3, 1, device=device)
    input_index = torch.full((pixels,), 1, dtype=torch.int64, device=device)  # inputs has one position, 0
    with kernel_backend(backend, device):
        dmol_draw_step(torch.zeros(1, dtype=torch.int64, device=device), logits, noise, known, images, inputs, bin_inputs(model.num_bins, torch.float32, device), input_index)
    assert (images[:, :, 0] >= 0).all() and (images[:, :, 1:] == -1).all() and (inputs == 0).all()


def test_bad_dmol_draw_inputs_name_the_argument():
    model, _ = build("dmol_rgb")
    batch, pixels = N, HEIGHT * WIDTH
    logits = torch.randn(batch, model.conv_out.out_channels)
    noise = (torch.rand(batch, model.num_logistic_mix, pixels), torch.rand(batch, 3, pixels))
    known, images = torch.zeros(batch, pixels, dtype=torch.bool), torch.zeros(batch, 3, pixels, dtype=torch.int64)
    inputs, table, pixel = torch.zeros(batch, 3, pixels), bin_inputs(model.num_bins, torch.float32, "cpu"), torch.zeros(1, dtype=torch.int64)
    with use_backend("triton"):
        dmol_draw_step(pixel, logits, noise, known, images, inputs, table)  # the valid call
        for args, error, match in [
            (dict(logits=logits[:, :-1].contiguous()), ValueError, "logits must have P = 10K channels for C = 3 colour channels"),
            (dict(logits=logits.t().contiguous().t()), ValueError, r"logits must be a contiguous \(B, ·\) tensor"),
            (dict(noise=noise[0]), TypeError, r"noise must be a pair \(u_mix, u_logistic\)"),
            (dict(noise=(noise[0][:, :1], noise[1])), ValueError, r"noise\[0\] \(u_mix\) must be contiguous of shape \(2, 2, 20\)"),
            (dict(noise=(noise[0], noise[1].double())), TypeError, r"noise\[1\] \(u_logistic\) must have dtype float32"),
            (dict(images=images[:, :2].contiguous()), ValueError, "images must have 1 or 3 channels"),
            (dict(known=known.int()), TypeError, "known must have dtype bool"),
            (dict(inputs=inputs.half()), TypeError, "inputs has dtype torch.float16 but logits has torch.float32"),
            (dict(inputs=inputs[:, :, :-1]), ValueError, "inputs must have images' H·W = 20 positions without input_index"),
            (dict(table=table[:1]), ValueError, "bin_inputs must be contiguous and hold 2 to"),
            (dict(input_index=torch.arange(pixels - 1)), ValueError, r"input_index must be contiguous of shape \(20,\)"),
        ]:
            call = {**dict(pixel=pixel, logits=logits, noise=noise, known=known, images=images, inputs=inputs, table=table, input_index=None), **args}
            with pytest.raises(error, match=match):
                dmol_draw_step(*call.values())
    with pytest.raises(BackendUnavailableError, match="runs on the triton or cuda backend"):
        dmol_draw_step(pixel, logits, noise, known, images, inputs, table)  # CPU tensors: the reference backend


# ---------------------------------------------------------------- every layer of a model against the PyTorch step


def test_step_backend_is_a_kernel_backend_in_kernel_dtypes_only():
    weight = torch.zeros(1)
    assert step_backend(weight) is None  # CPU tensors: the reference backend
    with use_backend("triton"):
        assert step_backend(weight) == "triton"
        assert step_backend(weight.double()) is None  # float64 stays on the PyTorch step
    with use_backend("reference"):
        assert step_backend(weight) is None


def test_fused_steps_fit_needs_a_kernel_backend():
    model, _ = build("grey")
    assert not fused_steps_fit(model)  # CPU tensors: the reference backend
    with use_backend("triton"):
        assert fused_steps_fit(model)
        assert not fused_steps_fit(build("grey", torch.float64)[0])


@pytest.mark.parametrize("backend, device", STEP_BACKENDS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_steps_match_the_pytorch_step_in_float32(name, backend, device):
    model, cond = build(name, device=device)
    with torch.no_grad():
        expected = every_pixel(CachedGatedPixelCNN(model, known_problem(model, cond)))
        with kernel_backend(backend, device):
            fused = every_pixel(FusedCachedGatedPixelCNN(model, known_problem(model, cond)))
    for what, got, want in zip(("horizontal stack", "logits"), fused, expected):
        assert_close_at_scale(got, want, torch.float32, what)


@pytest.mark.parametrize("backend, device", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["grey", "rgb_cond_dilated"])
def test_fused_steps_in_half_precision_are_as_accurate_as_the_pytorch_step(name, dtype, backend, device):
    """Against the float64 PyTorch step: the fused step (fp32 inside, one rounding per layer) errs at most 3× the PyTorch step in ``dtype``."""
    model, cond = build(name, dtype, device)
    exact, _ = build(name, torch.float64, device)
    with torch.no_grad():
        truth = every_pixel(CachedGatedPixelCNN(exact, known_problem(exact, cond)))
        pytorch_step = every_pixel(CachedGatedPixelCNN(model, known_problem(model, cond)))
        with kernel_backend(backend, device):
            fused = every_pixel(FusedCachedGatedPixelCNN(model, known_problem(model, cond)))
    for got, baseline, want in zip(fused, pytorch_step, truth):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= 3 * (baseline.double() - want).abs().max()


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("completion", [False, True], ids=["full", "completion"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_sampler_draws_the_naive_image_with_one_launch_per_layer_and_value(name, completion, monkeypatch):
    """float32 on the Triton interpreter: the fused cached sampler's image is naive's, known pixels kept."""
    model, cond = build(name)
    noise = noise_for(model, N)
    prefix = torch.randint(0, model.num_bins, (N, model.in_channels, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2)) if completion else None
    known = (torch.rand(N, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) < 0.4) if completion else None
    launches = {"gated_pixel_step": 0, "softmax_draw_step": 0, "dmol_draw_step": 0}
    for op in launches:
        launch = getattr(triton_sampling, op)
        monkeypatch.setattr(triton_sampling, op, lambda *args, op=op, launch=launch: launches.__setitem__(op, launches[op] + 1) or launch(*args))
    with use_backend("triton"):
        naive = model.sample(N, method="naive", cond=cond, prefix=prefix, known=known, noise=noise, progress=False)
        launches.update(dict.fromkeys(launches, 0))
        cached = model.sample(N, method="cached", cond=cond, prefix=prefix, known=known, noise=noise, progress=False)
    assert torch.equal(cached, naive) and naive.unique().numel() > 2
    if completion:
        kept = known[:, None].expand_as(prefix)
        assert torch.equal(cached[kept], prefix[kept])
    all_known = 0 if known is None else int(known.all(dim=0).sum())
    values_per_pixel = model.in_channels if model.head == "softmax" else 1
    values = (HEIGHT * WIDTH - all_known) * values_per_pixel
    layers = len(model.conv_layers) + 1  # the first conv, then each gated layer
    assert launches["gated_pixel_step"] == layers * (values + all_known)
    assert launches["softmax_draw_step"] == (values if model.head == "softmax" else 0)
    assert launches["dmol_draw_step"] == (values if model.head == "dmol" else 0)


@pytest.mark.parametrize("size, widest_fused", [("num_bins", MAX_DRAW_BINS), ("hidden", triton_sampling.MAX_PIXEL_STEP_CHANNELS)])
def test_fused_steps_fit_the_triton_steps_widest_models(size, widest_fused):
    """The fused draw's most bins and the Triton pixel step's most channels: one more keeps the PyTorch step (not the step's ValueError)."""
    with use_backend("triton"):
        assert fused_steps_fit(build("grey", **{size: widest_fused})[0])
        assert not fused_steps_fit(build("grey", **{size: widest_fused + 1})[0])


def test_a_model_past_a_fused_steps_limit_keeps_the_pytorch_step(monkeypatch):
    """More bins than one program or block of the fused draw holds: the PyTorch cached step, still naive's image."""
    model, _ = build("grey", num_bins=MAX_DRAW_BINS + 1)
    monkeypatch.setattr(FusedCachedGatedPixelCNN, "sample", None)  # calling it fails
    noise = noise_for(model, 1)
    with use_backend("triton"):
        cached = model.sample(1, method="cached", noise=noise, progress=False)
        assert torch.equal(cached, model.sample(1, method="naive", noise=noise, progress=False))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_a_prefix_in_any_layout_completes_as_naive(channels_last):
    """The fused draws index the images flat: a channels-last prefix is copied to the sampler's contiguous images."""
    model, _ = build("rgb")
    prefix = torch.randint(0, model.num_bins, (N, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2))
    prefix = prefix.to(memory_format=torch.channels_last) if channels_last else prefix
    known = torch.rand(N, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) < 0.4
    noise = noise_for(model, N)
    with use_backend("triton"):
        cached = model.sample(N, method="cached", prefix=prefix, known=known, noise=noise, progress=False)
        assert torch.equal(cached, model.sample(N, method="naive", prefix=prefix, known=known, noise=noise, progress=False))


def test_the_reference_backend_and_float64_keep_the_pytorch_step(monkeypatch):
    launches = []
    monkeypatch.setattr(triton_sampling, "gated_pixel_step", lambda *args: launches.append(1))
    model, _ = build("grey")
    model.sample(N, method="cached", noise=noise_for(model, N), progress=False)  # CPU tensors: reference
    # A float64 model on the forced triton backend drafts with the PyTorch step; the full forward
    # that checks the draft then refuses float64, as the model's forward always does there.
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="got float64"):
        model.double().sample(N, method="cached", noise=noise_for(model, N), progress=False)
    assert launches == []


def test_cuda_graph_needs_a_cuda_device():
    model, cond = build("grey")
    with use_backend("triton"), pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        FusedCachedGatedPixelCNN(model, known_problem(model, cond)).sample(progress=False, cuda_graph=True)


# ---------------------------------------------------------------- bad input


def test_bad_step_inputs_name_the_argument():
    model, cond = build("rgb_cond_dilated")
    layer = GatedLayerStepWeights.from_layer(model.conv_layers[0], torch.float32)
    pixel = torch.zeros(1, dtype=torch.int64)
    channels = model.conv_layers[0].channels
    x, v_pre, out = torch.zeros(N, HEIGHT, WIDTH, channels), torch.zeros(N, WIDTH, 2 * channels), torch.zeros(N, HEIGHT, WIDTH, channels)
    cond = torch.zeros(N, 2 * channels)
    with use_backend("triton"):
        gated_layer_step(pixel, x, v_pre, cond, layer, out)  # the valid call
        with pytest.raises(TypeError, match="pixel must be an int64"):
            gated_layer_step(pixel.int(), x, v_pre, cond, layer, out)
        with pytest.raises(ValueError, match=r"pixel must have shape \(1,\)"):
            gated_layer_step(torch.zeros(2, dtype=torch.int64), x, v_pre, cond, layer, out)
        with pytest.raises(TypeError, match="x must have dtype"):
            gated_layer_step(pixel, x.double(), v_pre, cond, layer, out)
        with pytest.raises(TypeError, match="out has dtype"):
            gated_layer_step(pixel, x, v_pre, cond, layer, out.half())
        with pytest.raises(ValueError, match="out must have shape"):
            gated_layer_step(pixel, x, v_pre, cond, layer, out[:, :, :, :3])
        with pytest.raises(ValueError, match="v_pre must have shape"):
            gated_layer_step(pixel, x, v_pre[:, :, :6], cond, layer, out)
        with pytest.raises(TypeError, match="v_pre must be a torch.Tensor"):
            gated_layer_step(pixel, x, None, cond, layer, out)
        with pytest.raises(ValueError, match="cond must have shape"):
            gated_layer_step(pixel, x, v_pre, cond[:1], layer, out)
        with pytest.raises(ValueError, match="out shares memory with x"):
            gated_layer_step(pixel, x, v_pre, cond, layer, x[:])
        # Fresh empty tensors all start at address 0, yet share no memory.
        gated_layer_step(pixel, torch.zeros(0, *x.shape[1:]), torch.zeros(0, *v_pre.shape[1:]), cond[:0], layer, torch.zeros(0, *out.shape[1:]))
        with pytest.raises(ValueError, match="wp must be a contiguous"):
            gated_layer_step(pixel, x[..., :3], v_pre, cond, layer, out[..., :3])
        with pytest.raises(ValueError, match="weights.color_groups"):
            gated_layer_step(pixel, x, v_pre, cond, GatedLayerStepWeights(**{**vars(layer), "color_groups": 4}), out)
        with pytest.raises(ValueError, match="one kernel row"):
            HorizontalStepWeights.from_conv(model.conv_layers[0].conv_vert, torch.float32)
    with pytest.raises(BackendUnavailableError, match="runs on the triton or cuda backend"):
        gated_layer_step(pixel, x, v_pre, cond, layer, out)  # CPU tensors: the reference backend


# ---------------------------------------------------------------- GPU: the CUDA graph


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, completion", [("rgb_cond_dilated", False), ("dmol_rgb", False), ("grey", True)])
def test_gpu_cuda_graph_replays_the_eager_steps(name, completion, dtype, backend, monkeypatch):
    """One captured pixel step replayed per pixel, and one row step per row after the second, give the eager steps' images bit for bit (and naive's in float32)."""
    model, cond = build(name, dtype, "cuda")
    batch = 20  # not a multiple of the kernels' images per block
    noise = noise_for(model, batch)
    cond = None if cond is None else cond.repeat(batch // N)
    images = torch.randint(0, model.num_bins, (batch, model.in_channels, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2)).cuda()
    known = (torch.rand(batch, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3)) < 0.4).cuda() if completion else torch.zeros(batch, HEIGHT, WIDTH, dtype=torch.bool, device="cuda")
    drawn, row_calls = {}, []
    start_row = FusedCachedGatedPixelCNN.start_row
    monkeypatch.setattr(FusedCachedGatedPixelCNN, "start_row", lambda self, row: row_calls.append(row) or start_row(self, row))
    with kernel_backend(backend, "cuda"), torch.no_grad():
        for graph in (False, True):
            problem = SamplingProblem(images.clone(), known, noise, cond, model.class_vector(cond, batch))
            row_calls.clear()
            assert FusedCachedGatedPixelCNN(model, problem).sample(progress=False, cuda_graph=graph) == graph
            # With graphs, Python runs rows 0 and 1 and the capture of row 2's step; replays do the rest.
            assert row_calls == ([0, 1, 2] if graph else list(range(HEIGHT)))
            drawn[graph] = problem.images
        naive = model.sample(batch, method="naive", cond=cond, prefix=images if completion else None, known=known if completion else None, noise=noise, size=(HEIGHT, WIDTH), progress=False)
    assert torch.equal(drawn[True], drawn[False])
    assert torch.equal(drawn[True][known[:, None].expand_as(images)], images[known[:, None].expand_as(images)])
    if dtype == torch.float32:
        assert torch.equal(drawn[True], naive)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["grey", "dmol_rgb"])
def test_gpu_step_before_the_capture_draws_where_every_image_knows_the_pixel(name, backend, monkeypatch):
    """Completion with pixel (0, 0) known in every image: the eager step run before the capture
    still draws (so the head and draw kernels are not launched first inside the capture), and the
    graph's images are the eager ones."""
    model, cond = build(name, device="cuda")
    noise = noise_for(model, N)
    images = torch.randint(0, model.num_bins, (N, model.in_channels, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(2)).cuda()
    known = torch.zeros(N, HEIGHT, WIDTH, dtype=torch.bool, device="cuda")
    known[:, 0, 0] = True
    draws, drawn = [], {}
    pixel_step = FusedCachedGatedPixelCNN.pixel_step
    monkeypatch.setattr(FusedCachedGatedPixelCNN, "pixel_step", lambda self, draw=True: draws.append(draw) or pixel_step(self, draw))
    with kernel_backend(backend, "cuda"), torch.no_grad():
        for graph in (True, False):
            draws.clear()
            problem = SamplingProblem(images.clone(), known, noise, cond, model.class_vector(cond, N))
            assert FusedCachedGatedPixelCNN(model, problem).sample(progress=False, cuda_graph=graph) == graph
            drawn[graph] = problem.images
            # graph: the eager step at (0, 0) and the captured one; eager: (0, 0) known, then every other pixel drawn
            assert draws == ([True, True] if graph else [False] + [True] * (HEIGHT * WIDTH - 1))
    assert torch.equal(drawn[True], drawn[False])


@pytest.mark.gpu
def test_gpu_failed_capture_falls_back_on_the_callers_stream(monkeypatch):
    """A pixel step that cannot be captured (it synchronises): a warning, eager steps on the
    caller's stream (torch.cuda.graph leaves its own current when its capture fails), the eager images."""
    model, cond = build("grey", device="cuda")
    noise = noise_for(model, N)

    def new_problem():
        images = torch.zeros(N, 1, HEIGHT, WIDTH, dtype=torch.int64, device="cuda")
        return SamplingProblem(images, torch.zeros(N, HEIGHT, WIDTH, dtype=torch.bool, device="cuda"), noise, cond, model.class_vector(cond, N))

    with torch.no_grad():
        expected_problem = new_problem()
        FusedCachedGatedPixelCNN(model, expected_problem).sample(progress=False, cuda_graph=False)
        pixel_step = FusedCachedGatedPixelCNN.pixel_step
        monkeypatch.setattr(FusedCachedGatedPixelCNN, "pixel_step", lambda self, draw=True: torch.cuda.synchronize() or pixel_step(self, draw))
        problem = new_problem()
        caller = torch.cuda.current_stream()
        with pytest.warns(RuntimeWarning, match="capturing the pixel step in a CUDA graph failed"):
            assert FusedCachedGatedPixelCNN(model, problem).sample(progress=False) is False
        assert torch.cuda.current_stream() == caller
    assert torch.equal(problem.images, expected_problem.images)


@pytest.mark.gpu
def test_gpu_sample_uses_the_graph_by_default(monkeypatch):
    """``model.sample(method="cached")`` on a GPU runs the fused step in a CUDA graph."""
    used = []
    sample = FusedCachedGatedPixelCNN.sample
    monkeypatch.setattr(FusedCachedGatedPixelCNN, "sample", lambda self, *args, **kwargs: used.append(sample(self, *args, **kwargs)))
    model, cond = build("rgb_cond_dilated", device="cuda")
    noise = noise_for(model, N)
    cached = model.sample(N, method="cached", cond=cond, noise=noise, progress=False)
    assert used == [True]
    assert torch.equal(cached, model.sample(N, method="naive", cond=cond, noise=noise, progress=False))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("in_channels, hidden", [(1, 64), (3, 66), (1, 256), (3, triton_sampling.MAX_PIXEL_STEP_CHANNELS - 2)])
def test_gpu_fused_steps_at_the_tutorial_width(backend, in_channels, hidden):
    """64 channels (66 for colour groups), a batch of 70: both kernels against the PyTorch step in float32;
    also at widths whose tiles would not fit shared memory with Triton's default pipelining (up to 510).

    Sums of a few hundred products: an atol of 1e-5 of the largest magnitude, as the
    masked convolution's GPU tests allow fp32 without TF32 at realistic sizes.
    """
    model, _ = build("grey", device="cuda", scale=1.0, in_channels=in_channels, hidden=hidden, dilations=[1, 4])
    with torch.no_grad():
        expected = every_pixel(CachedGatedPixelCNN(model, known_problem(model, None, batch=70)))
        with kernel_backend(backend, "cuda"):
            fused = every_pixel(FusedCachedGatedPixelCNN(model, known_problem(model, None, batch=70)))
    for what, got, want in zip(("horizontal stack", "logits"), fused, expected):
        assert_close_at_scale(got, want, torch.float32, what, atol=1e-5)
