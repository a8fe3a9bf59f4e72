"""
Parity with the Go ingress, table by table.

The rows below are the cases of the Go ingress's own test tables
(alibaba/OpenSandbox C{components/ingress}, read at commit
L{UPSTREAM_COMMIT}), restated for this implementation: route parsing in
host, header and URI form; the access matrix with and without secure
access, in header and URI mode; port, expiry, signature and key formats;
agent-sandbox name candidates and provider readiness.  Each row names the
upstream file and test (or, for behaviour no upstream test pins, the
function) it comes from.  Every row runs through the pure functions; the
rows marked C{e2e} also run through a real ingress on loopback, and the
three cases of issue 16 run through a real C{twistd} process in both
modes.

Where this implementation deliberately answers differently, the row says
what upstream answers (C{upstream=}) and L{DIFFERENCES} lists the
difference with the tests that pin our side; README's "Differences from
the Go ingress" table must list exactly those (L{test_readme_lists_every_difference}).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from opensandbox_ingress import IngressService
from opensandbox_ingress.config import ConfigError, parse_secure_access_keys
from opensandbox_ingress.errors import (
    AccessExpired,
    IngressError,
    ProviderError,
    RouteInvalid,
    SandboxAmbiguous,
    SandboxNotFound,
    SandboxNotReady,
    SignatureInvalid,
    Unauthorized,
    VerifierNotConfigured,
)
from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry
from opensandbox_ingress.routing import Route, parse_header_route, parse_uri_route
from opensandbox_ingress.secure_access import (
    SignedPart,
    canonical_bytes,
    check_access,
    decode_b36,
    encode_b36,
    is_expires_b36,
    is_signature,
    sign,
    signature_hex8,
    verify_signed_route,
)
from opensandbox_ingress.sources.agentsandbox import (
    dns1035_name,
    name_candidates,
    record_from_agentsandbox,
)
from opensandbox_ingress.sources.batchsandbox import record_from_batchsandbox
from tests._kube_helpers import agentsandbox, batchsandbox
from tests.backend import Backend
from tests.helpers import header, ingress_url, request, start_ingress, wait_until, write_sandboxes
from tests.processes import (
    REPO,
    free_port,
    http_get,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)

#: The upstream revision these tables were read from.
UPSTREAM_COMMIT = "4db3a993c6a7c5c6e0c7cbb202e307fe9582762f"

# Upstream files, relative to components/ingress.
SIG_TEST = "pkg/signature/signature_test.go"
SIG_GO = "pkg/signature/signature.go"
ACCESS_GO = "pkg/signature/ingress_access.go"
PARSE_TEST = "pkg/proxy/host_route_parse_test.go"
PARSE_GO = "pkg/proxy/host_route_parse.go"
HOST_GO = "pkg/proxy/host.go"
ERRORS_GO = "pkg/proxy/errors.go"
MATRIX_TEST = "pkg/proxy/host_access_matrix_test.go"
SECURE_TEST = "pkg/proxy/host_secure_test.go"
AGENT_TEST = "pkg/sandbox/agent_sandbox_provider_test.go"
AGENT_GO = "pkg/sandbox/agent_sandbox_provider.go"
BATCH_TEST = "pkg/sandbox/batchsandbox_provider_test.go"
UPSTREAM_FILES = {
    SIG_TEST, SIG_GO, ACCESS_GO, PARSE_TEST, PARSE_GO, HOST_GO, ERRORS_GO,
    MATRIX_TEST, SECURE_TEST, AGENT_TEST, AGENT_GO, BATCH_TEST,
}  # fmt: skip
#: Issue 16 restates three upstream behaviours; rows from it cite both.
ISSUE_16 = "issue 16"


def cite(path: str, name: str) -> str:
    """C{file:TestName[/subtest]} (or C{file:function}) of one upstream case."""
    assert path in UPSTREAM_FILES, path
    return f"{path}:{name}"


NOW = int(time.time())
#: Upstream's matrix signs routes valid for two more hours.
FUTURE = NOW + 7200
UINT64_MAX = 2**64 - 1


# == 1. route parsing ===============================================================

#: (sandbox id, port, expires_b36, signature, forwarded path); None = 400.
Parsed = tuple[str, int, "str | None", "str | None", str]


@dataclass(frozen=True)
class TokenRow:
    """A header/Host routing token and what it parses to (request path C{/p?q})."""

    source: str
    token: str
    expect: Parsed | None


TOKEN_ROWS = [
    TokenRow(
        cite(SIG_TEST, "TestParseRouteToken_RightSplit"),
        "alpha-beta-8080-1a2b3c-abcdef12k",
        ("alpha-beta", 8080, "1a2b3c", "abcdef12k", "/p?q"),
    ),
    TokenRow(
        cite(SIG_TEST, "TestParseRouteToken_RightSplit"),
        "sandbox-8080",
        ("sandbox", 8080, None, None, "/p?q"),
    ),
    TokenRow(cite(SIG_TEST, "TestParseRouteToken_RightSplit"), "only-two", None),
    # Signed parse refuses 08080; the unsigned fallback's port is the signature.
    TokenRow(cite(SIG_TEST, "TestParseRouteToken_LeadingZeroPort"), "sb-08080-0-abcdef12k", None),
    TokenRow(
        cite(MATRIX_TEST, "TestMatrix_NoAccessVerification_Header/legacy two segment no header"),
        "nosec-8080",
        ("nosec", 8080, None, None, "/p?q"),
    ),
    TokenRow(
        cite(MATRIX_TEST, "TestMatrix_AccessRequired_Header/signed host bad HMAC no header"),
        "sec-7777-1a2b3c-aabbccddk",
        ("sec", 7777, "1a2b3c", "aabbccddk", "/p?q"),
    ),
    TokenRow(
        cite(SECURE_TEST, "TestGetSandboxHostDefinition_HeaderSecureHeaderBypassSignedShape"),
        "gamma-7777-0-aabbccdd1",
        ("gamma", 7777, "0", "aabbccdd1", "/p?q"),
    ),
    TokenRow(
        cite(SECURE_TEST, "TestGetSandboxHostDefinition_HeaderSecureHeaderBypassLegacy"),
        "mysb-9090",
        ("mysb", 9090, None, None, "/p?q"),
    ),
    # The fallback of parseHostRoute: last '-' segment is the port (strconv.Atoi).
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "a-b-8080", ("a-b", 8080, None, None, "/p?q")),
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "sb-08080", ("sb", 8080, None, None, "/p?q")),
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "sbx--80", ("sbx-", 80, None, None, "/p?q")),
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "-a-8080", None),
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "sb-abc", None),
    TokenRow(cite(PARSE_GO, "parseHostRoute"), "sb", None),
    TokenRow(cite(HOST_GO, "getSandboxHostDefinition"), "sb-0", None),
    # Issue 16's URI example in header form: the uppercase expiry makes it
    # unsigned, and then the port is the signature.
    TokenRow(f"{ISSUE_16}; " + cite(PARSE_GO, "parseHostRoute"), "sec-8080-ABC-aabbccddk", None),
    TokenRow(cite(SIG_GO, "ParseRouteToken"), "sb-8080-x2qxvk-614adede", None),
    TokenRow(
        cite(SIG_GO, "ParseRouteToken"),
        "-a-8080-x2qxvk-614adedea",
        ("-a", 8080, "x2qxvk", "614adedea", "/p?q"),
    ),
]


def _parsed(route: Route) -> Parsed:
    signed = route.signed
    return (
        route.sandbox_id,
        route.port,
        signed.expires_b36 if signed else None,
        signed.signature if signed else None,
        route.path.decode("latin-1"),
    )


def _rows(rows: list[Any]) -> list[Any]:
    return [
        pytest.param(row, id=f"{i}:{row.source.rsplit(':', 1)[-1]}") for i, row in enumerate(rows)
    ]


@pytest.mark.parametrize("form", ["host", "header", "deprecated-header"])
@pytest.mark.parametrize("row", _rows(TOKEN_ROWS))
def test_token_rows(row: TokenRow, form: str) -> None:
    """Upstream's host-label table, in each place a token may come from."""
    token = row.token.encode()
    if form == "host":
        args = (None, None, token + b".gw.example.com")
    elif form == "header":
        args = (token, None, b"ingress.example.com")
    else:
        args = (None, token, b"ingress.example.com")
    if row.expect is None:
        with pytest.raises(RouteInvalid):
            parse_header_route(*args, b"/p?q")
        return
    assert _parsed(parse_header_route(*args, b"/p?q")) == row.expect


