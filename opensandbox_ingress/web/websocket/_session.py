"""
One relayed WebSocket session, from the backend dial to the access-log line,
and the take-over of the client's connection from C{twisted.web}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from ...errors import (
    IngressError,
    ShuttingDown,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    WebSocketUpstreamRefused,
    WebSocketUpstreamUnreachable,
)
from ...framing import FramingError, parse_upgrade_response
from ..decision import Resolution
from ..errors import render_error
from ..forwarding import POWERED_BY, describe_failure, upstream_failure
from ..resource_exchange import client_ip, local_uri, request_fields
from ._client_hop import ClientHop
from ._handshake import (
    REFUSAL_HEADERS,
    backend_header_lines,
    extension_names,
    returned_headers,
    subprotocol_offers,
)
from ._hop import BackendFactory, BackendHop, HeaderLines, Hop, Throttle

if TYPE_CHECKING:
    from ._relay import WebSocketRelay

#: Access-log status of a session whose client left before the upgrade.
CLIENT_GONE_STATUS = 499


def _resource(path: bytes) -> str:
    # The request target as Autobahn will write it (as C{_handshake._text} does); bytes
    # that are not UTF-8 are percent-encoded so the target stays one line
    # of the same meaning.
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in path)


# -- sessions -----------------------------------------------------------------------

_DIALING, _ACCEPTING, _OPEN, _FINISHED = "dialing", "accepting", "open", "finished"


class Session:
    """
    One relayed WebSocket session, from the backend dial to the access-log
    line.  Reactor thread only.

    States: C{dialing} (the client's request is still an ordinary HTTP
    request; every failure is rendered as an HTTP response), C{accepting}
    (the backend said 101 and the client's socket now belongs to Autobahn),
    C{open} (frames flow, backpressure is wired), C{finished}.  From start
    to finish it counts as one in-flight request on the core, so a drain
    waits for it.
    """

    def __init__(
        self, relay: WebSocketRelay, request: Request, resolution: Resolution, started: float
    ) -> None:
        self.relay = relay
        self.request: Request | None = request
        route = resolution.route
        #: The sandbox as it was when the session was routed.
        self.record = resolution.record
        self.sandbox_id = route.sandbox_id
        self.port = route.port
        self.endpoint = resolution.endpoint
        self.path = route.path
        self.request_uri = relay.request_uri(route)
        #: The client's request target, for the access line.
        self.target = local_uri(request)
        self.started = started
        self.client_ip = client_ip(request)
        self.state = _DIALING
        self.client: ClientHop | None = None
        self.backend: BackendHop | None = None
        self.client_closed = False
        self.backend_closed = False
        self.subprotocol: str | None = None
        self.response_headers: dict[str, list[str]] = {}
        self._offers = subprotocol_offers(request.requestHeaders)
        options = relay.forward_options
        self._lines = backend_header_lines(
            request_fields(request, resolution.endpoint, route, options)
        )
        #: The client's Host for the backend handshake (C{--preserve-host}).
        client_host = (
            request.requestHeaders.getRawHeaders(b"host") if options.preserve_host else None
        )
        self.host_header: bytes | None = client_host[0] if client_host else None
        self._connecting: Deferred[Any] | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.frames_up = 0
        self.frames_down = 0
        self.close_code: int | None = None
        self.closed_by = "-"
        self.throttles: tuple[Throttle, Throttle] | None = None

    # -- dialing -------------------------------------------------------------------

    def start(self) -> None:
        """Dial the backend."""
        relay = self.relay
        assert self.request is not None
        self.request.notifyFinish().addErrback(self._client_gone)
        factory = BackendFactory(self, self._offers, relay.reactor)
        factory.setProtocolOptions(**relay.client_options)
        d = relay.endpoint_for(self.endpoint, self.port).connect(factory)
        if self.state == _DIALING and self._connecting is None and not d.called:
            self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def backend_request(self) -> ConnectingRequest:
        """What the backend handshake carries (Autobahn's C{onConnecting})."""
        host = f"[{self.endpoint}]" if ":" in self.endpoint else self.endpoint
        return ConnectingRequest(
            host=host,
            port=self.port,
            resource=_resource(self.path),
            headers=HeaderLines(self._lines),
            useragent=None,
            origin=None,
            protocols=self._offers,
        )

    def _target(self) -> str:
        host = f"[{self.endpoint}]" if ":" in self.endpoint else self.endpoint
        return f"ws://{host}:{self.port}"

    def _connected(self, hop: BackendHop) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state != _DIALING:
            return
        # Counted as the HTTP path counts it (connect or timeout); the answer
        # stays the WebSocket one (503, as upstream does).
        _, label = upstream_failure(self._target(), failure, False)
        self.relay.core.metrics.upstream_error(label)
        self.refuse(
            WebSocketUpstreamUnreachable(
                f"upstream {self._target()} unreachable: {describe_failure(failure)}"
            )
        )

    def _client_gone(self, failure: Failure) -> None:
        # The client left before the upgrade.  (A taken-over request never
        # finishes, so this cannot fire later.)
        if self.state == _DIALING:
            self._end_before_upgrade(CLIENT_GONE_STATUS, 0)

    def refuse(self, error: IngressError) -> None:
        """Answer the still-HTTP client with C{error}; end the session."""
        request = self.request
        if request is not None:
            render_error(request, error)
        self._end_before_upgrade(error.status, len(error.body()))

    def _end_before_upgrade(self, status: int, nbytes: int) -> None:
        self.state = _FINISHED
        self.request = None
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        backend = self.backend
        if backend is not None and backend.state != backend.STATE_CLOSED:
            backend.dropConnection(abort=True)
        self._end((status, nbytes))

    def _backend_failed(self, hop: BackendHop) -> None:
        """The backend hop closed before its handshake completed."""
        head = getattr(hop, "http_response_data", None)
        error: IngressError
        #: The upstream_errors_total reason, or None for a backend that
        #: answered with a refusal (its own status, not a failure).
        label: str | None = "invalid"
        if head is not None:
            parsed = parse_upgrade_response(head)
            if isinstance(parsed, FramingError):
                error = UpstreamInvalidResponse(
                    f"upstream {self._target()} sent an invalid handshake response: "
                    f"{parsed.reason}"
                )
            elif parsed.status != 101:
                kept = tuple(
                    (name, value)
                    for name, value in parsed.headers
                    if name.lower() in REFUSAL_HEADERS
                )
                reason = parsed.reason.decode("latin-1")
                label = None
                error = WebSocketUpstreamRefused(
                    f"upstream {self._target()} refused the WebSocket handshake: "
                    f"{parsed.status} {reason}".rstrip(),
                    parsed.status,
                    kept,
                )
            else:
                error = WebSocketUpstreamRefused(
                    f"upstream {self._target()} sent an invalid WebSocket handshake: "
                    f"{hop.wasNotCleanReason}",
                    502,
                )
        elif getattr(hop, "wasOpenHandshakeTimeout", False):
            label = "timeout"
            error = UpstreamTimeout(f"upstream {self._target()} did not answer the upgrade")
        else:
            label = "reset"
            error = WebSocketUpstreamUnreachable(
                f"upstream {self._target()} closed the connection during the handshake"
            )
        if label is not None:
            self.relay.core.metrics.upstream_error(label)
        self.refuse(error)

    # -- accepting -------------------------------------------------------------------

    def backend_open(self, hop: BackendHop) -> None:
        """The backend said 101: take over the client's connection."""
        request = self.request
        if self.state != _DIALING or request is None or request.channel is None:
            hop.dropConnection(abort=True)
            return
        parsed = parse_upgrade_response(hop.http_response_data)
        if isinstance(parsed, FramingError):
            hop.dropConnection(abort=True)
            self.refuse(
                UpstreamInvalidResponse(
                    f"upstream {self._target()} sent an invalid handshake response: "
                    f"{parsed.reason}"
                )
            )
            return
        self.subprotocol = hop.websocket_protocol_in_use
        self.response_headers = returned_headers(parsed.headers)
        name, values = POWERED_BY
        self.response_headers[name.decode("ascii")] = [v.decode("ascii") for v in values]
        self.state = _ACCEPTING
        self.request = None
        client = cast(ClientHop, self.relay.server_factory.buildProtocol(None))
        client.session = self
        self.client = client
        take_over(request, client)

    def client_open(self) -> None:
        """The client has its 101: join the hops and wire backpressure."""
        client, backend = self.client, self.backend
        assert client is not None and backend is not None
        if backend.state != backend.STATE_OPEN:
            # The backend went away while the client was being accepted.
            client.dropConnection(abort=False)
            return
        self.state = _OPEN
        client.partner = backend
        backend.partner = client
        # A full client send buffer pauses reading from the backend, and
        # the other way round (twisted/protocols/portforward.py).
        client_transport: Any = client.transport
        backend_transport: Any = backend.transport
        down = Throttle(backend_transport)
        up = Throttle(client_transport, client.resume_reading)
        client_transport.registerProducer(down, True)
        backend_transport.registerProducer(up, True)
        client.write_throttle = down
        backend.write_throttle = up
        self.throttles = (down, up)

    # -- relaying ---------------------------------------------------------------------

    def frame_relayed(self, upstream_bound: bool) -> None:
        """A frame starts passing; offer a (throttled) renew intent."""
        if upstream_bound:
            self.frames_up += 1
        else:
            self.frames_down += 1
        self.relay.offer_renew(self)

    def count(self, upstream_bound: bool, n: int) -> None:
        if upstream_bound:
            self.bytes_up += n
        else:
            self.bytes_down += n

    def _other(self, hop: Hop) -> Any:
        return self.backend if hop is self.client else self.client

    def close_received(self, hop: Hop, code: int | None, reason: bytes | None) -> None:
        """C{hop}'s peer started a close: send the same close to the other peer."""
        if self.closed_by == "-":
            self.close_code = 1005 if code is None else code
            self.closed_by = "client" if hop is self.client else "backend"
        other = self._other(hop)
        if other is not None:
            other.send_close(code, reason or None)

    def close(self, code: int, reason: str, refusal: IngressError | None = None) -> None:
        """
        Close the session from the ingress side: open hops get a close
        frame with C{code} and C{reason}; a session still dialing answers
        the client C{refusal} (default: shutting down, for a drain).
        """
        if self.state == _DIALING:
            self.refuse(refusal or ShuttingDown("ingress is shutting down"))
            return
        if self.state == _FINISHED:
            return
        if self.closed_by == "-":
            self.close_code = code
            self.closed_by = "ingress"
        for hop in (self.client, self.backend):
            if hop is not None and hop.state == hop.STATE_OPEN:
                hop.send_close(code, reason.encode("utf-8"))
            elif hop is not None and hop.state == hop.STATE_CONNECTING:
                hop.dropConnection(abort=True)

    def peer_failed(self, hop: Hop, code: int) -> None:
        """C{hop}'s peer violated the protocol: it will be failed with C{code}."""
        if self.closed_by == "-":
            self.close_code = code
            self.closed_by = "client" if hop is self.client else "backend"

    def fail_grace_over(self, hop: Hop) -> None:
        """The other peer did not close in time after C{hop}'s peer failed."""
        other = self._other(hop)
        hop.finish_failing()
        if other is not None and other.state != other.STATE_CLOSED:
            other.dropConnection(abort=True)

    def hop_closed(self, hop: Hop, was_clean: bool) -> None:
        """One hop's connection is gone."""
        if self.state == _FINISHED:
            return
        if hop is self.backend and self.state == _DIALING:
            self._backend_failed(hop)  # type: ignore[arg-type]
            return
        if hop is self.client:
            self.client_closed = True
        else:
            self.backend_closed = True
        if self.closed_by == "-":
            self.closed_by = "client" if hop is self.client else "backend"
            self.close_code = 1006
        other = self._other(hop)
        if other is not None and other.failing is not None:
            # The other peer has closed after a violation on this side's
            # partner: now the violating peer gets its close.
            other.finish_failing()
        elif other is not None and other.state in (other.STATE_OPEN, other.STATE_CONNECTING):
            # The far peer is gone without a close having passed (or with
            # one still waiting for a frame that can no longer end): end
            # this side the same way; its peer sees 1006, as it would
            # without the ingress.
            other.dropConnection(abort=False)
        if other is not None and other.transport is not None:
            # The gone hop's transport will never ask to resume the other
            # one, which must read its peer's close reply.
            other.transport.resumeProducing()
            other.resume_reading()
        if self.client_closed and self.backend_closed:
            self._finish()

    def _finish(self) -> None:
        self.state = _FINISHED
        for hop in (self.client, self.backend):
            if hop is not None:
                hop.partner = None
        self._end(None)

    def _end(self, answered: tuple[int, int] | None) -> None:
        """
        Leave the relay and write the session's one access line.
        C{answered} is the (status, body bytes) of the HTTP answer a session
        ended before its upgrade got; C{None} for a session after its 101,
        whose line tells what each hop negotiated and what crossed it.
        """
        relay = self.relay
        relay.sessions.discard(self)
        relay.core.request_finished()
        access_log = relay.core.access_log
        if answered is not None:
            status, nbytes = answered
            access_log.request(
                b"GET",
                self.sandbox_id,
                self.port,
                status,
                nbytes,
                self.started,
                self.client_ip,
                kind="ws",
                target=self.target,
            )
            return
        access_log.session(
            self.sandbox_id,
            self.port,
            self.started,
            self.client_ip,
            self.target,
            subprotocol=self.subprotocol,
            extensions=extension_names(self.client),
            upstream_extensions=extension_names(self.backend),
            bytes_in=self.bytes_up,
            bytes_out=self.bytes_down,
            frames_in=self.frames_up,
            frames_out=self.frames_down,
            close_code=self.close_code,
            closed_by=self.closed_by,
        )


def take_over(request: Request, protocol: ClientHop) -> None:
    """
    Hand the client's connection from C{twisted.web} to C{protocol} and
    replay the handshake into it.

    This is what C{twisted.web}'s own WebSocket support does
    (C{HTTPChannel._protocolUpgradeForWebsockets},
    U{https://github.com/twisted/twisted/blob/trunk/src/twisted/web/http.py}):
    the channel stays the transport's protocol but forwards C{dataReceived}
    and C{connectionLost}, which works under TLS and any wrapping transport.
    Autobahn's C{WebSocketResource.render} likewise replays the request head
    into the protocol; here it is a minimal head with just what Autobahn's
    server handshake checks (the client's headers were forwarded already).
    """
    channel: Any = request.channel
    transport = channel.transport
    headers = request.requestHeaders
    host = (headers.getRawHeaders(b"host") or [b"localhost"])[0]
    head = [
        b"GET / HTTP/1.1",
        b"Host: " + host,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + (headers.getRawHeaders(b"sec-websocket-key") or [b""])[0].strip(),
        b"Sec-WebSocket-Version: "
        + (headers.getRawHeaders(b"sec-websocket-version") or [b"13"])[0].strip(),
    ]
    offers = subprotocol_offers(headers)
    if offers:
        head.append(b"Sec-WebSocket-Protocol: " + ", ".join(offers).encode("latin-1"))
    extensions = headers.getRawHeaders(b"sec-websocket-extensions")
    if extensions and protocol.session.relay.compression:
        # Negotiated by the hop itself (ClientHop.onConnect), never with
        # the backend.
        head.append(b"Sec-WebSocket-Extensions: " + b", ".join(extensions))
    # Bytes the client sent after its handshake sit in the channel's buffer
    # (HTTPChannel._dataBuffer, filled while a request is being handled).
    buffered = b"".join(getattr(channel, "_dataBuffer", None) or [])
    channel._dataBuffer = []
    channel.dataReceived = protocol.dataReceived
    channel.connectionLost = protocol.connectionLost
    # The request is never finished; the channel must not keep it alive.
    del channel.requests[:]
    # The channel registered itself as the transport's producer; the relay's
    # throttle takes that place once both hops are open.
    transport.unregisterProducer()
    protocol.makeConnection(transport)
    transport.resumeProducing()
    protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + buffered)
