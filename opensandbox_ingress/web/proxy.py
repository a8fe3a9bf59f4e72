"""
The proxy resource: route, resolve, authorise, then forward over HTTP (or
hand a WebSocket upgrade to the relay).

Per request (reactor thread only)::

    route  = routing.parse_*(request)                  pure
    record = registry.lookup(route.sandbox_id)         O(1)
    secure_access.check_access(...)                    pure
    renew.offer(...)                                   never blocks
    forward: UpstreamClient.request -> _Exchange relays the response

Backpressure: the response body's upstream transport is registered as the
client request's push producer, so a client that stops reading pauses the
backend read; the request body is a L{StreamingBody} registered on the
upstream transport, so a slow backend pauses the client's upload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .. import routing
from ..errors import (
    ClientTimeout,
    IngressError,
    SandboxNotReady,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..registry import SandboxRecord
from ..routing import Route
from ..secure_access import SECURE_ACCESS_HEADER, check_access
from .errors import render_error
from .site import IngressRequest
from .upstream import InvalidUpstreamResponse

if TYPE_CHECKING:
    from ..service import IngressCore

#: Access-log status of a request whose client left before the response
#: ended (nginx's convention; never sent on the wire).
CLIENT_CLOSED = 499

POWERED_BY = (b"Reverse-Proxy-Server-PowerBy", [b"OpenSandbox-ingress"])

#: Headers never forwarded in either direction (RFC 9110 section 7.6.1),
#: plus the ones Twisted's client frames itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Request headers the backend must not see, besides hop-by-hop ones.
_STRIP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    routing.INGRESS_TO_HEADER.lower(),
    routing.LEGACY_INGRESS_HEADER.lower(),
    SECURE_ACCESS_HEADER.lower(),
    b"x-forwarded-for",
    b"x-forwarded-prefix",
}
#: Response headers the client never sees: hop-by-hop, framing (the
#: ingress frames the response itself), and the routing and secure-access
#: headers (removed in both directions, so a sandbox cannot make a client
#: hold or replay a credential or a route it did not send).
_STRIP_RESPONSE = HOP_BY_HOP | {
    b"content-length",
    routing.INGRESS_TO_HEADER.lower(),
    routing.LEGACY_INGRESS_HEADER.lower(),
    SECURE_ACCESS_HEADER.lower(),
}
_NO_BODY_STATUSES = frozenset({204, 304})


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    return _tokens(headers.getRawHeaders(b"connection"))


def _tokens(values: Sequence[bytes] | None) -> frozenset[bytes]:
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",")
    )


def is_websocket_upgrade(request: Request) -> bool:
    """C{GET} with C{Upgrade: websocket} and C{upgrade} among C{Connection}'s tokens."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade or upgrade[0].strip().lower() != b"websocket":
        return False
    return b"upgrade" in _connection_tokens(headers)


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

    A leaf resource; all state lives in the L{IngressCore} it serves.
    """

    isLeaf = True

    def __init__(self, core: IngressCore) -> None:
        super().__init__()
        self._core = core

    def render(self, request: Request) -> Any:
        self._core.handle(request)
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
    The request pipeline of one ingress: resolution, authorisation and HTTP
    forwarding.  Reactor thread only.
    """

    _log = Logger()

    def __init__(self, core: IngressCore) -> None:
        self._core = core
        config = core.config
        self._uri_mode = config.mode == "uri"
        #: The browser-app flags, decided once here (README, "Serving browser apps").
        self.keep_prefix = self._uri_mode and config.uri_keep_prefix
        self.preserve_host = config.preserve_host
        # The core's live ring, not a copy: a keys file rotates it in place.
        self._keys = core.secure_access_keys
        self._ready_wait = config.ready_wait_s
        self._idle = config.idle_timeout_s or None
        self._clock: Callable[[], float] = time.time
        #: Hook for the WebSocket relay: C{(request, resolution) -> None}.
        self.websocket_handler: Callable[[Request, Resolution], None] | None = None

    # -- resolution -----------------------------------------------------------

    def parse_route(self, request: Request) -> Route:
        """The route of C{request} in the configured mode."""
        uri = local_uri(request)
        if self._uri_mode:
            return routing.parse_uri_route(uri)
        headers = request.requestHeaders
        ingress_to = headers.getRawHeaders(routing.INGRESS_TO_HEADER)
        legacy = headers.getRawHeaders(routing.LEGACY_INGRESS_HEADER)
        host = headers.getRawHeaders(b"host")
        return routing.parse_header_route(
            ingress_to[0] if ingress_to else None,
            legacy[0] if legacy else None,
            host[0] if host else None,
            uri,
        )

    def resolve(self, request: Request) -> Resolution | Deferred[Resolution]:
        """
        Route, look up and authorise C{request}.  Returns the resolution, or
        a Deferred of it when the request waits for its sandbox to become
        ready; raises (or fails with) an L{IngressError}.
        """
        return self.resolve_route(request, self.parse_route(request))

    def resolve_route(
        self, request: Request, route: Route
    ) -> Resolution | Deferred[Resolution]:
        """L{resolve} for an already parsed route."""
        record = self._core.registry.lookup(route.sandbox_id)
        route = route.for_sandbox(record.secure_access_token is not None, self.keep_prefix)
        check_access(
            record.secure_access_token,
            request.requestHeaders.getRawHeaders(SECURE_ACCESS_HEADER),
            self._keys,
            route.sandbox_id,
            route.port,
            route.signed,
            self._clock(),
        )
        if record.ready and record.endpoint:
            return Resolution(route, record, record.endpoint)
        if not self._ready_wait:
            record.require_ready()
        return self._wait_ready(request, route, record)

    def _wait_ready(
        self, request: Request, route: Route, record: SandboxRecord
    ) -> Deferred[Resolution]:
        reactor = self._core.reactor
        waiting = self._core.registry.wait_until_ready(route.sandbox_id)
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            waiting.cancel()

        timer = reactor.callLater(self._ready_wait, on_timeout)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())

        def ready(new: SandboxRecord) -> Resolution:
            if timer.active():
                timer.cancel()
            assert new.endpoint is not None
            return Resolution(route, new, new.endpoint)

        def not_ready(failure: Failure) -> Failure:
            if timer.active():
                timer.cancel()
            if failure.check(CancelledError) and timed_out:
                reason = record.not_ready_reason or "no endpoint"
                return Failure(
                    SandboxNotReady(
                        f"sandbox {record.name} is not ready: {reason}",
                        retry_after=max(1, int(self._ready_wait)),
                    )
                )
            return failure

        return waiting.addCallbacks(ready, not_ready)

    # -- request entry --------------------------------------------------------

    def handle(self, request: Request) -> None:
        """Serve one proxied request (the resource's C{render})."""
        started = time.monotonic()
        if self._core.draining and request.channel is not None:
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
        self._core.renew.offer(
            route.sandbox_id, route.port, route.path.decode("latin-1") if self._uri_mode else ""
        )
        if self.websocket_handler is not None and is_websocket_upgrade(request):
            self.websocket_handler(request, resolution)
            return
        _Exchange(self._core, request, resolution, started, self._idle).start()

    def _fail(
        self,
        request: Request,
        error: IngressError,
        started: float,
        route: Route | None,
    ) -> None:
        render_error(request, error)
        self._core.access_log.request(
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
    request: Request, endpoint: str, route: Route, preserve_host: bool = False
) -> Headers:
    """
    The headers the backend receives: the client's, less hop-by-hop,
    routing and secure-access headers, with C{Host} set to the backend (or,
    with C{preserve_host}, kept as the client sent it) and the
    C{X-Forwarded-*} family added.
    """
    src = request.requestHeaders
    strip = _STRIP_REQUEST
    listed = _connection_tokens(src)
    if listed:
        strip = strip | listed
    out = Headers()
    for name, values in src.getAllRawHeaders():
        if name.lower() not in strip:
            out.setRawHeaders(name, values)
    client_host = src.getRawHeaders(b"host") if preserve_host else None
    if client_host:
        out.setRawHeaders(b"Host", client_host[:1])
    elif ":" in endpoint:
        out.setRawHeaders(b"Host", [b"[%s]:%d" % (endpoint.encode("ascii"), route.port)])
    else:
        out.setRawHeaders(b"Host", [b"%s:%d" % (endpoint.encode("idna"), route.port)])
    ip = client_ip(request).encode("ascii", "replace")
    # An empty incoming value adds nothing (not ", client").
    prior = [v for v in src.getRawHeaders(b"x-forwarded-for", []) if v.strip()]
    out.setRawHeaders(
        b"X-Forwarded-For", [b", ".join(prior) + b", " + ip if prior else ip]
    )
    # A client's own X-Forwarded-Proto/-Host is kept, unless it named the
    # header in Connection (so it was dropped above): then the ingress's.
    if not src.hasHeader(b"x-forwarded-proto") or b"x-forwarded-proto" in listed:
        out.setRawHeaders(
            b"X-Forwarded-Proto", [b"https" if request.isSecure() else b"http"]
        )
    if not src.hasHeader(b"x-forwarded-host") or b"x-forwarded-host" in listed:
        host = src.getRawHeaders(b"host")
        if host:
            out.setRawHeaders(b"X-Forwarded-Host", host[:1])
    if route.prefix:
        out.setRawHeaders(b"X-Forwarded-Prefix", [route.prefix])
    return out


