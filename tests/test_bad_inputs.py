"""The bad-input matrix (issue 8, item 3): every public op × every kind of bad input.

Each row either expects an exception of an exact type whose message names the
argument (or, for an unusable backend, the reason), raised before any kernel
runs, or checks the documented result (zero-size batches, non-finite values,
tensors above 2**31 elements). The README's "Bad input" table is this matrix.

Rows that raise run on CPU tensors everywhere (validation does not depend on
the device); result rows run on every available backend; rows that need a GPU
are marked ``gpu``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from op_table import DEVICE, OPS, assert_matches, check_against_reference, forward_backward, in_float64, reference_forward_backward, valid_inputs

import pixelcnn_kernels as pk
from pixelcnn_kernels import backend as backend_module
from pixelcnn_kernels.backend import BackendUnavailableError, use_backend
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.utils import DTypeError

GATES = ("gate_tanh_sigmoid", "gate_sigmoid")
CONVS = ("masked_conv2d", "masked_conv2d_gated")

# --------------------------------------------------------------------------- the rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One cell of the matrix.

    ``inputs(name)`` builds the bad inputs from valid ones; ``setup(monkeypatch)``
    changes the environment (a forced backend, a missing extension). ``error`` and
    ``match`` (a regex the message must match) for rows that raise; ``check(name,
    backend)`` for rows that return the documented result.
    """

    op: str
    kind: str
    inputs: Callable[[str], dict[str, Any]] | None = None
    error: type[Exception] | None = None
    match: str = ""
    setup: Callable[[pytest.MonkeyPatch], None] = lambda monkeypatch: None
    check: Callable[[str, str], None] | None = None
    marks: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.op}-{self.kind}"


def _replace(name: str, **changes) -> dict[str, Any]:
    """Valid inputs of ``name`` with some of them replaced."""
    return {**valid_inputs(name), **changes}


def _changed(arg: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[str], dict[str, Any]]:
    """Valid inputs with input ``arg`` passed through ``change``."""

    def inputs(name: str) -> dict[str, Any]:
        valid = valid_inputs(name)
        return {**valid, arg: change(valid[arg])}

    return inputs


