"""The `stores` fixture: a Redis and a CouchDB-protocol server on loopback, one pair per test
module (tests/conftest.py offers it to every module; helpers.federation_run re-exports it)."""

from __future__ import annotations

import pytest

from trustmesh.stores.servers import CouchServer, RedisServer


@pytest.fixture(scope="module")
def stores():
    with RedisServer() as redis_server, CouchServer() as couch_server:
        yield redis_server, couch_server
