"""
A relayed WebSocket session in memory: the ingress on a
C{MemoryReactorClock}, C{StringTransport}s for the client and the backend,
so the relay's own timers run only when a test advances the clock.

Autobahn's timers (keep-alive pings, handshake timeouts) run on txaio's
loop, not on the ingress's reactor, and are not driven here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import struct
from pathlib import Path

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from opensandbox_ingress.observability import AccessLineWriter, LogOutput
from opensandbox_ingress.web.websocket._hop import FAIL_GRACE_S
from tests.memory_ingress import CLIENT_ADDRESS, Backend, Client, MemoryIngress

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

UPGRADE = (
    b"GET /chan?token=s3 HTTP/1.1\r\nHost: ingress.example\r\n"
    b"OpenSandbox-Ingress-To: sbx-8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each whole frame in C{data}, unmasked."""
    out = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        mask = b""
        if data[1] & 0x80:
            mask, offset = data[offset : offset + 4], offset + 4
        payload = data[offset : offset + length]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        out.append((opcode, payload))
        data = data[offset + length :]
    return out


def after_head(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0])


class TcpLikeTransport(StringTransport):
    """
    A C{StringTransport} as tolerant as Twisted's TCP transports
    (C{FileDescriptor}): a producer may be unregistered when none is
    (Autobahn does on every C{dropConnection}), and reading may be resumed
    once the connection is closing (the relay resumes the surviving hop so
    it reads its peer's close reply), which then does nothing.
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            super().resumeProducing()

    def pauseProducing(self) -> None:
        if not self.disconnecting:
            super().pauseProducing()


def open_session(ingress: MemoryIngress) -> tuple[Client, Backend]:
    """A client whose upgrade the backend accepted: both hops open."""
    protocol = ingress.service.factory.buildProtocol(CLIENT_ADDRESS)
    transport = TcpLikeTransport(peerAddress=CLIENT_ADDRESS)
    protocol.makeConnection(transport)
    client = Client(protocol, transport)
    client.send(UPGRADE)
    ((host, port, factory, _timeout, _bind),) = ingress.dials()
    hop = factory.buildProtocol(IPv4Address("TCP", host, port))
    backend = Backend(
        hop,
        TcpLikeTransport(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 50000),
            peerAddress=IPv4Address("TCP", host, port),
        ),
    )
    hop.makeConnection(backend.transport)
    match = re.search(rb"Sec-WebSocket-Key: (\S+)", backend.received())
    assert match is not None
    backend.transport.clear()
    backend.answer(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept(match.group(1)) + b"\r\n\r\n"
    )
    assert client.received().startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: " + _accept(KEY) in client.received()
    return client, backend


def test_silent_backend_after_a_client_violation_is_dropped_at_the_grace_period(
    tmp_path: Path,
) -> None:
    """
    A client that breaks the protocol gets its close only when the backend
    has answered the relay's close or the grace period is over; the fake
    clock alone decides when, and the session's access line shows that
    time as its duration.
    """
    ingress = MemoryIngress(tmp_path, websocket_ping_interval_s=0)
    out = io.StringIO()
    ingress.service.core.access_log.sink = AccessLineWriter(LogOutput(out), "text")
    client, backend = open_session(ingress)
    ingress.clock.advance(1.0)

    client.send(b"\x81\x02hi")  # a text frame the client did not mask
    (to_backend,) = frames(backend.received())
    assert to_backend[0] == 0x8 and close_code(to_backend[1]) == 1001
    assert frames(after_head(client.received())) == []

    ingress.clock.advance(FAIL_GRACE_S - 0.01)
    assert not client.transport.disconnecting and not backend.transport.disconnecting
    assert frames(after_head(client.received())) == []

    ingress.clock.advance(0.01)
    (to_client,) = frames(after_head(client.received()))
    assert to_client[0] == 0x8 and close_code(to_client[1]) == 1002
    assert client.transport.disconnecting
    assert backend.transport.disconnected  # aborted: it never answered
    assert out.getvalue() == ""  # the session ends when both connections are gone

    backend.protocol.connectionLost(Failure(ierror.ConnectionAborted()))
    client.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert ingress.service.core.active_requests == 0
    (line,) = out.getvalue().splitlines()
    assert " ws GET sandbox=sbx port=8080 path=/chan status=101 " in line
    assert " close_code=1002 closed_by=client " in line
    assert f" duration_ms={(1.0 + FAIL_GRACE_S) * 1000:.1f} " in line
