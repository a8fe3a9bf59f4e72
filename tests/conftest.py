"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_twisted

from tests.backend import Backend
from tests.ws_backend import WsBackend


@pytest_twisted.async_yield_fixture
async def backend() -> AsyncIterator[Backend]:
    """A real HTTP backend on a free loopback port."""
    b = Backend().listen()
    yield b
    await b.stop()


@pytest_twisted.async_yield_fixture
async def ws_backend() -> AsyncIterator[WsBackend]:
    """A real WebSocket backend (Autobahn, echoing) on a free loopback port."""
    backend = WsBackend().listen()
    yield backend
    await backend.stop()

from tests.conftest_redis import redis_server, redis_server_factory  # noqa: E402,F401
