"""Reference discretized mixture of logistics (DMOL): PixelCNN++'s likelihood and sampler.

Pure PyTorch, any device, float64-capable: the source of truth for the Triton and
CUDA kernels. Inputs are not validated here (the public ops in
:mod:`pixelcnn_kernels.ops.dmol` do that).

Logits layout (``(B, P, H, W)``, as a model's last 1x1 conv emits it). This is the
PixelCNN++ code's layout (``openai/pixel-cnn`` ``pixel_cnn_pp/nn.py`` and its PyTorch
port): after the ``K`` mixture logits, ``l[..., K:]`` is reshaped to ``(C, n*K)``, so
the parameters are grouped per colour channel, then per kind. With ``n = 3`` kinds
for ``C = 3`` (mean, log-scale, coefficient) and ``n = 2`` for ``C = 1`` (mean,
log-scale), mixture ``k`` of colour channel ``c`` reads::

    mixture logit      logits[:, k]
    mean               logits[:, K + c*n*K + k]
    log-scale          logits[:, K + c*n*K + K + k]      (clamped below at -7)
    coefficient        logits[:, K + c*n*K + 2*K + k]    (C = 3 only; tanh applied)

so ``P = 3K`` for ``C = 1`` and ``P = 10K`` for ``C = 3``. The coefficient of
channel block 0 multiplies red in green's mean; those of blocks 1 and 2 multiply
red and green in blue's mean, always with the true (observed) values of ``x``::

    mean'_green = mean_green + tanh(coef_0) * x_red
    mean'_blue  = mean_blue  + tanh(coef_1) * x_red + tanh(coef_2) * x_green

Per sub-pixel, with ``s = max(log_scale, -7)``, ``m = (x - mean') * exp(-s)`` and the
half bin width in logistic units ``h = exp(-s) / (num_bins - 1)`` (PixelCNN++'s
``1/255`` for 256 bins), the log-probability is

- first bin: ``log sigmoid(m + h)``         (integrates from -inf),
- last bin:  ``log(1 - sigmoid(m - h))``    (integrates to +inf),
- otherwise ``log(sigmoid(m + h) - sigmoid(m - h))`` when that probability
  exceeds ``1e-5``, else the mid-point density fallback
  ``m - s - 2*softplus(m) - log((num_bins - 1) / 2)``.

The same function is computed here in numerically stable forms (PixelCNN++'s
``cdf_plus - cdf_min`` cancels catastrophically in float32 in the tails and for
wide logistics):

- ``log sigmoid(m + h) = -softplus(-(m + h))`` and ``log(1 - sigmoid(m - h)) = -softplus(m - h)``;
- ``sigmoid(m + h) - sigmoid(m - h) = sinh(h) / (cosh(m) + cosh(h))``, evaluated as
  ``log(-expm1(-2h)) + h - M - log1p(exp(-|m + h|)) - log1p(exp(-|m - h|))`` with
  ``M = max(|m|, h)``, which neither overflows nor cancels.

Edge bins: integer ``x`` (bin indices ``0..num_bins-1``) is mapped to
``2*x/(num_bins-1) - 1`` and its edge bins are found by index (``x == 0``,
``x == num_bins-1``); float ``x`` uses PixelCNN++'s own tests ``x < -0.999`` and
``x > 0.999`` (which separate the edge bins from their neighbours for
``num_bins <= 2000``).

The per-pixel loss is ``-logsumexp_k(log_softmax(mixture_logits)_k + sum_c log_prob_{c,k})``.
"""

from __future__ import annotations

import math

import torch

from pixelcnn_kernels.utils import compute_dtype

LOG_SCALE_MIN = -7.0
# PixelCNN++ uses the bin's probability only above this value, else the mid-point density.
MIN_BIN_PROBABILITY = 1e-5
# PixelCNN++'s edge tests for float x in [-1, 1].
EDGE_THRESHOLD = 0.999
# PixelCNN++ clamps sampling noise to [U_EPS, 1 - U_EPS] before the log transforms.
U_EPS = 1e-5


def params_per_channel(channels: int) -> int:
    """Parameters per (colour channel, mixture): mean and log-scale, plus a coefficient for C = 3."""
    return 3 if channels == 3 else 2


def logits_per_mixture(channels: int) -> int:
    """Logit channels per mixture component: its mixture logit and ``params_per_channel`` per colour channel (3 for C=1, 10 for C=3)."""
    return 1 + channels * params_per_channel(channels)


def num_mixtures(num_logit_channels: int, channels: int) -> int:
    """K for a logits tensor with ``num_logit_channels`` = P channels: P = 3K (C=1) or 10K (C=3)."""
    return num_logit_channels // logits_per_mixture(channels)


