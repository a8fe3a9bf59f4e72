"""
The proxy server's view of a request head the framing layer accepted:
which requests it serves itself (L{plain_head}) and the canonical bytes of
one it hands to C{twisted.web} (L{canonical_head}).
"""

from __future__ import annotations

from .. import routing
from ..framing import RequestHead
from ..secure_access import SECURE_ACCESS_HEADER
from .forwarding import LOWER_NAMES, lower

_SECURE = SECURE_ACCESS_HEADER.lower()
_INGRESS_TO = routing.INGRESS_TO_HEADER.lower()
_LEGACY = routing.LEGACY_INGRESS_HEADER.lower()
#: Request headers that send a request to C{twisted.web}.
_SLOW_HEADERS = frozenset({b"expect", b"upgrade", b"http2-settings"})


class PlainHead:
    """What the fast path needs of a request head the framing layer accepted."""

    __slots__ = (
        "method",
        "target",
        "headers",
        "length",
        "close",
        "listed",
        "host",
        "ingress_to",
        "legacy",
        "secure",
    )

    def __init__(self, request: RequestHead) -> None:
        self.method = request.method
        self.target = request.target
        #: The fields as sent, for the request rewrite.
        self.headers = request.headers
        self.length: int = request.content_length or 0
        self.close = not request.keep_alive
        self.listed: frozenset[bytes] = request.listed
        #: The routing host: the absolute-form target's authority, else Host.
        self.host: bytes | None = request.host
        self.ingress_to: bytes | None = None
        self.legacy: bytes | None = None
        self.secure: list[bytes] | None = None


def plain_head(request: RequestHead) -> PlainHead | None:
    """
    The fast path's view of an accepted request head, or None when the
    request goes to C{twisted.web} (HTTP/1.0, chunked uploads, upgrades,
    C{Expect}).  No parsing here: the framing layer did it; this only
    picks out the routing and secure-access fields.
    """
    if request.version != b"1.1" or request.upgrade or request.content_length is None:
        return None
    head = PlainHead(request)
    names = LOWER_NAMES
    for name, value in request.headers:
        low = names.get(name)
        if low is None:
            low = lower(name)
        if low in _SLOW_HEADERS:
            return None
        if low == _INGRESS_TO:
            if head.ingress_to is None:
                head.ingress_to = value
        elif low == _LEGACY:
            if head.legacy is None:
                head.legacy = value
        elif low == _SECURE:
            if head.secure is None:
                head.secure = []
            head.secure.append(value)
    return head


def canonical_head(request: RequestHead) -> bytes:
    """
    An accepted request head as canonical bytes for C{twisted.web}: its own
    parser only ever reads heads the framing layer accepted, written by the
    ingress (one Host: the absolute-form authority when there was one).
    """
    lines = [request.method, b" ", request.target, b" HTTP/", request.version, b"\r\n"]
    for name, value in request.headers:
        if lower(name) != b"host":
            lines += (name, b": ", value, b"\r\n")
    if request.host is not None:
        lines += (b"Host: ", request.host, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