@dataclass(frozen=True)
class UriRow:
    """A URI-mode request target and its readings: for a sandbox that requires
    secure access, and for one that does not (None = 400)."""

    source: str
    target: str
    secure: Parsed | None
    open: Parsed | None


URI_ROWS = [
    UriRow(
        cite(PARSE_TEST, "TestParseURIRoute_TwoSegmentsNoSignature"),
        "/my-sandbox/8080",
        ("my-sandbox", 8080, None, None, "/"),
        ("my-sandbox", 8080, None, None, "/"),
    ),
    UriRow(
        cite(PARSE_TEST, "TestParseURIRoute_LegacyLeadingZeroPortRejected"), "/sb/08080", None, None
    ),
    UriRow(
        cite(PARSE_TEST, "TestParseURIRoute_OSEPFourSegmentsWithSig"),
        "/sb/9090/1a2b3c/01234567a/extra/path",
        ("sb", 9090, "1a2b3c", "01234567a", "/extra/path"),
        # host.go re-parses the path with parseURILegacy for an open sandbox.
        ("sb", 9090, None, None, "/1a2b3c/01234567a/extra/path"),
    ),
    UriRow(
        cite(MATRIX_TEST, "TestMatrix_NoAccessVerification_URI/legacy path no extra header"),
        "/nosec/3000/v1/status",
        ("nosec", 3000, None, None, "/v1/status"),
        ("nosec", 3000, None, None, "/v1/status"),
    ),
    UriRow(
        cite(MATRIX_TEST, "TestMatrix_AccessRequired_URI/legacy two segment no credentials -> 401"),
        "/sec/5000/only/legacy",
        ("sec", 5000, None, None, "/only/legacy"),
        ("sec", 5000, None, None, "/only/legacy"),
    ),
    UriRow(
        cite(SECURE_TEST, "TestGetSandboxHostDefinition_URISecureHeaderBypass"),
        "/d-e/3000/0/cafebabe0/api/x",
        ("d-e", 3000, "0", "cafebabe0", "/api/x"),
        ("d-e", 3000, None, None, "/0/cafebabe0/api/x"),
    ),
    # Issue 16, case 2: not all valid -> unsigned for every sandbox.
    UriRow(
        f"{ISSUE_16}; " + cite(PARSE_GO, "parseURIRoute"),
        "/sec/8080/ABC/aabbccddk/x",
        ("sec", 8080, None, None, "/ABC/aabbccddk/x"),
        ("sec", 8080, None, None, "/ABC/aabbccddk/x"),
    ),
    UriRow(
        cite(PARSE_GO, "parseURIRoute"),
        "/sb/80/x2qxvk/614adede/y?q=1",
        ("sb", 80, None, None, "/x2qxvk/614adede/y?q=1"),
        ("sb", 80, None, None, "/x2qxvk/614adede/y?q=1"),
    ),
    UriRow(
        cite(PARSE_GO, "parseURIRoute"),
        "/sb/80/x2qxvk/614adedea?q=1",
        ("sb", 80, "x2qxvk", "614adedea", "/?q=1"),
        ("sb", 80, None, None, "/x2qxvk/614adedea?q=1"),
    ),
    UriRow(cite(PARSE_GO, "parseURIRoute"), "/sb/08080/0/abcdef12k", None, None),
    UriRow(cite(PARSE_GO, "parseURILegacy"), "/sb", None, None),
    UriRow(cite(PARSE_GO, "parseURILegacy"), "//80/x", None, None),
    UriRow(cite(PARSE_GO, "parseURILegacy"), "/sb/0/x", None, None),
]


@pytest.mark.parametrize("row", _rows(URI_ROWS))
def test_uri_rows(row: UriRow) -> None:
    """Upstream's URI table: the secure reading and the open sandbox's re-parse."""
    if row.secure is None:
        with pytest.raises(RouteInvalid):
            parse_uri_route(row.target.encode())
        return
    route = parse_uri_route(row.target.encode())
    assert _parsed(route.for_sandbox(True)) == row.secure
    assert _parsed(route.for_sandbox(False)) == row.open


# == 2. formats ======================================================================


@pytest.mark.parametrize(
    ("text", "port", "upstream"),
    [
        ("1", 1, 1),
        ("8080", 8080, 8080),
        ("65535", 65535, 65535),
        ("0", None, None),
        ("65536", None, None),
        ("08080", None, None),
        ("00", None, None),
        ("abc", None, None),
        ("", None, None),
        ("-1", None, None),
        # strconv.Atoi accepts a sign; a port here is ASCII digits only.
        ("+80", None, 80),
    ],
)
def test_port_segment(text: str, port: int | None, upstream: int | None) -> None:
    """signature.go ParsePortSegment (signed ports, URI ports): no leading zeros, 1..65535."""
    target = f"/sb/{text}/x".encode()
    if port is None:
        with pytest.raises(RouteInvalid):
            parse_uri_route(target)
    else:
        assert parse_uri_route(target).port == port
    # The difference (the '+'), documented as "Port syntax".
    if upstream != port:
        assert "Port syntax" in DIFFERENCE_KEYS


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1a2b3c", int("1a2b3c", 36)),
        ("x2qxvk", 2_000_000_000),
        # TestVerifySignature_ExpiryComparisonAvoidsUint64Overflow: FormatUint(^uint64(0), 36).
        ("3w5e11264sgsf", UINT64_MAX),
        ("3w5e11264sgsg", None),
        ("00", None),
        ("0x2qxvk", None),
        ("X2QXVK", None),
        ("x2qXvk", None),
        ("", None),
        ("1" * 14, None),
        ("x-y", None),
        ("é", None),
    ],
)
def test_expires_b36(text: str, value: int | None) -> None:
    """signature.go ParseExpiresB36: lowercase base 36, 1..13 chars, no leading zero, uint64."""
    assert is_expires_b36(text) is (value is not None)
    if value is not None:
        assert decode_b36(text) == value
        assert encode_b36(value) == text
    else:
        with pytest.raises(ValueError):
            decode_b36(text)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("abcdef12k", True),
        ("01234567a", True),
        ("aabbccdd1", True),
        ("cafebabe0", True),
        ("614ADEDEa", False),
        ("614adedeA", False),
        ("614adede", False),
        ("614adedeaz", False),
        ("g14adedea", False),
        ("614adede-", False),
    ],
)
def test_signature_format(text: str, valid: bool) -> None:
    """signature.go ValidateSignatureFormat: 8 lowercase hex + one key id [0-9a-z]."""
    assert is_signature(text) is valid


