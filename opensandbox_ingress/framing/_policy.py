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

from ._events import FramingError, RequestHead, ResponseHead

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


#: (code, phrase) -> status line, for the few pairs backends send: a
#: bounded cache (a backend choosing a new phrase per response only fills
#: it, then misses).
_status_lines: dict[tuple[int, bytes], bytes] = {}


def status_line(code: int, phrase: bytes = b"") -> bytes:
    """
    The status line (with its CRLF) the client gets, written by the
    ingress from a validated C{code} and L{reason_phrase}.

    @raise ValueError: C{code} is not in 100..599.
    """
    line = _status_lines.get((code, phrase))
    if line is not None:
        return line
    if not valid_status(code):
        raise ValueError(f"invalid status code {code}")
    line = b"HTTP/1.1 %d %s\r\n" % (code, reason_phrase(code, phrase))
    if len(_status_lines) < 1024:
        _status_lines[(code, phrase)] = line
    return line


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


# -- requests ---------------------------------------------------------------

#: Methods refused with 501: the ingress does not tunnel.
_NOT_IMPLEMENTED_METHODS = frozenset({b"CONNECT"})
#: The methods llhttp knows (its C{HTTP_METHOD_MAP}); any other is refused
#: with 501 by both parsers, so the two agree.
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND "
    b"PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE "
    b"M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE "
    b"QUERY".split()
)
_DIGITS = re.compile(rb"[0-9]{1,18}")
#: The bytes an origin-form or absolute-form target may hold (RFC 3986
#: unreserved, reserved, C{%}); parsers already refuse spaces and controls,
#: and 0x7f-0xff is refused here whichever parser ran.
_TARGET = re.compile(rb"[!-~]*")
_ABSOLUTE = re.compile(rb"(?i)(https?)://([^/?#]*)([^#]*)")
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:\[\]%]+")


def head_size(first_line: int, headers: list[tuple[bytes, bytes]]) -> int:
    """
    The size of a head as the policy counts it: the start line and every
    header line as C{name: value}, each with its CRLF, and the blank line.
    Both parsers report the same fields, so both count the same.
    """
    size = first_line + 4
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


#: One C{Connection} value -> its tokens, for the few values clients and
#: backends send (C{keep-alive}, C{close}, C{Upgrade}); bounded.
_listed_of: dict[bytes, frozenset[bytes]] = {}


