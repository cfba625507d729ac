"""The calibration session as training data: selected voxels, z-scored, written as a trainer session bundle.

Rows follow the stimulus log (run, then logged order). A trial without a beta of the chosen kind (an online
beta needs ``glm.emit_delay_s`` of data after its onset) is left out and counted. The normalisation statistics
are computed over the train trials only (no held-out information reaches training) and are the ones saved in
the subject bundle, so the daemon's ``normalise.method = "calibration"`` z-scores live betas identically.
"""

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from calibration.betas import RunBetas
from calibration.inputs import SessionInputs
from rtdecode.glm.normalise import ZScore
from trainer.data.sessions import MANIFEST, Trial, write_session

log = logging.getLogger(__name__)

KEY_FILE = "key.json"


@dataclasses.dataclass
class SessionTable:
    """Every logged trial with a beta: raw betas over the candidate voxels and the trial table."""

    betas: np.ndarray  # (n_trials, n_candidates) float32
    trials: list[Trial]
    heldout: np.ndarray  # (n_trials,) bool
    n_without_beta: int

    @property
    def stimulus_ids(self) -> list[str]:
        return [t.stimulus_id for t in self.trials]

    @property
    def heldout_images(self) -> set[str]:
        return {t.stimulus_id for t, held in zip(self.trials, self.heldout, strict=True) if held}


def session_table(inputs: SessionInputs, runs: dict[int, RunBetas], heldout: np.ndarray, kind: str) -> SessionTable:
    """Stack the runs' betas of ``kind`` ("online" or "final") in log order, leaving out trials without one."""
    rows, trials, kept = [], [], []
    position = 0
    for run, run_betas in sorted(runs.items()):
        values = run_betas.betas(kind)
        for row, logged in zip(values, inputs.run_trials(run), strict=True):
            has_beta = bool(np.isfinite(row).all())
            if has_beta:
                rows.append(row)
                split = "test" if heldout[position] else "train"
                trials.append(Trial(f"run-{run:02d}_{logged.trial_id}", run, logged.stimulus_id, split))
            kept.append(has_beta)
            position += 1
    n_missing = kept.count(False)
    if n_missing:
        log.warning(
            "%d of %d trials have no %s beta (too close to their run's end?) and are left out",
            n_missing,
            len(kept),
            kind,
        )
    betas = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    return SessionTable(betas, trials, heldout[np.array(kept, dtype=bool)], n_missing)


def normalisation(betas: np.ndarray, heldout: np.ndarray) -> ZScore:
    """Per-voxel statistics of the train trials (StandardScaler's: population sd, zero spread divided by 1)."""
    return ZScore.from_betas(betas[~heldout])


def write_training_session(
    folder: Path, table: SessionTable, zscored: np.ndarray, inputs: SessionInputs, subject: str, session: int
) -> tuple[Path, bool]:
    """The trainer's session bundle at ``folder``; rewritten only when its content changed.

    Returns the folder and whether it was (re)written: a rewrite means earlier training checkpoints were made
    on other data.
    """
    key = _content_key(zscored, table.trials)
    key_path = folder / KEY_FILE
    if (folder / MANIFEST).is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        return folder, False
    if folder.exists():
        shutil.rmtree(folder)  # derived data: rebuilt from the cached betas
    images = {t.stimulus_id: inputs.images[t.stimulus_id] for t in table.trials}
    write_session(
        folder,
        subject=subject,
        session=session,
        betas=zscored,
        trials=table.trials,
        images=images,
        normalisation="z-score with the train trials' statistics (subject bundle zscore.npz)",
    )
    key_path.write_text(json.dumps(key) + "\n")
    return folder, True


def _content_key(zscored: np.ndarray, trials: list[Trial]) -> dict:
    digest = hashlib.sha256(np.ascontiguousarray(zscored).tobytes())
    digest.update(json.dumps([dataclasses.astuple(t) for t in trials]).encode())
    return {"sha256": digest.hexdigest(), "shape": list(zscored.shape)}