def test_inner_and_expected_hex8() -> None:
    """signature_test.go TestInnerAndExpectedHex8: the canonical string, and 8 lowercase hex."""
    canonical = canonical_bytes("sb", 42, "0")
    assert canonical == b"v1\nshort\nsb\n42\n0\n"
    hex8 = signature_hex8(b"\x01\x02\x03", "sb", 42, "0")
    assert re.fullmatch("[0-9a-f]{8}", hex8)
    # The length-prefixed layout, built independently of the implementation.
    inner = len(b"\x01\x02\x03").to_bytes(4, "big") + b"\x01\x02\x03"
    inner += len(canonical).to_bytes(4, "big") + canonical
    assert hex8 == hashlib.sha256(inner).hexdigest()[:8]


def test_verify_signature_ok_and_401() -> None:
    """signature_test.go TestVerifySignature_OKAnd401."""
    secret, keys = b"test-secret-bytes", {"z": b"test-secret-bytes"}
    part = sign(secret, "z", "my-sandbox", 9000, NOW + 3600)
    verify_signed_route(keys, "my-sandbox", 9000, part, NOW)
    with pytest.raises(Unauthorized):
        zeros = SignedPart(part.expires_b36, "00000000z")
        verify_signed_route(keys, "my-sandbox", 9000, zeros, NOW)
    with pytest.raises(SignatureInvalid):
        too_long = SignedPart(part.expires_b36, part.signature[:8] + "zz")
        verify_signed_route(keys, "my-sandbox", 9000, too_long, NOW)


def test_verify_signature_expiry_avoids_uint64_overflow() -> None:
    """signature_test.go TestVerifySignature_ExpiryComparisonAvoidsUint64Overflow."""
    part = sign(b"test-secret-bytes", "z", "my-sandbox", 9000, UINT64_MAX)
    verify_signed_route({"z": b"test-secret-bytes"}, "my-sandbox", 9000, part, NOW)


def test_expiry_is_whole_seconds() -> None:
    """signature.go VerifySignature: expired when time.Now().Unix() > expires."""
    part = sign(b"k", "a", "sb", 80, NOW)
    verify_signed_route({"a": b"k"}, "sb", 80, part, NOW + 0.999)
    with pytest.raises(AccessExpired):
        verify_signed_route({"a": b"k"}, "sb", 80, part, NOW + 1)


AB_CD = base64.b64encode(b"\xab\xcd").decode()
ABCD = {"k": b"\xab\xcd"}
STRICTER = "Stricter `--secure-access-keys`"


@pytest.mark.parametrize(
    ("source", "flag", "keys", "upstream"),
    [
        (cite(SIG_TEST, "TestParseKeys"), f"k={AB_CD}", ABCD, "same"),
        (cite(SIG_TEST, "TestParseKeys"), f"K={AB_CD}", None, "same"),
        # ParseKeys("") fails upstream, but main.go never calls it for an
        # empty flag: no verifier either way.
        (cite(SIG_TEST, "TestParseKeys"), "", {}, "same"),
        (cite(SIG_GO, "ParseKeys"), f"ab={AB_CD}", None, "same"),
        (cite(SIG_GO, "ParseKeys"), "k=", None, "same"),
        (cite(SIG_GO, "ParseKeys"), "k=!!", None, "same"),
        (cite(SIG_GO, "ParseKeys"), f" k = {AB_CD} ,z={AB_CD}", {**ABCD, "z": b"\xab\xcd"}, "same"),
        (cite(SIG_GO, "ParseKeys"), f"k=base64:{AB_CD}", ABCD, "`base64:` key prefix"),
        (cite(SIG_GO, "ParseKeys"), f"k={AB_CD},,z={AB_CD}", None, STRICTER),
        (cite(SIG_GO, "ParseKeys"), f"k={AB_CD},k={AB_CD}", None, STRICTER),
    ],
)
def test_secure_access_keys(
    source: str, flag: str, keys: dict[str, bytes] | None, upstream: str
) -> None:
    """signature.go ParseKeys: id=BASE64, one-character lowercase id, non-empty secret."""
    if upstream != "same":
        assert upstream in DIFFERENCE_KEYS
    if keys is None:
        with pytest.raises(ConfigError):
            parse_secure_access_keys(flag)
    else:
        assert dict(parse_secure_access_keys(flag)) == keys


@pytest.mark.parametrize(
    ("source", "error", "status"),
    [
        (cite(SIG_TEST, "TestHTTPStatusForErr"), Unauthorized, 401),
        (cite(SIG_TEST, "TestHTTPStatusForErr"), AccessExpired, 401),
        (cite(SIG_TEST, "TestHTTPStatusForErr"), SignatureInvalid, 400),
        (cite(SIG_TEST, "TestHTTPStatusForErr"), RouteInvalid, 400),
        (cite(SIG_TEST, "TestHTTPStatusForErr"), VerifierNotConfigured, 503),
        (cite(ERRORS_GO, "providerErrHTTPStatus"), SandboxNotFound, 404),
        (cite(ERRORS_GO, "providerErrHTTPStatus"), SandboxNotReady, 503),
        (cite(ERRORS_GO, "providerErrHTTPStatus"), SandboxAmbiguous, 502),
        (cite(ERRORS_GO, "providerErrHTTPStatus"), ProviderError, 502),
    ],
)
def test_error_statuses(source: str, error: type[IngressError], status: int) -> None:
    """Upstream's error-to-status mapping."""
    assert error.status == status


# == 3. the access matrix =============================================================

#: Mints the signed segments (expires_b36, signature) for (sandbox, port).
Mint = Callable[[str, int], "tuple[str, str]"]


def minted(
    secret: bytes, key_id: str, expires: int = FUTURE, expires_b36: str | None = None
) -> Mint:
    """Segments signed with C{secret} under C{key_id} for the route's own id and port."""

    def mint(sandbox: str, port: int) -> tuple[str, str]:
        exp = expires_b36 if expires_b36 is not None else encode_b36(expires)
        return exp, signature_hex8(secret, sandbox, port, exp) + key_id

    return mint


def literal(expires_b36: str, signature: str) -> Mint:
    """Fixed segments (a bad HMAC, or a malformed expiry)."""
    return lambda sandbox, port: (expires_b36, signature)


ANNOT_TOKEN = "annot-token"
ANNOT_SECRET = "annot-secret"
#: The sandboxes of upstream's matrix (staticEndpointProvider, routeTestProvider),
#: plus an open one and a not-ready secure one for issue 16.
SANDBOXES: list[dict[str, Any]] = [
    {"name": "nosec", "endpoint": "127.0.0.1"},
    {"name": "sec", "endpoint": "127.0.0.1", "secure_access_token": ANNOT_TOKEN},
    {"name": "gamma", "endpoint": "127.0.0.1", "secure_access_token": ANNOT_SECRET},
    {"name": "mysb", "endpoint": "127.0.0.1", "secure_access_token": ANNOT_SECRET},
    {"name": "d-e", "endpoint": "127.0.0.1", "secure_access_token": ANNOT_SECRET},
    {"name": "sb", "endpoint": "127.0.0.1"},
    {
        "name": "starting",
        "endpoint": "127.0.0.1",
        "ready": False,
        "secure_access_token": ANNOT_TOKEN,
    },
]

