"""
The proxy port's fast path (opensandbox_ingress.web.server) against a
byte-level backend: framing, pipelining, hand-off to twisted.web on the
same connection, pooled-connection retries, broken backends.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from opensandbox_ingress import IngressService
from opensandbox_ingress.web.server import PIPELINE_LIMIT, ProxyServerChannel
from tests.helpers import RawClient, raw_connect, start_ingress, wait_until

CANNED = {
    b"/cl": b"HTTP/1.1 200 OK\r\nx-case: lower\r\nContent-Length: 5\r\n\r\nhello",
    b"/chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    ),
    b"/garbage": b"NOT HTTP AT ALL\r\n\r\n",
    b"/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    b"/close": b"HTTP/1.1 200 OK\r\n\r\nuntil-close",
    # What a backend answers to HEAD for a 1234-byte resource.
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
}
#: Paths after which the backend closes the connection.
CLOSES = {b"/truncated", b"/close"}


class _Canned(Protocol):
    def __init__(self, owner: CannedBackend) -> None:
        self.owner = owner
        self.buf = b""
        self.answered = 0

    def connectionMade(self) -> None:
        self.owner.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.owner.heads.append(head)
            if self.owner.one_per_connection and self.answered:
                # As a backend whose keep-alive timeout just fired would.
                self.transport.loseConnection()
                return
            self.answered += 1
            path = head.split(b" ")[1].split(b"?")[0]
            if path == b"/hold":
                self.owner.held.append(self)
                return
            self.transport.write(CANNED.get(path, b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n"))
            if path in CLOSES:
                self.transport.loseConnection()
                return


class CannedBackend(Factory):
    noisy = False

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.held: list[_Canned] = []
        self.connections = 0
        self.one_per_connection = False
        self.port: Any = reactor.listenTCP(0, self, interface="127.0.0.1")

    def buildProtocol(self, addr: Any) -> _Canned:
        return _Canned(self)


@pytest_twisted.async_yield_fixture
async def canned() -> AsyncIterator[CannedBackend]:
    backend = CannedBackend()
    yield backend
    await backend.port.stopListening()


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    service = await start_ingress(tmp_path, [{"name": "sbx", "endpoint": "127.0.0.1"}])
    yield service
    await service.stopService()


def _get(path: str, backend: CannedBackend, extra: str = "") -> bytes:
    port = backend.port.getHost().port
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-{port}\r\n{extra}\r\n"
    ).encode()


async def _client(service: IngressService) -> RawClient:
    return await raw_connect(service.addresses()[0].port)


def _responses(raw: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*\r\n", raw)


@pytest_twisted.ensureDeferred
async def test_same_connection_moves_to_twisted_web_and_keeps_serving(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """Fast request, then an Expect request (twisted.web) and a proxied request on one connection."""
    client = await _client(ingress)
    client.transport.write(_get("/cl", canned))
    await wait_until(lambda: client.received.endswith(b"hello"), what="fast response")
    # The fast path forwards response header names as the backend sent them.
    assert b"\r\nx-case: lower\r\n" in client.received
    client.received.clear()
    client.transport.write(_get("/cl", canned, "Expect: 100-continue\r\n"))
    await wait_until(lambda: client.received.endswith(b"hello"), what="handed-off response")
    # twisted.web canonicalises names: this one went through the slow path.
    assert b"\r\nX-Case: lower\r\n" in client.received
    client.received.clear()
    client.transport.write(_get("/cl", canned))
    await wait_until(lambda: client.received.endswith(b"hello"), what="slow-path response")
    # The connection stays with twisted.web.
    assert b"\r\nX-Case: lower\r\n" in client.received
    assert not client.lost
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """Three requests in one write: three responses, in order, on one connection."""
    client = await _client(ingress)
    client.transport.write(_get("/cl", canned) + _get("/missing", canned) + _get("/cl", canned))
    await wait_until(lambda: len(_responses(bytes(client.received))) == 3, what="3 responses")
    await wait_until(lambda: client.received.endswith(b"hello"), what="last body")
    assert _responses(bytes(client.received)) == [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 404 NF\r\n",
        b"HTTP/1.1 200 OK\r\n",
    ]
    assert [h.split(b" ")[1] for h in canned.heads] == [b"/cl", b"/missing", b"/cl"]
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_chunked_and_close_delimited_responses_are_reframed(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """Chunked (with extensions and trailers) and read-until-close bodies reach the client chunked."""
    client = await _client(ingress)
    client.transport.write(_get("/chunked", canned))
    await wait_until(lambda: client.received.endswith(b"0\r\n\r\n"), what="chunked end")
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"Trailer" not in head and b"X-T" not in body
    assert _dechunk(body) == b"helloabc"
    client.received.clear()
    client.transport.write(_get("/close", canned))
    await wait_until(lambda: client.received.endswith(b"0\r\n\r\n"), what="close-delimited end")
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert _dechunk(body) == b"until-close"
    assert not client.lost
    client.transport.loseConnection()


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return out
        out, body = out + body[:size], body[size + 2 :]


@pytest_twisted.ensureDeferred
async def test_dead_pooled_connection_is_retried_for_idempotent_requests(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """A pooled connection that closes instead of answering: GET is retried, POST is not."""
    canned.one_per_connection = True
    client = await _client(ingress)
    client.transport.write(_get("/cl", canned))
    await wait_until(lambda: client.received.endswith(b"hello"), what="first response")
    client.received.clear()
    client.transport.write(_get("/cl", canned))
    await wait_until(lambda: client.received.endswith(b"hello"), what="retried response")
    assert client.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert canned.connections == 2
    client.received.clear()
    port = canned.port.getHost().port
    client.transport.write(
        f"POST /cl HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-{port}\r\n"
        "Content-Length: 3\r\n\r\nabc".encode()
    )
    await wait_until(lambda: b"\r\n\r\n" in client.received, what="POST answer")
    assert client.received.startswith(b"HTTP/1.1 502 ")
    assert b"OpenSandbox-Ingress-Error: upstream_unreachable" in client.received
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_broken_backend_response_is_502_and_truncation_cuts_the_client(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """A non-HTTP answer is a 502; a body cut short ends the client's connection."""
    client = await _client(ingress)
    client.transport.write(_get("/garbage", canned))
    await wait_until(lambda: b"\r\n\r\n" in client.received, what="502")
    assert client.received.startswith(b"HTTP/1.1 502 ")
    assert b"OpenSandbox-Ingress-Error: upstream_invalid_response\r\n" in client.received
    client.received.clear()
    client.transport.write(_get("/truncated", canned))
    await client.closed
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == b"hello"


