"""
The proxy listener's timers, pipelining, backpressure and retries, in
memory: a C{MemoryReactorClock} drives every timeout, C{StringTransport}s
stand for the client and the backends.  No sockets, no sleeps.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import error as ierror
from twisted.python.failure import Failure

from tests.memory_ingress import OK, MemoryIngress, get

HEADER_TIMEOUT = 5.0
IDLE_TIMEOUT = 20.0


def _ingress(tmp_path: Path, **config: object) -> MemoryIngress:
    config.setdefault("header_timeout_s", HEADER_TIMEOUT)
    config.setdefault("idle_timeout_s", IDLE_TIMEOUT)
    return MemoryIngress(tmp_path, **config)


# -- header timeout -------------------------------------------------------------------


def test_silent_connection_is_cut_at_the_header_timeout_from_accept(tmp_path: Path) -> None:
    """A connection that never sends a byte is cut at the header timeout, not the idle one."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    ingress.clock.advance(HEADER_TIMEOUT - 0.01)
    assert not client.transport.disconnecting
    ingress.clock.advance(0.02)
    assert client.transport.disconnecting
    assert client.received() == b""


def test_trickled_head_is_cut_at_the_header_timeout(tmp_path: Path) -> None:
    """Bytes that trickle in do not extend the header timer (slowloris)."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(b"GET /x HTTP/1.1\r\n")
    for _ in range(4):
        ingress.clock.advance(1.0)
        client.send(b"X-Slow: 1\r\n")
    assert not client.transport.disconnecting
    ingress.clock.advance(1.01)
    assert client.transport.disconnecting
    assert ingress.dials() == []


def test_header_timer_restarts_at_the_next_head(tmp_path: Path) -> None:
    """After a response, the next head has its own header timeout from its first byte."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    backend = ingress.accept_dial()
    backend.answer(OK)
    assert client.statuses() == [200]
    ingress.clock.advance(HEADER_TIMEOUT + 1)
    assert not client.transport.disconnecting  # idle, not in a head
    client.send(b"GET /y HTTP/1.1\r\n")
    ingress.clock.advance(HEADER_TIMEOUT - 0.01)
    assert not client.transport.disconnecting
    ingress.clock.advance(0.02)
    assert client.transport.disconnecting


# -- idle timeouts --------------------------------------------------------------------


def test_idle_keep_alive_connection_is_closed_at_the_idle_timeout(tmp_path: Path) -> None:
    """A kept-alive connection with no request in flight closes after --idle-timeout."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    ingress.accept_dial().answer(OK)
    ingress.clock.advance(IDLE_TIMEOUT - 0.01)
    assert not client.transport.disconnecting
    ingress.clock.advance(0.02)
    assert client.transport.disconnecting
    assert client.statuses() == [200]


def test_silent_backend_gets_502_upstream_timeout_at_the_idle_timeout(tmp_path: Path) -> None:
    """A backend that accepts the request and never answers: 502 upstream_timeout."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    backend = ingress.accept_dial()
    assert backend.received().startswith(b"GET /x HTTP/1.1\r\n")
    ingress.clock.advance(IDLE_TIMEOUT - 0.01)
    assert client.received() == b""
    ingress.clock.advance(0.02)
    assert client.statuses() == [502]
    assert b"OpenSandbox-Ingress-Error: upstream_timeout" in client.received()
    assert backend.transport.disconnecting


def test_bytes_moving_reset_the_exchange_idle_timer(tmp_path: Path) -> None:
    """A response body that keeps coming is never cut, however long it takes in total."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    backend = ingress.accept_dial()
    backend.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    for byte in b"hello":
        ingress.clock.advance(IDLE_TIMEOUT - 1)
        backend.answer(bytes([byte]))
    assert client.received().endswith(b"\r\n\r\nhello")
    assert not client.transport.disconnecting


def test_stalled_upload_gets_408_at_the_idle_timeout(tmp_path: Path) -> None:
    """A client that stops mid-body is the client's fault: 408 client_timeout, connection closed."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get(method="POST", extra="Content-Length: 10\r\n") + b"12345")
    backend = ingress.accept_dial()
    ingress.clock.advance(IDLE_TIMEOUT + 0.01)
    assert client.statuses() == [408]
    assert b"Connection: close\r\n" in client.received()
    assert backend.transport.disconnecting


