"""``rtdecode model ...`` as a real process: init, info, import-mindeye2 (engines: tests/deploy)."""

import os

import pytest
import torch

from rtdecode.models.bundle import load_bundle
from rtdecode.models.config import tiny
from rtdecode.models.mindeye2 import MindEye2
from tests.helpers import run_rtdecode


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "RTDECODE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}


def rtdecode(*args, env, check=True):
    return run_rtdecode(*args, env=env, check=check)


def test_import_then_info(env, tmp_path):
    torch.manual_seed(0)
    model = MindEye2(tiny())
    torch.save({"epoch": 2, "model_state_dict": model.state_dict()}, tmp_path / "last.pth")

    result = rtdecode(
        "model", "import-mindeye2", str(tmp_path / "last.pth"), "--out", str(tmp_path / "b"), "--subjects", "a,b",
        env=env,
    )  # fmt: skip
    assert "geometry: hidden 24, with low-level, prior depth 2; subjects a (37 voxels), b (29 voxels)" in result.stderr
    assert load_bundle(tmp_path / "b").config.subjects == ("a", "b")

    info = rtdecode("model", "info", str(tmp_path / "b"), env=env).stdout
    assert "a (37 voxels), b (29 voxels)" in info and "epoch: 2" in info


def test_init_writes_a_random_bundle_of_a_preset(env, tmp_path):
    rtdecode("model", "init", "--preset", "tiny", "--subject", "x=11", "--out", str(tmp_path / "t"), env=env)
    assert load_bundle(tmp_path / "t").config.n_voxels == (11,)
    bad = rtdecode("model", "init", "--preset", "tiny", "--subject", "x", "--out", str(tmp_path / "u"), env=env,
                   check=False)  # fmt: skip
    assert bad.returncode == 2 and "expected NAME=N_VOXELS" in bad.stderr


def test_import_errors_are_one_clear_line(env, tmp_path):
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    result = rtdecode("model", "import-mindeye2", str(tmp_path / "x.pth"), "--out", str(tmp_path / "b"), env=env,
                      check=False)  # fmt: skip
    assert result.returncode == 2
    assert "rtdecode: error:" in result.stderr and "not a MindEye2 model_state_dict" in result.stderr
    assert "Traceback" not in result.stderr
