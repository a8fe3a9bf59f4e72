"""
A raw backend for framing tests: records exactly the bytes it receives and
answers each connection with canned bytes, so a test can assert both what
the client got and what reached the sandbox.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class _RawConnection(Protocol):
    def __init__(self, owner: RawBackend) -> None:
        self.owner = owner
        self.received = bytearray()
        self.answered = False
        self.lost = False

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        # The canned answer goes out once a head (a blank line) has
        # arrived; the test's request is known, so no parsing is needed.
        if not self.answered and b"\r\n\r\n" in self.received:
            self.answered = True
            assert self.transport is not None
            self.transport.write(self.owner.answer)
            if self.owner.close_after:
                self.transport.loseConnection()


class RawBackend(Factory):
    """
    Listens on a free loopback port; every connection gets C{answer} after
    its first head and is closed when C{close_after}.

    @ivar connections: every connection, in order; each has C{received}.
    """

    noisy = False

    def __init__(self, answer: bytes = b"", close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections: list[_RawConnection] = []
        self.port: Any = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def received(self) -> bytes:
        """Every byte received, all connections concatenated in order."""
        return b"".join(bytes(c.received) for c in self.connections)

    def buildProtocol(self, addr: Any) -> _RawConnection:
        return _RawConnection(self)
