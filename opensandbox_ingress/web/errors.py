"""
The one place where ingress-generated responses are rendered.
"""

from __future__ import annotations

from twisted.web.server import Request

from ..errors import ERROR_HEADER, IngressError
from ..framing import status_line


def error_headers(error: IngressError) -> list[tuple[bytes, bytes]]:
    """The headers of C{error}'s response, besides framing and C{Date}."""
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (ERROR_HEADER, error.code.encode("ascii")),
    ]
    headers.extend(error.extra_headers())
    return headers


def error_response(error: IngressError, close: bool, date: bytes) -> bytes:
    """
    C{error} as a complete HTTP/1.1 response, for front-ends that write
    bytes (the fast path).  C{close} adds C{Connection: close}; C{date} is
    the C{Date} value.
    """
    body = error.body()
    lines = [status_line(error.status)]
    if close:
        lines.append(b"Connection: close\r\n")
    lines += (b"Date: ", date, b"\r\nContent-Length: %d\r\n" % len(body))
    for name, value in error_headers(error):
        lines += (name, b": ", value, b"\r\n")
    lines += (b"\r\n", body)
    return b"".join(lines)


def render_error(request: Request, error: IngressError) -> None:
    """
    Write C{error} as the complete response to C{request} and finish it.

    The body is C{text/plain} C{OpenSandbox Ingress: <reason>}; the stable
    code travels in C{OpenSandbox-Ingress-Error}.  A request whose client is
    already gone, or whose response has started, is left alone.
    """
    if request.finished or getattr(request, "_disconnected", False):
        return
    if request.startedWriting:
        # The status line is gone; the best we can say is to cut the stream.
        transport = request.channel.transport if request.channel else None
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]
        return
    body = error.body()
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.removeHeader(b"Server")
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    for name, value in error_headers(error):
        headers.setRawHeaders(name, [value])
    request.write(body)
    request.finish()
