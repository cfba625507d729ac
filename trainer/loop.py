"""The pretraining loop: the paper's recipe (spec §3) on any data source, through accelerate.

One step takes ``batch_per_subject`` trials of every subject (subject-major), mixes voxels within each
subject during the BiMixCo epochs, runs one forward (ridge per subject -> backbone -> prior loss), and
minimises ``prior_scale * prior + clip_scale * contrastive + blur_scale * L1(low-level latent)``.
AdamW with parameter groups, OneCycle stepped once per step. Validation after every epoch is the
paper's retrieval. Checkpoints resume exactly (see :mod:`trainer.checkpoints`); the trained model is
written as an rtdecode model bundle (``OUT/model``) that ``rtdecode model info`` and calibration read.

Multi-GPU and multi-node runs are ``accelerate launch`` of the same command (docs/training.md). The LR
schedule is stepped once per optimiser step on every process (``step_scheduler_with_optimizer=False``),
so it spans the run whatever the number of processes; accelerate's default would step it once per
process and finish the cycle early.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from rtdecode.models.bundle import save_model_bundle
from rtdecode.models.mindeye2 import MindEye2
from trainer import checkpoints
from trainer.config import TrainConfig, config_dict
from trainer.data.source import Dataset
from trainer.experiment import load_dataset, load_embedder, model_config
from trainer.losses import Mixing, bimixco_loss, low_level_l1, normalised, soft_clip_loss
from trainer.recipe import (
    EpochLoss,
    batch_plan,
    loss_schedule,
    make_optimizer,
    make_scheduler,
    step_rng,
    steps_per_epoch,
)
from trainer.targets import LatentTargets, TokenTargets
from trainer.validation import retrieval, subject_embeddings

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


@dataclasses.dataclass
class EpochRecord:
    """What one epoch did: mean losses, the learning rate of its last step, throughput, validation."""

    epoch: int
    loss: dict[str, float]
    lr: float
    samples_per_s: float
    validation: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = [f"epoch {self.epoch + 1}", f"loss {self.loss['total']:.4f}", f"lr {self.lr:.2e}"]
        if self.validation:
            fwd = np.mean([v["forward"] for v in self.validation])
            bwd = np.mean([v["backward"] for v in self.validation])
            n_way = min(v["n_way"] for v in self.validation)
            parts.append(f"retrieval fwd {fwd:.3f} bwd {bwd:.3f} ({n_way}-way, chance {1 / n_way:.3f})")
        parts.append(f"{self.samples_per_s:.1f} samples/s")
        return ", ".join(parts)


class Pretrainer:
    """One experiment: builds everything from the config, then :meth:`fit` trains (resuming if it can)."""

    def __init__(self, config: TrainConfig, *, resume: bool = True) -> None:
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.run.mixed_precision,
            cpu=config.run.cpu,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.run.seed)
        self.dataset = self._dataset()
        self.tokens = self._token_targets()
        self.model_config = model_config(config, self.dataset, self.tokens.shape)
        self.n_steps = steps_per_epoch(self.dataset, config.recipe, self.accelerator.num_processes)
        self.schedule = loss_schedule(config.recipe)
        self._build_training(resume)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, until_epoch: int | None = None) -> list[EpochRecord]:
        """Train from the current epoch to the end (or through epoch ``until_epoch``, 1-based); return the records."""
        last = self.config.recipe.epochs if until_epoch is None else min(until_epoch, self.config.recipe.epochs)
        records = []
        for epoch in range(self.start_epoch, last):
            record = self._epoch(epoch)
            if (epoch + 1) % self.config.validation.every_epochs == 0 or epoch + 1 == self.config.recipe.epochs:
                record.validation = [v.to_dict() for v in self.validate()]
            self._log_epoch(record)
            records.append(record)
            if (epoch + 1) % self.config.run.checkpoint_every_epochs == 0 or epoch + 1 == last:
                self.save_checkpoint(epoch)
        if last == self.config.recipe.epochs:
            self.write_model()
        self.start_epoch = max(self.start_epoch, last)
        return records

    # ----------------------------------------------------------------------------------------- setup

    def _dataset(self) -> Dataset:
        with self.accelerator.main_process_first():
            dataset = load_dataset(self.config, progress=self.config.run.progress and self.is_main)
        log.info("data: %s", dataset.description)
        for subject in dataset.subjects:
            log.info(
                "  %s: %d voxels, %d train trials, %d test images (%s)",
                subject.name,
                subject.n_voxels,
                subject.n_train,
                subject.n_test_images,
                subject.origin,
            )
        return dataset

    def _token_targets(self) -> TokenTargets:
        targets = self.config.targets
        device = self.accelerator.device
        embedder, identity = load_embedder(self.config, device)
        cache = None if targets.cache_dir is None else Path(targets.cache_dir) / "tokens.npy"
        progress = self.config.run.progress and self.is_main
        tokens = TokenTargets(
            embedder, self.dataset.images, embedder_identity=identity, cache_path=cache, progress=progress
        )
        with self.accelerator.main_process_first():
            tokens.prepare()
        log.info("targets: %s", tokens.describe())
        return tokens

    def _low_level_targets(self) -> LatentTargets | None:
        """SD-VAE latent targets when the model has the low-level branch and a VAE folder is configured."""
        low = self.model_config.backbone.low_level
        targets = self.config.targets
        if low is None:
            log.info("low-level loss: off (the model has no low-level branch)")
            return None
        if targets.low_level_vae is None or self.config.recipe.blur_scale == 0:
            log.warning("low-level loss: OFF: targets.low_level_vae is not set (no SD-VAE latents); branch untrained")
            return None
        cache = None if targets.cache_dir is None else Path(targets.cache_dir) / f"latents-{low.latent_size}.npy"
        latents = LatentTargets.from_folder(
            Path(targets.low_level_vae),
            self.dataset.images,
            latent_size=low.latent_size,
            cache_path=cache,
            progress=self.config.run.progress and self.is_main,
        )
        with self.accelerator.main_process_first():
            latents.prepare()
        log.info("low-level loss: L1 on %s", latents.describe())
        log.warning("low-level loss: the VICRegL feature term (0.1 x cont) is not implemented; L1 only")
        return latents

    def _build_training(self, resume: bool) -> None:
        self.latents = self._low_level_targets()
        model = MindEye2(self.model_config)
        optimizer = make_optimizer(model, self.config.recipe)
        scheduler = make_scheduler(optimizer, self.config.recipe, self.n_steps)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:  # no DataLoader to infer it from
            batch = self.config.recipe.batch_per_subject * len(self.dataset.subjects)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.start_epoch = 0
        self.global_step = 0
        if resume:
            self._resume()
        log.info(
            "model: %s, %s; %d steps/epoch x %d epochs on %d process(es), device %s, precision %s",
            self.config.model.preset,
            self.model_config.subjects_text(),
            self.n_steps,
            self.config.recipe.epochs,
            self.accelerator.num_processes,
            self.accelerator.device,
            self.config.run.mixed_precision,
        )

    def _run_identity(self) -> dict[str, Any]:
        return {
            "model": self.model_config.to_dict(),
            "epochs": self.config.recipe.epochs,
            "steps_per_epoch": self.n_steps,
            "batch_per_subject": self.config.recipe.batch_per_subject,
            "n_processes": self.accelerator.num_processes,
            "seed": self.config.run.seed,
        }

    def _resume(self) -> None:
        found = checkpoints.latest(self.out_dir)
        if found is None:
            return
        folder, state = found
        checkpoints.check_resumable(folder, state, json.loads(json.dumps(self._run_identity())))
        self.accelerator.load_state(str(folder))
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        if self.is_main:
            self._forget_metrics_after(state["epoch"])
        log.info("resumed from %s: epoch %d done, step %d", folder, state["epoch"] + 1, self.global_step)

    def _forget_metrics_after(self, epoch: int) -> None:
        """Drop metrics lines of epochs after the checkpoint (run again after a crash), so each epoch has one."""
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
        if len(kept) != len(lines):
            log.info(
                "metrics: %d line(s) after epoch %d dropped (they will be run again)", len(lines) - len(kept), epoch + 1
            )
            path.write_text("".join(line + "\n" for line in kept))

    # ----------------------------------------------------------------------------------------- training

    def _epoch(self, epoch: int) -> EpochRecord:
        self.model.train()
        loss_kind = self.schedule[epoch]
        process = self.accelerator.process_index
        plan = batch_plan(
            self.dataset,
            self.config.recipe,
            seed=self.config.run.seed,
            epoch=epoch,
            process=process,
            n_steps=self.n_steps,
        )
        sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(
            total=self.n_steps,
            desc=f"epoch {epoch + 1}/{self.config.recipe.epochs} ({loss_kind.kind})",
            disable=not (self.config.run.progress and self.is_main),
            leave=False,
        )
        for step, positions in enumerate(plan):
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (recorded: the epoch's last)
            parts = self._step(positions, loss_kind, step_rng(self.config.run.seed, epoch, process, step))
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            self.global_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4f}")
        bar.close()
        elapsed_s = time.perf_counter() - started
        n_samples = self.n_steps * self.config.recipe.batch_per_subject * len(self.dataset.subjects)
        mean = {name: value / self.n_steps for name, value in sums.items()}
        return EpochRecord(epoch, mean, lr, n_samples * self.accelerator.num_processes / elapsed_s)

    def _step(self, positions: list[np.ndarray], loss_kind: EpochLoss, rng: np.random.Generator) -> dict[str, float]:
        device = self.accelerator.device
        voxels, images, mixings = [], [], []
        start = 0
        for subject, picked in zip(self.dataset.subjects, positions, strict=True):
            rows = subject.train_rows[picked]
            batch = torch.as_tensor(subject.betas[rows]).to(device=device, dtype=torch.float32)
            if loss_kind.kind == "bimixco":
                mixing = Mixing.draw(len(rows), rng, device)
                batch = mixing.apply(batch)
                mixings.append(mixing.offset(start))
            voxels.append(batch)
            images.append(subject.train_images[picked])
            start += len(rows)
        image_index = np.concatenate(images)
        clip_target = self.tokens.get(image_index).to(device)
        outputs, prior_loss = self.model(voxels, clip_target)
        brain, image = normalised(outputs.clip_voxels), normalised(clip_target)
        if loss_kind.kind == "bimixco":
            contrastive = bimixco_loss(brain, image, Mixing.concat(mixings), loss_kind.temperature)
        else:
            contrastive = soft_clip_loss(brain, image, loss_kind.temperature)
        recipe = self.config.recipe
        parts = {"prior": prior_loss, "contrastive": contrastive}
        total = recipe.prior_scale * prior_loss + recipe.clip_scale * contrastive
        if self.latents is not None:
            parts["low_level_l1"] = low_level_l1(outputs.low_level_latent, self.latents.get(image_index).to(device))
            total = total + recipe.blur_scale * parts["low_level_l1"]
        self.accelerator.backward(total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"total": total.item(), **{name: value.item() for name, value in parts.items()}}

    # ----------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> list:
        """Retrieval of every subject's test images (eval mode); see :mod:`trainer.validation`."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        results = []
        settings = self.config.validation
        with self.accelerator.autocast():
            for index, subject in enumerate(self.dataset.subjects):
                brain, test_images = subject_embeddings(model, subject, index)
                image = normalised(self.tokens.get(test_images).to(brain.device))
                results.append(retrieval(brain, image, subject.name, n_way=settings.n_way, n_draws=settings.n_draws))
        model.train()
        return results

    # ----------------------------------------------------------------------------------------- outputs

    def _log_epoch(self, record: EpochRecord) -> None:
        log.info("%s", record.summary())
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(dataclasses.asdict(record)) + "\n")

    def save_checkpoint(self, epoch: int) -> Path:
        folder = checkpoints.checkpoint_dir(self.out_dir, epoch + 1)
        self.accelerator.save_state(str(folder))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {**self._run_identity(), "epoch": epoch, "global_step": self.global_step}
            state["config"] = config_dict(self.config)
            checkpoints.write_state(folder, state)
            checkpoints.prune(self.out_dir, self.config.run.keep_checkpoints)
            log.info("checkpoint: %s", folder)
        self.accelerator.wait_for_everyone()
        return folder

    def write_model(self) -> Path | None:
        """The trained model as an rtdecode bundle in ``OUT/model`` (replaced if there)."""
        model = self.accelerator.unwrap_model(self.model)
        state = self.accelerator.get_state_dict(self.model)
        folder = self.out_dir / MODEL_DIR
        if not self.is_main:
            return None
        trained = MindEye2(self.model_config)
        trained.load_state_dict(state)
        provenance = {
            "source": f"rtdecode pretrain ({self.config.run.name})",
            "data": self.dataset.description,
            "epochs": self.config.recipe.epochs,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config": config_dict(self.config),
        }
        save_model_bundle(folder, trained, provenance=provenance, overwrite=True)
        log.info("model bundle: %s", folder)
        return folder
