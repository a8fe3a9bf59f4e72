"""
Front-end B (the twisted.web resource) on the one backend client, in
memory: requests the proxy listener hands to twisted.web (HTTP/1.0, a
chunked upload) go through the same pool, dials, retry and timers as its
own, driven by a C{MemoryReactorClock} with C{StringTransport}s.  No
sockets, no sleeps.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import error as ierror
from twisted.python.failure import Failure

from tests.memory_ingress import OK, MemoryIngress

IDLE_TIMEOUT = 20.0

HTTP10 = b"GET /x HTTP/1.0\r\nHost: ingress.example\r\nOpenSandbox-Ingress-To: sbx-8080\r\n\r\n"
CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: ingress.example\r\nOpenSandbox-Ingress-To: sbx-8080\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _ingress(tmp_path: Path) -> MemoryIngress:
    return MemoryIngress(tmp_path, idle_timeout_s=IDLE_TIMEOUT)


def test_http10_request_is_relayed_and_its_connection_pooled(tmp_path: Path) -> None:
    """An HTTP/1.0 request reaches the backend as HTTP/1.1; the backend connection is kept."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(HTTP10)
    backend = ingress.accept_dial()
    head = backend.received()
    assert head.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"\r\nHost: 10.0.0.5:8080\r\n" in head
    backend.answer(OK)
    assert client.received().startswith(b"HTTP/1.0 200 OK\r\n")
    assert client.received().endswith(b"\r\n\r\nok")
    assert ingress.service.upstream.idle_connection_count() == 1
    assert not backend.transport.disconnecting


def test_dead_pooled_connection_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    """A pooled connection that closes before answering: the GET goes once more on a new dial."""
    ingress = _ingress(tmp_path)
    first = ingress.connect()
    first.send(HTTP10)
    backend = ingress.accept_dial()
    backend.answer(OK)
    second = ingress.connect()
    second.send(HTTP10)
    assert len(ingress.dials()) == 1  # the pooled connection was taken
    backend.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert len(ingress.dials()) == 2
    fresh = ingress.accept_dial()
    assert fresh.received().startswith(b"GET /x HTTP/1.1\r\n")
    fresh.answer(OK)
    assert second.received().startswith(b"HTTP/1.0 200 OK\r\n")


def test_chunked_upload_is_chunked_again_toward_the_backend(tmp_path: Path) -> None:
    """Chunks flow as they come, re-framed; the end of the upload ends the backend's body."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(CHUNKED + b"5\r\nhello\r\n")
    backend = ingress.accept_dial()
    assert b"\r\nTransfer-Encoding: chunked\r\n" in backend.received()
    assert backend.received().endswith(b"\r\n\r\n5\r\nhello\r\n")
    client.send(b"1;ext=x\r\n!\r\n0\r\n\r\n")
    assert backend.received().endswith(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n")
    backend.answer(OK)
    assert client.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert ingress.service.upstream.idle_connection_count() == 1


def test_stalled_chunked_upload_gets_408_at_the_idle_timeout(tmp_path: Path) -> None:
    """A chunked upload that stops while the backend waits: the client's fault, 408 and close."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(CHUNKED + b"5\r\nhello\r\n")
    backend = ingress.accept_dial()
    ingress.clock.advance(IDLE_TIMEOUT - 0.01)
    assert client.received() == b""
    ingress.clock.advance(0.02)
    assert client.statuses() == [408]
    assert b"\r\nConnection: close\r\n" in client.received()
    assert b"client_timeout" in client.received()
    assert backend.transport.disconnecting


def test_silent_backend_gets_502_upstream_timeout(tmp_path: Path) -> None:
    """The request sent and the backend silent: the sandbox's fault, 502 upstream_timeout."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(HTTP10)
    backend = ingress.accept_dial()
    ingress.clock.advance(IDLE_TIMEOUT + 0.01)
    assert client.received().startswith(b"HTTP/1.0 502 ")
    assert b"upstream_timeout" in client.received()
    assert backend.transport.disconnecting


def test_answer_before_the_upload_ends_is_relayed_at_once(tmp_path: Path) -> None:
    """A backend that answers mid-upload: the client gets the answer; the connection is not pooled."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(CHUNKED + b"5\r\nhello\r\n")
    backend = ingress.accept_dial()
    backend.answer(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
    assert client.received().startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert client.received().endswith(b"\r\n\r\nnope")
    assert backend.transport.disconnecting
    assert ingress.service.upstream.idle_connection_count() == 0


def test_refused_dial_answers_502_upstream_unreachable(tmp_path: Path) -> None:
    """The dial fails: 502 upstream_unreachable, named after the backend."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(HTTP10)
    _host, _port, factory, _timeout, _bind = ingress.dials()[0]
    factory.clientConnectionFailed(None, Failure(ierror.ConnectionRefusedError()))
    assert client.received().startswith(b"HTTP/1.0 502 ")
    assert b"upstream_unreachable" in client.received()
    assert b"10.0.0.5:8080" in client.received()
