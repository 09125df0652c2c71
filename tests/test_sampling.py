"""Issue 7: the cached and Jacobi samplers return the naive sampler's image given the noise.

The naive sampler (``models/base.py``) is the oracle. Every model variant is tiny and
its parameters are scaled up (:func:`sharpened`) so that the draws depend strongly on the
context: Jacobi then needs several iterations and a wrong cache would change the image.
The cached samplers are compared in float64 (their per-pixel convolutions may round the
logits differently from the full forward's, see ``sampling/cached_gated.py``; their
float32 logits are checked against the full forward's to rounding); Jacobi is compared
bit for bit in float32 as well.
"""

import types

import pytest
import torch
from op_table import CUDA

from pixelcnn_kernels.backend import use_backend
from pixelcnn_kernels.checkpoint import save_checkpoint
from pixelcnn_kernels.cli import main as cli_main
from pixelcnn_kernels.models import GatedPixelCNN, PixelCNNPlusPlus
from pixelcnn_kernels.sampling import CACHED_SAMPLERS, SamplingProblem, SamplingStats, cached_gated, cached_pixelcnn_pp, cached_sampler
from pixelcnn_kernels.sampling.cached_gated import CachedGatedPixelCNN
from pixelcnn_kernels.sampling.cached_pixelcnn_pp import CachedPixelCNNPlusPlus
from pixelcnn_kernels.sampling.verify import MAX_REPAIR_ROUNDS

# name -> (constructor, cond labels for n=2 or None)
VARIANTS = {
    "gated_grey": (lambda: GatedPixelCNN(1, hidden=6, layers=2, num_bins=8, image_size=(5, 5)), None),
    "gated_rgb": (lambda: GatedPixelCNN(3, hidden=6, layers=2, num_bins=8, image_size=(4, 4)), None),
    "gated_dmol_grey": (lambda: GatedPixelCNN(1, hidden=6, layers=2, head="dmol", num_logistic_mix=2, num_bins=8, image_size=(5, 5)), None),
    "gated_dmol_rgb": (lambda: GatedPixelCNN(3, hidden=6, layers=2, head="dmol", num_logistic_mix=2, num_bins=8, image_size=(4, 4)), None),
    # colour groups of 3, 3, 2
    "gated_rgb_cond_dilated": (lambda: GatedPixelCNN(3, hidden=8, layers=2, dilations=[1, 2], num_classes=3, num_bins=8, image_size=(4, 4)), [0, 2]),
    "pp_grey": (lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=2, in_channels=1, num_bins=8, dropout=0.0, image_size=(4, 4)), None),
    "pp_rgb_cond": (lambda: PixelCNNPlusPlus(nr_resnet=1, nr_filters=4, nr_logistic_mix=2, num_classes=2, num_bins=8, dropout=0.0, image_size=(4, 4)), [1, 0]),
}
N = 2


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of tiny ops, whose time on a shared 2-core machine is mostly OpenMP hand-offs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sharpened(name, dtype=torch.float64):
    """The variant's model, parameters ×3 (draws that depend on the context), in ``dtype``, and its cond."""
    make, labels = VARIANTS[name]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model.to(dtype), None if labels is None else torch.tensor(labels)


