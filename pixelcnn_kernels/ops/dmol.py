"""Discretized mixture of logistics (PixelCNN++'s output distribution): the public ops.

- :func:`discretized_mix_logistic_nll`: the negative log-likelihood, one fused pass;
  for logits that need a gradient the same pass also writes the gradient of the NLL's
  sum, which the backward scales by the upstream gradient (:class:`_NllWithGradOfSum`).
- :func:`sample_discretized_mix_logistic`: a draw from the mixture, a deterministic
  function of (logits, noise).
- :func:`to_bins`: sampled values in [-1, 1] -> integer bins.

The logits layout, the exact semantics and the numerically stable forms are
documented in :mod:`pixelcnn_kernels.reference.dmol`.
"""

from __future__ import annotations

import math

import torch

from pixelcnn_kernels import backend as _backend
from pixelcnn_kernels.ops.registration import autograd_inside_custom_op, custom_op, eager_fast_path, plain_eager, without_autocast
from pixelcnn_kernels.reference import dmol as _reference
from pixelcnn_kernels.utils import FLOAT_DTYPES, check_int, check_same_device, check_same_dtype, check_tensor, compute_dtype

REDUCTIONS = ("none", "sum", "mean", "bpd")
# Above this, PixelCNN++'s +-0.999 edge tests for float x no longer separate the edge
# bins from their neighbours: the second centre, -1 + 2/(num_bins-1), is -0.999 itself at
# 2001 bins, an edge or not as the comparison's precision rounds it.
MAX_NUM_BINS = 2000
X_INT_DTYPES = (torch.uint8, torch.int32, torch.int64)
# The kernels read x as float32, uint8 or int64; other dtypes are converted first.
_KERNEL_X_DTYPES = (torch.float32, torch.uint8, torch.int64)


# --------------------------------------------------------------------------- validation


def check_num_bins(num_bins: object) -> int:
    if not 2 <= check_int(num_bins, "num_bins") <= MAX_NUM_BINS:
        raise ValueError(f"num_bins must be in [2, {MAX_NUM_BINS}], got {num_bins}")
    return num_bins


def check_num_logit_channels(num_logit_channels: int, channels: int) -> int:
    """K for logits of P = ``num_logit_channels`` channels and ``channels`` colour channels; ValueError naming logits unless P is a positive multiple of 3 (C=1) or 10 (C=3)."""
    per_mixture = _reference.logits_per_mixture(channels)
    if num_logit_channels == 0 or num_logit_channels % per_mixture:
        raise ValueError(
            f"logits must have P = {per_mixture}K channels for C = {channels} colour channels "
            f"(K mixture logits, then per channel K means, K log-scales{', K coefficients' if channels == 3 else ''}); "
            f"got P = {num_logit_channels}"
        )
    return num_logit_channels // per_mixture


def _check_logits(logits: object, channels: int) -> int:
    """Checks ``logits`` (B, P, H, W) for ``channels`` colour channels; returns K."""
    check_tensor(logits, "logits", ndim=4)
    mixtures = check_num_logit_channels(logits.shape[1], channels)
    if logits.shape[0] * logits.shape[2] * logits.shape[3] >= 2**31:
        raise ValueError(f"logits has {logits.shape[0] * logits.shape[2] * logits.shape[3]} pixels; at most 2**31 - 1 are supported")
    return mixtures


def every_value_is_a_bin(dtype: torch.dtype, num_bins: int) -> bool:
    """Whether x of ``dtype`` needs no range check: uint8 with 256 or more bins."""
    return dtype == torch.uint8 and num_bins >= 256


def _check_x_range(x: torch.Tensor, num_bins: int) -> None:
    """Raises ValueError when x holds a value outside its range (skipped while tracing: data-dependent)."""
    if torch.compiler.is_compiling() or x.numel() == 0 or x.device.type == "meta":
        return
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if every_value_is_a_bin(x.dtype, num_bins):
        return
    low, high = (-1, 1) if x.dtype.is_floating_point else (0, num_bins - 1)
    lowest, highest = (v.item() for v in torch.aminmax(x))
    if not (low <= lowest and highest <= high):  # also catches NaN
        kind = "values in [-1, 1]" if x.dtype.is_floating_point else f"bins in [0, {num_bins - 1}]"
        raise ValueError(f"x must hold {kind}; got min {lowest}, max {highest}")


