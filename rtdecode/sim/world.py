"""The synthetic world: stimuli and synthetic subjects whose voxels respond to image features, with known truth.

It stands in for NSD when no data may be read (tests, CPU smoke training). Each image is a deterministic
function of a latent ``z ~ N(0, I)`` of ``n_features`` dimensions; each subject's voxels respond to ``z``
linearly (their *tuning*), and a run's BOLD is those responses put through the HRF with baseline, drift,
motion artefact and AR(1) noise (:func:`rtdecode.sim.trials.synthetic_bold`). So a decoder trained on the
world's betas has a right answer to find: the latent, hence the image.

Like NSD (spec §3.2): the test images are shared by every subject and shown 3 times each (``n_test_reps``);
every subject's train images are its own and shown once; runs follow NSD timing (TR 1.6 s, 3 s image + 1 s gap).

Noise levels (the defaults) are NSD-like. A trial's beta fitted by least squares on NSD timing (intercept,
cubic drift and motion as nuisance) has a noise sd of about ``0.45 * noise_sd`` (AR(1) 0.3; neighbouring
trials overlap), 5.4 for ``noise_sd = 12``; with ``signal_sd = 2`` and per-voxel gains drawn from a gamma
distribution, a voxel's noise ceiling SNR (NSD's ncsnr) has median 0.3 and mean 0.37 (nsdgeneral voxels span
about 0.2-0.6), and fitted betas correlate with the true ones at a median r of 0.28. Single trials are mostly
noise per voxel; the latent is still decodable from ~300 voxels together (measured, seed 0, 8 subjects: a
ridge from fitted betas to the latent, fitted on train trials, identifies all 60 test images with their 3
repetitions averaged, and 88% of single test trials; decoded latent r 0.88).

Everything is a function of ``WorldConfig.seed``: each purpose (latents, textures, patterns, shared tuning,
a subject's tuning, schedule and noise) draws from its own ``SeedSequence`` keyed by the purpose and, where
it has one, the subject's name (a subject's train images too), so adding, removing or changing one subject
leaves every other subject's images, tuning, schedule and BOLD as they were (its image indices may shift).
"""

import dataclasses
import math
import zlib

import numpy as np

from rtdecode.errors import ConfigError
from rtdecode.sim import trials

N_TEST_REPS = 3  # default presentations of each shared test image per subject, as NSD's shared1000 (spec §3.2)
MAX_TRIALS_PER_RUN = 63  # NSD runs: 62-63 trials plus 10 blanks in 4 s slots fit in 188 volumes of 1.6 s

# One SeedSequence spawn-key slot per purpose, so streams never overlap.
_LATENTS, _TEXTURES, _PATTERNS, _SHARED_TUNING, _TUNING, _SCHEDULE, _NOISE = range(7)
_TEST_BLOCK = 2**32  # the shared test images' stream key; subjects' keys are CRC-32s, below 2**32

