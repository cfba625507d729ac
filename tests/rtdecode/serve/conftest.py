"""Shared by the serve tests: tiny random-weight image models, written once."""

import pytest

from rtdecode.generate.random_components import write_random_components


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    return write_random_components(tmp_path_factory.mktemp("image-models"))
