"""
A real HTTP backend for the proxy tests, served on loopback by Twisted.

Paths (all answers are produced by real sockets; the test reads what the
backend saw from C{Backend.seen}):

- C{/echo...}: 200 JSON of what arrived: method, target, headers, body
  length and sha256.
- C{/sse}: 200 C{text/event-stream}, body written by the test through
  L{Backend.sse_send}/L{Backend.sse_close}.
- C{/download?size=N}: N bytes streamed with a push producer (so a slow
  client must pause it), counting bytes handed to the transport.
- C{/redirect?to=X}: 302 with C{Location: X}.
- C{/close-mid}: promises 100 bytes, sends 10, then drops the connection.
- C{/hang}: never answers; records when the proxy's connection goes away.
- C{/no-type}: 200 with no Content-Type.
- C{/hop}: a response carrying hop-by-hop headers that must not pass.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer


@implementer(IPushProducer)
class _Download:
    """Writes C{size} bytes in 64 KiB chunks, honouring pause/resume."""

    CHUNK = b"x" * 65536

    def __init__(self, backend: Backend, request: Request, size: int) -> None:
        self.backend = backend
        self.request = request
        self.remaining = size
        self.paused = False
        self.stopped = False
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        from twisted.internet import reactor

        reactor.callLater(0, self.resumeProducing)

    def pauseProducing(self) -> None:
        self.paused = True
        self.backend.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.remaining > 0:
            chunk = self.CHUNK[: min(len(self.CHUNK), self.remaining)]
            self.remaining -= len(chunk)
            self.backend.download_written += len(chunk)
            self.request.write(chunk)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.stopped = True


class _Root(Resource):
    isLeaf = True

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def render(self, request: Request) -> Any:
        backend = self.backend
        path = request.path
        backend.requests += 1
        if path.startswith(b"/echo") or path == b"/":
            body = request.content.read()
            seen = {
                "method": request.method.decode(),
                "uri": request.uri.decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "peer_port": request.getClientAddress().port,
            }
            backend.seen.append(seen)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"X-Backend", backend.name.encode())
            return json.dumps(seen).encode()
        if path == b"/sse":
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.write(b"")  # send the head now
            backend.sse_requests.append(request)
            if backend.sse_waiter is not None:
                d, backend.sse_waiter = backend.sse_waiter, None
                d.callback(request)
            return NOT_DONE_YET
        if path == b"/download":
            size = int(request.args.get(b"size", [b"0"])[0])
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Content-Length", str(size).encode())
            _Download(backend, request, size)
            return NOT_DONE_YET
        if path == b"/redirect":
            request.setResponseCode(302)
            request.setHeader(b"Location", request.args[b"to"][0])
            return b""
        if path == b"/close-mid":
            request.setHeader(b"Content-Length", b"100")
            request.write(b"0123456789")
            from twisted.internet import reactor

            reactor.callLater(0.05, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        if path == b"/hang":
            backend.hanging.append(request)
            d = request.notifyFinish()
            d.addBoth(lambda _: backend.hang_lost.append(request))
            return NOT_DONE_YET
        if path == b"/no-type":
            request.responseHeaders.removeHeader(b"content-type")
            request.defaultContentType = None
            return b"raw"
        if path == b"/hop":
            request.setHeader(b"Keep-Alive", b"timeout=5")
            request.setHeader(b"Connection", b"X-Secret-Hop")
            request.setHeader(b"X-Secret-Hop", b"1")
            request.setHeader(b"Proxy-Authenticate", b"Basic")
            request.setHeader(b"X-Kept", b"yes")
            return b"hop"
        request.setResponseCode(404)
        return b"backend: no such path"


class Backend:
    """A started backend: C{port}, what it saw, and its controls."""

    def __init__(self, name: str = "backend") -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.requests = 0
        self.sse_requests: list[Request] = []
        self.sse_waiter: Deferred[Request] | None = None
        self.hanging: list[Request] = []
        self.hang_lost: list[Request] = []
        self.download_written = 0
        self.pauses = 0
        self.site = Site(_Root(self))
        self.site.noisy = False
        self.site.log = lambda request: None  # type: ignore[method-assign]
        self.connections = 0
        factory = self.site
        backend = self
        orig = factory.buildProtocol

        def build(addr: Any) -> Any:
            backend.connections += 1
            return orig(addr)

        factory.buildProtocol = build  # type: ignore[method-assign]
        self.port: Any = None

    def listen(self, interface: str = "127.0.0.1", port: int = 0) -> Backend:
        from twisted.internet import reactor

        self.port = reactor.listenTCP(port, self.site, interface=interface)
        return self

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)

    def next_sse(self) -> Deferred[Request]:
        """Fires with the next /sse request the backend receives."""
        d: Deferred[Request] = Deferred()
        self.sse_waiter = d
        return d

    async def stop(self) -> None:
        for request in self.sse_requests + self.hanging:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        await self.port.stopListening()


class RawBackendProtocol(Protocol):
    """
    A byte-level HTTP backend for upload tests: it records body bytes as
    they arrive (so a test can see an upload arrive before it is complete)
    and answers once the declared length (or the last chunk) is in, or at
    once when C{early} is set.
    """

    def __init__(self, owner: RawBackend) -> None:
        self.owner = owner
        self.head = b""
        self.body = 0
        self.buffer = bytearray()
        self.length: int | None = None
        self.chunked = False
        self.answered = False

    def connectionMade(self) -> None:
        self.owner.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.head:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                return
            self.head = bytes(self.buffer[: end + 4])
            data = bytes(self.buffer[end + 4 :])
            self.buffer = bytearray()
            for line in self.head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value.strip())
                if name.strip().lower() == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
            self.owner.heads.append(self.head)
            if self.owner.early:
                self.answer()
        self.body += len(data)
        self.owner.body_bytes += len(data)
        if self.chunked:
            self.buffer += data[-16:]
            del self.buffer[:-16]
        done = (self.length is not None and self.body >= self.length) or (
            self.chunked and bytes(self.buffer).endswith(b"0\r\n\r\n")
        )
        if done and not self.answered:
            self.answer()

    def answer(self) -> None:
        self.answered = True
        payload = str(self.body).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
            % (len(payload), payload)
        )


class RawBackend(Factory):
    """Factory of L{RawBackendProtocol}; C{early} answers before the body."""

    noisy = False

    def __init__(self, early: bool = False) -> None:
        self.early = early
        self.protocols: list[RawBackendProtocol] = []
        self.heads: list[bytes] = []
        self.body_bytes = 0
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> RawBackendProtocol:
        return RawBackendProtocol(self)

    def listen(self) -> RawBackend:
        from twisted.internet import reactor

        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)