def _forced(backend: str, cuda_extension_error: str | None = None, triton_import_error: str | None = None, interpret: bool = True):
    """A setup forcing ``backend`` through the environment (use_backend would refuse it up front)."""

    def setup(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(backend_module.ENV_VAR, backend)
        monkeypatch.setattr(backend_module, "_cuda_extension_error", lambda: cuda_extension_error)
        monkeypatch.setattr(backend_module, "_triton_import_error", lambda: triton_import_error)
        if not interpret:
            monkeypatch.setenv("TRITON_INTERPRET", "0")

    return setup


def _every_op(kind: str, error: type[Exception], match: str, setup) -> list[Row]:
    return [Row(name, kind, valid_inputs, error, match, setup) for name in OPS]


def _wrong_dtype_rows() -> list[Row]:
    ints = lambda t: t.to(torch.int32)  # noqa: E731
    rows = [Row(name, "wrong_dtype", _changed("x", ints), DTypeError, r"^x must have dtype") for name in (*GATES, "concat_elu", *CONVS)]
    rows += [Row(name, "wrong_dtype", _changed("logits", ints), DTypeError, r"^logits must have dtype") for name in ("discretized_mix_logistic_nll", "sample_discretized_mix_logistic")]
    rows += [Row(name, "mismatched_dtypes", _changed("cond", torch.Tensor.double), DTypeError, r"^cond must have x's dtype") for name in GATES]
    rows += [
        Row("masked_conv2d", "mismatched_dtypes", _changed("weight", torch.Tensor.half), DTypeError, r"^weight has dtype torch.float16 but x has"),
        Row("masked_conv2d_gated", "mismatched_dtypes", _changed("cond", torch.Tensor.double), DTypeError, r"^cond has dtype torch.float64 but x has"),
        Row("sample_discretized_mix_logistic", "mismatched_dtypes", _changed("u_mix", torch.Tensor.half), DTypeError, r"^noise\[0\] \(u_mix\) must have dtype float32"),
    ]
    return rows


# The second tensor of an op to put on another device (concat_elu has only one).
SECOND_TENSOR = {
    "gate_tanh_sigmoid": "cond",
    "gate_sigmoid": "cond",
    "discretized_mix_logistic_nll": "logits",
    "sample_discretized_mix_logistic": "u_logistic",
    "masked_conv2d": "weight",
    "masked_conv2d_gated": "cond",
}


def _device_rows() -> list[Row]:
    rows = []
    for name, second in SECOND_TENSOR.items():
        first = "logits" if name == "sample_discretized_mix_logistic" else "x"
        # A meta tensor runs the same device check as a CUDA one on a machine without a GPU.
        for device, marks in (("meta", ()), ("cuda", (pytest.mark.gpu,))):
            rows.append(
                Row(
                    name,
                    f"mismatched_devices_{device}",
                    _changed(second, lambda t, device=device: t.to(device)),
                    ValueError,
                    rf"^{second} is on {device}(:0)? but {first} is on cpu",
                    marks=marks,
                )
            )
    rows += _every_op("wrong_device_cuda", BackendUnavailableError, r"^cuda backend unavailable: the CUDA kernels need CUDA tensors, got tensors on cpu", _forced("cuda"))
    rows += _every_op(
        "wrong_device_triton", BackendUnavailableError, r"^triton backend unavailable: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1", _forced("triton", interpret=False)
    )
    return rows


def _shape_rows() -> list[Row]:
    one_fewer_dim = lambda t: t[0]  # noqa: E731
    return [
        *(Row(name, "wrong_rank", _changed("cond", one_fewer_dim), ValueError, r"^cond must have shape \(x.shape\[0\], x.shape\[dim\]\)") for name in GATES),
        Row("concat_elu", "wrong_rank", lambda name: _replace(name, x=torch.tensor(1.0)), ValueError, r"^dim=1 is out of range for a tensor with 0 dimensions"),
        Row("discretized_mix_logistic_nll", "wrong_rank", _changed("logits", one_fewer_dim), ValueError, r"^logits must have 4 dimensions"),
        Row("sample_discretized_mix_logistic", "wrong_rank", _changed("logits", one_fewer_dim), ValueError, r"^logits must have 4 dimensions"),
        Row("masked_conv2d", "wrong_rank", _changed("x", one_fewer_dim), ValueError, r"^x must have 4 dimensions"),
        Row("masked_conv2d_gated", "wrong_rank", _changed("cond", one_fewer_dim), ValueError, r"^cond must have 2 dimensions"),
        *(Row(name, "shape_mismatch", _changed("cond", lambda t: t[:, :-1]), ValueError, r"^cond must have shape") for name in (*GATES, "masked_conv2d_gated")),
        Row(
            "discretized_mix_logistic_nll",
            "shape_mismatch",
            _changed("logits", lambda t: t[:, :, :2]),
            ValueError,
            r"^x \(2, 3, 3, 5\) and logits \(2, 20, 2, 5\) must have the same batch size, height and width",
        ),
        Row("sample_discretized_mix_logistic", "shape_mismatch", _changed("u_mix", lambda t: t[:, :2]), ValueError, r"^noise\[0\] \(u_mix\) must have shape \(2, 3, 3, 5\)"),
        Row("masked_conv2d", "shape_mismatch", _changed("x", lambda t: t[:, :2]), ValueError, r"^x has 2 channels but weight expects 3"),
        *(Row(name, "zero_size_image", _changed("x", lambda t: t[:, :, :0]), ValueError, r"^x must have a height and width >= 1") for name in CONVS),
    ]


def _option_rows() -> list[Row]:
    """Unsupported argument values: mask/dilation combinations of the convolutions, num_bins/reduction, dim."""
    even_kernel = _changed("weight", lambda t: t[:, :, :2, :2])
    return [
        *(Row(name, "unsupported_option", lambda name: _replace(name, dim=4), ValueError, r"^dim=4 is out of range") for name in (*GATES, "concat_elu")),
        Row("discretized_mix_logistic_nll", "unsupported_option", lambda name: _replace(name, num_bins=1), ValueError, r"^num_bins must be in \[2, 2000\]"),
        Row("sample_discretized_mix_logistic", "unsupported_option", lambda name: _replace(name, num_bins=2001), ValueError, r"^num_bins must be in \[2, 2000\]"),
        *(Row(name, "unsupported_option", even_kernel, ValueError, r"^mask 'B' needs odd kernel sizes, got kernel_size=\(2, 2\)") for name in CONVS),
        *(Row(name, "unsupported_option", lambda name: _replace(name, dilation=0), ValueError, r"^dilation must be >= 1") for name in CONVS),
        Row("masked_conv2d", "unsupported_option", lambda name: _replace(name, mask="horizontal"), ValueError, r"^mask 'horizontal' is a 1×k mask"),
        *(Row(name, "unsupported_option", lambda name: _replace(name, mask=torch.ones(3, 3, dtype=torch.bool, device="meta")), ValueError, r"^mask must hold values") for name in CONVS),
        Row("masked_conv2d", "shape_mismatch", _changed("weight", lambda t: t[:, :, :0]), ValueError, r"^weight must have .* a kernel of at least 1×1, got shape \(4, 3, 0, 3\)"),
        Row("masked_conv2d", "unsupported_option", lambda name: _replace(name, color_groups=3), ValueError, r"^weight.shape\[0\] \(output channels\)=4 leaves a colour group empty"),
        Row("masked_conv2d_gated", "unsupported_option", lambda name: _replace(name, color_groups=3), ValueError, r"^color_groups=3 needs gate_groups=3"),
    ]


def _huge_pixel_count(name):
    """Expanded (no memory) inputs with 2**31 + 2**16 pixels: the kernels index pixels with 32 bits."""
    inputs = valid_inputs(name)
    return {k: v[:1, :, :1, :1].expand(-1, -1, 2**16, 2**15 + 1) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _non_finite_x(name):
    inputs = valid_inputs(name)
    inputs["x"][0, 0, 1, 1] = float("nan")
    return inputs


def _backend_rows() -> list[Row]:
    return [
        *_every_op(
            "missing_extension",
            BackendUnavailableError,
            r"^cuda backend unavailable: extension failed to load: simulated",
            _forced("cuda", cuda_extension_error="extension failed to load: simulated"),
        ),
        *_every_op(
            "triton_absent",
            BackendUnavailableError,
            r"^triton backend unavailable: triton is not installed \(simulated\)",
            _forced("triton", triton_import_error="triton is not installed (simulated)"),
        ),
        # float64 is the reference's (an automatic choice runs it there: test_backend.py); a forced kernel backend refuses it.
        *(
            Row(name, "float64_forced_triton", lambda name: valid_inputs(name, DEVICE, dtype=torch.float64), BackendUnavailableError,
                r"^triton backend unavailable: its [-\w]+ kernels take float32, float16 or bfloat16, got float64", _forced("triton"))
            for name in OPS
        ),
    ]


# --------------------------------------------------------------------------- result rows


def _run_on(name: str, backend: str, inputs: dict[str, Any]):
    with use_backend(backend):
        return forward_backward(OPS[name], inputs)


def check_zero_size_batch(name: str, backend: str) -> None:
    """Batch 0: outputs and gradients of the right (empty) shapes; a weight's gradient is exactly zero."""
    inputs = valid_inputs(name, DEVICE, batch=0) if name != "masked_conv2d_gated" else valid_inputs(name, DEVICE, batch=0, cond=False)
    out, grads = _run_on(name, backend, inputs)
    expected, expected_grads = reference_forward_backward(OPS[name], inputs)
    assert out.shape == expected.shape and out.shape[0] == 0
    for arg, grad in grads.items():
        assert grad.shape == inputs[arg].shape, arg
        assert torch.equal(grad.double(), expected_grads[arg]), arg  # empty, or the exact zeros of a weight or bias


def check_meta_tensors(name: str, backend: str) -> None:
    """Meta tensors (shapes, no data) give the reference's output shape on the meta device, whatever backend is forced."""
    inputs = valid_inputs(name)
    with use_backend(backend):
        out = OPS[name].run({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    expected = OPS[name].run(inputs)
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype


def check_gate_non_finite(name: str, backend: str) -> None:
    """NaN and ±inf in x give what the reference gives, element by element (NaN where it has NaN)."""
    inputs = valid_inputs(name, DEVICE)
    inputs["x"].view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    with use_backend(backend):
        out = OPS[name].run(inputs)
    expected = OPS[name].reference(in_float64(inputs))
    assert_matches(OPS[name], out, expected, torch.float32, "output")


def check_nll_non_finite(name: str, backend: str) -> None:
    """NaN logits make exactly their pixel's NLL NaN, like the reference; ±inf logits affect only their pixel,
    whose NLL is finite where the reference's is (another component carries the pixel, or tanh(inf) = 1).

    The reference gives +inf where an infinite mean or log-scale makes the bin's
    probability 0; the kernels may give NaN there (both non-finite, see the README).
    """
    case = OPS[name]
    inputs = valid_inputs(name, DEVICE)
    logits = inputs["logits"]
    # K = 2: channels 0-1 mixture logits, then red's means 2-3, log-scales 4-5, coefficients 6-7, ...
    logits[0, 0, 0, 0] = float("nan")  # a mixture logit
    logits[1, 2, 2, 3] = float("nan")  # a mean
    logits[0, 4, 1, 2] = float("inf")  # a log-scale
    logits[1, 3, 0, 4] = float("-inf")  # a mean
    logits[0, 6, 2, 1] = float("inf")  # a coefficient: tanh(inf) = 1, a finite loss
    with use_backend(backend):
        nll = case.run(inputs)
    expected = case.reference(in_float64(inputs))
    poisoned = torch.zeros_like(expected, dtype=torch.bool)
    poisoned[0, 0, 0] = poisoned[1, 2, 3] = poisoned[0, 1, 2] = poisoned[1, 0, 4] = poisoned[0, 2, 1] = True
    assert not (~expected.isfinite() & ~poisoned).any()  # the other pixels are untouched
    assert torch.equal(nll.isfinite(), expected.isfinite())
    assert nll[expected.isnan()].isnan().all()
    finite = expected.isfinite()
    assert_matches(case, nll[finite], expected[finite], torch.float32, "finite pixels")


def check_sample_non_finite(name: str, backend: str) -> None:
    """NaN logits (every mixture logit of one pixel, a mean of another) draw as the reference does.

    All-NaN mixture logits pick the first component (torch.argmax's first NaN); the
    pixel is the last one, where a component index >= K would read past the end of
    the logits (compute-sanitizer sees that in the GPU check). A NaN red draw
    quantizes to bin 0, and green and blue are drawn given it.
    """
    case = OPS[name]
    inputs = valid_inputs(name, DEVICE)
    inputs["logits"][-1, :3, -1, -1] = float("nan")  # K = 3 mixture logits: none is a valid choice
    inputs["logits"][0, 3:6, 0, 0] = float("nan")  # red's means
    with use_backend(backend):
        sample = case.run(inputs)
    expected = case.reference(inputs)
    assert sample.shape == expected.shape and not sample.isnan().any()
    assert (sample[0, 0, 0, 0] == -1).item()
    assert_matches(case, sample, expected, torch.float32, "draws")


def _nan_reach(inputs: dict[str, Any], dense: bool) -> torch.Tensor:
    """Boolean (N, H, W): the outputs whose taps (every tap of the kernel when ``dense``, else the active ones) read a NaN of x."""
    weight = inputs["weight"]
    spec = resolve_mask(inputs["mask"], tuple(weight.shape[2:]), inputs["color_groups"])
    taps = torch.ones(spec.kernel_size, dtype=torch.bool) if dense else spec.tap_mask()
    top, bottom, left, right = spec.padding(inputs["dilation"])
    nan_pixels = F.pad(inputs["x"].isnan().any(dim=1, keepdim=True).double(), (left, right, top, bottom))
    return F.conv2d(nan_pixels, taps.double()[None, None].to(weight.device), dilation=inputs["dilation"])[:, 0] > 0


def check_conv_non_finite(name: str, backend: str) -> None:
    """A NaN in x makes NaN exactly the outputs whose taps read it; every other output is the reference's.

    The kernels read only the active taps; the reference backend is a dense
    convolution, whose masked-out taps (weight 0) still turn NaN · 0 into NaN.
    """
    case = OPS[name]
    inputs = _non_finite_x(name)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with use_backend(backend):
        out = case.run(inputs)
    reach = _nan_reach(inputs, dense=backend == "reference")
    assert torch.equal(out.isnan(), reach[:, None].expand_as(out)), "NaN outputs"
    finite_inputs = {**inputs, "x": inputs["x"].nan_to_num(0.0)}
    expected = case.reference(in_float64(finite_inputs))
    assert_matches(case, out[~out.isnan()], expected[~out.isnan()], torch.float32, "outputs that do not read the NaN")


def check_gate_sigmoid_beyond_2_31(name: str, backend: str) -> None:
    """x (1, 2, 2**30 + 96) bf16: b and dx pass element 2**31; the tails of y and dx match the reference."""
    length, tail = 2**30 + 96, slice(-256, None)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 2, length, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    with use_backend(backend):
        y = pk.gate_sigmoid(x, 1)
    upstream = torch.randn(y.shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    (dx,) = torch.autograd.grad(y, x, upstream)
    x_tail = x.detach()[..., tail].double().requires_grad_(True)
    y_tail = OPS[name].reference(dict(x=x_tail, dim=1, cond=None))
    (dx_tail,) = torch.autograd.grad(y_tail, x_tail, upstream[..., tail].double())
    assert_matches(OPS[name], y.detach()[..., tail], y_tail.detach(), torch.bfloat16, "y tail")
    assert_matches(OPS[name], dx[..., tail], dx_tail, torch.bfloat16, "d/dx tail")


def check_gated_conv_beyond_2_31(name: str, backend: str) -> None:
    """bf16 x (513, 16, 512, 512), channels-last: 2.15e9 elements; the last image (past 2**31) matches the reference."""
    batch, channels, size = 513, 16, 512
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, device="cuda", dtype=torch.bfloat16, generator=generator) / 12
    cond = torch.randn(batch, channels, device="cuda", dtype=torch.bfloat16, generator=generator)
    inputs = dict(x=x, weight=weight, bias=None, mask="B", dilation=1, color_groups=1, gate="tanh_sigmoid", cond=cond)
    assert x.numel() > 2**31
    with use_backend(backend), torch.no_grad():
        out = OPS[name].run(inputs)
    expected = OPS[name].reference(in_float64(dict(inputs, x=x[-1:], cond=cond[-1:])))
    assert_matches(OPS[name], out[-1:], expected, torch.bfloat16, "last image")


def check_sample_beyond_2_31(name: str, backend: str) -> None:
    """bf16 logits (8, 30, 3000, 3000), 2.16e9 elements (C = 3, K = 3): the last rows' draws match the reference.

    Their blue parameters sit past element 2**31 of the logits.

    Compared as bins: float32 transcendental rounding may move a draw at a bin
    boundary, so at least 99.9% must agree (wrong offsets agree nowhere).
    """
    batch, height, width = 8, 3000, 3000
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, 30, height, width, device="cuda", dtype=torch.bfloat16, generator=generator)
    noise = [torch.rand(batch, 3, height, width, device="cuda", generator=generator) for _ in range(2)]
    inputs = dict(logits=logits, u_mix=noise[0], u_logistic=noise[1], num_bins=256, quantize=True)
    assert logits.numel() > 2**31
    with use_backend(backend):
        sample = OPS[name].run(inputs)
    tail = {k: v[-1:, :, -3:] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    expected = OPS[name].reference(tail)
    agreement = (pk.to_bins(sample[-1:, :, -3:]) == pk.to_bins(expected)).double().mean().item()
    assert agreement >= 0.999, agreement


def check_automatic_without_extension(name: str, backend: str) -> None:
    """CUDA tensors with the extension missing: the automatic choice runs Triton, with the reference's result."""
    check_against_reference(OPS[name], None, valid_inputs(name, DEVICE), torch.float32)


ALL_BACKENDS = ("reference", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")
GPU = (pytest.mark.gpu,)


def _result_rows() -> list[Row]:
    non_finite = {**dict.fromkeys((*GATES, "concat_elu"), check_gate_non_finite), "discretized_mix_logistic_nll": check_nll_non_finite}
    non_finite.update({"sample_discretized_mix_logistic": check_sample_non_finite, **dict.fromkeys(CONVS, check_conv_non_finite)})
    rows = [Row(name, "zero_size_batch", check=check_zero_size_batch) for name in OPS]
    rows += [Row(name, "meta_tensors", check=check_meta_tensors) for name in OPS]
    rows += [Row(name, "non_finite", check=check) for name, check in non_finite.items()]
    rows += [
        Row("gate_sigmoid", "over_2_31_elements", check=check_gate_sigmoid_beyond_2_31, marks=GPU),
        Row("masked_conv2d_gated", "over_2_31_elements", check=check_gated_conv_beyond_2_31, marks=GPU),
        Row("sample_discretized_mix_logistic", "over_2_31_elements", check=check_sample_beyond_2_31, marks=GPU),
    ]
    missing = lambda monkeypatch: monkeypatch.setattr(backend_module, "_cuda_extension_error", lambda: "extension failed to load: simulated")  # noqa: E731
    rows += [Row(name, "missing_extension_automatic", setup=missing, check=check_automatic_without_extension, marks=GPU) for name in OPS]
    return rows


ERROR_ROWS = [
    *_wrong_dtype_rows(),
    *_device_rows(),
    *_shape_rows(),
    *_option_rows(),
    Row("discretized_mix_logistic_nll", "unsupported_option", lambda name: _replace(name, reduction="max"), ValueError, r"^reduction must be one of"),
    Row("discretized_mix_logistic_nll", "non_finite", _non_finite_x, ValueError, r"^x must hold values in \[-1, 1\]; got min nan"),
    *(
        Row(name, "over_2_31_elements", _huge_pixel_count, ValueError, r"^logits has 2147549184 pixels; at most 2\*\*31 - 1")
        for name in ("discretized_mix_logistic_nll", "sample_discretized_mix_logistic")
    ),
    *_backend_rows(),
]
RESULT_ROWS = _result_rows()


def test_a_wrong_dtype_is_a_type_error_and_a_value_error():
    """Both ways of catching a bad argument catch it: ``except TypeError`` and the issues' ``ValueError``."""
    assert issubclass(DTypeError, TypeError) and issubclass(DTypeError, ValueError)


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id, marks=row.marks) for row in ERROR_ROWS])
def test_bad_input_raises_naming_the_argument(row: Row, monkeypatch):
    row.setup(monkeypatch)
    inputs = row.inputs(row.op)
    with pytest.raises(row.error, match=row.match) as raised:
        OPS[row.op].run(inputs)
    assert type(raised.value) is row.error


# Small rows that compute-sanitizer runs (memcheck, racecheck) in the GPU check, on
# the cuda backend and, as extra GPU-only cases, on the triton backend.
SANITIZED = {("sample_discretized_mix_logistic", "non_finite"), ("masked_conv2d", "non_finite"), ("masked_conv2d", "zero_size_batch"), ("discretized_mix_logistic_nll", "zero_size_batch")}


def _result_params():
    params = []
    for row in RESULT_ROWS:
        backends = ("automatic",) if row.kind == "missing_extension_automatic" else KERNEL_BACKENDS if row.kind == "over_2_31_elements" else ALL_BACKENDS
        for backend in backends:
            marks = row.marks
            if backend == "cuda" and not marks:
                marks = GPU + ((pytest.mark.sanitize,) if (row.op, row.kind) in SANITIZED else ())
            params.append(pytest.param(row, backend, id=f"{row.id}-{backend}", marks=marks))
        if (row.op, row.kind) in SANITIZED:
            params.append(pytest.param(row, "triton", id=f"{row.id}-triton-sanitized", marks=GPU + (pytest.mark.sanitize,)))
    return params


@pytest.mark.parametrize("row, backend", _result_params())
def test_bad_input_gives_the_documented_result(row: Row, backend: str, monkeypatch):
    row.setup(monkeypatch)
    row.check(row.op, backend)