Keys = tuple[tuple[str, bytes], ...]
K_NOSEC_H: Keys = (("a", b"\x5e\x5e\x5e\x5e"),)
K_NOSEC_U: Keys = (("a", b"\x1a\x1a\x1a\x1a"),)
K_SEC_H: Keys = (("k", b"\x70\x71\x72\x73"),)
K_SEC_U: Keys = (("a", b"\x9a\x9b\x9c\x9d"),)
K_GAMMA: Keys = (("k", b"ingress-test-secret"),)
K_DE: Keys = (("a", b"uri-mode-secret"),)

OK = (200, None)
E401 = (401, "unauthorized")
E400 = (400, "route_invalid")
E503 = (503, "verifier_not_configured")
NOT_READY = (503, "sandbox_not_ready")


@dataclass(frozen=True)
class Access:
    """
    One request of the access matrix.

    In header mode the token C{{sandbox}-{port}[-{expires}-{signature}]} goes
    in C{Host} (as upstream's matrix sends it) and C{rest} is the path; in
    URI mode the target is C{/{sandbox}/{port}[/{expires}/{signature}]{rest}}.
    C{backend} is the path the sandbox receives when allowed (C{{seg}}
    stands for C{/{expires}/{signature}}); C{upstream} is the Go ingress's
    status where it differs, and C{difference} the README row saying why.
    """

    source: str
    mode: Literal["header", "uri"]
    sandbox: str
    port: int
    segments: Mint | None = None
    rest: str = "/"
    secure_header: str | None = None
    keys: Keys = ()
    expect: tuple[int, str | None] = OK
    backend: str | None = None
    upstream: int | None = None
    difference: str | None = None
    e2e: bool = False
    #: Written before the port (issue 16's C{08080}).
    port_prefix: str = ""

    def target(self, port: int) -> tuple[str, dict[str, str]]:
        """The request path and headers for this row with the sandbox on C{port}."""
        segments = self.segments(self.sandbox, port) if self.segments else ()
        headers: dict[str, str] = {}
        if self.secure_header is not None:
            headers["OpenSandbox-Secure-Access"] = self.secure_header
        port_text = self.port_prefix + str(port)
        if self.mode == "header":
            headers["Host"] = "-".join([self.sandbox, port_text, *segments]) + ".gw"
            return self.rest, headers
        headers["Host"] = "ingress.example.com"
        route = "".join(f"/{s}" for s in (self.sandbox, port_text, *segments))
        return route + (self.rest if self.rest != "/" else ""), headers

    def backend_path(self, port: int) -> str:
        """What the sandbox receives when the request is allowed."""
        if self.backend is None:
            return self.rest
        seg = "".join(f"/{s}" for s in self.segments(self.sandbox, port)) if self.segments else ""
        return self.backend.replace("{seg}", seg)


def _m(test: str, sub: str) -> str:
    return cite(MATRIX_TEST, f"{test}/{sub}")


