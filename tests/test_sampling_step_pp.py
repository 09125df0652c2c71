"""Issue 7: the fused gated-resnet step of cached PixelCNN++ sampling.

The references: the reference :class:`~pixelcnn_kernels.reference.layers.GatedResnet`
on the whole image for one block's step at every position, the PyTorch step
(``CachedPixelCNNPlusPlus(fused=False)``) for every block of a model, and the naive
sampler for the images. On the CPU the Triton kernel runs in the interpreter on tiny
float32 models (slow: a few tests, 4×4 images); the ``gpu`` tests run the CUDA and
Triton kernels at PixelCNN++'s width (160 channels), in bf16 too, and the sampler.
"""

import types

import pytest
import torch
import torch.nn.functional as F
from sampling_step_helpers import GPU, assert_close_at_scale, exact_gpu_convs, kernel_backend, step_backends

from pixelcnn_kernels.backend import BackendUnavailableError, use_backend
from pixelcnn_kernels.models import PixelCNNPlusPlus
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.sampling import RESNET_CUDA_OP, ResnetStepWeights, resnet_position_step, step_backend
from pixelcnn_kernels.reference.layers import GatedResnet
from pixelcnn_kernels.sampling import SamplingProblem
from pixelcnn_kernels.sampling import cached_pixelcnn_pp
from pixelcnn_kernels.sampling.cached_pixelcnn_pp import CachedPixelCNNPlusPlus
from pixelcnn_kernels.triton import sampling as triton_sampling

pytestmark = pytest.mark.usefixtures(exact_gpu_convs.__name__)

N = 2
STEP_BACKENDS = step_backends()
# (shift, skip streams, cond channels): the up pass's u (no skip) and ul (one), the down pass's u (one) and ul (two).
BLOCKS = {
    "down": ("down", 0, None),
    "down_skip_cond": ("down", 1, 3),
    "down_right_skip": ("down_right", 1, None),
    "down_right_two_skips_cond": ("down_right", 2, 3),
}
# name -> PixelCNNPlusPlus keyword arguments: tiny, 4×4 images (three resolutions: 4×4, 2×2, 1×1).
MODELS = {
    "grey": dict(in_channels=1),
    "rgb_cond": dict(in_channels=3, num_classes=2),
}
SIZE = 4


# ---------------------------------------------------------------- one block at every position


def padded_cache(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, H, W) as the sampler's (B, H+2, W+2, C) cache with its zero ring."""
    return F.pad(t, (1, 1, 1, 1)).permute(0, 2, 3, 1).to(dtype).contiguous()


