"""Drop-in PixelCNN-family models built on the fused layers (see :mod:`pixelcnn_kernels.models.base` for their API).

Checkpoints store ``{"name": model.name, "config": model.config}``;
:func:`model_from_config` (or :func:`build_model`) rebuilds the model from it.
"""

from __future__ import annotations

from pixelcnn_kernels.models.base import PixelCNNModel, TrainingLoss
from pixelcnn_kernels.models.gated_pixelcnn import GatedPixelCNN
from pixelcnn_kernels.models.pixelcnn_pp import PixelCNNPlusPlus

__all__ = ["MODELS", "GatedPixelCNN", "PixelCNNModel", "PixelCNNPlusPlus", "TrainingLoss", "build_model", "model_from_config"]

MODELS: dict[str, type[PixelCNNModel]] = {cls.name: cls for cls in (GatedPixelCNN, PixelCNNPlusPlus)}


def build_model(name: str, config: dict) -> PixelCNNModel:
    """A new model of class ``name`` (``"gated_pixelcnn"`` or ``"pixelcnn_pp"``) with constructor kwargs ``config``."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of constructor arguments, got {type(config).__name__}")
    return MODELS[name](**config)


def model_from_config(spec: dict) -> PixelCNNModel:
    """A new model from ``{"name": ..., "config": {...}}`` (what a checkpoint stores)."""
    if not isinstance(spec, dict) or set(spec) != {"name", "config"}:
        raise ValueError(f"spec must be a dict with exactly the keys 'name' and 'config', got {spec!r}")
    return build_model(spec["name"], spec["config"])
