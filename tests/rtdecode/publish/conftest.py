"""Shared by the publish tests: a ZeroMQ context, and CURVE key pairs made with the real key tools."""

import shutil

import pytest
import zmq

from rtdecode.publish import keys


@pytest.fixture
def context():
    context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    yield context
    context.destroy(linger=0)


@pytest.fixture
def pairs(tmp_path):
    """A server pair, an authorised client, a stranger, and the authorised folder holding the client's key."""
    server_public, server_secret = keys.create_keypair(tmp_path / "keys", "server")
    client_public, client_secret = keys.create_keypair(tmp_path / "keys", "client")
    _, stranger_secret = keys.create_keypair(tmp_path / "keys", "stranger")
    authorised = tmp_path / "authorised"
    authorised.mkdir()
    shutil.copy(client_public, authorised)
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "client_secret": client_secret,
        "stranger_secret": stranger_secret,
        "authorised": authorised,
    }
