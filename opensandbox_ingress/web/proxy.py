"""
The proxy resource (front-end B, C{twisted.web}): the L{Decider}'s
decision, then forward over HTTP (or hand a WebSocket upgrade to the
relay).

Per request (reactor thread only)::

    route, record = decider.route(...), decider.admit(...)   see decision.py
    not ready: decider.hold(...) (--ready-wait) or 503
    renew.offer(...)                                          never blocks
    forward: UpstreamClient.request -> _Exchange relays the response,
             headers by the rules of forwarding.py

Backpressure: the response body's upstream transport is registered as the
client request's push producer, so a client that stops reading pauses the
backend read; the request body is a L{StreamingBody} registered on the
upstream transport, so a slow backend pauses the client's upload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .. import routing
from ..errors import ClientTimeout, IngressError, UpstreamUnreachable
from ..registry import SandboxRecord
from ..routing import Route
from ..secure_access import SECURE_ACCESS_HEADER
from .decision import Decider, ready
from .errors import render_error
from .forwarding import (
    CLIENT_CLOSED,
    DEFAULT_OPTIONS,
    POWERED_BY,
    ForwardOptions,
    backend_authority,
    broken_response_label,
    connection_tokens,
    forward_request_fields,
    response_fields,
    upstream_failure,
)
from .site import IngressRequest
from .upstream import UpstreamClient

if TYPE_CHECKING:
    from ..service import IngressCore

_NO_BODY_STATUSES = frozenset({204, 304})


def is_websocket_upgrade(request: Request) -> bool:
    """C{GET} with C{Upgrade: websocket} and C{upgrade} among C{Connection}'s tokens."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade or upgrade[0].strip().lower() != b"websocket":
        return False
    return b"upgrade" in connection_tokens(headers.getRawHeaders(b"connection"))


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


class ProxyResource(Resource):
    """
    Every path but the health check: the sandbox proxy.

    A leaf resource; the L{Proxy} it renders through holds the pipeline.
    """

    isLeaf = True

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request) -> Any:
        self._proxy.handle(request)
        return NOT_DONE_YET


class Resolution:
    """
    The outcome of routing one request: route, record and endpoint.
    Shared by the HTTP and WebSocket paths.
    """

    __slots__ = ("route", "record", "endpoint")

    def __init__(self, route: Route, record: SandboxRecord, endpoint: str) -> None:
        self.route = route
        self.record = record
        self.endpoint = endpoint