def make_noise(model, height, width, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if model.head == "softmax":
        return torch.rand(N, model.in_channels, height, width, generator=generator)
    return (torch.rand(N, model.num_logistic_mix, height, width, generator=generator), torch.rand(N, model.in_channels, height, width, generator=generator))


def draw_all(model, **kwargs):
    """{method: (images, stats)} for every method, on the same arguments."""
    out = {}
    for method in ("naive", "cached", "jacobi"):
        images = model.sample(N, method=method, progress=False, **kwargs)
        out[method] = (images, model.last_sample_stats)
    return out


# ---------------------------------------------------------------- the main test: identical images


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_method_draws_the_naive_image(name):
    model, cond = sharpened(name)
    height, width = model.default_sample_size()
    draws = draw_all(model, cond=cond, noise=make_noise(model, height, width))
    naive, naive_stats = draws["naive"]
    values = height * width * (model.in_channels if model.head == "softmax" else 1)
    assert naive.shape == (N, model.in_channels, height, width) and naive.dtype == torch.int64
    assert naive.unique().numel() > 2  # not a degenerate draw
    assert naive_stats == SamplingStats("naive", N, values, values, naive_stats.seconds)
    for method, (images, stats) in draws.items():
        assert torch.equal(images, naive), method
        assert stats.method == method and stats.values == values
    assert 1 < draws["jacobi"][1].network_passes <= values
    # The cached draft itself is the naive image: the checking forward redrew nothing.
    assert draws["cached"][1].network_passes == 1 and draws["cached"][1].redrawn_values == 0


@pytest.mark.parametrize("name, wrong", [
    ("gated_rgb_cond_dilated", [(0, 1, 2, 3)]),  # the green of a pixel: its blue is redrawn by a naive step
    ("gated_rgb", [(0, 0, 0, 0), (0, 2, 1, 2), (1, 2, 3, 3)]),  # two in one image (the first value), the last value of another
    ("gated_dmol_rgb", [(1, 0, 3, 1)]),
    ("pp_rgb_cond", [(0, 2, 1, 2), (1, 0, 0, 1)]),
])  # fmt: skip
def test_a_cached_draft_drawn_otherwise_is_repaired_to_the_naive_image(name, wrong, monkeypatch):
    """A cached sampler whose draft has values the naive sampler draws otherwise, and the values after them
    drawn from those (as a rounding difference would make them): one round repairs each image's first wrong
    value, samples the rest again, and a second check confirms the naive image."""
    model, cond = sharpened(name)
    height, width = model.default_sample_size()
    noise = make_noise(model, height, width)
    naive = model.sample(N, method="naive", cond=cond, noise=noise, progress=False)
    genuine, runs = CACHED_SAMPLERS[model.name], []

    def drafting_with_errors(model, problem, progress):
        runs.append(problem.images.shape[0])
        genuine(model, problem, progress)
        if len(runs) == 1:  # the draft (the repair's reruns are genuine)
            known = problem.known.clone()
            for image, channel, row, col in wrong:
                problem.images[image, channel, row, col] = (problem.images[image, channel, row, col] + 1) % model.num_bins
                known[image].view(-1)[: row * width + col + 1] = True
            genuine(model, SamplingProblem(problem.images, known, problem.noise, problem.cond, problem.class_vector), progress)
        return 0

    monkeypatch.setitem(CACHED_SAMPLERS, model.name, drafting_with_errors)
    images = model.sample(N, method="cached", cond=cond, noise=noise, progress=False)
    stats = model.last_sample_stats
    assert torch.equal(images, naive)
    first_wrong = {}  # image -> its first wrong (pixel, channel)
    for image, channel, row, col in sorted(wrong, key=lambda w: (w[0], w[2] * width + w[3], w[1])):
        first_wrong.setdefault(image, (row * width + col, channel))
    rerun = any(pixel < height * width - 1 for pixel, _ in first_wrong.values())
    assert runs == [N] + ([len(first_wrong)] if rerun else [])
    assert stats.redrawn_values >= len(first_wrong)
    later_colours = max(model.in_channels - 1 - channel for _, channel in first_wrong.values()) if model.head == "softmax" else 0
    assert stats.network_passes == 2 + later_colours  # check, naive steps of the pixel's later colours, check


def test_a_draft_far_from_the_naive_image_is_finished_by_jacobi_iterations(monkeypatch):
    """A cached sampler that draws every value otherwise: after MAX_REPAIR_ROUNDS rounds Jacobi iterations finish."""
    model, cond = sharpened("gated_dmol_grey")
    height, width = model.default_sample_size()
    noise = make_noise(model, height, width)
    naive = model.sample(N, method="naive", cond=cond, noise=noise, progress=False)
    runs = []

    def drafting_only_errors(model, problem, progress):
        runs.append(problem.images.shape[0])
        problem.images.copy_(torch.where(problem.known[:, None], problem.images, (naive + 1) % model.num_bins))
        return 0

    monkeypatch.setitem(CACHED_SAMPLERS, model.name, drafting_only_errors)
    images = model.sample(N, method="cached", cond=cond, noise=noise, progress=False)
    assert torch.equal(images, naive)
    assert len(runs) == 1 + MAX_REPAIR_ROUNDS
    assert model.last_sample_stats.redrawn_values == N * height * width


@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "gated_dmol_rgb", "pp_rgb_cond"])
def test_jacobi_is_bit_exact_in_float32(name):
    model, cond = sharpened(name, torch.float32)
    noise = make_noise(model, *model.default_sample_size())
    naive = model.sample(N, method="naive", cond=cond, noise=noise, progress=False)
    assert torch.equal(model.sample(N, method="jacobi", cond=cond, noise=noise, progress=False), naive)


