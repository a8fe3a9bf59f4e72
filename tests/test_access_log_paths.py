"""
The access log's request path (no query string, signed-route segments
redacted) and, on WebSocket session lines, the negotiated subprotocol and
extensions; through a real ingress on loopback, on both HTTP engines.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.compress import PerMessageDeflate
from twisted.logger import globalLogPublisher

from opensandbox_ingress import IngressService
from opensandbox_ingress.routing import LOG_PATH_MAX_CHARS, loggable_path
from opensandbox_ingress.secure_access import sign
from opensandbox_ingress.web.websocket import extension_names
from tests.helpers import raw_connect, start_ingress, wait_until
from tests.raw_backend import RawBackend
from tests.ws_backend import WsBackend, connect_client

SECRET = b"k"
TOKEN = "tok-1"
SANDBOXES: list[dict[str, Any]] = [
    {"name": "sbx", "endpoint": "127.0.0.1"},
    {"name": "sec", "endpoint": "127.0.0.1", "secure_access_token": TOKEN},
]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the pure rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "uri_mode", "logged"),
    [
        (b"/lab/tree?token=abc&x=1", False, "/lab/tree"),
        (b"/lab#frag", False, "/lab"),
        (b"http://host.example/api?x", False, "/api"),
        (b"/sb/8080/x2qxvk/614adedea/api?t=1", True, "/sb/8080/REDACTED/REDACTED/api"),
        (b"/sb/8080/x2qxvk/614adedea", True, "/sb/8080/REDACTED/REDACTED"),
        # Header mode: the path is the app's own; there is nothing signed in it.
        (b"/sb/8080/x2qxvk/614adedea", False, "/sb/8080/x2qxvk/614adedea"),
        # Malformed signed segments are credentials too.
        (b"/sb/8080/X2QXVK/614adedeA/api", True, "/sb/8080/REDACTED/REDACTED/api"),
        (b"/sb/8080/x2qxvk/614adede/api", True, "/sb/8080/REDACTED/REDACTED/api"),
        (b"/sb/8080/x2qxvk/g14adedea", True, "/sb/8080/REDACTED/REDACTED"),
        # App paths are not signatures.
        (b"/sb/8080/api/terminals", True, "/sb/8080/api/terminals"),
        (b"/sb/8080/lab/workspaces/auto-x", True, "/sb/8080/lab/workspaces/auto-x"),
        (b"/sb/8080/api/contents", True, "/sb/8080/api/contents"),
        (b"/p%20q r\xc3\xa9\"\\\x01", False, "/p%20q%20r%C3%A9%22%5C%01"),
        (b"*", False, "*"),
    ],
)
def test_loggable_path(target: bytes, uri_mode: bool, logged: str) -> None:
    """No query, no authority, signed segments redacted, one safe field."""
    assert loggable_path(target, uri_mode) == logged


def test_loggable_path_is_bounded() -> None:
    """A huge path is cut, so one request cannot write a huge line."""
    assert len(loggable_path(b"/" + b"a" * 100_000, False)) == LOG_PATH_MAX_CHARS


def test_extension_names_from_autobahn_state() -> None:
    """Negotiated extensions are named from the hop's Autobahn state; none is '-'."""

    class Hop:
        websocket_extensions_in_use: list[Any] = []

    assert extension_names(None) == "-"
    assert extension_names(Hop()) == "-"
    Hop.websocket_extensions_in_use = [PerMessageDeflate(True, False, False, 15, 15, 8)]
    assert extension_names(Hop()) == "permessage-deflate"


# -- through an ingress ---------------------------------------------------------------


@pytest.fixture
def access_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "opensandbox_ingress.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def backend() -> AsyncIterator[RawBackend]:
    raw = RawBackend(answer=OK)
    yield raw
    await raw.port.stopListening()


async def send(service: IngressService, data: bytes) -> None:
    client = await raw_connect(service.addresses()[0].port)
    assert client.transport is not None
    client.transport.write(data)
    await wait_until(lambda: b"\r\n\r\n" in client.received, 10, "a response")
    client.transport.loseConnection()


