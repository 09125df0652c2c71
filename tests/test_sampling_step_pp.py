"""Issue 7: the fused gated-resnet step of cached PixelCNN++ sampling.

The references: the reference :class:`~pixelcnn_kernels.reference.layers.GatedResnet`
on the whole image for one block's step at every position, the PyTorch step
(``CachedPixelCNNPlusPlus(fused=False)``) for every block of a model, and the naive
sampler for the images. On the CPU the Triton kernel runs in the interpreter on tiny
float32 models (slow: a few tests, 4×4 images); the ``gpu`` tests run the CUDA and
Triton kernels at PixelCNN++'s width (160 channels), in bf16 too, and the sampler.
"""

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from sampling_step_helpers import assert_close_at_scale, exact_gpu_convs, kernel_backend, step_backends, widest

from pixelcnn_kernels.backend import BackendUnavailableError, use_backend
from pixelcnn_kernels.models import PixelCNNPlusPlus
from pixelcnn_kernels.nn.masked_conv import MaskedConv2d
from pixelcnn_kernels.ops.sampling import RESNET_CUDA_OP, ResnetStepWeights, resnet_position_step, resnet_step_fits, step_backend
from pixelcnn_kernels.reference.layers import GatedResnet
from pixelcnn_kernels.sampling import CACHED_SAMPLERS, SamplingProblem
from pixelcnn_kernels.sampling import cached_pixelcnn_pp
from pixelcnn_kernels.sampling.cached_pixelcnn_pp import CachedPixelCNNPlusPlus, TableCachedPixelCNNPlusPlus
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


