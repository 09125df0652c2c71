"""Benchmark cases of the discretized logistic mixture (issue 3).

GPU: the NLL (forward, backward, full) and the sampler at B = 64 and 256 of 3x32x32
images with K = 10 (logits (B, 100, 32, 32)), plus the sampler on one pixel
(B, 100, 1, 1) as the cached sampler calls it. CPU: tiny sizes. The NLL cases time
``reduction="sum"`` (PixelCNN++'s training loss) with x as floats in [-1, 1], with
``check_x=False`` as the drop-in models call it; the ``checked_x`` provider times the
default call, whose range check reads x on the host, and ``triton_two_pass`` the Triton
kernels as they ran before the loss's pass also wrote its gradient (the registered
``dmol_nll`` op: a forward-only pass, then a backward that recomputes it): the measured
A/B of that change.
"""

from __future__ import annotations

import torch

from pixelcnn_kernels.bench.harness import Case
from pixelcnn_kernels.ops.dmol import discretized_mix_logistic_nll, sample_discretized_mix_logistic
from pixelcnn_kernels.reference import dmol as reference

CHANNELS = 3
MIXTURES = 10
LOGIT_CHANNELS = MIXTURES * (1 + CHANNELS * reference.params_per_channel(CHANNELS))


def _random_logits(batch, height, width, device, dtype, generator):
    logits = torch.randn(batch, LOGIT_CHANNELS, height, width, device=device, generator=generator)
    return logits.to(dtype)


def _nll_case(batch: int, height: int, width: int) -> Case:
    pixels = batch * height * width

    def make_inputs(device, dtype, generator):
        bins = torch.randint(0, 256, (batch, CHANNELS, height, width), device=device, generator=generator)
        return reference.bins_to_values(bins, 256, torch.float32), _random_logits(batch, height, width, device, dtype, generator)

    def bytes_moved(mode, dtype):
        logits = pixels * LOGIT_CHANNELS * dtype.itemsize
        x = pixels * CHANNELS * 4
        forward = logits + x + pixels * 4  # read logits and x, write the per-pixel NLL
        backward = 2 * logits + x + pixels * 4  # read logits, x and the upstream gradient, write the gradient
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]

    return Case(
        family="dmol",
        name="dmol_nll",
        config=f"B={batch} {CHANNELS}x{height}x{width} K={MIXTURES}",
        make_inputs=make_inputs,
        # As a training loop calls it (check_x=False, as the drop-in models do): the default range
        # check reads x on the host, waiting for the GPU; "checked_x" times the default call.
        op=lambda x, logits: discretized_mix_logistic_nll(x, logits, reduction="sum", check_x=False),
        reference=lambda x, logits: reference.discretized_mix_logistic_nll(x, logits).sum(),
        bytes_moved=bytes_moved,
        grad_inputs=(1,),
        extra_providers={
            "checked_x": lambda x, logits: discretized_mix_logistic_nll(x, logits, reduction="sum"),
            "triton_two_pass": (lambda x, logits: torch.ops.pixelcnn_kernels.dmol_nll(x, logits, 256).sum(), "triton"),
        },
    )


def _sample_case(batch: int, height: int, width: int, name: str = "dmol_sample") -> Case:
    pixels = batch * height * width

    def make_inputs(device, dtype, generator):
        logits = _random_logits(batch, height, width, device, dtype, generator)
        u_mix = torch.rand(batch, MIXTURES, height, width, device=device, generator=generator)
        u_logistic = torch.rand(batch, CHANNELS, height, width, device=device, generator=generator)
        return logits, u_mix, u_logistic

    def bytes_moved(mode, dtype):
        # The mixture logits and the chosen component's 9 parameters, the noise, the sample.
        params = pixels * (MIXTURES + CHANNELS * reference.params_per_channel(CHANNELS)) * dtype.itemsize
        return params + pixels * (MIXTURES + 2 * CHANNELS) * 4

    return Case(
        family="dmol",
        name=name,
        config=f"B={batch} {CHANNELS}x{height}x{width} K={MIXTURES}",
        make_inputs=make_inputs,
        op=lambda logits, u_mix, u_logistic: sample_discretized_mix_logistic(logits, noise=(u_mix, u_logistic), channels=CHANNELS),
        reference=lambda logits, u_mix, u_logistic: reference.sample_discretized_mix_logistic(logits, u_mix, u_logistic, 256, True),
        bytes_moved=bytes_moved,
        modes=("forward",),
    )


def cases(on_gpu: bool) -> list[Case]:
    if not on_gpu:
        return [_nll_case(2, 8, 8), _sample_case(2, 8, 8), _sample_case(4, 1, 1, name="dmol_sample_pixel")]
    return [
        _nll_case(64, 32, 32),
        _nll_case(256, 32, 32),
        _sample_case(64, 32, 32),
        _sample_case(256, 32, 32),
        _sample_case(256, 1, 1, name="dmol_sample_pixel"),
    ]