@pytest.mark.parametrize("name", ["gated_rgb", "pp_grey"])
@pytest.mark.parametrize("block_rows", [1, 3])
def test_block_jacobi_draws_the_naive_image(name, block_rows):
    model, cond = sharpened(name)
    height, width = model.default_sample_size()
    noise = make_noise(model, height, width)
    naive = model.sample(N, method="naive", cond=cond, noise=noise, progress=False)
    block = model.sample(N, method="jacobi", block_rows=block_rows, cond=cond, noise=noise, progress=False)
    stats = model.last_sample_stats
    assert torch.equal(block, naive)
    windows = -(-height // block_rows)
    assert stats.block_rows == block_rows and windows <= stats.network_passes <= stats.values


# ---------------------------------------------------------------- completion and conditioning


@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "gated_dmol_grey", "pp_rgb_cond"])
def test_completion_keeps_known_pixels_and_matches_naive(name):
    model, cond = sharpened(name)
    height, width = model.default_sample_size()
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, model.num_bins, (N, model.in_channels, height, width), generator=generator)
    top_half = torch.zeros(height, width, dtype=torch.bool)
    top_half[: height // 2] = True
    per_image = torch.rand(N, height, width, generator=generator) < 0.4  # a different mask per image
    for known in (top_half, per_image):
        draws = draw_all(model, cond=cond, prefix=prefix, known=known, noise=make_noise(model, height, width))
        naive, stats = draws["naive"]
        mask = known.expand(N, height, width)
        kept = mask[:, None].expand_as(prefix)
        assert torch.equal(naive[kept], prefix[kept])
        steps_per_pixel = model.in_channels if model.head == "softmax" else 1
        unknown_somewhere = int((~mask.all(dim=0)).sum())
        assert stats.values == stats.network_passes == unknown_somewhere * steps_per_pixel
        for method, (images, _) in draws.items():
            assert torch.equal(images, naive), method


def test_class_label_changes_the_image_the_same_way_for_every_method():
    model, _ = sharpened("gated_rgb_cond_dilated")
    noise = make_noise(model, *model.default_sample_size())
    by_label = []
    for labels in ([0, 0], [2, 2]):
        draws = draw_all(model, cond=torch.tensor(labels), noise=noise)
        for method, (images, _) in draws.items():
            assert torch.equal(images, draws["naive"][0]), method
        by_label.append(draws["naive"][0])
    assert not torch.equal(by_label[0], by_label[1])


# ---------------------------------------------------------------- the cached path's logits


def cached_logits(cached, i, j):
    if isinstance(cached, CachedGatedPixelCNN):
        if j == 0:
            cached.start_row(i)
        return cached.logits(cached.horizontal_stack(i, j))
    return cached.logits(i, j)


@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "gated_dmol_rgb", "pp_rgb_cond"])
def test_cached_logits_are_as_accurate_as_the_full_forward_in_float32(name):
    """With every pixel known, each pixel's cached float32 logits are within the full float32 forward's own error.

    Both are compared with the float64 full forward (the same parameters); the cached
    path may round differently, but no worse than twice the full forward does.
    """
    model, cond = sharpened(name, torch.float32)
    exact_model, _ = sharpened(name, torch.float64)
    height, width = (8, 8) if isinstance(model, PixelCNNPlusPlus) else model.default_sample_size()  # PixelCNN++: three resolutions of 2+ pixels
    images = torch.randint(0, model.num_bins, (N, model.in_channels, height, width), generator=torch.Generator().manual_seed(4))
    known = torch.ones(N, height, width, dtype=torch.bool)
    problem = SamplingProblem(images.clone(), known, make_noise(model, height, width), cond, model.class_vector(cond, N))
    cached = (CachedGatedPixelCNN if isinstance(model, GatedPixelCNN) else CachedPixelCNNPlusPlus)(model.eval(), problem)
    with torch.no_grad():
        exact = exact_model.eval()(images, cond)
        full_error = (model(images, cond).double() - exact).abs().max()
        cached_error = max((cached_logits(cached, i, j).double() - exact[..., i : i + 1, j : j + 1]).abs().max() for i in range(height) for j in range(width))
    assert 0 < cached_error <= 2 * full_error


