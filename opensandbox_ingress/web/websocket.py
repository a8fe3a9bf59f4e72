"""
The WebSocket relay: Autobahn on both hops, frames streamed, backpressured.

Per upgrade request (reactor thread only), after the proxy has routed,
resolved and authorised it (L{Proxy._dispatch} calls L{WebSocketRelay.handle};
nothing here routes or authorises again)::

    check the client's handshake                         pure, 400 if broken
    dial ws://{endpoint}:{port}{path}?{query}             Autobahn client
        forwarding Origin, every Cookie line, the subprotocol offers,
        end-to-end headers and the X-Forwarded-* family
    backend refuses  -> the client gets its status        (HTTP response)
    unreachable      -> 503 upstream_unreachable          (HTTP response)
    backend says 101 -> hand the client's socket to an Autobahn server
                        protocol that accepts with the backend's
                        subprotocol and Set-Cookie headers
    relay frames both ways until one side closes; relay the close

The backend is dialled while the client's request is still an ordinary
C{twisted.web} request, so every failure before the upgrade is rendered by
the one error renderer (L{render_error}).  Only on the backend's 101 is the
connection taken over (L{_take_over}).

Frames are relayed with Autobahn's frame-level API (C{onMessageFrameBegin}/
C{onMessageFrameData}); no message is ever assembled beyond
L{COLLECT_LIMIT}, so there is no size cap and memory per session is bounded.
A message its sender wrote as one frame of at most L{COLLECT_LIMIT} bytes is
collected and sent on as one frame.  Anything else is streamed as it arrives
(C{beginMessageFrame}/C{sendMessageFrameData}), and ends with an empty final
continuation frame (Autobahn's streaming API cannot set FIN on a
data-carrying frame); message boundaries and each fragment's payload are
kept, which is what RFC 6455 section 5.4 lets an intermediary change.  No
compression extension is negotiated on either hop, so frames pass without
being inflated.

Control frames go between data frames, never inside one: a frame relayed in
pieces holds back the pings and pongs Autobahn would write at once (and a
relayed close) until its last payload byte is written (L{_Hop._hold}).

Backpressure follows C{twisted/protocols/portforward.py}: each transport has
a L{_Throttle} registered as its producer that pauses the I{other} transport,
so a client that stops reading stops the ingress reading from the backend,
and the other way round.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectingRequest
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from ..errors import (
    IngressError,
    SandboxNotFound,
    ShuttingDown,
    UpstreamTimeout,
    WebSocketHandshakeInvalid,
    WebSocketUpstreamRefused,
    WebSocketUpstreamUnreachable,
)
from ..routing import loggable_path, loggable_text
from .errors import render_error
from .proxy import (
    HOP_BY_HOP,
    POWERED_BY,
    Resolution,
    client_ip,
    forward_request_headers,
    local_uri,
)

if TYPE_CHECKING:
    from ..registry import SandboxRecord
    from ..service import IngressCore

#: Seconds the backend gets to answer the upgrade once TCP is connected,
#: on top of the connect timeout; the client's open handshake is held for
#: the whole dial, so its bound is connect timeout + this margin.
HANDSHAKE_MARGIN_S = 5.0

#: Seconds a peer gets to answer a close frame that the relay sent.  Longer
#: than Autobahn's 1 s default: a slow reader must first drain the socket
#: buffers in front of the close frame, and the relay aborts the connection
#: (losing those bytes) when this expires.
CLOSE_HANDSHAKE_TIMEOUT_S = 10.0

#: Close code and reason sent to both peers when the ingress drains.
GOING_AWAY = 1001
#: Seconds the other peer has, once a peer violated the protocol, to answer
#: the relay's close (its frames until then are still delivered).
FAIL_GRACE_S = 5.0
#: A single-frame message up to this size is collected and relayed as one
#: frame; larger ones are streamed (bounds memory per session and direction).
COLLECT_LIMIT = 128 * 1024
#: WebSocket control frame opcodes (RFC 6455 section 11.8).
OPCODE_PING, OPCODE_PONG = 0x9, 0xA
DRAIN_REASON = "ingress shutting down"

#: Access-log status of a session whose client left before the upgrade.
CLIENT_GONE_STATUS = 499

#: Request headers the relay must not pass to the backend, besides those
#: L{forward_request_headers} already drops: Autobahn's client writes its own
#: handshake (C{Host}, key, version, subprotocol list, C{Pragma},
#: C{Cache-Control}), and no extension is negotiated end to end.
_NOT_FORWARDED = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"sec-websocket-accept",
        b"pragma",
        b"cache-control",
    }
)

#: Backend handshake-response headers the client must not see: hop-by-hop
#: ones and the handshake's own (the server hop writes fresh ones).
_NOT_RETURNED = HOP_BY_HOP | {
    b"content-length",
    b"sec-websocket-accept",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
    b"sec-websocket-version",
}

#: Headers of a refusing backend's response that still help the client.
_REFUSAL_HEADERS = (b"location", b"www-authenticate", b"retry-after")

#: The access log's namespace (see L{AccessLog}); a module-level logger,
#: because a C{Logger} class attribute would name the class instead.
_access_log = Logger(namespace="opensandbox_ingress.access")

#: Operational messages (sessions ended by a sandbox change).
_log = Logger(namespace="opensandbox_ingress.websocket")

_SUPPORTED_VERSIONS = (b"13", b"8")
_KEY_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


# -- pure helpers ------------------------------------------------------------------


def check_client_handshake(headers: Headers, clientproto: bytes) -> None:
    """
    Raise L{WebSocketHandshakeInvalid} unless C{headers} carry a handshake
    the server hop will accept (RFC 6455 section 4.2.1), so that a broken
    client never costs a backend connection.
    """
    if clientproto != b"HTTP/1.1":
        raise WebSocketHandshakeInvalid("WebSocket needs HTTP/1.1")
    versions = headers.getRawHeaders(b"sec-websocket-version") or []
    if len(versions) != 1 or versions[0].strip() not in _SUPPORTED_VERSIONS:
        raise WebSocketHandshakeInvalid(
            "unsupported Sec-WebSocket-Version", ((b"Sec-WebSocket-Version", b"13"),)
        )
    keys = headers.getRawHeaders(b"sec-websocket-key") or []
    key = keys[0].strip() if len(keys) == 1 else b""
    if len(key) != 24 or key[-2:] != b"==" or not set(key[:-2]) <= _KEY_CHARS:
        raise WebSocketHandshakeInvalid("missing or malformed Sec-WebSocket-Key")
    offers = subprotocol_offers(headers)
    if len(set(offers)) != len(offers):
        raise WebSocketHandshakeInvalid("duplicate Sec-WebSocket-Protocol offer")


def subprotocol_offers(headers: Headers) -> list[str]:
    """The client's subprotocol offers, in order, across all header lines."""
    return [
        token.strip().decode("latin-1")
        for value in headers.getRawHeaders(b"sec-websocket-protocol") or []
        for token in value.split(b",")
        if token.strip()
    ]


