"""
One request relayed to a backend and its response relayed back, for the
proxy server protocol (L{opensandbox_ingress.web.server}): the request
head written with the forwarding rules, bodies streamed both ways with
backpressure, the response head filtered and re-framed as bytes on the
server's own connection.  The backend side (pool, retry, failure classes,
idle blame) is L{opensandbox_ingress.web.exchange.BackendExchange}'s.

Ownership: reactor thread only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import ClientTimeout, IngressError, UpstreamUnreachable
from ..framing import (
    ResponseHead,
    status_line,
)
from .exchange import BackendExchange, ReadUpstream
from .forwarding import (
    POWERED_BY,
    backend_authority,
    error_response,
    forward_request_fields,
    request_head,
    response_fields,
)
from .pool import BackendConnection
from .wire import http_date, send

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..routing import Route
    from .heads import PlainHead
    from .server import ProxyServerChannel

_NO_BODY = frozenset({204, 304})

_log = Logger(namespace="opensandbox_ingress.web.exchange")


class Exchange(BackendExchange):
    """
    One request of the proxy listener relayed to a backend and its
    response relayed back (timeouts and failures: L{BackendExchange}).
    """

    __slots__ = (
        "channel",
        "persistent",
        "pending",
        "upload_done",
        "_upload_paused",
        "_chunked",
        "_sent",
        "_status",
        "last",
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
        BackendExchange.__init__(
            self, channel.core, channel.pool, channel.decider, head, route, record, started
        )
        self.channel = channel
        self.persistent = persistent
        #: Body bytes received before the upstream connection was ready.
        self.pending: list[bytes] = []
        self.upload_done = head.length == 0
        self._upload_paused = False
        self._chunked = False
        self._sent = 0
        self._status = 0
        #: When a byte last moved either way (for the idle timeout).
        self.last = started
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

    def request_bytes(self) -> bytes:
        """The request head for the backend."""
        head = self.head
        route = self.route
        channel = self.channel
        return request_head(
            head.method,
            route.path,
            head.length,
            forward_request_fields(
                head.headers,
                head.listed,
                head.host,
                channel.client_bytes,
                channel.secure,
                backend_authority(self.endpoint, route.port),
                route.prefix,
                channel.options,
            ),
        )

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
            self._producer = ReadUpstream(upstream)
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

    def _send_error(self, error: IngressError) -> None:
        """Answer C{error} (rendered by the one renderer) and end the exchange."""
        if isinstance(error, ClientTimeout):
            # The rest of the body will not come: the connection's last
            # response, and RFC 9110 (15.5.9) asks to say so.
            self.persistent = False
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
        hold, self._hold = self._hold, None
        self.abandon()
        if hold is not None:
            hold.cancel()  # after abandon: its errback sees the exchange done

    def idle_expired(self) -> None:
        """Nothing moved for C{--idle-timeout} seconds (the channel's timer)."""
        if self._hold is not None and not self._done:
            # A held request is bounded by --ready-wait, not by the idle
            # timeout (as on twisted.web, where it holds before forwarding).
            self.last = self.channel.now()
            self.channel.arm()
            return
        BackendExchange.idle_expired(self)

    # -- what BackendExchange asks of the client side ------------------------

    def _has_body(self) -> bool:
        return self.head.length != 0

    def _upload_waits_on_client(self) -> bool:
        return not self.upload_done and self.upstream is not None and not self._upload_paused

    def _response_status(self) -> int:
        return self._status

    def _cut_short(self, status: int, abort: bool) -> None:
        # Not persistent: the channel closes after what was written.
        self.persistent = False
        if abort:
            self.channel.abort()
        self._finish(status)

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
        # (_log inlined: this runs once per request.)
        head, channel = self.head, self.channel
        channel.log_request(
            head, self.route, status, 0 if head.method == b"HEAD" else self._sent, self.started
        )
        channel.exchange_done(self.persistent)

    def _log(self, status: int) -> None:
        # The channel's one access-log exit; the line counts the body bytes
        # the client got, none for HEAD.
        head = self.head
        self.channel.log_request(
            head, self.route, status, 0 if head.method == b"HEAD" else self._sent, self.started
        )


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
