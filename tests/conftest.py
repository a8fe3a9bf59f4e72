"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_twisted

from tests.backend import Backend


@pytest_twisted.async_yield_fixture
async def backend() -> AsyncIterator[Backend]:
    """A real HTTP backend on a free loopback port."""
    b = Backend().listen()
    yield b
    await b.stop()

from tests.conftest_redis import redis_server, redis_server_factory  # noqa: E402,F401