ACCESS_ROWS = [
    # -- TestMatrix_NoAccessVerification_Header ----------------------------------
    Access(_m("TestMatrix_NoAccessVerification_Header", "legacy two segment no header"),
           "header", "nosec", 8080, keys=K_NOSEC_H, e2e=True),
    Access(_m("TestMatrix_NoAccessVerification_Header",
              "legacy two segment with OpenSandbox-Secure-Access header is ignored for routing decision"),
           "header", "nosec", 8080, secure_header="irrelevant-value", keys=K_NOSEC_H),
    Access(_m("TestMatrix_NoAccessVerification_Header",
              "legacy with header field present but empty value (no access required still ok)"),
           "header", "nosec", 8080, secure_header="", keys=K_NOSEC_H),
    Access(_m("TestMatrix_NoAccessVerification_Header",
              "signed shape four segment without header is accepted and signature not verified"),
           "header", "nosec", 8080, minted(b"\x5e\x5e\x5e\x5e", "a", expires_b36="0"),
           keys=K_NOSEC_H, e2e=True),
    # -- TestMatrix_NoAccessVerification_URI -------------------------------------
    Access(_m("TestMatrix_NoAccessVerification_URI", "legacy path no extra header"),
           "uri", "nosec", 3000, rest="/v1/status", keys=K_NOSEC_U, e2e=True),
    Access(_m("TestMatrix_NoAccessVerification_URI",
              "OSEP-shaped path re-parsed with legacy (strip must not apply)"),
           "uri", "nosec", 3000, minted(b"\x1a\x1a\x1a\x1a", "a"), rest="/extra/segment",
           keys=K_NOSEC_U, backend="{seg}/extra/segment", e2e=True),
    Access(_m("TestMatrix_NoAccessVerification_URI", "OSEP shape plus OpenSandbox-Secure-Access header"),
           "uri", "nosec", 3000, minted(b"\x1a\x1a\x1a\x1a", "a"), rest="/api",
           secure_header="noise", keys=K_NOSEC_U, backend="{seg}/api"),
    # -- TestMatrix_AccessRequired_Header ----------------------------------------
    Access(_m("TestMatrix_AccessRequired_Header", "legacy two segment no header no signature -> 401"),
           "header", "sec", 7777, keys=K_SEC_H, expect=E401, e2e=True),
    Access(_m("TestMatrix_AccessRequired_Header", "legacy two segment with correct OpenSandbox-Secure-Access only"),
           "header", "sec", 7777, secure_header=ANNOT_TOKEN, keys=K_SEC_H, e2e=True),
    Access(_m("TestMatrix_AccessRequired_Header", "legacy two segment wrong OpenSandbox-Secure-Access"),
           "header", "sec", 7777, secure_header="bad-token", keys=K_SEC_H, expect=E401),
    Access(_m("TestMatrix_AccessRequired_Header",
              "legacy header field present with empty value counts as present (401 if token required)"),
           "header", "sec", 7777, secure_header="", keys=K_SEC_H, expect=E401, e2e=True),
    Access(_m("TestMatrix_AccessRequired_Header", "signed host valid HMAC no header"),
           "header", "sec", 7777, minted(b"\x70\x71\x72\x73", "k"), keys=K_SEC_H, e2e=True),
    Access(_m("TestMatrix_AccessRequired_Header",
              "signed host valid HMAC but wrong OpenSandbox-Secure-Access is fail fast (no fallthrough)"),
           "header", "sec", 7777, minted(b"\x70\x71\x72\x73", "k", expires_b36="0"),
           secure_header="nope", keys=K_SEC_H, expect=E401),
    Access(_m("TestMatrix_AccessRequired_Header", "signed host bad HMAC no header"),
           "header", "sec", 7777, literal(encode_b36(FUTURE), "aabbccddk"), keys=K_SEC_H,
           expect=E401, e2e=True),
    Access(_m("TestMatrix_AccessRequired_Header",
              "signed host bad HMAC with correct OpenSandbox-Secure-Access passes without verifying HMAC"),
           "header", "sec", 7777, literal(encode_b36(FUTURE), "aabbccddk"),
           secure_header=ANNOT_TOKEN, keys=K_SEC_H),
    Access(_m("TestMatrix_AccessRequired_Header", "signed host valid HMAC with verifier nil -> 503"),
           "header", "sec", 7777, minted(b"\x70\x71\x72\x73", "k"), expect=E503, e2e=True),
    # -- TestMatrix_AccessRequired_URI -------------------------------------------
    Access(_m("TestMatrix_AccessRequired_URI", "legacy two segment no credentials -> 401"),
           "uri", "sec", 5000, rest="/only/legacy", keys=K_SEC_U, expect=E401, e2e=True),
    Access(_m("TestMatrix_AccessRequired_URI", "legacy with correct OpenSandbox-Secure-Access only"),
           "uri", "sec", 5000, rest="/only/legacy", secure_header=ANNOT_TOKEN, keys=K_SEC_U),
    Access(_m("TestMatrix_AccessRequired_URI", "signed URI valid HMAC no header"),
           "uri", "sec", 5000, minted(b"\x9a\x9b\x9c\x9d", "a"), rest="/p/q", keys=K_SEC_U, e2e=True),
    Access(_m("TestMatrix_AccessRequired_URI", "signed URI valid HMAC wrong OpenSandbox-Secure-Access fail fast"),
           "uri", "sec", 5000, minted(b"\x9a\x9b\x9c\x9d", "a"), rest="/x", secure_header="wrong",
           keys=K_SEC_U, expect=E401),
    Access(_m("TestMatrix_AccessRequired_URI", "signed URI bad HMAC no header"),
           "uri", "sec", 5000, literal(encode_b36(FUTURE), "badbadbaa"), rest="/ok", keys=K_SEC_U,
           expect=E401, e2e=True),
    Access(_m("TestMatrix_AccessRequired_URI", "signed URI bad HMAC with good header (header path wins)"),
           "uri", "sec", 5000, literal(encode_b36(FUTURE), "badbadbaa"), rest="/ok",
           secure_header=ANNOT_TOKEN, keys=K_SEC_U),
    Access(_m("TestMatrix_AccessRequired_URI", "signed URI valid HMAC with verifier nil -> 503"),
           "uri", "sec", 5000, minted(b"\x9a\x9b\x9c\x9d", "a"), rest="/m", expect=E503, e2e=True),
    # -- host_secure_test.go -------------------------------------------------------
    Access(cite(SECURE_TEST, "TestGetSandboxHostDefinition_HeaderSecureSig"),
           "header", "gamma", 7777, minted(b"ingress-test-secret", "k", NOW + 3600), keys=K_GAMMA),
    Access(cite(SECURE_TEST, "TestGetSandboxHostDefinition_HeaderSecureHeaderBypassSignedShape"),
           "header", "gamma", 7777, literal("0", "aabbccdd1"), secure_header=ANNOT_SECRET, e2e=True),
    Access(cite(SECURE_TEST, "TestGetSandboxHostDefinition_HeaderSecureHeaderBypassLegacy"),
           "header", "mysb", 9090, secure_header=ANNOT_SECRET),
    Access(cite(SECURE_TEST, "TestGetSandboxHostDefinition_URISecureSig"),
           "uri", "d-e", 3000, minted(b"uri-mode-secret", "a", NOW + 3600), rest="/api/x", keys=K_DE,
           e2e=True),
    Access(cite(SECURE_TEST, "TestGetSandboxHostDefinition_URISecureHeaderBypass"),
           "uri", "d-e", 3000, literal("0", "cafebabe0"), rest="/api/x", secure_header=ANNOT_SECRET),
    # -- issue 16 -------------------------------------------------------------------
    # 1. A signed-shaped token whose port has a leading zero is unsigned: 400.
    Access(f"{ISSUE_16}; " + cite(SIG_TEST, "TestParseRouteToken_LeadingZeroPort"),
           "header", "sb", 8080, literal("0", "abcdef12k"), expect=E400, e2e=True,
           port_prefix="0"),
    Access(f"{ISSUE_16}; " + cite(PARSE_TEST, "TestParseURIRoute_LegacyLeadingZeroPortRejected"),
           "uri", "sb", 8080, literal("0", "abcdef12k"), rest="/x", expect=E400, e2e=True,
           port_prefix="0"),
    # 2. URI segments that are not all valid are path: unsigned, 401 without a credential.
    Access(f"{ISSUE_16}; " + cite(PARSE_GO, "parseURIRoute"),
           "uri", "sec", 8080, literal("ABC", "aabbccddk"), rest="/x", keys=K_SEC_U, expect=E401,
           e2e=True),
    Access(f"{ISSUE_16}; " + cite(PARSE_GO, "parseURIRoute"),
           "uri", "sec", 8080, literal("ABC", "aabbccddk"), rest="/x", secure_header=ANNOT_TOKEN,
           keys=K_SEC_U, backend="{seg}/x", e2e=True),
    Access(f"{ISSUE_16}; " + cite(PARSE_GO, "parseURIRoute"),
           "uri", "nosec", 8080, literal("ABC", "aabbccddk"), rest="/x", keys=K_SEC_U,
           backend="{seg}/x", e2e=True),
    Access(f"{ISSUE_16}; " + cite(PARSE_GO, "parseHostRoute"),
           "header", "sec", 8080, literal("ABC", "aabbccddk"), keys=K_SEC_U, expect=E400, e2e=True),
    # 3. Credentials before readiness: upstream looks the endpoint up first (503).
    Access(f"{ISSUE_16}; " + cite(HOST_GO, "getSandboxHostDefinition"),
           "header", "starting", 8080, keys=K_SEC_H, expect=E401, upstream=503,
           difference="Credentials before readiness", e2e=True),
    Access(f"{ISSUE_16}; " + cite(HOST_GO, "getSandboxHostDefinition"),
           "uri", "starting", 8080, rest="/x", keys=K_SEC_U, expect=E401, upstream=503,
           difference="Credentials before readiness", e2e=True),
    Access(f"{ISSUE_16}; " + cite(HOST_GO, "getSandboxHostDefinition"),
           "header", "starting", 8080, secure_header="wrong", keys=K_SEC_H, expect=E401,
           upstream=503, difference="Credentials before readiness"),
    Access(f"{ISSUE_16}; " + cite(HOST_GO, "getSandboxHostDefinition"),
           "header", "starting", 8080, secure_header=ANNOT_TOKEN, keys=K_SEC_H, expect=NOT_READY,
           e2e=True),
    Access(f"{ISSUE_16}; " + cite(HOST_GO, "getSandboxHostDefinition"),
           "uri", "starting", 8080, minted(b"\x9a\x9b\x9c\x9d", "a"), rest="/x", keys=K_SEC_U,
           expect=NOT_READY, e2e=True),
]  # fmt: skip


def _registry() -> SandboxRegistry:
    registry = SandboxRegistry()
    registry.replace_all(
        SandboxRecord(
            name=s["name"],
            endpoint=s["endpoint"],
            ready=s.get("ready", True),
            secure_access_token=s.get("secure_access_token"),
        )
        for s in SANDBOXES
    )
    return registry


