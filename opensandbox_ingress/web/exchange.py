"""
The backend side of one relayed request, shared by both HTTP front-ends:
taking a pooled connection (or dialling one) from the one
L{BackendPool}, the retry of an idempotent request on a dead pooled
connection, upstream failures classified once (L{upstream_failure}), who
is to blame when the exchange's idle timer expires, abandoning the backend
when the client leaves, and the response's backpressure toward the
backend (L{ReadUpstream}).

Each front-end subclasses L{BackendExchange} with its client side: the
proxy listener's L{opensandbox_ingress.web.server_exchange.Exchange}
writes bytes to its own connection, the C{twisted.web} resource's
L{opensandbox_ingress.web.resource_exchange.ResourceExchange} writes
through a C{Request}.

Ownership: reactor thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.python.failure import Failure

from ..errors import ClientTimeout, IngressError
from .forwarding import (
    CLIENT_CLOSED,
    InvalidUpstreamResponse,
    broken_response_label,
    upstream_failure,
)
from .pool import BackendConnection, BackendPool, PoolKey

if TYPE_CHECKING:
    from ..framing import ResponseHead
    from ..registry import SandboxRecord
    from ..routing import Route
    from ..service import IngressCore
    from .decision import Decider

#: Methods retried once on a fresh connection when a pooled one turns out
#: dead before answering (as Twisted's client does).
RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})

#: Why an exchange answers 408 after an upload stalled.
STALLED_UPLOAD = "the client stopped sending the request body"


class BackendExchange:
    """
    One request relayed to a backend, seen from the backend side (a
    L{opensandbox_ingress.web.pool.ConnectionUser}); subclasses supply the
    client side (the methods that raise C{NotImplementedError}) and the
    response relay.

    The idle timeout (C{--idle-timeout}) counts from the last byte moved in
    either direction.  When it expires while the upload waits on the client
    (the backend connected and not pushing back), the client is to blame:
    408 C{client_timeout} before the response head, the connection cut
    after, counted as a client error.  Otherwise: 502 C{upstream_timeout}
    before the response head, both connections cut after, counted as an
    upstream error.
    """

    __slots__ = (
        "core",
        "pool",
        "decider",
        "head",
        "route",
        "record",
        "endpoint",
        "started",
        "upstream",
        "_connector",
        "_reused",
        "_retried",
        "_responded",
        "_done",
        "_timed_out",
        "_producer",
    )

    def __init__(
        self,
        core: IngressCore,
        pool: BackendPool,
        decider: Decider,
        head: Any,
        route: Route,
        record: SandboxRecord,
        started: float,
    ) -> None:
        self.core = core
        self.pool = pool
        self.decider = decider
        #: The request head (its C{method} is what the connection frames by).
        self.head = head
        self.route = route
        self.record = record
        self.endpoint: str = record.endpoint  # type: ignore[assignment]
        self.started = started
        self.upstream: BackendConnection | None = None
        self._connector: Any = None
        self._reused = False
        self._retried = False
        self._responded = False
        self._done = False
        self._timed_out = False
        self._producer: ReadUpstream | None = None

    # -- the client side, per front-end ---------------------------------------

    def attached(self, upstream: BackendConnection, reused: bool) -> None:
        """A backend connection is ours: send the request."""
        raise NotImplementedError

    def response_head(self, response: ResponseHead) -> None:
        """The backend's response head (accepted by the framing policy)."""
        raise NotImplementedError

    def response_data(self, data: bytes) -> None:
        """Response body bytes from the backend."""
        raise NotImplementedError

    def response_end(self, reusable: bool) -> None:
        """The backend's response is complete."""
        raise NotImplementedError

    def flush(self) -> None:
        """The backend's read is over: send what is held back."""
        raise NotImplementedError

    def _send_error(self, error: IngressError) -> None:
        """Answer C{error} to the client (or cut it, if the head went) and end."""
        raise NotImplementedError

    def _cut_short(self, status: int, abort: bool) -> None:
        """
        End a response whose head went out before it could complete:
        close the client's connection after what was relayed, or, with
        C{abort} (a timer expired: the client may not be reading), at once.
        """
        raise NotImplementedError

    def _has_body(self) -> bool:
        """Whether the request carries a body (then it is never retried)."""
        raise NotImplementedError

    def _upload_waits_on_client(self) -> bool:
        """Whether the upload is incomplete and only the client can move it."""
        raise NotImplementedError

    def _unregister(self) -> None:
        """Stop the response's backpressure toward the backend."""
        raise NotImplementedError

    def _log(self, status: int) -> None:
        """Write the exchange's one access-log line."""
        raise NotImplementedError

    # -- the backend side -----------------------------------------------------

    def _forward(self) -> None:
        """Offer the renew intent, then take a connection for the request."""
        route = self.route
        self.core.renew.offer(route.sandbox_id, route.port, self.decider.renew_uri(route))
        self.pool.acquire(self._key(), self)

    def _key(self) -> PoolKey:
        record = self.record
        return (record.generation or record.name, self.endpoint, self.route.port)

    def connecting(self, connector: Any) -> None:
        """The pool is dialling; C{connector} can cancel it."""
        self._connector = connector

    def connect_failed(self, failure: Failure) -> None:
        """The backend could not be reached."""
        self._connector = None
        if self._done:
            return
        self._fail_before_head(failure)

    def upstream_lost(self, failure: Failure, responded: bool) -> None:
        """The backend connection broke before the exchange completed."""
        self.upstream = None
        if self._done:
            return
        if not responded:
            if (
                self._reused
                and not self._retried
                and self.head.method in RETRYABLE
                and not self._has_body()
            ):
                # A pooled connection the backend had closed: once more on
                # a fresh one.
                self._retried = True
                self.pool.connect(self._key(), self)
                return
            self._fail_before_head(failure)
            return
        # The backend stopped mid-response: the client must see a response
        # shorter than its framing promised rather than a clean end.
        self._unregister()
        self.core.metrics.upstream_error(broken_response_label(self._timed_out))
        self._cut_short(self._response_status(), False)

    def upstream_invalid(self, why: str, responded: bool) -> None:
        """
        The backend's response is not one to relay (never retried: the
        backend answered, badly): 502 C{upstream_invalid_response} before
        the response head, a cut client connection after it.
        """
        self.upstream = None
        if self._done:
            return
        if responded:
            self.upstream_lost(Failure(ierror.ConnectionLost(why)), True)
            return
        self._fail_before_head(Failure(InvalidUpstreamResponse(why)))

    def _fail_before_head(self, failure: Failure | None, error: IngressError | None = None) -> None:
        if error is None:
            target = f"{self.endpoint}:{self.route.port}"
            error, label = upstream_failure(target, failure, self._timed_out)
            self.core.metrics.upstream_error(label)
        # (Else decided, and counted, by the caller.)
        self._send_error(error)

    def _drop_upstream(self) -> None:
        """Cancel a dial, or close the connection (it holds half an exchange)."""
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release(False)

    def _response_status(self) -> int:
        """The status the access log shows for a response cut short."""
        raise NotImplementedError

    # -- the end --------------------------------------------------------------

    def idle_expired(self) -> None:
        """Nothing moved for C{--idle-timeout} seconds: see the class docstring."""
        if self._done:
            return
        self._timed_out = True
        if self._upload_waits_on_client():
            self.core.metrics.client_error("timeout")
            self._drop_upstream()
            if not self._responded:
                self._fail_before_head(None, ClientTimeout(STALLED_UPLOAD))
            else:
                self._unregister()
                self._cut_short(ClientTimeout.status, True)
        elif not self._responded:
            self._drop_upstream()
            self._fail_before_head(None)
        else:
            self._drop_upstream()
            self._unregister()
            self.core.metrics.upstream_error("timeout")
            self._cut_short(self._response_status(), True)

    def abandon(self) -> None:
        """The client went away: abandon the backend side, log 499."""
        if self._done:
            return
        self._done = True
        self._drop_upstream()
        self.core.request_finished()
        self._log(CLIENT_CLOSED)


class ReadUpstream:
    """
    Registered on the client side while a response body flows: a full send
    buffer toward the client pauses reading from the backend.
    """

    __slots__ = ("_upstream", "_paused")

    def __init__(self, upstream: BackendConnection) -> None:
        self._upstream: BackendConnection | None = upstream
        self._paused = False

    def pauseProducing(self) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None and not self._paused:
            self._paused = True
            upstream.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None and self._paused:
            self._paused = False
            upstream.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        # The client went away; its front-end says so.
        pass

    def detach(self) -> None:
        """The exchange ended: leave the backend connection readable."""
        self.resumeProducing()
        self._upstream = None