def rebase_location(location: bytes, prefix: bytes) -> bytes:
    """
    URI mode: put a root-relative redirect (C{/x}) under the route's prefix;
    absolute and protocol-relative (C{//host/x}) locations stay as they are.
    """
    if location[:1] == b"/" and location[:2] != b"//":
        return prefix + location
    return location


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
        core: IngressCore,
        request: Request,
        resolution: Resolution,
        started: float,
        idle: float | None,
    ) -> None:
        self._core = core
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
        headers = forward_request_headers(
            request, res.endpoint, route, self._core.proxy.preserve_host
        )
        if self._idle:
            self._timer = self._core.reactor.callLater(self._idle, self._idle_timeout)
        self._core.request_started()
        request.notifyFinish().addBoth(self._client_finished)
        key = (res.record.generation or res.record.name, res.endpoint, route.port)
        d = self._core.upstream.request(key, request.method, route.path, headers, body)
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
        elif (invalid := _invalid(failure)) is not None:
            # The framing layer refused the response head: nothing of it
            # reaches the client.
            error = UpstreamInvalidResponse(
                f"upstream {target} sent an invalid response: {invalid}"
            )
            self._core.metrics.upstream_error("invalid")
        elif self._timed_out or failure.check(ierror.TimeoutError):
            error = UpstreamTimeout(f"upstream {target} timed out")
            self._core.metrics.upstream_error("timeout")
        else:
            self._core.metrics.upstream_error("connect")
            error = UpstreamUnreachable(
                f"upstream {target} unreachable: {_describe(failure)}"
            )
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
        strip = _STRIP_RESPONSE
        listed = _tokens(getattr(response, "connection_header", None))
        if listed:
            strip = strip | listed
        prefix = self._res.route.location_prefix
        head = request.method == b"HEAD"
        for name, values in response.headers.getAllRawHeaders():
            lowered = name.lower()
            if lowered in strip and not (head and lowered == b"content-length"):
                # (HEAD's Content-Length is the length a GET would have.)
                continue
            if prefix and lowered == b"location":
                values = [rebase_location(v, prefix) for v in values]
            out.setRawHeaders(name, values)
        if request.method == b"HEAD":
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
            self._core.metrics.upstream_error("timeout" if self._timed_out else "reset")
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


def _invalid(failure: Failure) -> str | None:
    """The framing layer's reason when C{failure} is a refused response."""
    if failure.check(ResponseFailed):
        for reason in failure.value.reasons:
            found = _invalid(reason)
            if found is not None:
                return found
    if failure.check(InvalidUpstreamResponse):
        return str(failure.value)
    return None


def _describe(failure: Failure) -> str:
    if failure.check(ResponseFailed):
        reasons = failure.value.reasons
        if reasons:
            return _describe(reasons[0])
    if failure.check(ierror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(ierror.DNSLookupError):
        return "name does not resolve"
    if failure.check(CancelledError):
        return "cancelled"
    message = failure.getErrorMessage()
    return message.splitlines()[0] if message else type(failure.value).__name__
