"""
pytest fixtures for tests that need a real Redis.

Import them into C{tests/conftest.py} (or a test module)::

    from tests.conftest_redis import redis_server, redis_server_factory  # noqa: F401

A missing C{redis-server} fails the test with a clear message rather than
skipping it: CI installs the package, and a silent skip would hide that the
Redis paths went untested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, redis_server_executable


def _require_redis_server() -> None:
    if redis_server_executable() is None:
        pytest.fail("redis-server not found on PATH; install the redis-server package")


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """
    A function that starts a C{redis-server} (keyword C{acl_users}: ACL
    rules) in its own temporary directory; every one is stopped at teardown.
    """
    _require_redis_server()
    servers: list[RedisServer] = []

    def start(*, acl_users: Sequence[str] = ()) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", acl_users=acl_users)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A running C{redis-server} on a free 127.0.0.1 port, stopped at teardown."""
    return redis_server_factory()
