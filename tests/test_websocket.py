"""
The WebSocket relay end to end: a real Autobahn backend on loopback, the
ingress on the file provider, and real clients (Autobahn in the reactor,
raw sockets for handshake bytes, websocket-client in a thread).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websocket as websocket_client
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web.http_headers import Headers

from opensandbox_ingress import IngressService
from opensandbox_ingress.framing import ResponseHead, parse_upgrade_response
from opensandbox_ingress.web.websocket import (
    COLLECT_LIMIT,
    WebSocketHandshakeInvalid,
    backend_header_lines,
    check_client_handshake,
    returned_headers,
    subprotocol_offers,
)
from tests.helpers import raw_connect, start_ingress, wait_until
from tests.processes import rss_kib
from tests.ws_backend import (
    FrameStreamer,
    Streamer,
    WsBackend,
    connect_client,
    send_fragmented,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(
    hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
).decode()


class RenewRecorder:
    """Stands in for the renew publisher: records every offer."""

    def __init__(self) -> None:
        self.offers: list[tuple[str, int, str]] = []

    def offer(self, sandbox_id: str, port: int, request_uri: str) -> None:
        self.offers.append((sandbox_id, port, request_uri))


SANDBOXES = [{"name": "sbx", "endpoint": "127.0.0.1"}]


async def _ingress(tmp_path: Path, **overrides: Any) -> IngressService:
    overrides.setdefault("websocket_ping_interval_s", 0)
    service = await start_ingress(tmp_path, SANDBOXES, **overrides)
    service.core.renew = RenewRecorder()  # type: ignore[assignment]
    return service


def _port(service: IngressService) -> int:
    return int(service.addresses()[0].port)


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    service = await _ingress(tmp_path)
    yield service
    await service.stopService()


async def _open(ingress: IngressService, backend: WsBackend, **kwargs: Any) -> tuple[Any, Any]:
    """A client connected through the ingress, and the backend's protocol."""
    before = len(backend.opened)
    client = await connect_client(_port(ingress), f"sbx-{backend.port_number}", **kwargs)
    await wait_until(lambda: len(backend.opened) > before, what="backend open")
    return client, backend.opened[-1]


async def _raw_handshake(port: int, lines: list[str]) -> tuple[Any, int, list[tuple[str, str]]]:
    """Send a handshake byte for byte; return the connection, status and header lines."""
    client = await raw_connect(port)
    client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await wait_until(
        lambda: b"\r\n\r\n" in client.received or client.lost, timeout=15, what="response head"
    )
    head = bytes(client.received).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    parsed = parse_upgrade_response(head)
    assert isinstance(parsed, ResponseHead), parsed
    headers = parsed.headers
    return client, parsed.status, [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


def _handshake_lines(target: str, path: str = "/", extra: list[str] | None = None) -> list[str]:
    return [
        f"GET {path} HTTP/1.1",
        "Host: ingress.example.com",
        f"OpenSandbox-Ingress-To: {target}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
        *(extra or []),
    ]


def _values(lines: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in lines if n.lower() == name.lower()]


# -- pure parts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "proto", "ok"),
    [
        ({"sec-websocket-version": ["13"], "sec-websocket-key": [KEY.decode()]}, b"HTTP/1.1", True),
        (
            {"sec-websocket-version": ["13"], "sec-websocket-key": [KEY.decode()]},
            b"HTTP/1.0",
            False,
        ),
        (
            {"sec-websocket-version": ["12"], "sec-websocket-key": [KEY.decode()]},
            b"HTTP/1.1",
            False,
        ),
        ({"sec-websocket-key": [KEY.decode()]}, b"HTTP/1.1", False),
        ({"sec-websocket-version": ["13"]}, b"HTTP/1.1", False),
        ({"sec-websocket-version": ["13"], "sec-websocket-key": ["short=="]}, b"HTTP/1.1", False),
        (
            {
                "sec-websocket-version": ["13"],
                "sec-websocket-key": [KEY.decode()],
                "sec-websocket-protocol": ["a, b", "a"],
            },
            b"HTTP/1.1",
            False,
        ),
    ],
)
def test_client_handshake_checked_before_dialing(
    headers: dict[str, list[str]], proto: bytes, ok: bool
) -> None:
    """Broken client handshakes are refused with 400 before any backend dial."""
    h = Headers({k: [v.encode() for v in vs] for k, vs in headers.items()})
    if ok:
        check_client_handshake(h, proto)
    else:
        with pytest.raises(WebSocketHandshakeInvalid):
            check_client_handshake(h, proto)


