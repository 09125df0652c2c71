"""Training checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitive containers, so
``torch.load(..., weights_only=True)`` can read it without running any pickled
code::

    {"format": "pixelcnn_kernels.checkpoint", "version": 1,
     "model": {"name": ..., "config": {...}},   # what models.model_from_config takes
     "state_dict": {...}, "optimizer": {...} or None, "epoch": int (epochs completed),
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...]},
     "metrics": [{...}, ...], "args": {...}}

:func:`save_checkpoint` writes a temporary file beside the target and renames it
over the target (``os.replace``), so a crash mid-write never leaves a truncated
checkpoint under the real name. :func:`load_checkpoint` raises
:class:`CheckpointError` naming the file when it is truncated, corrupt (its
stored data failing the zip checksums, which ``torch.load`` does not check), holds
anything but tensors and plain containers (e.g. a tampered pickle), or is not a
pixelcnn-kernels checkpoint.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

FORMAT = "pixelcnn_kernels.checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "state_dict", "optimizer", "epoch", "rng", "metrics")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and says why."""


def rng_state() -> dict:
    """The torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` saved (CUDA states only if this process has as many devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model_spec: dict,
    state_dict: dict,
    optimizer: dict | None,
    epoch: int,
    metrics: list[dict],
    args: dict | None = None,
) -> Path:
    """Writes a checkpoint atomically (temporary file, then ``os.replace``); returns its path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec,
        "state_dict": state_dict,
        "optimizer": optimizer,
        "epoch": int(epoch),
        "rng": rng_state(),
        "metrics": list(metrics),
        "args": dict(args or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint with ``weights_only=True``; raises CheckpointError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    if torch.device(map_location).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot load checkpoint {path} onto {map_location}: no CUDA device is visible")
    _check_crcs(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global that is not a tensor or plain container.
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain containers "
            f"(tampered, or not written by pixelcnn-kernels); loaded with weights_only=True. Detail: {_first_line(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read: {_first_line(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pixelcnn-kernels checkpoint (no format={FORMAT!r} entry)")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the entries {missing}")
    version = payload["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path} has no valid format version (a positive int), got {version!r}")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this pixelcnn-kernels reads up to {VERSION}")
    return payload


def _first_line(exc: Exception) -> str:
    """An exception's message in one line (torch.load's run to several), or its type where it has none."""
    message = str(exc)
    return message.splitlines()[0] if message else type(exc).__name__


def _check_crcs(path: Path) -> None:
    """CheckpointError where a stored tensor's bytes fail their zip CRC: torch.load does not check them,
    so flipped bits would load as silently wrong weights. Entries written without a CRC (0, under
    ``torch.serialization.set_crc32_options(False)``) are not checked."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"checkpoint {path} is not a pixelcnn-kernels checkpoint: not the zip archive torch.save writes "
                                  f"({'an empty file' if path.stat().st_size == 0 else 'another kind of file'})")
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC != 0:
                    _read_checked(archive, entry, path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read: {exc}") from exc


def _read_checked(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, path: Path) -> None:
    """Reads one entry through, in chunks; zipfile compares its CRC at the end."""
    with archive.open(entry) as stream:
        try:
            while stream.read(1 << 24):
                pass
        except zipfile.BadZipFile as exc:  # "Bad CRC-32 for file ..."
            raise CheckpointError(f"checkpoint {path} is corrupt: the stored data of {entry.filename} fails its checksum") from exc


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model stored in a checkpoint (rebuilt from its config, weights loaded); CheckpointError where they do not fit."""
    from pixelcnn_kernels.models import model_from_config

    payload = load_checkpoint(path, map_location)
    try:
        model = model_from_config(payload["model"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")  # load_state_dict: a heading, then one line per key
        raise CheckpointError(f"checkpoint {path}: its model entry and weights do not build a model: {detail}") from exc
    return model.to(map_location)
