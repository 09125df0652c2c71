"""Plain eager calls of the ops skip torch.library's dispatch; everything else goes through it.

:func:`pixelcnn_kernels.ops.registration.eager_fast_path` runs an op's own implementation under an
autograd.Function made of its registered autograd. These tests check that it gives the
custom op's outputs and gradients bit for bit (every op, both CPU-testable backends, and
on the GPU every backend; also under autocast, which neither path applies inside an
op), that plain eager calls take it (and the backward's ops with them), and that what
needs the custom op still gets it: dispatch and torch-function modes, fake tensors,
torch.compile, jit tracing, the profiler, forward AD and a backward that records a graph.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Optional

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from op_table import CUDA, DEVICE, OPS, forward_backward, valid_inputs
from torch import Tensor
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

import pixelcnn_kernels as pk
from pixelcnn_kernels.backend import use_backend
from pixelcnn_kernels.masks import resolve_mask
from pixelcnn_kernels.ops.registration import custom_op
from pixelcnn_kernels.testing import CountedCustomOps

# The ops with a gradient (the sampler has none).
DIFFERENTIABLE = [name for name, case in OPS.items() if case.grad_inputs]
BACKENDS = ["reference", "triton", CUDA]


class _PassThroughFunctionMode(TorchFunctionMode):
    """A torch-function mode that changes nothing (as ``with torch.device(...)``'s, it takes calls off the fast path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    """A tensor subclass that intercepts nothing: it only takes the call off the fast path."""


@contextlib.contextmanager
def _custom_op_calls():
    """Counts the calls of the package's torch.library custom ops (the fast path calls none) in the block."""
    counts = collections.Counter()
    original = CustomOpDef.__call__

    def counted(op, *args, **kwargs):
        if op._namespace == "pixelcnn_kernels":
            counts[op._name] += 1
        return original(op, *args, **kwargs)

    CustomOpDef.__call__ = counted
    try:
        yield counts
    finally:
        CustomOpDef.__call__ = original


def _through_the_custom_op(inputs: dict) -> dict:
    """``inputs`` with the activations as :class:`_Subclass`: a plain call then goes through torch.library."""
    return {name: v.as_subclass(_Subclass) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 4 else v for name, v in inputs.items()}


def _assert_same(fast, through_op) -> None:
    (fast_out, fast_grads), (op_out, op_grads) = fast, through_op
    assert fast_out.dtype == op_out.dtype and torch.equal(fast_out, op_out.as_subclass(torch.Tensor))
    assert fast_grads.keys() == op_grads.keys() and fast_grads
    for arg, grad in op_grads.items():
        assert torch.equal(fast_grads[arg], grad.as_subclass(torch.Tensor)), f"d/d{arg}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_fast_path_gives_the_custom_ops_outputs_and_gradients(name, backend):
    inputs = valid_inputs(name, DEVICE)
    with use_backend(backend):
        fast = forward_backward(OPS[name], inputs)
        with _custom_op_calls() as calls:
            through_op = forward_backward(OPS[name], _through_the_custom_op(inputs))
    assert calls, "the subclass should have sent the call through the custom op"
    _assert_same(fast, through_op)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_no_path_applies_autocast_inside_an_op(name, backend):
    """float32 inputs under bfloat16 autocast: float32 results on both paths, as the fakes say (the reference's F.conv2d would be cast)."""
    inputs = valid_inputs(name, DEVICE)
    with use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fast = forward_backward(OPS[name], inputs)
        through_op = forward_backward(OPS[name], _through_the_custom_op(inputs))
    assert fast[0].dtype != torch.bfloat16
    _assert_same(fast, through_op)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_plain_eager_calls_skip_the_custom_ops_forward_and_backward(name):
    inputs = valid_inputs(name, DEVICE)
    with use_backend("triton"):
        with _custom_op_calls() as fast_calls:
            forward_backward(OPS[name], inputs)
        with _custom_op_calls() as op_calls:
            forward_backward(OPS[name], _through_the_custom_op(inputs))
    assert not fast_calls
    # Through torch.library: the forward's op and the backward's, or for the DMOL NLL one op whose
    # pass also writes the gradient (its backward scales it: an aten multiply).
    assert any("backward" in op or "grad" in op for op in op_calls), op_calls
    assert len(op_calls) >= 2 or set(op_calls) == {"dmol_nll_with_grad_of_sum"}, op_calls


@pytest.mark.parametrize(
    "context, in_backward",
    [
        pytest.param(lambda: CountedCustomOps(), True, id="dispatch_mode"),
        # Torch-function modes are not active in the backward pass, so no mode sees its ops there.
        pytest.param(lambda: _PassThroughFunctionMode(), False, id="torch_function_mode"),
        pytest.param(lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), True, id="profiler"),
        pytest.param(lambda: forward_ad.dual_level(), True, id="forward_ad"),
    ],
)
def test_modes_the_profiler_and_forward_ad_see_the_custom_ops(context, in_backward):
    inputs = valid_inputs("masked_conv2d_gated")
    with use_backend("reference"), context(), _custom_op_calls() as calls:
        forward_backward(OPS["masked_conv2d_gated"], inputs)
    assert calls["masked_conv2d_gated"] == 1, calls
    assert calls["gate_tanh_sigmoid_backward"] + calls["gate_sigmoid_backward"] == int(in_backward), calls


