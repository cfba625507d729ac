"""A subject with a tiny random model and tiny image models, and a config naming them: what build-engines,
verify-engines and the decoder read."""

import dataclasses
from pathlib import Path

from rtdecode.bench.serve import write_random_subject_bundle
from rtdecode.config import GlmConfig, load_config
from rtdecode.generate.random_components import write_random_components
from rtdecode.sim.live import LiveSession
from rtdecode.sim.world import SyntheticWorld, WorldConfig
from rtdecode.stage_engines import ENGINES_DIR
from rtdecode.store import Store
from tests.rtdecode.serve.site import FAST_IMAGES, SUBJECT, toml_text


@dataclasses.dataclass
class EngineSite:
    folder: Path
    config_path: Path
    components: dict[str, Path]

    def config(self, *overrides: str):
        return load_config(self.config_path, overrides, environ={})[0]

    @property
    def engines_dir(self) -> Path:
        return Store(self.folder / "home").bundle_dir(SUBJECT) / ENGINES_DIR


def make_engine_site(folder: Path, components: dict[str, Path] | None = None) -> EngineSite:
    world = SyntheticWorld(WorldConfig(trials_per_run=4))
    layout = LiveSession(world, SUBJECT, 1, folder / "session", runs=(1,), n_volumes=8, shape=(14, 16, 12)).prepare()
    write_random_subject_bundle(
        folder / "home", SUBJECT, layout.region_mask_path, layout.reference_path, GlmConfig(), hidden_dim=24
    )
    components = components or write_random_components(folder / "image-models")
    config = {
        "paths": {"home": str(folder / "home")},
        "subject": {"id": SUBJECT},
        "models": {key: str(value) for key, value in components.items()},
        "generate": FAST_IMAGES,
    }
    config_path = folder / "config.toml"
    config_path.write_text(toml_text(config))
    return EngineSite(folder, config_path, components)
