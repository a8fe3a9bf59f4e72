"""
HTTP/1.1 framing, sans-IO: bytes in, events out, with the ingress's policy
on top.  Nothing here imports Twisted, and nothing here parses HTTP by
hand: llhttp (through C{httptools}) or C{h11} reads the bytes, and
L{_policy} decides what is refused, with which status, and what the rest
of the ingress sees.

Two directions, one interface each:

    parser = request_parser()              # one per client connection
    for event in parser.feed(data): ...    # RequestHead, Data, EndOfMessage,
                                           # Switched, FramingError

    parser = response_parser()             # one per backend connection
    parser.expect(b"GET")                  # before each response
    parser.feed(data); parser.feed_eof()   # ResponseHead, Data, EndOfMessage,
                                           # FramingError

C{IMPLEMENTATION} is C{"httptools"} on CPython where its wheel imports,
else C{"h11"}; the environment variable C{OPENSANDBOX_INGRESS_HTTP_PARSER}
(C{httptools} or C{h11}) overrides it.
"""

from __future__ import annotations

import os
import platform
from typing import Protocol

from ._events import (
    Data,
    EndOfMessage,
    Event,
    FramingError,
    HeaderList,
    RequestHead,
    ResponseHead,
    Switched,
)
from ._h11 import H11RequestParser, H11ResponseParser, parse_upgrade_response
from ._policy import (
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_RESPONSE_HEAD_BYTES,
    accept_request,
    accept_response,
    invalid_response_header,
    reason_phrase,
    standard_reason,
    status_line,
    valid_field_name,
    valid_field_value,
    valid_status,
)


class RequestParser(Protocol):
    """Request framing for one client connection."""

    name: str

    @property
    def awaiting_head(self) -> bool:
        """Whether part of a request head has arrived, but not all of it."""

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""


class ResponseParser(Protocol):
    """Response framing for one backend connection."""

    name: str

    def expect(self, method: bytes) -> None:
        """A request with C{method} was sent; parse its response next."""

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""

    def feed_eof(self) -> list[Event]:
        """The backend closed the connection."""


_REQUEST: dict[str, type] = {"h11": H11RequestParser}
_RESPONSE: dict[str, type] = {"h11": H11ResponseParser}
try:
    from ._llhttp import LlhttpRequestParser, LlhttpResponseParser
except ImportError:  # pragma: no cover - no httptools wheel (PyPy)
    pass
else:
    _REQUEST["httptools"] = LlhttpRequestParser
    _RESPONSE["httptools"] = LlhttpResponseParser

#: The implementations importable here.
IMPLEMENTATIONS = tuple(sorted(_REQUEST))


def _default() -> str:
    chosen = os.environ.get("OPENSANDBOX_INGRESS_HTTP_PARSER", "")
    if chosen in _REQUEST:
        return chosen
    if platform.python_implementation() == "CPython" and "httptools" in _REQUEST:
        return "httptools"
    return "h11"


#: The implementation L{request_parser} and L{response_parser} use.
IMPLEMENTATION = _default()


def request_parser(
    max_head_bytes: int = MAX_HEAD_BYTES,
    max_headers: int = MAX_HEADER_COUNT,
    implementation: str | None = None,
) -> RequestParser:
    """A request parser (L{IMPLEMENTATION} unless C{implementation} is named)."""
    cls = _REQUEST[implementation or IMPLEMENTATION]
    parser: RequestParser = cls(max_head_bytes, max_headers)
    return parser


def response_parser(
    max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES, implementation: str | None = None
) -> ResponseParser:
    """A response parser (L{IMPLEMENTATION} unless C{implementation} is named)."""
    cls = _RESPONSE[implementation or IMPLEMENTATION]
    parser: ResponseParser = cls(max_head_bytes)
    return parser


__all__ = [
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "MAX_HEADER_COUNT",
    "MAX_HEAD_BYTES",
    "MAX_RESPONSE_HEAD_BYTES",
    "Data",
    "EndOfMessage",
    "Event",
    "FramingError",
    "HeaderList",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "Switched",
    "accept_request",
    "accept_response",
    "invalid_response_header",
    "parse_upgrade_response",
    "reason_phrase",
    "request_parser",
    "response_parser",
    "standard_reason",
    "status_line",
    "valid_field_name",
    "valid_field_value",
    "valid_status",
]