def _check_nll_args(x: object, logits: object, num_bins: object, reduction: object, check_x: bool) -> None:
    check_tensor(x, "x", ndim=4, dtypes=FLOAT_DTYPES + X_INT_DTYPES)
    channels = x.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"x must have C = 1 or 3 colour channels (dim 1), got shape {tuple(x.shape)}")
    _check_logits(logits, channels)
    check_same_device(x=x, logits=logits)
    if (x.shape[0], *x.shape[2:]) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"x {tuple(x.shape)} and logits {tuple(logits.shape)} must have the same batch size, height and width")
    num_bins = check_num_bins(num_bins)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(check_x, bool):
        raise TypeError(f"check_x must be a bool, got {type(check_x).__name__}")
    if check_x:
        _check_x_range(x, num_bins)


def _kernel_x(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype the kernels read (float32, uint8, int64), values unchanged."""
    if x.dtype in _KERNEL_X_DTYPES:
        return x
    return x.to(torch.float32 if x.dtype.is_floating_point else torch.int64)


# --------------------------------------------------------------------------- NLL custom ops


def _new_nll(logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised per-pixel NLL, (B, H, W), for ``logits`` (B, P, H, W)."""
    return logits.new_empty((logits.shape[0], logits.shape[2], logits.shape[3]), dtype=dtype)


def _reference_nll_and_grad(x: torch.Tensor, logits: torch.Tensor, num_bins: int, grad_nll: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's NLL and d(sum(grad_nll * nll))/d logits (grad_nll None: 1 everywhere), inside a custom op."""
    with autograd_inside_custom_op():
        leaf = logits.detach().requires_grad_(True)
        nll = _reference.discretized_mix_logistic_nll(x, leaf, num_bins)
        (grad,) = torch.autograd.grad(nll, leaf, torch.ones_like(nll) if grad_nll is None else grad_nll)
    return nll.detach(), torch.empty_like(logits).copy_(grad)  # the fakes' layout


@custom_op("pixelcnn_kernels::dmol_nll")
def _dmol_nll(x: torch.Tensor, logits: torch.Tensor, num_bins: int) -> torch.Tensor:
    backend = _backend.resolve_kernel_backend(logits.dtype, "DMOL", x, logits)
    if backend == "reference":
        return _reference.discretized_mix_logistic_nll(x, logits, num_bins)
    if backend == "cuda":
        return _backend.cuda_ops().dmol_nll_forward(_kernel_x(x), logits, num_bins)
    nll = _new_nll(logits)
    if nll.numel() > 0:
        from pixelcnn_kernels.triton import dmol as triton_dmol

        triton_dmol.nll_forward(_kernel_x(x), logits, num_bins, nll)
    return nll


@_dmol_nll.register_fake
def _(x, logits, num_bins):
    return _new_nll(logits, compute_dtype(logits.dtype))


@custom_op("pixelcnn_kernels::dmol_nll_backward")
def _dmol_nll_backward(x: torch.Tensor, logits: torch.Tensor, grad_nll: torch.Tensor, num_bins: int) -> torch.Tensor:
    backend = _backend.resolve_kernel_backend(logits.dtype, "DMOL", x, logits, grad_nll)
    if backend == "reference":
        return _reference_nll_and_grad(x, logits, num_bins, grad_nll)[1]
    if backend == "cuda":
        return _backend.cuda_ops().dmol_nll_backward(_kernel_x(x), logits, grad_nll, num_bins)
    grad_logits = torch.empty_like(logits)
    if grad_logits.numel() > 0:
        from pixelcnn_kernels.triton import dmol as triton_dmol

        triton_dmol.nll_backward(_kernel_x(x), logits, grad_nll, num_bins, grad_logits)
    return grad_logits


@_dmol_nll_backward.register_fake
def _(x, logits, grad_nll, num_bins):
    return torch.empty_like(logits)


def _nll_setup_context(ctx, inputs, output):
    x, logits, num_bins = inputs
    ctx.save_for_backward(x, logits)
    ctx.num_bins = num_bins


_dmol_nll_backward_call = eager_fast_path(_dmol_nll_backward)


def _nll_backward(ctx, grad_nll):
    x, logits = ctx.saved_tensors
    return None, _dmol_nll_backward_call(x, logits, grad_nll, ctx.num_bins), None


_dmol_nll.register_autograd(_nll_backward, setup_context=_nll_setup_context)
_dmol_nll_call = eager_fast_path(_dmol_nll)


def _nll_with_grad_of_sum(x: torch.Tensor, logits: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the per-pixel NLL, d(sum(nll))/d logits) in one pass: the loss of logits that need a gradient."""
    backend = _backend.resolve_kernel_backend(logits.dtype, "DMOL", x, logits)
    if backend == "reference":
        return _reference_nll_and_grad(x, logits, num_bins, None)
    if backend == "cuda":
        return _backend.cuda_ops().dmol_nll_with_grad_of_sum(_kernel_x(x), logits, num_bins)
    nll = _new_nll(logits)
    grad_logits = torch.empty_like(logits)
    if grad_logits.numel() > 0:
        from pixelcnn_kernels.triton import dmol as triton_dmol

        triton_dmol.nll_with_grad_of_sum(_kernel_x(x), logits, num_bins, nll, grad_logits)
    return nll, grad_logits


_dmol_nll_with_grad_of_sum = custom_op("pixelcnn_kernels::dmol_nll_with_grad_of_sum")(_nll_with_grad_of_sum)


@_dmol_nll_with_grad_of_sum.register_fake
def _(x, logits, num_bins):
    return _new_nll(logits, compute_dtype(logits.dtype)), torch.empty_like(logits)


def _scaled_grad_of_sum(grad_of_sum: torch.Tensor, grad_nll: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """d(sum(grad_nll * nll))/d logits from d(sum(nll))/d logits: each pixel's gradient times its grad_nll,
    computed in float32 and rounded once into ``out`` (grad_of_sum's shape and dtype; grad_of_sum itself: in place)."""
    return torch.mul(grad_of_sum, grad_nll.unsqueeze(1), out=out)


def _with_grad_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _with_grad_backward(ctx, grad_nll, _):
    (grad_of_sum,) = ctx.saved_tensors
    return None, _scaled_grad_of_sum(grad_of_sum, grad_nll, torch.empty_like(grad_of_sum)), None


_dmol_nll_with_grad_of_sum.register_autograd(_with_grad_backward, setup_context=_with_grad_setup_context)
_nll_with_grad_of_sum_eager = without_autocast(_nll_with_grad_of_sum)


class _NllWithGradOfSum(torch.autograd.Function):
    """The NLL of logits that need a gradient, in plain eager (:func:`plain_eager`): one pass
    writes the NLL and the gradient of its sum, and the backward scales that gradient in place
    (``dmol_nll_with_grad_of_sum``'s backward, which torch.compile and the modes get, allocates
    the scaled one: the same values). Extra memory: the gradient, from the forward on, as the
    two-pass backward would allocate it. The scaled buffer is handed over, so a second
    backward of a retained graph, or one recording a graph (create_graph), recomputes the
    gradient as ``dmol_nll``'s backward does (rounded once with grad_nll inside, not after)."""

    @staticmethod
    def forward(ctx, x, logits, num_bins):
        nll, grad_of_sum = _nll_with_grad_of_sum_eager(x, logits, num_bins)
        ctx.save_for_backward(x, logits)
        ctx.num_bins = num_bins
        ctx.grad_of_sum = grad_of_sum
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        grad_of_sum, ctx.grad_of_sum = ctx.grad_of_sum, None
        if grad_of_sum is not None and not torch.is_grad_enabled():
            return None, _scaled_grad_of_sum(grad_of_sum, grad_nll, grad_of_sum), None
        x, logits = ctx.saved_tensors
        return None, _dmol_nll_backward_call(x, logits, grad_nll, ctx.num_bins), None


def _nll(x: torch.Tensor, logits: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The per-pixel NLL; when logits need a gradient, from the pass that also writes it."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _dmol_nll_call(x, logits, num_bins)
    if plain_eager((x, logits)):
        return _NllWithGradOfSum.apply(x, logits, num_bins)
    return _dmol_nll_with_grad_of_sum(x, logits, num_bins)[0]


def discretized_mix_logistic_nll(x: torch.Tensor, logits: torch.Tensor, num_bins: int = 256, reduction: str = "none", *, check_x: bool = True) -> torch.Tensor:
    """PixelCNN++'s discretized logistic mixture negative log-likelihood, fused.

    Args:
        x: ``(B, C, H, W)``, C in {1, 3}: floats in [-1, 1] (PixelCNN++'s convention;
            float16/bfloat16/float32/float64) or integer bins ``0..num_bins-1``
            (uint8/int32/int64), mapped to ``2*x/(num_bins-1) - 1``. Any strides.
        logits: ``(B, P, H, W)`` float32/float16/bfloat16 (float64 on the reference
            backend), P = 3K for C = 1 and 10K for C = 3, in PixelCNN++'s channel
            order (see :mod:`pixelcnn_kernels.reference.dmol`); any strides
            (channels-last and views are read in place).
        num_bins: quantization levels, 2..2000 (256 for 8-bit images).
        reduction: ``"none"`` -> ``(B, H, W)`` NLL in nats summed over channels;
            ``"sum"`` -> scalar total (what PixelCNN++'s loss returns); ``"mean"`` ->
            mean of the ``(B, H, W)`` values; ``"bpd"`` -> ``(B,)`` bits per dimension
            of each image, ``sum / (C*H*W*ln 2)``.

    Returns the loss in float32 (float64 for float64 logits); math runs in float32
    whatever the storage dtype. Differentiable w.r.t. ``logits``.

    Raises TypeError/ValueError naming the argument for a wrong dtype, shape, device,
    ``num_bins``, ``reduction`` or x out of range. The range check reads x's minimum
    and maximum on the host, which on a GPU waits for the work queued before it; it is
    skipped under ``torch.compile`` and CUDA-graph capture, and with ``check_x=False``
    (a training loop whose images are valid bins by construction; the drop-in models
    check their images' dtype and shape on the host and their bins on the device, with
    ``torch._assert_async``).
    """
    _check_nll_args(x, logits, num_bins, reduction, check_x)
    nll = _nll(x, logits, num_bins)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    channels, height, width = x.shape[1:]
    return nll.sum(dim=(1, 2)) / (channels * height * width * math.log(2))


# --------------------------------------------------------------------------- sampler


@custom_op("pixelcnn_kernels::dmol_sample")
def _dmol_sample(logits: torch.Tensor, u_mix: torch.Tensor, u_logistic: torch.Tensor, num_bins: int, quantize: bool) -> torch.Tensor:
    backend = _backend.resolve_kernel_backend(logits.dtype, "DMOL", logits, u_mix, u_logistic)
    if backend == "reference":
        return _reference.sample_discretized_mix_logistic(logits, u_mix, u_logistic, num_bins, quantize)
    u_mix, u_logistic = u_mix.to(torch.float32), u_logistic.to(torch.float32)
    if backend == "cuda":
        return _backend.cuda_ops().dmol_sample(logits, u_mix, u_logistic, num_bins, quantize)
    sample = logits.new_empty(u_logistic.shape, dtype=torch.float32)
    if sample.numel() > 0:
        from pixelcnn_kernels.triton import dmol as triton_dmol

        triton_dmol.sample(logits, u_mix, u_logistic, num_bins, quantize, sample)
    return sample


@_dmol_sample.register_fake
def _(logits, u_mix, u_logistic, num_bins, quantize):
    return logits.new_empty(u_logistic.shape, dtype=compute_dtype(logits.dtype))


def _sample_channels(logits: torch.Tensor, noise, channels: int | None) -> int:
    """The colour channel count: given, read from the noise, or inferred from P when unambiguous."""
    if channels is not None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        return channels
    if noise is not None:
        _, u_logistic = _noise_pair(noise)
        check_tensor(u_logistic, "noise[1] (u_logistic)", ndim=4, dtypes=(torch.float32,))
        if u_logistic.shape[1] not in (1, 3):
            raise ValueError(f"noise[1] (u_logistic) must have C = 1 or 3 channels, got shape {tuple(u_logistic.shape)}")
        return u_logistic.shape[1]
    fits = [c for c in (1, 3) if logits.shape[1] and logits.shape[1] % _reference.logits_per_mixture(c) == 0]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"logits must have P = 3K (C = 1) or 10K (C = 3) channels, got P = {logits.shape[1]}")
    raise ValueError(f"logits with P = {logits.shape[1]} channels fit both C = 1 (P = 3K) and C = 3 (P = 10K); pass channels=")


def _noise_pair(noise) -> tuple:
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise TypeError(f"noise must be a pair (u_mix, u_logistic) of tensors, got {type(noise).__name__}")
    return tuple(noise)


def _check_noise(noise, logits: torch.Tensor, mixtures: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise pair: float32 (or both float64, with float64 logits), of the draw's shapes."""
    u_mix, u_logistic = _noise_pair(noise)
    batch, _, height, width = logits.shape
    for index, u, expected in ((0, u_mix, (batch, mixtures, height, width)), (1, u_logistic, (batch, channels, height, width))):
        name = f"noise[{index}] ({('u_mix', 'u_logistic')[index]})"
        check_tensor(u, name, ndim=4, dtypes=(torch.float32,), allow_float64=logits.dtype == torch.float64)
        if tuple(u.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (B, {'KC'[index]}, H, W), got {tuple(u.shape)}")
    check_same_dtype(u_mix, "noise[0] (u_mix)", **{"noise[1] (u_logistic)": u_logistic})
    return u_mix, u_logistic


def sample_discretized_mix_logistic(
    logits: torch.Tensor,
    num_bins: int = 256,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    quantize: bool = True,
    *,
    channels: int | None = None,
) -> torch.Tensor:
    """Draws an image from PixelCNN++'s discretized logistic mixture.

    Picks a component per pixel by Gumbel-max, draws each colour channel from its
    logistic by the inverse CDF, adds the colour coefficients times the already
    drawn channels, and clamps to [-1, 1].

    Args:
        logits: ``(B, P, H, W)`` float32/float16/bfloat16 (float64 on the reference
            backend), any strides; P = 3K (C = 1) or 10K (C = 3), layout in
            :mod:`pixelcnn_kernels.reference.dmol`. ``(B, P, 1, 1)`` samples one pixel.
        num_bins: quantization levels, 2..2000.
        noise: ``(u_mix, u_logistic)``, float32 uniform noise in [0, 1] (float32 or float64
            with float64 logits, both the same): ``u_mix``
            ``(B, K, H, W)`` for the Gumbel-max choice ``argmax_k(logit_k - log(-log(u)))``,
            ``u_logistic`` ``(B, C, H, W)`` for ``mean + exp(log_scale) * (log(u) - log(1-u))``;
            both are clamped to [1e-5, 1 - 1e-5] as in PixelCNN++. The sample is a
            deterministic function of (logits, noise). None: drawn with ``generator``.
        generator: the random generator for the noise when ``noise`` is None.
        quantize: True rounds every channel to its nearest bin centre before it
            conditions the next one (an exact draw from the likelihood the NLL
            scores); False returns PixelCNN++'s continuous values.
        channels: C; by default taken from ``noise``, else from P (an error when P
            is a multiple of 30, which fits both).

    Returns ``(B, C, H, W)`` values in [-1, 1], float32 (float64 for float64 logits);
    :func:`to_bins` maps them to integer bins. Not differentiable. Non-finite logits
    draw as the reference does: NaN mixture logits pick the first NaN component (as
    ``torch.argmax``), a NaN value quantizes to bin 0's centre (-1) and stays NaN
    with ``quantize=False``, ±inf values clamp to ±1.
    """
    check_tensor(logits, "logits", ndim=4)
    channels = _sample_channels(logits, noise, channels)
    mixtures = _check_logits(logits, channels)
    num_bins = check_num_bins(num_bins)
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be a bool, got {type(quantize).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator must be on logits' device type ({logits.device.type}), got a {generator.device.type} generator")
    batch, _, height, width = logits.shape
    if noise is None:
        dtype = compute_dtype(logits.dtype)
        u_mix = torch.rand((batch, mixtures, height, width), generator=generator, device=logits.device, dtype=dtype)
        u_logistic = torch.rand((batch, channels, height, width), generator=generator, device=logits.device, dtype=dtype)
    else:
        u_mix, u_logistic = _check_noise(noise, logits, mixtures, channels)
        check_same_device(logits=logits, u_mix=u_mix, u_logistic=u_logistic)
    return _dmol_sample(logits.detach(), u_mix, u_logistic, num_bins, quantize)  # a draw has no gradient


def to_bins(values: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """Values in [-1, 1] (e.g. a sample) -> int64 bins ``0..num_bins-1``, nearest centre (halves round up; NaN: bin 0)."""
    check_tensor(values, "values")
    return _reference.to_bins(values, check_num_bins(num_bins))
