"""
The ingress's C{Site}: a channel with a header timeout and a request class
that streams request bodies instead of buffering them.

Why: C{twisted.web} reads a whole request body (into memory, or a temporary
file past 100 kB) before C{render} runs.  A proxy must instead start the
upstream request as soon as the headers are in and pass body chunks through
as they arrive, pausing the client when the backend is slow.
L{IngressChannel} starts processing right after the headers
(L{IngressRequest.start_early}); body chunks then flow into a
L{StreamingBody}, which is the upstream request's C{IBodyProducer}.

These classes override undocumented C{HTTPChannel} hooks (C{_command},
C{_path}, C{_version}, C{allHeadersReceived}, C{allContentReceived}); see
U{https://github.com/twisted/twisted/blob/trunk/src/twisted/web/http.py}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request, Site
from zope.interface import implementer

# A body chunk buffered before the upstream connection exists is kept; the
# client is paused right away so at most one socket read sits here.

#: Bytes of a request body read and discarded after the response is
#: complete (an error the ingress answered at once, or a backend that
#: answered before the upload ended), so that the keep-alive connection
#: stays usable; with more left, the response says C{Connection: close}.
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024


@implementer(IBodyProducer)
class StreamingBody:
    """
    A request body flowing from the client connection to the upstream
    request, chunk by chunk.

    Ownership: reactor thread.  Pauses the client's transport while the
    upstream consumer is paused (or not attached yet) and resumes it when
    the consumer asks for more.  C{length} is the client's Content-Length,
    or C{UNKNOWN_LENGTH} for a chunked upload (the upstream request is then
    chunked too).
    """

    def __init__(self, length: int | None, client: IPushProducer) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._client = client
        self._consumer: IConsumer | None = None
        self._pending: list[bytes] = []
        self._upstream_paused = False
        self._client_paused = False
        self._done: Deferred[None] | None = None
        self._complete = False
        self._failure: Failure | None = None
        self._stopped = False
        #: Called with the size of each chunk passed on (idle-timer hook).
        self.on_progress: Any = None
        self.received = 0

    @property
    def complete(self) -> bool:
        """Whether the client has sent the whole body."""
        return self._complete

    @property
    def waiting_for_client(self) -> bool:
        """
        Whether the body is stalled on the client: incomplete, and the
        upstream request is ready for more (attached and not paused), so
        only the client can move it.
        """
        return (
            not self._complete
            and not self._stopped
            and self._failure is None
            and self._consumer is not None
            and not self._upstream_paused
        )

    # -- fed by the request --------------------------------------------------

    def feed(self, data: bytes) -> None:
        """A chunk of body arrived from the client."""
        self.received += len(data)
        if self._stopped:
            return
        if self._consumer is None:
            self._pending.append(data)
            self._update_client()
            return
        self._consumer.write(data)
        if self.on_progress is not None:
            self.on_progress()
        if self._client_paused:
            # Something else (the channel, after flushing a response write)
            # may have resumed the socket; keep it paused while we are.
            self._client.pauseProducing()

    def finish(self) -> None:
        """The client sent the last byte of the body."""
        self._complete = True
        if self._done is not None:
            d, self._done = self._done, None
            d.callback(None)

    def fail(self, reason: Failure) -> None:
        """The client went away before the body was complete."""
        self._failure = reason
        if self._done is not None:
            d, self._done = self._done, None
            d.errback(reason)

    # -- IBodyProducer -----------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        pending, self._pending = self._pending, []
        for chunk in pending:
            consumer.write(chunk)
        if self._failure is not None:
            return fail(self._failure)
        if self._complete:
            return succeed(None)
        self._done = Deferred()
        self._update_client()
        return self._done

    def pauseProducing(self) -> None:
        self._upstream_paused = True
        self._update_client()

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._update_client()

    def stopProducing(self) -> None:
        # The upstream request is gone (error or early response): discard
        # the rest of the body but keep reading it, so the connection can
        # still answer.
        self._stopped = True
        self._pending = []
        self._done = None
        self._update_client()

    def _update_client(self) -> None:
        # The client is paused exactly while the body has nowhere to go.
        want = not self._stopped and (self._consumer is None or self._upstream_paused)
        if want != self._client_paused:
            self._client_paused = want
            if want:
                self._client.pauseProducing()
            else:
                self._client.resumeProducing()


class IngressRequest(Request):
    """
    A request that starts processing as soon as its headers are complete
    when it carries a body, streaming the body through L{body}.

    A request without a body (the common case) takes Twisted's normal path.
    """

    #: The streaming body, for requests that have one.
    body: StreamingBody | None = None
    _early = False
    #: While the rest of the body is drained: the channel, and the count
    #: of body bytes past which the connection is closed instead.
    _drain_channel: IngressChannel | None = None
    _drain_until = 0

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)
            return
        # A body follows: keep an empty C{content} for code that reads it,
        # and stream the real bytes instead.
        super().gotLength(0)
        self.body = StreamingBody(length, self.channel.transport)  # type: ignore[arg-type]

    def start_early(self, command: bytes, path: bytes, version: bytes) -> None:
        """Process the request now; the body keeps arriving through L{body}."""
        self._early = True
        Request.requestReceived(self, command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            # After the response, feed only counts (the body is stopped).
            body.feed(data)
            channel = self._drain_channel
            if channel is not None and body.received > self._drain_until:
                # More than announced room: give up on keeping the connection.
                self._drain_channel = None
                channel.persistent = False
                channel.loseConnection()
        else:
            super().handleContentChunk(data)

    def _drainable(self) -> bool:
        """Whether the rest of the body may be read and discarded after the response."""
        body = self.body
        assert body is not None
        closing = self.responseHeaders.getRawHeaders(b"connection") or []
        if any(b"close" in value.lower() for value in closing):
            return False  # someone (a 408, say) already decided to close
        length = body.length
        return length is UNKNOWN_LENGTH or length - body.received <= DRAIN_LIMIT_BYTES

    def write(self, data: bytes) -> None:
        body = self.body
        if not self.startedWriting and body is not None and not body.complete:
            # The response starts before the upload is complete: say now
            # whether the connection survives it (RFC 9112 9.6), since the
            # head cannot be changed once written.
            if self.channel is not None and not self._drainable():
                self.setHeader(b"Connection", b"close")
                self.channel.persistent = False
        super().write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._early:
            # The whole body has now arrived.
            assert self.body is not None
            self.body.finish()
            return
        super().requestReceived(command, path, version)

    def _handleStar(self) -> None:
        # Twisted answers "OPTIONS *" itself (an empty 200 with its own
        # Server header, Request._handleStar in
        # https://github.com/twisted/twisted/blob/trunk/src/twisted/web/server.py);
        # an ingress routes it like any request: forwarded to the sandbox,
        # or the ingress's own error.
        site = self.site
        assert site is not None  # process() set it
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def finish(self) -> None:
        body = self.body
        channel = self.channel
        if body is not None and not body.complete and channel is not None and not self.finished:
            if not self.startedWriting:
                self.write(b"")  # decides (and announces) whether to close
            # The response is complete before the upload is: discard the
            # rest of the upload.  Then either the connection carries on once
            # it has all arrived (the channel holds the next request back
            # until then), or, past the drain limit, this is its last
            # response.  Closing at once would reset a client still sending,
            # which may lose the response it has not read yet.
            body.stopProducing()
            if channel.persistent and isinstance(channel, IngressChannel):
                self._drain_channel = channel
                self._drain_until = body.received + DRAIN_LIMIT_BYTES
                channel.drain_after(self)
            else:
                channel.persistent = False
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None and not self.body.complete:
            self.body.fail(reason)
        super().connectionLost(reason)


_CONNECTION_DONE = Failure(ConnectionDone())


class IngressChannel(HTTPChannel):
    """
    An C{HTTPChannel} that (1) hands requests with a body to the site as
    soon as their headers are in, and (2) drops a client that takes longer
    than C{header_timeout} to send a request's headers (slowloris), while
    idle keep-alive connections are governed by the site's idle timeout.
    """

    header_timeout: float | None = None
    #: Called when the last outstanding request is done (the fast path
    #: writes a refusal that was waiting for the responses before it).
    on_idle: Callable[[], None] | None = None
    _header_call: IDelayedCall | None = None
    _awaiting_headers = True
    #: A request answered before its body arrived, whose rest is being
    #: read and discarded; its requestDone waits for the end of the body.
    _draining: IngressRequest | None = None

    def drain_after(self, request: IngressRequest) -> None:
        """
        C{request} was answered before its body ended: keep reading (and
        discarding) the body, and only then take the next request, so the
        connection stays in step with the client.  The idle timeout runs
        meanwhile: a client that stops sending is dropped.
        """
        self._draining = request

    def dataReceived(self, data: bytes) -> None:
        if (
            self._awaiting_headers
            and self._header_call is None
            and self.header_timeout
        ):
            self._header_call = self.callLater(  # type: ignore[attr-defined]
                self.header_timeout, self._header_timed_out
            )
        super().dataReceived(data)

    def _header_timed_out(self) -> None:
        self._header_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_header_timer(self) -> None:
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        command, path, version = self._command, self._path, self._version
        super().allHeadersReceived()
        request = self.requests[-1]
        if isinstance(request, IngressRequest) and request.body is not None:
            if self.timeOut:
                # The proxy's exchange times the streamed upload and tells a
                # stalled client (408) from a stalled backend, so suspend the
                # channel's own idle timer as HTTPChannel.allContentReceived
                # does once a body is in; requestDone restores it.
                self._savedTimeOut = self.setTimeout(None)
            request.start_early(command, path, version)

    def allContentReceived(self) -> None:
        if not self.requests:
            # The response finished (and the connection is closing) before
            # the upload did: nothing left to hand the end of body to.
            self.length = 0
            self._transferDecoder = None
            return
        draining, self._draining = self._draining, None
        super().allContentReceived()
        if draining is not None:
            # The drained body is complete: now the request is done, and the
            # connection reads the next one (HTTPChannel.requestDone).
            draining._drain_channel = None
            self._awaiting_headers = True
            super().requestDone(draining)

    def requestDone(self, request: Request) -> None:
        if request is self._draining:
            # Not yet: the rest of its body is still to be read.  Restore the
            # idle timer that the streamed body suspended.
            saved: float | None = getattr(self, "_savedTimeOut", None)
            if saved:
                self.setTimeout(saved)
            return
        self._awaiting_headers = True
        super().requestDone(request)
        if not self.requests and self.on_idle is not None:
            self.on_idle()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)


class IngressSite(Site):
    """
    The proxy port's C{Site}: L{IngressChannel}s and L{IngressRequest}s, no
    C{Server} header of our own, no session machinery, no per-request
    access log of Twisted's (the proxy writes its own).
    """

    protocol = IngressChannel  # type: ignore[assignment]
    requestFactory = IngressRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: Any,
        idle_timeout: float | None,
        header_timeout: float | None,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout or None, reactor=reactor)
        self._header_timeout = header_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self._header_timeout
        return channel

    def log(self, request: Request) -> None:  # type: ignore[override]
        # The proxy writes its own access line with the sandbox and port.
        pass