# ---------------------------------------------------------------- arguments and state


def test_sample_restores_training_mode_and_records_stats():
    model, _ = sharpened("gated_grey")
    model.train()
    model.conv_layers[0].eval()  # one layer in eval mode on its own: left so
    modes = {name: module.training for name, module in model.named_modules()}
    assert model.last_sample_stats is None
    model.sample(N, method="cached", size=(2, 3), generator=torch.Generator().manual_seed(0), progress=False)
    assert {name: module.training for name, module in model.named_modules()} == modes
    stats = model.last_sample_stats
    assert stats.method == "cached" and stats.images == N and stats.values == 6 and stats.seconds > 0 and stats.block_rows is None


def test_drawn_noise_is_float32_whatever_the_default_dtype():
    """The samplers' noise is float32 (the fused draws take nothing else), and the same draws under another default dtype."""
    model, _ = sharpened("gated_grey")
    expected = model.sample(N, method="naive", size=(2, 3), generator=torch.Generator().manual_seed(0), progress=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for method in ("naive", "cached"):
            got = model.sample(N, method=method, size=(2, 3), generator=torch.Generator().manual_seed(0), progress=False)
            assert torch.equal(got, expected), method
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "pp_rgb_cond"])
def test_sampling_ignores_autocast_and_runs_deterministic_cudnn(name, kernel_device, monkeypatch):
    """Every network pass of sampling runs in the parameters' dtype and with cuDNN's deterministic
    algorithms, whatever the caller set (restored after): under a bf16 autocast, the cached sampler
    on the fused kernels draws the image drawn without it."""
    model, cond = sharpened(name, torch.float32)
    model, cond = model.to(kernel_device), None if cond is None else cond.to(kernel_device)
    noise = make_noise(model, 4, 4)
    noise = noise.to(kernel_device) if isinstance(noise, torch.Tensor) else tuple(u.to(kernel_device) for u in noise)
    options = dict(cond=cond, noise=noise, size=(4, 4), progress=False)
    cudnn = torch.backends.cudnn
    seen = set()
    model.register_forward_pre_hook(lambda module, args: seen.add((torch.is_autocast_enabled(kernel_device.type), cudnn.deterministic, cudnn.benchmark)))
    with use_backend("triton"):
        expected = model.sample(N, method="cached", **options)
        monkeypatch.setattr(cudnn, "deterministic", False)
        monkeypatch.setattr(cudnn, "benchmark", True)
        with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
            assert torch.equal(model.sample(N, method="cached", **options), expected)
    assert seen == {(False, True, False)}
    assert (cudnn.deterministic, cudnn.benchmark) == (False, True)


def test_bad_sampling_arguments():
    model, _ = sharpened("gated_grey")
    with pytest.raises(ValueError, match="method must be one of"):
        model.sample(1, method="parallel", progress=False)
    with pytest.raises(ValueError, match="block_rows is an option of method='jacobi'"):
        model.sample(1, method="cached", block_rows=2, progress=False)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="block_rows must be a positive int"):
            model.sample(1, method="jacobi", block_rows=bad, progress=False)
    assert model.last_sample_stats is None  # nothing ran
    with pytest.raises(ValueError, match="method='cached' is implemented for"):
        cached_sampler(types.SimpleNamespace(name="pixelcnn_unknown"))


# ---------------------------------------------------------------- CLI


def write_checkpoint(path, model):
    return save_checkpoint(path, model_spec={"name": model.name, "config": model.config}, state_dict=model.state_dict(), optimizer=None, epoch=1, metrics=[])


@pytest.mark.parametrize("name, method, expected", [("gated_rgb_cond_dilated", None, "cached"), ("pp_grey", "jacobi", "jacobi"), ("pp_rgb_cond", "cached", "cached")])
def test_sample_command_writes_a_grid(tmp_path, capsys, name, method, expected):
    model, _ = sharpened(name, torch.float32)
    checkpoint = write_checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(checkpoint), "--n", "3", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli_main(argv + (["--method", method] if method else [])) == 0
    printed = capsys.readouterr().out
    assert f"3 images by {expected}" in printed and "images/s" in printed and out.stat().st_size > 0
    if expected == "jacobi":
        assert "Jacobi iterations" in printed


