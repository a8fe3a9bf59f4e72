"""
The one backend client (opensandbox_ingress.web.pool.BackendConnection),
used by both front-ends, in memory: every response byte passes the
framing layer, so a response the policy refuses fails the exchange and
never reaches the client, and a connection is pooled only after a clean
response.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from opensandbox_ingress.web.pool import BackendConnection, BackendPool


class _Head:
    method = b"GET"


class _Recorder:
    """The exchange side of a connection, recording what the connection tells it."""

    head = _Head()

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def attached(self, upstream: BackendConnection, reused: bool) -> None:
        self.events.append(("attached", reused))

    def connecting(self, connector: Any) -> None:
        self.events.append(("connecting", None))

    def connect_failed(self, failure: Failure) -> None:
        self.events.append(("connect_failed", failure))

    def response_head(self, response: Any) -> None:
        self.events.append(("head", response))

    def response_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def response_end(self, reusable: bool) -> None:
        self.events.append(("end", reusable))

    def flush(self) -> None:
        pass

    def upstream_lost(self, failure: Failure, responded: bool) -> None:
        self.events.append(("lost", responded))

    def upstream_invalid(self, why: str, responded: bool) -> None:
        self.events.append(("invalid", why))


def _connected() -> tuple[BackendConnection, StringTransport, _Recorder, BackendPool]:
    """Dial through the pool on a memory reactor and complete the connection."""
    reactor = MemoryReactorClock()
    pool = BackendPool(reactor, 5.0)
    user = _Recorder()
    pool.acquire(("gen-1", "10.0.0.1", 8080), user)
    [(host, port, factory, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == ("10.0.0.1", 8080, 5.0)
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport, user, pool


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
def test_refused_response_fails_the_exchange(answer: bytes) -> None:
    """A head the framing policy refuses aborts the connection; the exchange hears why, no head."""
    connection, transport, user, pool = _connected()
    connection.dataReceived(answer)
    assert transport.disconnecting or transport.disconnected
    kinds = [kind for kind, _ in user.events]
    assert kinds == ["connecting", "attached", "invalid"]
    assert pool.idle_connection_count() == 0


def test_valid_response_is_relayed_and_pooled() -> None:
    """A valid response reaches the exchange with its Connection tokens; the connection is reusable."""
    connection, transport, user, pool = _connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nContent-Length: 2\r\n\r\nok")
    kinds = [kind for kind, _ in user.events]
    assert kinds == ["connecting", "attached", "head", "data", "end"]
    head = user.events[2][1]
    assert head.status == 200
    assert b"x-a" in head.listed
    assert user.events[3] == ("data", b"ok")
    assert user.events[4] == ("end", True)
    connection.release(True)
    assert pool.idle_connection_count() == 1
    assert not transport.disconnecting


def test_bytes_after_the_response_taint_the_connection() -> None:
    """Bytes nobody asked for after a response: not reusable, closed instead of pooled."""
    connection, transport, user, pool = _connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert ("end", False) in user.events
    connection.release(True)
    assert pool.idle_connection_count() == 0
    assert transport.disconnecting or transport.disconnected


def test_retired_generation_is_never_pooled_again() -> None:
    """A connection of a generation dropped while it was busy closes instead of returning."""
    connection, transport, user, pool = _connected()
    pool.drop_generation("gen-1")
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    connection.release(True)
    assert pool.idle_connection_count() == 0
    assert transport.disconnecting
