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

from ...errors import WebSocketHandshakeInvalid, WebSocketUpstreamRefused
from ._handshake import (
    backend_header_lines,
    check_client_handshake,
    extension_names,
    returned_headers,
    session_end_reason,
    subprotocol_offers,
)
from ._hop import CLOSE_HANDSHAKE_TIMEOUT_S, COLLECT_LIMIT, FAIL_GRACE_S, GOING_AWAY
from ._relay import DRAIN_REASON, HANDSHAKE_MARGIN_S, WebSocketRelay

__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT_S",
    "COLLECT_LIMIT",
    "DRAIN_REASON",
    "FAIL_GRACE_S",
    "GOING_AWAY",
    "HANDSHAKE_MARGIN_S",
    "WebSocketHandshakeInvalid",
    "WebSocketRelay",
    "WebSocketUpstreamRefused",
    "backend_header_lines",
    "extension_names",
    "check_client_handshake",
    "returned_headers",
    "session_end_reason",
    "subprotocol_offers",
]