def test_offers_and_lines_keep_repeated_headers() -> None:
    """Offers come from every header line; Cookie lines stay separate lines."""
    h = Headers(
        {
            "Sec-WebSocket-Protocol": [b"a, b", b"c"],
            "Cookie": [b"x=1", b"y=2, z=3"],
            "Sec-WebSocket-Key": [KEY],
            "Pragma": [b"no-cache"],
        }
    )
    assert subprotocol_offers(h) == ["a", "b", "c"]
    fields = [(name, value) for name, values in h.getAllRawHeaders() for value in values]
    assert backend_header_lines(fields) == [("Cookie", "x=1"), ("Cookie", "y=2, z=3")]


def test_returned_headers_keep_set_cookie_lines() -> None:
    """Set-Cookie lines (with commas in Expires) pass; handshake and hop headers do not."""
    head = parse_upgrade_response(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n"
        b"X-Hop: 1\r\nSec-WebSocket-Accept: abc\r\nSet-Cookie: a=1; Expires=Wed, 21 Oct 2037\r\n"
        b"Set-Cookie: b=2\r\nX-Kept: yes\r\n\r\n"
    )
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.framing) == (101, b"Switching Protocols", "switched")
    assert returned_headers(head.headers) == {
        "Set-Cookie": ["a=1; Expires=Wed, 21 Oct 2037", "b=2"],
        "X-Kept": ["yes"],
    }


