"""Backend selection: defaults, forcing, and the errors that say why."""

import threading
import types

import pytest
import torch

import pixelcnn_kernels
from pixelcnn_kernels import backend, extension_sources
from pixelcnn_kernels.backend import BackendUnavailableError, forced_backend, resolve_backend, use_backend


def test_cpu_tensors_default_to_reference():
    assert resolve_backend(torch.randn(2)) == "reference"


def test_none_entries_are_ignored():
    assert resolve_backend(torch.randn(2), None) == "reference"


def test_use_backend_as_context_manager_restores_previous_choice():
    with use_backend("reference"):
        assert backend.forced_backend() == "reference"
        with use_backend("triton"):
            assert resolve_backend(torch.randn(2)) == "triton"  # tests run Triton in the interpreter on CPU
        assert backend.forced_backend() == "reference"
    assert backend.forced_backend() is None


def test_use_backend_as_plain_call_stays_in_force_until_reset():
    pixelcnn_kernels.use_backend("triton")
    try:
        assert resolve_backend(torch.randn(2)) == "triton"
    finally:
        pixelcnn_kernels.use_backend(None)
    assert backend.forced_backend() is None


def test_a_forced_backend_holds_on_every_thread():
    """autograd runs a CUDA backward on its own device threads: they see the backend forced around it."""
    seen = []
    with use_backend("reference"):
        worker = threading.Thread(target=lambda: seen.append(forced_backend()))
        worker.start()
        worker.join()
    assert seen == ["reference"] and forced_backend() is None


def test_contexts_left_in_any_order_end_with_the_choice_before_them():
    """Two threads' contexts, the first entered left first: the second's choice holds until it leaves, then the automatic one."""
    first = use_backend("reference")
    second = use_backend("triton") if backend.unavailable_reason("triton") is None else use_backend("reference")
    with first:
        second.__enter__()
    assert forced_backend() == second.backend
    second.__exit__(None, None, None)
    assert forced_backend() is None


@pytest.mark.gpu
def test_gpu_backward_inside_use_backend_runs_on_that_backend(monkeypatch):
    from pixelcnn_kernels.triton import gates as triton_gates

    calls = []
    kernel = triton_gates.gate_backward
    monkeypatch.setattr(triton_gates, "gate_backward", lambda *args: calls.append(1) or kernel(*args))
    x = torch.randn(2, 4, 3, 3, device="cuda", requires_grad=True)
    with use_backend("triton"):
        pixelcnn_kernels.gate_tanh_sigmoid(x).sum().backward()
    assert calls == [1]


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert resolve_backend(torch.randn(2)) == "triton"


def test_environment_variable_with_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=f"^the environment variable {backend.ENV_VAR} must be one of"):
        resolve_backend(torch.randn(2))


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend("numpy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_forcing_cuda_without_gpu_says_why():
    with pytest.raises(BackendUnavailableError, match="cuda backend unavailable: "):
        use_backend("cuda")


def test_forcing_cuda_on_cpu_tensors_says_why():
    reason = backend.unavailable_reason("cuda", torch.device("cpu"))
    assert reason is not None and ("CUDA" in reason or "extension" in reason)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backend.unavailable_reason("triton", torch.device("cpu"))
    assert reason == "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU"


def test_mismatched_devices_raise_value_error():
    with pytest.raises(ValueError, match="one device"):
        resolve_backend(torch.randn(2), torch.randn(2, device="meta"))


def test_float64_runs_the_reference_unless_a_kernel_backend_is_forced(monkeypatch):
    """Every op family's rule (kernels take float32, float16, bfloat16): on an automatic choice float64 goes to the reference."""
    monkeypatch.setattr(backend, "resolve_backend", lambda *tensors: "cuda")  # as for CUDA tensors with the extension built
    assert backend.resolve_kernel_backend(torch.float32, "DMOL", torch.randn(2)) == "cuda"
    assert backend.resolve_kernel_backend(torch.float64, "DMOL", torch.randn(2)) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="^cuda backend unavailable: its DMOL kernels take float32, float16 or bfloat16, got float64$"):
        backend.resolve_kernel_backend(torch.float64, "DMOL", torch.randn(2))


