"""
One C{twisted.web} request relayed to a backend over the shared
L{opensandbox_ingress.web.pool.BackendPool} (front-end B), and its
response relayed back through the C{Request}: the request head written by
the forwarding rules, the body streamed from the request's
L{StreamingBody} (or, mounted in a plain C{Site}, from the body Twisted
buffered), the response head filtered by the same rules as the proxy
listener's.  The backend side (pool, retry, failure classes, idle blame)
is L{BackendExchange}'s.

Backpressure: the request body is registered on the backend connection's
transport, so a slow backend pauses the client's upload; a
L{ReadUpstream} is registered on the request, so a client that stops
reading pauses the backend.

Ownership: reactor thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

from ..errors import ClientTimeout, IngressError
from ..framing import ResponseHead, reason_phrase
from .errors import render_error
from .exchange import BackendExchange, ReadUpstream
from .forwarding import (
    DEFAULT_OPTIONS,
    POWERED_BY,
    ForwardOptions,
    HeaderPairs,
    backend_authority,
    connection_tokens,
    forward_request_fields,
    request_head,
    response_fields,
)
from .pool import BackendConnection
from .site import IngressRequest, StreamingBody

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..routing import Route
    from ..service import IngressCore
    from .proxy import Proxy

_NO_BODY = frozenset({204, 304})


def client_ip(request: Request) -> str:
    """The peer's IP address (or a unix socket's description)."""
    addr = request.getClientAddress()
    return getattr(addr, "host", None) or str(addr)


def local_uri(request: Request) -> bytes:
    """
    The request target relative to where the proxy resource is mounted, so
    an embedding program may mount it under a child path.
    """
    uri: bytes = request.uri
    if request.prepath:
        mount = b"/" + b"/".join(request.prepath)
        if uri.startswith(mount):
            uri = uri[len(mount) :] or b"/"
            if uri[:1] == b"?":
                uri = b"/" + uri
    return uri


def log_request(
    core: IngressCore,
    request: Request,
    route: Route | None,
    status: int,
    nbytes: int,
    started: float,
) -> None:
    """
    Front-end B's one access-log exit: the line (and request metrics) of a
    request forwarded by a L{ResourceExchange} or answered by the proxy
    itself (C{route} C{None} when it was not routed).
    """
    core.access_log.request(
        request.method,
        route.sandbox_id if route is not None else "-",
        route.port if route is not None else 0,
        status,
        nbytes,
        started,
        client_ip(request),
        target=local_uri(request),
    )


def request_fields(
    request: Request, endpoint: str, route: Route, options: ForwardOptions = DEFAULT_OPTIONS
) -> HeaderPairs:
    """
    The header fields the backend receives for a C{twisted.web} request:
    the rules of L{forward_request_fields} over the request's header list.
    """
    src = request.requestHeaders
    host = src.getRawHeaders(b"host")
    return forward_request_fields(
        [(name, value) for name, values in src.getAllRawHeaders() for value in values],
        connection_tokens(src.getRawHeaders(b"connection")),
        host[0] if host else None,
        client_ip(request).encode("ascii", "replace"),
        request.isSecure(),
        backend_authority(endpoint, route.port),
        route.prefix,
        options,
    )


def request_body(request: Request) -> IBodyProducer | None:
    """
    The body to relay: the streaming body of an L{IngressRequest}, or,
    mounted in a plain C{Site}, a producer over the body Twisted buffered
    (in memory, or a temporary file past 100 kB); None for no body.
    """
    if isinstance(request, IngressRequest) and request.body is not None:
        return request.body
    content: Any = getattr(request, "content", None)
    if content is not None:
        content.seek(0, 2)
        if content.tell():
            content.seek(0)
            return FileBodyProducer(content)
    return None


@implementer(IConsumer)
class _ChunkedUpload:
    """A body of unknown length (a chunked upload), chunked again toward the backend."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if data:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))