def clamp_log_scales(raw: torch.Tensor) -> torch.Tensor:
    """``max(raw, -7)`` with NaN kept, whose gradient passes where ``raw >= -7`` and is 0 elsewhere (NaN too).

    PixelCNN++'s ``tf.maximum`` lets the gradient through at the bound itself; torch.clamp's
    backward does up to torch 2.13 and stops it from 2.14. Spelling the rule out keeps the
    reference, and so every test, the same on every torch version, and equal to the kernels.
    """
    return torch.where(raw >= LOG_SCALE_MIN, raw, raw.clamp(min=LOG_SCALE_MIN).detach())


def unpack_logits(logits: torch.Tensor, channels: int):
    """Splits ``(B, P, H, W)`` logits into PixelCNN++'s parameters (module docstring layout).

    Returns ``(mixture_logits (B, K, H, W), means (B, C, K, H, W),
    log_scales (B, C, K, H, W) clamped at -7, coeffs (B, C, K, H, W) after tanh, or None for C = 1)``.
    """
    k = num_mixtures(logits.shape[1], channels)
    per_channel = logits[:, k:].unflatten(1, (channels, params_per_channel(channels), k))
    means = per_channel[:, :, 0]
    log_scales = clamp_log_scales(per_channel[:, :, 1])
    coeffs = torch.tanh(per_channel[:, :, 2]) if channels == 3 else None
    return logits[:, :k], means, log_scales, coeffs


def bins_to_values(bins: torch.Tensor, num_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer bins ``0..num_bins-1`` -> bin centres ``(2*bin - (num_bins-1)) / (num_bins-1)`` in [-1, 1].

    Correctly rounded in ``dtype``: the float64 quotient of exact integers, rounded once.
    For float32 that is what the kernels' one IEEE division gives (checked for every
    num_bins <= 4096), and the error is half an ulp of the centre; ``bin * (2/(n-1)) - 1``
    rounds the constant and the product, up to an ulp of 1, which the DMOL likelihood
    magnifies by exp(7) at the smallest scale.
    """
    return ((2 * bins.to(torch.float64) - (num_bins - 1)) / (num_bins - 1)).to(dtype)


def _softplus(v: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^v)``, as ``max(v, 0) + log1p(e^-|v|)``, with the gradient sigmoid(v) everywhere.

    torch.nn.functional.softplus returns v itself above 20: exact only to float32 rounding.
    Written out with clamp and abs, autograd would give 0 rather than 1/2 at v = 0 exactly
    (the subgradients of both at their kinks), a point bf16 logits and coarse bins reach:
    x - mean ± half a bin is exactly 0 when the mean is a bin edge. ``logaddexp`` computes
    the same value and differentiates the function itself.
    """
    return torch.logaddexp(v, v.new_zeros(()))


