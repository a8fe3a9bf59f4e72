"""
A request answered before its body has arrived (an error the ingress
answers at once, on the twisted.web engine): the rest of the body is read
and discarded and the keep-alive connection carries on, or, when more than
the drain limit is left, the answer says C{Connection: close} and the
connection ends.  Found by C{bench/soak.py}: the connection used to close
without saying so, and a client reusing it lost its next request.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted

from opensandbox_ingress import IngressService
from opensandbox_ingress.web.site import DRAIN_LIMIT_BYTES
from tests.backend import Backend
from tests.helpers import RawClient, raw_connect, start_ingress, wait_until

SANDBOXES: list[dict[str, Any]] = [{"name": "sbx", "endpoint": "127.0.0.1"}]


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    """An ingress with a short idle timeout."""
    service = await start_ingress(tmp_path, SANDBOXES, idle_timeout_s=1.0)
    yield service
    await service.stopService()


def responses(client: RawClient) -> list[bytes]:
    """The status lines received so far."""
    return re.findall(rb"HTTP/1\.1 \d{3}[^\r]*", bytes(client.received))


def post_head(length: int, to: bytes = b"missing-80") -> bytes:
    return (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (to, length)
    )


def get(backend: Backend) -> bytes:
    return b"GET /echo HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-%d\r\n\r\n" % (
        backend.port_number
    )


@pytest_twisted.ensureDeferred
async def test_error_before_a_small_body_keeps_the_connection(
    ingress: IngressService, backend: Backend
) -> None:
    """A POST to a missing sandbox, body in the same packet, then a GET: 404, then 200."""
    client = await raw_connect(ingress.addresses()[0].port)
    client.transport.write(post_head(5) + b"hello")
    await wait_until(lambda: len(responses(client)) == 1, what="the 404")
    assert b"connection: close" not in bytes(client.received).lower()
    client.transport.write(get(backend))
    await wait_until(lambda: len(responses(client)) == 2, what="the next answer")
    assert [r.split(b" ")[1] for r in responses(client)] == [b"404", b"200"]
    assert not client.lost
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_error_answered_before_a_large_body_is_sent_keeps_the_connection(
    ingress: IngressService, backend: Backend
) -> None:
    """The 404 arrives before the 1 MiB body is sent; the body is drained, the next GET served."""
    client = await raw_connect(ingress.addresses()[0].port)
    client.transport.write(post_head(1024 * 1024))
    await wait_until(lambda: len(responses(client)) == 1, what="the 404")
    client.transport.write(b"z" * (1024 * 1024) + get(backend))
    await wait_until(lambda: len(responses(client)) == 2, timeout=10, what="the next answer")
    assert [r.split(b" ")[1] for r in responses(client)] == [b"404", b"200"]
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_error_before_a_body_over_the_limit_says_close(ingress: IngressService) -> None:
    """More than the drain limit left: the answer carries Connection: close, the connection ends."""
    client = await raw_connect(ingress.addresses()[0].port)
    client.transport.write(post_head(DRAIN_LIMIT_BYTES + 1))
    await wait_until(lambda: client.lost, timeout=10, what="the connection to close")
    head = bytes(client.received).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 404 ")
    assert re.search(rb"(?im)^connection: close\r?$", head)


@pytest_twisted.ensureDeferred
async def test_chunked_body_drained_past_the_limit_closes(ingress: IngressService) -> None:
    """A chunked body (length unknown) that goes on past the limit after the answer: closed."""
    client = await raw_connect(ingress.addresses()[0].port)
    client.transport.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: missing-80\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    await wait_until(lambda: len(responses(client)) == 1, what="the 404")
    chunk = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
    for _ in range(DRAIN_LIMIT_BYTES // 65536 + 2):
        if client.lost:
            break
        client.transport.write(chunk)
    await wait_until(lambda: client.lost, timeout=10, what="the connection to close")
    assert [r.split(b" ")[1] for r in responses(client)] == [b"404"]


@pytest_twisted.ensureDeferred
async def test_drain_that_stalls_is_dropped_at_the_idle_timeout(ingress: IngressService) -> None:
    """A client that stops sending the rest of an answered body is dropped after the idle timeout."""
    client = await raw_connect(ingress.addresses()[0].port)
    client.transport.write(post_head(1000) + b"x" * 10)
    await wait_until(lambda: len(responses(client)) == 1, what="the 404")
    await wait_until(lambda: client.lost, timeout=10, what="the idle timeout")
    assert [r.split(b" ")[1] for r in responses(client)] == [b"404"]
