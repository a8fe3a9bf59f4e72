"""
WebSocket sessions follow their sandbox: removed, recreated, moved or
re-tokened sandboxes end their open sessions with 1001 on both hops;
status updates do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from opensandbox_ingress.registry import SandboxRecord
from opensandbox_ingress.web.websocket import session_end_reason
from tests.helpers import start_ingress, wait_until, write_sandboxes
from tests.ws_backend import WsBackend, connect_client

BASE = SandboxRecord(
    name="sb",
    namespace="ns",
    endpoint="10.0.0.1",
    secure_access_token=None,
    generation="uid-1/41",
    incarnation="uid-1",
)


def _with(**changes: Any) -> SandboxRecord:
    fields = {
        "name": BASE.name,
        "namespace": BASE.namespace,
        "endpoint": BASE.endpoint,
        "ready": BASE.ready,
        "not_ready_reason": BASE.not_ready_reason,
        "secure_access_token": BASE.secure_access_token,
        "generation": BASE.generation,
        "incarnation": BASE.incarnation,
    }
    fields.update(changes)
    return SandboxRecord(**fields)


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (None, ("removed", "sandbox sb was removed")),
        (_with(incarnation="uid-2", generation="uid-2/1"), ("recreated", "sandbox sb was recreated")),
        (_with(endpoint="10.0.0.9"), ("moved", "sandbox sb moved to another endpoint")),
        (_with(secure_access_token="t"), ("token_changed", "sandbox sb changed its access token")),
        (_with(generation="uid-1/42"), None),
        (_with(ready=False, not_ready_reason="pod restarting", generation="uid-1/43"), None),
        (BASE, None),
    ],
    ids=["removed", "recreated", "moved", "token", "resource-version", "readiness", "same"],
)
def test_session_end_reason(new: SandboxRecord | None, expected: tuple[str, str] | None) -> None:
    """Removal, a new uid, a new endpoint or token end a session; status updates do not."""
    assert session_end_reason(BASE, new) == expected


async def _session(tmp_path: Path, sandboxes: list[dict[str, Any]]) -> tuple[Any, Any, Any, Any]:
    backend = WsBackend().listen()
    service = await start_ingress(tmp_path, sandboxes, websocket_ping_interval_s=0)
    port = int(service.addresses()[0].port)
    client = await connect_client(port, f"sb-{backend.port_number}")
    await wait_until(lambda: backend.opened, what="backend open")
    return service, backend, client, backend.opened[-1]


def _ended_metric(service: Any, reason: str) -> float:
    for line in service.core.metrics.exposition().decode().splitlines():
        prefix = f'opensandbox_ingress_websocket_sessions_ended_by_sandbox_total{{reason="{reason}"}} '
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


@pytest_twisted.ensureDeferred
async def test_removing_the_sandbox_closes_its_sessions_with_1001(tmp_path: Path) -> None:
    """A sandbox removed from the file ends its session: 1001 with its name on both hops."""
    service, backend, client, peer = await _session(
        tmp_path, [{"name": "sb", "endpoint": "127.0.0.1"}, {"name": "other", "endpoint": "127.0.0.1"}]
    )
    try:
        client.sendMessage(b"before", isBinary=True)
        await wait_until(lambda: client.messages, what="echo")
        write_sandboxes(tmp_path / "sandboxes.json", [{"name": "other", "endpoint": "127.0.0.1"}])
        await wait_until(lambda: client.closed and peer.closed, timeout=10, what="both closed")
        assert client.closed == (True, 1001, "sandbox sb was removed")
        assert peer.closed == (True, 1001, "sandbox sb was removed")
        await wait_until(lambda: not service.websocket.sessions, what="session finished")
        assert _ended_metric(service, "removed") == 1
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_moving_the_sandbox_closes_its_sessions(tmp_path: Path) -> None:
    """A new endpoint ends the session (the old address may be someone else's now)."""
    service, backend, client, peer = await _session(tmp_path, [{"name": "sb", "endpoint": "127.0.0.1"}])
    try:
        write_sandboxes(tmp_path / "sandboxes.json", [{"name": "sb", "endpoint": "127.0.0.2"}])
        await wait_until(lambda: client.closed and peer.closed, timeout=10, what="both closed")
        assert client.closed == (True, 1001, "sandbox sb moved to another endpoint")
        assert _ended_metric(service, "moved") == 1
    finally:
        await service.stopService()
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_readiness_flip_and_other_sandboxes_leave_the_session_open(tmp_path: Path) -> None:
    """Marking the sandbox not ready, or removing another one, leaves its session alone."""
    path = tmp_path / "sandboxes.json"
    service, backend, client, peer = await _session(
        tmp_path, [{"name": "sb", "endpoint": "127.0.0.1"}, {"name": "other", "endpoint": "127.0.0.1"}]
    )
    try:
        write_sandboxes(path, [{"name": "sb", "endpoint": "127.0.0.1", "ready": False}])
        await wait_until(
            lambda: "other" not in {r.name for r in service.core.registry.records()},
            timeout=10,
            what="the file reloaded",
        )
        client.sendMessage(b"still here", isBinary=True)
        await wait_until(lambda: client.messages or client.closed, what="echo")
        assert client.closed is None and peer.closed is None
        assert client.messages[-1].payload == b"still here"
        assert _ended_metric(service, "removed") == 0
    finally:
        await service.stopService()
        await backend.stop()
