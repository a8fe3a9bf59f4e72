"""
The proxy resource (front-end B, C{twisted.web}): the L{Decider}'s
decision, then forward over HTTP (or hand a WebSocket upgrade to the
relay).

Per request (reactor thread only)::

    route, record = decider.route(...), decider.admit(...)   see decision.py
    not ready: decider.hold(...) (--ready-wait) or 503
    renew.offer(...)                                          never blocks
    forward: a ResourceExchange over the shared BackendPool, headers by
             the rules of forwarding.py (see resource_exchange.py)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .. import routing
from ..errors import IngressError, UpstreamUnreachable
from ..routing import Route
from ..secure_access import SECURE_ACCESS_HEADER
from .decision import Decider, Resolution
from .errors import render_error
from .forwarding import DEFAULT_OPTIONS, ForwardOptions, connection_tokens
from .pool import BackendPool
from .resource_exchange import (
    ResourceExchange,
    local_uri,
    log_request,
)

if TYPE_CHECKING:
    from ..service import IngressCore

def is_websocket_upgrade(request: Request) -> bool:
    """C{GET} with C{Upgrade: websocket} and C{upgrade} among C{Connection}'s tokens."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade or upgrade[0].strip().lower() != b"websocket":
        return False
    return b"upgrade" in connection_tokens(headers.getRawHeaders(b"connection"))


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


class Proxy:
    """
    The C{twisted.web} request pipeline of one ingress: the L{Decider}'s
    decision, then HTTP forwarding over the backend pool (or the
    WebSocket relay for an upgrade).  Reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        core: IngressCore,
        decider: Decider,
        pool: BackendPool,
        websocket_handler: Callable[[Request, Resolution], None] | None = None,
        options: ForwardOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.core = core
        self.decider = decider
        #: The one backend client (shared with the proxy listener).
        self.pool = pool
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
        The decision for C{request} on C{route} (L{Decider.resolve}): the
        resolution, or a Deferred of it while the sandbox is not ready,
        cancelled if the client leaves; raises (or fails with) an
        L{IngressError}.
        """
        resolution = self.decider.resolve(
            route, request.requestHeaders.getRawHeaders(SECURE_ACCESS_HEADER)
        )
        if isinstance(resolution, Deferred):
            waiting = resolution
            request.notifyFinish().addErrback(lambda _: waiting.cancel())
        return resolution

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
        ResourceExchange(self, request, route, resolution.record, started).start()

    def _fail(
        self,
        request: Request,
        error: IngressError,
        started: float,
        route: Route | None,
    ) -> None:
        render_error(request, error)
        # Twisted counts the body bytes it sent (none for HEAD).
        log_request(self.core, request, route, error.status, request.sentLength, started)
