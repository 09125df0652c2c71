"""The CUDA extension: built whenever torch has CUDA and nvcc is present, with every op registered."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from pixelcnn_kernels import backend

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _declared_ops() -> set[str]:
    """Op names declared with m.def("name(...") in the glue files."""
    names = set()
    for path in CSRC.glob("*_ops.cpp"):
        names.update(re.findall(r'm\.def\(\s*"(\w+)\(', path.read_text()))
    return names


def _toolkit_present() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


@pytest.mark.skipif(torch.version.cuda is None or not _toolkit_present(), reason="the extension is only built with a CUDA torch and nvcc")
def test_extension_is_built_and_registers_every_declared_op():
    assert backend._cuda_extension_error() is None, backend._cuda_extension_error()
    ops = getattr(torch.ops, backend.CUDA_OPS_NAMESPACE)
    declared = _declared_ops()
    assert declared, "no op declared in csrc/*_ops.cpp"
    for name in sorted(declared):
        assert hasattr(ops, name), f"{name} declared in csrc but not registered"


def test_every_cu_file_is_free_of_torch_headers():
    for path in CSRC.glob("*.cu"):
        text = path.read_text()
        assert not re.search(r"#include\s*[<\"](ATen|torch|c10)/", text), f"{path.name} includes a torch header; keep glue in *_ops.cpp"