def test_jit_trace_records_the_custom_op():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with use_backend("triton"):
        traced = torch.jit.trace(lambda t: pk.gate_sigmoid(t, 1), (x,))
        assert "pixelcnn_kernels::gate_sigmoid" in str(traced.graph)
        assert torch.equal(traced(x), pk.gate_sigmoid(x, 1))


def test_fake_tensors_reach_the_fake_implementations():
    """On the triton backend: an implementation run on fake CPU tensors would launch the interpreter on them and fail."""
    spec = resolve_mask("B", 3)  # resolved outside: a named mask is resolved on small real tensors
    with use_backend("triton"), FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 4, 3, 3))
        weight = mode.from_tensor(torch.randn(6, 4, 3, 3, requires_grad=True))
        out = pk.masked_conv2d_gated(x, weight, None, spec)
        gated = pk.gate_sigmoid(x, 1)
    assert out.shape == (2, 3, 3, 3) and gated.shape == (2, 2, 3, 3)
    assert isinstance(out, FakeTensor) and isinstance(gated, FakeTensor)


def test_compiled_calls_keep_the_custom_ops_in_the_graph():
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def fn(x, cond):
        return pk.gate_tanh_sigmoid(pk.concat_elu(x), 1, cond)

    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 6)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x, cond), fn(x, cond))
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert {"pixelcnn_kernels.concat_elu.default", "pixelcnn_kernels.gate_tanh_sigmoid.default"} <= targets, targets


def test_a_backward_recording_a_graph_calls_the_backward_ops_as_custom_ops():
    """With create_graph the backward's ops run with grad enabled: through torch.library, as before the fast path."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with use_backend("reference"):
        y = pk.gate_sigmoid(x, 1)
        with _custom_op_calls() as calls:
            torch.autograd.grad(y.sum(), x, create_graph=True)
    assert calls == {"gate_sigmoid_backward": 1}


def test_custom_op_infers_the_schema_from_the_implementations_own_module():
    """This module's string annotations name Tensor and Optional, which pixelcnn_kernels.utils does not import."""

    def add_if_given(x: Tensor, y: Optional[Tensor]) -> Tensor:
        return x.clone() if y is None else x + y

    op = custom_op("pixelcnn_kernels_tests::add_if_given")(add_if_given)
    assert str(op._opoverload._schema).endswith("(Tensor x, Tensor? y) -> Tensor")
    assert torch.equal(op(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
