"""
A real WebSocket backend and client for the relay tests, both Autobahn
protocols on loopback in the test's reactor.

Both ends record what arrives frame by frame (L{Recorder}): each message's
type, its frame lengths, its size and SHA-256, and its bytes when small
enough to keep; pings seen; the close code and reason.  The backend also
keeps the raw bytes of every handshake it received, before Autobahn merges
repeated headers.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: Messages up to this size keep their bytes for exact comparison.
KEEP_BYTES = 16 * 1024 * 1024


@dataclass
class Message:
    binary: bool
    frames: list[int] = field(default_factory=list)
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    data: bytearray | None = field(default_factory=bytearray)

    @property
    def payload(self) -> bytes:
        assert self.data is not None, "message too large to keep"
        return bytes(self.data)

    @property
    def digest(self) -> str:
        return str(self.sha256.hexdigest())


class Recorder:
    """Frame-level recording of everything a peer receives."""

    def _init_recorder(self) -> None:
        self.messages: list[Message] = []
        self.current: Message | None = None
        self.pings = 0
        self.closed: tuple[bool, int | None, str | None] | None = None
        self.received_bytes = 0

    def onMessageBegin(self, isBinary: bool) -> None:
        self.current = Message(isBinary)
        # Autobahn's inflating path counts on its base onMessageBegin.
        self.message_data_total_length = 0

    def onMessageFrameBegin(self, length: int) -> None:
        assert self.current is not None
        self.current.frames.append(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        message = self.current
        assert message is not None
        message.size += len(payload)
        self.received_bytes += len(payload)
        message.sha256.update(payload)
        if message.data is not None:
            if message.size > KEEP_BYTES:
                message.data = None
            else:
                message.data += payload

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        assert self.current is not None
        self.messages.append(self.current)
        self.current = None
        self.message_done(self.messages[-1])

    def message_done(self, message: Message) -> None:
        pass

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)  # type: ignore[misc]  # answers with a pong

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)


def send_fragmented(peer: Any, fragments: list[bytes], binary: bool) -> None:
    """Send one message as the given frames (the last one FIN), as a browser may."""
    opcode = 2 if binary else 1
    for i, fragment in enumerate(fragments):
        peer.sendFrame(
            opcode=opcode if i == 0 else 0, payload=fragment, fin=i == len(fragments) - 1
        )


@implementer(IPushProducer)
class Streamer:
    """
    Sends binary messages of C{chunk} bytes on C{peer} for as long as its
    transport does not pause it, up to C{limit} bytes: a well-behaved
    producer, so that a relay without backpressure shows as a producer that
    is never paused.
    """

    def __init__(self, peer: Any, chunk: int, limit: int) -> None:
        self.peer = peer
        self.chunk = b"s" * chunk
        self.limit = limit
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.stopped = False
        peer.transport.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and not self.stopped and self.sent < self.limit:
            if self.peer.state != self.peer.STATE_OPEN:
                self.stopped = True
                return
            self.peer.sendMessage(self.chunk, isBinary=True)
            self.sent += len(self.chunk)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.stopped = True


# -- backend --------------------------------------------------------------------


class BackendProtocol(Recorder, WebSocketServerProtocol):  # type: ignore[misc]
    owner: WsBackend

    def onConnect(self, request: Any) -> Any:
        self._init_recorder()
        owner = self.owner
        owner.handshakes.append(bytes(self.http_request_data))
        owner.protocols.append(self)
        if owner.refuse is not None:
            raise ConnectionDeny(owner.refuse, "Forbidden by backend")
        chosen = next((p for p in owner.preference if p in request.protocols), None)
        answer = (chosen, {"Set-Cookie": list(owner.set_cookies), "X-Backend": "ws"})
        if owner.hold is not None:
            d, owner.hold = owner.hold, None
            return d.addCallback(lambda _: answer)
        return answer

    def onOpen(self) -> None:
        self.owner.opened.append(self)

    def message_done(self, message: Message) -> None:
        if self.owner.echo and message.data is not None:
            # Echo with the same fragmentation the backend received.
            frames, data, out = [f for f in message.frames if f], message.payload, []
            for n in frames:
                out.append(data[:n])
                data = data[n:]
            send_fragmented(self, out or [b""], message.binary)


class WsBackend:
    """A started WebSocket backend: port, what it saw, and its behaviour knobs."""

    def __init__(self, ping_interval: float = 0) -> None:
        self.handshakes: list[bytes] = []
        self.protocols: list[BackendProtocol] = []
        self.opened: list[BackendProtocol] = []
        #: Status to refuse every handshake with, or None to accept.
        self.refuse: int | None = None
        #: The backend picks the first of these that the client offered.
        self.preference = ["v2.chat", "chat"]
        self.set_cookies = [
            "sid=abc123; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly",
            "theme=dark; Path=/",
        ]
        #: When set, the next handshake waits for this Deferred.
        self.hold: Deferred[None] | None = None
        self.echo = True
        owner = self

        class _Protocol(BackendProtocol):
            pass

        _Protocol.owner = owner
        self.factory = WebSocketServerFactory(server=None)
        self.factory.protocol = _Protocol
        self.factory.noisy = False
        self.factory.setProtocolOptions(
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            echoCloseCodeReason=True,
            autoPingInterval=ping_interval,
            openHandshakeTimeout=30,
        )
        self.port: Any = None

    def listen(self) -> WsBackend:
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        return self

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)

    def header_lines(self, index: int = -1) -> list[tuple[str, str]]:
        """The (name, value) lines of a received handshake, as sent."""
        head = self.handshakes[index].decode("latin-1").split("\r\n")
        lines = []
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                lines.append((name.strip(), value.strip()))
        return lines

    def request_line(self, index: int = -1) -> str:
        return self.handshakes[index].decode("latin-1").split("\r\n", 1)[0]

    async def stop(self) -> None:
        for p in self.protocols:
            if p.transport is not None:
                p.transport.abortConnection()
        await self.port.stopListening()


# -- client ---------------------------------------------------------------------


class ClientProtocol(Recorder, WebSocketClientProtocol):  # type: ignore[misc]
    request_options: ConnectingRequest

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        self._init_recorder()
        return self.request_options

    def onConnect(self, response: Any) -> None:
        self.response = response


async def connect_client(
    port: int,
    target: str,
    path: str = "/",
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    ping_interval: float = 0,
    rcvbuf: int | None = None,
    deflate: bool = False,
) -> ClientProtocol:
    """
    Open a WebSocket through the ingress on C{port} to sandbox C{target};
    with C{deflate}, offer permessage-deflate as browsers do
    (C{permessage-deflate; client_max_window_bits}).
    """
    factory = WebSocketClientFactory(protocols=protocols or [])
    factory.protocol = ClientProtocol
    factory.noisy = False
    factory.setProtocolOptions(
        maxFramePayloadSize=0,
        maxMessagePayloadSize=0,
        echoCloseCodeReason=True,
        autoPingInterval=ping_interval,
        openHandshakeTimeout=30,
    )
    if deflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=[
                PerMessageDeflateOffer(accept_no_context_takeover=False, accept_max_window_bits=True)
            ],
            perMessageCompressionAccept=lambda response: (
                PerMessageDeflateResponseAccept(response)
                if isinstance(response, PerMessageDeflateResponse)
                else None
            ),
        )
    all_headers = {"OpenSandbox-Ingress-To": target}
    all_headers.update(headers or {})
    options = ConnectingRequest(
        host="127.0.0.1",
        port=port,
        resource=path,
        headers=all_headers,
        protocols=protocols or [],
    )

    class _Client(ClientProtocol):
        request_options = options

    factory.protocol = _Client
    proto: ClientProtocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    if rcvbuf is not None:
        proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await proto.is_open.addTimeout(10, reactor)
    return proto


@implementer(IPushProducer)
class FrameStreamer:
    """
    Sends one binary message of C{total} bytes as a single frame, written in
    chunks as fast as C{peer}'s transport takes them (pausing when asked),
    so that a message of any size costs the sender no memory.
    """

    def __init__(self, peer: Any, total: int, chunk: int = 256 * 1024) -> None:
        self.peer = peer
        self.remaining = total
        self.sent = 0
        self.sha256 = hashlib.sha256()
        self._chunks = [bytes([i]) * chunk for i in range(7)]
        self._n = 0
        self.paused = False
        self.done = False
        peer.beginMessage(isBinary=True)
        peer.beginMessageFrame(total)
        peer.transport.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and not self.done and self.remaining > 0:
            chunk = self._chunks[self._n % len(self._chunks)][: self.remaining]
            self._n += 1
            self.remaining -= len(chunk)
            self.sent += len(chunk)
            self.sha256.update(chunk)
            self.peer.sendMessageFrameData(chunk)
        if self.remaining == 0 and not self.done:
            self.done = True
            self.peer.transport.unregisterProducer()
            self.peer.endMessage()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.done = True