def block_steps(block, x, skip, cond, dtype, order) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and inner caches after one step per position, in ``order``; the output starts NaN.

    Each step computes the inner pixels of its window no earlier step computed, as the sampler does.
    """
    channels, height, width = x.shape[1:]
    weights = ResnetStepWeights.from_block(block, dtype)
    kh, kw, top, left = weights.kernel
    x_cache = padded_cache(x, dtype)
    skips = [] if skip is None else [padded_cache(part, dtype) for part in skip.split(channels, dim=1)]
    inner = torch.zeros_like(x_cache)
    out = torch.full_like(x_cache, float("nan"))
    projected = None if cond is None else block.cond_proj(cond).to(dtype)
    done = set()
    for i, j in order:
        new_taps = 0
        for tap in range(kh * kw):
            q = (i + tap // kw - top, j + tap % kw - left)
            if 0 <= q[0] < height and 0 <= q[1] < width and q not in done:
                done.add(q)
                new_taps |= 1 << tap
        resnet_position_step(i, j, new_taps, x_cache, inner, skips, projected, weights, out)
    return out, inner


def random_block(name: str, channels: int, batch: int, device: str, height: int = 3, width: int = 4):
    """A reference block (float64) and its inputs x, skip, cond (unit normal, so every concat_elu branch is taken)."""
    shift, skip_streams, cond_channels = BLOCKS[name]
    torch.manual_seed(0)
    block = GatedResnet(channels, shift, skip_streams, cond_channels, dropout=0.0).double().eval().to(device)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, device=device)
    skip = torch.randn(batch, skip_streams * channels, height, width, dtype=torch.float64, device=device) if skip_streams else None
    cond = torch.randn(batch, cond_channels, dtype=torch.float64, device=device) if cond_channels else None
    return block, x, skip, cond


def check_block(name, backend, device, dtype, channels, batch, order_name="raster", atol=None):
    block, x, skip, cond = random_block(name, channels, batch, device)
    height, width = x.shape[2:]
    order = [(i, j) for i in range(height) for j in range(width)]
    if order_name == "shuffled":
        order = [order[k] for k in torch.randperm(len(order), generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        expected = block(x, skip, cond)
        with kernel_backend(backend, device):
            out, inner = block_steps(block, x, skip, cond, dtype, order)
    assert out.dtype == dtype
    ring = torch.ones(height + 2, width + 2, dtype=torch.bool, device=device)
    ring[1:-1, 1:-1] = False
    assert out[:, ring].isnan().all() and not out[:, ~ring].isnan().any()  # its pixels only
    assert (inner[:, ring] == 0).all()  # the zero ring the next reads rely on stays zero
    assert_close_at_scale(out[:, 1:-1, 1:-1].permute(0, 3, 1, 2), expected, dtype, name, atol=atol)
    return out


@pytest.mark.parametrize("backend, device", step_backends(pytest.mark.sanitize))
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_resnet_step_is_the_block_at_its_pixel(name, backend, device):
    """float32, a batch of 3, 5 channels (padded lanes), raster order: each step writes its pixel of the reference block."""
    check_block(name, backend, device, torch.float32, channels=5, batch=3)


@pytest.mark.parametrize("backend, device", STEP_BACKENDS)
def test_resnet_step_in_any_order_and_bf16(backend, device):
    """Positions in a shuffled order (new_taps then covers every tap of a window) and bf16 storage."""
    check_block("down_right_two_skips_cond", backend, device, torch.float32, channels=5, batch=3, order_name="shuffled")
    check_block("down_skip_cond", backend, device, torch.bfloat16, channels=5, batch=3)


# ---------------------------------------------------------------- every block of a model against the PyTorch step


def build(name: str, dtype=torch.float32, device="cpu", scale=3.0, **overrides):
    """The variant (parameters × ``scale``: draws that depend on the context) in ``dtype``, eval mode, and its cond labels."""
    torch.manual_seed(0)
    config = dict(nr_resnet=1, nr_filters=4, nr_logistic_mix=2, num_bins=8, dropout=0.0, image_size=(SIZE, SIZE), **MODELS[name])
    model = PixelCNNPlusPlus(**{**config, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    cond = torch.tensor([1, 0]).to(device) if model.num_classes else None
    return model.to(device, dtype).eval(), cond


def noise_for(model, batch: int, device, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, c, SIZE, SIZE, generator=generator).to(device) for c in (model.num_logistic_mix, model.in_channels))


def every_logit(model, cond, fused: bool | None, batch: int = N) -> torch.Tensor:
    """Each pixel's logits, in raster order, with every pixel known (random images)."""
    device = next(model.parameters()).device
    images = torch.randint(0, model.num_bins, (batch, model.in_channels, SIZE, SIZE), generator=torch.Generator().manual_seed(4)).to(device)
    known = torch.ones(batch, SIZE, SIZE, dtype=torch.bool, device=device)
    problem = SamplingProblem(images, known, noise_for(model, batch, device), cond, model.class_vector(cond, batch))
    cached = CachedPixelCNNPlusPlus(model, problem, fused=fused)
    return torch.stack([cached.logits(i, j) for i in range(SIZE) for j in range(SIZE)])


