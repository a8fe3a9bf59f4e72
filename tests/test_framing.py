"""
The sans-IO framing layer (opensandbox_ingress.framing) on both parser
implementations: a table of request and response heads with the decision
and fields each must give, and differential property tests that feed the
same generated and mutated heads to llhttp and h11.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensandbox_ingress import framing
from opensandbox_ingress.framing import (
    Data,
    EndOfMessage,
    Event,
    FramingError,
    RequestHead,
    ResponseHead,
    Switched,
)

IMPLS = list(framing.IMPLEMENTATIONS)


def test_both_implementations_are_installed_on_cpython() -> None:
    """The test run covers llhttp and h11 (CPython has the httptools wheel)."""
    assert "h11" in IMPLS
    import platform

    if platform.python_implementation() == "CPython":
        assert "httptools" in IMPLS
        chosen = os.environ.get("OPENSANDBOX_INGRESS_HTTP_PARSER")
        assert framing.IMPLEMENTATION == (chosen or "httptools")


def parse_request(raw: bytes, impl: str, pieces: int = 1, **limits: int) -> list[Event]:
    """Feed C{raw} in C{pieces} roughly equal feeds; all events."""
    parser = framing.request_parser(implementation=impl, **limits)
    step = max(1, -(-len(raw) // pieces))
    events: list[Event] = []
    for i in range(0, len(raw), step):
        events += parser.feed(raw[i : i + step])
    return events


def parse_response(raw: bytes, impl: str, method: bytes = b"GET", eof: bool = True) -> list[Event]:
    parser = framing.response_parser(implementation=impl)
    parser.expect(method)
    events = parser.feed(raw)
    if eof:
        events += parser.feed_eof()
    return events


def outcome(events: list[Event]) -> object:
    """A comparable summary: the error status, or the heads and body."""
    for event in events:
        if isinstance(event, FramingError):
            return ("error", event.status)
    out: list[object] = []
    reusable = True
    for event in events:
        if isinstance(event, RequestHead):
            out.append(
                (
                    "req",
                    event.method,
                    event.target,
                    event.version,
                    [(n.lower(), v) for n, v in event.headers],
                    event.host,
                    event.content_length,
                    event.keep_alive,
                    event.upgrade,
                )
            )
        elif isinstance(event, ResponseHead):
            reusable = event.keep_alive
            out.append(
                (
                    "resp",
                    event.status,
                    event.reason,
                    [(n.lower(), v) for n, v in event.headers],
                    event.framing,
                    event.content_length,
                    event.keep_alive,
                )
            )
        elif isinstance(event, Data):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        elif isinstance(event, EndOfMessage):
            # Whether the connection may be reused: what must agree.
            out.append(("end", event.clean and reusable))
        elif isinstance(event, Switched):
            out.append(("switched", event.data))
    return out


def status_of(events: list[Event]) -> int | None:
    for event in events:
        if isinstance(event, FramingError):
            return event.status
    return None


H = b"GET / HTTP/1.1\r\nHost: a\r\n"

#: (name, raw request, expected error status or None when accepted)
REQUEST_ROWS: list[tuple[str, bytes, int | None]] = [
    ("plain GET", H + b"\r\n", None),
    ("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n", None),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Host headers", H + b"Host: b\r\n\r\n", 400),
    ("two equal Host headers", H + b"Host: a\r\n\r\n", 400),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    ("Transfer-Encoding: identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    ("Transfer-Encoding: gzip, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("chunked and identity on two lines", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", 501),
    ("chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 501),
    ("Transfer-Encoding obs-fold", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("CL and TE (CL.TE)", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE and CL (TE.CL)", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("two different Content-Lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ("two equal Content-Lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", 400),
    ("Content-Length list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\na", 400),
    ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("Content-Length with a plus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na", 400),
    ("obs-fold", H + b"X: a\r\n b\r\n\r\n", 400),
    ("bare LF in the head", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    ("bare CR in the head", b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    ("NUL in a header value", H + b"X: a\x00b\r\n\r\n", 400),
    ("0x01 in a header value", H + b"X: a\x01b\r\n\r\n", 400),
    ("DEL in a header value", H + b"X: a\x7fb\r\n\r\n", 400),
    ("space before the colon", H + b"X : y\r\n\r\n", 400),
    ("path byte 0x7f", b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("path byte 0x80", b"GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("path byte 0xff", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("no version", b"GET /\r\nHost: a\r\n\r\n", 400),
    ("asterisk without OPTIONS", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", None),
    ("absolute-form", b"GET http://sec-8080/x?y HTTP/1.1\r\nHost: sb-8080\r\n\r\n", None),
    ("absolute-form with userinfo", b"GET http://u@sec-8080/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-form, other scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("header count over 100", H + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
    ("100 headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"Host: a\r\n\r\n", None),
    ("a 64 KiB header line", H + b"X: " + b"a" * 65536 + b"\r\n\r\n", 431),
    ("head just over 16 KiB", H + b"X: " + b"a" * 16384 + b"\r\n\r\n", 431),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n", 400),
]


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_size_overflow_never_completes(impl: str) -> None:
    """A chunk size past 64 bits: llhttp refuses it (400); h11 waits for the data, so the request never ends."""
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n\r\n0\r\n\r\n"
    events = parse_request(raw, impl)
    assert not any(isinstance(e, EndOfMessage) for e in events)
    if impl == "httptools":
        assert status_of(events) == 400


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pieces", [1, 7, 10_000])
@pytest.mark.parametrize("row", REQUEST_ROWS, ids=[r[0] for r in REQUEST_ROWS])
def test_request_row(row: tuple[str, bytes, int | None], impl: str, pieces: int) -> None:
    """Each request head gets its status (or is accepted), in one feed or byte by byte."""
    _name, raw, expected = row
    events = parse_request(raw, impl, pieces=min(pieces, len(raw)))
    assert status_of(events) == expected, events
    if expected is None:
        assert any(isinstance(e, EndOfMessage) for e in events), events


#: Where llhttp takes what RFC 9112 lets a server take and h11 does not:
#: an empty line before a request (section 2.2) and several spaces between
#: the parts of the request line (section 3).  Harmless behind the
#: ingress, which writes the request line the backend gets.
_LENIENT_IN_LLHTTP = [
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("raw", _LENIENT_IN_LLHTTP)
def test_known_divergence_between_parsers(raw: bytes) -> None:
    """The one documented difference: llhttp accepts these request lines, h11 refuses them."""
    expected = {"httptools": None, "h11": 400}
    for impl in IMPLS:
        events = parse_request(raw, impl)
        assert status_of(events) == expected[impl], (impl, events)
        if expected[impl] is None:
            head = events[0]
            assert isinstance(head, RequestHead)
            assert (head.method, head.target, head.version) == (b"GET", b"/", b"1.1")


@pytest.mark.parametrize("impl", IMPLS)
def test_absolute_form_authority_replaces_host(impl: str) -> None:
    """An absolute-form target routes by its authority and forwards its path."""
    events = parse_request(b"GET http://sec-8080/x?y HTTP/1.1\r\nHost: sb-8080\r\n\r\n", impl)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.host == b"sec-8080"
    assert head.target == b"/x?y"


@pytest.mark.parametrize("impl", IMPLS)
def test_pipelined_requests_and_bodies(impl: str) -> None:
    """Pipelined requests with a length body and a chunked body come out in order."""
    raw = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n"
        b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    )
    for pieces in (1, 5, len(raw)):
        got = outcome(parse_request(raw, impl, pieces=pieces))
        assert got == [
            ("req", b"POST", b"/a", b"1.1", [(b"host", b"a"), (b"content-length", b"3")], b"a", 3, True, False),
            b"abc",
            ("end", True),
            ("req", b"POST", b"/b", b"1.1", [(b"host", b"a"), (b"transfer-encoding", b"chunked")], b"a", None, True, False),
            b"de",
            ("end", True),
            ("req", b"GET", b"/c", b"1.0", [(b"connection", b"keep-alive")], None, 0, True, False),
            ("end", True),
        ], pieces


@pytest.mark.parametrize("impl", IMPLS)
def test_upgrade_request_switches(impl: str) -> None:
    """After an upgrade request the bytes are not HTTP and come out as they are."""
    parser = framing.request_parser(implementation=impl)
    events = parser.feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00"
    )
    assert isinstance(events[0], RequestHead) and events[0].upgrade
    assert outcome(events)[1:] == [("end", True), ("switched", b"\x81\x00")]
    assert outcome(parser.feed(b"GET / HTTP/1.1\r\n")) == [("switched", b"GET / HTTP/1.1\r\n")]


@pytest.mark.parametrize("impl", IMPLS)
def test_incomplete_head_over_the_limit_is_refused_as_it_grows(impl: str) -> None:
    """A head that never ends is refused with 431 once it passes the limit, in small feeds."""
    parser = framing.request_parser(max_head_bytes=1024, implementation=impl)
    events: list[Event] = parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    assert parser.awaiting_head
    for _ in range(100):
        events += parser.feed(b"a" * 64)
    assert status_of(events) == 431


#: (name, raw response, request method, expected outcome or error status)
RESPONSE_ROWS: list[tuple[str, bytes, bytes, object]] = [
    ("length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"GET",
     [("resp", 200, b"OK", [(b"content-length", b"2")], "length", 2, True), b"hi", ("end", True)]),
    ("chunked with trailers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\nhi\r\n0\r\nT: x\r\n\r\n", b"GET",
     [("resp", 200, b"OK", [(b"transfer-encoding", b"chunked")], "chunked", None, True), b"hi", ("end", True)]),
    ("until close", b"HTTP/1.1 200 OK\r\n\r\nabc", b"GET",
     [("resp", 200, b"OK", [], "close", None, False), b"abc", ("end", False)]),
    ("HEAD keeps Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"HEAD",
     [("resp", 200, b"OK", [(b"content-length", b"1234")], "none", 1234, True), ("end", True)]),
    ("204", b"HTTP/1.1 204 No Content\r\n\r\n", b"GET",
     [("resp", 204, b"No Content", [], "none", None, True), ("end", True)]),
    ("interim 100 then 200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET",
     [("resp", 200, b"OK", [(b"content-length", b"0")], "length", 0, True), ("end", True)]),
    ("HTTP/1.0 closes", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", b"GET",
     [("resp", 200, b"OK", [(b"content-length", b"1")], "length", 1, False), b"x", ("end", False)]),
    ("extra bytes after the response", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n\r\n", b"GET",
     [("resp", 200, b"OK", [(b"content-length", b"1")], "length", 1, True), b"x", ("end", False)]),
    ("bare LF in the reason", b"HTTP/1.1 200 OK\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("bare CR in the reason", b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("0x01 in the reason", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("NUL in a header value", b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("four-digit status", b"HTTP/1.0 2000 OK\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("status 600", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("101 to a plain request", b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"GET", 502),
    ("gzip transfer coding with Content-Length", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", b"GET", 502),
    ("gzip transfer coding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", b"GET", 502),
    ("conflicting Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"GET", 502),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", b"GET", 502),
    ("truncated length body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", b"GET", 502),
    ("not HTTP", b"NOT HTTP AT ALL\r\n\r\n", b"GET", 502),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row", RESPONSE_ROWS, ids=[r[0] for r in RESPONSE_ROWS])
def test_response_row(row: tuple[str, bytes, bytes, object], impl: str) -> None:
    """Each backend response head is framed per RFC 9112 section 6.3 or refused (502)."""
    _name, raw, method, expected = row
    events = parse_response(raw, impl, method)
    if isinstance(expected, int):
        assert outcome(events) == ("error", expected), events
    else:
        assert outcome(events) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_bytes_while_idle_are_refused(impl: str) -> None:
    """Bytes that arrive after a complete response (idle in the pool) are an error."""
    parser = framing.response_parser(implementation=impl)
    parser.expect(b"GET")
    assert outcome(parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n"))[-1] == ("end", True)
    assert status_of(parser.feed(b"x")) == 502


@pytest.mark.parametrize("impl", IMPLS)
def test_parser_is_reused_across_responses(impl: str) -> None:
    """One parser frames successive responses on a kept-alive connection."""
    parser = framing.response_parser(implementation=impl)
    for method in (b"GET", b"HEAD", b"GET"):
        parser.expect(method)
        body = b"" if method == b"HEAD" else b"hello"
        got = outcome(parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body))
        assert got[-1] == ("end", True)


def test_status_line_is_written_by_the_ingress() -> None:
    """Only a validated code and phrase make the status line."""
    assert framing.status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
    assert framing.status_line(200, b"O\nK") == b"HTTP/1.1 200 OK\r\n"
    assert framing.status_line(404) == b"HTTP/1.1 404 Not Found\r\n"
    assert framing.status_line(599) == b"HTTP/1.1 599 Unknown Status\r\n"
    with pytest.raises(ValueError):
        framing.status_line(2000)


# -- differential property tests ---------------------------------------------

_NAMES = st.sampled_from(
    [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A",
     b"Upgrade", b"Expect", b"X Bad", b"X:Bad", b""]
)
_VALUES = st.one_of(
    st.sampled_from([b"a", b"chunked", b"identity", b"gzip, chunked", b"3", b"0", b"-1",
                     b"1, 1", b"close", b"keep-alive", b"upgrade", b"websocket", b" 3 ", b""]),
    st.binary(max_size=8),
)
_LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n "])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"CONNECT", b"G\x00T", b"get"]))
    target = draw(st.sampled_from([b"/", b"/a?b", b"*", b"http://h-1/x", b"h:1", b"/\x7f", b"/\xff", b"/ a"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    lines = [method + b" " + target + b" " + version]
    for _ in range(draw(st.integers(0, 5))):
        sep = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
        lines.append(draw(_NAMES) + sep + draw(_VALUES))
    ends = [draw(_LINE_ENDS) for _ in lines]
    head = b"".join(line + end for line, end in zip(lines, ends)) + b"\r\n"
    body = draw(st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\n"]))
    return head + body


def _decision(events: list[Event]) -> object:
    """
    The messages accepted in full (every field and body byte), up to the
    first refusal.  A message still incomplete counts as not accepted: h11
    may wait for a line end or a method where llhttp refuses at once.
    """
    complete: list[Event] = []
    current: list[Event] = []
    for event in events:
        if isinstance(event, FramingError):
            break
        current.append(event)
        if isinstance(event, (EndOfMessage, Switched)):
            complete += current
            current = []
    return outcome(complete)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=requests(), pieces=st.integers(1, 4))
def test_parsers_agree_on_requests(raw: bytes, pieces: int) -> None:
    """llhttp and h11, under the same policy, accept and refuse the same request heads alike."""
    if len(IMPLS) < 2:
        pytest.fail("both implementations must be installed to compare them")
    results = {impl: parse_request(raw, impl, pieces=pieces) for impl in IMPLS}
    decisions = {impl: _decision(ev) for impl, ev in results.items()}
    a, b = decisions.values()
    assert a == b, (raw, results)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"200 OK", b"204 No Content", b"304 Not Modified", b"2000 OK",
                                   b"200 O\nK", b"200 O\rK", b"200", b"100 Continue\r\n\r\nHTTP/1.1 200 OK",
                                   b"600 X", b"099 X", b"200 O\x00K"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    lines = [version + b" " + status]
    for _ in range(draw(st.integers(0, 4))):
        sep = draw(st.sampled_from([b": ", b":", b" : "]))
        lines.append(draw(_NAMES) + sep + draw(_VALUES))
    ends = [draw(_LINE_ENDS) for _ in lines]
    head = b"".join(line + end for line, end in zip(lines, ends)) + b"\r\n"
    body = draw(st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\n"]))
    return head + body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=responses(), method=st.sampled_from([b"GET", b"HEAD"]))
def test_parsers_agree_on_responses(raw: bytes, method: bytes) -> None:
    """llhttp and h11 frame or refuse the same backend responses alike."""
    if len(IMPLS) < 2:
        pytest.fail("both implementations must be installed to compare them")
    got = {impl: outcome(parse_response(raw, impl, method)) for impl in IMPLS}
    a, b = got.values()
    assert a == b, (raw, got)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, 20, 38, 39, 40, 41, 44])
def test_length_body_split_anywhere_then_extra_bytes(impl: str, split: int) -> None:
    """A Content-Length body split at any point ends exactly; bytes after it taint the connection."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"
    parser = framing.response_parser(implementation=impl)
    parser.expect(b"GET")
    events = parser.feed(raw[:split]) + parser.feed(raw[split:])
    assert outcome(events) == [
        ("resp", 200, b"OK", [(b"content-length", b"5")], "length", 5, True),
        b"hello",
        ("end", False),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, 40, 45, 46, 50])
