"""
Secure access (OSEP-0011, SPEC 3) end to end: every status of the decision
order, in host form (C{Host}), header form (C{OpenSandbox-Ingress-To}) and
URI form (C{--mode uri}), for HTTP and for WebSocket upgrades, through a
running ingress on loopback configured with two verification keys (so that
routes signed with either key verify: rotation).

Every test here also captures every C{twisted.logger} event emitted while it
runs and checks that no access token and no signature (valid or not) appears
in any event's formatted text or fields.

Statuses observed where the SPEC leaves the code open:

- a malformed expiry or signature in host/header form is answered 400
  C{route_invalid}: the token's last three segments are not all valid, so
  it is read unsigned (SPEC 2), and a signature is never a valid port;
- a malformed expiry or signature in URI form does not make the path
  signed either (SPEC 2: segments 2-4 must all be valid, as upstream's
  C{parseURIRoute} requires), so a secure sandbox answers 401
  C{unauthorized} without a credential and an open one gets the whole path.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websocket as websocket_client
from twisted.internet import reactor, threads
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from opensandbox_ingress import IngressService
from opensandbox_ingress.config import ConfigError, parse_secure_access_keys
from opensandbox_ingress.errors import AccessExpired, Unauthorized
from opensandbox_ingress.routing import Route, parse_header_route, parse_token, parse_uri_route
from opensandbox_ingress.secure_access import (
    SignedPart,
    canonical_bytes,
    check_access,
    decode_b36,
    encode_b36,
    sign,
    signature_hex8,
    signed_host_token,
    verify_signed_route,
)
from tests.backend import Backend
from tests.helpers import header, ingress_url, request, start_ingress, wait_until
from tests.processes import (
    REPO,
    TWISTD,
    free_port,
    http_get,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)
from tests.ws_backend import WsBackend

# -- keys, tokens and sandboxes --------------------------------------------------

#: The access token of the secure sandboxes (the annotation's value).
TOKEN = "sa-e2e-token-7c41d9b2f0e3"
#: Key "a" is the SPEC 3 worked example's secret; key "b" is the rotated-in one.
SECRET_A = b"k"
SECRET_B = b"\x8f\x10rotated-in key b\x00\xfe"
#: Both spellings of the flag at once: id=BASE64 and id=base64:BASE64.
KEYS_FLAG = (
    f"a={base64.b64encode(SECRET_A).decode()},b=base64:{base64.b64encode(SECRET_B).decode()}"
)
KEYS = parse_secure_access_keys(KEYS_FLAG)

WORKED_EXPIRES = 2_000_000_000
NOW = int(time.time())
FUTURE = NOW + 3600
PAST = NOW - 3600

SECURE = "sb"
SECURE_HYPHENATED = "my-secure-sb"
OPEN = "open"
BLANK = "blank"
SANDBOXES: list[dict[str, Any]] = [
    {"name": SECURE, "endpoint": "127.0.0.1", "secure_access_token": TOKEN},
    {"name": SECURE_HYPHENATED, "endpoint": "127.0.0.1", "secure_access_token": f" {TOKEN} "},
    {"name": OPEN, "endpoint": "127.0.0.1"},
    # A blank annotation does not require secure access (SPEC 3: non-empty, trimmed).
    {"name": BLANK, "endpoint": "127.0.0.1", "secure_access_token": "   "},
]
REQUIRES_ACCESS = {SECURE: True, SECURE_HYPHENATED: True, OPEN: False, BLANK: False}

#: What the client asks for after the route; the backend must see exactly this.
REST = "/echo/x?q=1"
FORMS = ("host", "header", "uri")


def test_keys_flag_accepts_both_spellings() -> None:
    """The two-key flag used by every test parses, in both spellings, sorted by id."""
    assert KEYS == (("a", SECRET_A), ("b", SECRET_B))
    assert parse_secure_access_keys("a=aw==") == parse_secure_access_keys("a=base64:aw==")


# -- the worked example, through the pure functions ------------------------------


def test_worked_example_literals() -> None:
    """SPEC 3: b"k" under key a, sandbox sb, port 8080, expires 2000000000."""
    assert encode_b36(WORKED_EXPIRES) == "x2qxvk"
    assert decode_b36("x2qxvk") == WORKED_EXPIRES
    assert canonical_bytes("sb", 8080, "x2qxvk") == b"v1\nshort\nsb\n8080\nx2qxvk\n"
    assert signature_hex8(b"k", "sb", 8080, "x2qxvk") == "614adede"
    assert sign(b"k", "a", "sb", 8080, WORKED_EXPIRES) == SignedPart("x2qxvk", "614adedea")
    assert signed_host_token(b"k", "a", "sb", 8080, WORKED_EXPIRES) == "sb-8080-x2qxvk-614adedea"
    worked = SignedPart("x2qxvk", "614adedea")
    # Host form, header form and URI form of the same route.
    assert parse_header_route(None, None, b"sb-8080-x2qxvk-614adedea.example.com", b"/p") == Route(
        "sb", 8080, b"/p", signed=worked
    )
    assert parse_token("sb-8080-x2qxvk-614adedea", b"/p").signed == worked
    uri = parse_uri_route(b"/sb/8080/x2qxvk/614adedea/p?q")
    assert (uri.signed, uri.path, uri.for_sandbox(False).path) == (
        worked,
        b"/p?q",
        b"/x2qxvk/614adedea/p?q",
    )
    # It verifies with the configured keys until its expiry, inclusive.
    verify_signed_route(dict(KEYS), "sb", 8080, worked, now=WORKED_EXPIRES)
    with pytest.raises(AccessExpired):
        verify_signed_route(dict(KEYS), "sb", 8080, worked, now=WORKED_EXPIRES + 1)
    check_access("T", None, dict(KEYS), "sb", 8080, worked, now=NOW)
    with pytest.raises(Unauthorized):
        check_access("T", [b""], dict(KEYS), "sb", 8080, worked, now=NOW)


@pytest.mark.parametrize(
    "expires",
    ["0x2qxvk", "X2QXVK", "3w5e11264sgsg", "00000000000001", "", "x2q%2F"],
)
def test_uri_malformed_expiry_is_an_unsigned_path(expires: str) -> None:
    """A signature in segment four with a malformed expiry in segment three is not
    a signed route for any sandbox: a secure one needs a credential (401 without),
    every sandbox is forwarded the whole path."""
    route = parse_uri_route(f"/sb/80/{expires}/614adedea/p?q".encode())
    assert route.signed is None and route.path == f"/{expires}/614adedea/p?q".encode()
    assert route.for_sandbox(False) is route
    assert route.for_sandbox(True) is route
    with pytest.raises(Unauthorized):
        check_access("T", None, dict(KEYS), "sb", 80, route.signed, now=NOW)
    # A present header still decides alone.
    check_access("T", [b"T"], dict(KEYS), "sb", 80, route.signed, now=NOW)


# -- log capture -------------------------------------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """Every twisted.logger event while a test runs, and the strings it must not hold."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.forbidden: set[str] = {TOKEN}

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def forbid(self, *values: str | None) -> None:
        self.forbidden.update(v.strip() for v in values if v and v.strip())

    @staticmethod
    def render(event: dict[str, Any]) -> str:
        parts = [formatEvent(event)]
        for key, value in event.items():
            parts.append(f"{key}={value!r}")
            if isinstance(value, (bytes, bytearray)):
                parts.append(bytes(value).decode("latin-1"))
        failure = event.get("log_failure")
        if failure is not None:
            parts.append(failure.getTraceback())
        return "\n".join(parts)

    def access(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "opensandbox_ingress.access"]

    def assert_clean(self) -> None:
        assert self.events, "no log events captured"
        for event in self.events:
            text = self.render(event)
            for secret in self.forbidden:
                assert secret not in text, f"{secret!r} logged in {text!r}"


