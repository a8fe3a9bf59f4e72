"""
The ingress's own HTTP/1.1 policy, on top of whichever parser frames the
bytes: what is refused with which status, what a backend may send, and the
status line the ingress writes.  Pure functions over bytes; no Twisted.

The table in README.md ("HTTP framing") is the documentation of this
module; keep the two together.
"""

from __future__ import annotations

import re
from http import HTTPStatus

#: A request head (start line and header lines) larger than this is refused
#: with 431 (C{--max-header-bytes}).
MAX_HEAD_BYTES = 16384
#: More header lines than this is refused with 431.
MAX_HEADER_COUNT = 100
#: A backend's response head larger than this is a broken backend (502).
MAX_RESPONSE_HEAD_BYTES = 65536

#: RFC 9110 section 5.6.2: a header name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: RFC 9110 section 5.5: field-value = *( VCHAR / SP / HTAB / obs-text ).
#: Everything else (NUL, CR, LF, DEL and the other controls) is refused.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
#: RFC 9112 section 4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ).
_REASON = _FIELD_VALUE


def valid_field_name(name: bytes) -> bool:
    """Whether C{name} is a token (RFC 9110 section 5.1)."""
    return _TOKEN.fullmatch(name) is not None


def valid_field_value(value: bytes) -> bool:
    """Whether C{value} holds no control byte but HTAB (RFC 9110 section 5.5)."""
    return _FIELD_VALUE.fullmatch(value) is not None


def valid_status(code: int) -> bool:
    """Whether C{code} is a status code a client may be sent (100..599)."""
    return 100 <= code <= 599


def standard_reason(code: int) -> bytes:
    """The standard reason phrase of C{code}, or C{Unknown Status}."""
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"


def reason_phrase(code: int, phrase: bytes) -> bytes:
    """
    The reason phrase the ingress writes for a backend's C{code}: the
    backend's own C{phrase} when it is non-empty and valid, else the
    standard one.  Nothing else of the backend's status line reaches the
    client.
    """
    if phrase and _REASON.fullmatch(phrase) is not None:
        return phrase
    return standard_reason(code)


def status_line(code: int, phrase: bytes = b"") -> bytes:
    """
    The status line (with its CRLF) the client gets, written by the
    ingress from a validated C{code} and L{reason_phrase}.

    @raise ValueError: C{code} is not in 100..599.
    """
    if not valid_status(code):
        raise ValueError(f"invalid status code {code}")
    return b"HTTP/1.1 %d %s\r\n" % (code, reason_phrase(code, phrase))


def invalid_response_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """
    Why a backend's header list must not be relayed (a name that is not a
    token, or a value with a control byte), or None when it may be.
    """
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None:
            return "invalid header name"
        if _FIELD_VALUE.fullmatch(value) is None:
            return "control character in a header value"
    return None
