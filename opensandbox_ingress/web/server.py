"""
The proxy listener's server protocol (the default front-end): a lean
HTTP/1.1 server for the requests that make up nearly all traffic, in front
of C{twisted.web}.

Why: C{twisted.web}'s server (C{HTTPChannel}, C{Request}, C{Headers}) and
client (C{Agent}, C{HTTP11ClientProtocol}, Deferred chains) cost about
300 microseconds of CPU per proxied request, several times what the bytes
need.  L{ProxyServerChannel} frames each request with the framing layer,
asks the L{Decider} what to do with it and either answers itself (health
check, the decision's errors, a hold until the sandbox is ready) or relays
it through an L{Exchange} over a pooled backend connection, with nothing
but byte strings in between.

What it hands to C{twisted.web} (L{ProxyServerChannel._hand_off}): WebSocket
upgrades, HTTP/1.0, chunked uploads and C{Expect}.  From then on it still
frames every request and feeds C{twisted.web} canonical bytes written from
the accepted events, so C{twisted.web}'s parser never reads what a client
sent.

Also here: keep-alive idle and header timeouts (one timer per connection,
on the reactor's clock), pipelining (bounded), flow control of the
client's reads, drain.

Ownership: reactor thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ..errors import (
    IngressError,
    RegistryNotSynced,
    ShuttingDown,
    framing_error,
)
from ..framing import (
    Data,
    EndOfMessage,
    Event,
    FramingError,
    RequestHead,
    Switched,
    request_parser,
)
from .decision import HEALTH_PATH, Decider, is_health
from .forwarding import (
    DEFAULT_OPTIONS,
    ForwardOptions,
    error_response,
    health_response,
)
from .heads import PlainHead, canonical_head, plain_head
from .pool import READ_SIZE, BackendPool
from .server_exchange import Exchange
from .site import DRAIN_LIMIT_BYTES
from .wire import http_date, send

if TYPE_CHECKING:
    from ..routing import Route
    from ..service import IngressCore

#: Pipelined bytes buffered while a response is in flight before the client
#: is paused.
PIPELINE_LIMIT = 65536

_CONNECTION_DONE = Failure(ierror.ConnectionDone())


class ProxyServerFactory(Factory):
    """
    The proxy listeners' factory: L{ProxyServerChannel}s, each able to hand its
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
        self.channels: set[ProxyServerChannel] = set()
        self._gone: list[Deferred[None]] = []

    def channel_gone(self, channel: ProxyServerChannel) -> None:
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

    def buildProtocol(self, addr: Any) -> ProxyServerChannel:
        channel = ProxyServerChannel(self, addr)
        self.channels.add(channel)
        return channel



class ProxyServerChannel(Protocol):
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

    def __init__(self, factory: ProxyServerFactory, addr: Any) -> None:
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
        self._exchange: Exchange | None = None
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
            # Writes go out as they are made (see send); Nagle would hold
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
        head = plain_head(request)
        if head is None:
            self._hand_off(request)
            return
        target = head.target
        # (The prefix test first: the call is for the rare health check.)
        if target.startswith(HEALTH_PATH) and is_health(target):
            self._health(head)
            return
        decider = self.decider
        route = None
        try:
            route = decider.route(target, head.ingress_to, head.legacy, head.host)
            route, record = decider.admit(route, head.secure)
            if not (record.ready and record.endpoint) and not decider.ready_wait_s:
                record.require_ready()
        except IngressError as e:
            self._answer(head, e, started, route)
            return
        self._idle_since = None
        persistent = not head.close and not self.core.draining
        exchange = Exchange(self, head, route, record, started, persistent)
        self._exchange = exchange
        # Until its EndOfMessage, the events are this request's body.
        self._in_body = True
        exchange.start()
        self._update_reading()

    def _closes_after_answer(self, head: PlainHead) -> bool:
        """
        Whether an answer given before the request's body arrived ends the
        connection: the client asked, the ingress drains, or more body is
        left than is worth reading and discarding (C{DRAIN_LIMIT_BYTES}).
        """
        return head.close or self.core.draining or head.length > DRAIN_LIMIT_BYTES

    def _answer(self, head: PlainHead, error: IngressError, started: float, route: Route | None) -> None:
        """
        Answer C{error} for a request no backend sees.  A body still to
        come is framed and dropped (no exchange takes it), so the
        keep-alive connection goes on.
        """
        close = self._closes_after_answer(head)
        head_only = head.method == b"HEAD"
        self._write_answer(error_response(error, close, http_date(self.now()), head_only), close)
        # The line counts the body bytes sent: none for HEAD.
        self.log_request(head, route, error.status, 0 if head_only else len(error.body()), started)

    def log_request(
        self,
        head: PlainHead | None,
        route: Route | None,
        status: int,
        nbytes: int,
        started: float,
    ) -> None:
        """
        The access line (and request metrics) of one request this
        connection served itself: forwarded by its L{Exchange}, answered by
        the ingress (C{route} C{None} when it was not routed), or refused
        by the framing policy before it had a usable head (C{head} C{None}:
        the line shows method and path C{-}).
        """
        if head is None:
            self.core.access_log.request(b"-", "-", 0, status, nbytes, started, self.client)
            return
        self.core.access_log.request(
            head.method,
            route.sandbox_id if route is not None else "-",
            route.port if route is not None else 0,
            status,
            nbytes,
            started,
            self.client,
            target=head.target,
        )

    def _health(self, head: PlainHead) -> None:
        """C{/status.ok}: 200 once the registry is synced, 503 while not or draining."""
        core = self.core
        close = self._closes_after_answer(head)
        date = http_date(self.now())
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
        send(transport, data)
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
            send(transport, error_response(error, True, http_date(self.now())))
            if self._paused:
                self._paused = False
                transport.resumeProducing()  # type: ignore[attr-defined]
            transport.loseConnection()
        self.log_request(None, None, error.status, len(error.body()), self.now())

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
            delegate.dataReceived(canonical_head(event))
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
