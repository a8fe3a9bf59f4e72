"""
The forwarding rules, written once for every front-end and the WebSocket
relay: what the backend sees of a request head, what the client sees of a
response head, how an upstream failure is classified, and the bytes of an
ingress-generated error response.

Everything here is a plain function over header lists (C{(name, value)}
byte pairs, in wire order, repeated names kept), so it is tested without
sockets (C{tests/test_forwarding.py}).  The front-ends adapt their own
representation (framing events, C{twisted.web} C{Headers}) to a list once
per request and call each rule once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from .. import routing
from ..errors import (
    ERROR_HEADER,
    IngressError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..framing import status_line
from ..secure_access import SECURE_ACCESS_HEADER

HeaderPairs = list[tuple[bytes, bytes]]

#: Access-log status of a request whose client left before the response
#: ended (nginx's convention; never sent on the wire).
CLIENT_CLOSED = 499

#: The header the ingress adds to every relayed response.
POWERED_BY = (b"Reverse-Proxy-Server-PowerBy", (b"OpenSandbox-ingress",))

#: Headers never forwarded in either direction (RFC 9110 section 7.6.1),
#: plus the framing ones each hop writes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_XFH = b"x-forwarded-host"
#: Request headers the backend never sees as the client sent them: hop-by-hop,
#: framing, the ones the ingress rewrites, and the routing and secure-access
#: headers (a sandbox must not learn a credential meant for the ingress).
STRIP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    routing.INGRESS_TO_HEADER.lower(),
    routing.LEGACY_INGRESS_HEADER.lower(),
    SECURE_ACCESS_HEADER.lower(),
    _XFF,
    b"x-forwarded-prefix",
}
#: Response headers the client never sees: hop-by-hop, framing (the
#: ingress frames the response itself), and the routing and secure-access
#: headers (removed in both directions, so a sandbox cannot make a client
#: hold or replay a credential or a route it did not send).
STRIP_RESPONSE = HOP_BY_HOP | {
    b"content-length",
    routing.INGRESS_TO_HEADER.lower(),
    routing.LEGACY_INGRESS_HEADER.lower(),
    SECURE_ACCESS_HEADER.lower(),
}

#: Header names seen, lower-cased; read it directly where a call per header
#: would show (the fast path), fill it only through L{lower}.
LOWER_NAMES: dict[bytes, bytes] = {}


def lower(name: bytes) -> bytes:
    """C{name} lower-cased (cached: the same few names come every request)."""
    low = LOWER_NAMES.get(name)
    if low is None:
        low = name.lower()
        if len(LOWER_NAMES) < 4096:
            LOWER_NAMES[name] = low
    return low


def connection_tokens(values: Iterable[bytes] | None) -> frozenset[bytes]:
    """The lower-cased tokens of C{Connection} header values."""
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


@dataclass(frozen=True)
class ForwardOptions:
    """
    The configured choices of the request rewrite, built once from the
    config (L{forward_options}) and passed to L{forward_request_fields}.

    @ivar preserve_host: the backend gets the client's C{Host} instead of
        the sandbox's address (C{--preserve-host}).
    """

    preserve_host: bool = False


#: Today's behaviour: what a config without rewrite flags gives.
DEFAULT_OPTIONS = ForwardOptions()


def forward_options(config: Any) -> ForwardOptions:
    """The rewrite choices of C{config} (an L{IngressConfig})."""
    return ForwardOptions(preserve_host=config.preserve_host)


_authorities: dict[tuple[str, int], bytes] = {}


def backend_authority(endpoint: str, port: int) -> bytes:
    """The C{Host} value naming a backend: C{[v6]:port}, C{v4:port} or C{name:port}."""
    key = (endpoint, port)
    authority = _authorities.get(key)
    if authority is None:
        # Cached: the IDNA codec is a measurable share of a small request.
        if ":" in endpoint:
            authority = b"[%s]:%d" % (endpoint.encode("ascii"), port)
        else:
            authority = b"%s:%d" % (endpoint.encode("idna"), port)
        if len(_authorities) < 65536:
            _authorities[key] = authority
    return authority


def forward_request_fields(
    headers: Iterable[tuple[bytes, bytes]],
    listed: frozenset[bytes],
    host: bytes | None,
    client: bytes,
    secure: bool,
    authority: bytes,
    prefix: bytes,
    options: ForwardOptions,
) -> HeaderPairs:
    """
    The header fields the backend receives (without framing: each hop
    writes its own C{Content-Length}).

    The client's fields in order, less hop-by-hop, framing, routing and
    secure-access ones and those C{Connection} lists (C{listed}); then
    C{Host} (C{authority}, or the client's C{host} with
    C{options.preserve_host}), C{X-Forwarded-For} (the client's non-empty
    values joined, then C{client}), C{X-Forwarded-Proto} and
    C{X-Forwarded-Host} unless the client sent its own (and did not list it
    in C{Connection}), and C{X-Forwarded-Prefix} when the route has a
    C{prefix}.
    """
    out: HeaderPairs = []
    append = out.append
    strip = STRIP_REQUEST
    names = LOWER_NAMES
    prior: list[bytes] | None = None
    has_xfp = has_xfh = False
    for field in headers:
        name = field[0]
        low = names.get(name)
        if low is None:
            low = lower(name)
        if low in strip:
            if low == _XFF:
                value = field[1].strip()
                # An empty value adds nothing (not ", client").
                if value:
                    if prior is None:
                        prior = []
                    prior.append(value)
            continue
        if low in listed:
            continue
        if low == _XFP:
            has_xfp = True
        elif low == _XFH:
            has_xfh = True
        append(field)
    if options.preserve_host and host is not None:
        append((b"Host", host))
    else:
        append((b"Host", authority))
    if prior is not None:
        append((b"X-Forwarded-For", b", ".join(prior) + b", " + client))
    else:
        append((b"X-Forwarded-For", client))
    if not has_xfp:
        append((b"X-Forwarded-Proto", b"https" if secure else b"http"))
    if not has_xfh and host is not None:
        append((b"X-Forwarded-Host", host))
    if prefix:
        append((b"X-Forwarded-Prefix", prefix))
    return out


#: Methods whose empty body is announced with C{Content-Length: 0}.
_EMPTY_BODY_CL = frozenset({b"PUT", b"POST"})


def request_head(method: bytes, path: bytes, length: int | None, fields: HeaderPairs) -> bytes:
    """
    The request head the backend receives: C{fields} (from
    L{forward_request_fields}) framed by C{length} (C{None}: a chunked
    body of unknown length; 0: no body, C{Content-Length: 0} for C{PUT}
    and C{POST}).
    """
    lines = [method, b" ", path, b" HTTP/1.1\r\n"]
    if length:
        lines.append(b"Content-Length: %d\r\n" % length)
    elif length is None:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif method in _EMPTY_BODY_CL:
        lines.append(b"Content-Length: 0\r\n")
    for name, value in fields:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def rebase_location(location: bytes, prefix: bytes) -> bytes:
    """
    URI mode: put a root-relative redirect (C{/x}) under the route's prefix;
    absolute and protocol-relative (C{//host/x}) locations stay as they are.
    """
    if location[:1] == b"/" and location[:2] != b"//":
        return prefix + location
    return location


def response_fields(
    headers: Iterable[tuple[bytes, bytes]],
    listed: frozenset[bytes],
    prefix: bytes,
    date: bytes | None,
) -> HeaderPairs:
    """
    The backend's response header fields the client sees (without framing
    and without L{POWERED_BY}, which the front-end adds after its framing).

    Drops hop-by-hop, framing, routing and secure-access fields and those
    the response's C{Connection} lists; rebases C{Location} under
    C{prefix} (URI mode); adds C{Date: date} when the backend sent none
    and C{date} is given (a front-end that dates responses itself passes
    None).
    """
    out: HeaderPairs = []
    append = out.append
    strip = STRIP_RESPONSE | listed if listed else STRIP_RESPONSE
    names = LOWER_NAMES
    dated = False
    for field in headers:
        name = field[0]
        low = names.get(name)
        if low is None:
            low = lower(name)
        if low in strip:
            continue
        if low == b"date":
            dated = True
        elif prefix and low == b"location":
            field = (name, rebase_location(field[1], prefix))
        append(field)
    if date is not None and not dated:
        append((b"Date", date))
    return out


# -- failures ------------------------------------------------------------------


class InvalidUpstreamResponse(Exception):
    """The framing layer refused the backend's response (its reason)."""


def _reasons(failure: Failure) -> Sequence[Failure]:
    # Twisted's client wraps what went wrong in ResponseFailed /
    # RequestTransmissionFailed, whose .reasons lists the causes.
    return getattr(failure.value, "reasons", None) or ()


def invalid_reason(failure: Failure) -> str | None:
    """The framing layer's reason when C{failure} is (or wraps) a refused response."""
    if failure.check(InvalidUpstreamResponse):
        return str(failure.value)
    for reason in _reasons(failure):
        found = invalid_reason(reason)
        if found is not None:
            return found
    return None


def describe_failure(failure: Failure) -> str:
    """One short line saying why a backend could not be reached."""
    reasons = _reasons(failure)
    if reasons:
        return describe_failure(reasons[0])
    if failure.check(ierror.ConnectionRefusedError):
        return "connection refused"
    if failure.check(ierror.TimeoutError):
        return "connect timed out"
    if failure.check(ierror.DNSLookupError):
        return "name does not resolve"
    if failure.check(CancelledError):
        return "cancelled"
    message = failure.getErrorMessage()
    return message.splitlines()[0] if message else type(failure.value).__name__


def upstream_failure(
    target: str, failure: Failure | None, timed_out: bool
) -> tuple[IngressError, str]:
    """
    Classify a backend failure before any response head reached the
    client: the error to answer and the C{upstream_errors} metric label.

    An invalid response (the framing layer refused it) is C{invalid}; the
    exchange's idle timer or a connect timeout is C{timeout}; anything else
    (refused, reset, unresolvable) is C{connect}.  C{target} names the
    backend (C{host:port}).
    """
    if failure is not None:
        invalid = invalid_reason(failure)
        if invalid is not None:
            return (
                UpstreamInvalidResponse(f"upstream {target} sent an invalid response: {invalid}"),
                "invalid",
            )
    if timed_out or (failure is not None and failure.check(ierror.TimeoutError)):
        return UpstreamTimeout(f"upstream {target} timed out"), "timeout"
    assert failure is not None
    return (
        UpstreamUnreachable(f"upstream {target} unreachable: {describe_failure(failure)}"),
        "connect",
    )


def broken_response_label(timed_out: bool) -> str:
    """The metric label of a response cut short after its head: C{timeout} or C{reset}."""
    return "timeout" if timed_out else "reset"


# -- ingress-generated responses ---------------------------------------------------


def error_headers(error: IngressError) -> HeaderPairs:
    """The headers of C{error}'s response, besides framing and C{Date}."""
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (ERROR_HEADER, error.code.encode("ascii")),
    ]
    headers.extend(error.extra_headers())
    return headers


def error_response(error: IngressError, close: bool, date: bytes, head_only: bool = False) -> bytes:
    """
    C{error} as a complete HTTP/1.1 response, for front-ends that write
    bytes.  C{close} adds C{Connection: close}; C{date} is the C{Date}
    value; C{head_only} (an answer to C{HEAD}) leaves the body out but keeps
    its length.
    """
    body = error.body()
    lines = [status_line(error.status)]
    if close:
        lines.append(b"Connection: close\r\n")
    lines += (b"Date: ", date, b"\r\nContent-Length: %d\r\n" % len(body))
    for name, value in error_headers(error):
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def health_response(close: bool, date: bytes, head_only: bool = False) -> bytes:
    """The health check's C{200 OK} (body C{OK}), as L{error_response} frames it."""
    return b"".join(
        (
            status_line(200),
            b"Connection: close\r\n" if close else b"",
            b"Date: ",
            date,
            b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\n",
            b"" if head_only else b"OK",
        )
    )