def test_meta_tensors_take_the_reference_whatever_is_forced(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    assert resolve_backend(torch.empty(2, device="meta"), None) == "reference"


def test_available_backends_lists_every_backend_with_a_reason_or_none():
    table = pixelcnn_kernels.available_backends()
    assert set(table) == set(backend.BACKENDS)
    assert table["reference"] is None
    for name, reason in table.items():
        assert reason is None or isinstance(reason, str) and reason, name


@pytest.mark.skipif(torch.version.cuda is not None, reason="message for a torch build without CUDA")
def test_cuda_reason_names_torch_without_cuda():
    assert "has no CUDA" in backend.unavailable_reason("cuda")


@pytest.mark.skipif(torch.version.cuda is None, reason="a torch build without CUDA has that reason instead")
def test_a_skipped_extension_build_is_explained_by_its_reason(monkeypatch):
    """pip hides setup.py's output without -v: the reason it recorded is what info and the errors quote."""
    real_import = backend.importlib.import_module

    def without_extension(name):
        if name == "pixelcnn_kernels._C":
            raise ImportError("No module named 'pixelcnn_kernels._C'")
        if name == "pixelcnn_kernels._build_info":
            return types.SimpleNamespace(CUDA_EXTENSION_SKIPPED="PIXELCNN_KERNELS_SKIP_CUDA is set")
        return real_import(name)

    monkeypatch.setattr(backend.importlib, "import_module", without_extension)
    backend._compiled_extension_error.cache_clear()
    try:
        reason = backend._compiled_extension_error()
    finally:
        backend._compiled_extension_error.cache_clear()
    assert reason.startswith("extension not built (at install time PIXELCNN_KERNELS_SKIP_CUDA is set)")


def test_an_extension_built_from_other_sources_is_reported_out_of_date(monkeypatch, tmp_path):
    """setup.py records csrc/'s digest; where the sources are at hand, other sources mean a rebuild (not a failing call)."""
    for name, text in (("ops.cpp", "// op schemas"), ("kernel.cu", "// kernels"), ("notes.txt", "not a source")):
        (tmp_path / name).write_text(text)
    built_from = extension_sources.csrc_digest(tmp_path)
    monkeypatch.setattr(backend, "_build_info", lambda: types.SimpleNamespace(CUDA_EXTENSION_SKIPPED=None, CSRC_DIGEST=built_from))
    assert backend._stale_extension_reason(tmp_path) is None
    (tmp_path / "notes.txt").write_text("edited, but not a source")
    assert backend._stale_extension_reason(tmp_path) is None
    (tmp_path / "ops.cpp").write_text("// op schemas, changed")
    assert backend._stale_extension_reason(tmp_path).startswith(f"extension out of date: built from other sources than {tmp_path} holds now")
    assert backend._stale_extension_reason(tmp_path / "missing") is None  # an installed wheel: no sources to compare
    monkeypatch.setattr(backend, "_build_info", lambda: types.SimpleNamespace(CUDA_EXTENSION_SKIPPED=None))
    assert backend._stale_extension_reason(tmp_path) is None  # built before digests were recorded


def test_this_install_recorded_the_digest_of_the_sources_it_built():
    info = backend._build_info()
    if getattr(info, "CSRC_DIGEST", None) is None:
        pytest.skip("no extension was built by this install (its reason: see pixelcnn-kernels info)")
    assert info.CSRC_DIGEST == extension_sources.csrc_digest(backend._CSRC)


def test_package_works_without_triton():
    """With triton unimportable, the package imports, says why, and runs on the reference backend."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pixelcnn_kernels as pk\n"
        "from pixelcnn_kernels.reference import gates as reference\n"
        "assert pk.available_backends()['triton'].startswith('triton is not installed'), pk.available_backends()\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "torch.testing.assert_close(pk.gate_tanh_sigmoid(x), reference.gate_tanh_sigmoid(x))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
