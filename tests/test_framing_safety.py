"""
The framing safety table: hostile bytes from a client or from a sandbox,
sent with raw sockets through a real ingress to a raw backend that records
exactly what it receives.  Each row asserts the client's status and what
reached the backend.

The fast engine serves HTTP/1.1 requests; an HTTP/1.0 request goes through
the C{twisted.web} engine, so the response rows run on both.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted

from opensandbox_ingress import IngressService
from tests.helpers import raw_connect, start_ingress, wait_until
from tests.raw_backend import RawBackend

_STATUS_LINE = re.compile(rb"(?m)^HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    service = await start_ingress(tmp_path, [{"name": "sbx", "endpoint": "127.0.0.1"}])
    yield service
    await service.stopService()


async def exchange(service: IngressService, raw: bytes) -> bytes:
    """Send C{raw} on a fresh connection; everything the client got until the ingress closed."""
    client = await raw_connect(service.addresses()[0].port)
    client.transport.write(raw)
    await wait_until(lambda: client.lost, timeout=10, what="the ingress to close the connection")
    return bytes(client.received)


def statuses(raw: bytes) -> list[int]:
    """The status codes of every status line at the start of a line in C{raw}."""
    return [int(m.group(1)) for m in _STATUS_LINE.finditer(raw)]


def error_code(raw: bytes) -> bytes | None:
    m = re.search(rb"\r\nOpenSandbox-Ingress-Error: ([a-z_]+)\r\n", raw)
    return m.group(1) if m else None


def proxied_request(backend: RawBackend, engine: str, path: str = "/r") -> bytes:
    """A request the ingress forwards; C{engine} picks fast (1.1) or twisted.web (1.0)."""
    port = backend.port.getHost().port
    version = "HTTP/1.1" if engine == "fast" else "HTTP/1.0"
    return (
        f"GET {path} {version}\r\nHost: x\r\nOpenSandbox-Ingress-To: sbx-{port}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


@dataclass(frozen=True)
class ResponseRow:
    """A backend answer and what the client must get."""

    name: str
    answer: bytes
    status: int
    code: bytes | None
    #: Bytes that must not reach the client (compared case-insensitively).
    absent: tuple[bytes, ...] = ()


_INVALID = b"upstream_invalid_response"

RESPONSE_ROWS = [
    ResponseRow(
        "bare LF in the reason phrase (response splitting)",
        b"HTTP/1.1 200 OK\nX-Injected: yes\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-injected",),
    ),
    ResponseRow(
        "bare CR in the reason phrase",
        b"HTTP/1.1 200 OK\rX-Injected: yes\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-injected",),
    ),
    ResponseRow(
        "a whole second response injected through the reason phrase",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\nHTTP/1.1 302 Found\nLocation: http://evil/\n\n"
        b"\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"http://evil/", b"302"),
    ),
    ResponseRow(
        "NUL in a header value",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-bad",),
    ),
    ResponseRow(
        "0x01 in a header value",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-bad",),
    ),
    ResponseRow(
        "DEL in a header value",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-bad",),
    ),
    ResponseRow(
        "four-digit status",
        b"HTTP/1.0 2000 OK\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"2000",),
    ),
    ResponseRow(
        "status 600",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"beyond",),
    ),
    ResponseRow(
        "routing and secure-access headers are removed from responses",
        b"HTTP/1.1 200 OK\r\nOpenSandbox-Secure-Access: tok\r\n"
        b"OpenSandbox-Ingress-To: other-80\r\nOPEN-SANDBOX-INGRESS: other-81\r\n"
        b"Content-Length: 2\r\n\r\nhi",
        200,
        None,
        (b"opensandbox-secure-access", b"opensandbox-ingress-to", b"open-sandbox-ingress", b"tok"),
    ),
    ResponseRow(
        "gzip transfer coding with Content-Length (would reach the client unlabelled)",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"gzip",),
    ),
    ResponseRow(
        "obs-fold in a response header",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nhi",
        502,
        _INVALID,
        (b"x-folded",),
    ),
    ResponseRow(
        "a valid custom reason phrase is kept",
        b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nhi",
        200,
        None,
    ),
]

@pytest.mark.parametrize("engine", ["fast", "twisted.web"])
@pytest.mark.parametrize("row", RESPONSE_ROWS, ids=lambda r: r.name)
@pytest_twisted.ensureDeferred
async def test_response_row(ingress: IngressService, row: ResponseRow, engine: str) -> None:
    """Nothing from a sandbox reaches a client's head unvalidated; one response per request."""
    backend = RawBackend(row.answer, close_after=True)
    try:
        got = await exchange(ingress, proxied_request(backend, engine))
    finally:
        await backend.port.stopListening()
    # Exactly one response, whatever the backend tried.
    assert len(statuses(got)) == 1, got
    assert statuses(got) == [row.status], got
    assert error_code(got) == row.code, got
    for needle in row.absent:
        assert needle not in got.lower(), (needle, got)
    # The backend got the one request, as the ingress writes it.
    assert len(backend.connections) == 1
    assert backend.received.startswith(b"GET /r HTTP/1.1\r\n"), backend.received


