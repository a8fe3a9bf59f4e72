"""
The proxy port's fast path: a lean HTTP/1.1 server and client for the
requests that make up nearly all traffic, in front of C{twisted.web}.

Why: C{twisted.web}'s server (C{HTTPChannel}, C{Request}, C{Headers}) and
client (C{Agent}, C{HTTP11ClientProtocol}, Deferred chains) cost about
300 microseconds of CPU per proxied request, several times what the bytes
need.  L{FastChannel} parses a request head itself and, when the request is
plain and routes to a ready sandbox it is allowed to reach, relays it over a
pooled L{BackendConnection} connection with nothing but byte strings in between.

Everything else is handed to the C{twisted.web} stack unchanged
(L{FastChannel._hand_off}): the bytes received so far are replayed into an
L{IngressChannel} that owns the connection from then on.  That covers
WebSocket upgrades, the health check, HTTP/1.0, chunked uploads,
C{Expect}, every routing, lookup and authorisation error, sandboxes that
are not ready (so C{--ready-wait} holds them), and anything malformed.  The
decision is made before any side effect, so the slow path sees the request
exactly as the client sent it; the two paths share routing, resolution,
authorisation, header rules and error bodies.

What the fast path does itself: header rewriting both ways (the rules of
L{opensandbox_ingress.web.forwarding}), streamed bodies in both directions with
backpressure (a slow client pauses the backend read, a slow backend pauses
the client's upload), chunked and close-delimited responses re-framed as
chunked, the per-exchange idle timeout, keep-alive idle and header
timeouts, upstream errors (502), a client that leaves (499, the backend
connection is aborted), drain, pipelining.

Ownership: reactor thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString

from .. import routing
from ..errors import (
    ClientTimeout,
    IngressError,
    RegistryNotSynced,
    ShuttingDown,
    UpstreamUnreachable,
    framing_error,
)
from ..framing import (
    Data,
    EndOfMessage,
    Event,
    FramingError,
    RequestHead,
    ResponseHead,
    Switched,
    request_parser,
    status_line,
)
from ..secure_access import SECURE_ACCESS_HEADER
from .decision import Decider, is_health, ready
from .forwarding import (
    CLIENT_CLOSED,
    DEFAULT_OPTIONS,
    LOWER_NAMES,
    POWERED_BY,
    ForwardOptions,
    InvalidUpstreamResponse,
    backend_authority,
    broken_response_label,
    error_response,
    forward_request_fields,
    health_response,
    lower,
    response_fields,
    upstream_failure,
)
from .pool import READ_SIZE, BackendConnection, BackendPool, PoolKey
from .site import DRAIN_LIMIT_BYTES

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..routing import Route
    from ..service import IngressCore

#: Pipelined bytes buffered while a response is in flight before the client
#: is paused.
PIPELINE_LIMIT = 65536

_SECURE = SECURE_ACCESS_HEADER.lower()
_INGRESS_TO = routing.INGRESS_TO_HEADER.lower()
_LEGACY = routing.LEGACY_INGRESS_HEADER.lower()
#: Request headers that send a request to the slow path.
_SLOW_HEADERS = frozenset({b"expect", b"upgrade", b"http2-settings"})
_EMPTY_BODY_CL = frozenset({b"PUT", b"POST"})
#: Methods retried once on a fresh connection when a pooled one turns out
#: dead before answering (as Twisted's client does).
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_NO_BODY = frozenset({204, 304})


_CONNECTION_DONE = Failure(ierror.ConnectionDone())

_log = Logger(namespace="opensandbox_ingress.web.fast")

#: Transports whose socket L{_send} may write to directly.
_DIRECT = (tcp.Server, tcp.Client)


def _send(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but try the socket first when nothing is
    queued: Twisted's write always waits for the next reactor turn (an
    epoll registration and a dispatch per write), a third of a small
    request's cost.  Only plain TCP transports qualify; a partial send
    queues the rest through Twisted as usual.
    """
    if (
        type(transport) in _DIRECT
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport.TLS
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted meet the error on its own write path.
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


_date: list[Any] = [0, b""]


def _http_date(now: float) -> bytes:
    second = int(now)
    if _date[0] != second:
        _date[0] = second
        _date[1] = datetimeToString(second)
    return _date[1]  # type: ignore[no-any-return]


class _Head:
    """What the fast path needs of a request head the framing layer accepted."""

    __slots__ = (
        "method",
        "target",
        "headers",
        "length",
        "close",
        "listed",
        "host",
        "ingress_to",
        "legacy",
        "secure",
    )

    def __init__(self, request: RequestHead) -> None:
        self.method = request.method
        self.target = request.target
        #: The fields as sent, for the request rewrite.
        self.headers = request.headers
        self.length: int = request.content_length or 0
        self.close = not request.keep_alive
        self.listed: frozenset[bytes] = request.listed
        #: The routing host: the absolute-form target's authority, else Host.
        self.host: bytes | None = request.host
        self.ingress_to: bytes | None = None
        self.legacy: bytes | None = None
        self.secure: list[bytes] | None = None


def fast_head(request: RequestHead) -> _Head | None:
    """
    The fast path's view of an accepted request head, or None when the
    request goes to C{twisted.web} (HTTP/1.0, chunked uploads, upgrades,
    C{Expect}).  No parsing here: the framing layer did it; this only
    picks out the routing and secure-access fields.
    """
    if request.version != b"1.1" or request.upgrade or request.content_length is None:
        return None
    head = _Head(request)
    names = LOWER_NAMES
    for name, value in request.headers:
        low = names.get(name)
        if low is None:
            low = lower(name)
        if low in _SLOW_HEADERS:
            return None
        if low == _INGRESS_TO:
            if head.ingress_to is None:
                head.ingress_to = value
        elif low == _LEGACY:
            if head.legacy is None:
                head.legacy = value
        elif low == _SECURE:
            if head.secure is None:
                head.secure = []
            head.secure.append(value)
    return head


def _serialize_head(request: RequestHead) -> bytes:
    """
    An accepted request head as canonical bytes for C{twisted.web}: its own
    parser only ever reads heads the framing layer accepted, written by the
    ingress (one Host: the absolute-form authority when there was one).
    """
    lines = [request.method, b" ", request.target, b" HTTP/", request.version, b"\r\n"]
    for name, value in request.headers:
        if lower(name) != b"host":
            lines += (name, b": ", value, b"\r\n")
    if request.host is not None:
        lines += (b"Host: ", request.host, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class FastIngressFactory(Factory):
    """
    The proxy listeners' factory: L{FastChannel}s, each able to hand its
    connection to C{site} (the C{twisted.web} stack).
    """

    noisy = False

    def __init__(
        self,
        core: IngressCore,
        site: Any,
        decider: Decider,
        pool: BackendPool,
        options: ForwardOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.core = core
        self.site = site
        #: Routes, authorises and checks readiness (shared with C{site}'s proxy).
        self.decider = decider
        #: Backend connections.
        self.pool = pool
        self.idle_timeout: float | None = core.config.idle_timeout_s or None
        self.header_timeout: float | None = core.config.header_timeout_s or None
        self.max_header_bytes: int = core.config.max_header_bytes
        #: The request rewrite's configured choices.
        self.options = options
        #: Connections served by the fast path (not handed off), open.
        self.channels: set[FastChannel] = set()
        self._gone: list[Deferred[None]] = []

    def channel_gone(self, channel: FastChannel) -> None:
        """C{channel} closed or was handed to C{twisted.web}."""
        self.channels.discard(channel)
        if not self.channels and self._gone:
            waiters, self._gone = self._gone, []
            for d in waiters:
                d.callback(None)

    def close_connections(self) -> Deferred[None]:
        """
        Drain: close the fast path's connections once their response (if
        any) is written; fires when all are gone.  Cancel to stop waiting.
        """
        for channel in list(self.channels):
            channel.close_when_idle()
        if not self.channels:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._gone.remove(d) if d in self._gone else None)
        self._gone.append(d)
        return d

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def abort_connections(self) -> None:
        """Drain timed out: cut every fast-path connection, answered or not."""
        for channel in list(self.channels):
            channel.abort()

    def buildProtocol(self, addr: Any) -> FastChannel:
        channel = FastChannel(self, addr)
        self.channels.add(channel)
        return channel



class FastChannel(Protocol):
    """
    One client connection.  Every byte is framed by the framing layer
    (L{opensandbox_ingress.framing}); the ingress's policy refuses what it
    must (400, 431, 501, 505) here, before anything is forwarded.  Serves
    plain requests itself, one at a time (pipelined requests wait, bounded),
    and hands the connection to C{twisted.web} at the first request it does
    not serve: from then on it still frames every request and feeds
    C{twisted.web} canonical bytes written from the accepted events, so
    C{twisted.web}'s parser never reads what a client sent.

    Timers: one per connection.  The header timer runs from accept for the
    first request and from the first byte of each later head, whichever
    engine serves it; idle keep-alive and exchange idle timeouts are the
    fast path's own while it serves the connection.
    """

    def __init__(self, factory: FastIngressFactory, addr: Any) -> None:
        self._factory = factory
        self.core = factory.core
        #: The reactor's clock: every timer and timestamp of the connection.
        self.now: Callable[[], float] = factory.core.reactor.seconds
        self._addr = addr
        self._parser = request_parser(factory.max_header_bytes)
        #: Events framed but not acted on yet (a pipelined request's).
        self._events: deque[Event] = deque()
        #: Bytes that arrived while a response was in flight and its request
        #: was complete: framed once the response is done.
        self._buf = b""
        self._delegate: Any = None
        #: After a handed-off upgrade request: bytes pass as they are.
        self._switched = False
        #: Whether the handed-off message in progress has a chunked body,
        #: and whether its body is still arriving.
        self._delegate_chunked = False
        self._delegate_in_body = False
        #: A refusal waiting for C{twisted.web} to finish its responses.
        self._pending_error: FramingError | None = None
        self._exchange: _Exchange | None = None
        #: Whether the current exchange's request is still arriving.
        self._in_body = False
        self._paused = False
        self._closing = False
        self._timer: IDelayedCall | None = None
        #: When the connection went idle (no exchange), for the idle timeout.
        self._idle_since: float | None = None
        #: When the pending request head started (accept, for the first).
        self._head_since: float | None = None
        self.decider = factory.decider
        self.pool = factory.pool
        self.client = "-"
        #: The peer's address as the forwarded-for chain carries it.
        self.client_bytes = b"-"
        self.secure = False
        self.options = factory.options

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.client = getattr(peer, "host", None) or str(peer)
        self.client_bytes = self.client.encode("ascii", "replace")
        self.secure = ISSLTransport.providedBy(transport)
        if ITCPTransport.providedBy(transport):
            # Writes go out as they are made (see _send); Nagle would hold
            # a second small segment behind a delayed ACK.
            transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            # Fewer, larger reads for uploads (also the write-buffer size
            # past which a slow client pauses the backend).
            transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        now = self.now()
        self._idle_since = now
        # The header timer runs from accept: a connection that never sends
        # a byte is cut at the header timeout, not the idle one.
        self._head_since = now
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._switched:
            self._delegate.dataReceived(data)
            return
        if self._closing:
            return
        if self._idle_since is not None:
            self._idle_since = self.now()
        if self._exchange is not None and not self._in_body:
            # A response is in flight and its request is complete: later
            # requests wait as bytes, bounded (the client is paused).
            self._buf = self._buf + data if self._buf else data
            if len(self._buf) > PIPELINE_LIMIT:
                self._update_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        parser = self._parser
        events = parser.feed(data)
        if events:
            self._events.extend(events)
            self._process()
        if parser.awaiting_head and self._head_since is None and not self._closing:
            # (After the events: a complete head in this read clears it.)
            self._head_since = self.now()
            self._arm()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._closing = True
        self._cancel_timer()
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._factory.channel_gone(self)
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.client_lost()

    # -- requests ------------------------------------------------------------

    def _process(self) -> None:
        """Act on the framed events in order, as far as the state allows."""
        events = self._events
        while events and not self._closing:
            if self._delegate is not None:
                self._to_delegate(events.popleft())
                continue
            exchange = self._exchange
            if exchange is not None:
                if not self._in_body:
                    return  # a pipelined request: after this response
                event = events.popleft()
                if type(event) is Data:
                    exchange.upload(event.data)
                elif type(event) is EndOfMessage:
                    self._in_body = False
                    exchange.upload_end()
                    self._update_reading()
                elif type(event) is FramingError:
                    # A body the framing refused (a bad chunk, say): the
                    # request cannot be completed; cut both sides.
                    self._in_body = False
                    self.abort()
                    exchange.client_lost()
                continue
            event = events.popleft()
            if type(event) is RequestHead:
                self._request(event)
            elif type(event) is FramingError:
                self._refuse(event)
                return

    def _request(self, request: RequestHead) -> None:
        self._head_since = None
        started = self.now()
        head = fast_head(request)
        if head is None:
            self._hand_off(request)
            return
        if is_health(head.target):
            self._health(head)
            return
        decider = self.decider
        route = None
        try:
            route = decider.route(head.target, head.ingress_to, head.legacy, head.host)
            route, record = decider.admit(route, head.secure)
            if not decider.ready_wait_s and not ready(record):
                record.require_ready()
        except IngressError as e:
            self._answer(head, e, started, route)
            return
        self._idle_since = None
        persistent = not head.close and not self.core.draining
        exchange = _Exchange(self, head, route, record, started, persistent)
        self._exchange = exchange
        # Until its EndOfMessage, the events are this request's body.
        self._in_body = True
        exchange.start()
        self._update_reading()

    def _closes_after_answer(self, head: _Head) -> bool:
        """
        Whether an answer given before the request's body arrived ends the
        connection: the client asked, the ingress drains, or more body is
        left than is worth reading and discarding (C{DRAIN_LIMIT_BYTES}).
        """
        return head.close or self.core.draining or head.length > DRAIN_LIMIT_BYTES

    def _answer(self, head: _Head, error: IngressError, started: float, route: Route | None) -> None:
        """
        Answer C{error} for a request no backend sees.  A body still to
        come is framed and dropped (no exchange takes it), so the
        keep-alive connection goes on.
        """
        close = self._closes_after_answer(head)
        self._write_answer(
            error_response(error, close, _http_date(self.now()), head.method == b"HEAD"), close
        )
        self.core.access_log.request(
            head.method,
            route.sandbox_id if route is not None else "-",
            route.port if route is not None else 0,
            error.status,
            len(error.body()),
            started,
            self.client,
        )

    def _health(self, head: _Head) -> None:
        """C{/status.ok}: 200 once the registry is synced, 503 while not or draining."""
        core = self.core
        close = self._closes_after_answer(head)
        date = _http_date(self.now())
        head_only = head.method == b"HEAD"
        error: IngressError | None = None
        if core.draining:
            error = ShuttingDown("ingress is shutting down")
        elif not core.registry.synced:
            error = RegistryNotSynced("sandbox registry is not synced yet")
        if error is None:
            self._write_answer(health_response(close, date, head_only), close)
        else:
            self._write_answer(error_response(error, close, date, head_only), close)

    def _write_answer(self, data: bytes, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        _send(transport, data)
        if close:
            self._close()
            return
        self._idle_since = self.now()
        self._arm()

    def _refuse(self, refusal: FramingError) -> None:
        """Answer a request the framing policy refused, and close."""
        error = framing_error(refusal.status, refusal.reason)
        self._closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is not None:
            _send(transport, error_response(error, True, _http_date(self.now())))
            if self._paused:
                self._paused = False
                transport.resumeProducing()  # type: ignore[attr-defined]
            transport.loseConnection()
        self.core.access_log.request(
            b"-", "-", 0, error.status, len(error.body()), self.now(), self.client
        )

    # -- twisted.web -----------------------------------------------------------

    def _hand_off(self, request: RequestHead) -> None:
        """
        Give the connection to C{twisted.web} from C{request} on.  The
        transport keeps delivering to this object, which keeps framing.
        """
        self._cancel_timer()
        self._factory.channel_gone(self)
        transport = self.transport
        assert transport is not None
        channel = self._factory.site.buildProtocol(self._addr)
        # The header timer stays here, running from accept, and is never
        # restarted by the hand-off.
        channel.header_timeout = None
        channel.on_idle = self._delegate_idle
        self._delegate = channel
        if self._paused:
            self._paused = False
            transport.resumeProducing()  # type: ignore[attr-defined]
        channel.makeConnection(transport)
        self._to_delegate(request)
        if self._head_since is not None:
            self._arm()

    def _to_delegate(self, event: Event) -> None:
        """Feed C{twisted.web} the canonical bytes of one framed event."""
        delegate = self._delegate
        if type(event) is RequestHead:
            self._head_since = None
            self._cancel_timer()
            self._delegate_chunked = event.content_length is None
            self._delegate_in_body = True
            delegate.dataReceived(_serialize_head(event))
        elif type(event) is Data:
            data = event.data
            if self._delegate_chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            delegate.dataReceived(data)
        elif type(event) is EndOfMessage:
            self._delegate_in_body = False
            if self._delegate_chunked:
                delegate.dataReceived(b"0\r\n\r\n")
        elif type(event) is Switched:
            self._switched = True
            delegate.dataReceived(event.data)
        elif type(event) is FramingError:
            if self._delegate_in_body:
                # A body the framing refused (a bad chunk, say): the request
                # in progress cannot be completed; cut the connection.
                self.abort()
                return
            self._pending_error = event
            if not delegate.requests:
                self._delegate_idle()

    def _delegate_idle(self) -> None:
        """C{twisted.web} finished its responses: a refusal may go out now."""
        refusal, self._pending_error = self._pending_error, None
        if refusal is not None and self.transport is not None:
            self._refuse(refusal)

    def exchange_done(self, persistent: bool) -> None:
        """The current response is complete."""
        self._exchange = None
        if not persistent or self.core.draining:
            # Also when the response beat the upload: the rest of the
            # upload cannot be framed for another request.
            self._close()
            return
        self._idle_since = self.now()
        self._update_reading()
        if self._events:
            self._process()
        if self._buf and not self._closing and self._may_frame():
            # Bytes that waited behind the response: the next request, or
            # the rest of the body of one the queued events just started.
            buf, self._buf = self._buf, b""
            self._feed(buf)
        if self._exchange is None and self._delegate is None:
            self._arm()

    def _may_frame(self) -> bool:
        """Whether bytes may be framed now: no exchange, or its body is arriving."""
        return self._exchange is None or self._in_body

    def close_when_idle(self) -> None:
        """Drain: close now if no response is in flight, else after it."""
        if self._exchange is None and self._delegate is None:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def abort(self) -> None:
        """Cut the client connection (a truncated response)."""
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- flow control ----------------------------------------------------------

    @property
    def pipelined_bytes(self) -> int:
        """Bytes of later requests waiting for the current response."""
        return len(self._buf)

    def _update_reading(self) -> None:
        exchange = self._exchange
        want = len(self._buf) > PIPELINE_LIMIT or (
            exchange is not None and self._in_body and exchange.upload_blocked()
        )
        if want != self._paused and self.transport is not None and not self._closing:
            self._paused = want
            if want:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    update_reading = _update_reading

    # -- timers ------------------------------------------------------------------

    def _deadline(self) -> float | None:
        factory = self._factory
        head = None
        if self._head_since is not None and factory.header_timeout:
            head = self._head_since + factory.header_timeout
        if self._delegate is not None:
            # twisted.web times idle connections; the header timer is ours.
            return head
        exchange = self._exchange
        if exchange is not None:
            # One timer per connection: the exchange's idle deadline only
            # moves later, so the timer re-arms itself when it fires early.
            return exchange.last + factory.idle_timeout if factory.idle_timeout else None
        deadline = None
        if self._idle_since is not None and factory.idle_timeout:
            deadline = self._idle_since + factory.idle_timeout
        if head is not None:
            deadline = head if deadline is None else min(deadline, head)
        return deadline

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is None:
            return
        delay = max(0.0, deadline - self.now())
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.core.reactor.callLater(delay, self._expired)
        elif timer.getTime() - self.now() > delay + 0.001:
            timer.reset(delay)

    arm = _arm

    def _expired(self) -> None:
        self._timer = None
        if self._closing or self._switched:
            return
        deadline = self._deadline()
        if deadline is None:
            return
        if self.now() < deadline:
            self._arm()
        elif self._exchange is not None and self._delegate is None:
            self._exchange.idle_expired()
        elif self._head_since is not None:
            # A head that takes too long (slowloris), or never starts.
            self.abort()
        else:
            # Idle keep-alive.
            self._close()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def note_activity(self) -> None:
        """Bytes moved on an idle connection (resets the idle timeout)."""
        if self._idle_since is not None:
            self._idle_since = self.now()


class _Exchange:
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
        channel: FastChannel,
        head: _Head,
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
        if not ready(record):
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
        channel.pool.acquire(self._key(), self)

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
        _send(transport, self.request_bytes() + b"".join(pending) if pending else self.request_bytes())
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
        _send(transport, data)

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
            response.headers, response.listed, self.route.prefix, _http_date(self.channel.now())
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
            _send(transport, b"%b%x\r\n%b\r\n" % (out, len(data), data))
        else:
            _send(transport, out + data if out else data)

    def flush(self) -> None:
        """Send a response head still held back."""
        out, self._out = self._out, b""
        transport = self.channel.transport
        if out and transport is not None:
            _send(transport, out)

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
            _send(transport, out)
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
            _send(transport, error_response(error, not self.persistent, _http_date(self.channel.now())))
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
        self._log(CLIENT_CLOSED)

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
        self._log(status)
        self.channel.exchange_done(self.persistent)

    def _log(self, status: int) -> None:
        route = self.route
        self.core.access_log.request(
            self.head.method,
            route.sandbox_id,
            route.port,
            status,
            0 if self.head.method == b"HEAD" else self._sent,
            self.started,
            self.channel.client,
        )


class _UploadControl:
    """
    Registered on the upstream transport while an upload flows: a full
    send buffer toward the backend pauses reading from the client.
    """

    def __init__(self, exchange: _Exchange) -> None:
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
        # The client went away; FastChannel.connectionLost says so.
        pass

    def detach(self) -> None:
        """The exchange ended: leave the backend connection readable."""
        self.resumeProducing()
        self._upstream = None
