"""Plain eager calls of the ops skip torch.library's dispatch; everything else goes through it.

:func:`pixelcnn_kernels.utils.eager_fast_path` runs an op's own implementation under an
autograd.Function made of its registered autograd. These tests check that it gives the
custom op's outputs and gradients bit for bit (every op, both CPU-testable backends, and
on the GPU every backend), that plain eager calls take it (and the backward's ops with
them), and that what needs the custom op still gets it: a dispatch mode, fake tensors,
torch.compile and a backward that records a graph.
"""

from __future__ import annotations

import collections

import pytest
import torch
from op_table import DEVICE, OPS, forward_backward, valid_inputs
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import pixelcnn_kernels as pk
from pixelcnn_kernels.backend import use_backend
from pixelcnn_kernels.masks import resolve_mask

# The ops with a gradient (the sampler has none).
DIFFERENTIABLE = [name for name, case in OPS.items() if case.grad_inputs]
BACKENDS = ["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


class _DispatchedOps(TorchDispatchMode):
    """Counts the package's custom ops that reach the dispatcher (being a mode, it sends every call there)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pixelcnn_kernels":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))


def _profiled_op_names(fn) -> set[str]:
    """The package's custom ops that the dispatcher ran during ``fn()`` (the profiler records them without intercepting)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return {event.name for event in profile.events() if event.name.startswith("pixelcnn_kernels::")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_fast_path_gives_the_custom_ops_outputs_and_gradients(name, backend):
    inputs = valid_inputs(name, DEVICE)
    with use_backend(backend):
        fast_out, fast_grads = forward_backward(OPS[name], inputs)
        with _DispatchedOps() as dispatched:
            op_out, op_grads = forward_backward(OPS[name], inputs)
    assert dispatched.calls, "the mode should have sent the call through the custom op"
    assert torch.equal(fast_out, op_out)
    assert fast_grads.keys() == op_grads.keys() and fast_grads
    for arg, grad in op_grads.items():
        assert torch.equal(fast_grads[arg], grad), f"d/d{arg}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_fast_path_runs_without_autocast_as_the_custom_op_does(name, backend):
    """float32 inputs under bfloat16 autocast: the op's inner ops are not cast (the reference's F.conv2d would be)."""
    inputs = valid_inputs(name)
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out, fast_grads = forward_backward(OPS[name], inputs)
        with _DispatchedOps():
            op_out, op_grads = forward_backward(OPS[name], inputs)
    assert fast_out.dtype == op_out.dtype and torch.equal(fast_out, op_out)
    for arg, grad in op_grads.items():
        assert torch.equal(fast_grads[arg], grad), f"d/d{arg}"


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_plain_eager_calls_skip_the_dispatcher_forward_and_backward(name):
    inputs = valid_inputs(name)
    with use_backend("triton"):
        assert _profiled_op_names(lambda: forward_backward(OPS[name], inputs)) == set()
        with _DispatchedOps():  # the same calls through the dispatcher, which the profiler records
            dispatched = _profiled_op_names(lambda: forward_backward(OPS[name], inputs))
    assert any("backward" in op or "grad" in op for op in dispatched) and len(dispatched) >= 2, dispatched


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
        names = _profiled_op_names(lambda: torch.autograd.grad(y.sum(), x, create_graph=True))
    assert names == {"pixelcnn_kernels::gate_sigmoid_backward"}