@pytest.mark.parametrize("backend, device", STEP_BACKENDS)
def test_fused_blocks_match_the_pytorch_step_in_float32(backend, device):
    model, cond = build("rgb_cond", device=device)
    with torch.no_grad():
        expected = every_logit(model, cond, fused=False)
        with kernel_backend(backend, device):
            fused = every_logit(model, cond, fused=True)
    assert_close_at_scale(fused, expected, torch.float32)


def test_step_backend_picks_the_fused_blocks_on_kernel_backends_only():
    weight = torch.zeros(1)
    assert step_backend(weight, RESNET_CUDA_OP) is None  # CPU tensors: the reference backend
    with use_backend("triton"):
        assert step_backend(weight, RESNET_CUDA_OP) == "triton"
        assert step_backend(weight.double(), RESNET_CUDA_OP) is None


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("name, completion", [("grey", False), ("rgb_cond", False), ("rgb_cond", True)])
def test_fused_sampler_draws_the_naive_image_with_one_launch_per_block_and_position(name, completion, monkeypatch):
    """float32 on the Triton interpreter: the cached image is naive's (known pixels kept); no block runs PyTorch ops."""
    model, cond = build(name)
    noise = noise_for(model, N, "cpu")
    prefix = torch.randint(0, model.num_bins, (N, model.in_channels, SIZE, SIZE), generator=torch.Generator().manual_seed(2)) if completion else None
    known = (torch.rand(N, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) < 0.4) if completion else None
    positions = []
    launch = triton_sampling.resnet_position_step
    monkeypatch.setattr(triton_sampling, "resnet_position_step", lambda row, col, *args: positions.append((args[-1].data_ptr(), row, col)) or launch(row, col, *args))
    monkeypatch.setattr(cached_pixelcnn_pp, "gate_sigmoid", None)  # the PyTorch block's gate: calling it fails
    naive = model.sample(N, cond=cond, prefix=prefix, known=known, noise=noise, progress=False)  # CPU tensors: reference ops
    with use_backend("triton"):
        cached = model.sample(N, method="cached", cond=cond, prefix=prefix, known=known, noise=noise, progress=False)
    assert torch.equal(cached, naive) and naive.unique().numel() > 2
    if completion:
        kept = known[:, None].expand_as(prefix)
        assert torch.equal(cached[kept], prefix[kept])
    blocks = sum(len(layer.u_stream) + len(layer.ul_stream) for layer in (*model.up_layers, *model.down_layers))
    assert len(set(positions)) == len(positions) and len({ptr for ptr, _, _ in positions}) == blocks


def test_the_reference_backend_and_float64_keep_the_pytorch_step(monkeypatch):
    launches = []
    monkeypatch.setattr(triton_sampling, "resnet_position_step", lambda *args: launches.append(1))
    model, _ = build("grey")
    model.sample(N, method="cached", noise=noise_for(model, N, "cpu"), progress=False)  # CPU tensors: reference
    with use_backend("triton"), torch.no_grad():
        every_logit(model.double(), None, fused=None)  # (the triton DMOL sampler takes no float64 logits)
    assert launches == []


# ---------------------------------------------------------------- bad input


