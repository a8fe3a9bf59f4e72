"""
The proxy port's fast path: a lean HTTP/1.1 server and client for the
requests that make up nearly all traffic, in front of C{twisted.web}.

Why: C{twisted.web}'s server (C{HTTPChannel}, C{Request}, C{Headers}) and
client (C{Agent}, C{HTTP11ClientProtocol}, Deferred chains) cost about
300 microseconds of CPU per proxied request, several times what the bytes
need.  L{FastChannel} parses a request head itself and, when the request is
plain and routes to a ready sandbox it is allowed to reach, relays it over a
pooled L{_Upstream} connection with nothing but byte strings in between.

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
L{opensandbox_ingress.web.proxy}), streamed bodies in both directions with
backpressure (a slow client pauses the backend read, a slow backend pauses
the client's upload), chunked and close-delimited responses re-framed as
chunked, the per-exchange idle timeout, keep-alive idle and header
timeouts, upstream errors (502), a client that leaves (499, the backend
connection is aborted), drain, pipelining.

Ownership: reactor thread only.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, ISSLTransport, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString

from .. import routing
from .._compat import PYPY
from ..errors import (
    ClientTimeout,
    IngressError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
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
    response_parser,
    status_line,
)
from ..secure_access import SECURE_ACCESS_HEADER, check_access
from .errors import error_response
from .health import HEALTH_PATH
from .proxy import (
    _STRIP_REQUEST,
    _STRIP_RESPONSE,
    CLIENT_CLOSED,
    POWERED_BY,
    _describe,
    rebase_location,
)

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..routing import Route
    from ..service import IngressCore

#: Pipelined bytes buffered while a response is in flight before the client
#: is paused.
PIPELINE_LIMIT = 65536
#: Socket read size.  256 KiB makes a 1 MiB body four reactor trips instead
#: of sixteen on CPython; on PyPy strings that large live outside the
#: nursery until a major collection, and a busy ingress grew past 1 GiB, so
#: it keeps Twisted's 64 KiB.
READ_SIZE = 1 << 16 if PYPY else 1 << 18

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

#: Seconds an idle pooled connection is kept, and the most kept per key.
POOLED_IDLE_S = 60.0
MAX_IDLE_PER_KEY = 32

_CONNECTION_DONE = Failure(ierror.ConnectionDone())

_names: dict[bytes, bytes] = {}


def _lower(name: bytes) -> bytes:
    """C{name} lower-cased (cached: the same few names come every request)."""
    low = _names.get(name)
    if low is None:
        low = name.lower()
        if len(_names) < 4096:
            _names[name] = low
    return low


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
        "xff",
        "has_xfp",
        "has_xfh",
    )

    def __init__(self, request: RequestHead) -> None:
        self.method = request.method
        self.target = request.target
        #: (name as sent, lower-cased name, value)
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.length: int = request.content_length or 0
        self.close = not request.keep_alive
        self.listed: frozenset[bytes] = request.listed
        #: The routing host: the absolute-form target's authority, else Host.
        self.host: bytes | None = request.host
        self.ingress_to: bytes | None = None
        self.legacy: bytes | None = None
        self.secure: list[bytes] | None = None
        self.xff: list[bytes] | None = None
        self.has_xfp = False
        self.has_xfh = False


def fast_head(request: RequestHead) -> _Head | None:
    """
    The fast path's view of an accepted request head, or None when the
    request goes to C{twisted.web} (HTTP/1.0, chunked uploads, upgrades,
    C{Expect}).  No parsing here: the framing layer did it; this only
    sorts the header fields the fast path acts on.
    """
    if request.version != b"1.1" or request.upgrade or request.content_length is None:
        return None
    head = _Head(request)
    headers = head.headers
    names = _names
    for name, value in request.headers:
        low = names.get(name)
        if low is None:
            low = _lower(name)
        if low in _SLOW_HEADERS:
            return None
        headers.append((name, low, value))
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
        elif low == b"x-forwarded-for":
            # An empty value adds nothing (not ", client").
            if value:
                if head.xff is None:
                    head.xff = []
                head.xff.append(value)
        elif low == b"x-forwarded-proto":
            head.has_xfp = True
        elif low == b"x-forwarded-host":
            head.has_xfh = True
    listed = head.listed
    if listed:
        # A header the client names in Connection is dropped; the ingress
        # then sets its own rather than forwarding none.
        if b"x-forwarded-proto" in listed:
            head.has_xfp = False
        if b"x-forwarded-host" in listed:
            head.has_xfh = False
    return head


def _serialize_head(request: RequestHead) -> bytes:
    """
    An accepted request head as canonical bytes for C{twisted.web}: its own
    parser only ever reads heads the framing layer accepted, written by the
    ingress (one Host: the absolute-form authority when there was one).
    """
    lines = [request.method, b" ", request.target, b" HTTP/", request.version, b"\r\n"]
    for name, value in request.headers:
        if _lower(name) != b"host":
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

    def __init__(self, core: IngressCore, site: Any) -> None:
        self.core = core
        self.site = site
        self.idle_timeout: float | None = core.config.idle_timeout_s or None
        self.header_timeout: float | None = core.config.header_timeout_s or None
        self.max_header_bytes: int = core.config.max_header_bytes
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
        self._core = factory.core
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
        self.client = "-"
        self.secure = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.client = getattr(peer, "host", None) or str(peer)
        self.secure = ISSLTransport.providedBy(transport)
        if ITCPTransport.providedBy(transport):
            # Writes go out as they are made (see _send); Nagle would hold
            # a second small segment behind a delayed ACK.
            transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            # Fewer, larger reads for uploads (also the write-buffer size
            # past which a slow client pauses the backend).
            transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        now = time.monotonic()
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
            self._idle_since = time.monotonic()
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
            self._head_since = time.monotonic()
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
        started = time.monotonic()
        head = fast_head(request)
        if head is None:
            self._hand_off(request)
            return
        target = head.target
        if target.startswith(HEALTH_PATH) and target[len(HEALTH_PATH) : len(HEALTH_PATH) + 1] in (
            b"",
            b"?",
        ):
            self._hand_off(request)
            return
        resolved = self._resolve(head)
        if resolved is None:
            self._hand_off(request)
            return
        route, record = resolved
        self._idle_since = None
        persistent = not head.close and not self._core.draining
        exchange = _Exchange(self, head, route, record, started, persistent)
        self._exchange = exchange
        # Until its EndOfMessage, the events are this request's body.
        self._in_body = True
        exchange.start()
        self._update_reading()

    def _refuse(self, refusal: FramingError) -> None:
        """Answer a request the framing policy refused, and close."""
        error = framing_error(refusal.status, refusal.reason)
        self._closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is not None:
            _send(transport, error_response(error, True, _http_date(time.time())))
            if self._paused:
                self._paused = False
                transport.resumeProducing()  # type: ignore[attr-defined]
            transport.loseConnection()
        self._core.access_log.request(
            b"-", "-", 0, error.status, len(error.body()), time.monotonic(), self.client
        )

    def _resolve(self, head: _Head) -> tuple[Route, SandboxRecord] | None:
        """Route, look up and authorise; None for anything not plainly OK."""
        core = self._core
        try:
            if core.proxy._uri_mode:
                route = routing.parse_uri_route(head.target)
            else:
                route = routing.parse_header_route(
                    head.ingress_to, head.legacy, head.host, head.target
                )
            record = core.registry.lookup(route.sandbox_id)
            route = route.for_sandbox(record.secure_access_token is not None, core.proxy.keep_prefix)
            check_access(
                record.secure_access_token,
                head.secure,
                core.proxy._keys,
                route.sandbox_id,
                route.port,
                route.signed,
                time.time(),
            )
        except IngressError:
            return None
        if not (record.ready and record.endpoint):
            return None
        return route, record

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
        if not persistent or self._core.draining:
            # Also when the response beat the upload: the rest of the
            # upload cannot be framed for another request.
            self._close()
            return
        self._idle_since = time.monotonic()
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
        delay = max(0.0, deadline - time.monotonic())
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self._core.reactor.callLater(delay, self._expired)
        elif timer.getTime() - self._core.reactor.seconds() > delay + 0.001:
            timer.reset(delay)

    def _expired(self) -> None:
        self._timer = None
        if self._closing or self._switched:
            return
        deadline = self._deadline()
        if deadline is None:
            return
        if time.monotonic() < deadline:
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
            self._idle_since = time.monotonic()


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
        self.core = channel._core
        self.head = head
        self.route = route
        self.record = record
        self.endpoint: str = record.endpoint  # type: ignore[assignment]
        self.started = started
        self.persistent = persistent
        #: Body bytes received before the upstream connection was ready.
        self.pending: list[bytes] = []
        self.upstream: _Upstream | None = None
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

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        core = self.core
        route = self.route
        core.renew.offer(
            route.sandbox_id,
            route.port,
            route.path.decode("latin-1") if core.proxy._uri_mode else "",
        )
        core.request_started()
        record = self.record
        key = (record.generation or record.name, self.endpoint, route.port)
        core.upstream.fast.acquire(key, self)

    def request_bytes(self) -> bytes:
        """The request head for the backend."""
        head = self.head
        route = self.route
        endpoint = self.endpoint
        listed = head.listed
        lines = [head.method, b" ", route.path, b" HTTP/1.1\r\n"]
        if head.length:
            lines.append(b"Content-Length: %d\r\n" % head.length)
        elif head.method in _EMPTY_BODY_CL:
            lines.append(b"Content-Length: 0\r\n")
        strip = _STRIP_REQUEST
        for name, low, value in head.headers:
            if low in strip or low in listed:
                continue
            lines += (name, b": ", value, b"\r\n")
        if self.core.proxy.preserve_host and head.host is not None:
            lines += (b"Host: ", head.host, b"\r\n")
        elif ":" in endpoint:
            lines.append(b"Host: [%s]:%d\r\n" % (endpoint.encode("ascii"), route.port))
        else:
            lines.append(b"Host: %s:%d\r\n" % (endpoint.encode("idna"), route.port))
        ip = self.channel.client.encode("ascii", "replace")
        if head.xff:
            lines += (b"X-Forwarded-For: ", b", ".join(head.xff), b", ", ip, b"\r\n")
        else:
            lines += (b"X-Forwarded-For: ", ip, b"\r\n")
        if not head.has_xfp:
            lines.append(
                b"X-Forwarded-Proto: https\r\n"
                if self.channel.secure
                else b"X-Forwarded-Proto: http\r\n"
            )
        if not head.has_xfh and head.host is not None:
            lines += (b"X-Forwarded-Host: ", head.host, b"\r\n")
        if route.prefix:
            lines += (b"X-Forwarded-Prefix: ", route.prefix, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def connecting(self, connector: Any) -> None:
        """The pool is dialling; C{connector} can cancel it."""
        self._connector = connector

    def attached(self, upstream: _Upstream, reused: bool) -> None:
        """An upstream connection is ours: send the request."""
        self._connector = None
        if self._done:
            upstream.release(False)
            return
        self.upstream = upstream
        self._reused = reused
        self.last = time.monotonic()
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
        self.last = time.monotonic()
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
        self.last = time.monotonic()
        self._responded = True
        code = response.status
        self._status = code
        channel = self.channel
        # Written by the ingress: a validated code and the backend's reason
        # phrase only when it holds no control byte (else the standard one).
        lines = [status_line(code, response.reason)]
        if not self.persistent:
            lines.append(b"Connection: close\r\n")
        prefix = self.route.location_prefix
        listed = response.listed
        strip = _STRIP_RESPONSE | listed if listed else _STRIP_RESPONSE
        dated = False
        names = _names
        for name, value in response.headers:
            low = names.get(name)
            if low is None:
                low = _lower(name)
            if low in strip:
                continue
            if low == b"date":
                dated = True
            elif prefix and low == b"location":
                value = rebase_location(value, prefix)
            lines += (name, b": ", value, b"\r\n")
        if not dated:
            lines += (b"Date: ", _http_date(time.time()), b"\r\n")
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
        self.last = time.monotonic()
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
                self.core.upstream.fast.connect(self._key(), self)
                return
            self._fail_before_head(failure)
            return
        # The backend stopped mid-response: end the client's connection
        # after what arrived, so it sees a response shorter than its
        # framing promised rather than a clean end.
        self._unregister()
        self.core.metrics.upstream_error("timeout" if self._timed_out else "reset")
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
        target = f"{self.endpoint}:{self.route.port}"
        self.core.metrics.upstream_error("invalid")
        self._send_error(UpstreamInvalidResponse(f"upstream {target} sent an invalid response: {why}"))

    def _key(self) -> tuple[str, str, int]:
        return (self.record.generation or self.record.name, self.endpoint, self.route.port)

    def _fail_before_head(self, failure: Failure | None, error: IngressError | None = None) -> None:
        target = f"{self.endpoint}:{self.route.port}"
        if error is not None:
            pass  # decided (and counted) by the caller
        elif self._timed_out or (failure is not None and failure.check(ierror.TimeoutError)):
            error = UpstreamTimeout(f"upstream {target} timed out")
            self.core.metrics.upstream_error("timeout")
        else:
            self.core.metrics.upstream_error("connect")
            assert failure is not None
            error = UpstreamUnreachable(f"upstream {target} unreachable: {_describe(failure)}")
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
            _send(transport, error_response(error, not self.persistent, _http_date(time.time())))
        if not self.upload_done:
            self.persistent = False
        self._finish(error.status)

    # -- client ---------------------------------------------------------------

    def client_lost(self) -> None:
        """The client went away: abandon the backend side."""
        if self._done:
            return
        self._done = True
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
            target=self.head.target,
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
        # The upstream connection went away; _Upstream.connectionLost says so.
        pass


class _ReadUpstream:
    """
    Registered on the client transport while a response body flows: a
    full send buffer toward the client pauses reading from the backend.
    """

    __slots__ = ("_upstream", "_paused")

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream: _Upstream | None = upstream
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


class _Upstream(Protocol):
    """
    One connection to a backend: writes requests, frames responses with
    the framing layer and feeds them to its current L{_Exchange}.  Pooled
    between exchanges; any byte it was not asked for (after a response, or
    while idle in the pool) closes it.
    """

    def __init__(
        self, pool: FastPool, key: tuple[str, str, int], dial: _UpstreamFactory | None = None
    ) -> None:
        self.pool = pool
        self.key = key
        self._dial = dial
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self._parser = response_parser()
        self._reusable = True
        self._responded = False
        self._connected = False

    def connectionMade(self) -> None:
        self._connected = True
        # A request head and a small body are separate writes; Nagle plus a
        # delayed ACK would hold the second for tens of milliseconds.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
            # Fewer, larger reads for big responses (also the write-buffer
            # size past which a slow backend pauses the client's upload).
            self.transport.bufferSize = READ_SIZE  # type: ignore[union-attr,attr-defined]
        dial, self._dial = self._dial, None
        exchange = dial.exchange if dial is not None else None
        if dial is not None:
            dial.exchange = None
        if exchange is not None:
            self.attach(exchange, False)
        elif self.transport is not None:
            # Its exchange was cancelled while dialling.
            self._connected = False
            self.transport.loseConnection()

    def attach(self, exchange: _Exchange, reused: bool) -> None:
        """Serve C{exchange} next."""
        self.exchange = exchange
        self._parser.expect(exchange.head.method)
        self._reusable = True
        self._responded = False
        exchange.attached(self, reused)

    def release(self, reusable: bool) -> None:
        """The exchange is over with this connection."""
        self.exchange = None
        if reusable and self._reusable and self.transport is not None and self._connected:
            self.pool.put(self)
        elif self.transport is not None:
            self._connected = False
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._connected = False
        self.pool.discard(self)
        exchange = self.exchange
        if exchange is None:
            return
        if self._responded and reason.check(ierror.ConnectionDone):
            # A clean close ends a read-until-close body; any other body
            # it cuts short is a lost connection, below.
            for event in self._parser.feed_eof():
                if type(event) is EndOfMessage:
                    self._reusable = False
                    self._end()
                    return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(reason, self._responded)

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: this connection cannot be trusted.
            self._reusable = False
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._events(self._parser.feed(data))

    def _events(self, events: list[Event]) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        for event in events:
            if type(event) is Data:
                exchange.response_data(event.data)
            elif type(event) is ResponseHead:
                if not event.keep_alive:
                    self._reusable = False
                self._responded = True
                exchange.response_head(event)
            elif type(event) is EndOfMessage:
                if not event.clean:
                    self._reusable = False
                self._end()
                return
            elif type(event) is FramingError:
                self._fail(event.reason)
                return
            if self.exchange is not exchange:
                return
        # The head is held until body bytes come; send it with this read.
        exchange.flush()

    def _fail(self, why: str) -> None:
        """The backend sent bytes the ingress does not relay: drop it."""
        self._reusable = False
        exchange, self.exchange = self.exchange, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if exchange is not None:
            exchange.upstream_invalid(why, self._responded)

    def _end(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_end(self._reusable)


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: FastPool, key: tuple[str, str, int], exchange: _Exchange) -> None:
        self.pool = pool
        self.key = key
        self.exchange: _Exchange | None = exchange

    def buildProtocol(self, addr: Any) -> _Upstream:
        return _Upstream(self.pool, self.key, self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connect_failed(reason)


class _TCPDial:
    """A pending C{connectTCP} with the interface the exchange cancels by."""

    __slots__ = ("connector", "factory")

    def __init__(self, connector: Any, factory: _UpstreamFactory) -> None:
        self.connector = connector
        self.factory = factory

    def cancel(self) -> None:
        self.factory.exchange = None
        try:
            self.connector.stopConnecting()
        except ierror.NotConnectingError:
            # Connected, not attached yet: the connection closes itself.
            pass


class _EndpointDial:
    """A pending endpoint connect (host names, IPv6)."""

    __slots__ = ("deferred", "factory")

    def __init__(self, deferred: Any, factory: _UpstreamFactory) -> None:
        self.deferred = deferred
        self.factory = factory

    def cancel(self) -> None:
        self.factory.exchange = None
        self.deferred.cancel()


class FastPool:
    """
    Idle backend connections by (sandbox generation, host, port).

    Pod addresses are recycled, so a connection is only reused for the
    same incarnation of the same sandbox; L{drop_generation} closes a
    changed or vanished sandbox's idle connections and keeps its busy ones
    out of the pool.
    """

    def __init__(self, reactor: Any, connect_timeout_s: float, dead: Any) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout_s
        #: Retired generations (shared with the C{twisted.web} pool).
        self._dead = dead
        self._idle: dict[tuple[str, str, int], list[_Upstream]] = {}
        self._keys_by_generation: dict[str, set[tuple[str, str, int]]] = {}
        self._families: dict[str, int] = {}
        self._sweeper: LoopingCall | None = None
        self._clock: Callable[[], float] = time.monotonic

    def acquire(self, key: tuple[str, str, int], exchange: _Exchange) -> None:
        """Attach an idle connection of C{key} to C{exchange}, or dial one."""
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn._connected:
                conn.attach(exchange, True)
                return
        self.connect(key, exchange)

    def connect(self, key: tuple[str, str, int], exchange: _Exchange) -> None:
        """Dial a new connection for C{exchange}."""
        _generation, host, port = key
        family = self._families.get(host)
        if family is None:
            try:
                family = ipaddress.ip_address(host).version
            except ValueError:
                family = 0
            if len(self._families) < 65536:
                self._families[host] = family
        factory = _UpstreamFactory(self, key, exchange)
        if family == 4:
            connector = self._reactor.connectTCP(host, port, factory, timeout=self._timeout)
            exchange.connecting(_TCPDial(connector, factory))
            return
        endpoint: Any
        if family == 6:
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        d = endpoint.connect(factory)
        exchange.connecting(_EndpointDial(d, factory))

        def failed(failure: Failure) -> None:
            live = factory.exchange
            factory.exchange = None
            if live is not None:
                live.connect_failed(failure)

        # Success needs nothing here: the protocol attaches itself.
        d.addErrback(failed)

    def put(self, conn: _Upstream) -> None:
        """Keep C{conn} for the next exchange of its key."""
        key = conn.key
        generation = key[0]
        conns = self._idle.setdefault(key, [])
        if generation in self._dead or len(conns) >= MAX_IDLE_PER_KEY:
            conn._connected = False
            if conn.transport is not None:
                conn.transport.loseConnection()
            return
        conn.idle_since = self._clock()
        conns.append(conn)
        self._keys_by_generation.setdefault(generation, set()).add(key)
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._reactor
            self._sweeper.start(POOLED_IDLE_S / 4, now=False)

    def discard(self, conn: _Upstream) -> None:
        """C{conn} closed: forget it if it was idle."""
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def _sweep(self) -> None:
        cutoff = self._clock() - POOLED_IDLE_S
        for key, conns in list(self._idle.items()):
            keep = []
            for conn in conns:
                if conn.idle_since < cutoff:
                    conn._connected = False
                    if conn.transport is not None:
                        conn.transport.loseConnection()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
                keys = self._keys_by_generation.get(key[0])
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._keys_by_generation[key[0]]
        if not self._idle and self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def drop_generation(self, generation: str) -> None:
        """Close the idle connections of C{generation}."""
        for key in self._keys_by_generation.pop(generation, ()):
            for conn in self._idle.pop(key, []):
                conn._connected = False
                if conn.transport is not None:
                    conn.transport.loseConnection()

    def idle_connection_count(self) -> int:
        """How many idle connections the pool holds."""
        return sum(len(c) for c in self._idle.values())

    def close(self) -> None:
        """Close every idle connection."""
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        idle, self._idle = self._idle, {}
        self._keys_by_generation.clear()
        for conns in idle.values():
            for conn in conns:
                conn._connected = False
                if conn.transport is not None:
                    conn.transport.loseConnection()
