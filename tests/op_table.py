"""The op table shared by the cross-cutting tests (properties, bad inputs, determinism).

For every public op: how to draw its sizes (hypothesis), build valid inputs at
given sizes, call it and its reference, and compare the two with
:mod:`pixelcnn_kernels.testing`'s tolerance table. Also the hypothesis profiles:
``ci`` (the default: few, tiny examples, derandomized so that a CI run is
reproducible; the Triton kernels run in the interpreter) and ``gpu``
(``HYPOTHESIS_PROFILE=gpu``: more and larger examples on a GPU; the GPU check passes
the variable on, and runs ``ci``'s examples on the GPU when it is unset, to fit one call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import pixelcnn_kernels as pk
from pixelcnn_kernels.backend import use_backend
from pixelcnn_kernels.reference import dmol as dmol_reference
from pixelcnn_kernels.reference import gates as gates_reference
from pixelcnn_kernels.reference.masked_conv import GATES, masked_conv2d_gated_ref, masked_conv2d_ref
from pixelcnn_kernels.testing import tolerance

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Tests of the CUDA kernels: on the GPU, or without one the CUDA kernels built for the CPU (conftest.py).
CUDA_KERNELS = pytest.mark.gpu if HAS_CUDA else pytest.mark.cuda_on_cpu
CUDA = pytest.param("cuda", marks=CUDA_KERNELS)  # the cuda backend's cases
BACKENDS = ["reference", "triton", CUDA]

# --------------------------------------------------------------------------- profiles

# The examples draw every input from a seed of their own, so the conftest's
# function-scoped seeding fixture does not leak between examples. Derandomized:
# the same examples on every run, so no example database is kept.
_COMMON = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=10, **_COMMON)
settings.register_profile("gpu", max_examples=40, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE_SETTINGS = settings.get_profile(PROFILE)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest sizes a profile draws."""

    batch: int
    side: int
    channels: int
    mixtures: int
    dilation: int


LIMITS = {"ci": Limits(batch=2, side=5, channels=4, mixtures=3, dilation=2), "gpu": Limits(batch=4, side=33, channels=32, mixtures=10, dilation=4)}[PROFILE]