@pytest_twisted.ensureDeferred
async def test_pipelined_flood_pauses_the_client(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """While a response is pending, pipelined bytes are bounded: the client is paused."""
    client = await _client(ingress)
    client.transport.write(_get("/hold", canned))
    await wait_until(lambda: canned.held, what="request held by the backend")
    flood = _get("/cl", canned) * (16 * 1024 * 1024 // len(_get("/cl", canned)))
    client.transport.write(flood)
    channels = list(ingress.factory.channels)
    assert len(channels) == 1
    channel = channels[0]
    assert isinstance(channel, ProxyServerChannel)
    await wait_until(lambda: channel._paused, what="client paused")
    # The flood outgrew every socket buffer: the client still holds unsent
    # bytes, so the ingress really stopped reading.
    await wait_until(lambda: _unsent(client) > 0, what="client blocked")
    assert PIPELINE_LIMIT < channel.pipelined_bytes < 1024 * 1024
    client.transport.abortConnection()
    # A paused connection notices its client left only when it reads again.
    canned.held[0].transport.loseConnection()
    await wait_until(lambda: not ingress.factory.channels, what="connection closed")


def _unsent(client: RawClient) -> int:
    transport: Any = client.transport
    return int(transport._tempDataLen) + len(transport.dataBuffer)


@pytest_twisted.ensureDeferred
async def test_head_keeps_the_content_length_on_both_paths(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """HEAD answers carry the backend's Content-Length, no body, and the connection goes on."""
    port = canned.port.getHost().port
    head = f"HEAD /head HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-{port}\r\n\r\n"
    client = await _client(ingress)
    for _path in ("fast", "twisted.web"):
        client.transport.write(head.encode() + _get("/cl", canned))
        await wait_until(lambda: client.received.endswith(b"hello"), what="HEAD then GET")
        first, _, rest = bytes(client.received).partition(b"\r\n\r\n")
        assert b"Content-Length: 1234" in first
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
        client.received.clear()
        # The second round goes through twisted.web: hand the connection over.
        client.transport.write(b"GET /status.ok HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: client.received.endswith(b"OK"), what="health check")
        client.received.clear()
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_pipelined_upload_whose_body_waited_behind_a_response(
    ingress: IngressService, canned: CannedBackend
) -> None:
    """A pipelined POST whose head came with the previous request and whose body came later is completed."""
    port = canned.port.getHost().port
    client = await _client(ingress)
    post = (
        f"POST /cl HTTP/1.1\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-{port}\r\n"
        "Content-Length: 10\r\n\r\nhello"
    ).encode()
    client.transport.write(_get("/hold", canned) + post)
    await wait_until(lambda: canned.held, what="request held by the backend")
    # The rest of the upload arrives while the first response is pending.
    client.transport.write(b"world")
    [channel] = list(ingress.factory.channels)
    assert isinstance(channel, ProxyServerChannel)
    await wait_until(lambda: channel.pipelined_bytes == 5, what="the rest buffered")
    canned.held[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")
    await wait_until(lambda: client.received.endswith(b"hello"), what="the POST's response")
    assert _responses(bytes(client.received)) == [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\n"]
    assert canned.heads[-1].startswith(b"POST /cl HTTP/1.1\r\n")
    client.transport.loseConnection()
