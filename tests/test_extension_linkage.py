"""The CUDA extension links the shared libstdc++, as torch does, whatever the compiler's default.

pixelcnn_kernels/extension_linkage.py says what a second copy of the C++ runtime broke;
setup.py names the shared libstdc++ on the link line and refuses an extension that still
carries its own copy.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

import pixelcnn_kernels
from pixelcnn_kernels.extension_linkage import carries_its_own_cxx_runtime, needed_libraries

# A number formatted through a stream: what TORCH_CHECK's messages do.
FORMATS_A_NUMBER = '#include <sstream>\n#include <string>\nstd::string entries(unsigned long n) { std::ostringstream s; s << n; return s.str(); }\n'


def test_the_built_extension_links_the_shared_libstdcxx():
    extension = sorted(Path(pixelcnn_kernels.__file__).parent.glob("_C.*.so"))
    if not extension:
        pytest.skip("the CUDA extension is not built here")
    assert not carries_its_own_cxx_runtime(extension[0]), needed_libraries(extension[0])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize(
    "link_args, own_copy",
    [([], False), (["-static-libstdc++"], True), (["-lstdc++", "-static-libstdc++"], False)],
    ids=["default", "static_libstdcxx", "static_libstdcxx_with_setup_pys_flag"],
)
def test_naming_the_shared_libstdcxx_overrides_a_static_link(tmp_path, link_args, own_copy):
    """What setup.py's ``-lstdc++`` does for a compiler that adds ``-static-libstdc++``."""
    source, library = tmp_path / "entries.cpp", tmp_path / "libentries.so"
    source.write_text(FORMATS_A_NUMBER)
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(library), *link_args], check=True, capture_output=True)
    assert carries_its_own_cxx_runtime(library) is own_copy, needed_libraries(library)


def test_needed_libraries_refuses_what_is_not_an_elf_file(tmp_path):
    text = tmp_path / "not_elf.so"
    text.write_text("not a shared object")
    with pytest.raises(ValueError, match="is not a 64-bit little-endian ELF file"):
        needed_libraries(text)
