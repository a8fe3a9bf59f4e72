"""
A byte-level streaming backend, run as its own process by the memory tests
(``python -m tests.stream_backend``): it prints its port on stdout, then

- ``GET /download?size=N`` answers N bytes, written with a push producer;
- ``GET /redirect`` answers 302 with ``Location: /login``;
- ``GET /slow?ms=N`` answers ``slow`` after N milliseconds;
- any request with a body is drained chunk by chunk (never stored) and
  answered with the number of body bytes received.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

CHUNK = b"x" * 65536


@implementer(IPushProducer)
class StreamBackend(Protocol):
    def __init__(self) -> None:
        self.head = bytearray()
        self.in_body = False
        self.remaining_body = 0
        self.body = 0
        self.to_send = 0
        self.paused = False

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end == -1:
                return
            head = bytes(self.head[:end])
            data = bytes(self.head[end + 4 :])
            self.head = bytearray()
            self.in_body = True
            request_line = head.split(b"\r\n")[0]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.remaining_body = length
            target = request_line.split(b" ")[1]
            if target.startswith(b"/redirect"):
                self.transport.write(
                    b"HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n"
                )
                self.in_body = False
                return
            if target.startswith(b"/slow"):
                delay = int(target.split(b"ms=")[1]) / 1000
                reactor.callLater(  # type: ignore[attr-defined]
                    delay, self.transport.write, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"
                )
                self.in_body = False
                return
            if target.startswith(b"/download"):
                self.to_send = int(target.split(b"size=")[1])
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.to_send
                )
                self.transport.registerProducer(self, True)
                self.resumeProducing()
                return
        self.body += len(data)
        self.remaining_body -= len(data)
        if self.remaining_body <= 0:
            payload = str(self.body).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            self.in_body = False
            self.body = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.to_send > 0:
            n = min(len(CHUNK), self.to_send)
            self.to_send -= n
            self.transport.write(CHUNK[:n])
        if self.to_send == 0 and self.in_body:
            self.in_body = False
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.to_send = 0


def main() -> None:
    factory = Factory.forProtocol(StreamBackend)
    factory.noisy = False
    port: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
