"""One subject with tiny random models whose engines are built once (ONNX for onnxruntime, on the CPU)."""

import dataclasses

import pytest

from deploy.build import BuildSettings, build_engines, load_graphs
from rtdecode.engines.manifest import EngineManifest
from rtdecode.stage_graphs import StageGraph
from tests.deploy.engine_site import SUBJECT, EngineSite, make_engine_site


@dataclasses.dataclass
class Built:
    site: EngineSite
    manifest: EngineManifest
    graphs: dict[str, StageGraph]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    site = make_engine_site(tmp_path_factory.mktemp("engine-site"))
    config = site.config()
    manifest = build_engines(config, SUBJECT, BuildSettings(backend="onnx", precision="fp32", device="cpu"))
    graphs = {graph.stage: graph for graph in load_graphs(config, SUBJECT, "cpu")}
    return Built(site, manifest, graphs)
