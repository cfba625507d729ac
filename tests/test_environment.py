"""The installed environment: the CPU torch / torchvision traps are handled by the project's own files."""

import importlib.metadata
import os
import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_torchvision_and_open_clip_import_without_rtdecode():
    """The .pth written by `make setup` applies the shim in every interpreter of the venv."""
    result = run_python(
        "import open_clip, torchvision\n"
        "from torchvision import transforms\n"
        "import torch\n"
        "x = transforms.Normalize([0.5] * 3, [0.5] * 3)(torch.ones(3, 4, 4))\n"
        "print(float(x.sum()), 'ViT-bigG-14' in open_clip.list_models())"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["48.0", "True"]


def test_diffusers_models_import():
    result = run_python("from diffusers import UNet2DConditionModel, AutoencoderKL; print('ok')")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_cpu_torch_brought_no_cuda_packages():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("CUDA torch: CUDA packages belong on this host")
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert not {n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    assert torch.__version__ == "2.13.0+cpu"