def test_log_capture_catches_a_leak() -> None:
    """The capture sees a token in a format string, a field, bytes or a failure."""
    from twisted.logger import Logger

    log = Logger(namespace="opensandbox_ingress.test")
    for emit in (
        lambda: log.info("route " + TOKEN),
        lambda: log.info("route {r}", r=TOKEN),
        lambda: log.debug("head", head=b"OpenSandbox-Secure-Access: " + TOKEN.encode()),
        lambda: log.failure("boom", Failure(ValueError(TOKEN))),
    ):
        capture = LogCapture()
        globalLogPublisher.addObserver(capture)
        try:
            emit()
        finally:
            globalLogPublisher.removeObserver(capture)
        with pytest.raises(AssertionError, match="logged in"):
            capture.assert_clean()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(capture)


# -- the table ------------------------------------------------------------------------

#: Mints the signed segments (expires_b36, signature) for (sandbox, port).
Mint = Callable[[str, int], tuple[str, str]]


def signed(
    secret: bytes, key_id: str, expires: int, port_offset: int = 0, for_id: str = ""
) -> Mint:
    """A route signed with C{secret} under C{key_id} (optionally for another port or id)."""

    def mint(sandbox: str, port: int) -> tuple[str, str]:
        part = sign(secret, key_id, for_id or sandbox, port + port_offset, expires)
        return part.expires_b36, part.signature

    return mint