class ResourceExchange(BackendExchange):
    """One forwarded C{twisted.web} request and its response."""

    __slots__ = ("proxy", "request", "_body", "_uploaded", "_idle", "_timer")

    def __init__(
        self,
        proxy: Proxy,
        request: Request,
        route: Route,
        record: SandboxRecord,
        started: float,
    ) -> None:
        BackendExchange.__init__(
            self, proxy.core, proxy.pool, proxy.decider, request, route, record, started
        )
        self.proxy = proxy
        self.request = request
        self._body: Any = request_body(request)
        self._uploaded = self._body is None
        self._idle: float | None = proxy.core.config.idle_timeout_s or None
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        """Take a backend connection and send the request (the renew intent first)."""
        body = self._body
        if isinstance(body, StreamingBody):
            body.on_progress = self._progress
        if self._idle:
            self._timer = self.core.reactor.callLater(self._idle, self._idle_fired)
        self.core.request_started()
        self.request.notifyFinish().addErrback(self._client_gone)
        self._forward()

    # -- the request ----------------------------------------------------------

    def attached(self, upstream: BackendConnection, reused: bool) -> None:
        """A backend connection is ours: send the head, then stream the body."""
        self._connector = None
        if self._done:
            upstream.release(False)
            return
        self.upstream = upstream
        self._reused = reused
        self._progress()
        request = self.request
        route = self.route
        body = self._body
        length: int | None = 0
        if body is not None:
            length = None if body.length is UNKNOWN_LENGTH else body.length
        fields = request_fields(request, self.endpoint, route, self.proxy.options)
        transport = upstream.transport
        assert transport is not None
        transport.write(request_head(request.method, route.path, length, fields))
        if body is None:
            return
        consumer: Any = transport if length is not None else _ChunkedUpload(transport)
        transport.registerProducer(body, True)  # type: ignore[attr-defined]
        body.startProducing(consumer).addCallbacks(
            lambda _: self._upload_complete(upstream, length is None), self._upload_failed
        )

    def _upload_complete(self, upstream: BackendConnection, chunked: bool) -> None:
        self._uploaded = True
        transport = upstream.transport
        if self.upstream is not upstream or transport is None:
            return
        transport.unregisterProducer()  # type: ignore[attr-defined]
        if chunked:
            transport.write(b"0\r\n\r\n")

    def _upload_failed(self, failure: Failure) -> None:
        # The client went away mid-body; _client_gone ends the exchange.
        pass

    # -- the response ---------------------------------------------------------

    def response_head(self, response: ResponseHead) -> None:
        """The backend's response head (accepted by the framing policy)."""
        self._progress()
        self._responded = True
        request = self.request
        code = response.status
        request.setResponseCode(code, reason_phrase(code, response.reason))
        out = request.responseHeaders
        # Twisted's server adds Server and a default Content-Type; a proxy
        # must show exactly what the backend sent.
        out.removeHeader(b"server")
        request.defaultContentType = None
        for name, value in response_fields(
            response.headers, response.listed, self.route.location_prefix, None
        ):
            out.addRawHeader(name, value)
        framing = response.framing
        if code in _NO_BODY:
            pass
        elif framing == "length" or (framing == "none" and response.content_length is not None):
            # (HEAD: the length a GET would have, as the backend said it.)
            out.setRawHeaders(b"Content-Length", [b"%d" % response.content_length])  # type: ignore[str-format]
        out.setRawHeaders(*POWERED_BY)
        if framing in ("chunked", "close"):
            # A streamed response (server-sent events, long polls): the
            # client gets the head now, not with the first body byte.
            request.write(b"")
        upstream = self.upstream
        if framing != "none" and upstream is not None:
            self._producer = ReadUpstream(upstream)
            request.registerProducer(self._producer, True)

    def response_data(self, data: bytes) -> None:
        """Response body bytes from the backend."""
        if self._done:
            return
        self._progress()
        self.request.write(data)

    def flush(self) -> None:
        """Nothing is held back: C{Request.write} sends at once."""

    def response_end(self, reusable: bool) -> None:
        """The backend's response is complete."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release(reusable and self._uploaded and not self._done)
        if self._done:
            return
        self._unregister()
        self.request.finish()
        self._finish(self.request.code)

    # -- what BackendExchange asks of the client side ------------------------

    def _send_error(self, error: IngressError) -> None:
        if isinstance(error, ClientTimeout):
            # The rest of the body will not come: this is the connection's
            # last response, and RFC 9110 (15.5.9) asks to say so.
            self.request.setHeader(b"Connection", b"close")
        render_error(self.request, error)
        self._finish(error.status)

    def _cut_short(self, status: int, abort: bool) -> None:
        # A response shorter than its framing promised: only a cut
        # connection tells the client so on twisted.web.
        self._finish(status)
        channel = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # type: ignore[attr-defined]

    def _has_body(self) -> bool:
        return self._body is not None

    def _upload_waits_on_client(self) -> bool:
        body = self._body
        return bool(getattr(body, "waiting_for_client", False)) and not self._uploaded

    def _response_status(self) -> int:
        return self.request.code

    def _unregister(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.detach()
            self.request.unregisterProducer()

    def _log(self, status: int) -> None:
        log_request(self.core, self.request, self.route, status, self.request.sentLength, self.started)

    # -- timers and the end -----------------------------------------------------

    def _progress(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.reset(self._idle)  # type: ignore[arg-type]

    def _idle_fired(self) -> None:
        self._timer = None
        self.idle_expired()

    def _client_gone(self, failure: Failure) -> None:
        self._stop_timer()
        self.abandon()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _finish(self, status: int) -> None:
        """The exchange is over (after the response's last write): log it once."""
        if self._done:
            return
        self._done = True
        self._stop_timer()
        self.core.request_finished()
        self._log(status)
