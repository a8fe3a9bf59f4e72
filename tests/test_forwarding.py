"""
The forwarding rules (opensandbox_ingress.web.forwarding), table-tested
without sockets: request rewrite, response filter, Location rebase,
failure classification, error response bytes.
"""

from __future__ import annotations

import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed

from opensandbox_ingress.errors import SandboxNotReady, UpstreamUnreachable
from opensandbox_ingress.web.forwarding import (
    DEFAULT_OPTIONS,
    ForwardOptions,
    InvalidUpstreamResponse,
    backend_authority,
    connection_tokens,
    error_response,
    forward_request_fields,
    rebase_location,
    response_fields,
    upstream_failure,
)

Pairs = list[tuple[bytes, bytes]]


def _forward(
    headers: Pairs,
    *,
    host: bytes | None = b"ingress.example",
    secure: bool = False,
    prefix: bytes = b"",
    options: ForwardOptions = DEFAULT_OPTIONS,
) -> Pairs:
    listed = connection_tokens(v for n, v in headers if n.lower() == b"connection")
    return forward_request_fields(
        headers, listed, host, b"10.0.0.9", secure, b"10.1.2.3:8080", prefix, options
    )


ADDED = [
    (b"Host", b"10.1.2.3:8080"),
    (b"X-Forwarded-For", b"10.0.0.9"),
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"ingress.example"),
]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param([(b"Accept", b"*/*")], [(b"Accept", b"*/*"), *ADDED], id="end-to-end kept"),
        pytest.param(
            [
                (b"Host", b"ingress.example"),
                (b"Connection", b"keep-alive, X-Drop"),
                (b"Keep-Alive", b"timeout=5"),
                (b"X-Drop", b"1"),
                (b"TE", b"trailers"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"3"),
                (b"Upgrade", b"h2c"),
                (b"Proxy-Authorization", b"Basic x"),
                (b"OpenSandbox-Ingress-To", b"sbx-8080"),
                (b"OPEN-SANDBOX-INGRESS", b"sbx-8080"),
                (b"OpenSandbox-Secure-Access", b"secret"),
                (b"X-Forwarded-Prefix", b"/forged"),
                (b"x-keep", b"yes"),
            ],
            [(b"x-keep", b"yes"), *ADDED],
            id="hop-by-hop, listed, framing, routing and credentials dropped",
        ),
        pytest.param(
            [(b"Cookie", b"a=1"), (b"Cookie", b"b=2")],
            [(b"Cookie", b"a=1"), (b"Cookie", b"b=2"), *ADDED],
            id="repeated fields stay separate, in order",
        ),
        pytest.param(
            [(b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2")],
            [(b"Host", b"10.1.2.3:8080"), (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 10.0.0.9"), *ADDED[2:]],
            id="X-Forwarded-For values joined, the peer appended",
        ),
        pytest.param(
            [(b"X-Forwarded-For", b"")],
            ADDED,
            id="an empty X-Forwarded-For adds nothing",
        ),
        pytest.param(
            [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"outer")],
            [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"outer"), *ADDED[:2]],
            id="the client's own X-Forwarded-Proto/-Host are kept",
        ),
        pytest.param(
            [
                (b"Connection", b"X-Forwarded-Proto, X-Forwarded-Host"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"outer"),
            ],
            ADDED,
            id="listed in Connection: the ingress's own instead",
        ),
    ],
)
def test_request_rewrite(sent: Pairs, expected: Pairs) -> None:
    """The backend sees the client's end-to-end fields, then Host and X-Forwarded-*."""
    assert _forward(sent) == expected


def test_request_rewrite_tls_prefix_and_no_host() -> None:
    """TLS says https, a URI-mode prefix is forwarded, no Host means no X-Forwarded-Host."""
    assert _forward([], host=None, secure=True, prefix=b"/sbx/8080") == [
        (b"Host", b"10.1.2.3:8080"),
        (b"X-Forwarded-For", b"10.0.0.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Prefix", b"/sbx/8080"),
    ]


def test_request_rewrite_preserve_host_option() -> None:
    """With preserve_host the backend gets the client's Host."""
    fields = _forward([], options=ForwardOptions(preserve_host=True))
    assert fields[0] == (b"Host", b"ingress.example")


@pytest.mark.parametrize(
    ("endpoint", "port", "authority"),
    [
        ("10.1.2.3", 80, b"10.1.2.3:80"),
        ("fd00::1", 8080, b"[fd00::1]:8080"),
        ("pod.svc.local", 3000, b"pod.svc.local:3000"),
    ],
)
def test_backend_authority(endpoint: str, port: int, authority: bytes) -> None:
    """IPv6 addresses are bracketed; names and IPv4 are not."""
    assert backend_authority(endpoint, port) == authority