class Proxy:
    """
    The C{twisted.web} request pipeline of one ingress: the L{Decider}'s
    decision, then HTTP forwarding through the upstream client (or the
    WebSocket relay for an upgrade).  Reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        core: IngressCore,
        decider: Decider,
        upstream: UpstreamClient,
        websocket_handler: Callable[[Request, Resolution], None] | None = None,
        options: ForwardOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.core = core
        self.decider = decider
        self.upstream = upstream
        self._idle = core.config.idle_timeout_s or None
        self.options = options
        #: Hook for the WebSocket relay: C{(request, resolution) -> None}.
        self.websocket_handler = websocket_handler

    # -- resolution -----------------------------------------------------------

    def parse_route(self, request: Request) -> Route:
        """The route of C{request} in the configured mode."""
        headers = request.requestHeaders
        ingress_to = headers.getRawHeaders(routing.INGRESS_TO_HEADER)
        legacy = headers.getRawHeaders(routing.LEGACY_INGRESS_HEADER)
        host = headers.getRawHeaders(b"host")
        return self.decider.route(
            local_uri(request),
            ingress_to[0] if ingress_to else None,
            legacy[0] if legacy else None,
            host[0] if host else None,
        )

    def resolve_route(
        self, request: Request, route: Route
    ) -> Resolution | Deferred[Resolution]:
        """
        Look up and authorise C{request} for C{route}.  Returns the
        resolution, or a Deferred of it when the request waits for its
        sandbox to become ready; raises (or fails with) an L{IngressError}.
        """
        route, record = self.decider.admit(
            route, request.requestHeaders.getRawHeaders(SECURE_ACCESS_HEADER)
        )
        if ready(record):
            assert record.endpoint is not None
            return Resolution(route, record, record.endpoint)
        waiting = self.decider.hold(route, record)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())

        def held(new: SandboxRecord) -> Resolution:
            assert new.endpoint is not None
            return Resolution(route, new, new.endpoint)

        return waiting.addCallback(held)

    # -- request entry --------------------------------------------------------

    def handle(self, request: Request) -> None:
        """Serve one proxied request (the resource's C{render})."""
        started = self.core.reactor.seconds()
        if self.core.draining and request.channel is not None:
            # Serve it, but make it the connection's last request.
            request.channel.persistent = False
        route = None
        try:
            route = self.parse_route(request)
            resolution = self.resolve_route(request, route)
        except IngressError as e:
            self._fail(request, e, started, route)
            return
        if isinstance(resolution, Deferred):
            resolution.addCallbacks(
                lambda r: self._dispatch(request, r, started),
                lambda f: self._resolution_failed(request, f, started, route),
            )
            return
        self._dispatch(request, resolution, started)

    def _resolution_failed(
        self, request: Request, failure: Failure, started: float, route: Route | None
    ) -> None:
        if failure.check(IngressError):
            self._fail(request, failure.value, started, route)
        elif not failure.check(CancelledError):
            self._log.failure("resolving a request failed", failure)
            self._fail(request, UpstreamUnreachable("internal error"), started, route)

    def _dispatch(self, request: Request, resolution: Resolution, started: float) -> None:
        route = resolution.route
        self.core.renew.offer(route.sandbox_id, route.port, self.decider.renew_uri(route))
        if self.websocket_handler is not None and is_websocket_upgrade(request):
            self.websocket_handler(request, resolution)
            return
        _Exchange(self, request, resolution, started, self._idle).start()

    def _fail(
        self,
        request: Request,
        error: IngressError,
        started: float,
        route: Route | None,
    ) -> None:
        render_error(request, error)
        self.core.access_log.request(
            request.method,
            route.sandbox_id if route else "-",
            route.port if route else 0,
            error.status,
            len(error.body()),
            started,
            client_ip(request),
            target=local_uri(request),
        )


def forward_request_headers(
    request: Request, endpoint: str, route: Route, options: ForwardOptions = DEFAULT_OPTIONS
) -> Headers:
    """
    The headers the backend receives for a C{twisted.web} request: the
    rules of L{forward_request_fields} over the request's header list.
    """
    src = request.requestHeaders
    host = src.getRawHeaders(b"host")
    fields = forward_request_fields(
        [(name, value) for name, values in src.getAllRawHeaders() for value in values],
        connection_tokens(src.getRawHeaders(b"connection")),
        host[0] if host else None,
        client_ip(request).encode("ascii", "replace"),
        request.isSecure(),
        backend_authority(endpoint, route.port),
        route.prefix,
        options,
    )
    out = Headers()
    for name, value in fields:
        out.addRawHeader(name, value)
    return out


_RESPONSE_DONE = Failure(ResponseDone())


class _BodyRelay(Protocol):
    """Receives the upstream response body and writes it to the client."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._exchange.body_data(data)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        self._exchange.body_done(reason)


class _Exchange:
    """
    One forwarded HTTP request and its response.

    Owns the idle timer: any byte moving in either direction resets it.
    When it fires while the upload waits on the client (the backend ready
    for more), the client is to blame: 408 C{client_timeout} before the
    response head, the connection closed after, counted as a client error.
    Otherwise the backend is: 502 C{upstream_timeout} before the response
    head, both connections closed after, counted as an upstream error.
    """

    __slots__ = (
        "_proxy",
        "_core",
        "_request",
        "_res",
        "_started",
        "_idle",
        "_timer",
        "_pending",
        "_body_transport",
        "_done",
        "_timed_out",
        "_client_stalled",
        "_rebase",
    )

    def __init__(
        self,
        proxy: Proxy,
        request: Request,
        resolution: Resolution,
        started: float,
        idle: float | None,
    ) -> None:
        self._proxy = proxy
        self._core = proxy.core
        self._request = request
        self._res = resolution
        self._started = started
        self._idle = idle
        self._timer: IDelayedCall | None = None
        self._pending: Deferred[IResponse] | None = None
        self._body_transport: Any = None
        self._done = False
        self._timed_out = False
        self._client_stalled = False
        self._rebase = False

    def start(self) -> None:
        request = self._request
        res = self._res
        route = res.route
        body: IBodyProducer | None = None
        if isinstance(request, IngressRequest) and request.body is not None:
            body = request.body
            request.body.on_progress = self._progress
        else:
            # Mounted in a plain Site, Twisted has buffered the body already.
            content: Any = getattr(request, "content", None)
            if content is not None:
                content.seek(0, 2)
                if content.tell():
                    content.seek(0)
                    body = FileBodyProducer(content)
        headers = forward_request_headers(request, res.endpoint, route, self._proxy.options)
        if self._idle:
            self._timer = self._core.reactor.callLater(self._idle, self._idle_timeout)
        self._core.request_started()
        request.notifyFinish().addBoth(self._client_finished)
        key = (res.record.generation or res.record.name, res.endpoint, route.port)
        d = self._proxy.upstream.request(key, request.method, route.path, headers, body)
        self._pending = d
        d.addCallbacks(self._response, self._request_failed)

    # -- timers -----------------------------------------------------------------

    def _progress(self) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle)  # type: ignore[arg-type]

    def _idle_timeout(self) -> None:
        self._timer = None
        self._timed_out = True
        body = self._request.body if isinstance(self._request, IngressRequest) else None
        if body is not None and body.waiting_for_client and not self._done:
            self._client_timed_out()
            return
        if self._pending is not None:
            self._pending.cancel()
        elif self._body_transport is not None:
            self._body_transport.stopProducing()
            self._abort_client()

    def _client_timed_out(self) -> None:
        """The upload stalled on the client: a client error, not the sandbox's."""
        self._client_stalled = True
        self._core.metrics.client_error("timeout")
        if self._pending is not None:
            # _request_failed renders the 408 (the cancel fires it at once).
            self._pending.cancel()
            return
        # The response has started: all that is left is to close the
        # connection, logged with the client's status.
        if self._body_transport is not None:
            self._body_transport.stopProducing()
            self._body_transport = None
        self._finished(ClientTimeout.status)
        self._abort_client()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- upstream events ------------------------------------------------------

    def _request_failed(self, failure: Failure) -> None:
        self._pending = None
        self._stop_timer()
        if self._done:
            return
        route = self._res.route
        target = f"{self._res.endpoint}:{route.port}"
        error: IngressError
        if self._client_stalled:
            error = ClientTimeout("the client stopped sending the request body")
            # The rest of the body will not come: this is the connection's
            # last response, and RFC 9110 (15.5.9) asks to say so.
            self._request.setHeader(b"Connection", b"close")
        else:
            error, label = upstream_failure(target, failure, self._timed_out)
            self._core.metrics.upstream_error(label)
        render_error(self._request, error)
        self._finished()

    def _response(self, response: IResponse) -> None:
        self._pending = None
        request = self._request
        if self._done:
            response.deliverBody(_Discard())
            return
        self._progress()
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        # Twisted's server adds Server and a default Content-Type; a proxy
        # must show exactly what the backend sent.
        out.removeHeader(b"server")
        request.defaultContentType = None
        head = request.method == b"HEAD"
        for name, value in response_fields(
            [(name, value) for name, values in response.headers.getAllRawHeaders() for value in values],
            connection_tokens(getattr(response, "connection_header", None)),
            self._res.route.location_prefix,
            None,
        ):
            out.addRawHeader(name, value)
        if head:
            # HEAD's Content-Length is the length a GET would have.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                out.setRawHeaders(b"Content-Length", length)
        if head:
            pass
        elif response.length is not UNKNOWN_LENGTH and response.code not in _NO_BODY_STATUSES and response.code >= 200:
            out.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        out.setRawHeaders(*POWERED_BY)
        if response.length is UNKNOWN_LENGTH:
            # A streamed response (server-sent events, long polls): the
            # client gets the head now, not with the first body byte.
            request.write(b"")
        response.deliverBody(_BodyRelay(self))

    def body_started(self, transport: Any) -> None:
        self._body_transport = transport
        self._request.registerProducer(transport, True)

    def body_data(self, data: bytes) -> None:
        if self._done:
            return
        if self._timer is not None:
            self._timer.reset(self._idle)  # type: ignore[arg-type]
        self._request.write(data)

    def body_done(self, reason: Failure) -> None:
        request = self._request
        self._stop_timer()
        if self._done:
            return
        if self._body_transport is not None:
            request.unregisterProducer()
            self._body_transport = None
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            # The backend stopped mid-response: cut the client's connection
            # so it sees a truncated response rather than a clean end.
            self._core.metrics.upstream_error(broken_response_label(self._timed_out))
            self._abort_client()
        self._finished()

    # -- client events ------------------------------------------------------

    def _abort_client(self) -> None:
        channel = self._request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # type: ignore[attr-defined]

    def _client_finished(self, result: object) -> None:
        if isinstance(result, Failure) and not self._done:
            # The client went away: cancel the upstream side.
            self._done = True
            self._core.request_finished()
            self._log_access(CLIENT_CLOSED)
            self._stop_timer()
            if self._pending is not None:
                self._pending.cancel()
            if self._body_transport is not None:
                self._body_transport.stopProducing()
                self._body_transport = None

    def _finished(self, status: int | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._core.request_finished()
        self._log_access(status)

    def _log_access(self, status: int | None = None) -> None:
        request = self._request
        route = self._res.route
        self._core.access_log.request(
            request.method,
            route.sandbox_id,
            route.port,
            request.code if status is None else status,
            request.sentLength,
            self._started,
            client_ip(request),
            target=local_uri(request),
        )


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
