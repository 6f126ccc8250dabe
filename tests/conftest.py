"""Shared fixtures: real servers on loopback, real key files, real trees on disk.

The classes and functions behind them live in helpers.py.
"""

from __future__ import annotations

import pytest
from helpers import ServerProcess, base_env, free_port


def pytest_configure(config):
    config.addinivalue_line("markers", "server_args(*flags): extra flags for the server fixture")


@pytest.fixture
def cache_dir(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    return str(path)


@pytest.fixture
def server(request, tmp_path, cache_dir):
    """A server on loopback; ``@pytest.mark.server_args(...)`` adds command-line flags."""
    marker = request.node.get_closest_marker("server_args")
    srv = ServerProcess(
        repo=str(tmp_path / "repo"),
        port=free_port(),
        env=base_env(cache_dir),
        log_path=str(tmp_path / "server.log"),
        extra=tuple(marker.args) if marker else (),
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server, cache_dir):
    return server.client(cache_dir)


@pytest.fixture
def key_file(tmp_path):
    from pysrbup.crypto.keyfile import write_key_file
    from pysrbup.crypto.keys import MasterKey

    path = str(tmp_path / "key")
    write_key_file(path, MasterKey.generate())
    return path


@pytest.fixture
def parts():
    """(master key, sealer, opener) sharing a fresh session key."""
    import os

    from pysrbup.crypto.keys import MasterKey
    from pysrbup.repo import envelope

    key = MasterKey.generate()
    key_id, session_key = os.urandom(16), os.urandom(32)
    wrapped = envelope.wrap_session_key(key.wrap_key, key_id, session_key)
    sealer = envelope.Sealer(key.mac_key, session_key, key_id)
    opener = envelope.Opener(key.mac_key, key.wrap_key, {key_id: wrapped})
    return key, sealer, opener