def decide(row: Access, port: int) -> tuple[tuple[int, str | None], Route | None]:
    """
    The ingress's decision for C{row}, from the pure functions in the order the
    proxy applies them: route, lookup, the sandbox's reading of the route,
    credentials, readiness.
    """
    path, headers = row.target(port)
    secure = headers.get("OpenSandbox-Secure-Access")
    try:
        if row.mode == "uri":
            route = parse_uri_route(path.encode())
        else:
            route = parse_header_route(None, None, headers["Host"].encode(), path.encode())
        record = _registry().lookup(route.sandbox_id)
        route = route.for_sandbox(record.secure_access_token is not None)
        check_access(
            record.secure_access_token,
            None if secure is None else [secure.encode()],
            dict(row.keys),
            route.sandbox_id,
            route.port,
            route.signed,
            time.time(),
        )
        record.require_ready()
    except IngressError as e:
        return (e.status, e.code), None
    return OK, route


def _access_id(index: int, row: Access) -> str:
    return f"{index}:{row.mode}:{row.source.rsplit(':', 1)[-1].rsplit('/', 1)[-1][:60]}"


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=_access_id(i, r)) for i, r in enumerate(ACCESS_ROWS)]
)
def test_access_matrix(row: Access) -> None:
    """One row of upstream's access matrix through the pure functions."""
    status, route = decide(row, row.port)
    assert status == row.expect
    if route is not None:
        assert route.sandbox_id == row.sandbox
        assert route.port == row.port
        assert route.path.decode() == row.backend_path(row.port)
    if row.upstream is not None:
        assert row.upstream != row.expect[0]
        assert row.difference in DIFFERENCE_KEYS
    else:
        assert row.difference is None


# == 4. providers ======================================================================


def _suffix(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("source", "sandbox_id", "name"),
    [
        (cite(AGENT_TEST, "TestToDNS1035Label_HashOnSymbolOnlyIDs"), "!!!", f"sandbox-{_suffix('!!!')}"),
        (cite(AGENT_TEST, "TestToDNS1035Label_HashOnSymbolOnlyIDs"), "???", f"sandbox-{_suffix('???')}"),
        (cite(AGENT_TEST, "TestToDNS1035Label_PrefixesDigitStart"), "1234", "sandbox-1234"),
        (cite(AGENT_GO, "toDNS1035Label"), "  My_Box.v2  ", "my-box-v2"),
        (cite(AGENT_GO, "toDNS1035Label"), "a--b__c", "a-b-c"),
        (cite(AGENT_GO, "toDNS1035Label"), "-x-", "x"),
    ],
)
def test_dns1035_label(source: str, sandbox_id: str, name: str) -> None:
    """agent_sandbox_provider.go toDNS1035Label."""
    assert dns1035_name(sandbox_id) == name


def test_dns1035_truncates_with_hash_suffix() -> None:
    """agent_sandbox_provider_test.go TestToDNS1035Label_TruncatesWithHashSuffix."""
    value = "A" + "b" * 100
    name = dns1035_name(value)
    assert len(name) <= 63
    assert re.fullmatch("[a-z][a-z0-9-]*", name)
    assert name == "a" + "b" * 53 + "-" + _suffix(value)


@pytest.mark.parametrize(
    ("sandbox_id", "candidates"),
    [
        ("demo", ["demo", "sandbox-demo"]),
        # The legacy name equals the DNS-1035 one: tried once.
        ("1234", ["sandbox-1234", "1234"]),
        ("sandbox-abc", ["sandbox-abc"]),
        ("My_Box", ["my-box", "My_Box", "sandbox-My_Box"]),
        ("!!!", [f"sandbox-{_suffix('!!!')}", "!!!", "sandbox-!!!"]),
    ],
)
def test_name_candidates(sandbox_id: str, candidates: list[str]) -> None:
    """agent_sandbox_provider.go resourceNameCandidates: DNS-1035 form, the id, sandbox-{id}."""
    assert name_candidates(sandbox_id) == candidates


#: The namespace of the provider rows (upstream's "test-namespace").
NS = "test-namespace"


@pytest.mark.parametrize(
    ("source", "obj", "endpoint", "token"),
    [
        (cite(BATCH_TEST, "TestBatchSandboxProvider_WithFakeInformer/GetEndpoint from ready sandbox"),
         batchsandbox("ready-sandbox", NS, ready=2, endpoints=["10.0.0.1", "10.0.0.2"]), "10.0.0.1", None),
        (cite(BATCH_TEST, "TestBatchSandboxProvider_WithFakeInformer/GetEndpoint from not ready sandbox"),
         batchsandbox("not-ready-sandbox", NS, ready=0, endpoints=None), None, None),
        (cite(BATCH_TEST, "TestBatchSandboxProvider_WithFakeInformer/GetEndpoint with non-empty access-token"),
         batchsandbox("secure-sb", NS, endpoints=["10.0.0.1"], token="opaque"), "10.0.0.1", "opaque"),
        (cite(BATCH_TEST, "TestBatchSandboxProvider_MissingAnnotation"),
         batchsandbox("no-annotation-sandbox", NS, endpoints=None), None, None),
        (cite(BATCH_TEST, "TestBatchSandboxProvider_InvalidAnnotation"),
         batchsandbox("invalid-annotation-sandbox", NS, raw_endpoints="invalid-json"), None, None),
        (cite(BATCH_TEST, "TestBatchSandboxProvider_GetEndpointNonNotFoundError"),
         batchsandbox("missing-endpoint-sandbox", NS, endpoints=["10.0.0.1"]), "10.0.0.1", None),
        (cite(AGENT_TEST, "TestAgentSandboxProvider_GetEndpoint_ServiceFQDN"),
         agentsandbox("demo", NS, fqdn="sandbox.demo.svc.cluster.local"),
         "sandbox.demo.svc.cluster.local", None),
        (cite(AGENT_TEST, "TestAgentSandboxProvider_GetEndpoint_NoServiceFQDN"),
         agentsandbox("demo", NS, ready=None, fqdn=None), None, None),
        (cite(AGENT_TEST, "TestAgentSandboxProvider_GetEndpoint_NotReadyCondition"),
         agentsandbox("demo", NS, ready="False", fqdn="sandbox.demo.svc.cluster.local"), None, None),
    ],
)  # fmt: skip
def test_provider_records(
    source: str, obj: dict[str, Any], endpoint: str | None, token: str | None
) -> None:
    """Upstream's provider tables: ready with the first endpoint (or FQDN), or not ready."""
    convert = record_from_agentsandbox if obj["kind"] == "Sandbox" else record_from_batchsandbox
    record = convert(obj)
    assert record.secure_access_token == token
    if endpoint is None:
        assert not record.ready
        with pytest.raises(SandboxNotReady) as e:
            record.require_ready()
        # Error bodies name the sandbox, never its namespace (upstream: ns/name).
        assert NS not in e.value.reason
    else:
        assert record.ready
        assert record.require_ready() == endpoint


def test_ambiguous_across_namespaces() -> None:
    """*_provider_test.go TestAgentSandboxProvider_GetEndpoint_AmbiguousAcrossNamespaces
    and TestBatchSandboxProvider_GetEndpoint_AmbiguousAcrossNamespaces (--all-namespaces)."""
    registry = SandboxRegistry()
    registry.replace_all(
        record_from_batchsandbox(batchsandbox("shared-id", ns)) for ns in ("ns-a", "ns-b")
    )
    with pytest.raises(SandboxAmbiguous) as e:
        registry.lookup("shared-id")
    assert e.value.status == 502
    assert "ns-a" in e.value.reason and "ns-b" in e.value.reason


