"""
Ingress-generated responses on C{twisted.web}: the headers and body of
L{opensandbox_ingress.web.forwarding.error_headers}, written through a
C{Request}.
"""

from __future__ import annotations

from twisted.web.server import Request

from ..errors import IngressError
from .forwarding import error_headers


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