def block_steps(block, x, skip, cond, dtype, order, slots=1) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and inner caches after steps of ``slots`` positions each of ``order`` (the last step padded with -1s); the output starts NaN.

    Each position computes the inner pixels of its window no earlier one computed, as the sampler does.
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
    entries = []
    for i, j in order:
        new_taps = 0
        for tap in range(kh * kw):
            q = (i + tap // kw - top, j + tap % kw - left)
            if 0 <= q[0] < height and 0 <= q[1] < width and q not in done:
                done.add(q)
                new_taps |= 1 << tap
        entries.append((i, j, new_taps))
    entries += [(-1, -1, -1)] * (-len(entries) % slots)
    table = torch.tensor(entries, dtype=torch.int32, device=x.device).view(-1, slots, 3)
    pixel = torch.zeros(1, dtype=torch.int64, device=x.device)
    for _ in range(len(table)):
        resnet_position_step(pixel, table, x_cache, inner, skips, projected, weights, out)
        pixel += 1
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


def check_block(name, backend, device, dtype, channels, batch, order_name="raster", atol=None, slots=1):
    block, x, skip, cond = random_block(name, channels, batch, device)
    height, width = x.shape[2:]
    order = [(i, j) for i in range(height) for j in range(width)]
    if order_name == "shuffled":
        order = [order[k] for k in torch.randperm(len(order), generator=torch.Generator().manual_seed(5))]
    with torch.no_grad():
        expected = block(x, skip, cond)
        with kernel_backend(backend, device):
            out, inner = block_steps(block, x, skip, cond, dtype, order, slots)
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
def test_resnet_step_in_any_order_with_slots_and_bf16(backend, device):
    """Positions in a shuffled order (new_taps then covers every tap of a window), 5 slots a step (the last step's empty ones -1s), and bf16 storage."""
    check_block("down_right_two_skips_cond", backend, device, torch.float32, channels=5, batch=3, order_name="shuffled", slots=5)
    check_block("down_skip_cond", backend, device, torch.bfloat16, channels=5, batch=3, slots=2)


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


def problem_for(model, cond, completion: bool = False, batch: int = N) -> SamplingProblem:
    """Zeros to fill (``completion``: a random prefix, about 40% of it known), the noise of :func:`noise_for`."""
    device = next(model.parameters()).device
    shape = (batch, model.in_channels, SIZE, SIZE)
    images = torch.randint(0, model.num_bins, shape, generator=torch.Generator().manual_seed(2)) if completion else torch.zeros(shape, dtype=torch.int64)
    known = torch.rand(batch, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) < (0.4 if completion else 0.0)
    return SamplingProblem(images.to(device), known.to(device), noise_for(model, batch, device), cond, model.class_vector(cond, batch))


def every_logit(model, images, cond) -> torch.Tensor:
    """Each pixel's logits of ``images``, in raster order, from the demand-driven PyTorch graph (every pixel known)."""
    problem = SamplingProblem(images, torch.ones(images.shape[0], SIZE, SIZE, dtype=torch.bool, device=images.device), noise_for(model, images.shape[0], images.device), cond, model.class_vector(cond, images.shape[0]))
    cached = CachedPixelCNNPlusPlus(model, problem)
    return torch.stack([cached.logits(i, j) for i in range(SIZE) for j in range(SIZE)])


@pytest.mark.parametrize("backend, device", STEP_BACKENDS)
def test_table_step_logits_match_the_pytorch_graph_in_float32(backend, device):
    """The table-driven step's logits at each pixel, against the PyTorch graph's on the image it drew."""
    model, cond = build("rgb_cond", device=device)
    problem = problem_for(model, cond)
    with torch.no_grad(), kernel_backend(backend, device):
        sampler = TableCachedPixelCNNPlusPlus(model, problem)
        logits = []
        head = sampler.logits
        sampler.logits = lambda padded_pixel: logits.append(head(padded_pixel)) or logits[-1]
        for _ in range(SIZE * SIZE):
            sampler.pixel_step()
    with torch.no_grad():
        expected = every_logit(model, problem.images, cond)
    assert_close_at_scale(torch.stack(logits), expected, torch.float32)


def test_the_fused_blocks_run_on_kernel_backends_only():
    weight = torch.zeros(1)
    model, _ = build("grey")
    assert step_backend(weight, RESNET_CUDA_OP) is None and not cached_pixelcnn_pp.fused_steps_fit(model)  # CPU tensors: the reference backend
    with use_backend("triton"):
        assert step_backend(weight, RESNET_CUDA_OP) == "triton" and cached_pixelcnn_pp.fused_steps_fit(model)
        assert step_backend(weight.double(), RESNET_CUDA_OP) is None and not cached_pixelcnn_pp.fused_steps_fit(build("grey", torch.float64)[0])


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("name, completion", [("grey", False), ("rgb_cond", True)])
def test_schedule_is_what_the_demand_driven_sampler_computes_each_once_inputs_first(name, completion, monkeypatch):
    """The symbolic demand resolution records, per pixel step, exactly the (node, position) the PyTorch sampler computes, in its order."""
    model, cond = build(name, dtype=torch.float64)
    runs = []

    class Instrumented(CachedPixelCNNPlusPlus):
        def __init__(self, *args):
            super().__init__(*args)
            self.computed = [[] for _ in range(SIZE * SIZE)]
            runs.append(self)
            for node in self.nodes:
                node.compute = functools.partial(self.log, node, node.compute)

        def logits(self, i, j):
            self.step = i * SIZE + j
            return super().logits(i, j)

        def log(self, node, compute, i, j):
            self.computed[self.step].append((self.nodes.index(node), i, j))
            return compute(i, j)

    monkeypatch.setattr(cached_pixelcnn_pp, "CachedPixelCNNPlusPlus", Instrumented)
    problem = problem_for(model, cond, completion)
    skipped = problem.skipped_pixels()
    with torch.no_grad():
        model.sample(N, method="cached", cond=cond, prefix=problem.images if completion else None, known=problem.known if completion else None, noise=problem.noise, progress=False)
        graph = CachedPixelCNNPlusPlus(model, problem)
        schedule = graph.schedule(skipped)
    (run,) = runs
    assert [[(graph.nodes.index(node), i, j) for node, i, j in step] for step in schedule] == run.computed
    assert sum(map(len, schedule)) > 0
    if completion:
        assert any(map(any, skipped))  # pixels every image knows: steps that compute nothing
    # Each (node, position) once; each position after what it reads (the image: pixels before the step).
    done = set()
    for p, step in enumerate(schedule):
        for node, i, j in step:
            for source, rows, cols in node.reads(i, j):
                for r in range(max(rows.start, 0), min(rows.stop, source.height)):
                    for c in range(max(cols.start, 0), min(cols.stop, source.width)):
                        assert (source, r, c) in done or (source is graph.x and r * SIZE + c < p), (p, graph.nodes.index(node), i, j)
            assert (node, i, j) not in done
            done.add((node, i, j))
    # The symbolic run leaves the graph as it was: it still computes everything.
    assert not any(any(row) for node in graph.nodes for row in node.done)


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("name, completion", [("grey", False), ("rgb_cond", False), ("rgb_cond", True)])
def test_table_sampler_draws_the_naive_image_with_one_launch_per_block_and_step(name, completion, monkeypatch):
    """float32 on the Triton interpreter, eager steps: the cached image is naive's (known pixels kept); each block's positions come from its table, each once."""
    model, cond = build(name)
    problem = problem_for(model, cond, completion)
    prefix, known = (problem.images, problem.known) if completion else (None, None)
    positions = []
    launch = triton_sampling.resnet_position_step

    def logged(pixel, table, *args):
        positions.extend((args[-1].data_ptr(), row, col) for row, col, _ in table[pixel.item()].tolist() if row >= 0)
        launch(pixel, table, *args)

    monkeypatch.setattr(triton_sampling, "resnet_position_step", logged)
    draws = []
    draw = triton_sampling.dmol_draw_step
    monkeypatch.setattr(triton_sampling, "dmol_draw_step", lambda *args: draws.append(1) or draw(*args))
    monkeypatch.setattr(cached_pixelcnn_pp, "gate_sigmoid", None)  # the PyTorch block's gate: calling it fails
    naive = model.sample(N, method="naive", cond=cond, prefix=prefix, known=known, noise=problem.noise, progress=False)  # CPU tensors: reference ops
    with use_backend("triton"):
        cached = model.sample(N, method="cached", cond=cond, prefix=prefix, known=known, noise=problem.noise, progress=False)
    assert torch.equal(cached, naive) and naive.unique().numel() > 2
    if completion:
        kept = known[:, None].expand_as(prefix)
        assert torch.equal(cached[kept], prefix[kept])
    blocks = sum(len(layer.u_stream) + len(layer.ul_stream) for layer in (*model.up_layers, *model.down_layers))
    assert len(set(positions)) == len(positions) and len({ptr for ptr, _, _ in positions}) == blocks
    all_known = 0 if known is None else int(known.all(dim=0).sum())
    assert len(draws) == problem.height * problem.width - all_known  # one fused draw per pixel drawn


def test_a_repaired_draft_reruns_the_table_sampler_on_the_first_runs_tables(monkeypatch):
    """The repair's rerun knows more pixels than the first run but keeps its schedule: no second set of
    tables (a build takes seconds at PixelCNN++'s size) and the naive image."""
    model, cond = build("grey")
    problem = problem_for(model, cond, False)
    naive = model.sample(N, method="naive", cond=cond, noise=problem.noise, progress=False)
    genuine, runs = CACHED_SAMPLERS[model.name], []

    def drafting_with_an_error(model, problem, progress):
        runs.append(problem.images.shape[0])
        genuine(model, problem, progress)
        if len(runs) == 1:
            problem.images[0, 0, 1, 2] = (problem.images[0, 0, 1, 2] + 1) % model.num_bins
        return 0

    monkeypatch.setitem(CACHED_SAMPLERS, model.name, drafting_with_an_error)
    with use_backend("triton"):
        cached = model.sample(N, method="cached", cond=cond, noise=problem.noise, progress=False)
    assert torch.equal(cached, naive) and runs == [N, 1]
    assert len(cached_pixelcnn_pp._TABLES[model]) == 1


def test_the_reference_backend_keeps_the_pytorch_step(monkeypatch):
    launches = []
    monkeypatch.setattr(triton_sampling, "resnet_position_step", lambda *args: launches.append(1))
    model, _ = build("grey")
    model.sample(N, method="cached", noise=noise_for(model, N, "cpu"), progress=False)  # CPU tensors: reference
    assert launches == []


# ---------------------------------------------------------------- bad input


def test_bad_step_inputs_name_the_argument():
    block, x, skip, cond = random_block("down_right_two_skips_cond", 4, N, "cpu")
    weights = ResnetStepWeights.from_block(block, torch.float32)
    x_cache = padded_cache(x, torch.float32)
    skips = [padded_cache(part, torch.float32) for part in skip.split(4, dim=1)]
    inner, out, projected = torch.zeros_like(x_cache), torch.zeros_like(x_cache), torch.zeros(N, 8)

    table = torch.tensor([[[1, 2, 0b1111]]], dtype=torch.int32)
    pixel = torch.zeros(1, dtype=torch.int64)

    def step(pixel=pixel, table=table, x=x_cache, inner=inner, skips=skips, cond=projected, weights=weights, out=out):
        resnet_position_step(pixel, table, x, inner, skips, cond, weights, out)

    with use_backend("triton"):
        step()  # the valid call
        for kwargs, error, match in [
            (dict(x=x_cache.double()), TypeError, "x must have dtype"),
            (dict(x=x_cache.transpose(1, 2)), ValueError, "x must be a contiguous"),
            (dict(pixel=pixel.int()), TypeError, "pixel must be an int64 tensor"),
            (dict(pixel=pixel.expand(2)), ValueError, r"pixel must have shape \(1,\)"),
            (dict(table=table.long()), TypeError, "table must be an int32 tensor"),
            (dict(table=table[..., :2]), ValueError, r"table must be a contiguous \(steps, slots, 3\) tensor"),
            (dict(skips=skips[:1]), ValueError, r"weights.skip_weight must have shape \(8, 4\)"),
            (dict(skips=[]), ValueError, "skips has 0 caches but weights.skip_weight is given"),
            (dict(skips=[skips[0], skips[1][:, :-1]]), ValueError, r"skips\[1\] must have shape"),
            (dict(inner=inner[..., :2]), ValueError, "inner must have shape"),
            (dict(out=out.half()), TypeError, "out has dtype"),
            (dict(cond=projected[:1]), ValueError, "cond must have shape"),
            (dict(out=x_cache), ValueError, "out shares memory with x"),
            (dict(inner=skips[1]), ValueError, r"inner shares memory with skips\[1\]"),
            (dict(inner=out.view_as(out)), ValueError, "out shares memory with inner"),
            (dict(weights=ResnetStepWeights(**{**vars(weights), "out_weight": weights.out_weight[:, :, :4]})), ValueError, "weights.out_weight must have shape"),
            (dict(weights=ResnetStepWeights(**{**vars(weights), "kernel": (3, 3, 2, 1)})), ValueError, "weights.kernel"),
        ]:
            with pytest.raises(error, match=match):
                step(**kwargs)
        not_shifted = MaskedConv2d(8, 4, 3, mask="A")
        with pytest.raises(ValueError, match="block must have two shifted convs"):
            ResnetStepWeights.from_block(types.SimpleNamespace(conv_input=not_shifted, conv_out=not_shifted, nin_skip=None), torch.float32)
        # What the kernel ignores: a position outside the image, a new inner pixel outside it (the
        # position itself is computed), a step past the table. The inner map's ring stays zero.
        for entry, at, writes_out in [((3, 0, 0), 0, False), ((0, -1, 0), 0, False), ((0, 1, 0b0001), 0, True), ((1, 2, 0b1111), 1, False)]:
            inner_before, out_before = inner.clone(), out.clone()
            step(pixel=torch.tensor([at]), table=torch.tensor([[entry]], dtype=torch.int32))
            assert torch.equal(inner, inner_before) and torch.equal(out, out_before) != writes_out, entry
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
@pytest.mark.parametrize("name", ["down_skip_cond", "down_right_two_skips_cond"])
def test_gpu_cuda_resnet_step_takes_the_widths_resnet_step_fits_allows(name):
    """The widest block :func:`resnet_step_fits` allows the cuda backend computes; one channel more, the glue refuses (its shared memory)."""
    shift, skip_streams, _ = BLOCKS[name]
    taps = len(GatedResnet(1, shift, skip_streams).conv_input.spec.taps)
    channels = widest(lambda width: resnet_step_fits("cuda", taps, skip_streams, width))
    check_block(name, "cuda", "cuda", torch.float32, channels=channels, batch=2, atol=1e-4)
    with pytest.raises(RuntimeError, match="shared memory"):
        check_block(name, "cuda", "cuda", torch.float32, channels=channels + 1, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_and_triton_steps_agree(dtype):
    atol = 1e-5 if dtype == torch.float32 else None
    by_cuda, by_triton = (check_block("down_right_two_skips_cond", backend, "cuda", dtype, channels=96, batch=9, order_name="shuffled", atol=atol) for backend in ("cuda", "triton"))
    assert_close_at_scale(by_cuda[:, 1:-1, 1:-1], by_triton[:, 1:-1, 1:-1], dtype, atol=atol)


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:cached sampling:RuntimeWarning")  # the automatic sampler's fallback to eager steps fails the test
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name, completion", [("grey", True), ("rgb_cond", False)])
def test_gpu_table_sampler_as_a_cuda_graph_is_the_eager_sampler_bit_for_bit(name, completion, backend):
    """float32, 32 filters at 8×8, a batch of 20: one captured pixel step replayed for every pixel gives the eager steps' image, and naive's (so does ``model.sample``, a graph on a GPU)."""
    model, cond = build(name, device="cuda", nr_filters=32, image_size=(8, 8))
    batch = 20
    cond = None if cond is None else cond.repeat(batch // N)
    generator = torch.Generator().manual_seed(1)
    noise = tuple(torch.rand(batch, c, 8, 8, generator=generator).cuda() for c in (model.num_logistic_mix, model.in_channels))
    images = torch.randint(0, model.num_bins, (batch, model.in_channels, 8, 8), generator=torch.Generator().manual_seed(2)).cuda() if completion else None
    known = (torch.rand(batch, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.4).cuda() if completion else torch.zeros(batch, 8, 8, dtype=torch.bool, device="cuda")
    drawn = {}
    with torch.no_grad(), kernel_backend(backend, "cuda"):
        naive = model.sample(batch, method="naive", cond=cond, prefix=images, known=known if completion else None, noise=noise, progress=False)  # on the backend: the identity holds within one
        for cuda_graph in (True, False):
            start = torch.zeros(batch, model.in_channels, 8, 8, dtype=torch.int64, device="cuda") if images is None else images.clone()
            problem = SamplingProblem(start, known, noise, cond, model.class_vector(cond, batch))
            assert TableCachedPixelCNNPlusPlus(model, problem).sample(progress=False, cuda_graph=cuda_graph) == cuda_graph
            drawn[cuda_graph] = problem.images
        automatic = model.sample(batch, method="cached", cond=cond, prefix=images, known=known if completion else None, noise=noise, progress=False)
    assert torch.equal(drawn[True], drawn[False])
    assert torch.equal(drawn[True], naive) and torch.equal(automatic, naive)