# --------------------------------------------------------------------------- the op table


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One public op: valid inputs at given sizes, the op and its reference on them.

    ``make(params, dtype, device, generator)`` returns the named inputs (tensors
    and options); ``run`` calls the public op and ``reference`` the pure-PyTorch
    reference on them. ``grad_inputs`` name the inputs that receive gradients,
    ``activations`` the 4-d inputs whose layout the tests vary. ``sums``: the
    outputs and gradients are long sums of products (convolutions), compared at
    the scale of the largest value; ``summed_grads``: the gradients that are such
    sums in an otherwise elementwise op (a bias broadcast over the pixels).
    ``float32_grad_slack``: a factor on the float32 gradient tolerance. ``draws``: the outputs are random draws, a discontinuous
    function of the inputs (the sampler): compared with the reference computing
    in float32 as the kernels do, and a draw at a tie may land elsewhere.
    """

    name: str
    params: Callable[[Limits], st.SearchStrategy]
    make: Callable[[dict, torch.dtype, torch.device, torch.Generator], dict[str, Any]]
    run: Callable[[dict[str, Any]], torch.Tensor]
    reference: Callable[[dict[str, Any]], torch.Tensor]
    grad_inputs: tuple[str, ...]
    activations: tuple[str, ...]
    sums: bool = False
    summed_grads: tuple[str, ...] = ()
    float32_grad_slack: float = 1.0
    draws: bool = False


def _randn(shape, generator, device, dtype, scale=1.0) -> torch.Tensor:
    """N(0, scale²) drawn in float64 on the CPU (the same values on every device), then cast."""
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def _rand(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


# gates ------------------------------------------------------------------------------


def _gate_params(limits: Limits, with_cond: bool) -> st.SearchStrategy:
    side = st.integers(1, limits.side)
    return st.fixed_dictionaries(
        dict(
            batch=st.integers(1, limits.batch), size=st.integers(1, limits.channels), height=side, width=side, last_dim=st.booleans(),
            cond=st.just(False) if not with_cond else st.booleans(),
            groups=st.sampled_from([1, 3]), unequal_groups=st.booleans(),  # the gates' colour groups, as the conv's
        )
    )


def _make_gate_inputs(params: dict, dtype, device, generator, split: bool) -> dict[str, Any]:
    """x (B, S, H, W) split along dim 1, or (B, H, W, S) split along dim -1; S = 2·size for the gates, size in
    ``groups`` colour groups (``groups`` and ``unequal_groups`` optional in ``params``)."""
    groups = params.get("groups", 1) if split else 1
    size = 2 * _grouped_channels(params["size"], groups, params.get("unequal_groups", False)) if split else params["size"]
    batch, height, width = params["batch"], params["height"], params["width"]
    shape = (batch, height, width, size) if params["last_dim"] else (batch, size, height, width)
    cond = _randn((batch, size), generator, device, dtype) if params["cond"] else None
    # N(0, 1), an activation's scale: at |x + cond| ~ 10 the float32 rounding of the sum
    # alone moves d/dx by ~1e-6, the float32 table's atol (extremes: test_gates.py).
    inputs = dict(x=_randn(shape, generator, device, dtype), dim=-1 if params["last_dim"] else 1, cond=cond)
    return inputs | {"groups": groups} if split else inputs


def _gate_case(name: str, op: Callable, reference: Callable) -> OpCase:
    return OpCase(
        name,
        lambda limits: _gate_params(limits, with_cond=True),
        lambda params, dtype, device, generator: _make_gate_inputs(params, dtype, device, generator, split=True),
        lambda a: op(a["x"], a["dim"], a["cond"], a["groups"]),
        lambda a: reference(a["x"], a["dim"], a["cond"], a["groups"]),
        grad_inputs=("x", "cond"),
        activations=("x",),
        summed_grads=("cond",),
    )


CONCAT_ELU = OpCase(
    "concat_elu",
    lambda limits: _gate_params(limits, with_cond=False),
    lambda params, dtype, device, generator: _make_gate_inputs(params, dtype, device, generator, split=False),
    lambda a: pk.concat_elu(a["x"], a["dim"]),
    lambda a: gates_reference.concat_elu(a["x"], a["dim"]),
    grad_inputs=("x",),
    activations=("x",),
)

# dmol -------------------------------------------------------------------------------

# Log-scales in [-4, 2]: below, float32 rounding of x - mean is amplified by up to
# e^7 in the gradient and even the float32 reference leaves the table (test_dmol.py).
LOG_SCALE_RANGE = (-4.0, 2.0)


def _dmol_params(limits: Limits, sampler: bool) -> st.SearchStrategy:
    side = st.integers(1, limits.side)
    fields = dict(
        batch=st.integers(1, limits.batch),
        height=side,
        width=side,
        channels=st.sampled_from([1, 3]),
        mixtures=st.integers(1, limits.mixtures),
        num_bins=st.sampled_from([2, 5, 32, 256]),
    )
    if sampler:
        fields["quantize"] = st.booleans()
    else:
        fields["x_dtype"] = st.sampled_from([torch.float32, torch.uint8, torch.int64])
        fields["coarse_logits"] = st.booleans()
    return st.fixed_dictionaries(fields)


def _make_logits(params: dict, dtype, device, generator) -> torch.Tensor:
    """(B, P, H, W) logits over the useful range: spread mixture logits, means around the data, bounded log-scales."""
    channels, mixtures = params["channels"], params["mixtures"]
    per_channel = dmol_reference.params_per_channel(channels)
    logits = torch.randn(params["batch"], mixtures * (1 + channels * per_channel), params["height"], params["width"], generator=generator, dtype=torch.float64)
    logits[:, :mixtures] *= 3
    low, high = LOG_SCALE_RANGE
    for c in range(channels):
        start = mixtures * (1 + c * per_channel)
        logits[:, start : start + mixtures] *= 0.7
        logits[:, start + mixtures : start + 2 * mixtures].uniform_(low, high, generator=generator)
    return logits.to(device=device, dtype=dtype)


def _make_nll_inputs(params: dict, dtype, device, generator) -> dict[str, Any]:
    num_bins, x_dtype = params["num_bins"], params["x_dtype"]
    if x_dtype == torch.uint8 and num_bins > 256:
        x_dtype = torch.int64
    bins = torch.randint(0, num_bins, (params["batch"], params["channels"], params["height"], params["width"]), generator=generator)
    bins[:1, :, :1, :1] = 0  # both edge bins in every example (slices: batch 0 has none)
    bins[-1:, :, -1:, -1:] = num_bins - 1
    x = dmol_reference.bins_to_values(bins, num_bins, torch.float32) if x_dtype == torch.float32 else bins.to(x_dtype)
    logits = _make_logits(params, dtype, device, generator)
    if params.get("coarse_logits"):
        # Quarters: with few bins, means fall on bin edges and log-scales on 0, where the likelihood's
        # stable form has its kinks (test_dmol.kink_logits); random logits never hit them exactly.
        logits = logits.double().mul(4).round().div(4).to(dtype)
    return dict(x=x.to(device), logits=logits, num_bins=num_bins)


def _make_sample_inputs(params: dict, dtype, device, generator) -> dict[str, Any]:
    batch, height, width = params["batch"], params["height"], params["width"]
    return dict(
        logits=_make_logits(params, dtype, device, generator),
        u_mix=_rand((batch, params["mixtures"], height, width), generator, device),
        u_logistic=_rand((batch, params["channels"], height, width), generator, device),
        num_bins=params["num_bins"],
        quantize=params["quantize"],
    )


DMOL_NLL = OpCase(
    "discretized_mix_logistic_nll",
    lambda limits: _dmol_params(limits, sampler=False),
    _make_nll_inputs,
    lambda a: pk.discretized_mix_logistic_nll(a["x"], a["logits"], a["num_bins"], a.get("reduction", "none")),
    lambda a: dmol_reference.discretized_mix_logistic_nll(a["x"], a["logits"], a["num_bins"]),
    grad_inputs=("logits",),
    activations=("x", "logits"),
    # test_dmol.py's gradient tolerance: float32 rounding of x - mean is amplified
    # by exp(-log_scale) in d/dmean, beyond the table even for the float32 reference.
    float32_grad_slack=10.0,
)

DMOL_SAMPLE = OpCase(
    "sample_discretized_mix_logistic",
    lambda limits: _dmol_params(limits, sampler=True),
    _make_sample_inputs,
    lambda a: pk.sample_discretized_mix_logistic(
        a["logits"], a["num_bins"], noise=(a["u_mix"], a["u_logistic"]), quantize=a["quantize"], channels=a["u_logistic"].shape[1]
    ),
    lambda a: dmol_reference.sample_discretized_mix_logistic(a["logits"], a["u_mix"], a["u_logistic"], a["num_bins"], a["quantize"]),
    grad_inputs=(),
    activations=("logits",),
    draws=True,
)

# masked convolutions ----------------------------------------------------------------

# (mask, kernel size): every named mask, and a random boolean 3x3 tensor ("custom").
CONV_MASKS = [
    ("A", (3, 3)),
    ("B", (3, 3)),
    ("B", (5, 5)),
    ("vertical", (3, 3)),
    ("vertical_A", (5, 5)),
    ("horizontal", (1, 3)),
    ("horizontal_A", (1, 5)),
    ("down_shifted", (2, 3)),
    ("down_right_shifted", (2, 2)),
    ("full", (1, 1)),
    ("full", (3, 3)),
    ("custom", (3, 3)),
]


def _conv_params(limits: Limits, gated: bool) -> st.SearchStrategy:
    side = st.integers(1, limits.side)
    return st.fixed_dictionaries(
        dict(
            batch=st.integers(1, limits.batch),
            height=side,
            width=side,
            in_channels=st.integers(1, limits.channels),
            out_channels=st.integers(1, limits.channels),
            mask=st.sampled_from(CONV_MASKS),
            custom_taps=st.lists(st.booleans(), min_size=9, max_size=9).filter(any),
            dilation=st.integers(1, limits.dilation),
            color_groups=st.sampled_from([1, 3]),  # gated: gate_groups too (Gated PixelCNN's colour gates)
            unequal_groups=st.booleans(),  # with colour groups, channels 3n - 1: groups of n, n, n - 1
            bias=st.booleans(),
            cond=st.just(False) if not gated else st.booleans(),
            addend=st.just(False) if not gated else st.booleans(),
            gate=st.sampled_from(GATES),
            residual=st.booleans(),
            concat_elu=st.booleans(),  # input_activation="concat_elu", with one colour group
        )
    )


def _make_conv_inputs(params: dict, dtype, device, generator, gated: bool) -> dict[str, Any]:
    """x ~ N(0, 1) and weight ~ N(0, 1/fan-in) as a trained conv's (outputs O(1)); channels scaled to the groups.

    ``residual``, ``addend``, ``concat_elu`` (the fused epilogue and input activation) and ``unequal_groups``
    are optional in ``params``.
    """
    (name, (kh, kw)), groups = params["mask"], params["color_groups"]
    mask = torch.tensor(params["custom_taps"]).view(3, 3) if name == "custom" else name
    c_in, c_out = (_grouped_channels(params[key], groups, params.get("unequal_groups", False)) for key in ("in_channels", "out_channels"))
    concat_elu = params.get("concat_elu", False) and groups == 1
    c_read = 2 * c_in if concat_elu else c_in  # the channels the convolution reads
    c_conv = 2 * c_out if gated else c_out  # the channels it writes, before the gate halves them
    batch, height, width = params["batch"], params["height"], params["width"]
    inputs = dict(
        x=_randn((batch, c_in, height, width), generator, device, dtype),
        weight=_randn((c_conv, c_read, kh, kw), generator, device, dtype, (c_read * kh * kw) ** -0.5),
        bias=_randn((c_conv,), generator, device, dtype) if params["bias"] else None,
        mask=mask,
        dilation=params["dilation"],
        color_groups=groups,
        residual=_randn((batch, c_out, height, width), generator, device, dtype) if params.get("residual", False) else None,
        input_activation="concat_elu" if concat_elu else None,
    )
    if gated:
        inputs.update(
            gate=params["gate"],
            gate_groups=groups,
            cond=_randn((batch, c_conv), generator, device, dtype) if params["cond"] else None,
            addend=_randn((batch, c_conv, height, width), generator, device, dtype) if params.get("addend", False) else None,
        )
    return inputs


def _grouped_channels(count: int, groups: int, unequal: bool) -> int:
    """``count`` channels per colour group; unequal: one fewer in the last group (where it keeps one)."""
    return groups * count - (unequal and groups > 1 and count > 1)


MASKED_CONV = OpCase(
    "masked_conv2d",
    lambda limits: _conv_params(limits, gated=False),
    lambda params, dtype, device, generator: _make_conv_inputs(params, dtype, device, generator, gated=False),
    lambda a: pk.masked_conv2d(**a),
    lambda a: masked_conv2d_ref(**a),
    grad_inputs=("x", "weight", "bias", "residual"),
    activations=("x",),
    sums=True,
)

MASKED_CONV_GATED = OpCase(
    "masked_conv2d_gated",
    lambda limits: _conv_params(limits, gated=True),
    lambda params, dtype, device, generator: _make_conv_inputs(params, dtype, device, generator, gated=True),
    lambda a: pk.masked_conv2d_gated(**a),
    lambda a: masked_conv2d_gated_ref(**a),
    grad_inputs=("x", "weight", "bias", "cond", "residual", "addend"),
    activations=("x",),
    sums=True,
)

OPS: dict[str, OpCase] = {
    case.name: case
    for case in (
        _gate_case("gate_tanh_sigmoid", pk.gate_tanh_sigmoid, gates_reference.gate_tanh_sigmoid),
        _gate_case("gate_sigmoid", pk.gate_sigmoid, gates_reference.gate_sigmoid),
        CONCAT_ELU,
        DMOL_NLL,
        DMOL_SAMPLE,
        MASKED_CONV,
        MASKED_CONV_GATED,
    )
}


# --------------------------------------------------------------------------- running an op

LAYOUTS = ("contiguous", "channels_last", "sliced")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout``: contiguous, channels-last, or a view of every other element of a wider tensor."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


def with_layout(inputs: dict[str, Any], case: OpCase, layout: str) -> dict[str, Any]:
    return {name: in_layout(v, layout) if name in case.activations else v for name, v in inputs.items()}


def in_float64(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs with every floating tensor in float64 (integer bins and options unchanged)."""
    return {name: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for name, v in inputs.items()}