_N_WAVES_PER_PATTERN = 6  # plane waves summed into one colour pattern
_MAX_CYCLES_PER_IMAGE = 2  # the patterns' highest spatial frequency: smooth, visibly different images
_IMAGE_GAIN = 1.5  # logit gain of the latent's pattern mix: pixels spread over most of (0, 1)
_TEXTURE_SD = 0.2  # per-image logit noise: image detail that no voxel encodes
_GAIN_SHAPE = 2.0  # per-voxel signal gains ~ Gamma(2, 1/2): mean 1, many weak voxels, a few strong ones
_MEAN_RESPONSE = (1.0, 2.0)  # every image drives visual voxels: mean response in units of signal_sd


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What the world holds and how noisy it is.

    ``signal_sd`` is the sd across images of an average voxel's response amplitude (BOLD units per second of
    stimulus, on a baseline near 1000, as :func:`trials.synthetic_bold`); ``noise_sd`` and ``ar1`` are the
    time series noise. ``shared_rank`` feature directions, common to all subjects, carry ``shared_fraction``
    of every voxel's tuning (visual cortex agrees across people on what matters); the rest is the subject's
    own. ``n_runs_per_session`` None puts all runs in session 1.
    """

    seed: int = 0
    n_features: int = 16
    image_size_px: int = 32
    subjects: tuple[str, ...] = ("syn01", "syn02", "syn03", "syn04", "syn05", "syn06", "syn07", "syn08")
    n_voxels: tuple[int, ...] = (301, 287, 313, 276, 295, 308, 282, 290)
    n_test_images: int = 60
    n_train_images: int = 240
    n_test_reps: int = N_TEST_REPS
    trials_per_run: int = 62
    n_runs_per_session: int | None = None
    signal_sd: float = 2.0
    noise_sd: float = 12.0
    ar1: float = 0.3
    shared_rank: int = 4
    shared_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("n_features", "image_size_px", "n_test_images", "n_train_images", "n_test_reps", "trials_per_run"):
            _require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        _require(
            self.trials_per_run <= MAX_TRIALS_PER_RUN,
            "trials_per_run",
            "must fit an NSD run (<= 63)",
            self.trials_per_run,
        )
        if self.n_runs_per_session is not None:
            _require(
                self.n_runs_per_session >= 1,
                "n_runs_per_session",
                "must be None or at least 1",
                self.n_runs_per_session,
            )
        self._check_subjects()
        for name in ("signal_sd", "noise_sd"):
            _require(getattr(self, name) > 0, name, "must be positive", getattr(self, name))
        _require(0 <= self.ar1 < 1, "ar1", "must lie in [0, 1)", self.ar1)
        _require(
            0 <= self.shared_rank <= self.n_features, "shared_rank", "must lie in [0, n_features]", self.shared_rank
        )
        _require(0 <= self.shared_fraction <= 1, "shared_fraction", "must lie in [0, 1]", self.shared_fraction)

    def _check_subjects(self) -> None:
        _require(len(self.subjects) >= 1, "subjects", "must name at least one subject", self.subjects)
        _require(
            all(isinstance(s, str) and s for s in self.subjects), "subjects", "must be non-empty strings", self.subjects
        )
        _require(len(set(self.subjects)) == len(self.subjects), "subjects", "must be distinct", self.subjects)
        _require(
            len(self.n_voxels) == len(self.subjects),
            "n_voxels",
            f"must give one count per subject ({len(self.subjects)})",
            self.n_voxels,
        )
        _require(all(n >= 1 for n in self.n_voxels), "n_voxels", "must all be at least 1", self.n_voxels)


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"WorldConfig.{field} {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SyntheticSubject:
    """A subject's ground truth: voxel ``v`` responds to an image of latent ``z`` with
    ``mean_response[v] + tuning[v] @ z`` (BOLD units, the betas of :func:`trials.synthetic_bold`)."""

    name: str
    n_voxels: int
    tuning: np.ndarray  # (n_voxels, n_features)
    mean_response: np.ndarray  # (n_voxels,)

    def true_betas(self, features: np.ndarray) -> np.ndarray:
        """Response amplitudes (n, n_voxels) to images with latents ``features`` (n, n_features)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.tuning.shape[1]:
            raise ConfigError(
                f"subject {self.name!r}: features must be (n, n_features={self.tuning.shape[1]}), got {features.shape}"
            )
        return self.mean_response + features @ self.tuning.T


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run of a subject's schedule: its NSD-timed design (stimulus ids are image ids) and, per trial,
    the image index and whether the image is a shared test image or one of the subject's train images."""

    session: int  # 1-based
    run: int  # 1-based within the session
    design: trials.TrialDesign
    image_indices: np.ndarray  # int64, per trial
    splits: tuple[str, ...]  # per trial "train" or "test"


