"""Fixtures shared by the test modules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from tests.backend import Backend
from tests.processes import free_port, stop, twistd, wait_healthy
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


@pytest_twisted.async_yield_fixture
async def ingress_process(tmp_path: Path) -> AsyncIterator[tuple[Any, int]]:
    """
    The ingress as operators run it (twistd), with sandbox C{sbx} at
    127.0.0.1 and no WebSocket pings, so that its RSS can be measured:
    (process, port).
    """
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text(json.dumps([{"name": "sbx", "endpoint": "127.0.0.1"}]))
    port = free_port()
    proc = twistd(
        [
            "--provider-type",
            "file",
            "--sandboxes-file",
            str(sandboxes),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--websocket-ping-interval",
            "0",
        ]
    )
    try:
        await threads.deferToThread(wait_healthy, proc, port)
        yield proc, port
    finally:
        await threads.deferToThread(stop, proc)

from tests.conftest_redis import redis_server, redis_server_factory  # noqa: E402,F401