def test_sample_command_rejects_what_the_model_cannot_do(tmp_path, capsys):
    out = tmp_path / "x.png"

    def sample(model_name, *options):
        model, _ = sharpened(model_name, torch.float32)
        checkpoint = write_checkpoint(tmp_path / f"{model_name}.pt", model)
        return cli_main(["sample", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", "--device", "cpu", *options])

    assert sample("pp_grey", "--n", "1", "--method", "cached", "--block-rows", "2") == 2
    assert "block_rows is an option of method='jacobi'" in capsys.readouterr().err
    assert sample("pp_grey", "--n", "1", "--label", "1") == 2
    assert "--label is for class-conditional models" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's, in one line
        sample("pp_grey", "--n", "0")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "pixelcnn-kernels sample: argument --n: must be a positive int, got '0' (see pixelcnn-kernels sample --help)\n"
    assert sample("gated_rgb_cond_dilated", "--n", "1", "--label", "3") == 2
    assert "--label must be a class in [0, 2]" in capsys.readouterr().err
    assert sample("pp_grey", "--n", "1", "--out", str(tmp_path / "grid.jpgg")) == 2
    assert "--out must name a .png file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert sample("pp_grey", "--n", "1", "--device", "cuda") == 2
        assert "--device cuda, but no CUDA device is visible" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- kernel backends and the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "gated_dmol_rgb", "pp_rgb_cond"])
def test_every_method_draws_the_naive_image_on_the_gpu(name):
    """float64 on the reference backend (cuDNN convs, the cached path on CUDA tensors)."""
    model, cond = sharpened(name)
    model = model.cuda()
    cond = None if cond is None else cond.cuda()
    noise = make_noise(model, 8, 8)
    noise = noise.cuda() if isinstance(noise, torch.Tensor) else tuple(u.cuda() for u in noise)
    with use_backend("reference"):
        draws = draw_all(model, cond=cond, noise=noise, size=(8, 8))
    for method, (images, _) in draws.items():
        assert images.is_cuda and torch.equal(images, draws["naive"][0]), method


def assert_methods_bit_exact_on(device: torch.device, name: str, dtype: torch.dtype, size: int) -> None:
    """Cached (fused steps, checked and repaired) and Jacobi, plain and by blocks of rows, draw the
    naive image of the variant in ``dtype`` on ``device``, with whatever backend is in force."""
    model, cond = sharpened(name, dtype)
    model = model.to(device)
    sampler = cached_gated if isinstance(model, GatedPixelCNN) else cached_pixelcnn_pp
    assert sampler.fused_steps_fit(model)  # the cached draft runs the fused step kernels
    cond = None if cond is None else cond.to(device)
    noise = make_noise(model, size, size)
    noise = noise.to(device) if isinstance(noise, torch.Tensor) else tuple(u.to(device) for u in noise)
    options = dict(cond=cond, noise=noise, size=(size, size), progress=False)
    naive = model.sample(N, method="naive", **options)
    assert torch.equal(model.sample(N, method="cached", **options), naive)
    for block_rows in (None, 2):
        assert torch.equal(model.sample(N, method="jacobi", block_rows=block_rows, **options), naive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "pp_rgb_cond"])
@pytest.mark.parametrize("backend", ["triton", CUDA])
def test_cached_and_jacobi_are_bit_exact_on_the_kernel_backends_on_small_images(backend, name, dtype, kernel_device):
    """Every network pass and step on the kernels of ``backend`` (on the CPU: Triton's interpreter, the CUDA
    kernels built for it; 4×4), float32 and bf16 models."""
    with use_backend(backend):
        assert_methods_bit_exact_on(kernel_device, name, dtype, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gated_rgb_cond_dilated", "pp_rgb_cond"])
def test_cached_and_jacobi_are_bit_exact_on_the_kernel_backends(name, dtype):
    """With the fused kernels of the automatic backend (cuda), float32 and bf16 models, 8×8."""
    assert_methods_bit_exact_on(torch.device("cuda"), name, dtype, 8)