def forged(expires_b36: str, signature: Callable[[str], str] = lambda s: s) -> Mint:
    """Segments signed correctly with key a over C{expires_b36}, then C{signature}-mangled."""

    def mint(sandbox: str, port: int) -> tuple[str, str]:
        return expires_b36, signature(signature_hex8(SECRET_A, sandbox, port, expires_b36) + "a")

    return mint


OK = (200, "")
Expect = tuple[int, str]


@dataclass(frozen=True)
class Case:
    id: str
    sandbox: str
    route: Mint | None = None
    secure_header: str | None = None
    keys: bool = True
    expect: Expect = OK
    #: Where host/header and URI forms differ (malformed segments).
    uri_expect: Expect | None = None

    def expected(self, form: str) -> Expect:
        if form == "uri" and self.uri_expect is not None:
            return self.uri_expect
        return self.expect


UNAUTHORIZED = (401, "unauthorized")
EXPIRED = (401, "access_expired")
ROUTE_INVALID = (400, "route_invalid")
NO_VERIFIER = (503, "verifier_not_configured")

VALID_A = signed(SECRET_A, "a", WORKED_EXPIRES)
VALID_B = signed(SECRET_B, "b", FUTURE)
GOOD_B36 = encode_b36(FUTURE)

CASES = [
    # 1. The header, when present (even empty), decides alone.
    Case("header-token-equal", SECURE, secure_header=TOKEN),
    Case("header-token-padded", SECURE, secure_header=f"  {TOKEN}\t"),
    Case("header-token-equal-beats-bad-signature", SECURE, signed(b"wrong", "a", FUTURE), TOKEN),
    Case("header-token-equal-no-keys", SECURE, secure_header=TOKEN, keys=False),
    Case("header-empty", SECURE, secure_header="", expect=UNAUTHORIZED),
    Case("header-empty-valid-route-a", SECURE, VALID_A, "", expect=UNAUTHORIZED),
    Case("header-wrong-valid-route-b", SECURE, VALID_B, "wrong-token-1f2e", expect=UNAUTHORIZED),
    Case("header-prefix-of-token", SECURE, VALID_A, TOKEN[:-1], expect=UNAUTHORIZED),
    Case(
        "header-wrong-no-keys",
        SECURE,
        secure_header="wrong-token-1f2e",
        keys=False,
        expect=UNAUTHORIZED,
    ),
    # 2. Else a signed route: either configured key verifies (rotation).
    Case("signed-key-a-worked-example", SECURE, VALID_A),
    Case("signed-key-b", SECURE, VALID_B),
    Case("signed-hyphenated-id", SECURE_HYPHENATED, VALID_B),
    Case("expired", SECURE, signed(SECRET_A, "a", PAST), expect=EXPIRED),
    Case("expired-key-b", SECURE, signed(SECRET_B, "b", PAST), expect=EXPIRED),
    Case("unknown-key-id", SECURE, signed(SECRET_A, "c", FUTURE), expect=UNAUTHORIZED),
    Case("wrong-signature", SECURE, signed(b"not-the-key", "a", FUTURE), expect=UNAUTHORIZED),
    Case("key-b-secret-under-id-a", SECURE, signed(SECRET_B, "a", FUTURE), expect=UNAUTHORIZED),
    Case(
        "signed-for-other-port",
        SECURE,
        signed(SECRET_A, "a", FUTURE, port_offset=1),
        expect=UNAUTHORIZED,
    ),
    Case(
        "signed-for-other-sandbox",
        SECURE,
        signed(SECRET_A, "a", FUTURE, for_id=OPEN),
        expect=UNAUTHORIZED,
    ),
    Case(
        "expires-leading-zero",
        SECURE,
        forged("0" + GOOD_B36),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "expires-uppercase",
        SECURE,
        forged(GOOD_B36.upper()),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "expires-over-uint64",
        SECURE,
        forged("3w5e11264sgsg"),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "expires-14-chars",
        SECURE,
        forged(GOOD_B36.rjust(14, "1")),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "signature-uppercase-key-id",
        SECURE,
        forged(GOOD_B36, lambda s: s[:8] + "A"),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "signature-8-chars",
        SECURE,
        forged(GOOD_B36, lambda s: s[:8]),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case(
        "signature-not-hex",
        SECURE,
        forged(GOOD_B36, lambda s: "g" + s[1:]),
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    Case("signed-no-keys", SECURE, VALID_A, keys=False, expect=NO_VERIFIER),
    Case("expired-no-keys", SECURE, signed(SECRET_A, "a", PAST), keys=False, expect=NO_VERIFIER),
    Case(
        "malformed-expires-no-keys",
        SECURE,
        forged("0" + GOOD_B36),
        keys=False,
        expect=ROUTE_INVALID,
        uri_expect=UNAUTHORIZED,
    ),
    # 3. Else 401.
    Case("no-credential", SECURE, expect=UNAUTHORIZED),
    Case("no-credential-no-keys", SECURE, keys=False, expect=UNAUTHORIZED),
    Case("no-credential-hyphenated-id", SECURE_HYPHENATED, expect=UNAUTHORIZED),
    # Sandboxes without the annotation need nothing, whatever they are sent.
    Case("open-unsigned", OPEN),
    Case("open-blank-annotation", BLANK),
    Case("open-valid-route", OPEN, VALID_A),
    Case("open-bad-signature", OPEN, signed(b"not-the-key", "c", FUTURE)),
    Case("open-expired", OPEN, signed(SECRET_A, "a", PAST)),
    Case("open-signed-no-keys", OPEN, VALID_B, keys=False),
    Case("open-wrong-header", OPEN, secure_header="wrong-token-1f2e"),
    Case("open-empty-header", OPEN, VALID_A, ""),
    Case(
        "open-malformed-expires", OPEN, forged("0" + GOOD_B36), expect=ROUTE_INVALID, uri_expect=OK
    ),
    Case(
        "open-malformed-signature",
        OPEN,
        forged(GOOD_B36, lambda s: s[:8] + "A"),
        expect=ROUTE_INVALID,
        uri_expect=OK,
    ),
]


@dataclass
class Built:
    path: str
    headers: dict[str, str]
    segments: tuple[str, str] | None
    #: The path the backend must receive, when the request is allowed.
    backend_path: str
    #: URI mode: the X-Forwarded-Prefix the backend must receive.
    prefix: str | None


def build(case: Case, form: str, port: int, logs: LogCapture) -> Built:
    """The request for C{case} in C{form} to a sandbox port C{port}."""
    segments = case.route(case.sandbox, port) if case.route else None
    headers: dict[str, str] = {}
    prefix = None
    backend_path = REST
    if form == "uri":
        route_prefix = f"/{case.sandbox}/{port}"
        signed_prefix = route_prefix + (f"/{segments[0]}/{segments[1]}" if segments else "")
        path = signed_prefix + REST
        headers["Host"] = "ingress.example.com"
        if REQUIRES_ACCESS[case.sandbox]:
            prefix = signed_prefix
        else:
            # Forwarded whole: the signature-shaped segments are its path.
            prefix = route_prefix
            backend_path = signed_prefix[len(route_prefix) :] + REST
    else:
        token = "-".join([case.sandbox, str(port), *(segments or ())])
        path = REST
        if form == "host":
            headers["Host"] = f"{token}.sandboxes.example.com"
        else:
            headers["Host"] = "ingress.example.com"
            headers["OpenSandbox-Ingress-To"] = token
    if case.secure_header is not None:
        headers["OpenSandbox-Secure-Access"] = case.secure_header
    logs.forbid(case.secure_header, *(segments[1:] if segments else ()))
    return Built(path, headers, segments, backend_path, prefix)


def case_params() -> list[Any]:
    return [pytest.param(case, form, id=f"{case.id}-{form}") for case in CASES for form in FORMS]


async def _ingress(tmp_path: Path, form: str, keys: bool) -> IngressService:
    return await start_ingress(
        tmp_path,
        SANDBOXES,
        mode="uri" if form == "uri" else "header",
        secure_access_keys=KEYS if keys else (),
        websocket_ping_interval_s=0,
    )


def _header_values(seen: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def _assert_denial(status: int, code: str | None, body: bytes, expected: Expect) -> None:
    assert (status, code) == expected, body
    assert body.startswith(b"OpenSandbox Ingress: "), body
    assert TOKEN.encode() not in body


# -- HTTP -------------------------------------------------------------------------------


class _EchoAnyPath(Resource):
    """Echoes what arrived for every path (an open sandbox in URI mode gets the
    signature-shaped segments in its path, which tests.backend does not serve)."""

    isLeaf = True

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def render(self, request: Request) -> bytes:
        self.backend.requests += 1
        seen = {
            "uri": request.uri.decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")]
                for k, vs in request.requestHeaders.getAllRawHeaders()
                for v in vs
            ],
        }
        self.backend.seen.append(seen)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(seen).encode()


def _echo_backend(interface: str = "127.0.0.1", port: int = 0) -> Backend:
    b = Backend()
    b.site.resource = _EchoAnyPath(b)
    return b.listen(interface=interface, port=port)


@pytest_twisted.async_yield_fixture
async def echo_backend() -> AsyncIterator[Backend]:
    b = _echo_backend()
    yield b
    await b.stop()


@pytest.mark.parametrize(("case", "form"), case_params())
@pytest_twisted.ensureDeferred
async def test_http(
    case: Case, form: str, tmp_path: Path, echo_backend: Backend, logs: LogCapture
) -> None:
    """One row of the SPEC 3 table over HTTP through the running ingress."""
    backend = echo_backend
    port = backend.port_number
    built = build(case, form, port, logs)
    service = await _ingress(tmp_path, form, case.keys)
    try:
        response, body = await request(
            "GET", ingress_url(service, built.path), headers=built.headers
        )
    finally:
        await service.stopService()
    expected = case.expected(form)
    if expected == OK:
        assert response.code == 200, body
        seen = json.loads(body)
        got = _header_values(seen)
        assert seen["uri"] == built.backend_path
        assert got["host"] == [f"127.0.0.1:{port}"]
        for gone in ("opensandbox-secure-access", "opensandbox-ingress-to"):
            assert gone not in got, gone
        assert got.get("x-forwarded-prefix") == ([built.prefix] if built.prefix else None)
        assert header(response, "OpenSandbox-Ingress-Error") is None
        assert len(backend.seen) == 1
    else:
        _assert_denial(response.code, header(response, "OpenSandbox-Ingress-Error"), body, expected)
        assert backend.requests == 0
    assert [e["status"] for e in logs.access()] == [response.code]
    logs.assert_clean()


# -- WebSocket --------------------------------------------------------------------------


def _ws_exchange(port: int, built: Built) -> tuple[int, dict[str, str], bytes | str]:
    """Open a WebSocket with websocket-client (in a thread): the handshake status, the
    response headers, and the echo of one message (or the refusal's body)."""
    headers = dict(built.headers)
    host = headers.pop("Host")
    try:
        ws = websocket_client.create_connection(
            f"ws://127.0.0.1:{port}{built.path}",
            timeout=10,
            host=host,
            header=[f"{k}: {v}" for k, v in headers.items()],
        )
    except websocket_client.WebSocketBadStatusException as e:
        return e.status_code, dict(e.resp_headers or {}), e.resp_body or b""
    try:
        ws.send("hello ✓")
        echoed = ws.recv()
        return int(ws.getstatus() or 0), dict(ws.getheaders() or {}), echoed
    finally:
        ws.close()


async def _ws(service: IngressService, built: Built) -> tuple[int, dict[str, str], bytes | str]:
    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    return await threads.deferToThreadPool(
        reactor,  # type: ignore[arg-type]
        pool,
        _ws_exchange,
        service.addresses()[0].port,
        built,
    )


@pytest.mark.parametrize(("case", "form"), case_params())
@pytest_twisted.ensureDeferred
async def test_websocket(
    case: Case, form: str, tmp_path: Path, ws_backend: WsBackend, logs: LogCapture
) -> None:
    """One row of the SPEC 3 table as a WebSocket upgrade: allowed sessions reach the
    backend with the same rewriting as HTTP; denials are HTTP responses before any
    upgrade, and the backend is never dialled."""
    port = ws_backend.port_number
    built = build(case, form, port, logs)
    service = await _ingress(tmp_path, form, case.keys)
    try:
        status, headers, payload = await _ws(service, built)
        expected = case.expected(form)
        if expected == OK:
            assert status == 101
            assert payload == "hello ✓"
            assert ws_backend.request_line() == f"GET {built.backend_path} HTTP/1.1"
            lines = ws_backend.header_lines()
            names = {n.lower() for n, _ in lines}
            assert [v for n, v in lines if n.lower() == "host"] == [f"127.0.0.1:{port}"]
            assert "opensandbox-secure-access" not in names
            assert "opensandbox-ingress-to" not in names
            prefix = [v for n, v in lines if n.lower() == "x-forwarded-prefix"]
            assert prefix == ([built.prefix] if built.prefix else [])
            await wait_until(
                lambda: any(e.get("status") == 101 for e in logs.access()),
                what="session access line",
            )
        else:
            assert isinstance(payload, bytes)
            _assert_denial(status, headers.get("opensandbox-ingress-error"), payload, expected)
            assert "sec-websocket-accept" not in headers
            assert ws_backend.handshakes == []
            assert [e["status"] for e in logs.access()] == [status]
    finally:
        await service.stopService()
    logs.assert_clean()


@pytest.mark.parametrize("form", FORMS)
@pytest_twisted.ensureDeferred
async def test_websocket_backend_refusal_after_access_granted(
    form: str, tmp_path: Path, ws_backend: WsBackend, logs: LogCapture
) -> None:
    """A validly signed upgrade that the backend refuses with 403 gets the backend's 403:
    the ingress authorised it and dialled; the refusal is an HTTP response too."""
    ws_backend.refuse = 403
    built = build(Case("refused", SECURE, VALID_B), form, ws_backend.port_number, logs)
    service = await _ingress(tmp_path, form, keys=True)
    try:
        status, headers, _ = await _ws(service, built)
    finally:
        await service.stopService()
    assert status == 403
    assert headers.get("opensandbox-ingress-error") == "upstream_refused"
    assert len(ws_backend.handshakes) == 1
    head = ws_backend.handshakes[0].decode("latin-1")
    assert head.startswith(f"GET {built.backend_path} HTTP/1.1\r\n")
    assert "opensandbox-secure-access" not in head.lower()
    logs.assert_clean()


# -- the worked example end to end ----------------------------------------------------------

WORKED_HOST = "127.88.0.1"


@pytest_twisted.async_yield_fixture
async def port_8080_backend() -> AsyncIterator[Backend]:
    """An HTTP backend on 8080, the worked example's port, on a loopback address of its own."""
    # Any loopback address listens on Linux, so port 8080 there is free.
    b = _echo_backend(interface=WORKED_HOST, port=8080)
    yield b
    await b.stop()


@pytest.mark.parametrize("form", FORMS)
@pytest_twisted.ensureDeferred
async def test_worked_example_literally(
    form: str, tmp_path: Path, port_8080_backend: Backend, logs: LogCapture
) -> None:
    """The literal SPEC 3 route sb-8080-x2qxvk-614adedea (and /sb/8080/x2qxvk/614adedea/)
    opens sandbox sb with key a = b"k" configured next to key b."""
    logs.forbid("614adedea")
    headers = {"Host": "ingress.example.com"}
    path = REST
    if form == "host":
        headers["Host"] = "sb-8080-x2qxvk-614adedea.sandboxes.example.com"
    elif form == "header":
        headers["OpenSandbox-Ingress-To"] = "sb-8080-x2qxvk-614adedea"
    else:
        path = "/sb/8080/x2qxvk/614adedea" + REST
    sandboxes = [{"name": "sb", "endpoint": WORKED_HOST, "secure_access_token": TOKEN}]
    service = await start_ingress(
        tmp_path, sandboxes, mode="uri" if form == "uri" else "header", secure_access_keys=KEYS
    )
    try:
        response, body = await request("GET", ingress_url(service, path), headers=headers)
        # One character off in the signature: refused.
        bad_headers = {k: v.replace("614adedea", "614adedeb") for k, v in headers.items()}
        refused, _ = await request(
            "GET", ingress_url(service, path.replace("614adedea", "614adedeb")), headers=bad_headers
        )
    finally:
        await service.stopService()
    assert response.code == 200, body
    seen = json.loads(body)
    assert seen["uri"] == REST
    assert _header_values(seen)["host"] == [f"{WORKED_HOST}:8080"]
    assert refused.code == 401
    assert header(refused, "OpenSandbox-Ingress-Error") == "unauthorized"
    logs.forbid("614adedeb")
    logs.assert_clean()


# -- the ingress as a process ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "segment", "problem"),
    [
        ("A=aGVsbG8=", "segment 1", "key id"),
        ("a=aGVsbG8=,B=base64:aGVsbG8=", "segment 2", "key id"),
        ("ab=aGVsbG8=", "segment 1", "key id"),
        ("a=aGVsbG8=,b=not*base64!", "segment 2", "base64"),
        ("a=base64:%%%", "segment 1", "base64"),
        ("a=", "segment 1", "empty"),
        ("a=aGVsbG8=,b=base64:", "segment 2", "empty"),
        ("aGVsbG8", "segment 1", "id=BASE64"),
        ("a=aGVsbG8=,b", "segment 2", "id=BASE64"),
        ("a=aGVsbG8=,,b=aGVsbG8=", "segment 2", "empty"),
        ("a=aGVsbG8=,a=d29ybGQ=", "segment 2", "twice"),
    ],
    ids=[
        "uppercase-id",
        "uppercase-id-second",
        "two-char-id",
        "bad-base64",
        "bad-base64-prefixed",
        "empty-secret",
        "empty-secret-prefixed",
        "missing-equals",
        "missing-equals-second",
        "empty-segment",
        "duplicate-id",
    ],
)
def test_malformed_keys_stop_startup_with_one_line(value: str, segment: str, problem: str) -> None:
    """twistd exits non-zero with one stderr line naming the flag and the bad segment."""
    with pytest.raises(ConfigError) as e:
        parse_secure_access_keys(value)
    assert segment in str(e.value)
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "opensandbox-ingress", "--secure-access-keys", value],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("opensandbox-ingress: --secure-access-keys: "), line
    assert segment in line, line
    assert problem in line, line


