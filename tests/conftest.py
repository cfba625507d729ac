"""Shared test setup: offline model hubs, hardware-gated markers (gpu, tensorrt), a seeded rng."""

import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded at test time


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return _cuda_available()


def pytest_collection_modifyitems(config, items):
    gates = {
        "gpu": (_cuda_available, "needs a CUDA GPU"),
        "tensorrt": (_tensorrt_available, "needs TensorRT and a GPU"),
    }
    for marker, (available, reason) in gates.items():
        if any(marker in item.keywords for item in items) and not available():
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
