"""One calibration session -> subject bundle: the steps in order (``rtdecode calibrate``).

1. inputs: the stimulus log, the images, the held-out trials (checked before anything slow);
2. inventory: the runs read once through the live ingest code, checked against the log; the reference volume;
3. betas: every trial's beta over the candidate voxels, run by run, by the live chain (cached per run);
4. voxels: the supplied mask, or the reliably responding candidates;
5. normalisation: per-voxel statistics of the train trials; the training session bundle;
6. fine-tune: the trainer's loop from the pretrained bundle (or from scratch), resumable;
7. report and subject bundle.

The work folder (default: the session's ``calibration/`` in the store) keeps everything needed to resume.
"""

import dataclasses
import datetime
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from calibration import betas as betas_step
from calibration import dataset, finetune, report, selection
from calibration import inputs as inputs_step
from calibration.voxels import candidate_voxels, subset_mask
from rtdecode import __version__
from rtdecode.config import Config
from rtdecode.preprocess.mask import Mask
from rtdecode.store import Store

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Calibration:
    """What a calibration produced."""

    work_dir: Path
    report: dict[str, Any]
    report_files: tuple[Path, Path]
    model_dir: Path
    bundle_dir: Path | None


def work_folder(config: Config, subject: str, session: int) -> Path:
    return Store(config.home).session_dir(subject, session) / "calibration"


def set_aside(work_dir: Path) -> Path | None:
    """Move an earlier work folder out of the way (kept, never deleted); return where it went."""
    if not work_dir.exists():
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    target = work_dir.with_name(f"{work_dir.name}-replaced-{stamp}")
    work_dir.rename(target)
    return target


def calibrate(
    config: Config,
    subject: str,
    session: int,
    *,
    work_dir: Path | None = None,
    write_bundle: bool = True,
    progress: bool = True,
    world: dict | None = None,
) -> Calibration:
    """Run every step; return the report and where the model and bundle are. Resumes from ``work_dir``."""
    work = Path(work_dir or work_folder(config, subject, session))
    session_inputs, heldout, rule, init = _checked_inputs(config, subject, session)
    inventory = betas_step.take_inventory(session_inputs, config, work / "quarantine")
    reference = _reference(config, inventory)
    inventory = dataclasses.replace(inventory, reference=reference)  # every run is aligned to what the bundle keeps
    candidates, method = candidate_voxels(config, reference)
    log.info("betas over %d candidate voxels (%s)", candidates.n_voxels, method)
    runs = betas_step.session_betas(session_inputs, inventory, candidates, config, work / "runs", work / "quarantine")
    table = dataset.session_table(session_inputs, runs, heldout, config.calibrate.betas)
    chosen, selection_report = _select(config, table, runs, session_inputs, heldout, candidates, method)
    mask = subset_mask(candidates, chosen) if method != "mask" else candidates
    statistics, init_name = _training_data(config, work, subject, session, session_inputs, table, chosen, init)
    train = finetune.train_config(
        config, subject, work / "session", work / f"train-{init_name}", init, len(table.trials), progress
    )
    model_dir, epochs = finetune.fine_tune(train)
    content = _report(
        config, subject, session, session_inputs, inventory, runs, table, rule, selection_report, init, epochs, world
    )
    bundle_dir = Store(config.home).bundle_dir(subject) if write_bundle else None
    if bundle_dir is not None:
        content["bundle"] = {"folder": str(bundle_dir)}
    report_files = report.write_report(work / f"report-{init_name}", content)
    if bundle_dir is not None:
        _write_bundle(config, subject, session, mask, reference, statistics, model_dir, report_files, content)
    return Calibration(work, content, report_files, model_dir, bundle_dir)


def _checked_inputs(config: Config, subject: str, session: int):
    """The session's inputs, held-out trials and starting model, every cheap check done."""
    session_inputs = inputs_step.gather_inputs(config, subject, session)
    heldout, rule = inputs_step.heldout_mask(session_inputs.trials, config.calibrate.heldout)
    inputs_step.check_split(session_inputs.trials, heldout, config.calibrate.min_train_trials, rule)
    if config.preprocess.mask is None:  # voxels will be chosen by repeat reliability
        inputs_step.check_repeats(session_inputs.trials, selection.MIN_REPEATED_IMAGES)
    init = finetune.starting_bundle(config)
    finetune.check_embedder(config)
    Store(config.home).create_session(subject, session)  # the store lists the subject
    log.info(
        "calibrate %s session %d: %d runs, %d trials (%d held out, rule %s)",
        subject,
        session,
        session_inputs.n_runs,
        len(session_inputs.trials),
        int(heldout.sum()),
        rule,
    )
    return session_inputs, heldout, rule, init


def _training_data(config, work: Path, subject: str, session: int, session_inputs, table, chosen, init):
    """Normalisation statistics (train trials) and the z-scored training bundle; earlier fine-tunes are set aside
    when the data changed. Returns the statistics and the name of this starting model's training folder."""
    selected = table.betas[:, chosen]
    statistics = dataset.normalisation(selected, table.heldout)
    zscored = np.stack([statistics.apply(row) for row in selected]).astype(np.float32)
    folder = work / "session" / subject / f"ses-{session:02d}"
    _, rewritten = dataset.write_training_session(folder, table, zscored, session_inputs, subject, session)
    if rewritten:  # checkpoints of every starting model were trained on other data
        for earlier in sorted(work.glob("train-*")):
            if "-replaced-" not in earlier.name and (moved := set_aside(earlier)) is not None:
                log.info("training data changed: earlier fine-tune set aside in %s", moved)
    return statistics, finetune.SCRATCH if init is None else f"pretrained-{_short_identity(init)}"