def requests(target: bytes, headers: bytes = b"") -> dict[str, bytes]:
    """The same target as the fast path and as twisted.web (a chunked upload) serve it."""
    return {
        "fast": b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n",
        "twisted.web": b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers
        + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    }


@pytest.mark.parametrize("engine", ["fast", "twisted.web"])
@pytest_twisted.ensureDeferred
async def test_http_line_has_path_without_query(
    tmp_path: Path, backend: RawBackend, access_events: list[dict[str, Any]], engine: str
) -> None:
    """The line shows the path; the query (Jupyter's ?token=) never reaches the log."""
    service = await start_ingress(tmp_path, SANDBOXES)
    try:
        port = backend.port.getHost().port
        route = b"OpenSandbox-Ingress-To: sbx-%d\r\n" % port
        await send(service, requests(b"/lab/tree?token=query-secret", route)[engine])
        await wait_until(lambda: access_events, what="the access line")
    finally:
        await service.stopService()
    (event,) = access_events
    assert (event["path"], event["status"]) == ("/lab/tree", 200)
    assert "query-secret" not in repr(event)


@pytest.mark.parametrize("engine", ["fast", "twisted.web"])
@pytest_twisted.ensureDeferred
async def test_signed_route_segments_are_redacted(
    tmp_path: Path, backend: RawBackend, access_events: list[dict[str, Any]], engine: str
) -> None:
    """URI mode: the expiry and signature of a signed route are never logged, allowed or refused."""
    service = await start_ingress(
        tmp_path, SANDBOXES, mode="uri", secure_access_keys=(("a", SECRET),)
    )
    try:
        port = backend.port.getHost().port
        good = sign(SECRET, "a", "sec", port, int(time.time()) + 600)
        bad = sign(b"other", "a", "sec", port, int(time.time()) + 600)
        for part in (good, bad):
            target = f"/sec/{port}/{part.expires_b36}/{part.signature}/api?x=1".encode()
            await send(service, requests(target)[engine])
        await wait_until(lambda: len(access_events) == 2, what="two access lines")
    finally:
        await service.stopService()
    assert [(e["status"], e["path"]) for e in access_events] == [
        (200, f"/sec/{port}/REDACTED/REDACTED/api"),
        (401, f"/sec/{port}/REDACTED/REDACTED/api"),
    ]
    for part in (good, bad):
        assert part.signature not in repr(access_events)


@pytest_twisted.ensureDeferred
async def test_websocket_line_has_path_subprotocol_and_extensions(
    tmp_path: Path, access_events: list[dict[str, Any]]
) -> None:
    """A session's line names its path, the negotiated subprotocol and each hop's extensions."""
    ws_backend = WsBackend().listen()
    service = await start_ingress(tmp_path, SANDBOXES)
    try:
        client = await connect_client(
            service.addresses()[0].port,
            f"sbx-{ws_backend.port_number}",
            path="/api/kernels/k1/channels?session_id=s-secret",
            protocols=["v2.chat", "chat"],
        )
        await wait_until(lambda: ws_backend.opened, what="backend open")
        client.sendClose(code=1000)
        await wait_until(lambda: access_events, what="the session line")
    finally:
        await service.stopService()
        await ws_backend.stop()
    (event,) = access_events
    assert event["kind"] == "ws" and event["status"] == 101
    assert event["path"] == "/api/kernels/k1/channels"
    assert event["subprotocol"] == "v2.chat"
    assert (event["extensions"], event["upstream_extensions"]) == ("-", "-")
    assert "s-secret" not in repr(event)


@pytest_twisted.ensureDeferred
async def test_refused_websocket_line_has_path(
    tmp_path: Path, access_events: list[dict[str, Any]]
) -> None:
    """A session the backend refuses is logged with its path and the backend's status."""
    ws_backend = WsBackend().listen()
    ws_backend.refuse = 403
    service = await start_ingress(tmp_path, SANDBOXES)
    try:
        await send(
            service,
            b"GET /ws?t=1 HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % ws_backend.port_number,
        )
        await wait_until(lambda: access_events, what="the session line")
    finally:
        await service.stopService()
        await ws_backend.stop()
    (event,) = access_events
    assert (event["kind"], event["status"], event["path"]) == ("ws", 403, "/ws")
