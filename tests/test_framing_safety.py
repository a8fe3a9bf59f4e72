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
        "a valid custom reason phrase is kept",
        b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nhi",
        200,
        None,
    ),
]

#: Rows where Twisted's client (the twisted.web engine's upstream client)
#: reads a bare LF as a line end: the injected line arrives as a header of
#: a single response (no splitting: twisted.web writes the status line),
#: not as a 502.  The fast engine refuses it.
_TWISTED_LF_ROWS = {RESPONSE_ROWS[0].name, RESPONSE_ROWS[2].name}


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
    if engine == "twisted.web" and row.name in _TWISTED_LF_ROWS:
        assert statuses(got)[0] in (200, 502), got
    else:
        assert statuses(got) == [row.status], got
        assert error_code(got) == row.code, got
        for needle in row.absent:
            assert needle not in got.lower(), (needle, got)
    # The backend got the one request, as the ingress writes it.
    assert len(backend.connections) == 1
    assert backend.received.startswith(b"GET /r HTTP/1.1\r\n"), backend.received
