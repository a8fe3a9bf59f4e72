"""
What the proxy listener answers itself, in memory: the health check, the
decision's errors (with or without a body still to come) and held
requests.  Nothing of these is handed to twisted.web; the bytes show it
(the ingress's own header spelling, one response per request).
"""

from __future__ import annotations

from pathlib import Path

from opensandbox_ingress.web.site import DRAIN_LIMIT_BYTES
from tests.memory_ingress import OK, MemoryIngress, get


def test_health_is_answered_ok_and_the_connection_kept(tmp_path: Path) -> None:
    """/status.ok answers 200 OK (any query) and the next request is proxied on the same connection."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(b"GET /status.ok?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.received().endswith(b"\r\nContent-Length: 2\r\n\r\nOK")
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in client.received()
    client.send(get())
    ingress.accept_dial().answer(OK)
    assert client.statuses() == [200, 200]
    assert not client.transport.disconnecting


def test_health_head_has_no_body(tmp_path: Path) -> None:
    """HEAD /status.ok: the head of the 200, with its length, and no body."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(b"HEAD /status.ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.received().endswith(b"Content-Length: 2\r\n\r\n")


def test_health_is_503_while_draining(tmp_path: Path) -> None:
    """A draining ingress answers the health check 503 shutting_down and closes."""
    ingress = MemoryIngress(tmp_path)
    ingress.service.core.draining = True
    client = ingress.connect()
    client.send(b"GET /status.ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.statuses() == [503]
    assert b"OpenSandbox-Ingress-Error: shutting_down\r\n" in client.received()
    assert b"Connection: close\r\n" in client.received()
    assert client.transport.disconnecting


def test_unknown_sandbox_is_404_and_the_connection_kept(tmp_path: Path) -> None:
    """A routing error is answered on the fast path; keep-alive survives it."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: nope-80\r\n\r\n")
    assert client.statuses() == [404]
    assert b"OpenSandbox-Ingress-Error: sandbox_not_found\r\n" in client.received()
    assert b"Connection: close" not in client.received()
    client.send(get())
    ingress.accept_dial().answer(OK)
    assert client.statuses() == [404, 200]


def test_error_before_a_small_body_discards_it_and_keeps_the_connection(tmp_path: Path) -> None:
    """A POST refused at its head: its body is read and dropped, and the next request is served."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-0\r\n"
        b"Content-Length: 10\r\n\r\n12345"
    )
    assert client.statuses() == [400]
    client.send(b"67890" + get())
    backend = ingress.accept_dial()
    assert b"12345" not in backend.received() and b"67890" not in backend.received()
    backend.answer(OK)
    assert client.statuses() == [400, 200]


def test_error_before_a_large_body_closes_the_connection(tmp_path: Path) -> None:
    """More body left than DRAIN_LIMIT_BYTES: the answer says Connection: close and the connection ends."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: nope-80\r\n"
        b"Content-Length: %d\r\n\r\n" % (DRAIN_LIMIT_BYTES + 1)
    )
    assert client.statuses() == [404]
    assert b"Connection: close\r\n" in client.received()
    assert client.transport.disconnecting


def test_head_error_has_no_body(tmp_path: Path) -> None:
    """HEAD to an unknown sandbox: the 404's head with its length, no body."""
    ingress = MemoryIngress(tmp_path)
    client = ingress.connect()
    client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: nope-80\r\n\r\n")
    assert client.statuses() == [404]
    assert client.received().endswith(b"\r\n\r\n")


def test_client_leaving_a_held_request_cancels_the_wait(tmp_path: Path) -> None:
    """A held request whose client leaves stops waiting; a later ready sandbox dials nothing."""
    ingress = MemoryIngress(tmp_path, ready=False, ready_wait_s=30.0)
    client = ingress.connect()
    client.send(get())
    assert ingress.service.registry.ready_waiters == 1
    client.protocol.connectionLost(None)
    assert ingress.service.registry.ready_waiters == 0
    ingress.set_sandbox(ready=True, generation="g2")
    assert ingress.dials() == []
    assert ingress.service.core.active_requests == 0


def test_held_request_outlives_a_shorter_idle_timeout(tmp_path: Path) -> None:
    """The hold is bounded by --ready-wait, not by the idle timeout."""
    ingress = MemoryIngress(tmp_path, ready=False, ready_wait_s=30.0, idle_timeout_s=10.0)
    client = ingress.connect()
    client.send(get())
    ingress.clock.advance(25.0)
    assert client.received() == b""
    ingress.set_sandbox(ready=True, generation="g2")
    ingress.accept_dial().answer(OK)
    assert client.statuses() == [200]