def _listed(values: list[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of the C{Connection} header lines C{values}."""
    if len(values) != 1:
        return frozenset(_tokens(values))
    listed = _listed_of.get(values[0])
    if listed is None:
        listed = frozenset(_tokens(values))
        if len(_listed_of) < 1024:
            _listed_of[values[0]] = listed
    return listed


# Header names the policy looks at, by their lower-cased form.
_HOST, _LENGTH, _CODING, _CONNECTION, _UPGRADE = 1, 2, 3, 4, 5
_KINDS = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
}
#: Header name -> its kind (0: none the policy reads); a bounded cache, as
#: the same few names come with every request.
_kind_of: dict[bytes, int] = {}


def _kind(name: bytes) -> int:
    kind = _kind_of.get(name)
    if kind is None:
        kind = _KINDS.get(name.lower(), 0)
        if len(_kind_of) < 4096:
            _kind_of[name] = kind
    return kind


def _check_fields(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a header list is not valid HTTP (a name that is not a token, a control byte)."""
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None:
            return "invalid header name"
        if _FIELD_VALUE.fullmatch(value) is None:
            return "control character in a header value"
    return None


def accept_request(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    max_head_bytes: int = MAX_HEAD_BYTES,
    max_headers: int = MAX_HEADER_COUNT,
    fields_checked: bool = False,
) -> RequestHead | FramingError:
    """
    The ingress's request policy, applied to what a parser read: a
    L{RequestHead} with the derived fields, or the L{FramingError} the
    client gets (README.md, "HTTP framing", lists every row).
    C{fields_checked} says the parser already refused names that are not
    tokens and values with control bytes (llhttp does; h11 does not).
    """
    if len(headers) > max_headers:
        return FramingError(431, f"more than {max_headers} header fields")
    if version != b"1.1" and version != b"1.0":
        if version[:1] == b"0":
            # llhttp reads a request line without a version as HTTP/0.9.
            return FramingError(400, "malformed request line")
        return FramingError(505, "HTTP version not supported")
    if method not in KNOWN_METHODS or method in _NOT_IMPLEMENTED_METHODS:
        return FramingError(501, f"{method.decode('ascii', 'replace')} is not supported")
    if not fields_checked:
        why = _check_fields(headers)
        if why is not None:
            return FramingError(400, why)
    size = len(method) + len(target) + 14
    host: bytes | None = None
    hosts = 0
    lengths: list[bytes] | None = None
    codings: list[bytes] | None = None
    connection: list[bytes] | None = None
    upgrade = False
    kinds = _kind_of
    for name, value in headers:
        size += len(name) + len(value) + 4
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if not kind:
            continue
        if kind == _HOST:
            hosts += 1
            host = value
        elif kind == _LENGTH:
            lengths = [value] if lengths is None else lengths + [value]
        elif kind == _CODING:
            codings = [value] if codings is None else codings + [value]
        elif kind == _CONNECTION:
            connection = [value] if connection is None else connection + [value]
        else:
            upgrade = True
    if size > max_head_bytes:
        return FramingError(431, f"request head larger than {max_head_bytes} bytes")
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return FramingError(400, "HTTP/1.1 needs exactly one Host header")
    # The target: origin-form, asterisk-form for OPTIONS, or absolute-form
    # (whose authority replaces Host, RFC 9112 section 3.2.2).
    if _TARGET.fullmatch(target) is None:
        return FramingError(400, "invalid byte in the request target")
    if target[:1] == b"/":
        pass
    elif target == b"*":
        if method != b"OPTIONS":
            return FramingError(400, "asterisk-form target without OPTIONS")
    else:
        m = _ABSOLUTE.fullmatch(target)
        if m is None or _AUTHORITY.fullmatch(m.group(2)) is None or b"@" in m.group(2):
            return FramingError(400, "invalid request target")
        host = m.group(2)
        target = m.group(3) or b"/"
        if target[:1] == b"?":
            target = b"/" + target
    # Body framing (RFC 9112 section 6): only chunked as a transfer coding,
    # never with Content-Length; one valid Content-Length.
    content_length: int | None = 0
    if codings is not None:
        tokens = _tokens(codings)
        if version != b"1.1":
            return FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if any(t != b"chunked" for t in tokens):
            return FramingError(501, "transfer coding not supported (only chunked)")
        if tokens != [b"chunked"]:
            return FramingError(400, "invalid Transfer-Encoding")
        if lengths is not None:
            return FramingError(400, "both Content-Length and Transfer-Encoding")
        content_length = None
    elif lengths is not None:
        if len(lengths) > 1 or _DIGITS.fullmatch(lengths[0]) is None:
            return FramingError(400, "invalid Content-Length")
        content_length = int(lengths[0])
    listed = _listed(connection) if connection is not None else _NO_TOKENS
    if version == b"1.1":
        keep_alive = b"close" not in listed
    else:
        keep_alive = b"keep-alive" in listed and b"close" not in listed
    return RequestHead(
        method,
        target,
        version,
        headers,
        host,
        content_length,
        keep_alive,
        upgrade and b"upgrade" in listed,
        listed,
    )


_NO_TOKENS: frozenset[bytes] = frozenset()


# -- responses ----------------------------------------------------------------

_BODYLESS = frozenset({204, 304})


def accept_response(
    status: int,
    reason: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    request_method: bytes,
    fields_checked: bool = False,
) -> ResponseHead | FramingError:
    """
    The ingress's policy for a backend's final response head: a
    L{ResponseHead} with its framing (RFC 9112 section 6.3), or a
    L{FramingError} (the client gets 502 C{upstream_invalid_response}).
    C{fields_checked} as for L{accept_request}.
    """
    if not 200 <= status <= 599:
        return FramingError(502, "invalid status code")
    if version != b"1.1" and version != b"1.0":
        return FramingError(502, "invalid HTTP version")
    if reason and _REASON.fullmatch(reason) is None:
        return FramingError(502, "control character in the reason phrase")
    if not fields_checked:
        why = _check_fields(headers)
        if why is not None:
            return FramingError(502, why)
    lengths: list[bytes] | None = None
    codings: list[bytes] | None = None
    connection: list[bytes] | None = None
    kinds = _kind_of
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if not kind:
            continue
        if kind == _LENGTH:
            lengths = [value] if lengths is None else lengths + [value]
        elif kind == _CODING:
            codings = [value] if codings is None else codings + [value]
        elif kind == _CONNECTION:
            connection = [value] if connection is None else connection + [value]
    listed = _listed(connection) if connection is not None else _NO_TOKENS
    if version == b"1.1":
        keep_alive = b"close" not in listed
    else:
        keep_alive = b"keep-alive" in listed and b"close" not in listed
    content_length: int | None = None
    if lengths is not None:
        if len(set(lengths)) > 1 or _DIGITS.fullmatch(lengths[0]) is None:
            return FramingError(502, "invalid Content-Length")
        content_length = int(lengths[0])
    if codings is not None:
        # Only chunked is relayed: any other coding would reach the client
        # unlabelled once the ingress re-frames the body, so it is refused
        # (RFC 9112 section 6.3 allows read-until-close; a proxy that
        # re-frames cannot keep the coding's meaning).
        if _tokens(codings) != [b"chunked"]:
            return FramingError(502, "transfer coding other than chunked")
        if lengths is not None:
            return FramingError(502, "both Content-Length and Transfer-Encoding")
    framing: str
    if request_method == b"HEAD" or status in _BODYLESS:
        framing = "none"
        if codings is not None and request_method == b"HEAD":
            # A HEAD answer that declares chunked: a parser that does not
            # know the request was a HEAD (llhttp) would read what follows
            # as chunks, so bytes after it could go unseen; not reused.
            keep_alive = False
    elif codings is not None:
        framing = "chunked"
    elif content_length is not None:
        framing = "length"
    else:
        framing = "close"
        keep_alive = False
    return ResponseHead(
        status, reason, version, headers, framing, content_length, keep_alive, listed
    )