# -- handshake ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_forwards_headers_and_returns_backend_choice(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """The backend sees the client's end-to-end headers intact; the client gets its choices."""
    target = f"sbx-{ws_backend.port_number}"
    client, status, headers = await _raw_handshake(
        _port(ingress),
        _handshake_lines(
            target,
            "/chat/room?x=1&y=%20",
            [
                "Connection: keep-alive",
                "Sec-WebSocket-Protocol: chat, v2.chat",
                "Sec-WebSocket-Protocol: other",
                "Origin: https://app.example.com",
                "Cookie: a=1",
                "Cookie: b=2; c=3",
                "Authorization: Bearer s3cret",
                "X-Forwarded-For: 10.0.0.1",
                f"OPEN-SANDBOX-INGRESS: {target}",
                "OpenSandbox-Secure-Access: not-needed",
                "Keep-Alive: timeout=5",
                "User-Agent: test-agent/1.0",
                "X-Custom: kept",
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            ],
        ),
    )
    try:
        assert status == 101
        # The client's answer: the backend's pick (not the client's first
        # offer), its Set-Cookie lines intact, a valid accept key.
        assert _values(headers, "Sec-WebSocket-Protocol") == ["v2.chat"]
        assert _values(headers, "Set-Cookie") == ws_backend.set_cookies
        assert _values(headers, "Sec-WebSocket-Accept") == [ACCEPT]
        assert _values(headers, "X-Backend") == ["ws"]
        assert _values(headers, "Reverse-Proxy-Server-PowerBy") == ["OpenSandbox-ingress"]
        assert _values(headers, "Server") == []
        # Compression on the client hop only, without context takeover.
        assert _values(headers, "Sec-WebSocket-Extensions") == [
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]

        lines = ws_backend.header_lines()
        assert ws_backend.request_line() == "GET /chat/room?x=1&y=%20 HTTP/1.1"
        assert _values(lines, "Host") == [f"127.0.0.1:{ws_backend.port_number}"]
        assert _values(lines, "Cookie") == ["a=1", "b=2; c=3"]
        assert _values(lines, "Sec-WebSocket-Protocol") == ["chat,v2.chat,other"]
        assert _values(lines, "Origin") == ["https://app.example.com"]
        assert _values(lines, "Authorization") == ["Bearer s3cret"]
        assert _values(lines, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
        assert _values(lines, "X-Forwarded-Proto") == ["http"]
        assert _values(lines, "X-Forwarded-Host") == ["ingress.example.com"]
        assert _values(lines, "User-Agent") == ["test-agent/1.0"]
        assert _values(lines, "X-Custom") == ["kept"]
        for name in (
            "OpenSandbox-Ingress-To",
            "OPEN-SANDBOX-INGRESS",
            "OpenSandbox-Secure-Access",
            "Keep-Alive",
            "X-Forwarded-Prefix",
            "Sec-WebSocket-Extensions",
        ):
            assert _values(lines, name) == [], name
        # One handshake's worth of the headers Autobahn writes itself.
        for name in ("Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version"):
            assert len(_values(lines, name)) == 1, name
        assert _values(lines, "Sec-WebSocket-Key") != [KEY.decode()]
    finally:
        client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_backend_dialled_before_client_accepted(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """The client's 101 is only written after the backend has accepted."""
    hold: Deferred[None] = Deferred()
    ws_backend.hold = hold
    client = await raw_connect(_port(ingress))
    lines = _handshake_lines(f"sbx-{ws_backend.port_number}")
    client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        await wait_until(lambda: ws_backend.handshakes, what="backend handshake")
        # The backend has the handshake and has not answered: nothing for the client yet.
        assert client.received == b""
        hold.callback(None)
        await wait_until(lambda: b"\r\n\r\n" in client.received, what="client 101")
        assert client.received.startswith(b"HTTP/1.1 101 ")
    finally:
        client.transport.abortConnection()


def _upstream_errors(service: IngressService) -> dict[str, float]:
    """The non-zero opensandbox_ingress_upstream_errors_total samples, by reason."""
    text = service.core.metrics.exposition().decode()
    found = re.findall(r'^opensandbox_ingress_upstream_errors_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found if float(value)}


@pytest_twisted.ensureDeferred
async def test_backend_refusal_status_reaches_client(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A backend that answers 403 gives the client a plain 403 with the error code."""
    ws_backend.refuse = 403
    client, status, headers = await _raw_handshake(
        _port(ingress), _handshake_lines(f"sbx-{ws_backend.port_number}")
    )
    assert status == 403
    assert _values(headers, "OpenSandbox-Ingress-Error") == ["upstream_refused"]
    # The backend answered (with its own refusal): not an upstream error.
    assert _upstream_errors(ingress) == {}
    await wait_until(lambda: b"OpenSandbox Ingress: " in client.received, what="error body")
    client.transport.abortConnection()
    await wait_until(lambda: ingress.core.active_requests == 0, what="session ended")


@pytest_twisted.ensureDeferred
async def test_unreachable_backend_is_503(ingress: IngressService) -> None:
    """No listener on the sandbox port: 503 upstream_unreachable, as an HTTP response."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    client, status, headers = await _raw_handshake(_port(ingress), _handshake_lines(f"sbx-{dead}"))
    client.transport.abortConnection()
    assert status == 503
    assert _values(headers, "OpenSandbox-Ingress-Error") == ["upstream_unreachable"]
    assert ingress.core.active_requests == 0
    # Counted with the HTTP path's upstream errors.
    assert _upstream_errors(ingress) == {"connect": 1.0}


@pytest_twisted.ensureDeferred
async def test_broken_client_handshake_is_400_without_dial(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A handshake without a key is answered 400 and never reaches the backend."""
    lines = [
        line for line in _handshake_lines(f"sbx-{ws_backend.port_number}") if "Key" not in line
    ]
    client, status, headers = await _raw_handshake(_port(ingress), lines)
    client.transport.abortConnection()
    assert status == 400
    assert _values(headers, "OpenSandbox-Ingress-Error") == ["websocket_handshake_invalid"]
    assert ws_backend.handshakes == []


@pytest_twisted.ensureDeferred
async def test_uri_mode_rewrites_path_and_sets_prefix(
    tmp_path: Path, ws_backend: WsBackend
) -> None:
    """URI mode: the backend gets /rest?query and X-Forwarded-Prefix; renew gets the path."""
    service = await _ingress(tmp_path, mode="uri")
    try:
        lines = _handshake_lines("unused", f"/sbx/{ws_backend.port_number}/term/1?cols=80")
        client, status, _ = await _raw_handshake(_port(service), lines[:2] + lines[3:])
        client.transport.abortConnection()
        assert status == 101
        assert ws_backend.request_line() == "GET /term/1?cols=80 HTTP/1.1"
        prefix = f"/sbx/{ws_backend.port_number}"
        assert _values(ws_backend.header_lines(), "X-Forwarded-Prefix") == [prefix]
        offers = service.core.renew.offers  # type: ignore[attr-defined]
        assert offers[0] == ("sbx", ws_backend.port_number, "/term/1?cols=80")
    finally:
        await service.stopService()


# -- messages --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_text_and_binary_echo_both_ways(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """Text and binary messages pass unchanged in both directions."""
    client, backend = await _open(ingress, ws_backend)
    client.sendMessage("héllo wörld €".encode(), isBinary=False)
    client.sendMessage(bytes(range(256)), isBinary=True)
    client.sendMessage(b"", isBinary=True)
    await wait_until(lambda: len(client.messages) == 3, what="echoes")
    assert [(m.binary, m.payload) for m in backend.messages] == [
        (False, "héllo wörld €".encode()),
        (True, bytes(range(256))),
        (True, b""),
    ]
    assert [(m.binary, m.payload) for m in client.messages] == [
        (False, "héllo wörld €".encode()),
        (True, bytes(range(256))),
        (True, b""),
    ]
    client.sendClose(1000)
    await wait_until(lambda: ingress.core.active_requests == 0, what="session end")


@pytest_twisted.ensureDeferred
async def test_fragmented_messages_keep_boundaries_and_fragments(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """Fragments are relayed one by one (not coalesced); message boundaries hold,
    including UTF-8 text split inside a code point."""
    ws_backend.echo = False
    client, backend = await _open(ingress, ws_backend)
    text = "ab€cd€".encode()  # € is 3 bytes; fragments cut through it
    send_fragmented(client, [text[:3], text[3:5], text[5:]], binary=False)
    send_fragmented(client, [b"\x00" * 10, b"\x01" * 70000, b"\x02"], binary=True)
    client.sendMessage(b"after", isBinary=True)
    await wait_until(lambda: len(backend.messages) == 3, what="backend messages")
    first, second, third = backend.messages
    assert (first.binary, first.payload) == (False, text)
    assert [f for f in first.frames if f] == [3, 2, len(text) - 5]
    assert second.payload == b"\x00" * 10 + b"\x01" * 70000 + b"\x02"
    assert [f for f in second.frames if f] == [10, 70000, 1]
    assert third.payload == b"after"
    # And the other way.
    send_fragmented(backend, [b"x", b"yy", b"zzz"], binary=True)
    send_fragmented(backend, [text[:1], text[1:4], text[4:]], binary=False)
    await wait_until(lambda: len(client.messages) == 2, what="client messages")
    assert client.messages[0].payload == b"xyyzzz"
    assert [f for f in client.messages[0].frames if f] == [1, 2, 3]
    assert (client.messages[1].binary, client.messages[1].payload) == (False, text)


@pytest_twisted.ensureDeferred
async def test_large_messages_arrive_byte_exact_both_ways(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """An 8 MiB message passes whole and byte-exact in each direction."""
    ws_backend.echo = False
    client, backend = await _open(ingress, ws_backend)
    up = os.urandom(8 * 1024 * 1024)
    down = os.urandom(8 * 1024 * 1024 + 7)
    client.sendMessage(up, isBinary=True)
    backend.sendMessage(down, isBinary=True)
    await wait_until(lambda: backend.messages and client.messages, timeout=30, what="big messages")
    assert backend.messages[0].payload == up
    assert client.messages[0].payload == down
    assert ingress.core.active_requests == 1
    assert ingress.websocket.active_sessions == 1


# -- closing ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
@pytest.mark.parametrize("initiator", ["client", "backend"])
@pytest_twisted.ensureDeferred
async def test_close_code_and_reason_relayed(
    ingress: IngressService, ws_backend: WsBackend, code: int, initiator: str
) -> None:
    """The close code and reason reach the other peer, whichever side closes."""
    client, backend = await _open(ingress, ws_backend)
    closer, other = (client, backend) if initiator == "client" else (backend, client)
    reason = f"bye from {initiator} ✓"
    closer.sendCloseFrame(code=code, reasonUtf8=reason.encode(), isReply=False)
    await wait_until(lambda: other.closed and closer.closed, what="both closed")
    assert other.closed[1:] == (code, reason)
    assert closer.closed[0] is True, "the closing handshake completed cleanly"
    assert closer.closed[1:] == (code, reason), "the reply echoes the close"
    await wait_until(lambda: ingress.core.active_requests == 0, what="session end")


@pytest_twisted.ensureDeferred
async def test_close_without_code_relayed_as_no_status(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A close frame without a code (1005) reaches the backend without a code."""
    client, backend = await _open(ingress, ws_backend)
    client.sendCloseFrame(isReply=False)
    await wait_until(lambda: backend.closed and client.closed, what="closed")
    assert backend.closed[1:] == (None, None)
    assert client.closed[0] is True


@pytest_twisted.ensureDeferred
async def test_backend_vanishing_drops_client(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A backend that drops TCP without a close makes the client see 1006 too."""
    client, backend = await _open(ingress, ws_backend)
    backend.transport.abortConnection()
    await wait_until(lambda: client.closed, what="client closed")
    assert client.closed[:2] == (False, 1006)
    await wait_until(lambda: ingress.core.active_requests == 0, what="session end")


@pytest_twisted.ensureDeferred
async def test_drain_closes_sessions_with_going_away(tmp_path: Path, ws_backend: WsBackend) -> None:
    """Stopping the ingress sends 1001 to both peers and waits for the sessions."""
    service = await _ingress(tmp_path)
    client, backend = await _open(service, ws_backend)
    await service.stopService()
    await wait_until(lambda: client.closed and backend.closed, what="both closed")
    assert client.closed[1] == 1001
    assert backend.closed[1] == 1001
    assert service.core.active_requests == 0


# -- keep-alive, renew, backpressure ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keepalive_pings_reach_both_peers(tmp_path: Path, ws_backend: WsBackend) -> None:
    """With --websocket-ping-interval both hops are pinged (and answer)."""
    service = await _ingress(tmp_path, websocket_ping_interval_s=0.1)
    try:
        client, backend = await _open(service, ws_backend)
        await wait_until(lambda: client.pings >= 2 and backend.pings >= 2, what="pings")
        client.sendMessage(b"still alive", isBinary=True)
        await wait_until(lambda: client.messages, what="echo after pings")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_no_pings_when_interval_is_zero(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """--websocket-ping-interval 0 turns keep-alive pings off."""
    client, backend = await _open(ingress, ws_backend)
    client.sendMessage(b"x", isBinary=True)
    await wait_until(lambda: client.messages, what="echo")
    assert (client.pings, backend.pings) == (0, 0)
    assert ingress.websocket.client_options["autoPingInterval"] == 0


@pytest_twisted.ensureDeferred
async def test_messages_keep_offering_renew_intents(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """Every relayed message offers a (publisher-throttled) renew intent."""
    offers = ingress.core.renew.offers  # type: ignore[attr-defined]
    client, backend = await _open(ingress, ws_backend)
    assert len(offers) == 1  # the handshake's
    for i in range(5):
        client.sendMessage(b"m%d" % i, isBinary=True)
    await wait_until(lambda: len(client.messages) == 5, what="echoes")
    # Five up, five echoed down.
    assert len(offers) == 11
    assert set(offers) == {("sbx", ws_backend.port_number, "")}


def _reading(transport: Any) -> bool:
    """Whether the reactor is reading from C{transport}'s socket (not paused)."""
    return transport in reactor.getReaders()


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest_twisted.ensureDeferred
async def test_peer_that_stops_reading_pauses_the_other_side(
    ingress: IngressService, ws_backend: WsBackend, direction: str
) -> None:
    """A peer that stops reading makes the ingress stop reading from the other
    peer, whose writes then stall (bounded); reading again resumes the stream."""
    ws_backend.echo = False
    client, backend = await _open(ingress, ws_backend, rcvbuf=64 * 1024)
    session = next(iter(ingress.websocket.sessions))
    assert session.client is not None and session.backend is not None
    if direction == "download":
        reader, writer, source = client, backend, session.backend.transport
    else:
        reader, writer, source = backend, client, session.client.transport
    reader.transport.pauseProducing()
    limit = 256 * 1024 * 1024
    streamer = Streamer(writer, 64 * 1024, limit)
    # Without backpressure the ingress would keep reading (and buffering)
    # everything the writer sends, and this would never hold.
    await wait_until(
        lambda: streamer.paused and not _reading(source),
        timeout=30,
        what="the ingress to stop reading from the writer",
    )
    assert session.throttles is not None
    assert session.throttles[0 if direction == "download" else 1].pauses >= 1
    sent_at_pause = streamer.sent
    assert sent_at_pause < limit // 4
    assert reader.received_bytes < sent_at_pause
    # Reading again lets the stream continue past where it stopped.
    reader.transport.resumeProducing()
    await wait_until(
        lambda: reader.received_bytes > sent_at_pause, timeout=30, what="stream resumed"
    )
    streamer.stopProducing()


@pytest_twisted.ensureDeferred
async def test_drain_mid_frame_completes_the_frame_then_closes(
    tmp_path: Path, ws_backend: WsBackend
) -> None:
    """A drain while a large frame is half relayed finishes that frame, then sends 1001."""
    service = await _ingress(tmp_path)
    client, backend = await _open(service, ws_backend, rcvbuf=64 * 1024)
    client.transport.pauseProducing()
    payload = os.urandom(16 * 1024 * 1024)
    backend.sendMessage(payload, isBinary=True)
    session = next(iter(service.websocket.sessions))
    await wait_until(lambda: not _reading(session.backend.transport), what="relay mid-frame")
    assert session.client.send_state == session.client.SEND_STATE_INSIDE_MESSAGE_FRAME
    stopping = service.stopService()
    client.transport.resumeProducing()
    await stopping
    await wait_until(lambda: client.closed, timeout=15, what="client closed")
    assert client.closed[1] == 1001
    assert len(client.messages) == 1
    assert client.messages[0].payload == payload


@pytest_twisted.ensureDeferred
async def test_frames_sent_with_the_handshake_are_relayed(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A frame the client sends right behind its handshake (before the 101) is not lost."""
    ws_backend.echo = False
    lines = _handshake_lines(f"sbx-{ws_backend.port_number}")
    payload, mask = b"early bird", b"\x01\x02\x03\x04"
    frame = bytes([0x82, 0x80 | len(payload)]) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    client = await raw_connect(_port(ingress))
    client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + frame)
    try:
        await wait_until(lambda: ws_backend.opened and ws_backend.opened[-1].messages, what="frame")
        assert ws_backend.opened[-1].messages[0].payload == payload
        assert client.received.startswith(b"HTTP/1.1 101 ")
    finally:
        client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_dial_drops_backend(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A client that goes away while the backend is being dialled ends the dial too."""
    ws_backend.hold = Deferred()
    client = await raw_connect(_port(ingress))
    lines = _handshake_lines(f"sbx-{ws_backend.port_number}")
    client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await wait_until(lambda: ws_backend.handshakes, what="backend handshake")
    client.transport.abortConnection()
    await wait_until(lambda: ingress.core.active_requests == 0, what="session ended")
    await wait_until(lambda: ws_backend.protocols[-1].closed, what="backend connection dropped")


@pytest_twisted.ensureDeferred
async def test_backend_silent_after_connect_is_upstream_timeout(
    ingress: IngressService,
) -> None:
    """A backend that accepts TCP but never answers the upgrade: 502 upstream_timeout."""
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    ingress.websocket.client_options["openHandshakeTimeout"] = 0.2
    try:
        client, status, headers = await _raw_handshake(
            _port(ingress), _handshake_lines(f"sbx-{silent.getHost().port}")
        )
        client.transport.abortConnection()
        assert status == 502
        assert _values(headers, "OpenSandbox-Ingress-Error") == ["upstream_timeout"]
    finally:
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_vanishing_drops_backend(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """A client that drops TCP without a close makes the backend see 1006 too."""
    client, backend = await _open(ingress, ws_backend)
    client.transport.abortConnection()
    await wait_until(lambda: backend.closed, what="backend closed")
    assert backend.closed[:2] == (False, 1006)
    await wait_until(lambda: ingress.core.active_requests == 0, what="session end")


@pytest_twisted.ensureDeferred
async def test_access_log_line_per_session(ingress: IngressService, ws_backend: WsBackend) -> None:
    """One access line per session: sandbox, port, bytes each way, close code; no header values."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "opensandbox_ingress.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        client, backend = await _open(
            ingress, ws_backend, headers={"Authorization": "Bearer top-secret"}
        )
        client.sendMessage(b"x" * 100, isBinary=True)  # echoed: 100 each way
        await wait_until(lambda: client.messages, what="echo")
        client.sendCloseFrame(code=4000, reasonUtf8=b"done", isReply=False)
        await wait_until(lambda: events, what="access line")
    finally:
        globalLogPublisher.removeObserver(observe)
    (event,) = events
    assert event["kind"] == "ws"
    assert (event["sandbox"], event["port"], event["status"]) == (
        "sbx",
        ws_backend.port_number,
        101,
    )
    assert (event["bytes_in"], event["bytes_out"]) == (100, 100)
    assert (event["close_code"], event["closed_by"]) == (4000, "client")
    assert event["duration_ms"] >= 0
    assert "top-secret" not in repr(event)


# -- a third-party client ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_client_library_with_keepalive_upgrade(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """websocket-client, with Connection: keep-alive, Upgrade and two Cookie lines."""
    url = f"ws://127.0.0.1:{_port(ingress)}/lib"
    target = f"sbx-{ws_backend.port_number}"

    def run() -> tuple[Any, ...]:
        ws = websocket_client.create_connection(
            url,
            timeout=10,
            connection="Connection: keep-alive, Upgrade",
            subprotocols=["chat", "v2.chat"],
            header=[f"OpenSandbox-Ingress-To: {target}", "Cookie: a=1", "Cookie: b=2"],
        )
        try:
            ws.send("text ✓")
            text = ws.recv()
            ws.send_binary(b"\x00\xff" * 1000)
            data = ws.recv()
            return ws.subprotocol, ws.getheaders().get("set-cookie"), text, data
        finally:
            ws.close(status=3001, reason=b"done")

    subprotocol, cookies, text, data = await threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), run
    )
    assert subprotocol == "v2.chat"
    assert cookies is not None and "sid=abc123" in cookies
    assert text == "text ✓"
    assert data == b"\x00\xff" * 1000
    assert _values(ws_backend.header_lines(), "Cookie") == ["a=1", "b=2"]
    await wait_until(lambda: ws_backend.protocols[-1].closed, what="backend closed")
    assert ws_backend.protocols[-1].closed[1:] == (3001, "done")


# -- the ingress as a process: memory -------------------------------------------------

MIB = 1024 * 1024




async def _open_via(port: int, backend: WsBackend, **kwargs: Any) -> tuple[Any, Any]:
    before = len(backend.opened)
    client = await connect_client(port, f"sbx-{backend.port_number}", **kwargs)
    await wait_until(lambda: len(backend.opened) > before, what="backend open")
    peer = backend.opened[-1]
    # Warm up the relay (imports, first allocations) before the baseline.
    client.sendMessage(b"warm-up", isBinary=True)
    peer.sendMessage(b"warm-up", isBinary=True)
    await wait_until(lambda: peer.messages and client.messages, what="warm-up both ways")
    return client, peer


@pytest_twisted.ensureDeferred
async def test_256_mib_messages_keep_ingress_rss_flat(
    ingress_process: tuple[Any, int], ws_backend: WsBackend
) -> None:
    """A 256 MiB message each way passes byte-exact; the ingress's peak RSS grows < 64 MiB."""
    proc, port = ingress_process
    ws_backend.echo = False
    client, backend = await _open_via(port, ws_backend)
    baseline = rss_kib(proc.pid)
    total = 256 * MIB
    up = FrameStreamer(client, total)
    await wait_until(lambda: len(backend.messages) == 2, timeout=60, what="256 MiB up")
    assert (backend.messages[1].size, backend.messages[1].digest) == (total, up.sha256.hexdigest())
    down = FrameStreamer(backend, total)
    await wait_until(lambda: len(client.messages) == 2, timeout=60, what="256 MiB down")
    assert (client.messages[1].size, client.messages[1].digest) == (
        total,
        down.sha256.hexdigest(),
    )
    growth = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    assert growth < 64, f"ingress peak RSS grew {growth:.1f} MiB"


def _stalled(streamer: Streamer, polls: int = 40) -> Any:
    """A condition: C{streamer} is paused, short of its limit, and has not
    sent a byte for C{polls} consecutive checks."""
    seen = {"sent": -1, "same": 0}

    def check() -> bool:
        if streamer.sent == seen["sent"]:
            seen["same"] += 1
        else:
            seen["sent"], seen["same"] = streamer.sent, 0
        return streamer.paused and seen["same"] >= polls and streamer.sent < streamer.limit

    return check


@pytest_twisted.ensureDeferred
async def test_never_reading_client_does_not_grow_ingress_memory(
    ingress_process: tuple[Any, int], ws_backend: WsBackend
) -> None:
    """A client that never reads stalls the streaming backend, not the ingress's memory;
    once it reads again every byte arrives."""
    proc, port = ingress_process
    ws_backend.echo = False
    client, backend = await _open_via(port, ws_backend, rcvbuf=64 * 1024)
    baseline = rss_kib(proc.pid)
    client.transport.pauseProducing()
    received_before = client.received_bytes
    streamer = Streamer(backend, 64 * 1024, 128 * MIB)
    # An ingress without backpressure would swallow all 128 MiB.
    await wait_until(_stalled(streamer), timeout=60, what="backend stalled short of its limit")
    growth = (rss_kib(proc.pid, "VmHWM") - baseline) / 1024
    assert growth < 64, f"ingress peak RSS grew {growth:.1f} MiB"
    client.transport.resumeProducing()
    await wait_until(
        lambda: client.received_bytes - received_before == streamer.limit,
        timeout=60,
        what="the whole stream delivered",
    )


# -- one frame per message -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_frame_messages_arrive_as_one_frame_both_ways(
    ingress: IngressService, ws_backend: WsBackend
) -> None:
    """
    A message its sender wrote as one frame (up to the collect limit,
    empty and text included) reaches the other peer as exactly one final
    frame; a larger one is streamed, and ends with an empty final frame.
    """
    ws_backend.echo = False
    client, backend = await _open(ingress, ws_backend)
    small = [b"", b"x", os.urandom(1024), os.urandom(COLLECT_LIMIT)]
    for payload in small:
        client.sendMessage(payload, isBinary=True)
        backend.sendMessage(payload, isBinary=True)
    client.sendMessage("héllo".encode(), isBinary=False)
    large = os.urandom(COLLECT_LIMIT + 1)
    client.sendMessage(large, isBinary=True)
    await wait_until(lambda: len(backend.messages) == 6, what="backend messages")
    await wait_until(lambda: len(client.messages) == 4, what="client messages")
    for received in (backend.messages[:4], client.messages):
        assert [m.payload for m in received] == small
        assert [m.frames for m in received] == [[len(p)] for p in small]
    text = backend.messages[4]
    assert (text.binary, text.payload, text.frames) == (False, "héllo".encode(), [6])
    assert backend.messages[5].payload == large
    assert backend.messages[5].frames == [len(large), 0]


@pytest_twisted.ensureDeferred
async def test_drain_while_a_small_message_is_collected_delivers_it_then_closes(
    tmp_path: Path, ws_backend: WsBackend
) -> None:
    """A close that arrives while a one-frame message is half received waits for it."""
    ws_backend.echo = False
    service = await _ingress(tmp_path)
    client, backend = await _open(service, ws_backend)
    payload = os.urandom(64 * 1024)
    # One final frame as Autobahn writes it; half of it now, the rest later.
    written: list[bytes] = []
    client.sendData = lambda data, sync=False, chopsize=None: written.append(data)
    client.sendMessage(payload, isBinary=True)
    del client.sendData
    frame = b"".join(written)
    client.transport.write(frame[: len(frame) // 2])
    # The client must not read (and answer) the ingress's close before its
    # frame is whole: Autobahn would write that answer inside it.
    client.transport.pauseProducing()
    session = next(iter(service.websocket.sessions))
    await wait_until(lambda: session.client.collecting, what="half the message collected")
    stopping = service.stopService()
    await wait_until(lambda: session.backend.pending_close is not None, what="close held")
    client.transport.write(frame[len(frame) // 2 :])
    client.transport.resumeProducing()
    await stopping
    await wait_until(lambda: backend.closed, timeout=15, what="backend closed")
    assert backend.closed[1] == 1001
    assert [m.payload for m in backend.messages] == [payload]