def _reference(config: Config, inventory: betas_step.Inventory) -> tuple[np.ndarray, np.ndarray]:
    """The supplied reference (the grid a supplied mask was drawn on) or the reference run's first volume."""
    if config.preprocess.reference is not None:
        from rtdecode.betas import load_reference

        return load_reference(config.preprocess.reference)
    return inventory.reference


def _select(config, table, runs, session_inputs, heldout, candidates: Mask, method: str):
    """Indices of the kept candidates (sorted) and the report's selection section."""
    if method == "mask":
        indices = np.arange(candidates.n_voxels)
        return indices, {
            "method": "mask",
            "source": candidates.source,
            "n_candidates": candidates.n_voxels,
            "n_selected": candidates.n_voxels,
            "threshold": None,
            "n_repeated_images": None,
            "histogram": None,
        }
    final = dataset.session_table(session_inputs, runs, heldout, "final")  # refits: the least noisy betas
    settings = config.calibrate
    reliability = selection.repeat_reliability(final.betas, final.stimulus_ids)
    chosen = selection.select_voxels(
        reliability,
        threshold=settings.reliability_threshold,
        max_voxels=settings.max_voxels,
        min_voxels=settings.min_voxels,
        fdr=settings.reliability_fdr,
    )
    log.info(
        "voxels: %d of %d candidates reliable (r > %.3f over %d repeated images)",
        chosen.indices.size,
        candidates.n_voxels,
        chosen.threshold,
        reliability.n_images,
    )
    repeated = {stimulus_id for stimulus_id, count in Counter(final.stimulus_ids).items() if count > 1}
    summary = {"method": "reliability", "source": candidates.source, **chosen.summary()}
    summary["used_heldout_trials"] = bool(repeated & table.heldout_images)  # label-free, but said plainly
    return np.sort(chosen.indices), summary


def _short_identity(bundle: Path) -> str:
    from trainer.finetune import bundle_identity

    return bundle_identity(bundle)[:12]


def _report(
    config, subject, session, session_inputs, inventory, runs, table, rule, selection_report, init, epochs, world
) -> dict[str, Any]:
    last = epochs[-1]["validation"][0] if epochs and epochs[-1].get("validation") else None
    content = {
        "subject": subject,
        "session": session,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rtdecode_version": __version__,
        "inputs": {
            "raw_dir": str(session_inputs.raw_dir),
            "events": [str(p) for p in session_inputs.events],
            "images_dir": str(session_inputs.images_dir),
            "n_runs": len(runs),
            "n_volumes": sum(grid.n_volumes for grid in inventory.runs.values()),
            "n_trials": len(table.trials),
            "n_without_beta": table.n_without_beta,
            "n_train": int((~table.heldout).sum()),
            "n_heldout": int(table.heldout.sum()),
            "heldout_rule": rule,
            "betas": config.calibrate.betas,
            "problems": inventory.problems + [p for r in runs.values() for p in r.problems],
        },
        "motion": {
            "fd_threshold_mm": config.preprocess.fd_threshold_mm,
            "runs": [
                {
                    "run": run,
                    "fd_mm": r.fd_mm.tolist(),
                    "params": r.motion_params.tolist(),
                    "n_flagged": int(r.flagged.sum()),
                }
                for run, r in runs.items()
            ],
        },
        "selection": selection_report,
        "training": {"init": "scratch" if init is None else str(init), "epochs": epochs},
        "heldout": None if last is None else _heldout(last, len(table.heldout_images)),
    }
    if world is not None:
        content["world"] = world
    return content


def _heldout(validation: dict, n_images: int) -> dict[str, Any]:
    n_way = int(validation["n_way"])
    return {
        "forward": validation["forward"],
        "backward": validation["backward"],
        "forward_ci95": validation.get("forward_ci95"),
        "backward_ci95": validation.get("backward_ci95"),
        "n_way": n_way,
        "chance": 1.0 / n_way,
        "n_images": n_images,
    }


def _write_bundle(config, subject, session, mask, reference, statistics, model_dir, report_files, content) -> None:
    from rtdecode.subject_bundle import write_subject_bundle

    manifest = {
        "subject": subject,
        "session": session,
        "betas": config.calibrate.betas,
        "glm": config.glm.model_dump(mode="json"),
        "fd_threshold_mm": config.preprocess.fd_threshold_mm,
        "selection": {k: v for k, v in content["selection"].items() if k != "histogram"},
        "heldout": content["heldout"],
        "init": content["training"]["init"],
    }
    folder = Path(content["bundle"]["folder"])
    write_subject_bundle(
        folder,
        manifest=manifest,
        mask=mask,
        reference=reference,
        zscore=statistics,
        model_dir=model_dir,
        report_files=report_files,
    )
    log.info("subject bundle: %s", folder)