def test_upload_split_anywhere_then_next_request(impl: str, split: int) -> None:
    """A Content-Length upload split at any point is followed by the next request, framed afresh."""
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /n HTTP/1.1\r\nHost: a\r\n\r\n"
    parser = framing.request_parser(implementation=impl)
    got = outcome(parser.feed(raw[:split]) + parser.feed(raw[split:]))
    assert got[1:3] == [b"hello", ("end", True)]
    assert got[3][:3] == ("req", b"GET", b"/n") and got[-1] == ("end", True)


@pytest.mark.parametrize("impl", IMPLS)
def test_kept_alive_parser_frames_every_kind_of_response_in_turn(impl: str) -> None:
    """
    Responses of every framing in turn on one connection, each body fed
    whole or in pieces (a body counted past the parser), then a GET: each
    is framed on its own, none leaks into the next.
    """
    parser = framing.response_parser(implementation=impl)
    cases = [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b""),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b""),
    ]
    for pieces in (1, 3):
        for method, raw, body in cases + [cases[0]]:
            # A HEAD answer that declares chunked ends the connection (see
            # accept_response): what follows it comes on a new one.
            last_on_connection = method == b"HEAD" and b"chunked" in raw
            parser.expect(method)
            head_end = raw.rindex(b"\r\n\r\n") + 4
            events = parser.feed(raw[:head_end])
            rest = raw[head_end:]
            step = max(1, -(-len(rest) // pieces))
            for i in range(0, len(rest), step):
                events += parser.feed(rest[i : i + step])
            got = outcome(events)
            assert got[-1] == ("end", not last_on_connection), (method, raw, events)
            assert b"".join(e.data for e in events if isinstance(e, Data)) == body
            if last_on_connection:
                parser = framing.response_parser(implementation=impl)
    # And bytes that arrive after the last one still taint the connection.
    assert status_of(parser.feed(b"HTTP/1.1 200 OK\r\n\r\n")) == 502


# -- the answer to a WebSocket upgrade ----------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Set-Cookie: a=1; Expires=Wed, 21 Oct 2037\r\nSet-Cookie: b=2\r\n\r\n",
            (101, "switched", 4),
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n", (101, "switched", 1)),
        (b"HTTP/1.1 403 Forbidden\r\nLocation: /login\r\nContent-Length: 4\r\n\r\n", (403, "length", 2)),
        (b"HTTP/1.1 101 OK\r\nX-Bad: a\x01b\r\n\r\n", None),
        (b"HTTP/1.1 101 OK\nUpgrade: websocket\n\n", None),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n folded\r\n\r\n", None),
        (b"HTTP/1.1 403 No\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", None),
        (b"SSH-2.0-OpenSSH\r\n\r\n", None),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n", None),
    ],
)
def test_upgrade_answer_is_parsed_and_checked(head: bytes, expected: tuple[int, str, int] | None) -> None:
    """A backend's 101 or refusal is read by the framing layer; a head it would refuse is a 502."""
    parsed = framing.parse_upgrade_response(head)
    if expected is None:
        assert isinstance(parsed, FramingError) and parsed.status == 502
        return
    assert isinstance(parsed, ResponseHead)
    assert (parsed.status, parsed.framing, len(parsed.headers)) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("after", "clean"),
    [(b"", True), (b"\r\n", True), (b"\n\r\n", True), (b"\r\nX", False), (b"0", False)],
)
def test_what_follows_a_response_in_the_same_read(impl: str, after: bytes, clean: bool) -> None:
    """
    Empty lines after a complete response in the same read are skipped
    (llhttp skips them between messages; h11 is made to agree); any other
    byte means the connection is not reused.  (Found by the differential
    test: b"0\\r\\n" as a 3-byte body, then CRLF.)
    """
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n0\r\n" + after
    got = outcome(parse_response(raw, impl, b"GET", eof=False))
    assert got[-1] == ("end", clean), got
