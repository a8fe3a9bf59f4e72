"""
The events a framing parser returns.  Plain value classes with slots (the
fast path makes a few per request, so no dataclass machinery).
"""

from __future__ import annotations

from typing import Union

#: (name as sent, value without surrounding whitespace)
HeaderList = list[tuple[bytes, bytes]]


class RequestHead:
    """
    A request head the policy accepted.

    @ivar method: as sent (a token).
    @ivar target: origin-form (C{/path?query}), C{*}, or, for an
        absolute-form request, the path and query of the target.
    @ivar version: C{b"1.1"} or C{b"1.0"}.
    @ivar headers: every header line, names as sent, in order.
    @ivar host: the authority of an absolute-form target, else the one
        C{Host} value, else None (HTTP/1.0 without C{Host}).
    @ivar content_length: the body length (0 when there is no body), or
        None for a chunked body.
    @ivar keep_alive: whether the connection may carry another request.
    @ivar upgrade: the request asks for a protocol switch (C{Upgrade} named
        in C{Connection}); the bytes after it are not HTTP.
    @ivar listed: the lower-cased tokens of C{Connection}.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "host",
        "content_length",
        "keep_alive",
        "upgrade",
        "listed",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderList,
        host: bytes | None,
        content_length: int | None,
        keep_alive: bool,
        upgrade: bool,
        listed: frozenset[bytes],
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.listed = listed

    @property
    def chunked(self) -> bool:
        """Whether the body is chunked."""
        return self.content_length is None

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.version!r}, {self.headers!r})"


class ResponseHead:
    """
    A final (non-1xx) response head the policy accepted.

    @ivar status: 200..599 (1xx interim responses are skipped).
    @ivar reason: the reason phrase as sent (validated; may be empty).
    @ivar headers: every header line, names as sent, in order.
    @ivar framing: C{"length"}, C{"chunked"}, C{"close"} (read until the
        backend closes) or C{"none"} (HEAD, 204, 304).
    @ivar content_length: the C{Content-Length} value, or None.
    @ivar keep_alive: whether the connection may be reused afterwards.
    @ivar listed: the lower-cased tokens of C{Connection}.
    """

    __slots__ = (
        "status",
        "reason",
        "version",
        "headers",
        "framing",
        "content_length",
        "keep_alive",
        "listed",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: HeaderList,
        framing: str,
        content_length: int | None,
        keep_alive: bool,
        listed: frozenset[bytes],
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.listed = listed

    def __repr__(self) -> str:
        return f"ResponseHead({self.status!r}, {self.reason!r}, {self.framing!r}, {self.headers!r})"


class Data:
    """Body bytes (chunk framing removed)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Data({self.data!r})"


class EndOfMessage:
    """
    The message is complete.  For a response, C{clean} is False when bytes
    followed it on the connection (it must not be reused).
    """

    __slots__ = ("clean",)

    def __init__(self, clean: bool = True) -> None:
        self.clean = clean

    def __repr__(self) -> str:
        return f"EndOfMessage(clean={self.clean!r})"


class Switched:
    """After an upgrade request: bytes that are not HTTP (passed as they are)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Switched({self.data!r})"


class FramingError:
    """
    The bytes are refused.  C{status} is what a client gets (400, 431,
    501, 505); for a response it only says the backend is broken (502).
    The parser returns nothing more after it.
    """

    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"FramingError({self.status!r}, {self.reason!r})"


Event = Union[RequestHead, ResponseHead, Data, EndOfMessage, Switched, FramingError]