def _log_sigmoid_difference(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``log(sigmoid(m + h) - sigmoid(m - h))`` for ``h > 0``, without overflow or cancellation.

    The argument of the first log is clamped at 1e-30 only so that the gradient of
    an unselected branch stays finite when ``h`` underflows to 0 (PixelCNN++'s
    ``max(cdf_delta, 1e-12)`` trick); the branch is never selected there because
    the probability is then below 1e-5.
    """
    widest = torch.maximum(m.abs(), h)
    return (
        torch.log((-torch.expm1(-2 * h)).clamp(min=1e-30))
        + (h - widest)
        - torch.log1p(torch.exp(-(m + h).abs()))
        - torch.log1p(torch.exp(-(m - h).abs()))
    )


def sub_pixel_log_prob(x, mean, log_scale, first_bin, last_bin, num_bins: int) -> torch.Tensor:
    """log P(x's bin) under one discretized logistic (module docstring), elementwise.

    ``log_scale`` is already clamped; ``first_bin``/``last_bin`` are boolean masks.
    """
    inv_scale = torch.exp(-log_scale)
    m = (x - mean) * inv_scale
    h = inv_scale / (num_bins - 1)
    log_cdf_plus = -_softplus(-(m + h))
    log_one_minus_cdf_min = -_softplus(m - h)
    log_delta = _log_sigmoid_difference(m, h)
    log_pdf_mid = m - log_scale - 2 * _softplus(m)
    interior = torch.where(log_delta > math.log(MIN_BIN_PROBABILITY), log_delta, log_pdf_mid - math.log((num_bins - 1) / 2))
    return torch.where(first_bin, log_cdf_plus, torch.where(last_bin, log_one_minus_cdf_min, interior))


def _x_values_and_edges(x: torch.Tensor, num_bins: int, dtype: torch.dtype):
    """x as float values in ``dtype`` plus first/last-bin masks (by index for integer x)."""
    if x.dtype.is_floating_point:
        values = x.to(dtype)  # the edge tests compare in the compute dtype, as the kernels do
        return values, values < -EDGE_THRESHOLD, values > EDGE_THRESHOLD
    return bins_to_values(x, num_bins, dtype), x == 0, x == num_bins - 1


def discretized_mix_logistic_nll(x: torch.Tensor, logits: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """Per-pixel negative log-likelihood in nats, summed over colour channels.

    Args:
        x: ``(B, C, H, W)``, C in {1, 3}: floats in [-1, 1] or integer bins ``0..num_bins-1``.
        logits: ``(B, P, H, W)``, P = 3K (C=1) or 10K (C=3), layout in the module docstring.
        num_bins: number of quantization levels.

    Returns:
        ``(B, H, W)`` in float64 for float64 logits, else float32 (math runs in that dtype).
    """
    dtype = compute_dtype(logits.dtype)
    channels = x.shape[1]
    mixture_logits, means, log_scales, coeffs = unpack_logits(logits.to(dtype), channels)
    values, first_bin, last_bin = _x_values_and_edges(x, num_bins, dtype)
    if channels == 3:
        red, green = values[:, 0:1], values[:, 1:2]
        means = torch.stack(
            (
                means[:, 0],
                means[:, 1] + coeffs[:, 0] * red,
                means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green,
            ),
            dim=1,
        )
    log_probs = sub_pixel_log_prob(
        values.unsqueeze(2), means, log_scales, first_bin.unsqueeze(2), last_bin.unsqueeze(2), num_bins
    ).sum(dim=1)
    return -torch.logsumexp(log_probs + torch.log_softmax(mixture_logits, dim=1), dim=1)


def quantize(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Rounds values in [-1, 1] to the nearest of the ``num_bins`` bin centres (halves round up)."""
    return bins_to_values(to_bins(values, num_bins), num_bins, values.dtype)


def to_bins(values: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Values in [-1, 1] -> int64 bin indices ``0..num_bins-1`` (nearest centre, halves round up; NaN: bin 0, as the fused draws)."""
    return torch.floor((values + 1) * ((num_bins - 1) / 2) + 0.5).clamp(0, num_bins - 1).nan_to_num(0.0).to(torch.int64)


def sample_discretized_mix_logistic(
    logits: torch.Tensor, u_mix: torch.Tensor, u_logistic: torch.Tensor, num_bins: int = 256, quantize_output: bool = True
) -> torch.Tensor:
    """Draws x from the mixture, a deterministic function of (logits, noise).

    Args:
        logits: ``(B, P, H, W)``, layout in the module docstring.
        u_mix: ``(B, K, H, W)`` uniform noise picking the component by Gumbel-max,
            ``argmax_k(logit_k - log(-log(u)))`` (first index on ties).
        u_logistic: ``(B, C, H, W)`` uniform noise for the inverse CDF,
            ``mean' + exp(log_scale) * (log(u) - log(1 - u))``.
        num_bins: quantization levels (used when ``quantize_output``).
        quantize_output: round each channel to its bin centre before it conditions
            the next channel's mean (an exact draw from the discretized likelihood);
            False keeps PixelCNN++'s continuous, clamped values.

    Both noise tensors are clamped to ``[1e-5, 1 - 1e-5]`` as in PixelCNN++. Returns
    ``(B, C, H, W)`` in [-1, 1], float64 for float64 logits, else float32.
    """
    dtype = compute_dtype(logits.dtype)
    channels = u_logistic.shape[1]
    mixture_logits, means, log_scales, coeffs = unpack_logits(logits.to(dtype), channels)
    u_mix = u_mix.to(dtype).clamp(U_EPS, 1 - U_EPS)
    u_logistic = u_logistic.to(dtype).clamp(U_EPS, 1 - U_EPS)
    component = torch.argmax(mixture_logits - torch.log(-torch.log(u_mix)), dim=1, keepdim=True)  # (B, 1, H, W)

    def pick(per_mixture):  # (B, C, K, H, W) -> (B, C, H, W) at the chosen component
        index = component.unsqueeze(1).expand(-1, per_mixture.shape[1], -1, -1, -1)
        return per_mixture.gather(2, index).squeeze(2)

    draws = pick(means) + torch.exp(pick(log_scales)) * (torch.log(u_logistic) - torch.log(1 - u_logistic))

    def finish(value):
        value = value.clamp(-1, 1)
        return quantize(value, num_bins) if quantize_output else value

    red = finish(draws[:, 0])
    if channels == 1:
        return red.unsqueeze(1)
    coef = pick(coeffs)
    green = finish(draws[:, 1] + coef[:, 0] * red)
    blue = finish(draws[:, 2] + coef[:, 1] * red + coef[:, 2] * green)
    return torch.stack((red, green, blue), dim=1)
