"""
The two hops of a relayed WebSocket session: Autobahn protocols whose frame
events are replayed on the other hop, with backpressure, control frames
kept between data frames, and ordered failure.  Reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from ._handshake import with_host_line

if TYPE_CHECKING:
    from ._session import Session

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

# -- backpressure ------------------------------------------------------------------


@implementer(IPushProducer)
class Throttle:
    """
    Registered as the producer of one hop's transport; pauses and resumes
    reading on the other hop's transport (and, on resume, calls
    C{on_resume}: the client hop may hold compressed input that it stopped
    inflating while this transport was full).  C{stopProducing} does
    nothing: closing is the relay's business (close frames), not the
    transport's.
    """

    __slots__ = ("_source", "_on_resume", "pauses", "paused")

    def __init__(self, source: Any, on_resume: Callable[[], None] | None = None) -> None:
        self._source = source
        self._on_resume = on_resume
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
        if self._on_resume is not None:
            self._on_resume()

    def stopProducing(self) -> None:
        pass


# -- the two hops --------------------------------------------------------------


class Hop:
    """
    Frame relaying shared by both hops: every frame event of this hop is
    replayed on C{peer}.  Autobahn's per-message buffering (the base
    C{onMessageFrameData}/C{onMessageEnd}, which feed C{onMessage}) is
    never reached.
    """

    session: Session
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
    write_throttle: Throttle | None = None
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
    #: The answer to this hop's peer's close, waiting for the frame being
    #: relayed to that peer to end (code, reason), and whether the
    #: connection is dropped after it (Autobahn's server does).
    held_reply: tuple[int | None, bytes | None] | None = None
    drop_after_reply = False
    _answering_close = False
    #: Payload bytes of the message arriving from this hop's peer so far
    #: (inflated ones for a compressed message), against the relay's
    #: C{max_message_bytes}.
    message_size = 0

    # A message that is one frame (FIN set on its first frame) of at most
    # COLLECT_LIMIT bytes is collected and sent on as one final frame, as
    # its sender sent it.  Anything else is streamed frame by frame as it
    # arrives (Autobahn's streaming API cannot set FIN on a data frame, so
    # such a message ends with an empty final frame); the sender's
    # fragmentation is kept.

    def onMessageBegin(self, isBinary: bool) -> None:
        self.message_binary = isBinary
        self.streaming = False
        self.message_size = 0

    def message_too_big(self, more: int) -> bool:
        """
        Count C{more} payload bytes of the current message; past the
        relay's C{max_message_bytes}, fail this hop's peer with 1009 and
        say so.
        """
        self.message_size += more
        limit = self.session.relay.max_message_bytes
        if not limit or self.message_size <= limit:
            return False
        self._max_message_size_exceeded(  # type: ignore[attr-defined]
            self.message_size, limit, f"message larger than {limit} bytes"
        )
        return True

    def onFrameData(self, payload: bytes) -> bool | None:
        if self.failing is not None:
            # Failed at the frame's start (a message too big): Autobahn's
            # processing loop goes on with the frame's payload; stop it.
            return False
        return super().onFrameData(payload)  # type: ignore[misc,no-any-return]

    def resume_reading(self) -> None:
        """This hop's partner reads again (the client hop may have input to finish)."""

    def onMessageFrameBegin(self, length: int) -> None:
        self.session.frame_relayed(self.upstream_bound)
        if self.message_too_big(length):
            return
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
                # Autobahn raises on a whole message to a hop that is closing
                # or closed (its frame-by-frame calls return quietly): a
                # message that arrives after the peer's close is dropped.
                if peer.state == peer.STATE_OPEN:
                    peer.sendMessage(b"".join(collecting), self.message_binary)
            else:
                peer.endMessage()
            self._flush_peer_close()

    def _flush_peer_close(self) -> None:
        peer = self.partner
        if peer is not None and peer.held_reply is not None and not peer.frame_half_written():
            # The frame (and, when its sender did not fragment, the message)
            # relayed to this peer is complete: answer its close now.
            peer.release_reply()
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
        # Its answer is written at once, which would land inside a frame
        # being relayed to this peer: it waits for the frame's end
        # (sendCloseFrame, dropConnection), as pings and pongs do.
        state = self.state  # type: ignore[attr-defined]
        self._answering_close = True
        try:
            stop = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        finally:
            self._answering_close = False
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
        if self.failing is not None:
            return  # one violation is enough (inflating may report two)
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

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        if self._answering_close and isReply and self.frame_half_written():
            self.held_reply = (code, reasonUtf8)
            return
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)  # type: ignore[misc]

    def release_reply(self) -> None:
        """Send the held answer to this hop's peer's close (and drop, if due)."""
        (code, reason), self.held_reply = self.held_reply or (None, None), None
        self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=True)
        if self.drop_after_reply:
            self.dropConnection(abort=False)

    def dropConnection(self, abort: bool = False) -> None:
        if self._answering_close and self.held_reply is not None and not abort:
            # Autobahn's server drops the connection after its answer; the
            # answer waits for the frame, so does the drop.
            self.drop_after_reply = True
            return
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


class BackendHop(Hop, WebSocketClientProtocol):  # type: ignore[misc]
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


class HeaderLines(dict):  # type: ignore[type-arg]
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


class BackendFactory(WebSocketClientFactory):  # type: ignore[misc]
    """
    One per session: Autobahn checks the backend's chosen subprotocol
    against C{factory.protocols}, which are this client's offers.
    """

    protocol = BackendHop
    noisy = False

    def __init__(self, session: Session, offers: list[str], reactor: Any) -> None:
        super().__init__(protocols=offers, useragent=None, reactor=reactor)
        self.session = session

    def buildProtocol(self, addr: Any) -> BackendHop:
        hop = cast(BackendHop, super().buildProtocol(addr))
        hop.session = self.session
        self.session.backend = hop
        return hop
