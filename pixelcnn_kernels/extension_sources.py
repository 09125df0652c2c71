"""The fingerprint of the CUDA extension's sources (``csrc/``), shared by setup.py and the package.

setup.py records it beside the build (``_build_info.CSRC_DIGEST``); where the sources
are at hand (an editable install, a checkout), :mod:`pixelcnn_kernels.backend` compares
them with it, so that an extension built from older sources (whose op schemas may
differ from what the Python side passes) is reported as needing a rebuild instead of
failing on a call. Standard library only: setup.py loads this file by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h")


def csrc_digest(directory: str | Path) -> str:
    """sha256 over the names and bytes of the extension's sources in ``directory``, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in SOURCE_PATTERNS for p in Path(directory).glob(pattern)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
