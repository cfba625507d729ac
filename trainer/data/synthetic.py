"""The synthetic world as training data: its runs' BOLD through our GLM, written as session bundles.

The betas are not the world's true response amplitudes: each run's BOLD time series
(:meth:`rtdecode.sim.world.SyntheticWorld.bold`) goes through the same online GLM the daemon and
calibration use (:class:`rtdecode.glm.online.OnlineGLM`, the default ``[glm]`` settings: LSS, AR(1), cosine
drift, motion confounds), re-estimated at run end, then z-scored per session and voxel as NSD's are.
So training on the world exercises the same definition of a beta as live decoding.

The bundles are written once under ``data.root`` with a ``world.json`` naming the settings they were
made from; a later run with the same settings reads them again, a run with other settings is refused.
"""

import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rtdecode.betas import glm_settings
from rtdecode.config import GlmConfig
from rtdecode.errors import TrainDataError
from rtdecode.glm.normalise import ZScore
from rtdecode.glm.online import OnlineGLM
from rtdecode.sim.world import RunPlan, SyntheticWorld, WorldConfig
from trainer.config import WorldSettings
from trainer.data.sessions import Trial, write_session

log = logging.getLogger(__name__)

WORLD_FILE = "world.json"
BASE_VOXELS = WorldConfig().n_voxels


def world_config(settings: WorldSettings) -> WorldConfig:
    """``n_subjects`` subjects ``syn01``... with distinct voxel counts (the world's defaults, then shifted)."""
    names = tuple(f"syn{k + 1:02d}" for k in range(settings.n_subjects))
    counts = tuple(BASE_VOXELS[k % len(BASE_VOXELS)] + 7 * (k // len(BASE_VOXELS)) for k in range(settings.n_subjects))
    return WorldConfig(
        seed=settings.seed,
        n_features=settings.n_features,
        subjects=names,
        n_voxels=counts,
        n_test_images=settings.n_test_images,
        n_train_images=settings.n_train_images,
        n_test_reps=settings.n_test_reps,
        image_size_px=settings.image_size_px,
    )


def write_synthetic_sessions(settings: WorldSettings, root: Path, *, progress: bool = True) -> Path:
    """Write (or find) the world's session bundles under ``root``; return ``root``."""
    root = Path(root)
    wanted = {"format": "rtdecode-synthetic-world", "settings": settings.model_dump(mode="json")}
    marker = root / WORLD_FILE
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise TrainDataError(
                f"{root} holds a synthetic world made with other settings ({found.get('settings')}); "
                f"wanted {wanted['settings']}: choose another data.root or delete that folder"
            )
        log.info("synthetic world: reusing the session bundles in %s", root)
        return root
    if root.exists() and any(root.iterdir()):
        raise TrainDataError(f"data.root {root} is not empty and holds no {WORLD_FILE}: choose an empty folder")
    world = SyntheticWorld(world_config(settings))
    subjects = world.config.subjects
    for subject in tqdm(subjects, desc="synthetic world: BOLD -> GLM betas", disable=not progress):
        _write_subject(world, subject, root)
    marker.write_text(json.dumps(wanted, indent=2) + "\n")  # last: the world is complete
    return root


def _write_subject(world: SyntheticWorld, subject: str, root: Path) -> None:
    plans = world.runs(subject)
    for session in sorted({plan.session for plan in plans}):
        session_plans = [plan for plan in plans if plan.session == session]
        betas, trials = [], []
        for plan in session_plans:
            run_betas, run_trials = _fit_run(world, subject, plan)
            betas.append(run_betas)
            trials += run_trials
        raw = np.concatenate(betas)
        statistics = ZScore.from_betas(raw)  # per session and voxel, as NSD's betas (spec §3.2)
        zscored = np.stack([statistics.apply(row) for row in raw])
        used = sorted({index for plan in session_plans for index in plan.image_indices.tolist()})
        images = dict(zip((world.image_ids[i] for i in used), _uint8_images(world, used), strict=True))
        folder = root / subject / f"ses-{session:02d}"
        write_session(folder, subject=subject, session=session, betas=zscored, trials=trials, images=images)


def _fit_run(world: SyntheticWorld, subject: str, plan: RunPlan) -> tuple[np.ndarray, list[Trial]]:
    """Final single-trial betas of one run, through the live GLM, in trial order."""
    bold = world.bold(subject, plan)
    design = plan.design
    glm = OnlineGLM(glm_settings(GlmConfig(), design.tr_s), bold.data.shape[1], run_index=plan.run)
    for event in design.events():
        glm.add_event(event)
    for frame in range(design.n_volumes):
        glm.add_volume(frame, bold.data[frame], bold.motion[frame])
    finals = {beta.event.trial_id: beta.beta for beta in glm.finish(design.n_volumes)}
    missing = [t for t in design.trial_ids if t not in finals]
    if missing:
        raise TrainDataError(f"synthetic run {subject} ses {plan.session} run {plan.run}: no beta for {missing}")
    rows = np.stack([finals[t] for t in design.trial_ids])
    trials = [
        Trial(f"run-{plan.run:02d}_{trial_id}", plan.run, stimulus_id, split)
        for trial_id, stimulus_id, split in zip(design.trial_ids, design.stimulus_ids, plan.splits, strict=True)
    ]
    return rows, trials


def _uint8_images(world: SyntheticWorld, indices: list[int]) -> list[np.ndarray]:
    images = world.images(np.asarray(indices, dtype=np.int64))  # (n, 3, H, W) in [0, 1]
    return list(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