# == 5. through the running ingress =====================================================


class _Echo(Resource):
    """A sandbox that answers every path with what it received."""

    isLeaf = True

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def render(self, request: Request) -> bytes:
        self.backend.requests += 1
        seen = {"uri": request.uri.decode("latin-1")}
        self.backend.seen.append(seen)
        return json.dumps(seen).encode()


@pytest_twisted.async_yield_fixture
async def echo() -> AsyncIterator[Backend]:
    backend = Backend()
    backend.site.resource = _Echo(backend)
    backend.listen()
    yield backend
    await backend.stop()


async def _start(tmp_path: Path, mode: str, keys: Keys, **overrides: Any) -> IngressService:
    return await start_ingress(
        tmp_path, SANDBOXES, mode=mode, secure_access_keys=keys, **overrides
    )


E2E_ROWS = [pytest.param(r, id=_access_id(i, r)) for i, r in enumerate(ACCESS_ROWS) if r.e2e]


@pytest.mark.parametrize("row", E2E_ROWS)
@pytest_twisted.ensureDeferred
async def test_access_matrix_end_to_end(row: Access, tmp_path: Path, echo: Backend) -> None:
    """A representative row of the matrix through a running ingress and a real sandbox,
    signed for the sandbox's real port; the pure decision agrees."""
    port = echo.port_number
    path, headers = row.target(port)
    service = await _start(tmp_path, row.mode, row.keys)
    try:
        response, body = await request("GET", ingress_url(service, path), headers=headers)
    finally:
        await service.stopService()
    code = header(response, "OpenSandbox-Ingress-Error")
    assert (response.code, code) == row.expect, body
    assert decide(row, port)[0] == row.expect
    if row.expect == OK:
        assert json.loads(body)["uri"] == row.backend_path(port)
    else:
        assert body.startswith(b"OpenSandbox Ingress: ")
        assert echo.requests == 0


@pytest_twisted.ensureDeferred
async def test_credentials_before_readiness_with_ready_wait(tmp_path: Path, echo: Backend) -> None:
    """Under --ready-wait, a request without a valid credential for a not-ready secure
    sandbox is answered 401 at once and holds no wait; an authorised one waits and goes
    through when the sandbox turns ready."""
    port = echo.port_number
    service = await _start(tmp_path, "header", K_SEC_H, ready_wait_s=30.0)
    try:
        url = ingress_url(service, "/held")
        token = {"Host": f"starting-{port}.gw"}
        denied, body = await request("GET", url, headers=token)
        assert (denied.code, header(denied, "OpenSandbox-Ingress-Error")) == E401, body
        assert service.registry.ready_waiters == 0
        held: Deferred[Any] = ensureDeferred(
            request("GET", url, headers={**token, "OpenSandbox-Secure-Access": ANNOT_TOKEN})
        )
        await wait_until(lambda: service.registry.ready_waiters == 1, what="a held request")
        write_sandboxes(
            tmp_path / "sandboxes.json",
            [dict(s, ready=True) if s["name"] == "starting" else s for s in SANDBOXES],
        )
        response, body = await held
    finally:
        await service.stopService()
    assert response.code == 200, body
    assert json.loads(body)["uri"] == "/held"


