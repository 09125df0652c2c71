"""The sanitizer builds of the CUDA kernels on the CPU report what they must, and nothing else.

``python -m pixelcnn_kernels.cuda_on_cpu --sanitizer address|thread`` runs the CUDA kernels'
tests with the kernels built with AddressSanitizer (compute-sanitizer's memcheck, on the CPU)
or with ThreadSanitizer told the orderings CUDA gives (its racecheck). Here the probe kernels
of ``cuda_on_cpu_probes.cu``, compiled as those builds compile ``csrc/*.cu`` into a program:
the correct one runs clean under both, each planted bug gets its report from its sanitizer
only.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from pixelcnn_kernels import cuda_on_cpu
from pixelcnn_kernels.cuda_on_cpu import __main__ as runner

PROBES = Path(__file__).with_name("cuda_on_cpu_probes.cu")

# probe -> {sanitizer: what its report says, or None: no report}
EXPECTED = {
    "barrier": {"address": None, "thread": None},
    "missing_barrier": {"address": None, "thread": "WARNING: ThreadSanitizer: data race"},
    "overlapping_blocks": {"address": None, "thread": "WARNING: ThreadSanitizer: data race"},
    # out of bounds: undefined behaviour without AddressSanitizer's guard around the heap block
    "read_before_the_start": {"address": "ERROR: AddressSanitizer: heap-buffer-overflow"},
}
CHECKSUM = "checksum 8128.0"  # 0 + 1 + ... + 127: every input element read once


@pytest.fixture(scope="module")
def probes_built_with(tmp_path_factory):
    """sanitizer -> the probes program built with it (once per sanitizer)."""

    @functools.cache
    def build(tool):
        reason = cuda_on_cpu.sanitizer_unavailable_reason(tool)
        if reason is not None:
            pytest.skip(reason)
        directory = tmp_path_factory.mktemp(tool)
        source = directory / "probes.cpp"
        source.write_text(f'#line 1 "{PROBES}"\n' + cuda_on_cpu.translate(PROBES.read_text()))
        program = directory / "probes"
        runtime = cuda_on_cpu.runtime_object(tool, directory)
        subprocess.run([cuda_on_cpu.compiler(), *cuda_on_cpu.compile_flags(tool), str(source), str(runtime), "-o", str(program)], check=True)
        return program

    return build


@pytest.mark.parametrize(("tool", "probe"), [(tool, probe) for probe, reports in EXPECTED.items() for tool in reports])
def test_each_sanitizer_reports_its_bugs_only(probes_built_with, tool, probe):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "TSAN_OPTIONS")}
    result = subprocess.run([str(probes_built_with(tool)), probe], capture_output=True, text=True, env=env, timeout=120)
    report = EXPECTED[probe][tool]
    if report is None:
        assert result.returncode == 0 and "Sanitizer" not in result.stderr, result.stderr
        assert probe != "barrier" or CHECKSUM in result.stdout, result.stdout
        return
    assert result.returncode != 0 and report in result.stderr, result.stderr
    if tool == "thread":  # the report names the CUDA threads, and their blocks
        assert "'CUDA thread " in result.stderr
        if probe == "overlapping_blocks":
            assert "of block (0, 0, 0)'" in result.stderr and "of block (1, 0, 0)'" in result.stderr
        else:
            assert "rotate_through_shared" in result.stderr and "cuda_on_cpu_probes.cu" in result.stderr


def test_the_runner_says_when_the_compiler_has_no_sanitizer_runtime(monkeypatch, capsys):
    monkeypatch.setattr(cuda_on_cpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_on_cpu, "sanitizer_runtime", lambda tool: "libtsan.so")  # what the compiler prints then
    assert runner.main(["--sanitizer", "thread"]) == 2
    assert "cannot run the kernels under the thread sanitizer: the compiler has no thread sanitizer runtime" in capsys.readouterr().err


def test_the_runner_counts_the_reports_of_its_sanitizer(tmp_path):
    (tmp_path / "thread.101").write_text("==================\nWARNING: ThreadSanitizer: data race (pid=101)\n...\n" * 2)
    (tmp_path / "thread.102").write_text("WARNING: ThreadSanitizer: data race (pid=102)\n")
    (tmp_path / "address.103").write_text("==103==ERROR: AddressSanitizer: heap-buffer-overflow\n")
    assert runner.count_reports("thread", tmp_path) == 3
    assert runner.count_reports("address", tmp_path) == 1
