"""A small simulated calibration session and the rtdecode config that calibrates it (tiny models, CPU)."""

import json
import os
from pathlib import Path

from rtdecode.sim.session import SessionLayout, write_world_session
from rtdecode.sim.world import SyntheticWorld, WorldConfig

SUBJECT = "syn08"
TOWER = {
    "seed": 0,
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "head_width": 12, "mlp_ratio": 2.0},
}
# 60 test images x 3 + 60 train images = 240 trials in 4 runs of 188 volumes: enough repeated images for the
# reliability selection to find voxels at its default false discovery rate.
WORLD = WorldConfig(n_test_images=60, n_train_images=60, n_runs_per_session=None)


def write_session(out_dir: Path, **options) -> SessionLayout:
    return write_world_session(SyntheticWorld(WORLD), SUBJECT, 1, out_dir, **options)


def calibrate_settings(session: SessionLayout, **changes) -> dict:
    settings = {
        "raw_dir": str(session.raw_dir),
        "events": [str(p) for p in session.events],
        "images_dir": str(session.images_dir),
        "from_scratch": True,
        "scratch_preset": "tiny",
        "scratch_hidden_dim": 64,
        "epochs": 3,
        "batch_size": 8,
        "cpu": True,
        "image_size_px": 32,
        "n_way": 60,
        "n_draws": 5,
        "embedder_random": TOWER,
    }
    return settings | changes


def config_values(home: Path, session: SessionLayout, **changes) -> dict:
    return {
        "paths": {"home": str(home)},
        "preprocess": {"device": "cpu"},
        "calibrate": calibrate_settings(session, **changes),
    }


def write_config_toml(path: Path, values: dict) -> Path:
    """The values as TOML (JSON scalars, arrays and inline tables are TOML too)."""
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        for key, value in keys.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def cli_env(home: Path) -> dict:
    return {**os.environ, "RTDECODE_HOME": str(home), "HF_HUB_OFFLINE": "1", "RTDECODE_CONFIG": ""}
