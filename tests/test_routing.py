"""Route parsing (SPEC section 2): header mode, URI mode, signed routes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opensandbox_ingress import routing
from opensandbox_ingress.errors import RouteInvalid
from opensandbox_ingress.routing import (
    Route,
    origin_form,
    parse_header_route,
    parse_token,
    parse_uri_route,
    routing_token,
)
from opensandbox_ingress.secure_access import SignedPart, sign, signed_host_token

# -- header mode: which value is the token ------------------------------------


@pytest.mark.parametrize(
    ("ingress_to", "legacy", "host", "token"),
    [
        (b"a-1", b"b-2", b"c-3", "a-1"),
        (None, b"b-2", b"c-3", "b-2"),
        (None, None, b"c-3", "c-3"),
        (b"", b"b-2", b"c-3", "b-2"),
        (b"   ", b"", b"c-3", "c-3"),
        (b"", None, b"c-3", "c-3"),
        (b" a-1 ", None, None, "a-1"),
        (b"http://a-1", None, None, "a-1"),
        (b"https://a-1", None, None, "a-1"),
        (b"HTTPS://a-1.example.com", None, None, "a-1"),
        (b"sbx-8080.example.com", None, None, "sbx-8080"),
        (None, None, b"sbx-8080.example.com:443", "sbx-8080"),
        (None, None, b"sbx-8080:28888", "sbx-8080"),
        (b"https://sbx-8080.example.com/some/path", None, None, "sbx-8080"),
        (None, b"http://legacy-80.example.com", b"c-3", "legacy-80"),
    ],
)
def test_routing_token_precedence_and_cleanup(
    ingress_to: bytes | None, legacy: bytes | None, host: bytes | None, token: str
) -> None:
    """The token is the first non-empty header, scheme dropped, cut at '.' or ':port'."""
    assert routing_token(ingress_to, legacy, host) == token


@pytest.mark.parametrize(
    ("ingress_to", "legacy", "host"),
    [
        (None, None, None),
        (b"", b"", b""),
        (b" ", None, b"\t"),
        (b"sb\xc3\xa9-8080", None, b"ok-80"),
    ],
)
def test_routing_token_rejects(
    ingress_to: bytes | None, legacy: bytes | None, host: bytes | None
) -> None:
    """No usable value, or a non-ASCII first value, is RouteInvalid (400)."""
    with pytest.raises(RouteInvalid) as e:
        routing_token(ingress_to, legacy, host)
    assert e.value.status == 400


# -- header mode: token grammar ------------------------------------------------


@pytest.mark.parametrize(
    ("token", "sandbox_id", "port"),
    [
        ("sbx-8080", "sbx", 8080),
        ("my-sandbox-8080", "my-sandbox", 8080),
        ("a-b-c-1", "a-b-c", 1),
        ("x-65535", "x", 65535),
        ("sbx--80", "sbx-", 80),
        ("UPPER-443", "UPPER", 443),
        # Header mode does not insist on canonical ports.
        ("x-08080", "x", 8080),
        # Three segments are never signed.
        ("x2qxvk-614adedea-80", "x2qxvk-614adedea", 80),
    ],
)
def test_parse_token_unsigned(token: str, sandbox_id: str, port: int) -> None:
    """The last '-' segment is the port; everything before it is the id."""
    route = parse_token(token, b"/p?q=1")
    assert route == Route(sandbox_id, port, b"/p?q=1")
    assert route.signed is None
    assert route.prefix == b""
    assert route.unsigned_fallback is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "sbx",
        "-8080",
        "sbx-",
        "sbx-http",
        "sbx-0",
        "sbx-00000",
        "sbx-65536",
        "sbx-99999",
        pytest.param("sbx-" + "9" * 5000, id="huge-port"),
        "sbx-1" + "0" * 30,
        "sbx-+80",
        "sbx- 80",
        "sbx-８０",
        "sbx-٨٠",
        # Signed-looking but with a bad port: the unsigned reading fails too.
        "sb-0-x2qxvk-614adedea",
        "sb-abc-x2qxvk-614adedea",
        # Signed-looking with an empty id.
        "-8080-x2qxvk-614adedea",
        # An unsigned id never starts with '-' (upstream: empty first segment).
        "-a-8080",
        "--8080",
        # A signed port never has leading zeros: read unsigned, whose port
        # is then the signature (upstream TestParseRouteToken_LeadingZeroPort).
        "sb-08080-0-abcdef12k",
        "sb-08080-x2qxvk-614adedea",
        "sb-00080-x2qxvk-614adedea",
    ],
)
def test_parse_token_rejects(token: str) -> None:
    """An empty id or a port that is not 1..65535 digits is RouteInvalid."""
    with pytest.raises(RouteInvalid):
        parse_token(token, b"/")


@pytest.mark.parametrize(
    ("token", "sandbox_id", "port", "expires", "signature"),
    [
        ("sb-8080-x2qxvk-614adedea", "sb", 8080, "x2qxvk", "614adedea"),
        ("my-sand-box-80-x2qxvk-614adedea", "my-sand-box", 80, "x2qxvk", "614adedea"),
        ("sb-1-0-00000000z", "sb", 1, "0", "00000000z"),
        ("sb-65535-3w5e11264sgsf-abcdef019", "sb", 65535, "3w5e11264sgsf", "abcdef019"),
    ],
)
def test_parse_token_signed(
    token: str, sandbox_id: str, port: int, expires: str, signature: str
) -> None:
    """Four or more segments whose last three are valid parse as signed, right to left."""
    route = parse_token(token, b"/x")
    assert route == Route(sandbox_id, port, b"/x", signed=SignedPart(expires, signature))


@pytest.mark.parametrize(
    "token",
    [
        # Expires too large for uint64.
        "sb-80-3w5e11264sgsg-614adedea",
        # Leading zero in expires.
        "sb-80-0x2qxvk-614adedea",
        # Uppercase signature.
        "sb-80-x2qxvk-614ADEDEA",
        # Signature of the wrong length.
        "sb-80-x2qxvk-614adede",
    ],
)
def test_parse_token_signed_lookalikes(token: str) -> None:
    """Almost-signed tokens are read unsigned, whose port is then invalid."""
    with pytest.raises(RouteInvalid) as e:
        parse_token(token, b"/")
    assert "invalid port" in e.value.reason


@pytest.mark.parametrize(
    ("headers", "uri", "expected"),
    [
        (
            (None, None, b"sbx-8080.example.com"),
            b"/api/v1?x=1&y=2",
            Route("sbx", 8080, b"/api/v1?x=1&y=2"),
        ),
        (
            (b"my-sandbox-8080", None, b"ignored-1.example.com"),
            b"http://ignored.example.com/p?q",
            Route("my-sandbox", 8080, b"/p?q"),
        ),
        (
            (None, None, b"sb-8080-x2qxvk-614adedea.example.com"),
            b"/",
            Route("sb", 8080, b"/", signed=SignedPart("x2qxvk", "614adedea")),
        ),
    ],
)
def test_parse_header_route(
    headers: tuple[bytes | None, bytes | None, bytes | None], uri: bytes, expected: Route
) -> None:
    """Header mode forwards the path and query unchanged (absolute-form reduced)."""
    assert parse_header_route(*headers, uri) == expected


# -- request targets -----------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/a/b?c=d", b"/a/b?c=d"),
        (b"http://host/a/b?c", b"/a/b?c"),
        (b"HTTPS://host:8443/a", b"/a"),
        (b"http://host", b"/"),
        (b"http://host?q=1", b"/?q=1"),
        (b"http://host?q=/x", b"/?q=/x"),
        (b"*", b"*"),
        (b"relative", b"/relative"),
    ],
)
def test_origin_form(uri: bytes, expected: bytes) -> None:
    """Absolute-form targets are reduced to their path and query."""
    assert origin_form(uri) == expected


# -- URI mode ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "sandbox_id", "port", "path", "prefix"),
    [
        (b"/sbx/8080/rest?q=1", "sbx", 8080, b"/rest?q=1", b"/sbx/8080"),
        (b"/sbx/8080/a/b/c/d/e", "sbx", 8080, b"/a/b/c/d/e", b"/sbx/8080"),
        (b"/sbx/8080", "sbx", 8080, b"/", b"/sbx/8080"),
        (b"/sbx/8080/", "sbx", 8080, b"/", b"/sbx/8080"),
        (b"/sbx/8080?x=y", "sbx", 8080, b"/?x=y", b"/sbx/8080"),
        (b"/my-sandbox/1/", "my-sandbox", 1, b"/", b"/my-sandbox/1"),
        (b"/s/65535/x", "s", 65535, b"/x", b"/s/65535"),
        (b"http://host/sbx/80/p?q", "sbx", 80, b"/p?q", b"/sbx/80"),
        # Only segments 3-4 can be signed; a signature later stays in the path.
        (b"/sbx/80/a/x2qxvk/614adedea", "sbx", 80, b"/a/x2qxvk/614adedea", b"/sbx/80"),
    ],
)
def test_parse_uri_route_unsigned(
    uri: bytes, sandbox_id: str, port: int, path: bytes, prefix: bytes
) -> None:
    """/id/port/rest forwards /rest (or /) with the query; the prefix is /id/port."""
    route = parse_uri_route(uri)
    assert route == Route(sandbox_id, port, path, prefix=prefix, whole_path=origin_form(uri))


@pytest.mark.parametrize(
    "uri",
    [
        b"/",
        b"",
        b"*",
        b"/sbx",
        b"/sbx/",
        b"//8080/x",
        b"/sbx/http/x",
        b"/sbx/0/x",
        b"/sbx/08080/x",
        b"/sbx/0080",
        b"/sbx/65536/x",
        pytest.param(b"/sbx/" + b"9" * 5000, id="huge-port"),
        b"/sbx/-80/x",
        b"/sbx/+80/x",
        b"/sb\xc3\xa9/80/x",
        b"/sbx/\xd9\xa8\xd9\xa0/x",
        b"/sbx/0/x2qxvk/614adedea",
        b"/sbx/080/x2qxvk/614adedea",
    ],
)
def test_parse_uri_route_rejects(uri: bytes) -> None:
    """No id, non-ASCII, or a port that is not canonical 1..65535 is RouteInvalid."""
    with pytest.raises(RouteInvalid):
        parse_uri_route(uri)


def test_parse_uri_route_signed_with_fallback() -> None:
    """Signed-looking segments yield the signed route plus an unsigned fallback keeping them."""
    route = parse_uri_route(b"/sb/8080/x2qxvk/614adedea/api/v1?x=1")
    fallback = Route(
        "sb",
        8080,
        b"/x2qxvk/614adedea/api/v1?x=1",
        prefix=b"/sb/8080",
        whole_path=b"/sb/8080/x2qxvk/614adedea/api/v1?x=1",
    )
    assert route == Route(
        "sb",
        8080,
        b"/api/v1?x=1",
        signed=SignedPart("x2qxvk", "614adedea"),
        prefix=b"/sb/8080/x2qxvk/614adedea",
        unsigned_fallback=fallback,
        whole_path=b"/sb/8080/api/v1?x=1",
    )
    assert route.for_sandbox(True) is route
    assert route.for_sandbox(False) == fallback


@pytest.mark.parametrize(
    ("uri", "secure", "kept"),
    [
        (b"/sb/8080/api?x=1", False, b"/sb/8080/api?x=1"),
        (b"/sb/8080", False, b"/sb/8080"),
        (b"/sb/8080/", True, b"/sb/8080/"),
        (b"http://h/sb/8080/a?q", False, b"/sb/8080/a?q"),
        (b"/sb/8080/x2qxvk/614adedea/api?x=1", True, b"/sb/8080/api?x=1"),
        (b"/sb/8080/x2qxvk/614adedea", True, b"/sb/8080"),
        (b"/sb/8080/x2qxvk/614adedea/api", False, b"/sb/8080/x2qxvk/614adedea/api"),
    ],
)
def test_for_sandbox_keeping_prefix(uri: bytes, secure: bool, kept: bytes) -> None:
    """--uri-keep-prefix forwards the whole path, less the signed segments of a secure sandbox."""
    route = parse_uri_route(uri).for_sandbox(secure, keep_prefix=True)
    assert (route.path, route.prefix_kept) == (kept, True)
    default = parse_uri_route(uri).for_sandbox(secure)
    assert route.prefix == default.prefix
    # The app wrote its Location with the prefix already: no rebase.
    assert (route.location_prefix, default.location_prefix) == (b"", default.prefix)


def test_for_sandbox_keeping_prefix_leaves_header_routes() -> None:
    """A header-mode route has no prefix to keep: its path is unchanged."""
    route = parse_header_route(None, None, b"sb-8080.x", b"/p?q").for_sandbox(False, keep_prefix=True)
    assert (route.path, route.prefix_kept) == (b"/p?q", False)


@pytest.mark.parametrize(
    ("uri", "signed_path", "fallback_path"),
    [
        (b"/sb/80/x2qxvk/614adedea", b"/", b"/x2qxvk/614adedea"),
        (b"/sb/80/x2qxvk/614adedea/", b"/", b"/x2qxvk/614adedea/"),
        (b"/sb/80/x2qxvk/614adedea?q", b"/?q", b"/x2qxvk/614adedea?q"),
        (b"/sb/80/0/00000000a/a/b", b"/a/b", b"/0/00000000a/a/b"),
    ],
)
def test_parse_uri_route_signed_paths(uri: bytes, signed_path: bytes, fallback_path: bytes) -> None:
    """The signed reading strips four segments; the fallback strips only two."""
    route = parse_uri_route(uri)
    assert route.signed is not None
    assert route.path == signed_path
    assert route.for_sandbox(False).path == fallback_path
    assert route.for_sandbox(False).signed is None


@pytest.mark.parametrize(
    "uri",
    [
        b"/sb/80/X2QXVK/614adedea",
        b"/sb/80/x2qxvk/614ADEDEA",
        b"/sb/80/0x2qxvk/614adedea",
        b"/sb/80/3w5e11264sgsg/614adedea",
        b"/sb/80/x2qxvk/614adedea0",
        b"/sb/80/x2qxvk",
        b"/sb/80/\xc3\xa9/614adedea",
        b"/sb/80//614adedea",
        b"/sb/80/x2qxvk/614adede",
        b"/sb/80/x2qxvk/\xc3\xa9",
        # Issue 16's example: an uppercase expiry before a valid signature.
        b"/sb/80/ABC/aabbccddk/x",
    ],
)
def test_parse_uri_route_lookalikes_are_unsigned(uri: bytes) -> None:
    """Segments that are not all valid stay in an unsigned path, for every sandbox."""
    route = parse_uri_route(uri)
    assert route.signed is None
    assert route.unsigned_fallback is None
    assert route.path == uri[len(b"/sb/80") :]
    assert route.for_sandbox(True) is route
    assert route.for_sandbox(False) is route


def test_for_sandbox_without_fallback_is_identity() -> None:
    """A route with no fallback is the same route for any sandbox."""
    route = parse_uri_route(b"/sb/80/x")
    assert route.for_sandbox(True) is route
    assert route.for_sandbox(False) is route


# -- properties ----------------------------------------------------------------

_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
    min_size=1,
    max_size=40,
)
_ports = st.integers(min_value=1, max_value=65535)
_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~%", max_size=12)


@given(
    sandbox_id=_ids.filter(lambda s: not s.startswith("-")),
    port=_ports,
    domain=st.sampled_from(["", ".example.com", ".a.b:443"]),
)
def test_unsigned_token_round_trip(sandbox_id: str, port: int, domain: str) -> None:
    """Any id (with '-') and port survive a trip through the Host header."""
    host = f"{sandbox_id}-{port}{domain}".encode()
    route = parse_header_route(None, None, host, b"/p")
    assert (route.sandbox_id, route.port, route.path, route.signed) == (
        sandbox_id,
        port,
        b"/p",
        None,
    )


@given(
    sandbox_id=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~",
        min_size=1,
        max_size=40,
    ),
    port=_ports,
    rest=st.lists(_segment, max_size=5),
    query=st.one_of(st.just(b""), st.just(b"?a=1&b=/c")),
)
def test_uri_route_round_trip(sandbox_id: str, port: int, rest: list[str], query: bytes) -> None:
    """/id/port/rest?q parses back to id, port and /rest?q (unsigned reading)."""
    rest_path = ("/" + "/".join(rest)).encode() if rest else b""
    uri = f"/{sandbox_id}/{port}".encode() + rest_path + query
    route = parse_uri_route(uri).for_sandbox(False)
    assert route.sandbox_id == sandbox_id
    assert route.port == port
    assert route.signed is None
    assert route.prefix == f"/{sandbox_id}/{port}".encode()
    assert route.path == (rest_path or b"/") + query


@given(
    sandbox_id=_ids,
    port=_ports,
    expires=st.integers(min_value=0, max_value=2**64 - 1),
    key_id=st.sampled_from("0123456789abcdefghijklmnopqrstuvwxyz"),
    secret=st.binary(min_size=1, max_size=32),
)
def test_signed_token_round_trip(
    sandbox_id: str, port: int, expires: int, key_id: str, secret: bytes
) -> None:
    """A minted signed host token parses back to its id, port and signed segments."""
    token = signed_host_token(secret, key_id, sandbox_id, port, expires)
    route = parse_header_route(None, None, token.encode() + b".example.com", b"/")
    assert route.sandbox_id == sandbox_id
    assert route.port == port
    assert route.signed == sign(secret, key_id, sandbox_id, port, expires)


@given(
    sandbox_id=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=30),
    port=_ports,
    expires=st.integers(min_value=0, max_value=2**64 - 1),
    secret=st.binary(min_size=1, max_size=16),
)
def test_signed_uri_round_trip(sandbox_id: str, port: int, expires: int, secret: bytes) -> None:
    """A minted signed URI path parses as signed, with a fallback keeping the segments."""
    part = sign(secret, "k", sandbox_id, port, expires)
    tail = f"/{part.expires_b36}/{part.signature}".encode()
    uri = f"/{sandbox_id}/{port}".encode() + tail + b"/x?y"
    route = parse_uri_route(uri)
    assert (route.sandbox_id, route.port, route.signed, route.path) == (
        sandbox_id,
        port,
        part,
        b"/x?y",
    )
    assert route.for_sandbox(False).path == tail + b"/x?y"


def test_header_routes_from_a_remembered_token_keep_their_own_path() -> None:
    """The token's parse is remembered; each request still gets its own path."""
    first = parse_header_route(b"sb-8080", None, None, b"/a?x=1")
    second = parse_header_route(b"sb-8080", None, None, b"http://h/b")
    assert (first.sandbox_id, first.port, first.path) == ("sb", 8080, b"/a?x=1")
    assert (second.sandbox_id, second.port, second.path) == ("sb", 8080, b"/b")
    # The same token by another header is another key, with the same answer.
    assert parse_header_route(None, b"sb-8080", b"other-1", b"/").port == 8080
    assert parse_header_route(None, None, b"sb-9090.example.com", b"/").port == 9090


def test_bad_tokens_are_refused_every_time_and_the_memory_stays_bounded() -> None:
    for _ in range(2):
        with pytest.raises(RouteInvalid):
            parse_header_route(b"sb-0", None, None, b"/")
    for n in range(routing._PARSED_TOKENS_LIMIT + 10):
        assert parse_header_route(b"sb-%d" % (n % 65535 + 1), None, None, b"/").sandbox_id == "sb"
    assert len(routing._parsed_tokens) <= routing._PARSED_TOKENS_LIMIT
    # What was forgotten parses again, the same.
    assert parse_header_route(b"sb-1", None, None, b"/p").path == b"/p"
