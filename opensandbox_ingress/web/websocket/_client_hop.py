"""
The client-facing hop: an Autobahn server protocol that accepts with what
the backend chose and, when the client offered it, speaks
C{permessage-deflate} (RFC 7692) on its side only.  Reactor thread only.

Compressed messages from the client are inflated in bounded steps
(L{Inflater}): each step is relayed to the backend before the next, and
when the backend's send buffer is full the hop stops, keeps the rest of
the frame compressed, and stops Autobahn's processing of what it has
buffered; the backend transport's throttle resumes it
(L{ClientHop.resume_reading}).  So a decompression bomb costs no more
memory than any other message.  Inflated data goes on as one frame when
the message is one frame of at most C{COLLECT_LIMIT} inflated bytes, and
otherwise in frames of about that size (frame lengths differ between the
hops, so frames are cut anew; message boundaries and payloads are exact).

Toward the client, Autobahn's own calls compress: C{sendMessage} one whole
message into one frame, and the streaming calls the relay makes each
piece of compressed output into a frame of its own (L{sendMessageFrameData}).
"""

from __future__ import annotations

import zlib
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol

from ._deflate import Deflate, Inflater, negotiate
from ._hop import COLLECT_LIMIT, Hop


class ClientHop(Hop, WebSocketServerProtocol):  # type: ignore[misc]
    """The server protocol facing the client, created at the take-over."""

    upstream_bound = True
    #: This hop's C{permessage-deflate} processor, when negotiated.
    deflate: Deflate | None = None
    #: The inflater of the compressed message arriving, if one is.
    inflater: Inflater | None = None
    #: Inflated bytes collected for the backend, not yet sent.
    collected = 0
    #: True while inflating waits for the backend to read: Autobahn's
    #: buffered input is not processed meanwhile.
    inflate_paused = False

    def onConnect(self, request: Any) -> Any:
        # Accept with what the backend chose (its 101 is already in), plus
        # this hop's own extension.  Autobahn's negotiation is bypassed
        # (its offer parser fails the handshake on an offer it cannot read,
        # where RFC 7692 section 5 says to decline it and try the next).
        headers = self.session.response_headers
        self.websocket_extensions = []
        if self.session.relay.compression:
            agreement = negotiate(request.extensions)
            if agreement is not None:
                self.deflate = Deflate(agreement)
                self._perMessageCompress = self.deflate  # type: ignore[assignment]
                headers = {**headers, "Sec-WebSocket-Extensions": [agreement.response]}
        return self.session.subprotocol, headers

    def onOpen(self) -> None:
        if self.deflate is not None:
            self.websocket_extensions_in_use.append(self.deflate)
        self.session.client_open()

    # -- receiving compressed messages ----------------------------------------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if self._isMessageCompressed:  # type: ignore[has-type]
            self.inflater = Inflater()
            self.collecting = []
            self.collected = 0

    def onMessageFrameBegin(self, length: int) -> None:
        if self.inflater is None:
            super().onMessageFrameBegin(length)
            return
        # The frame's inflated length is unknown: its output is collected
        # and cut into frames as it comes (_deliver).
        self.session.frame_relayed(True)

    def onFrameData(self, payload: bytes) -> bool | None:
        if self.inflater is None or self.current_frame.opcode > 7 or self.failing is not None:
            return super().onFrameData(payload)
        # Autobahn would inflate the whole payload at once; this relays it
        # in bounded steps (see the module docstring).
        self.received += len(payload)
        self.inflater.feed(payload)
        return None if self._inflate(bounded=True) else False

    def _inflate(self, bounded: bool) -> bool:
        """
        Inflate and relay until the input fed is used up (True), or the
        backend stops reading (C{bounded}) or the message fails (False).
        """
        inflater = self.inflater
        while inflater is not None and inflater.pending:
            if bounded and self._backend_full():
                self.inflate_paused = True
                return False
            try:
                chunk = inflater.step()
            except zlib.error as e:
                self._invalid_payload(f"invalid permessage-deflate data: {e}")
                return False
            if chunk and not self._deliver(chunk):
                return False
            inflater = self.inflater
        self.inflate_paused = False
        return self.failing is None

    def _backend_full(self) -> bool:
        partner = self.partner
        throttle = partner.write_throttle if partner is not None else None
        return throttle is not None and throttle.paused and partner.state == partner.STATE_OPEN

    def _deliver(self, chunk: bytes) -> bool:
        """Check and relay one inflated step; False when the message failed."""
        if self.message_too_big(len(chunk)):
            return False
        if self.utf8validateIncomingCurrentMessage:
            self.utf8validateLast = self.utf8validator.validate(chunk)
            if not self.utf8validateLast[0]:
                self._invalid_payload("invalid UTF-8 in a compressed text message")
                return False
        self.session.count(True, len(chunk))
        collecting = self.collecting
        if collecting is None:  # failed meanwhile
            return False
        collecting.append(chunk)
        self.collected += len(chunk)
        if self.collected > COLLECT_LIMIT:
            self._send_collected()
        return True

    def _send_collected(self) -> None:
        """Send what is collected as one (non-final) frame of the message."""
        data = b"".join(self.collecting or ())
        self.collecting = []
        self.collected = 0
        peer = self.partner
        if peer is None or peer.state != peer.STATE_OPEN:
            return
        if not self.streaming:
            peer.beginMessage(self.message_binary)
            self.streaming = True
        peer.beginMessageFrame(len(data))
        peer.sendMessageFrameData(data)

    def consumeData(self) -> None:
        if self.inflate_paused:
            return  # resumed by resume_reading
        super().consumeData()

    def resume_reading(self) -> None:
        """The backend reads again: finish the frame's input, then go on."""
        if not self.inflate_paused or self.failing is not None:
            return
        if self._inflate(bounded=True) and self.state in (self.STATE_OPEN, self.STATE_CLOSING):
            # Autobahn resumes the interrupted frame (an empty payload call,
            # then its end when complete) and what is buffered after it.
            super().consumeData()

    def onMessageFrameEnd(self) -> None:
        if self.inflater is None:
            super().onMessageFrameEnd()
            return
        if self.current_frame.fin:
            # The stripped tail adds at most a few hundred bytes: relayed
            # whatever the backend's buffer.
            self.inflater.finish()
            self._inflate(bounded=False)
        else:
            if self.collected and self.failing is None:
                # The client fragmented: so does the relay.
                self._send_collected()
            self._flush_peer_close()

    def onMessageEnd(self) -> None:
        if self.inflater is None:
            super().onMessageEnd()
            return
        self.inflater = None
        peer = self.partner
        if self.failing is not None or peer is None or peer.state != peer.STATE_OPEN:
            return
        if not self.streaming:
            peer.sendMessage(b"".join(self.collecting or ()), self.message_binary)
        else:
            if self.collected:
                self._send_collected()
            peer.endMessage()
        self.collecting = None
        self._flush_peer_close()

    # -- sending compressed messages ------------------------------------------

    def sendMessage(self, payload: bytes, isBinary: bool = False, *args: Any, **kw: Any) -> None:
        if self.deflate is not None:
            self.deflate.size_hint = len(payload)
        super().sendMessage(payload, isBinary, *args, **kw)

    def beginMessageFrame(self, length: int) -> None:
        if getattr(self, "send_compressed", False):
            return  # frames are cut where compressed output comes
        super().beginMessageFrame(length)

    def sendMessageFrameData(self, payload: bytes, sync: bool = False) -> Any:
        if not getattr(self, "send_compressed", False):
            return super().sendMessageFrameData(payload, sync)
        if self.state != self.STATE_OPEN or self.deflate is None:
            return None
        out = self.deflate.compress_message_data(payload)
        if out:
            # Whole frames only: the frame is never half written, so
            # control frames need not wait for it.
            super().beginMessageFrame(len(out))
            super().sendMessageFrameData(out)
        return 0

    def endMessage(self) -> None:
        if (
            getattr(self, "send_compressed", False)
            and self.state == self.STATE_OPEN
            and self.send_state == self.SEND_STATE_MESSAGE_BEGIN
            and self.deflate is not None
        ):
            # No compressed output came before the end: the message is one
            # frame, which carries the opcode and the compression bit.
            tail = self.deflate.end_compress_message()
            self.sendFrame(opcode=self.send_message_opcode, payload=tail, fin=True, rsv=4)
            self.send_state = self.SEND_STATE_GROUND
            return
        super().endMessage()


__all__ = ["ClientHop"]
