"""
One request relayed to a backend and its response relayed back, for the
proxy server protocol (L{opensandbox_ingress.web.server}): the request
head written with the forwarding rules, bodies streamed both ways with
backpressure, the response head filtered and re-framed, the exchange's
idle timeout, upstream failures classified once (L{upstream_failure}),
the retry of an idempotent request on a dead pooled connection.

Ownership: reactor thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import (
    ClientTimeout,
    IngressError,
    UpstreamUnreachable,
)
from ..framing import (
    ResponseHead,
    status_line,
)
from .forwarding import (
    CLIENT_CLOSED,
    POWERED_BY,
    InvalidUpstreamResponse,
    backend_authority,
    broken_response_label,
    error_response,
    forward_request_fields,
    response_fields,
    upstream_failure,
)
from .pool import BackendConnection, PoolKey
from .wire import http_date, send

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..routing import Route
    from .heads import PlainHead
    from .server import ProxyServerChannel

_EMPTY_BODY_CL = frozenset({b"PUT", b"POST"})
#: Methods retried once on a fresh connection when a pooled one turns out
#: dead before answering (as Twisted's client does).
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_NO_BODY = frozenset({204, 304})

_log = Logger(namespace="opensandbox_ingress.web.exchange")


class Exchange:
    """
    One request relayed to a backend and its response relayed back.

    The idle timeout (C{--idle-timeout}) counts from the last byte moved in
    either direction.  When it expires while the upload waits on the client
    (the backend connected and not pushing back), the client is to blame:
    408 C{client_timeout} before the response head, the connection cut
    after, counted as a client error.  Otherwise: 502 C{upstream_timeout}
    before the response head, both connections cut after, counted as an
    upstream error.
    """

    __slots__ = (
        "channel",
        "core",
        "head",
        "route",
        "record",
        "endpoint",
        "started",
        "persistent",
        "pending",
        "upstream",
        "upload_done",
        "_upload_paused",
        "_connector",
        "_reused",
        "_retried",
        "_responded",
        "_chunked",
        "_sent",
        "_status",
        "_done",
        "last",
        "_timed_out",
        "_producer",
        "_out",
        "_hold",
    )

    def __init__(
        self,
        channel: ProxyServerChannel,
        head: PlainHead,
        route: Route,
        record: SandboxRecord,
        started: float,
        persistent: bool,
    ) -> None:
        self.channel = channel
        self.core = channel.core
        self.head = head
        self.route = route
        self.record = record
        self.endpoint: str = record.endpoint  # type: ignore[assignment]
        self.started = started
        self.persistent = persistent
        #: Body bytes received before the upstream connection was ready.
        self.pending: list[bytes] = []
        self.upstream: BackendConnection | None = None
        self.upload_done = head.length == 0
        self._upload_paused = False
        self._connector: Any = None
        self._reused = False
        self._retried = False
        self._responded = False
        self._chunked = False
        self._sent = 0
        self._status = 0
        self._done = False
        #: When a byte last moved either way (for the idle timeout).
        self.last = started
        self._timed_out = False
        self._producer: _ReadUpstream | None = None
        self._out = b""
        self._hold: Deferred[SandboxRecord] | None = None

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        """Forward the request, holding it first while its sandbox is not ready."""
        self.core.request_started()
        record = self.record
        if not (record.ready and record.endpoint):
            # Held (--ready-wait): the upload waits in `pending`, the client
            # paused, as while a backend is dialled.
            self._hold = hold = self.channel.decider.hold(self.route, record)
            hold.addCallbacks(self._released, self._hold_failed)
            return
        self._forward()

    def _released(self, record: SandboxRecord) -> None:
        self._hold = None
        self.record = record
        self.endpoint = record.endpoint  # type: ignore[assignment]
        self.last = self.channel.now()
        self._forward()

    def _hold_failed(self, failure: Failure) -> None:
        self._hold = None
        if self._done:
            return  # the client left (it cancelled the hold)
        error: IngressError
        if failure.check(IngressError):
            error = failure.value
        else:
            _log.failure("holding a request failed", failure)
            error = UpstreamUnreachable("internal error")
        self._send_error(error)

    def _forward(self) -> None:
        route = self.route
        channel = self.channel
        self.core.renew.offer(route.sandbox_id, route.port, channel.decider.renew_uri(route))
        record = self.record
        channel.pool.acquire((record.generation or record.name, self.endpoint, route.port), self)

    def request_bytes(self) -> bytes:
        """The request head for the backend."""
        head = self.head
        route = self.route
        channel = self.channel
        lines = [head.method, b" ", route.path, b" HTTP/1.1\r\n"]
        if head.length:
            lines.append(b"Content-Length: %d\r\n" % head.length)
        elif head.method in _EMPTY_BODY_CL:
            lines.append(b"Content-Length: 0\r\n")
        for name, value in forward_request_fields(
            head.headers,
            head.listed,
            head.host,
            channel.client_bytes,
            channel.secure,
            backend_authority(self.endpoint, route.port),
            route.prefix,
            channel.options,
        ):
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def connecting(self, connector: Any) -> None:
        """The pool is dialling; C{connector} can cancel it."""
        self._connector = connector

    def attached(self, upstream: BackendConnection, reused: bool) -> None:
        """An upstream connection is ours: send the request."""
        self._connector = None
        if self._done:
            upstream.release(False)
            return
        self.upstream = upstream
        self._reused = reused
        self.last = self.channel.now()
        transport = upstream.transport
        assert transport is not None
        pending, self.pending = self.pending, []
        send(transport, self.request_bytes() + b"".join(pending) if pending else self.request_bytes())
        if not self.upload_done:
            transport.registerProducer(_UploadControl(self), True)  # type: ignore[attr-defined]
        self.channel.update_reading()

    def connect_failed(self, failure: Failure) -> None:
        """The backend could not be reached."""
        self._connector = None
        if self._done:
            return
        self._fail_before_head(failure)

    # -- upload ---------------------------------------------------------------

    def upload(self, data: bytes) -> None:
        """Body bytes from the client (framing removed)."""
        self.last = self.channel.now()
        upstream = self.upstream
        if upstream is None or self._done:
            if not self._done:
                self.pending.append(data)
            return
        transport = upstream.transport
        assert transport is not None
        send(transport, data)

    def upload_end(self) -> None:
        """The client's request is complete."""
        if self.upload_done:
            return
        self.upload_done = True
        upstream = self.upstream
        if upstream is not None and not self._done and upstream.transport is not None:
            upstream.transport.unregisterProducer()  # type: ignore[attr-defined]
            self._upload_paused = False

    def upload_blocked(self) -> bool:
        """Whether the client's upload must wait (no backend yet, or it is slow)."""
        return self.upstream is None or self._upload_paused

    def set_upload_paused(self, paused: bool) -> None:
        self._upload_paused = paused
        self.channel.update_reading()

    # -- response -------------------------------------------------------------

    def response_head(self, response: ResponseHead) -> None:
        """
        The backend's response head (accepted by the framing policy):
        write ours to the client.
        """
        self.last = self.channel.now()
        self._responded = True
        code = response.status
        self._status = code
        channel = self.channel
        # Written by the ingress: a validated code and the backend's reason
        # phrase only when it holds no control byte (else the standard one).
        lines = [status_line(code, response.reason)]
        if not self.persistent:
            lines.append(b"Connection: close\r\n")
        for name, value in response_fields(
            response.headers, response.listed, self.route.location_prefix, http_date(self.channel.now())
        ):
            lines += (name, b": ", value, b"\r\n")
        framing = response.framing
        bodyless = framing == "none"
        if code in _NO_BODY:
            pass
        elif bodyless:
            # HEAD: the length a GET would have, as the backend said it.
            if response.content_length is not None:
                lines.append(b"Content-Length: %d\r\n" % response.content_length)
        elif framing == "length":
            lines.append(b"Content-Length: %d\r\n" % response.content_length)  # type: ignore[str-format]
        else:
            # Chunked or read-until-close: re-framed as chunked.
            self._chunked = True
        lines += (POWERED_BY[0], b": ", POWERED_BY[1][0], b"\r\n")
        if self._chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        transport = channel.transport
        assert transport is not None
        # Held until the first body bytes (or the end, or the end of this
        # read) so that a small response leaves in one packet.
        self._out = b"".join(lines)
        upstream = self.upstream
        if not bodyless and upstream is not None:
            self._producer = _ReadUpstream(upstream)
            transport.registerProducer(self._producer, True)  # type: ignore[attr-defined]

    def response_data(self, data: bytes) -> None:
        """Response body bytes from the backend."""
        if self._done or not data:
            return
        self.last = self.channel.now()
        self._sent += len(data)
        transport = self.channel.transport
        assert transport is not None
        out, self._out = self._out, b""
        if self._chunked:
            send(transport, b"%b%x\r\n%b\r\n" % (out, len(data), data))
        else:
            send(transport, out + data if out else data)

    def flush(self) -> None:
        """Send a response head still held back."""
        out, self._out = self._out, b""
        transport = self.channel.transport
        if out and transport is not None:
            send(transport, out)

    def response_end(self, reusable: bool) -> None:
        """The backend's response is complete."""
        upstream, self.upstream = self.upstream, None
        if self._done:
            if upstream is not None:
                upstream.release(False)
            return
        self._unregister()
        transport = self.channel.transport
        out, self._out = self._out, b""
        if self._chunked:
            out += b"0\r\n\r\n"
        if out and transport is not None:
            send(transport, out)
        if upstream is not None:
            upstream.release(reusable and self.upload_done)
        if not self.upload_done:
            # The rest of the upload cannot be framed for another request.
            self.persistent = False
        self._finish(self._status)

    def upstream_lost(self, failure: Failure, responded: bool) -> None:
        """The backend connection broke before the exchange completed."""
        self.upstream = None
        if self._done:
            return
        if not responded:
            if (
                self._reused
                and not self._retried
                and self.head.length == 0
                and self.head.method in _RETRYABLE
            ):
                # A pooled connection the backend had closed: once more on
                # a fresh one.
                self._retried = True
                self.channel.pool.connect(self._key(), self)
                return
            self._fail_before_head(failure)
            return
        # The backend stopped mid-response: end the client's connection
        # after what arrived, so it sees a response shorter than its
        # framing promised rather than a clean end.
        self._unregister()
        self.core.metrics.upstream_error(broken_response_label(self._timed_out))
        self.persistent = False
        self._finish(self._status)

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

    def _key(self) -> PoolKey:
        return (self.record.generation or self.record.name, self.endpoint, self.route.port)

    def _fail_before_head(self, failure: Failure | None, error: IngressError | None = None) -> None:
        if error is None:
            target = f"{self.endpoint}:{self.route.port}"
            error, label = upstream_failure(target, failure, self._timed_out)
            self.core.metrics.upstream_error(label)
        # (Else decided, and counted, by the caller.)
        self._send_error(error)

    def _send_error(self, error: IngressError) -> None:
        """Answer C{error} (rendered by the one renderer) and end the exchange."""
        if self._responded:
            self.channel.abort()
        else:
            self._responded = True
            self._sent = len(error.body())
            transport = self.channel.transport
            assert transport is not None
            send(transport, error_response(error, not self.persistent, http_date(self.channel.now())))
        if not self.upload_done:
            self.persistent = False
        self._finish(error.status)

    # -- client ---------------------------------------------------------------

    def client_lost(self) -> None:
        """The client went away: abandon the backend side."""
        if self._done:
            return
        self._done = True
        if self._hold is not None:
            hold, self._hold = self._hold, None
            hold.cancel()
        if self._connector is not None:
            connector, self._connector = self._connector, None
            connector.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release(False)
        self.core.request_finished()
        head = self.head
        sent = 0 if head.method == b"HEAD" else self._sent
        self.channel.log_request(head, self.route, CLIENT_CLOSED, sent, self.started)

    # -- timers ---------------------------------------------------------------

    def idle_expired(self) -> None:
        """Nothing moved for C{--idle-timeout} seconds (the channel's timer)."""
        if self._done:
            return
        if self._hold is not None:
            # A held request is bounded by --ready-wait, not by the idle
            # timeout (as on twisted.web, where it holds before forwarding).
            self.last = self.channel.now()
            self.channel.arm()
            return
        self._timed_out = True
        if not self.upload_done and self.upstream is not None and not self._upload_paused:
            self._client_timed_out()
        elif not self._responded:
            if self._connector is not None:
                connector, self._connector = self._connector, None
                connector.cancel()
            upstream, self.upstream = self.upstream, None
            if upstream is not None:
                upstream.release(False)
            self._fail_before_head(None)
        else:
            upstream, self.upstream = self.upstream, None
            self._unregister()
            if upstream is not None:
                upstream.release(False)
            self.core.metrics.upstream_error("timeout")
            self.channel.abort()
            self._finish(self._status)

    def _client_timed_out(self) -> None:
        """The upload stalled on the client: a client error, not the sandbox's."""
        self.core.metrics.client_error("timeout")
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            # It holds half a request: never reusable.
            upstream.release(False)
        self.persistent = False
        if not self._responded:
            self._fail_before_head(
                None, ClientTimeout("the client stopped sending the request body")
            )
        else:
            self._unregister()
            self.channel.abort()
            self._finish(ClientTimeout.status)

    # -- the end --------------------------------------------------------------

    def _unregister(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.detach()
            transport = self.channel.transport
            if transport is not None:
                transport.unregisterProducer()  # type: ignore[attr-defined]

    def _finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        self.core.request_finished()
        # Straight to the channel's one access-log exit (no helper between:
        # this runs once per request).  The line counts the body bytes the
        # client got, none for HEAD.
        head, channel = self.head, self.channel
        channel.log_request(
            head, self.route, status, 0 if head.method == b"HEAD" else self._sent, self.started
        )
        channel.exchange_done(self.persistent)


class _UploadControl:
    """
    Registered on the upstream transport while an upload flows: a full
    send buffer toward the backend pauses reading from the client.
    """

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def pauseProducing(self) -> None:
        self._exchange.set_upload_paused(True)

    def resumeProducing(self) -> None:
        self._exchange.set_upload_paused(False)

    def stopProducing(self) -> None:
        # The upstream connection went away; BackendConnection.connectionLost says so.
        pass


class _ReadUpstream:
    """
    Registered on the client transport while a response body flows: a
    full send buffer toward the client pauses reading from the backend.
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
        # The client went away; ProxyServerChannel.connectionLost says so.
        pass

    def detach(self) -> None:
        """The exchange ended: leave the backend connection readable."""
        self.resumeProducing()
        self._upstream = None
