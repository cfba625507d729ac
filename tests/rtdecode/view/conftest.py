"""Fixtures shared by the display's tests."""

import pytest

from rtdecode.publish.publisher import Publisher

LOOPBACK = "tcp://127.0.0.1:*"


@pytest.fixture
def publisher():
    """A daemon-side publisher bound on random loopback ports."""
    with Publisher(LOOPBACK, LOOPBACK) as publisher:
        yield publisher
