"""MindEye2: architecture, bundles (config + safetensors + provenance), published-checkpoint import,
image embedder, retrieval and ONNX export.

``from rtdecode.models import load_bundle`` is the entry point for inference. The names below are
resolved on first use, so importing :mod:`rtdecode.models.config` alone stays cheap (no torch).
"""

import importlib

_EXPORTS = {
    "load_bundle": "rtdecode.models.bundle",
    "save_model_bundle": "rtdecode.models.bundle",
    "Bundle": "rtdecode.models.bundle",
    "MindEye2": "rtdecode.models.mindeye2",
    "import_mindeye2": "rtdecode.models.published",
    "ImageEmbedder": "rtdecode.models.embedder",
    "RetrievalIndex": "rtdecode.models.retrieval",
    "CLIPConverter": "rtdecode.models.converter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rtdecode.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