def test_process_verifies_signed_routes_and_logs_no_secrets(tmp_path: Path) -> None:
    """A real twistd with both keys (both spellings) and --log-level debug: routes signed
    with either key pass, a bad one and a missing credential do not, and neither the
    access token nor any signature reaches its log output."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text(
        json.dumps([{"name": "sb", "endpoint": "127.0.0.1", "secure_access_token": TOKEN}])
    )
    port = free_port()
    proc = twistd(
        [
            "--provider-type",
            "file",
            "--sandboxes-file",
            str(sandboxes),
            "--port",
            str(port),
            "--secure-access-keys",
            KEYS_FLAG,
            "--log-level",
            "debug",
        ]
    )
    token_a = signed_host_token(SECRET_A, "a", "sb", backend_port, FUTURE)
    token_b = signed_host_token(SECRET_B, "b", "sb", backend_port, FUTURE)
    token_bad = signed_host_token(b"nope", "b", "sb", backend_port, FUTURE)
    results = []
    try:
        wait_healthy(proc, port)
        for headers in (
            {"Host": f"{token_a}.sandboxes.example.com"},
            {"OpenSandbox-Ingress-To": token_b},
            {"OpenSandbox-Ingress-To": f"sb-{backend_port}", "OpenSandbox-Secure-Access": TOKEN},
            {"OpenSandbox-Ingress-To": token_bad},
            {"OpenSandbox-Ingress-To": f"sb-{backend_port}"},
        ):
            results.append(http_get(port, "/download?size=3", headers))
    finally:
        out, err = stop(proc)
        stop(backend)
    assert [status for status, _ in results] == [200, 200, 200, 401, 401]
    assert results[0][1] == b"xxx"
    text = (out + err).decode()
    assert text.count("status=401") == 2, text
    for secret in (TOKEN, *(t.rsplit("-", 1)[1] for t in (token_a, token_b, token_bad))):
        assert secret not in text, secret