class SyntheticWorld:
    """The images, the subjects and their schedules of one :class:`WorldConfig`.

    Image indices: ``[0, n_test_images)`` are the shared test images, then each subject's
    ``n_train_images`` train images in the order of ``config.subjects``.
    """

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.n_images = config.n_test_images + len(config.subjects) * config.n_train_images
        self.image_ids = tuple(f"img-{k:05d}" for k in range(self.n_images))
        self.test_images = np.arange(config.n_test_images, dtype=np.int64)
        self._latents = np.concatenate(
            [
                _rng(config.seed, _LATENTS, block).standard_normal((size, config.n_features))
                for block, size in self._blocks()
            ]
        )
        self._patterns = _colour_patterns(_rng(config.seed, _PATTERNS), config.n_features, config.image_size_px)
        shared_basis = _orthonormal_rows(_rng(config.seed, _SHARED_TUNING), config.shared_rank, config.n_features)
        self._subjects = {
            name: _make_subject(config, name, n_voxels, shared_basis)
            for name, n_voxels in zip(config.subjects, config.n_voxels, strict=True)
        }

    def subject(self, name: str) -> SyntheticSubject:
        if name not in self._subjects:
            raise ConfigError(f"subject {name!r} is not in this world; its subjects are {self.config.subjects}")
        return self._subjects[name]

    def train_images(self, subject: str) -> np.ndarray:
        """The subject's own train images (int64 indices), each shown once."""
        self.subject(subject)
        start = self.config.n_test_images + self.config.subjects.index(subject) * self.config.n_train_images
        return np.arange(start, start + self.config.n_train_images, dtype=np.int64)

    def features(self, indices: np.ndarray) -> np.ndarray:
        """The latent of each image: float64 (n, n_features)."""
        return self._latents[self._checked(indices)]

    def images(self, indices: np.ndarray) -> np.ndarray:
        """Images float32 (n, 3, H, W) in (0, 1): ``sigmoid(gain * mix of colour patterns by z + texture)``."""
        indices = self._checked(indices)
        mix = np.tensordot(self._latents[indices], self._patterns, axes=1) / math.sqrt(self.config.n_features)
        textures = np.array([self._texture(int(k)) for k in indices]).reshape(mix.shape)
        logits = _IMAGE_GAIN * mix + textures
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def runs(self, subject: str) -> list[RunPlan]:
        """The subject's whole schedule: every train image once, every test image ``n_test_reps`` times in as many runs,
        shuffled, at most ``trials_per_run`` trials per run (spread evenly, so no run is nearly empty)."""
        self.subject(subject)
        rng = _rng(self.config.seed, _SCHEDULE, _name_key(subject))
        run_trials = _deal_trials(
            rng, self.test_images, self.train_images(subject), self.config.trials_per_run, self.config.n_test_reps
        )
        per_session = self.config.n_runs_per_session or len(run_trials)
        return [
            self._plan(rng, index // per_session + 1, index % per_session + 1, images)
            for index, images in enumerate(run_trials)
        ]

    def bold(self, subject: str, plan: RunPlan) -> trials.SyntheticBold:
        """The run's masked BOLD: the subject's true responses to its images, HRF-convolved, with baseline,
        drift, motion artefact and AR(1) noise drawn from the (subject, session, run) stream."""
        person = self.subject(subject)
        betas = person.true_betas(self.features(plan.image_indices))
        seed = _int_seed(self.config.seed, _NOISE, _name_key(subject), plan.session, plan.run)
        return trials.synthetic_bold(
            plan.design, person.n_voxels, seed=seed, noise_sd=self.config.noise_sd, ar1=self.config.ar1, betas=betas
        )

    def _plan(self, rng: np.random.Generator, session: int, run: int, images: np.ndarray) -> RunPlan:
        ids = [self.image_ids[k] for k in images]
        design = trials.nsd_design(seed=int(rng.integers(2**32)), n_trials=images.size, stimulus_ids=ids)
        splits = tuple("test" if k < self.config.n_test_images else "train" for k in images)
        return RunPlan(session, run, design, images, splits)

    def _blocks(self) -> list[tuple[int, int]]:
        """(stream key, n_images) of the test images, then of each subject's train images: a subject's images
        depend on its name, not on its place in ``config.subjects``."""
        own = [(_name_key(name), self.config.n_train_images) for name in self.config.subjects]
        return [(_TEST_BLOCK, self.config.n_test_images), *own]

    def _texture(self, index: int) -> np.ndarray:
        n_test, n_train = self.config.n_test_images, self.config.n_train_images
        if index < n_test:
            block, position = _TEST_BLOCK, index
        else:
            block, position = _name_key(self.config.subjects[(index - n_test) // n_train]), (index - n_test) % n_train
        size_px = self.config.image_size_px
        return _rng(self.config.seed, _TEXTURES, block, position).normal(0.0, _TEXTURE_SD, (3, size_px, size_px))

    def _checked(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ConfigError(f"image indices must be a 1-d integer array, got {indices.dtype} {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_images):
            raise ConfigError(f"image indices must lie in [0, {self.n_images}), got {indices.min()}..{indices.max()}")
        return indices.astype(np.int64)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _int_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


def _name_key(name: str) -> int:
    """A stable integer for a subject's name (Python's ``hash`` of a str changes between processes)."""
    return zlib.crc32(name.encode("utf-8"))


def _colour_patterns(rng: np.random.Generator, n_features: int, size_px: int) -> np.ndarray:
    """``n_features`` smooth colour patterns (n_features, 3, H, W), each a sum of low-frequency plane waves
    with random colours, scaled to zero mean and unit sd."""
    grid = np.arange(size_px) / size_px
    y, x = np.meshgrid(grid, grid, indexing="ij")
    patterns = np.zeros((n_features, 3, size_px, size_px))
    for pattern in patterns:
        for _ in range(_N_WAVES_PER_PATTERN):
            cycles_y, cycles_x = _wave_cycles(rng)
            wave = np.cos(2 * np.pi * (cycles_y * y + cycles_x * x) + rng.uniform(0, 2 * np.pi))
            pattern += rng.standard_normal(3)[:, None, None] * wave
    patterns -= patterns.mean(axis=(1, 2, 3), keepdims=True)
    return patterns / patterns.std(axis=(1, 2, 3), keepdims=True)


def _wave_cycles(rng: np.random.Generator) -> tuple[int, int]:
    """A non-zero spatial frequency, in cycles per image, of at most ``_MAX_CYCLES_PER_IMAGE`` per axis."""
    while True:
        cycles_y, cycles_x = rng.integers(-_MAX_CYCLES_PER_IMAGE, _MAX_CYCLES_PER_IMAGE + 1, 2)
        if cycles_y or cycles_x:
            return int(cycles_y), int(cycles_x)


def _orthonormal_rows(rng: np.random.Generator, n_rows: int, n_columns: int) -> np.ndarray:
    """``n_rows`` random orthonormal directions in ``n_columns`` dimensions, (n_rows, n_columns)."""
    q, _ = np.linalg.qr(rng.standard_normal((n_columns, max(n_rows, 1))))
    return q.T[:n_rows]


def _make_subject(config: WorldConfig, name: str, n_voxels: int, shared_basis: np.ndarray) -> SyntheticSubject:
    """Tuning = signal_sd * gain * unit direction; a direction mixes the shared basis and the subject's own."""
    rng = _rng(config.seed, _TUNING, _name_key(name))
    rank = shared_basis.shape[0]
    shared = rng.standard_normal((n_voxels, rank)) @ shared_basis / math.sqrt(max(rank, 1))
    own = rng.standard_normal((n_voxels, config.n_features)) / math.sqrt(config.n_features)
    directions = math.sqrt(config.shared_fraction) * shared + math.sqrt(1 - config.shared_fraction) * own
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    gains = rng.gamma(_GAIN_SHAPE, 1.0 / _GAIN_SHAPE, n_voxels)
    tuning = config.signal_sd * gains[:, None] * directions
    mean_response = config.signal_sd * rng.uniform(*_MEAN_RESPONSE, n_voxels)
    return SyntheticSubject(name, n_voxels, tuning, mean_response)


def _deal_trials(
    rng: np.random.Generator, test_images: np.ndarray, train_images: np.ndarray, trials_per_run: int, n_reps: int
) -> list[np.ndarray]:
    """Split a subject's trials into runs: each test image's ``n_reps`` repetitions go to consecutive runs (dealt
    round-robin, so they never share a run), train images fill the rest; each run is then shuffled."""
    test_trials = np.repeat(rng.permutation(test_images), n_reps)
    sequence = np.concatenate([test_trials, rng.permutation(train_images)])
    n_runs = max(n_reps if test_images.size else 1, math.ceil(sequence.size / trials_per_run))
    return [rng.permutation(sequence[run::n_runs]).astype(np.int64) for run in range(n_runs)]
