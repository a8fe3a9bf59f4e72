"""
WebSocket sessions leave through the access log like every other exchange:
a session after its 101 and an upgrade refused before it are counted in the
request metrics (kind C{ws}) and written once through the twistd plugin's
direct line writer.  A real Autobahn backend and client on loopback, the
ingress on the file provider, its metrics scraped over the admin port.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import globalLogPublisher

from opensandbox_ingress import IngressService
from opensandbox_ingress.observability import LogOutput, install_access_log
from tests.helpers import raw_connect, request, start_ingress, wait_until
from tests.processes import free_port
from tests.ws_backend import WsBackend, connect_client

SANDBOXES = [{"name": "sbx", "endpoint": "127.0.0.1"}]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    service = await start_ingress(
        tmp_path,
        SANDBOXES,
        admin_listen=("tcp:0:interface=127.0.0.1",),
        websocket_ping_interval_s=0,
    )
    assert service.admin_listeners is not None
    await service.admin_listeners.when_listening()
    yield service
    await service.stopService()


async def scrape(service: IngressService) -> Samples:
    assert service.admin_listeners is not None
    port = service.admin_listeners.ports[0].getHost().port
    response, body = await request("GET", f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def ws_count(samples: Samples, status_class: str) -> float:
    key = (("kind", "ws"), ("mode", "header"), ("status_class", status_class))
    return samples.get(("opensandbox_ingress_requests_total", key), 0.0)


def ws_durations(samples: Samples) -> float:
    key = ("opensandbox_ingress_request_duration_seconds_count", (("kind", "ws"),))
    return samples.get(key, 0.0)


@pytest_twisted.ensureDeferred
async def test_session_and_refused_upgrade_reach_metrics_and_the_sink_once(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """Each WebSocket exchange is one ws line through the sink and one ws request in /metrics."""
    out = io.StringIO()
    # As the twistd plugin does; the output is not started, so lines go out at once.
    install_access_log(ingress, ingress.config, LogOutput(out))
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "opensandbox_ingress.access":
            events.append(event)

    before = await scrape(ingress)
    assert (ws_count(before, "1xx"), ws_count(before, "5xx"), ws_durations(before)) == (0, 0, 0)
    globalLogPublisher.addObserver(observe)
    try:
        port = ingress.addresses()[0].port
        client = await connect_client(port, f"sbx-{ws_backend.port_number}", path="/chan?token=s3")
        client.sendMessage(b"x" * 100, isBinary=True)  # echoed: 100 each way
        await wait_until(lambda: client.messages, what="echo")
        client.sendCloseFrame(code=1000, isReply=False)
        await wait_until(lambda: "status=101" in out.getvalue(), what="the session line")
        await wait_until(lambda: ingress.core.active_requests == 0, what="session end")

        # An upgrade to a port nothing listens on: refused before the 101.
        raw = await raw_connect(port)
        raw.transport.write(
            (
                "GET /gone HTTP/1.1\r\nHost: ingress.example.com\r\n"
                f"OpenSandbox-Ingress-To: sbx-{free_port()}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await wait_until(lambda: b"\r\n\r\n" in raw.received, timeout=15, what="the refusal")
        assert bytes(raw.received).startswith(b"HTTP/1.1 503 ")
        raw.transport.loseConnection()
        await wait_until(lambda: "status=503" in out.getvalue(), what="the refusal line")
    finally:
        globalLogPublisher.removeObserver(observe)

    assert events == [], "with a sink installed no access event is built"
    session, refused = out.getvalue().splitlines()
    assert session.count("[opensandbox_ingress.access#info] ws GET sandbox=sbx ") == 1
    assert f"port={ws_backend.port_number} path=/chan status=101 " in session
    assert " bytes_in=100 bytes_out=100 frames_in=1 frames_out=1 " in session
    assert " close_code=1000 closed_by=client " in session
    assert "s3" not in session
    assert " ws GET sandbox=sbx " in refused and " path=/gone status=503 bytes=" in refused

    after = await scrape(ingress)
    assert ws_count(after, "1xx") == 1
    assert ws_count(after, "5xx") == 1
    assert ws_durations(after) == 2
