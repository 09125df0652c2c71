"""Whether a built extension shares the process's C++ runtime (libstdc++) or carries its own copy.

A compiler set up to link libstdc++ statically (``-static-libstdc++`` in its specs or in
a wrapper script, as the project's H200 image's ``/opt/gcc/bin/g++``) puts a second copy
of the C++ runtime into the extension. That copy numbers the locale facets its own way,
so a stream torch's libstdc++ set up is read with the wrong facet as soon as a number is
formatted: an error message such as ``TORCH_CHECK(ok, "got ", n, " entries")`` killed
the process with SIGSEGV on the H200 (2026-11-30) and lost its number on the CPU
machines. setup.py links the shared libstdc++ explicitly and checks the result with
:func:`carries_its_own_cxx_runtime`.

Standard library only: setup.py loads this file by path.
"""

from __future__ import annotations

import struct
from pathlib import Path

_SHT_DYNAMIC = 6  # section type of .dynamic
_DT_NEEDED = 1  # .dynamic entry naming a shared library the object needs


def needed_libraries(path: str | Path) -> list[str]:
    """The DT_NEEDED entries (shared libraries it links) of the 64-bit little-endian ELF file at ``path``."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    (section_table,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # Each section header: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_table + i * entry_size) for i in range(count)]
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strings = sections[link][4]  # .dynstr's file offset
        names = []
        for entry in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, entry)
            if tag == _DT_NEEDED:
                start = strings + value
                names.append(data[start : data.index(b"\0", start)].decode())
        return names
    return []


def carries_its_own_cxx_runtime(path: str | Path) -> bool:
    """Whether the shared object at ``path`` holds its own libstdc++ instead of linking the shared one."""
    return not any(name.startswith("libstdc++") for name in needed_libraries(path))
