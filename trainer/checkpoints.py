"""Run checkpoints that resume exactly: accelerate's state plus a small JSON of where the run stands.

A checkpoint is ``OUT/checkpoints/epoch-NNNN/``: what ``Accelerator.save_state`` writes (model weights as
safetensors, optimizer, scheduler, and every process's RNG states; DeepSpeed's own files under ZeRO), then
``trainer_state.json`` last, so a folder without it is an interrupted save and is never resumed from.
accelerate reads its state files back with ``torch.load(weights_only=True)``.
"""

import json
import shutil
from pathlib import Path
from typing import Any

from rtdecode.errors import TrainError

STATE_FILE = "trainer_state.json"
FOLDER = "checkpoints"


def checkpoint_dir(out_dir: Path, epoch: int) -> Path:
    return Path(out_dir) / FOLDER / f"epoch-{epoch:04d}"


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Mark a checkpoint complete: written after accelerate's files."""
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def latest(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of a run and its state, or None."""
    root = Path(out_dir) / FOLDER
    complete = sorted(p for p in root.glob("epoch-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    if not complete:
        return None
    folder = complete[-1]
    return folder, json.loads((folder / STATE_FILE).read_text())


def check_resumable(folder: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint of a different run: every key of ``current`` (the run's identity: model, data, recipe,
    steps per epoch, process count, seed) must be equal in the checkpoint's state."""
    different = [key for key in current if saved.get(key) != current[key]]
    if different:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in different)
        raise TrainError(
            f"checkpoint {folder} belongs to a different run ({details}); use another run.out_dir, or --no-resume"
        )


def prune(out_dir: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest complete checkpoints (and interrupted ones older than them)."""
    root = Path(out_dir) / FOLDER
    folders = sorted(root.glob("epoch-*"))
    complete = [p for p in folders if (p / STATE_FILE).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for folder in folders:
        if folder < oldest_kept:
            shutil.rmtree(folder)