@pytest.mark.parametrize(
    ("location", "rebased"),
    [
        (b"/login", b"/sbx/8080/login"),
        (b"/", b"/sbx/8080/"),
        (b"//other.example/x", b"//other.example/x"),
        (b"https://other.example/x", b"https://other.example/x"),
        (b"relative", b"relative"),
    ],
)
def test_location_rebase(location: bytes, rebased: bytes) -> None:
    """Only root-relative redirects go under the prefix."""
    assert rebase_location(location, b"/sbx/8080") == rebased


@pytest.mark.parametrize(
    ("received", "listed", "prefix", "date", "expected"),
    [
        pytest.param(
            [(b"Content-Type", b"text/plain"), (b"Date", b"D")],
            frozenset(),
            b"",
            b"NOW",
            [(b"Content-Type", b"text/plain"), (b"Date", b"D")],
            id="the backend's Date is kept",
        ),
        pytest.param(
            [(b"Content-Type", b"text/plain")],
            frozenset(),
            b"",
            b"NOW",
            [(b"Content-Type", b"text/plain"), (b"Date", b"NOW")],
            id="a missing Date is added",
        ),
        pytest.param(
            [(b"X", b"1")], frozenset(), b"", None, [(b"X", b"1")], id="no Date when the front-end dates"
        ),
        pytest.param(
            [
                (b"Connection", b"close, X-Secret"),
                (b"X-Secret", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"5"),
                (b"Keep-Alive", b"timeout=5"),
                (b"OpenSandbox-Secure-Access", b"leak"),
                (b"OpenSandbox-Ingress-To", b"other-1"),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ],
            frozenset({b"close", b"x-secret"}),
            b"",
            None,
            [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
            id="hop-by-hop, framing, listed, routing and credentials dropped",
        ),
        pytest.param(
            [(b"Location", b"/next")],
            frozenset(),
            b"/sbx/80",
            None,
            [(b"Location", b"/sbx/80/next")],
            id="Location rebased in URI mode",
        ),
    ],
)
def test_response_filter(
    received: Pairs, listed: frozenset[bytes], prefix: bytes, date: bytes | None, expected: Pairs
) -> None:
    """The client sees the backend's end-to-end fields, Location rebased, dated."""
    assert response_fields(received, listed, prefix, date) == expected


@pytest.mark.parametrize(
    ("failure", "timed_out", "label", "code", "message"),
    [
        (ierror.ConnectionRefusedError(), False, "connect", "upstream_unreachable", "connection refused"),
        (ierror.DNSLookupError(), False, "connect", "upstream_unreachable", "name does not resolve"),
        (ierror.TimeoutError(), False, "timeout", "upstream_timeout", "timed out"),
        (CancelledError(), True, "timeout", "upstream_timeout", "timed out"),
        (
            ResponseFailed([Failure(InvalidUpstreamResponse("bad status line"))]),
            False,
            "invalid",
            "upstream_invalid_response",
            "sent an invalid response: bad status line",
        ),
        (
            ResponseFailed([Failure(ierror.ConnectionLost("reset by peer"))]),
            False,
            "connect",
            "upstream_unreachable",
            "reset by peer",
        ),
    ],
)
def test_failure_classification(
    failure: Exception, timed_out: bool, label: str, code: str, message: str
) -> None:
    """Each backend failure before the head maps to one error and one metric label."""
    error, got = upstream_failure("10.1.2.3:80", Failure(failure), timed_out)
    assert got == label
    assert error.status == 502
    assert error.code == code
    assert str(error).startswith("upstream 10.1.2.3:80 ")
    assert message in str(error)


def test_error_response_bytes() -> None:
    """An ingress error is one complete response: status, framing, code, body."""
    error = UpstreamUnreachable("upstream x:1 unreachable: connection refused")
    raw = error_response(error, True, b"Mon, 30 Nov 2026 00:00:00 GMT")
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 502 Bad Gateway"
    assert b"Connection: close" in lines
    assert b"Date: Mon, 30 Nov 2026 00:00:00 GMT" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert b"OpenSandbox-Ingress-Error: upstream_unreachable" in lines
    assert body == error.body()


def test_error_response_carries_extra_headers() -> None:
    """A not-ready error tells the client when to retry; keep-alive omits Connection."""
    raw = error_response(SandboxNotReady("not ready", retry_after=3), False, b"D")
    assert b"\r\nRetry-After: 3\r\n" in raw
    assert b"Connection:" not in raw
