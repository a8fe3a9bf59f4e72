"""
Route parsing: which sandbox and port a request is for, and what path the
backend receives.

Pure functions of request bytes (SPEC section 2); no reactor, no registry.
The one decision that needs the registry -- whether a URI-mode path with
signature-shaped segments is signed -- is left to the caller through
L{Route.for_sandbox} (L{Route.unsigned_fallback}).

Both forms follow one rule, the Go ingress's (C{signature.ParseRouteToken}
and C{parseURIRoute} in alibaba/OpenSandbox C{components/ingress}): a route
is signed only when its port, expiry and signature segments are I{all}
valid; otherwise the same text is read as an unsigned route.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ._compat import DATACLASS_SLOTS
from .errors import RouteInvalid
from .secure_access import SignedPart, is_expires_b36, is_signature

#: Routing headers, in precedence order, then the Host header.
INGRESS_TO_HEADER = b"OpenSandbox-Ingress-To"
LEGACY_INGRESS_HEADER = b"OPEN-SANDBOX-INGRESS"

_MAX_PORT_DIGITS = 5


@dataclass(**DATACLASS_SLOTS)
class Route:
    """
    A parsed route.  Never changed once made (not a frozen dataclass only
    because a frozen one's constructor costs several times a plain one's,
    and one is made per request).

    @ivar sandbox_id: The sandbox id as written in the route.
    @ivar port: The sandbox port, 1..65535.
    @ivar path: The origin-form target (path and query) for the backend.
    @ivar signed: The signed segments, for a signed route.
    @ivar prefix: URI mode: the path prefix the route consumed (sent as
        C{X-Forwarded-Prefix}); empty in header mode.
    @ivar unsigned_fallback: URI mode only: for a path whose segments are
        a valid signature, the unsigned reading of the same path, to be used
        when the sandbox does not require secure access (its path then keeps
        the signature-shaped segments).
    @ivar whole_path: URI mode only: the target as C{--uri-keep-prefix}
        forwards it, C{/{id}/{port}/{rest}} and the query, without the
        signed segments (they are credentials, not part of the app's URL).
    @ivar prefix_kept: L{path} is L{whole_path}: the app already writes
        prefixed URLs, so a C{Location} must not be rebased.
    """

    sandbox_id: str
    port: int
    path: bytes
    signed: SignedPart | None = None
    prefix: bytes = b""
    unsigned_fallback: Route | None = None
    whole_path: bytes = b""
    prefix_kept: bool = False

    @property
    def location_prefix(self) -> bytes:
        """What a root-relative C{Location} is rebased under (empty: none)."""
        return b"" if self.prefix_kept else self.prefix

    def for_sandbox(self, requires_secure_access: bool, keep_prefix: bool = False) -> Route:
        """
        The reading of this route that applies to the resolved sandbox;
        with C{keep_prefix} (C{--uri-keep-prefix}), one that forwards
        L{whole_path}.
        """
        route = self
        if not requires_secure_access and self.unsigned_fallback is not None:
            route = self.unsigned_fallback
        if keep_prefix and route.whole_path:
            return replace(route, path=route.whole_path, prefix_kept=True, unsigned_fallback=None)
        return route


def _port(text: str, strict: bool) -> int | None:
    """
    A port segment: 1..65535 in ASCII digits.  C{strict} also refuses
    leading zeros, as every port of a signed route and of a URI path must
    (upstream C{signature.ParsePortSegment}); only the unsigned header/Host
    token accepts C{08080}, as upstream's C{strconv.Atoi} fallback does.
    """
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_PORT_DIGITS:
        return None
    if strict and text[0] == "0":
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def origin_form(uri: bytes) -> bytes:
    """
    The path-and-query of a request target; an absolute-form target
    (C{http://host/path}) is reduced to its path.
    """
    if uri[:1] == b"/":
        return uri
    lowered = uri[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        rest = uri.split(b"://", 1)[1]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash == -1 or (query != -1 and query < slash):
            return b"/" + (rest[query:] if query != -1 else b"")
        return rest[slash:]
    return b"/" + uri if uri != b"*" else uri


def routing_token(
    ingress_to: bytes | None, legacy: bytes | None, host: bytes | None
) -> str:
    """
    The header-mode routing token: the first non-empty of the two routing
    headers and C{Host}, without a leading C{http://}/C{https://}, cut at the
    first C{.} (and at a C{:port} or C{/path}, which a token never contains).

    @raise RouteInvalid: no usable token.
    """
    for value in (ingress_to, legacy, host):
        if value is None:
            continue
        value = value.strip()
        if not value:
            continue
        lowered = value[:8].lower()
        if lowered.startswith(b"https://"):
            value = value[8:]
        elif lowered.startswith(b"http://"):
            value = value[7:]
        for sep in (b".", b":", b"/"):
            cut = value.find(sep)
            if cut != -1:
                value = value[:cut]
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise RouteInvalid("routing token is not ASCII") from None
    raise RouteInvalid("no routing header or Host to route by")


def parse_token(token: str, path: bytes) -> Route:
    """
    Parse a header-mode token (C{{id}-{port}} or
    C{{id}-{port}-{expires_b36}-{signature}}) into a route forwarding
    C{path} unchanged.

    The signed reading needs four or more segments whose last three are a
    port without leading zeros, an expiry and a signature, and a non-empty
    id; anything else is read unsigned (C{sb-08080-0-abcdef12k} has the
    port C{abcdef12k}, so it is refused).

    @raise RouteInvalid: empty id (or, unsigned, one starting with C{-}),
        missing or invalid port.
    """
    segments = token.split("-")
    if len(segments) >= 4 and is_signature(segments[-1]) and is_expires_b36(
        segments[-2]
    ):
        port = _port(segments[-3], strict=True)
        sandbox_id = "-".join(segments[:-3])
        if port is not None and sandbox_id:
            return Route(
                sandbox_id, port, path, signed=SignedPart(segments[-2], segments[-1])
            )
    sandbox_id, sep, port_text = token.rpartition("-")
    # An id may contain '-' but not start with one: upstream's unsigned
    # reading refuses an empty first segment (and no resource name has one).
    if not sep or not sandbox_id or sandbox_id[0] == "-":
        raise RouteInvalid(f"routing token {token!r} is not <sandbox-id>-<port>")
    port = _port(port_text, strict=False)
    if port is None:
        raise RouteInvalid(f"routing token {token!r} has an invalid port")
    return Route(sandbox_id, port, path)


def parse_header_route(
    ingress_to: bytes | None,
    legacy: bytes | None,
    host: bytes | None,
    uri: bytes,
) -> Route:
    """Header mode: route by the routing headers or Host; path unchanged."""
    key = (ingress_to, legacy, host)
    parsed = _parsed_tokens.get(key)
    if parsed is None:
        # Raises RouteInvalid, which is not kept: only good tokens are.
        parsed = parse_token(routing_token(ingress_to, legacy, host), b"")
        if len(_parsed_tokens) >= _PARSED_TOKENS_LIMIT:
            _parsed_tokens.clear()
        _parsed_tokens[key] = parsed
    return Route(parsed.sandbox_id, parsed.port, origin_form(uri), parsed.signed)


#: (routing header, legacy header, Host) -> the token's route (empty path):
#: a client sends the same token with every request, and parsing it is a
#: large part of a small request's cost.  Emptied when full, so a client
#: that sends a new token each time only gets today's cost.
_parsed_tokens: dict[tuple[bytes | None, bytes | None, bytes | None], Route] = {}
_PARSED_TOKENS_LIMIT = 4096


def parse_uri_route(uri: bytes) -> Route:
    """
    URI mode: C{/{id}/{port}/{rest}} (or the signed
    C{/{id}/{port}/{expires}/{signature}/{rest}}); the backend receives
    C{/{rest}} and the original query.

    A path whose third and fourth segments are a valid expiry and signature
    yields the signed route with the unsigned reading as
    L{Route.unsigned_fallback}.  Segments that are not both valid (an
    uppercase or zero-padded expiry, a short signature) are only path: the
    route is unsigned, so a sandbox that requires secure access answers 401
    without a credential, as upstream does (SPEC 2).

    @raise RouteInvalid: no id, or a port that is not 1..65535 without
        leading zeros.
    """
    target = origin_form(uri)
    path, qmark, query = target.partition(b"?")
    suffix = qmark + query
    parts = path.split(b"/", 5)
    # parts[0] is the empty string before the leading slash.
    if len(parts) < 3 or not parts[1]:
        raise RouteInvalid("path is not /<sandbox-id>/<port>/...")
    try:
        sandbox_id = parts[1].decode("ascii")
        port_text = parts[2].decode("ascii")
    except UnicodeDecodeError:
        raise RouteInvalid("route segments are not ASCII") from None
    port = _port(port_text, strict=True)
    if port is None:
        raise RouteInvalid(f"path has an invalid port {port_text!r}")
    prefix = b"/" + parts[1] + b"/" + parts[2]
    rest = path[len(prefix) :] or b"/"
    unsigned = Route(sandbox_id, port, rest + suffix, prefix=prefix, whole_path=target)
    if len(parts) < 5:
        return unsigned
    # latin-1 never fails; a non-ASCII segment simply is not valid.
    expires_b36 = parts[3].decode("latin-1")
    signature = parts[4].decode("latin-1")
    if not (is_expires_b36(expires_b36) and is_signature(signature)):
        return unsigned
    signed_prefix = prefix + b"/" + parts[3] + b"/" + parts[4]
    after = path[len(signed_prefix) :]
    return Route(
        sandbox_id,
        port,
        (after or b"/") + suffix,
        signed=SignedPart(expires_b36, signature),
        prefix=signed_prefix,
        unsigned_fallback=unsigned,
        whole_path=prefix + after + suffix,
    )


#: What stands in the access log for each signed-route segment.
REDACTED = "REDACTED"
#: Characters of a logged path beyond this are cut (the line stays bounded).
LOG_PATH_MAX_CHARS = 512
# Bytes kept as they are in a logged path: visible ASCII but quotes and
# backslash; the rest is percent-encoded, so the path stays one field of a
# text line, needs no escaping in JSON, and cannot forge a line.
_LOG_SAFE = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("\\")}


def loggable_path(target: bytes, uri_mode: bool) -> str:
    """
    The request path as the access log shows it: no query string (it
    carries tokens, e.g. Jupyter's C{?token=}), no authority of an
    absolute-form target, and in URI mode a signed route's expiry and
    signature segments replaced by L{REDACTED} (they are credentials), also
    when they are malformed or the sandbox is open: any fourth segment
    that resembles a signature.
    Bytes outside visible ASCII are percent-encoded; a C{%} already in the
    path is kept as written.
    """
    path = origin_form(target).split(b"?", 1)[0].split(b"#", 1)[0]
    if uri_mode:
        parts = path.split(b"/", 5)
        if len(parts) >= 5 and _resembles_signature(parts[4]):
            parts[3] = parts[4] = REDACTED.encode()
            path = b"/".join(parts)
    return loggable_text(path[:LOG_PATH_MAX_CHARS])


_HEX = frozenset(b"0123456789abcdefABCDEF")
_ALNUM = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _resembles_signature(segment: bytes) -> bool:
    # Not only valid signatures: a mistyped or forged one (uppercase, a
    # digit short, one wrong character) is as much a credential in the log,
    # and routing reads it as plain path.  8-10 letters and digits whose
    # first 8 are hex but at most one: app paths rarely look like that.
    return (
        8 <= len(segment) <= 10
        and all(b in _ALNUM for b in segment)
        and sum(b not in _HEX for b in segment[:8]) <= 1
    )


def loggable_text(value: bytes) -> str:
    """
    C{value} as one field of an access line: visible ASCII but quotes and
    backslash as is, every other byte percent-encoded.
    """
    if all(b in _LOG_SAFE for b in value):
        return value.decode("ascii")
    return "".join(chr(b) if b in _LOG_SAFE else f"%{b:02X}" for b in value)