def test_bad_step_inputs_name_the_argument():
    block, x, skip, cond = random_block("down_right_two_skips_cond", 4, N, "cpu")
    weights = ResnetStepWeights.from_block(block, torch.float32)
    x_cache = padded_cache(x, torch.float32)
    skips = [padded_cache(part, torch.float32) for part in skip.split(4, dim=1)]
    inner, out, projected = torch.zeros_like(x_cache), torch.zeros_like(x_cache), torch.zeros(N, 8)

    def step(row=1, col=2, new_taps=0b1111, x=x_cache, inner=inner, skips=skips, cond=projected, weights=weights, out=out):
        resnet_position_step(row, col, new_taps, x, inner, skips, cond, weights, out)

    with use_backend("triton"):
        step()  # the valid call
        for kwargs, error, match in [
            (dict(x=x_cache.double()), TypeError, "x must have dtype"),
            (dict(x=x_cache.transpose(1, 2)), ValueError, "x must be a contiguous"),
            (dict(row=3), ValueError, r"row must be an int in \[0, 3\)"),
            (dict(col=-1), ValueError, "col must be an int"),
            (dict(new_taps=16), ValueError, "new_taps must be an int bit mask of the 4 taps"),
            (dict(row=0, new_taps=0b0001), ValueError, r"new_taps sets tap 0, whose pixel \(-1, 1\) is outside the image"),
            (dict(skips=skips[:1]), ValueError, r"weights.skip_weight must have shape \(8, 4\)"),
            (dict(skips=[]), ValueError, "skips has 0 caches but weights.skip_weight is given"),
            (dict(skips=[skips[0], skips[1][:, :-1]]), ValueError, r"skips\[1\] must have shape"),
            (dict(inner=inner[..., :2]), ValueError, "inner must have shape"),
            (dict(out=out.half()), TypeError, "out has dtype"),
            (dict(cond=projected[:1]), ValueError, "cond must have shape"),
            (dict(weights=ResnetStepWeights(**{**vars(weights), "out_weight": weights.out_weight[:, :, :4]})), ValueError, "weights.out_weight must have shape"),
            (dict(weights=ResnetStepWeights(**{**vars(weights), "kernel": (3, 3, 2, 1)})), ValueError, "weights.kernel"),
        ]:
            with pytest.raises(error, match=match):
                step(**kwargs)
        not_shifted = MaskedConv2d(8, 4, 3, mask="A")
        with pytest.raises(ValueError, match="block must have two shifted convs"):
            ResnetStepWeights.from_block(types.SimpleNamespace(conv_input=not_shifted, conv_out=not_shifted, nin_skip=None), torch.float32)
    with pytest.raises(BackendUnavailableError, match="runs on the triton or cuda backend"):
        step()  # CPU tensors: the reference backend


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_gpu_resnet_step_at_pixelcnn_pp_width(name, dtype, backend):
    """160 channels (PixelCNN++'s nr_filters), a batch of 20 (not a multiple of the kernels' images per block).

    float32: sums of ~2000 products, an atol of 1e-5 of the largest magnitude, as the
    masked convolution's GPU tests allow fp32 without TF32 at realistic sizes.
    """
    check_block(name, backend, "cuda", dtype, channels=160, batch=20, atol=1e-5 if dtype == torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_and_triton_steps_agree(dtype):
    atol = 1e-5 if dtype == torch.float32 else None
    by_cuda, by_triton = (check_block("down_right_two_skips_cond", backend, "cuda", dtype, channels=96, batch=9, order_name="shuffled", atol=atol) for backend in ("cuda", "triton"))
    assert_close_at_scale(by_cuda[:, 1:-1, 1:-1], by_triton[:, 1:-1, 1:-1], dtype, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name, completion", [("grey", True), ("rgb_cond", False)])
def test_gpu_fused_sampler_draws_the_naive_image(name, completion, backend):
    """float32 at 8×8 with 32 filters, a batch of 20: the fused cached sampler's image is naive's."""
    model, cond = build(name, device="cuda", nr_filters=32, image_size=(8, 8))
    batch = 20
    cond = None if cond is None else cond.repeat(batch // N)
    generator = torch.Generator().manual_seed(1)
    noise = tuple(torch.rand(batch, c, 8, 8, generator=generator).cuda() for c in (model.num_logistic_mix, model.in_channels))
    prefix = torch.randint(0, model.num_bins, (batch, model.in_channels, 8, 8), generator=torch.Generator().manual_seed(2)).cuda() if completion else None
    known = (torch.rand(batch, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.4).cuda() if completion else None
    naive = model.sample(batch, cond=cond, prefix=prefix, known=known, noise=noise, progress=False)
    with kernel_backend(backend, "cuda"):
        cached = model.sample(batch, method="cached", cond=cond, prefix=prefix, known=known, noise=noise, progress=False)
    assert torch.equal(cached, naive)