@pytest.mark.parametrize("mode", ["header", "uri"])
def test_issue_16_cases_through_twistd(mode: str, tmp_path: Path) -> None:
    """The three cases of issue 16 through a real twistd process, in each mode."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(json.dumps(SANDBOXES))
    port = free_port()
    keys = ",".join(f"{k}={base64.b64encode(v).decode()}" for k, v in K_SEC_U)
    proc = twistd(
        [
            "--provider-type", "file", "--sandboxes-file", str(sandboxes),
            "--port", str(port), "--mode", mode, "--secure-access-keys", keys,
        ]
    )  # fmt: skip
    p = backend_port
    if mode == "header":
        cases = [
            ({"Host": f"sb-{p}.gw"}, "/download?size=3", 200),
            ({"Host": f"sb-0{p}-0-abcdef12k.gw"}, "/download?size=3", 400),
            ({"OpenSandbox-Ingress-To": f"sb-0{p}-0-abcdef12k"}, "/download?size=3", 400),
            ({"Host": f"sec-{p}-ABC-aabbccddk.gw"}, "/", 400),
            ({"Host": f"starting-{p}.gw"}, "/", 401),
            ({"Host": f"starting-{p}.gw", "OpenSandbox-Secure-Access": ANNOT_TOKEN}, "/", 503),
        ]
    else:
        cases = [
            ({}, f"/sb/{p}/download?size=3", 200),
            ({}, f"/sec/{p}/ABC/aabbccddk/x", 401),
            ({"OpenSandbox-Secure-Access": ANNOT_TOKEN}, f"/sec/{p}/ABC/aabbccddk/x", 200),
            ({}, f"/sb/0{p}/0/abcdef12k/x", 400),
            ({}, f"/starting/{p}/x", 401),
            ({"OpenSandbox-Secure-Access": ANNOT_TOKEN}, f"/starting/{p}/x", 503),
        ]
    try:
        wait_healthy(proc, port)
        got = [http_get(port, path, headers)[0] for headers, path, _ in cases]
    finally:
        stop(proc)
        stop(backend)
    assert got == [status for _, _, status in cases]


# == 6. the deliberate differences ======================================================


@dataclass(frozen=True)
class Difference:
    """
    One deliberate difference from the Go ingress.

    @ivar key: The first column of README's table, verbatim.
    @ivar upstream: What the Go ingress does (and where).
    @ivar here: What this ingress does.
    @ivar pinned_by: Tests (C{tests/module.py::test}) that pin our side.
    """

    key: str
    upstream: str
    here: str
    pinned_by: tuple[str, ...]


DIFFERENCES = [
    Difference(
        "Namespace scoping",
        "watches every namespace; --namespace is accepted and ignored",
        "watches --namespace (default opensandbox); --all-namespaces opts in",
        ("tests/test_kubernetes_source.py::test_namespace_scoping",
         "tests/test_kubernetes_source.py::test_all_namespaces_and_ambiguous_names"),
    ),
    Difference(
        "Deprecated routing header stripped",
        "proxy.go deletes OpenSandbox-Ingress-To only; OPEN-SANDBOX-INGRESS reaches the sandbox",
        "both routing headers are removed, in both directions",
        ("tests/test_proxy_http.py::test_request_headers_rewritten",),
    ),
    Difference(
        "`X-Forwarded-Proto` and `X-Forwarded-Host` on HTTP",
        "httputil.ReverseProxy with a Director adds X-Forwarded-For only",
        "adds both (keeping incoming values) on HTTP and WebSocket",
        ("tests/test_proxy_http.py::test_request_headers_rewritten",),
    ),
    Difference(
        "WebSocket handshake headers",
        "websocket.go forwards Origin, Cookie, Sec-WebSocket-Protocol, X-Forwarded-For/-Proto only",
        "every end-to-end header, Authorization included",
        ("tests/test_websocket.py::test_handshake_forwards_headers_and_returns_backend_choice",),
    ),
    Difference(
        "Every `Set-Cookie` on a WebSocket handshake",
        "websocket.go returns the first Set-Cookie of the backend's 101 (Header.Get)",
        "every Set-Cookie line",
        ("tests/test_websocket.py::test_returned_headers_keep_set_cookie_lines",
         "tests/test_websocket.py::test_handshake_forwards_headers_and_returns_backend_choice"),
    ),
    Difference(
        "WebSocket refusal",
        "websocket.go copies the backend's whole refusal (status, headers, body)",
        "the backend's status with Location/WWW-Authenticate/Retry-After and the ingress's body",
        ("tests/test_secure_access_e2e.py::test_websocket_backend_refusal_after_access_granted",),
    ),
    Difference(
        "WebSocket upgrade detection",
        "exactly Upgrade: websocket and Connection: Upgrade; otherwise tunnelled by httputil",
        "any Connection list containing upgrade, case-insensitive; relayed frame by frame",
        ("tests/test_websocket.py::test_websocket_client_library_with_keepalive_upgrade",),
    ),
    Difference(
        "WebSocket keep-alive pings",
        "none (each hop only answers pings)",
        "pings both hops every --websocket-ping-interval (30 s; 0 = off)",
        ("tests/test_websocket.py::test_keepalive_pings_reach_both_peers",),
    ),
    Difference(
        "Credentials before readiness",
        "host.go looks the endpoint up first: a not-ready secure sandbox answers 503",
        "401 without a valid credential; only an authorised request learns 503 or waits",
        ("tests/test_upstream_parity.py::test_access_matrix",
         "tests/test_upstream_parity.py::test_access_matrix_end_to_end",
         "tests/test_upstream_parity.py::test_credentials_before_readiness_with_ready_wait",
         "tests/test_upstream_parity.py::test_issue_16_cases_through_twistd"),
    ),
    Difference(
        "Error bodies without namespaces",
        "BatchSandbox 503 bodies read ns/name (ready: 0/1)",
        "404/503 bodies name the sandbox id only (the 502 ambiguity names the namespaces, as upstream)",
        ("tests/test_upstream_parity.py::test_provider_records",),
    ),
    Difference(
        "Error-code header",
        "none; httputil answers backend failures with an empty 502",
        "every response the ingress makes carries OpenSandbox-Ingress-Error and a text body",
        ("tests/test_proxy_http.py::test_error_statuses_and_codes",
         "tests/test_upstream_parity.py::test_access_matrix_end_to_end"),
    ),
    Difference(
        "`base64:` key prefix",
        "ParseKeys takes id=BASE64 only",
        "id=base64:BASE64 (the OSEP's spelling) too",
        ("tests/test_secure_access_e2e.py::test_keys_flag_accepts_both_spellings",
         "tests/test_upstream_parity.py::test_secure_access_keys"),
    ),
    Difference(
        "Stricter `--secure-access-keys`",
        "ParseKeys skips empty segments; a repeated key id silently wins",
        "both stop start-up with one line naming the segment",
        ("tests/test_secure_access_e2e.py::test_malformed_keys_stop_startup_with_one_line",
         "tests/test_upstream_parity.py::test_secure_access_keys"),
    ),
    Difference(
        "Port syntax",
        "strconv.Atoi: +80 is port 80; an unsigned host port is not bounded (70000 fails at dial)",
        "ASCII digits 1..65535, otherwise 400",
        ("tests/test_upstream_parity.py::test_port_segment",
         "tests/test_routing.py::test_parse_token_rejects"),
    ),
    Difference(
        "`Host` with a port, scheme in any case",
        "the label is cut at '.' only: Host sbx-8080:28888 is a 400; only lowercase http:// is dropped",
        "a :port or /path is cut too; HTTP:// and HTTPS:// are dropped",
        ("tests/test_routing.py::test_routing_token_precedence_and_cleanup",),
    ),
    Difference(
        "Non-ASCII routes",
        "looked up as they are (404)",
        "400 route_invalid",
        ("tests/test_routing.py::test_routing_token_rejects",
         "tests/test_routing.py::test_parse_uri_route_rejects"),
    ),
    Difference(
        "URI-mode path as sent",
        "routes on the percent-decoded path and re-encodes the rest (%2F reaches the sandbox as /)",
        "route segments are matched as sent; the rest is forwarded byte for byte",
        ("tests/test_upstream_parity.py::test_uri_path_is_not_decoded",),
    ),
    Difference(
        "`X-Forwarded-Prefix` and `Location` in URI mode",
        "neither",
        "X-Forwarded-Prefix: /{id}/{port}[/{expires}/{signature}]; root-relative Location rebased",
        ("tests/test_proxy_http.py::test_uri_mode_strips_prefix",
         "tests/test_proxy_http.py::test_uri_mode_rebases_root_relative_location"),
    ),
    Difference(
        "Health check",
        "the port opens after the cache synced; /status.ok is always 200",
        "listens at once; 503 until the first list is applied and while draining",
        ("tests/test_proxy_http.py::test_health_before_and_after_sync",),
    ),
    Difference(
        "Endpoint validation",
        "any endpoint string is pasted into the URL",
        "a BatchSandbox endpoint with whitespace, /, \\, ?, # or @ makes the sandbox not ready",
        ("tests/test_sources_records.py::test_batchsandbox_readiness",),
    ),
    Difference(
        "Renew intents during WebSocket sessions",
        "one offer per request or handshake",
        "also while messages flow (throttled), so a long session keeps its sandbox",
        ("tests/test_websocket.py::test_messages_keep_offering_renew_intents",
         "tests/test_renew_e2e.py::test_long_websocket_session_keeps_renewing"),
    ),
    Difference(
        "`observed_at` precision",
        "RFC3339Nano: up to 9 fractional digits, trailing zeros trimmed",
        "always 6 fractional digits",
        ("tests/test_renew.py::test_observed_at_is_rfc3339_utc_with_fraction",),
    ),
]  # fmt: skip
DIFFERENCE_KEYS = {d.key for d in DIFFERENCES}


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/sb/80/a%2Fb?x=%20", b"/a%2Fb?x=%20"),
        (b"/sb/80/caf%C3%A9", b"/caf%C3%A9"),
    ],
)
def test_uri_path_is_not_decoded(target: bytes, path: bytes) -> None:
    """The rest of a URI-mode path reaches the sandbox as sent; encoded route segments
    are not decoded into a route (upstream would read /sb/8%30 as port 80)."""
    assert parse_uri_route(target).path == path
    with pytest.raises(RouteInvalid):
        parse_uri_route(b"/sb/8%30/x")
    assert parse_uri_route(b"/s%62/80/x").sandbox_id == "s%62"


def test_differences_are_pinned_by_tests_that_exist() -> None:
    """Every documented difference names tests, and each of them exists."""
    assert len(DIFFERENCE_KEYS) == len(DIFFERENCES)
    for difference in DIFFERENCES:
        assert difference.pinned_by, difference.key
        for ref in difference.pinned_by:
            path, name = ref.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), ref


def _readme_difference_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Differences from the Go ingress\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has no 'Differences from the Go ingress' section"
    rows = []
    for line in match.group(1).splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append(line.split("|")[1].strip())
    return rows[1:]  # the header row


def test_readme_lists_every_difference() -> None:
    """README's table lists exactly the differences this module documents, once each."""
    rows = _readme_difference_rows()
    assert sorted(rows) == sorted(DIFFERENCE_KEYS)
