"""
A client that stalls mid-upload is the client's fault, not the sandbox's:
408 C{client_timeout} (or, once the response has started, a closed
connection), counted in C{client_errors_total} and logged with 408, while
C{upstream_errors_total} does not move.  Real loopback sockets through a
running ingress, on both engines: a C{Content-Length} upload takes the fast
path, a chunked one C{twisted.web}.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, globalLogPublisher

from opensandbox_ingress import IngressService
from tests.backend import RawBackend
from tests.helpers import raw_connect, request, start_ingress, wait_until

SANDBOXES: list[dict[str, Any]] = [{"name": "sbx", "endpoint": "127.0.0.1"}]
#: Short enough for a quick test, long enough that a loaded machine moves
#: the first half of the body well within it.
IDLE_TIMEOUT_S = 0.5

#: Request heads by framing; the body that follows is half sent, then stalls.
HEADS = {
    # Content-Length: the fast path.
    "content-length": b"PUT /up HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
    b"Content-Length: 200000\r\n\r\n",
    # Chunked: twisted.web.
    "chunked": b"PUT /up HTTP/1.1\r\nOpenSandbox-Ingress-To: sbx-%d\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
}
HALF = 100000


def half_body(framing: str) -> bytes:
    """The first half of the upload, framed as the head announced."""
    if framing == "chunked":
        return b"%x\r\n%s\r\n" % (HALF, b"a" * HALF)
    return b"a" * HALF


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    """An ingress with a short idle timeout and an admin listener."""
    service = await start_ingress(
        tmp_path,
        SANDBOXES,
        idle_timeout_s=IDLE_TIMEOUT_S,
        admin_listen=("tcp:0:interface=127.0.0.1",),
    )
    assert service.admin_listeners is not None
    await service.admin_listeners.when_listening()
    yield service
    await service.stopService()


@pytest.fixture
def access_events() -> Iterator[list[dict[str, Any]]]:
    """Access-log events emitted during the test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "opensandbox_ingress.access":
            events.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


async def scrape(service: IngressService) -> dict[str, float]:
    """The ingress's counters from its admin C{/metrics}, by series."""
    assert service.admin_listeners is not None
    port = service.admin_listeners.ports[0].getHost().port
    response, body = await request("GET", f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    series: dict[str, float] = {}
    for line in body.decode().splitlines():
        match = re.fullmatch(r"(opensandbox_ingress_\w+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            series[match.group(1)] = float(match.group(2))
    return series


CLIENT_TIMEOUTS = 'opensandbox_ingress_client_errors_total{reason="timeout"}'
UPSTREAM = 'opensandbox_ingress_upstream_errors_total{reason="%s"}'


async def assert_blamed_on_client(
    service: IngressService, before: dict[str, float], access: list[dict[str, Any]]
) -> None:
    """One client timeout counted and logged as 408; no upstream error of any kind."""
    after = await scrape(service)
    assert after[CLIENT_TIMEOUTS] == before[CLIENT_TIMEOUTS] + 1
    for reason in ("connect", "timeout", "reset"):
        assert after[UPSTREAM % reason] == before[UPSTREAM % reason], reason
    await wait_until(lambda: access, what="the access line")
    assert [(e["method"], e["sandbox"], e["status"]) for e in access] == [("PUT", "sbx", 408)]


@pytest.mark.parametrize("framing", sorted(HEADS))
@pytest_twisted.ensureDeferred
async def test_upload_stalled_before_the_response_gets_408(
    ingress: IngressService, access_events: list[dict[str, Any]], framing: str
) -> None:
    """Half a body, then silence, with the backend waiting for the rest: 408 client_timeout."""
    raw = RawBackend().listen()
    try:
        before = await scrape(ingress)
        client = await raw_connect(ingress.addresses()[0].port)
        client.transport.write(HEADS[framing] % raw.port_number + half_body(framing))
        await wait_until(lambda: raw.body_bytes >= HALF, what="the first half at the backend")
        await wait_until(lambda: client.lost, timeout=10, what="the ingress to close")
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert re.search(rb"(?im)^opensandbox-ingress-error: client_timeout\r?$", head)
        assert re.search(rb"(?im)^connection: close\r?$", head)
        assert body.startswith(b"OpenSandbox Ingress: ")
        assert raw.protocols[0].answered is False
        await assert_blamed_on_client(ingress, before, access_events)
        # The backend's half request is abandoned, never pooled for reuse.
        await wait_until(
            lambda: not raw.protocols[0].transport.connected, what="the backend connection closed"
        )
    finally:
        await raw.port.stopListening()


class _StreamingAnswer(Protocol):
    """A backend that starts a chunked answer at once and waits for the rest of the upload."""

    def dataReceived(self, data: bytes) -> None:
        if not getattr(self, "started", False):
            self.started = True
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )


@pytest.mark.parametrize("framing", sorted(HEADS))
@pytest_twisted.ensureDeferred
async def test_upload_stalled_after_the_response_started_is_closed(
    ingress: IngressService, access_events: list[dict[str, Any]], framing: str
) -> None:
    """
    Once part of the response is out, a stalled upload ends with the
    connection cut (both front-ends: a chunked upload is served by
    twisted.web, and its backend client relays an early answer too).
    """
    port = reactor.listenTCP(0, Factory.forProtocol(_StreamingAnswer), interface="127.0.0.1")
    try:
        before = await scrape(ingress)
        client = await raw_connect(ingress.addresses()[0].port)
        client.transport.write(HEADS[framing] % port.getHost().port + half_body(framing))
        await wait_until(lambda: b"hello" in client.received, what="the start of the response")
        await wait_until(lambda: client.lost, timeout=10, what="the ingress to close")
        assert bytes(client.received).startswith(b"HTTP/1.1 200 OK")
        # Cut, not ended: no last chunk.
        assert not bytes(client.received).endswith(b"0\r\n\r\n")
        await assert_blamed_on_client(ingress, before, access_events)
    finally:
        await port.stopListening()


@pytest.mark.parametrize("framing", sorted(HEADS))
@pytest_twisted.ensureDeferred
async def test_silent_backend_after_a_whole_upload_is_still_upstream_timeout(
    ingress: IngressService, access_events: list[dict[str, Any]], framing: str
) -> None:
    """The whole body sent and the backend silent: still the sandbox's fault (502)."""
    # Answers nothing, ever; reads everything.
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        before = await scrape(ingress)
        client = await raw_connect(ingress.addresses()[0].port)
        rest = b"%x\r\n%s\r\n0\r\n\r\n" % (HALF, b"b" * HALF) if framing == "chunked" else (
            b"b" * HALF
        )
        client.transport.write(HEADS[framing] % port.getHost().port + half_body(framing) + rest)
        await wait_until(lambda: b"\r\n\r\n" in client.received, timeout=10, what="the answer")
        assert bytes(client.received).startswith(b"HTTP/1.1 502 ")
        assert b"upstream_timeout" in bytes(client.received)
        after = await scrape(ingress)
        assert after[UPSTREAM % "timeout"] == before[UPSTREAM % "timeout"] + 1
        assert after[CLIENT_TIMEOUTS] == before[CLIENT_TIMEOUTS]
        await wait_until(lambda: access_events, what="the access line")
        assert [e["status"] for e in access_events] == [502]
        client.transport.loseConnection()
    finally:
        await port.stopListening()
