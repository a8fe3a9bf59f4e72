"""
The pure half of the WebSocket relay's handshakes: checks of the client's
upgrade request, the header lines each hop's handshake carries, and why a
session must end when its sandbox changes.  No reactor, no sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.http_headers import Headers

from ...errors import WebSocketHandshakeInvalid
from ..forwarding import HOP_BY_HOP

if TYPE_CHECKING:
    from ...registry import SandboxRecord

#: Request headers the relay must not pass to the backend, besides those
#: the forwarding rules (L{request_fields}) already drop: Autobahn's client writes its own
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
REFUSAL_HEADERS = (b"location", b"www-authenticate", b"retry-after")

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


def backend_header_lines(forwarded: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """
    The header lines for the backend handshake, one pair per line, from the
    forwarded fields (L{request_fields}): repeated headers (two C{Cookie}
    lines) stay separate lines, never comma-merged.
    """
    return [
        (name.decode("latin-1"), _text(value))
        for name, value in forwarded
        if name.lower() not in _NOT_FORWARDED
    ]


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
