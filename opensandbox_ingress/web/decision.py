"""
The one routing decision of both front-ends: which sandbox and port a
request head is for, whether the client may reach it, and whether it is
ready or must be held until it is.

Nothing here touches a connection: the inputs are the fields of a parsed
request head, the registry and the reactor's clock (C{IReactorTime}), so
the decision is tested with a C{Clock} and a registry and no sockets.

Per request (reactor thread only)::

    route  = routing.parse_*(head)                     pure
    record = registry.lookup(route.sandbox_id)         O(1)
    secure_access.check_access(..., clock.seconds())   credentials before readiness
    ready?  proxy  :  --ready-wait ? hold : 503
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from .. import routing
from ..errors import SandboxNotReady
from ..registry import SandboxRecord, SandboxRegistry
from ..routing import Route
from ..secure_access import check_access

#: The health check's path (any query allowed).
HEALTH_PATH = b"/status.ok"


def is_health(target: bytes) -> bool:
    """Whether C{target} (origin-form, relative to the mount) is the health check."""
    if not target.startswith(HEALTH_PATH):
        return False
    return target[len(HEALTH_PATH) : len(HEALTH_PATH) + 1] in (b"", b"?")


class Resolution(NamedTuple):
    """
    The decision for a request the ingress forwards: its route, read as
    it applies to the sandbox, and the sandbox's record (ready or not:
    see L{ready} and L{Decider.hold}).
    """

    route: Route
    record: SandboxRecord

    @property
    def endpoint(self) -> str:
        """The ready record's endpoint."""
        endpoint = self.record.endpoint
        assert endpoint is not None
        return endpoint


class Decider:
    """
    Routes, looks up, authorises and checks readiness for one ingress.

    Holds no per-request state.  C{keys} is the live key ring (a keys file
    rotates it in place), so it is read at every decision, never copied.
    Reactor thread only.
    """

    __slots__ = ("registry", "keys", "uri_mode", "ready_wait_s", "clock", "keep_prefix")

    def __init__(
        self,
        registry: SandboxRegistry,
        keys: Mapping[str, bytes],
        uri_mode: bool,
        ready_wait_s: float,
        clock: IReactorTime,
        keep_prefix: bool = False,
    ) -> None:
        self.registry = registry
        self.keys = keys
        self.uri_mode = uri_mode
        self.ready_wait_s = ready_wait_s
        self.clock = clock
        #: C{--uri-keep-prefix}: admitted URI-mode routes forward the whole path.
        self.keep_prefix = keep_prefix

    def route(
        self,
        target: bytes,
        ingress_to: bytes | None,
        legacy: bytes | None,
        host: bytes | None,
    ) -> Route:
        """
        The route of a request head in the configured mode.

        @param target: the request target, relative to where the proxy is
            mounted.
        @param ingress_to: the first C{OpenSandbox-Ingress-To} value.
        @param legacy: the first C{OPEN-SANDBOX-INGRESS} value.
        @param host: the routing host (absolute-form authority, else C{Host}).
        @raise RouteInvalid: no usable route.
        """
        if self.uri_mode:
            return routing.parse_uri_route(target)
        return routing.parse_header_route(ingress_to, legacy, host, target)

    def admit(
        self, route: Route, secure: Sequence[bytes] | None
    ) -> tuple[Route, SandboxRecord]:
        """
        Look up C{route}'s sandbox and check the client may reach it: the
        reading of the route that applies to the sandbox, and its record,
        which may not be ready (see L{ready} and L{hold}).  (A plain
        pair, not a L{Resolution}: this is the proxy listener's per-request
        path, where building the named tuple costs about 1% of a request.)

        @param secure: every C{OpenSandbox-Secure-Access} value, or None.
        @raise IngressError: the sandbox is unknown (or the registry not
            synced), or the client not authorised (in that order:
            credentials are checked before readiness).
        """
        record = self.registry.lookup(route.sandbox_id)
        route = route.for_sandbox(record.secure_access_token is not None, self.keep_prefix)
        check_access(
            record.secure_access_token,
            secure,
            self.keys,
            route.sandbox_id,
            route.port,
            route.signed,
            self.clock.seconds(),
        )
        return route, record

    def resolve(
        self, route: Route, secure: Sequence[bytes] | None
    ) -> Resolution | Deferred[Resolution]:
        """
        The whole decision for C{route}: L{admit}, then, for a sandbox not
        ready yet, L{hold} (a Deferred of the resolution with the ready
        record; cancel it when the client leaves).

        @raise IngressError: as L{admit} and L{hold} do; the Deferred fails
            with L{SandboxNotReady} at the C{--ready-wait} deadline.
        """
        route, record = self.admit(route, secure)
        if ready(record):
            return Resolution(route, record)
        return self.hold(route, record).addCallback(lambda new: Resolution(route, new))

    def renew_uri(self, route: Route) -> str:
        """The renew intent's C{request_uri}: the forwarded path in URI mode, else empty."""
        return route.path.decode("latin-1") if self.uri_mode else ""

    def hold(self, route: Route, record: SandboxRecord) -> Deferred[SandboxRecord]:
        """
        Wait for the not-ready C{record}'s sandbox to become ready, up to
        C{--ready-wait}: a Deferred of the ready record, failing with
        L{SandboxNotReady} (C{Retry-After}) at the deadline.  Cancel it
        when the client leaves.

        @raise SandboxNotReady: no ready-wait is configured, or too many
            requests wait already.
        """
        if not self.ready_wait_s:
            record.require_ready()
        wait = self.ready_wait_s
        waiting = self.registry.wait_until_ready(route.sandbox_id)
        timed_out: list[bool] = []

        def on_timeout() -> None:
            timed_out.append(True)
            waiting.cancel()

        timer = self.clock.callLater(wait, on_timeout)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def not_ready(failure: Failure) -> Failure:
            if failure.check(CancelledError) and timed_out:
                reason = record.not_ready_reason or "no endpoint"
                return Failure(
                    SandboxNotReady(
                        f"sandbox {record.name} is not ready: {reason}",
                        retry_after=max(1, int(wait)),
                    )
                )
            return failure

        waiting.addBoth(stop_timer)
        return waiting.addErrback(not_ready)


def ready(record: SandboxRecord) -> bool:
    """Whether C{record} can be proxied to now."""
    return bool(record.ready and record.endpoint)
