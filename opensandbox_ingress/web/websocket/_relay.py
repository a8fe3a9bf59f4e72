"""
The WebSocket half of one ingress: options of both hops, the live sessions,
drain and sandbox changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.logger import Logger
from twisted.web.server import Request

from ...errors import IngressError, SandboxNotFound, ShuttingDown, WebSocketUpstreamUnreachable
from ..decision import Resolution
from ..forwarding import forward_options
from ..pool import client_endpoint
from ._client_hop import ClientHop
from ._handshake import check_client_handshake, session_end_reason
from ._hop import CLOSE_HANDSHAKE_TIMEOUT_S, GOING_AWAY
from ._session import Session

if TYPE_CHECKING:
    from ...registry import SandboxRecord
    from ...service import IngressCore


#: Seconds the backend gets to answer the upgrade once TCP is connected,
#: on top of the connect timeout; the client's open handshake is held for
#: the whole dial, so its bound is connect timeout + this margin.
HANDSHAKE_MARGIN_S = 5.0
DRAIN_REASON = "ingress shutting down"
#: Operational messages (sessions ended by a sandbox change).
_log = Logger(namespace="opensandbox_ingress.websocket")

# -- the relay ---------------------------------------------------------------------


class WebSocketRelay:
    """
    The WebSocket half of one ingress: the proxy's C{websocket_handler}.

    Owns the server-hop factory, the options of both hops and the set of
    live sessions (for drain).  Reactor thread only.
    """

    def __init__(self, core: IngressCore) -> None:
        self.core = core
        #: The core's reactor: the only clock of the relay's timers and of
        #: its sessions' timestamps (which the access log subtracts from
        #: its own reading of the same clock).
        self.reactor = core.reactor
        config = core.config
        self._uri_mode = config.mode == "uri"
        #: The request rewrite's choices, for the backend handshake.
        self.forward_options = forward_options(config)
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
            # The relay times pongs itself (Hop._pong_overdue).
            "autoPingTimeout": 0,
        }
        self.client_options = dict(common)
        #: Whether the client hop negotiates permessage-deflate.
        self.compression = config.websocket_compression
        #: Bytes a message may carry on either hop (inflated); 0 = no limit.
        self.max_message_bytes = config.websocket_max_message_bytes
        #: Seconds a hop may leave a keep-alive ping unanswered (the idle
        #: timeout); 0 (no pings, or no idle timeout) never drops.
        self.pong_timeout = config.idle_timeout_s if ping else 0.0
        self.server_factory = WebSocketServerFactory(server=None, reactor=self.reactor)
        self.server_factory.protocol = ClientHop
        self.server_factory.noisy = False
        self.server_factory.setProtocolOptions(webStatus=False, **common)
        #: Sessions from dial to last close.
        self.sessions: set[Session] = set()
        #: Sessions ended because their sandbox changed, by what changed.
        self.ended_by_sandbox: dict[str, int] = {}

    def handle(self, request: Request, resolution: Resolution) -> None:
        """Relay one resolved upgrade request (the proxy's hook)."""
        session = Session(self, request, resolution, self.reactor.seconds())
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

    def offer_renew(self, session: Session) -> None:
        self.core.renew.offer(session.sandbox_id, session.port, session.request_uri)

    def endpoint_for(self, host: str, port: int) -> Any:
        """A client endpoint (C{IStreamClientEndpoint}) for the backend."""
        return client_endpoint(self.reactor, host, port, self._connect_timeout)

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