# -- requests from a client -------------------------------------------------


@dataclass(frozen=True)
class RequestRow:
    """
    Raw client bytes (C{{port}} is the backend's port) and what must happen:
    the client's status (None: the connection is cut without an answer),
    and whether the backend receives nothing or, when C{backend} is set,
    a request starting with it and holding each of C{backend_has} and none
    of C{backend_lacks}.
    """

    name: str
    raw: bytes
    status: int | None
    backend: bytes | None = None
    backend_has: tuple[bytes, ...] = ()
    backend_lacks: tuple[bytes, ...] = ()


_TO = b"OpenSandbox-Ingress-To: sbx-{port}\r\n"
_GET = b"GET / HTTP/1.1\r\nHost: x\r\n" + _TO
_POST = b"POST / HTTP/1.1\r\nHost: x\r\n" + _TO
#: A second request hidden in a body: reaching the backend would be a desync.
_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

REQUEST_ROWS = [
    # What the issue found.
    RequestRow("a 64 KiB header line in one read", _GET + b"X: " + b"a" * 65536 + b"\r\n\r\n", 431),
    RequestRow("10,000 headers", _GET + b"X: a\r\n" * 10000 + b"\r\n", 431),
    RequestRow(
        "pipelined 72 KiB heads",
        (_GET + b"X: " + b"a" * 36 * 1024 + b"\r\n\r\n") * 2,
        431,
    ),
    RequestRow(
        "101 headers",
        _GET + b"".join(b"X-%d: a\r\n" % i for i in range(99)) + b"\r\n",
        431,
    ),
    RequestRow(
        "Transfer-Encoding: identity (the body is not a second request)",
        _POST + b"Transfer-Encoding: identity\r\n\r\n" + _SMUGGLED,
        501,
    ),
    RequestRow(
        "chunked and identity on two lines",
        _POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + _SMUGGLED,
        501,
    ),
    RequestRow(
        "obs-fold in Transfer-Encoding",
        _POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + _SMUGGLED,
        400,
    ),
    RequestRow("NUL in a header value", _GET + b"X: a\x00b\r\n\r\n", 400),
    RequestRow("0x01 in a header value", _GET + b"X: a\x01b\r\n\r\n", 400),
    RequestRow("DEL in a header value", _GET + b"X: a\x7fb\r\n\r\n", 400),
    RequestRow("NUL in Host", b"GET / HTTP/1.1\r\nHost: x\x00y\r\n" + _TO + b"\r\n", 400),
    RequestRow("two different Host headers", _GET + b"Host: y\r\n\r\n", 400),
    RequestRow("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n" + _TO + b"\r\n", 400),
    RequestRow("CONNECT", b"CONNECT sbx-{port}:80 HTTP/1.1\r\nHost: sbx-{port}:80\r\n" + _TO + b"\r\n", 501),
    RequestRow("path byte 0x7f", b"GET /\x7f HTTP/1.1\r\nHost: x\r\n" + _TO + b"\r\n", 400),
    RequestRow("path byte 0x80", b"GET /\x80 HTTP/1.1\r\nHost: x\r\n" + _TO + b"\r\n", 400),
    RequestRow("path byte 0xff", b"GET /\xff HTTP/1.1\r\nHost: x\r\n" + _TO + b"\r\n", 400),
    RequestRow("an unknown method", b"BREW / HTTP/1.1\r\nHost: x\r\n" + _TO + b"\r\n", 501),
    RequestRow(
        "absolute-form: the target's authority routes, not Host",
        b"GET http://sbx-{port}/p?q HTTP/1.1\r\nHost: nope-1\r\n\r\n",
        200,
        b"GET /p?q HTTP/1.1\r\n",
        (b"\r\nX-Forwarded-Host: sbx-{port}\r\n",),
        (b"nope-1",),
    ),
    RequestRow(
        "OPTIONS * is forwarded as it is",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + _TO + b"\r\n",
        200,
        b"OPTIONS * HTTP/1.1\r\n",
    ),
    RequestRow("OPTIONS * with no route: the ingress's own answer", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    RequestRow(
        "X-Forwarded-Proto named in Connection: the ingress sets its own",
        _GET + b"Connection: X-Forwarded-Proto\r\nX-Forwarded-Proto: evil\r\n\r\n",
        200,
        b"GET / HTTP/1.1\r\n",
        (b"\r\nX-Forwarded-Proto: http\r\n",),
        (b"evil",),
    ),
    RequestRow(
        "an empty X-Forwarded-For adds nothing",
        _GET + b"X-Forwarded-For: \r\n\r\n",
        200,
        b"GET / HTTP/1.1\r\n",
        (b"\r\nX-Forwarded-For: 127.0.0.1\r\n",),
        (b", 127.0.0.1",),
    ),
    RequestRow(
        "routing and secure-access headers never reach the sandbox",
        _GET + b"OPEN-SANDBOX-INGRESS: other-1\r\nOpenSandbox-Secure-Access: tok\r\n\r\n",
        200,
        b"GET / HTTP/1.1\r\n",
        (),
        (b"opensandbox-ingress-to", b"open-sandbox-ingress", b"secure-access", b"tok"),
    ),
    # What already held, kept.
    RequestRow(
        "CL.TE",
        _POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + _SMUGGLED,
        400,
    ),
    RequestRow(
        "TE.CL",
        _POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + _SMUGGLED,
        400,
    ),
    RequestRow("conflicting Content-Lengths", _POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    RequestRow("a Content-Length list", _POST + b"Content-Length: 1, 2\r\n\r\nab", 400),
    RequestRow("a negative Content-Length", _POST + b"Content-Length: -1\r\n\r\n", 400),
    RequestRow("a Content-Length with a plus", _POST + b"Content-Length: +2\r\n\r\nab", 400),
    RequestRow("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n" + _TO + b"\n", 400),
    RequestRow("a bare CR in the head", _GET + b"X: a\rb\r\n\r\n", 400),
    RequestRow("a space before the colon", _GET + b"X : a\r\n\r\n", 400),
    RequestRow("a malformed request line", b"GET / HTTP/1.1 x\r\nHost: x\r\n" + _TO + b"\r\n", 400),
    RequestRow("HTTP/2.0 on the request line", b"GET / HTTP/2.0\r\nHost: x\r\n" + _TO + b"\r\n", 505),
    RequestRow(
        "a chunked upload is forwarded de-chunked and re-framed",
        _POST + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
        200,
        b"POST / HTTP/1.1\r\n",
        (b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",),
        (b"ext=1", b"\r\nT: 1"),
    ),
]


def _fill(template: bytes, port: int) -> bytes:
    return template.replace(b"{port}", str(port).encode())


@pytest.mark.parametrize("row", REQUEST_ROWS, ids=lambda r: r.name)
@pytest_twisted.ensureDeferred
async def test_request_row(ingress: IngressService, row: RequestRow) -> None:
    """Each hostile request gets its status, and the backend sees nothing or exactly a clean request."""
    backend = RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    port = backend.port.getHost().port
    try:
        raw = _fill(row.raw, port)
        # Close from our side after the request so keep-alive does not hold
        # the connection: the ingress answers, then sees the end.
        got = await exchange(ingress, raw + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
    finally:
        await backend.port.stopListening()
    if row.status is None:
        assert statuses(got) == [], got
    else:
        assert statuses(got)[:1] == [row.status], got[:300]
        assert b"TwistedWeb" not in got
    received = backend.received
    if row.backend is None:
        assert received == b"", received[:300]
        return
    assert received.startswith(row.backend), received[:300]
    for needle in row.backend_has:
        assert _fill(needle, port) in received, (needle, received)
    for needle in row.backend_lacks:
        assert needle.lower() not in received.lower(), (needle, received)
    assert _SMUGGLED not in received


# -- timers -----------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def quick_ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    """An ingress with a 0.5 s header timeout (and the default 300 s idle one)."""
    service = await start_ingress(
        tmp_path, [{"name": "sbx", "endpoint": "127.0.0.1"}], header_timeout_s=0.5
    )
    yield service
    await service.stopService()


async def _cut_after(service: IngressService, *writes: bytes) -> tuple[float, bytes]:
    """Seconds until the ingress cut a connection that sent C{writes}, and what it got."""
    import time

    client = await raw_connect(service.addresses()[0].port)
    start = time.monotonic()
    for data in writes:
        client.transport.write(data)
    await wait_until(lambda: client.lost, timeout=5, what="the ingress to cut the connection")
    return time.monotonic() - start, bytes(client.received)


@pytest_twisted.ensureDeferred
async def test_silent_connection_is_cut_at_the_header_timeout(quick_ingress: IngressService) -> None:
    """A connection that never sends a byte is cut at the header timeout, not the idle one."""
    took, got = await _cut_after(quick_ingress)
    assert got == b""
    assert 0.4 < took < 3


@pytest_twisted.ensureDeferred
async def test_slow_head_is_cut_at_the_header_timeout(quick_ingress: IngressService) -> None:
    """A head that never completes (slowloris) is cut with no answer."""
    took, got = await _cut_after(quick_ingress, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert got == b""
    assert 0.4 < took < 3


@pytest_twisted.ensureDeferred
async def test_header_timer_still_runs_after_the_hand_off(quick_ingress: IngressService) -> None:
    """After twisted.web served a request, a slow next head is still cut at the header timeout."""
    took, got = await _cut_after(
        quick_ingress,
        b"GET /status.ok HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo",
    )
    assert statuses(got) == [200]
    assert took < 3


@pytest_twisted.ensureDeferred
async def test_bad_chunk_in_an_upload_cuts_the_connection(ingress: IngressService) -> None:
    """A chunked upload whose framing breaks mid-body is cut; the bad bytes never reach the backend."""
    backend = RawBackend()  # never answers: the upload is still in progress
    port = backend.port.getHost().port
    try:
        client = await raw_connect(ingress.addresses()[0].port)
        client.transport.write(_fill(_POST, port) + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await wait_until(lambda: b"abc" in backend.received, what="the first chunk at the backend")
        client.transport.write(b"zz\r\n" + _SMUGGLED)
        await wait_until(lambda: client.lost, what="the ingress to cut the client")
        assert statuses(bytes(client.received)) == []
        assert b"zz" not in backend.received and b"smuggled" not in backend.received
    finally:
        await backend.port.stopListening()


# -- pooled connections -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_extra_bytes_after_a_response_close_the_backend_connection(
    ingress: IngressService,
) -> None:
    """A response followed by bytes nobody asked for: that connection is never reused."""
    backend = RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    port = backend.port.getHost().port
    try:
        client = await raw_connect(ingress.addresses()[0].port)
        request = _fill(_GET, port) + b"\r\n"
        client.transport.write(request)
        await wait_until(lambda: client.received.endswith(b"\r\n\r\nok"), what="first response")
        await wait_until(lambda: backend.connections[0].lost, what="the tainted connection closed")
        client.received.clear()
        client.transport.write(request)
        await wait_until(lambda: client.received.endswith(b"\r\n\r\nok"), what="second response")
        assert len(backend.connections) == 2
        assert statuses(bytes(client.received)) == [200]
        client.transport.loseConnection()
    finally:
        await backend.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bytes_while_idle_in_the_pool_close_the_backend_connection(
    ingress: IngressService,
) -> None:
    """A pooled connection on which the backend writes unasked is closed, and the next request dials anew."""
    backend = RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    port = backend.port.getHost().port
    try:
        client = await raw_connect(ingress.addresses()[0].port)
        request = _fill(_GET, port) + b"\r\n"
        client.transport.write(request)
        await wait_until(lambda: client.received.endswith(b"\r\n\r\nok"), what="first response")
        await wait_until(
            lambda: ingress.upstream.idle_connection_count() == 1, what="pooled"
        )
        first = backend.connections[0]
        assert first.transport is not None
        first.transport.write(b"HTTP/1.1 302 Found\r\nLocation: http://evil/\r\n\r\n")
        await wait_until(lambda: first.lost, what="the pooled connection closed")
        client.received.clear()
        client.transport.write(request)
        await wait_until(lambda: client.received.endswith(b"\r\n\r\nok"), what="second response")
        assert len(backend.connections) == 2
        assert b"evil" not in client.received
        client.transport.loseConnection()
    finally:
        await backend.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_max_header_bytes_is_the_head_limit(tmp_path: Path) -> None:
    """--max-header-bytes sets the limit: a 3 KiB head is fine by default and 431 under 2048."""
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 3072 + b"\r\nConnection: close\r\n\r\n"
    service = await start_ingress(
        tmp_path, [{"name": "sbx", "endpoint": "127.0.0.1"}], max_header_bytes=2048
    )
    try:
        got = await exchange(service, raw)
    finally:
        await service.stopService()
    assert statuses(got) == [431]
    assert error_code(got) == b"request_header_too_large"