# -- upstream connect ---------------------------------------------------------------------


def test_backend_is_dialled_with_the_connect_timeout(tmp_path: Path) -> None:
    """The configured --upstream-connect-timeout bounds the dial."""
    ingress = _ingress(tmp_path, upstream_connect_timeout_s=3.5)
    client = ingress.connect()
    client.send(get())
    [(host, port, _factory, timeout, _bind)] = ingress.dials()
    assert (host, port, timeout) == ("10.0.0.5", 8080, 3.5)


def test_connect_timeout_answers_502_upstream_timeout(tmp_path: Path) -> None:
    """A dial that times out is a 502 upstream_timeout, and the connection stays usable."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    [(_host, _port, factory, _timeout, _bind)] = ingress.dials()
    factory.clientConnectionFailed(ingress.clock.connectors[0], Failure(ierror.TimeoutError()))
    assert client.statuses() == [502]
    assert b"OpenSandbox-Ingress-Error: upstream_timeout" in client.received()
    assert not client.transport.disconnecting


def test_dial_still_pending_at_the_idle_timeout_is_cancelled(tmp_path: Path) -> None:
    """A dial that outlasts the idle timeout is stopped and answered 502 upstream_timeout."""
    ingress = _ingress(tmp_path, upstream_connect_timeout_s=60.0)
    client = ingress.connect()
    client.send(get())
    ingress.clock.advance(IDLE_TIMEOUT + 0.01)
    assert client.statuses() == [502]
    assert b"upstream_timeout" in client.received()
    assert ingress.clock.connectors[0].stoppedConnecting


def test_refused_dial_answers_502_upstream_unreachable(tmp_path: Path) -> None:
    """A refused dial is a 502 upstream_unreachable that says why."""
    ingress = _ingress(tmp_path)
    client = ingress.connect()
    client.send(get())
    [(_host, _port, factory, _timeout, _bind)] = ingress.dials()
    factory.clientConnectionFailed(
        ingress.clock.connectors[0], Failure(ierror.ConnectionRefusedError())
    )
    assert client.statuses() == [502]
    assert b"upstream_unreachable" in client.received()
    assert b"connection refused" in client.received()


# -- ready-wait ---------------------------------------------------------------------------


def test_held_request_gets_503_with_retry_after_at_the_ready_wait(tmp_path: Path) -> None:
    """A request for a not-ready sandbox is held --ready-wait seconds, then 503 sandbox_not_ready."""
    ingress = _ingress(tmp_path, ready=False, ready_wait_s=4.0)
    client = ingress.connect()
    client.send(get())
    ingress.clock.advance(3.99)
    assert client.received() == b""
    ingress.clock.advance(0.02)
    assert client.statuses() == [503]
    assert b"sandbox_not_ready" in client.received()
    assert b"Retry-After: 4\r\n" in client.received()
    assert ingress.service.registry.ready_waiters == 0


def test_held_request_is_forwarded_when_the_sandbox_becomes_ready(tmp_path: Path) -> None:
    """A held request goes to the backend as soon as its sandbox is ready."""
    ingress = _ingress(tmp_path, ready=False, ready_wait_s=4.0)
    client = ingress.connect()
    client.send(get())
    ingress.clock.advance(2.0)
    assert ingress.dials() == []
    ingress.set_sandbox(ready=True, generation="g2")
    [(host, port, _factory, _timeout, _bind)] = ingress.dials()
    assert (host, port) == ("10.0.0.5", 8080)
    ingress.clock.advance(10.0)  # the ready-wait timer is gone
    assert b" 503 " not in client.received()


def test_without_ready_wait_a_not_ready_sandbox_is_503_at_once(tmp_path: Path) -> None:
    """No --ready-wait: 503 sandbox_not_ready immediately."""
    ingress = _ingress(tmp_path, ready=False)
    client = ingress.connect()
    client.send(get())
    assert client.statuses() == [503]
    assert b"pod pending" in client.received()
