"""One trial's beta in, its decoded outputs out, as message parts ready to publish.

The same :class:`TrialDecoder` runs inside ``rtdecode serve`` (one host) and inside each
``rtdecode decode-worker`` (GPU nodes): a job is a trial's z-scored beta (float32 bytes) with its ids and seed;
the decoder yields the parts as they become ready, cheapest first, so a display sees the retrieval matches and
the low-level preview within milliseconds and the image when generation ends:

1. ``retrieval``: the closest images of the retrieval pool (when ``[models] retrieval_pool`` is set);
2. ``preview``: the low-level image (when the model has the low-level head and a low-level VAE is configured);
3. ``caption`` then ``image``: the full reconstruction (when ``[serve] reconstruct`` is on).

Each part is ``(header, payload)``; the header's ``topic`` names the publish topic, and ``timings_ms`` says where
the worker's time went (milliseconds: worker clocks are not the scanner host's).
"""

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rtdecode.config import Config
from rtdecode.errors import ServeError

log = logging.getLogger(__name__)


def trial_seed(subject: str, session: int, run: int, trial_id: str) -> int:
    """The generation seed of a trial: the same trial gives the same image after a restart or on another worker."""
    digest = hashlib.sha256(f"{subject}/{session}/{run}/{trial_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How parts are encoded."""

    image_format: str = "jpeg"
    jpeg_quality: int = 90


class TrialDecoder:
    """Decodes jobs (``header`` with ``subject``, ``n_voxels``, ``seed``; ``payload`` the float32 beta)."""

    def __init__(self, reconstructor: Any, settings: DecodeSettings = DecodeSettings()) -> None:
        self.reconstructor = reconstructor
        self.settings = settings

    @property
    def subject(self) -> str:
        return self.reconstructor.subject

    @property
    def n_voxels(self) -> int:
        config = self.reconstructor.model.config
        return config.n_voxels[config.subject_index(self.subject)]

    def describe(self) -> str:
        """One line: what this decoder produces."""
        pipeline = self.reconstructor.pipeline
        images = pipeline.describe() if pipeline is not None else "no image generation (embeddings only)"
        pool = self.reconstructor.retrieval
        retrieval = f"retrieval pool of {len(pool)} images" if pool is not None else "no retrieval pool"
        return f"subject {self.subject}, {self.n_voxels} voxels, {retrieval}, {images}"

    def warm_up(self) -> None:
        """Run one trial of zeros through every stage, so the first real trial pays no lazy initialisation (a
        TensorRT engine also captures its CUDA graph at its first call)."""
        header = {"subject": self.subject, "n_voxels": self.n_voxels, "seed": 0}
        for _ in self.parts(header, np.zeros(self.n_voxels, np.float32).tobytes()):
            pass

    def __call__(self, job: Any) -> Iterator[tuple[dict, bytes]]:
        """The worker-handler form: a job with ``header`` and ``payload``."""
        return self.parts(job.header, job.payload)

    def parts(self, header: Mapping[str, Any], payload: bytes) -> Iterator[tuple[dict, bytes]]:
        """Yield ``(header, payload)`` per output, cheapest first. ServeError names a job this decoder cannot do."""
        vector = self._vector(header, payload)
        preview = self.reconstructor.preview(vector[None])
        if preview.matches is not None:
            matches = [{"id": match.id, "score": round(float(match.score), 6)} for match in preview.matches[0]]
            yield {"topic": "retrieval", "matches": matches, "timings_ms": _rounded(preview.timings_ms)}, b""
        if preview.low_level is not None:
            yield self._image_part("preview", preview.low_level[0], preview.timings_ms)
        if self.reconstructor.pipeline is None:
            return
        result = self.reconstructor.reconstruct(preview, seed=int(header["seed"]))[0]
        if result.caption is not None:
            yield {"topic": "caption", "caption": result.caption, "timings_ms": _rounded(result.timings_ms)}, b""
        header, image = self._image_part("image", result.final, result.timings_ms)
        yield {**header, "seed": result.seed}, image

    def _vector(self, header: Mapping[str, Any], payload: bytes) -> np.ndarray:
        if header.get("subject") != self.subject:
            raise ServeError(f"job for subject {header.get('subject')!r}; this decoder holds {self.subject!r}")
        n_voxels = len(payload) // 4
        if len(payload) % 4 or n_voxels != self.n_voxels:
            raise ServeError(f"job beta has {len(payload)} bytes; expected {self.n_voxels} float32 voxels")
        vector = np.frombuffer(payload, np.float32).copy()  # writable, for torch
        if not np.all(np.isfinite(vector)):
            raise ServeError("job beta holds NaN or infinite values")
        return vector

    def _image_part(self, topic: str, pixels: np.ndarray, timings_ms: Mapping[str, float]) -> tuple[dict, bytes]:
        from rtdecode.generate.images import encode_image

        encoded = encode_image(pixels, self.settings.image_format, self.settings.jpeg_quality)
        height, width = pixels.shape[:2]
        header = {
            "topic": topic,
            "payload": {"encoding": self.settings.image_format, "shape": [height, width, 3]},
            "width": width,
            "height": height,
            "timings_ms": _rounded(timings_ms),
        }
        return header, encoded


def _rounded(timings_ms: Mapping[str, float]) -> dict[str, float]:
    return {stage: round(float(ms), 3) for stage, ms in timings_ms.items()}


def load_decoder(config: Config, bundle_dir: Path) -> TrialDecoder:
    """The subject bundle's model with the configured image models and retrieval pool, on ``[generate] device``,
    running the bundle's compiled engines where they are fresh (``[generate] engines``; the log says which)."""
    from rtdecode.generate.pipeline import ImagePipeline
    from rtdecode.models.retrieval import RetrievalIndex
    from rtdecode.reconstruct import Reconstructor
    from rtdecode.stage_engines import attach_engines
    from rtdecode.subject_bundle import load_subject_bundle

    bundle = load_subject_bundle(bundle_dir, load_model=True, device=config.generate.device)
    pipeline = ImagePipeline.from_config(config.models, config.generate) if config.serve.reconstruct else None
    converter = bundle.model.converter if pipeline is not None and pipeline.captioner is not None else None
    pool = config.models.retrieval_pool
    retrieval = RetrievalIndex.load(pool) if pool is not None else None
    reconstructor = Reconstructor(
        bundle.model.model, bundle.subject, pipeline, converter=converter, retrieval=retrieval
    )
    attach_engines(reconstructor, config, bundle)
    settings = DecodeSettings(image_format=config.serve.image_format, jpeg_quality=config.serve.jpeg_quality)
    return TrialDecoder(reconstructor, settings)