def forward_backward(case: OpCase, inputs: dict[str, Any], grad_seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The op's output and the gradients of its ``grad_inputs`` (those present) for a random upstream gradient.

    The upstream gradient is rounded to bfloat16 precision, so that the op in any
    dtype and the reference in float64 get the same values.
    """
    leaves = {name: inputs[name].detach().requires_grad_(True) for name in case.grad_inputs if inputs.get(name) is not None}
    out = case.run({**inputs, **leaves})
    if not leaves:
        return out, {}
    generator = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(torch.bfloat16).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream)
    return out.detach(), dict(zip(leaves, grads))


def reference_forward_backward(case: OpCase, inputs: dict[str, Any], grad_seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`forward_backward` of the reference, in float64 (in the inputs' dtypes for draws)."""
    reference_case = dataclasses.replace(case, run=case.reference)
    return forward_backward(reference_case, inputs if case.draws else in_float64(inputs), grad_seed)


# The sampler's draws against the float32 reference: transcendental rounding differs
# between backends by a few ulps, amplified by the logistic's scale (test_dmol.py).
SAMPLE_TOLERANCE = (1e-5, 1e-5)
# A draw within rounding of a bin boundary (or of a tie between components) may land
# in the neighbouring bin, and move the later colour channels of its pixel with it:
# a ~1e-5 chance per value, so one such value in a thousand is allowed (none in
# fewer than a thousand: the CI examples must match exactly).
MOVED_DRAWS_PER_VALUE = 1e-3


def products_in_tf32(case: OpCase, got: torch.Tensor, backend: str | None) -> bool:
    """Whether ``got``'s fp32 convolution products may be TF32, as PyTorch's own are on the GPU:
    computed there, or by the CUDA kernels on the CPU (cuda_on_cpu emulates their tensor cores)."""
    return case.sums and torch.backends.cudnn.allow_tf32 and (got.is_cuda or backend == "cuda")


def assert_matches(case: OpCase, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, *, summed: bool | None = None, slack: float = 1.0, backend: str | None = None) -> None:
    """``got`` within the project's tolerance for ``dtype`` (times ``slack``) of ``expected`` (NaNs in the same places).

    Sums (``summed``, by default the case's ``sums``) are compared divided by the
    expected's largest magnitude: their rounding error grows with the terms, not
    with each (possibly cancelling) result. fp32 convolutions may use TF32
    (:func:`products_in_tf32`; ``backend``: the one that computed ``got``). Draws: see MOVED_DRAWS_PER_VALUE.
    """
    if case.draws:
        rtol, atol = SAMPLE_TOLERANCE
        close = torch.isclose(got.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=True)
        moved = int((~close).sum())
        assert moved <= int(MOVED_DRAWS_PER_VALUE * close.numel()), f"{case.name} {what}: {moved} of {close.numel()} draws differ"
        return
    rtol, atol = (slack * t for t in tolerance(dtype, tf32=products_in_tf32(case, got, backend)))
    got = got.to(expected.dtype)
    if case.sums if summed is None else summed:
        scale = expected.abs().max().clamp(min=1.0) if expected.numel() else 1.0
        got, expected = got / scale, expected / scale
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{case.name} {what}: {m}")


def check_against_reference(case: OpCase, backend: str | None, inputs: dict[str, Any], dtype: torch.dtype) -> None:
    """Runs ``case`` on ``backend`` (None: the automatic choice); checks its output and gradients against the reference.

    A float32 gradient of a case with ``float32_grad_slack`` may instead be as accurate as the reference's
    own in float32: off float64 by at most twice as much, at worst (see :func:`within_float32_references_error`).
    """
    with use_backend(backend) if backend is not None else contextlib.nullcontext():
        out, grads = forward_backward(case, inputs)
    expected, expected_grads = reference_forward_backward(case, inputs)
    assert_matches(case, out, expected, dtype, "output", backend=backend)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        slack = case.float32_grad_slack if dtype == torch.float32 else 1.0
        if slack != 1.0 and within_float32_references_error(case, inputs, name, grad, expected_grads[name]):
            continue
        assert_matches(case, grad, expected_grads[name], dtype, f"d/d{name}", summed=case.sums or name in case.summed_grads, slack=slack, backend=backend)


def within_float32_references_error(case: OpCase, inputs: dict[str, Any], name: str, grad: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether ``grad`` (float32) misses the float64 reference ``expected`` by at most twice the reference's own
    float32 gradient's worst miss, plus the float32 table's atol: where the gradient is ill-conditioned (DMOL's
    d/dmean amplifies the rounding of x - mean by exp(-log_scale)), the float32 reference misses by more than
    any fixed slack, and a kernel can do no better than it."""
    reference_case = dataclasses.replace(case, run=case.reference)
    _, float32_grads = forward_backward(reference_case, inputs)
    own_miss = (float32_grads[name].double() - expected).abs().max()
    miss = (grad.double() - expected).abs().max()
    return bool(miss <= 2 * own_miss + tolerance(torch.float32)[1])


def kernel_dtypes(backend: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in."""
    if backend == "reference":
        return [torch.float64, torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16]


CPU = torch.device("cpu")

# Valid inputs of every op: small, odd sizes; the rows break one thing in them.
VALID_PARAMS = {
    "gate_tanh_sigmoid": dict(batch=2, size=3, height=3, width=5, last_dim=False, cond=True),
    "concat_elu": dict(batch=2, size=3, height=3, width=5, last_dim=False, cond=False),
    "discretized_mix_logistic_nll": dict(batch=2, height=3, width=5, channels=3, mixtures=2, num_bins=256, x_dtype=torch.float32),
    "sample_discretized_mix_logistic": dict(batch=2, height=3, width=5, channels=3, mixtures=3, num_bins=256, quantize=True),
    "masked_conv2d": dict(
        batch=2, height=4, width=5, in_channels=3, out_channels=4, mask=("B", (3, 3)), custom_taps=[True] * 9, dilation=1, color_groups=1, bias=True, cond=False
    ),
}
VALID_PARAMS["gate_sigmoid"] = VALID_PARAMS["gate_tanh_sigmoid"]
VALID_PARAMS["masked_conv2d_gated"] = dict(VALID_PARAMS["masked_conv2d"], out_channels=3, cond=True, addend=True, gate="sigmoid")


def valid_inputs(name: str, device: torch.device = CPU, dtype: torch.dtype = torch.float32, **changes) -> dict[str, Any]:
    """Valid inputs of op ``name`` (sizes in VALID_PARAMS, overridden by ``changes``)."""
    return OPS[name].make(dict(VALID_PARAMS[name], **changes), dtype, device, torch.Generator().manual_seed(0))