def backend_header_lines(forwarded: Headers) -> list[tuple[str, str]]:
    """
    The header lines for the backend handshake, one pair per line, from the
    output of L{forward_request_headers}: repeated headers (two C{Cookie}
    lines) stay separate lines, never comma-merged.
    """
    return [
        (name.decode("latin-1"), _text(value))
        for name, values in forwarded.getAllRawHeaders()
        if name.lower() not in _NOT_FORWARDED
        for value in values
    ]


def extension_names(hop: Any) -> str:
    """The WebSocket extensions C{hop} negotiated, by name (C{-}: none)."""
    in_use = getattr(hop, "websocket_extensions_in_use", None) or []
    return ",".join(ext.EXTENSION_NAME for ext in in_use) or "-"


def with_host_line(head: bytes, host: bytes) -> bytes:
    """C{head} (an HTTP request head) with its C{Host} line's value replaced by C{host}."""
    start = head.find(b"\r\nHost: ")
    if start == -1:
        return head
    start += len(b"\r\nHost: ")
    return head[:start] + host + head[head.index(b"\r\n", start) :]


def parse_response_head(head: bytes) -> tuple[int, str, list[tuple[bytes, bytes]]]:
    """
    Status code, reason and header lines (in order, repeated names kept) of
    an HTTP response head.  Autobahn parses the same bytes into a dict that
    comma-joins repeated headers, which breaks C{Set-Cookie}.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        status = 0
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip():
            headers.append((name.strip(), value.strip()))
    return status, reason, headers


def returned_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    """
    The backend's handshake-response headers the client's 101 carries
    (C{Set-Cookie} and other end-to-end headers), grouped by name for
    Autobahn's C{onConnect} return value, which writes one line per value.
    """
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    out: dict[str, list[str]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in _NOT_RETURNED or lowered in listed:
            continue
        out.setdefault(name.decode("latin-1"), []).append(_text(value))
    return out


def session_end_reason(
    session_record: SandboxRecord, new: SandboxRecord | None
) -> tuple[str, str] | None:
    """
    Why a session opened to C{session_record} must end now that the
    registry holds C{new} for that sandbox (None: it is gone), as (metric
    label, close reason), or None when it may go on.  Status updates
    (readiness, a new resourceVersion) leave sessions alone: the backend
    connection itself says when the pod goes.
    """
    name = session_record.name
    if new is None:
        return ("removed", f"sandbox {name} was removed")
    if new.incarnation != session_record.incarnation:
        return ("recreated", f"sandbox {name} was recreated")
    if new.endpoint != session_record.endpoint:
        return ("moved", f"sandbox {name} moved to another endpoint")
    if new.secure_access_token != session_record.secure_access_token:
        return ("token_changed", f"sandbox {name} changed its access token")
    return None


def _text(value: bytes) -> str:
    # Autobahn builds handshakes as str and encodes them as UTF-8: UTF-8
    # bytes survive the round trip exactly; anything else (obs-text) is
    # passed as Latin-1, the best that API allows.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _resource(path: bytes) -> str:
    # The request target as Autobahn will write it (see L{_text}); bytes
    # that are not UTF-8 are percent-encoded so the target stays one line
    # of the same meaning.
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in path)


def _describe(failure: Failure) -> str:
    if failure.check(ierror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(ierror.TimeoutError):
        return "connect timed out"
    if failure.check(ierror.DNSLookupError):
        return "name does not resolve"
    message = failure.getErrorMessage()
    return message.splitlines()[0] if message else type(failure.value).__name__


# -- backpressure ------------------------------------------------------------------


@implementer(IPushProducer)
class _Throttle:
    """
    Registered as the producer of one hop's transport; pauses and resumes
    reading on the other hop's transport.  C{stopProducing} does nothing:
    closing is the relay's business (close frames), not the transport's.
    """

    __slots__ = ("_source", "pauses", "paused")

    def __init__(self, source: Any) -> None:
        self._source = source
        self.pauses = 0
        #: True while the transport this is registered on has a full send
        #: buffer, that is while its peer is not reading.
        self.paused = False

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True
        self._source.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._source.resumeProducing()

    def stopProducing(self) -> None:
        pass


# -- the two hops --------------------------------------------------------------


class _Hop:
    """
    Frame relaying shared by both hops: every frame event of this hop is
    replayed on C{peer}.  Autobahn's per-message buffering (the base
    C{onMessageFrameData}/C{onMessageEnd}, which feed C{onMessage}) is
    never reached.
    """

    session: _Session
    #: The other hop; None until both are connected.
    partner: Any = None
    #: True for the client-facing hop.
    upstream_bound = False
    #: A close waiting for the frame being relayed to this peer to end.
    pending_close: tuple[int | None, bytes | None] | None = None
    #: Pings and pongs waiting for the frame being relayed to this peer to
    #: end, by opcode: at most one of each (the latest), so a peer that
    #: floods pings costs no memory (RFC 6455 section 5.5.3 lets a pong
    #: answer only the most recent ping).
    held_controls: dict[int, bytes | None] | None = None
    #: The throttle registered on this hop's transport: paused while this
    #: hop's peer does not read what is sent to it.
    write_throttle: _Throttle | None = None
    #: Payload bytes received from this hop's peer, and their count when
    #: the last keep-alive ping was written: a peer that is streaming a
    #: long frame cannot answer a ping until the frame ends, but it is
    #: alive.
    received = 0
    received_at_ping = 0
    _pong_deadline: Any = None  # IDelayedCall
    _linger: Any = None  # IDelayedCall
    #: The type of the message arriving from this hop's peer.
    message_binary = False
    #: Whether that message is being streamed to the partner (begun there).
    streaming = False
    #: The payload so far of a single-frame message of at most
    #: L{COLLECT_LIMIT} bytes, which goes on as one final frame.
    collecting: list[bytes] | None = None
    #: The length of a streamed frame whose header is not written to the
    #: partner yet.  It is written with the frame's first payload bytes,
    #: which Autobahn has validated (UTF-8) by then, so a frame refused at
    #: its first bytes leaves the partner between frames, free to send a
    #: close (see L{_fail_connection}).
    unwritten_frame: int | None = None
    #: (code, reason) once this hop's peer violated the protocol: nothing
    #: more is read from it, and it is failed with that code once the
    #: other peer has closed (L{_fail_connection}).
    failing: tuple[int, str] | None = None
    _fail_grace: Any = None  # IDelayedCall

    # A message that is one frame (FIN set on its first frame) of at most
    # COLLECT_LIMIT bytes is collected and sent on as one final frame, as
    # its sender sent it.  Anything else is streamed frame by frame as it
    # arrives (Autobahn's streaming API cannot set FIN on a data frame, so
    # such a message ends with an empty final frame); the sender's
    # fragmentation is kept.

    def onMessageBegin(self, isBinary: bool) -> None:
        self.message_binary = isBinary
        self.streaming = False

    def onMessageFrameBegin(self, length: int) -> None:
        self.session.frame_relayed(self.upstream_bound)
        if (
            not self.streaming
            and length <= COLLECT_LIMIT
            and self.current_frame.fin  # type: ignore[attr-defined]
        ):
            self.collecting = []
            return
        self.unwritten_frame = length

    def _write_frame_header(self) -> None:
        length, self.unwritten_frame = self.unwritten_frame, None
        peer = self.partner
        if peer is not None and length is not None:
            if not self.streaming:
                peer.beginMessage(self.message_binary)
            peer.beginMessageFrame(length)
        self.streaming = True

    def onMessageFrameData(self, payload: bytes) -> None:
        self.received += len(payload)
        self.session.count(self.upstream_bound, len(payload))
        collecting = self.collecting
        if collecting is not None:
            collecting.append(payload)
            return
        if self.unwritten_frame is not None:
            self._write_frame_header()
        peer = self.partner
        if peer is not None:
            peer.sendMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if self.unwritten_frame is not None:  # an empty frame
            self._write_frame_header()
        # The last frame of a message ends it in onMessageEnd; a close
        # waiting for this frame goes after that.
        if not self.current_frame.fin:  # type: ignore[attr-defined]
            self._flush_peer_close()

    def onMessageEnd(self) -> None:
        peer = self.partner
        collecting, self.collecting = self.collecting, None
        if peer is not None:
            if collecting is not None:
                peer.sendMessage(b"".join(collecting), self.message_binary)
            else:
                peer.endMessage()
            self._flush_peer_close()

    def _flush_peer_close(self) -> None:
        peer = self.partner
        if peer is not None and peer.pending_close is not None:
            # The frame this peer was being sent is complete: the close
            # that waited for it can go now.
            code, reason = peer.pending_close
            peer.pending_close = None
            peer.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)

    # -- control frames never inside a data frame -------------------------------
    #
    # A relayed data frame is written to this hop's peer in pieces, as its
    # payload arrives from the other hop.  Autobahn writes a ping (its
    # keep-alive timer) or a pong (its automatic answer in onPing) at once,
    # which would land inside that half-written frame and corrupt the
    # stream for the peer (RFC 6455 section 5.4: control frames may come
    # between the frames of a message, never inside one).  So while a frame
    # is half written they are held, and written as soon as it is complete.

    def frame_half_written(self) -> bool:
        """True while a data frame to this hop's peer has payload still to come."""
        return (
            self.send_state == self.SEND_STATE_INSIDE_MESSAGE_FRAME  # type: ignore[attr-defined]
            and self.send_message_frame_masker.pointer()  # type: ignore[attr-defined]
            < self.send_message_frame_length  # type: ignore[attr-defined]
        )

    def sendPing(self, payload: bytes | None = None) -> None:
        # Only Autobahn's keep-alive timer pings: each ping starts the
        # wait for its pong (L{_pong_overdue}).
        if self._pong_deadline is None and self.session.relay.pong_timeout:
            self.received_at_ping = self.received
            self._pong_deadline = self.session.relay.reactor.callLater(
                self.session.relay.pong_timeout, self._pong_overdue
            )
        if self.frame_half_written():
            self._hold(OPCODE_PING, payload)
            return
        super().sendPing(payload)  # type: ignore[misc]

    def sendPong(self, payload: bytes | None = None) -> None:
        if self.frame_half_written():
            self._hold(OPCODE_PONG, payload)
            return
        super().sendPong(payload)  # type: ignore[misc]

    def _hold(self, opcode: int, payload: bytes | None) -> None:
        held = self.held_controls
        if held is None:
            held = self.held_controls = {}
        held.pop(opcode, None)  # the latest goes last
        held[opcode] = payload

    def beginMessageFrame(self, length: int) -> None:
        super().beginMessageFrame(length)  # type: ignore[misc]
        if self.held_controls is not None and length == 0:
            self._release_held()

    def sendMessageFrameData(self, payload: bytes, sync: bool = False) -> Any:
        rest = super().sendMessageFrameData(payload, sync)  # type: ignore[misc]
        if self.held_controls is not None and not self.frame_half_written():
            self._release_held()
        return rest

    def _release_held(self) -> None:
        held, self.held_controls = self.held_controls, None
        for opcode, payload in (held or {}).items():
            if opcode == OPCODE_PING:
                self.sendPing(payload)
            else:
                self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        deadline, self._pong_deadline = self._pong_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _pong_overdue(self) -> None:
        # The keep-alive ping has had no pong for the pong timeout.  The
        # peer is not to blame, and the wait starts again, when
        # - the ping is still held behind a half-written frame and the
        #   peer is reading (the other hop is slow to send the rest), or
        # - the peer has been sending frame payload since the ping (it
        #   cannot answer inside its own frame).
        # A peer that stops reading while a ping waits is dropped.  (Not
        # Autobahn's autoPingTimeout: its timer rounds down to whole
        # seconds and cannot tell these cases apart.)
        self._pong_deadline = None
        held = self.held_controls is not None and OPCODE_PING in self.held_controls
        throttle = self.write_throttle
        reading = throttle is None or not throttle.paused
        if (held and reading) or (not held and self.received > self.received_at_ping):
            self.received_at_ping = self.received
            relay = self.session.relay
            self._pong_deadline = relay.reactor.callLater(relay.pong_timeout, self._pong_overdue)
            return
        # Autobahn's own handling of a missed pong: an unclean drop.
        super().onAutoPingTimeout()  # type: ignore[misc]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's sendData builds the arguments of a debug log line
        # (with terminal colouring) on every write, whether or not debug is
        # on: a large share of the relay's CPU for small messages.  This is
        # its plain path without that; queued and chopped writes (unused
        # here) still go through Autobahn's.
        if sync or chopsize or self.send_queue:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)  # type: ignore[attr-defined]
        state = self.state  # type: ignore[attr-defined]
        if state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.trafficStats.outgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]
        elif state == self.STATE_CONNECTING:  # type: ignore[attr-defined]
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # Autobahn validates the code and reason and answers the close
        # (echoing it: echoCloseCodeReason); then the same close goes on to
        # the other peer.  A close that answers one we sent is not relayed.
        state = self.state  # type: ignore[attr-defined]
        stop = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        if not stop and state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.session.close_received(self, code, reasonRaw)
        return stop  # type: ignore[no-any-return]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.session.hop_closed(self, wasClean)

    def send_close(self, code: int | None, reason: bytes | None) -> None:
        """
        Send a close frame to this hop's peer, now or, when a relayed frame
        is half written, as soon as that frame is complete (a control frame
        may come between the frames of a message, never inside one).

        C{sendCloseFrame}, not C{sendClose}: the latter refuses codes such
        as 1001 or 1011 that a relay must pass on.  No code (1005) goes on
        as a close frame without a code.
        """
        if self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            return
        partner = self.partner
        if (
            self.send_state == self.SEND_STATE_INSIDE_MESSAGE_FRAME  # type: ignore[attr-defined]
            or (partner is not None and partner.collecting is not None)
        ):
            # A frame half written, or a message being collected, for this
            # peer: the close follows it.
            self.pending_close = (code, reason)
        else:
            self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)  # type: ignore[attr-defined]

    # -- ordered failure ---------------------------------------------------------
    #
    # Autobahn fails a hop at once on a protocol violation (a reserved bit or
    # opcode, invalid UTF-8).  An endpoint would first have answered what
    # came before the violation; as a relay, that answer comes from the other
    # peer and may be on its way.  So the violating peer is not read any
    # more, the other peer is sent a close, its frames until its close
    # reply are still delivered, and then the violating peer gets its close
    # with the code Autobahn chose (1002, 1007).  FAIL_GRACE_S bounds the
    # wait.

    def _fail_connection(self, code: int = GOING_AWAY, reason: str = "going away") -> None:
        # Overrides Autobahn's private WebSocketProtocol._fail_connection,
        # the one place every violation path (_protocol_violation,
        # _invalid_payload, _max_message_size_exceeded) goes through.
        partner = self.partner
        if (
            self.failing is None
            and self.state == self.STATE_OPEN  # type: ignore[attr-defined]
            and partner is not None
            and partner.state == partner.STATE_OPEN
        ):
            self.failing = (code, reason)
            # A message being collected from this peer will never end.
            self.collecting = None
            self.unwritten_frame = None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.session.peer_failed(self, code)
            if partner.frame_half_written():
                # A frame from this peer is half written to the other one
                # and can never end, so no close can reach it: fail both.
                self.finish_failing()
                partner.dropConnection(abort=True)
                return
            self._fail_grace = self.session.relay.reactor.callLater(
                FAIL_GRACE_S, self.session.fail_grace_over, self
            )
            partner.send_close(GOING_AWAY, f"peer protocol error: {reason}"[:120].encode())
            return
        super()._fail_connection(code, reason)  # type: ignore[misc]

    def dataReceived(self, data: bytes) -> None:
        if self.failing is not None:
            return  # the violating peer is not read any more
        super().dataReceived(data)  # type: ignore[misc]

    def finish_failing(self) -> None:
        """Send the violating peer its close (the other hop is done) and drop it."""
        grace, self._fail_grace = self._fail_grace, None
        if grace is not None and grace.active():
            grace.cancel()
        if self.failing is None:
            return
        code, reason = self.failing
        if self.state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.failedByMe = True
            self.sendCloseFrame(  # type: ignore[attr-defined]
                code=code, reasonUtf8=reason.encode("utf-8")[:120], isReply=False
            )
        # Its close reply cannot be read past the bad frame: close the TCP
        # connection once the close frame is written.
        self.wasClean = False
        self.wasNotCleanReason = f"peer violated the protocol: {reason}"
        self.dropConnection(abort=False)

    def dropConnection(self, abort: bool = False) -> None:
        # A clean drop (loseConnection) waits for the send buffer to empty,
        # which a peer that stopped reading postpones forever: abort after
        # the close-handshake timeout.
        lingering = not abort and self.state != self.STATE_CLOSED  # type: ignore[attr-defined]
        super().dropConnection(abort)  # type: ignore[misc]
        transport = self.transport  # type: ignore[attr-defined]
        if lingering and transport is not None and self._linger is None:
            self._linger = self.session.relay.reactor.callLater(
                CLOSE_HANDSHAKE_TIMEOUT_S, transport.abortConnection
            )

    def connectionLost(self, reason: Failure) -> None:
        for name in ("_linger", "_pong_deadline", "_fail_grace"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        super().connectionLost(reason)  # type: ignore[misc]


class _ClientHop(_Hop, WebSocketServerProtocol):  # type: ignore[misc]
    """The server protocol facing the client, created at the take-over."""

    upstream_bound = True

    def onConnect(self, request: Any) -> Any:
        # Accept with what the backend chose (its 101 is already in).
        return self.session.subprotocol, self.session.response_headers

    def onOpen(self) -> None:
        self.session.client_open()


class _BackendHop(_Hop, WebSocketClientProtocol):  # type: ignore[misc]
    """The client protocol facing the backend."""

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn sets TCP_NODELAY before copying the factory's options, so
        # the backend hop kept Nagle on: a keystroke behind an unacked frame
        # waited ~40 ms for a delayed ACK.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        return self.session.backend_request()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn always writes "Host: {host}:{port}" (a client Host
        # without a port cannot be expressed), so --preserve-host swaps
        # that one line of the handshake it built.
        host = self.session.host_header
        if host is not None and data is getattr(self, "http_request_data", None):
            data = self.http_request_data = with_host_line(data, host)
        super().sendData(data, sync, chopsize)

    def onOpen(self) -> None:
        self.session.backend_open(self)


class _HeaderLines(dict):  # type: ignore[type-arg]
    """
    Header lines for Autobahn's client handshake, which writes one line per
    C{headers.items()} pair: a dict cannot hold two C{Cookie} lines, so this
    one yields its pairs as given, repeated names included.
    """

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        super().__init__()
        self._lines = lines

    def items(self) -> Any:
        return list(self._lines)


class _BackendFactory(WebSocketClientFactory):  # type: ignore[misc]
    """
    One per session: Autobahn checks the backend's chosen subprotocol
    against C{factory.protocols}, which are this client's offers.
    """

    protocol = _BackendHop
    noisy = False

    def __init__(self, session: _Session, offers: list[str], reactor: Any) -> None:
        super().__init__(protocols=offers, useragent=None, reactor=reactor)
        self.session = session

    def buildProtocol(self, addr: Any) -> _BackendHop:
        hop = cast(_BackendHop, super().buildProtocol(addr))
        hop.session = self.session
        self.session.backend = hop
        return hop


# -- sessions -----------------------------------------------------------------------

_DIALING, _ACCEPTING, _OPEN, _FINISHED = "dialing", "accepting", "open", "finished"


class _Session:
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
        self.client: _ClientHop | None = None
        self.backend: _BackendHop | None = None
        self.client_closed = False
        self.backend_closed = False
        self.subprotocol: str | None = None
        self.response_headers: dict[str, list[str]] = {}
        self._offers = subprotocol_offers(request.requestHeaders)
        preserve_host = relay.core.proxy.preserve_host
        self._lines = backend_header_lines(
            forward_request_headers(request, resolution.endpoint, route, preserve_host)
        )
        #: The client's Host for the backend handshake (C{--preserve-host}).
        client_host = request.requestHeaders.getRawHeaders(b"host") if preserve_host else None
        self.host_header: bytes | None = client_host[0] if client_host else None
        self._connecting: Deferred[Any] | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.frames_up = 0
        self.frames_down = 0
        self.close_code: int | None = None
        self.closed_by = "-"
        self.throttles: tuple[_Throttle, _Throttle] | None = None

    # -- dialing -------------------------------------------------------------------

    def start(self) -> None:
        """Dial the backend."""
        relay = self.relay
        assert self.request is not None
        self.request.notifyFinish().addErrback(self._client_gone)
        factory = _BackendFactory(self, self._offers, relay.reactor)
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
            headers=_HeaderLines(self._lines),
            useragent=None,
            origin=None,
            protocols=self._offers,
        )

    def _target(self) -> str:
        host = f"[{self.endpoint}]" if ":" in self.endpoint else self.endpoint
        return f"ws://{host}:{self.port}"

    def _connected(self, hop: _BackendHop) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state != _DIALING:
            return
        self.refuse(
            WebSocketUpstreamUnreachable(
                f"upstream {self._target()} unreachable: {_describe(failure)}"
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
        relay = self.relay
        relay.sessions.discard(self)
        relay.core.request_finished()
        relay.core.access_log.request(
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

    def _backend_failed(self, hop: _BackendHop) -> None:
        """The backend hop closed before its handshake completed."""
        head = getattr(hop, "http_response_data", None)
        error: IngressError
        if head is not None:
            status, reason, headers = parse_response_head(head)
            if status != 101:
                kept = tuple(
                    (name, value) for name, value in headers if name.lower() in _REFUSAL_HEADERS
                )
                error = WebSocketUpstreamRefused(
                    f"upstream {self._target()} refused the WebSocket handshake: "
                    f"{status} {reason}".rstrip(),
                    status,
                    kept,
                )
            else:
                error = WebSocketUpstreamRefused(
                    f"upstream {self._target()} sent an invalid WebSocket handshake: "
                    f"{hop.wasNotCleanReason}",
                    502,
                )
        elif getattr(hop, "wasOpenHandshakeTimeout", False):
            error = UpstreamTimeout(f"upstream {self._target()} did not answer the upgrade")
        else:
            error = WebSocketUpstreamUnreachable(
                f"upstream {self._target()} closed the connection during the handshake"
            )
        self.refuse(error)

    # -- accepting -------------------------------------------------------------------

    def backend_open(self, hop: _BackendHop) -> None:
        """The backend said 101: take over the client's connection."""
        request = self.request
        if self.state != _DIALING or request is None or request.channel is None:
            hop.dropConnection(abort=True)
            return
        _status, _reason, headers = parse_response_head(hop.http_response_data)
        self.subprotocol = hop.websocket_protocol_in_use
        self.response_headers = returned_headers(headers)
        name, values = POWERED_BY
        self.response_headers[name.decode("ascii")] = [v.decode("ascii") for v in values]
        self.state = _ACCEPTING
        self.request = None
        client = cast(_ClientHop, self.relay.server_factory.buildProtocol(None))
        client.session = self
        self.client = client
        _take_over(request, client)

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
        down = _Throttle(backend_transport)
        up = _Throttle(client_transport)
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

    def _other(self, hop: _Hop) -> Any:
        return self.backend if hop is self.client else self.client

    def close_received(self, hop: _Hop, code: int | None, reason: bytes | None) -> None:
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

    def peer_failed(self, hop: _Hop, code: int) -> None:
        """C{hop}'s peer violated the protocol: it will be failed with C{code}."""
        if self.closed_by == "-":
            self.close_code = code
            self.closed_by = "client" if hop is self.client else "backend"

    def fail_grace_over(self, hop: _Hop) -> None:
        """The other peer did not close in time after C{hop}'s peer failed."""
        other = self._other(hop)
        hop.finish_failing()
        if other is not None and other.state != other.STATE_CLOSED:
            other.dropConnection(abort=True)

    def hop_closed(self, hop: _Hop, was_clean: bool) -> None:
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
        if self.client_closed and self.backend_closed:
            self._finish()

    def _finish(self) -> None:
        self.state = _FINISHED
        relay = self.relay
        relay.sessions.discard(self)
        relay.core.request_finished()
        for hop in (self.client, self.backend):
            if hop is not None:
                hop.partner = None
        _access_log.info(
            "ws GET sandbox={sandbox} port={port} path={path} status=101 "
            "subprotocol={subprotocol} extensions={extensions} "
            "upstream_extensions={upstream_extensions} "
            "bytes_in={bytes_in} bytes_out={bytes_out} frames_in={frames_in} "
            "frames_out={frames_out} close_code={close_code} closed_by={closed_by} "
            "duration_ms={duration_ms} client={client}",
            kind="ws",
            method="GET",
            status=101,
            sandbox=self.sandbox_id,
            port=self.port,
            path=loggable_path(self.target, self.relay.core.access_log.uri_mode),
            # What each hop negotiated, as Autobahn holds it (the offers
            # and the backend's choice are untrusted text: made loggable).
            subprotocol=loggable_text(self.subprotocol.encode()) if self.subprotocol else "-",
            extensions=extension_names(self.client),
            upstream_extensions=extension_names(self.backend),
            bytes_in=self.bytes_up,
            bytes_out=self.bytes_down,
            frames_in=self.frames_up,
            frames_out=self.frames_down,
            close_code=self.close_code if self.close_code is not None else "-",
            closed_by=self.closed_by,
            duration_ms=round((self.relay.clock() - self.started) * 1000, 1),
            client=self.client_ip,
        )


def _take_over(request: Request, protocol: _ClientHop) -> None:
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


# -- the relay ---------------------------------------------------------------------


class WebSocketRelay:
    """
    The WebSocket half of one ingress: the proxy's C{websocket_handler}.

    Owns the server-hop factory, the options of both hops and the set of
    live sessions (for drain).  Reactor thread only.
    """

    def __init__(self, core: IngressCore, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.reactor = core.reactor
        self.clock = clock
        config = core.config
        self._uri_mode = config.mode == "uri"
        self._connect_timeout = config.upstream_connect_timeout_s
        handshake_timeout = config.upstream_connect_timeout_s + HANDSHAKE_MARGIN_S
        ping = config.websocket_ping_interval_s
        common: dict[str, Any] = {
            "utf8validateIncoming": True,
            "maxFramePayloadSize": 0,
            "maxMessagePayloadSize": 0,
            "autoFragmentSize": 0,
            "failByDrop": True,
            "echoCloseCodeReason": True,
            "openHandshakeTimeout": handshake_timeout,
            "closeHandshakeTimeout": CLOSE_HANDSHAKE_TIMEOUT_S,
            "autoPingInterval": ping,
            # The relay times pongs itself (_Hop._pong_overdue).
            "autoPingTimeout": 0,
        }
        self.client_options = dict(common)
        #: Seconds a hop may leave a keep-alive ping unanswered (the idle
        #: timeout); 0 (no pings, or no idle timeout) never drops.
        self.pong_timeout = config.idle_timeout_s if ping else 0.0
        self.server_factory = WebSocketServerFactory(server=None, reactor=self.reactor)
        self.server_factory.protocol = _ClientHop
        self.server_factory.noisy = False
        self.server_factory.setProtocolOptions(webStatus=False, **common)
        #: Sessions from dial to last close.
        self.sessions: set[_Session] = set()
        #: Sessions ended because their sandbox changed, by what changed.
        self.ended_by_sandbox: dict[str, int] = {}

    def handle(self, request: Request, resolution: Resolution) -> None:
        """Relay one resolved upgrade request (the proxy's hook)."""
        session = _Session(self, request, resolution, self.clock())
        self.core.request_started()
        self.sessions.add(session)
        try:
            if self.core.draining:
                raise ShuttingDown("ingress is shutting down")
            check_client_handshake(request.requestHeaders, request.clientproto)
        except IngressError as e:
            session.refuse(e)
            return
        session.start()

    def request_uri(self, route: Any) -> str:
        """The renew intent's C{request_uri}: the forwarded path in URI mode."""
        return route.path.decode("latin-1") if self._uri_mode else ""

    def offer_renew(self, session: _Session) -> None:
        self.core.renew.offer(session.sandbox_id, session.port, session.request_uri)

    def endpoint_for(self, host: str, port: int) -> Any:
        """A client endpoint (C{IStreamClientEndpoint}) for the backend."""
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            return HostnameEndpoint(self.reactor, host, port, timeout=self._connect_timeout)
        cls = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
        return cls(self.reactor, host, port, timeout=self._connect_timeout)

    @property
    def active_sessions(self) -> int:
        """Sessions in flight, from backend dial to last close (a metrics gauge)."""
        return len(self.sessions)

    def close_all(self, code: int = GOING_AWAY, reason: str = DRAIN_REASON) -> None:
        """Close every session (drain): open ones get C{code}, dials a 503."""
        for session in list(self.sessions):
            session.close(code, reason)

    def sandbox_changed(self, old: SandboxRecord, new: SandboxRecord | None) -> None:
        """
        A registry change (its change listener): end the sessions of a
        sandbox that went away, was recreated, moved or changed its access
        token, with 1001 on both hops and a reason naming it.  A session
        still dialing answers its client 404 (gone) or 503 (changed).
        """
        for session in [s for s in self.sessions if s.record.key == old.key]:
            ending = session_end_reason(session.record, new)
            if ending is None:
                continue
            kind, reason = ending
            self.ended_by_sandbox[kind] = self.ended_by_sandbox.get(kind, 0) + 1
            _log.info(
                "closing WebSocket session to {sandbox} port {port}: {reason}",
                sandbox=session.sandbox_id,
                port=session.port,
                reason=reason,
            )
            refusal: IngressError = (
                SandboxNotFound(reason)
                if new is None
                else WebSocketUpstreamUnreachable(f"{reason} while connecting")
            )
            session.close(GOING_AWAY, reason, refusal)


__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT_S",
    "HANDSHAKE_MARGIN_S",
    "WebSocketHandshakeInvalid",
    "WebSocketRelay",
    "WebSocketUpstreamRefused",
    "backend_header_lines",
    "check_client_handshake",
    "parse_response_head",
    "returned_headers",
    "session_end_reason",
    "subprotocol_offers",
]
