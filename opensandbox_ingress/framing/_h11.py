"""
Framing by C{h11} (pure Python): used where C{httptools} has no wheel
(PyPy), and run beside llhttp by the differential tests.

h11 is lenient where llhttp is strict in three ways the ingress refuses:
it accepts a bare LF as a line end, unfolds obs-fold, and merges identical
C{Content-Length} lines.  So once h11 has read a head, the raw head bytes
are checked for exactly those (a bare CR or LF, or fewer header fields
than header lines); everything else is the shared policy's.
"""

from __future__ import annotations

import re

import h11

from ._events import (
    Data,
    EndOfMessage,
    Event,
    FramingError,
    ResponseHead,
    Switched,
)
from ._policy import (
    MAX_HEAD_BYTES,
    MAX_HEADER_COUNT,
    MAX_RESPONSE_HEAD_BYTES,
    accept_request,
    accept_response,
    invalid_response_header,
    reason_phrase,
)

#: A Content-Length line holding a list (h11 collapses C{1, 1} to C{1}).
_LENGTH_LIST = re.compile(rb"(?im)^content-length[ \t]*:[^\r\n]*,")


def _raw_head_ok(raw: bytes, fields: int) -> bool:
    """
    Whether the head at the start of C{raw} (which h11 accepted with
    C{fields} header fields) uses CRLF line ends only, one line per field
    (no obs-fold, no merged duplicates) and no C{Content-Length} list:
    what llhttp refuses and h11 normalises.
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        # h11 found the end of the head at a bare LF.
        return False
    head = raw[: end + 2]
    crlf = head.count(b"\r\n")
    return (
        head.count(b"\n") == crlf
        and head.count(b"\r") == crlf
        and crlf == fields + 1
        and _LENGTH_LIST.search(head) is None
    )


def _reason(error: Exception) -> str:
    """h11's message without the bytes it may quote (they are not echoed)."""
    return str(error).split(":", 1)[0]


class H11RequestParser:
    """Request framing for one client connection (see L{RequestParser})."""

    name = "h11"

    def __init__(
        self, max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADER_COUNT
    ) -> None:
        self._max_head = max_head_bytes
        self._max_headers = max_headers
        self._conn = self._new()
        #: The raw bytes of the message being read, kept until its head is
        #: complete (for L{_raw_head_ok}).
        self._raw = b""
        self._in_head = True
        self._keep_alive = True
        self._switched = False
        self._dead = False

    def _new(self) -> h11.Connection:
        # h11's own bound on an incomplete head; the policy counts complete
        # heads the same way for both parsers.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)

    @property
    def awaiting_head(self) -> bool:
        """Whether part of a request head has arrived, but not all of it."""
        return self._in_head and bool(self._raw)

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""
        if self._dead:
            return []
        if self._switched:
            return [Switched(data)] if data else []
        events: list[Event] = []
        if self._in_head:
            self._raw += data
        self._conn.receive_data(data)
        try:
            self._drain(events)
        except h11.RemoteProtocolError as e:
            self._dead = True
            status = e.error_status_hint
            # h11's messages may quote the bytes; the reason never does.
            reason = _reason(e)
            if reason.startswith("Receive buffer too long"):
                status, reason = 431, f"request head larger than {self._max_head} bytes"
            elif status == 501:
                reason = "transfer coding not supported (only chunked)"
            events.append(FramingError(status, f"malformed request: {reason}"))
        return events

    def _drain(self, events: list[Event]) -> None:
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                headers = list(event.headers.raw_items())
                if not _raw_head_ok(self._raw, len(headers)):
                    raise h11.RemoteProtocolError("invalid line ends or folding", 400)
                self._raw = b""
                self._in_head = False
                head = accept_request(
                    event.method,
                    event.target,
                    event.http_version,
                    headers,
                    self._max_head,
                    self._max_headers,
                )
                if isinstance(head, FramingError):
                    self._dead = True
                    events.append(head)
                    return
                self._keep_alive = head.keep_alive
                events.append(head)
            elif isinstance(event, h11.Data):
                events.append(Data(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                events.append(EndOfMessage())
                rest, _closed = conn.trailing_data
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    # An upgrade request: what follows is not HTTP.
                    self._switched = True
                    if rest:
                        events.append(Switched(bytes(rest)))
                    return
                if not self._keep_alive:
                    # The connection's last request: what follows is ignored.
                    self._dead = True
                    return
                # The next request on a fresh h11 connection (h11 wants the
                # server's response first; the ingress writes its own).
                self._conn = conn = self._new()
                self._in_head = True
                self._raw = bytes(rest)
                if rest:
                    conn.receive_data(bytes(rest))
            elif event is h11.PAUSED:
                return
            else:  # ConnectionClosed
                return


class H11ResponseParser:
    """Response framing for one backend connection (see L{ResponseParser})."""

    name = "h11"

    def __init__(self, max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES) -> None:
        self._max_head = max_head_bytes
        self._conn: h11.Connection | None = None
        self._method = b"GET"
        self._raw = b""
        self._in_head = False
        self._head: ResponseHead | None = None
        self._complete = False
        self._dead = False

    def expect(self, method: bytes) -> None:
        """A request with C{method} was sent; parse its response next."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        # h11 frames a response by its request (HEAD has no body): tell it.
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
        conn.send(h11.EndOfMessage())
        self._conn = conn
        self._method = method
        self._raw = b""
        self._in_head = True
        self._head = None
        self._complete = False
        self._dead = False

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""
        if self._dead or not data:
            return []
        conn = self._conn
        if conn is None or self._complete:
            self._dead = True
            return [FramingError(502, "bytes after the response")]
        if self._in_head:
            self._raw += data
        conn.receive_data(data)
        return self._drain()

    def feed_eof(self) -> list[Event]:
        """The backend closed: the end of a read-until-close body, or an error."""
        if self._dead or self._conn is None or self._complete:
            return []
        self._conn.receive_data(b"")
        events = self._drain()
        if not self._complete and not self._dead:
            self._dead = True
            events.append(FramingError(502, "connection closed before the response was complete"))
        return events

    def _drain(self) -> list[Event]:
        conn = self._conn
        assert conn is not None
        events: list[Event] = []
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        raise h11.RemoteProtocolError("unexpected protocol switch", 502)
                    if event.http_version != b"1.1":
                        # (llhttp ends an HTTP/1.0 message at its head.)
                        raise h11.RemoteProtocolError("interim response in HTTP/1.0", 502)
                    # Skipped; the final response follows.  Its head is
                    # checked from here on.
                    end = self._raw.find(b"\r\n\r\n")
                    self._raw = self._raw[end + 4 :] if end >= 0 else b""
                    continue
                if isinstance(event, h11.Response):
                    headers = list(event.headers.raw_items())
                    if not _raw_head_ok(self._raw, len(headers)):
                        raise h11.RemoteProtocolError("invalid line ends or folding", 502)
                    self._raw = b""
                    self._in_head = False
                    head = accept_response(
                        event.status_code,
                        bytes(event.reason),
                        event.http_version,
                        headers,
                        self._method,
                    )
                    if isinstance(head, FramingError):
                        self._dead = True
                        events.append(head)
                        return events
                    self._head = head
                    events.append(head)
                elif isinstance(event, h11.Data):
                    events.append(Data(bytes(event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    rest, _closed = conn.trailing_data
                    # Empty lines (CR, LF) in the same read after the
                    # response are skipped, as llhttp skips them between
                    # messages; any other byte taints the connection.
                    clean = not bytes(rest).strip(b"\r\n")
                    events.append(EndOfMessage(clean=clean))
                    if not clean:
                        self._dead = True
                    break
                else:  # ConnectionClosed before the end
                    break
        except h11.RemoteProtocolError as e:
            self._dead = True
            if self._complete:
                return events
            events.append(FramingError(502, f"malformed response: {_reason(e)}"))
        return events


def parse_upgrade_response(head: bytes) -> ResponseHead | FramingError:
    """
    A backend's answer to a WebSocket upgrade request, given its complete
    head (through the blank line): a L{ResponseHead} for a 101 (framing
    C{"switched"}: what follows is not HTTP) or for a final refusal, else a
    L{FramingError}.  Read by h11 on both implementations (a handshake is
    parsed once per session, and only h11 follows an upgrade through its
    101), checked as any backend head is.
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
    conn.send(
        h11.Request(
            method=b"GET",
            target=b"/",
            headers=[(b"Host", b"x"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    raw = head
    conn.receive_data(head)
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                # An interim answer; the real one follows.
                end = raw.find(b"\r\n\r\n")
                raw = raw[end + 4 :] if end >= 0 else b""
                continue
            break
    except h11.RemoteProtocolError as e:
        return FramingError(502, f"malformed response: {_reason(e)}")
    if not isinstance(event, (h11.InformationalResponse, h11.Response)):
        return FramingError(502, "incomplete response head")
    headers = list(event.headers.raw_items())
    if not _raw_head_ok(raw, len(headers)):
        return FramingError(502, "invalid line ends or folding")
    if isinstance(event, h11.Response):
        return accept_response(
            event.status_code, bytes(event.reason), event.http_version, headers, b"GET"
        )
    why = invalid_response_header(headers)
    if why is not None:
        return FramingError(502, why)
    reason = bytes(event.reason)
    if reason and reason_phrase(101, reason) != reason:
        return FramingError(502, "control character in the reason phrase")
    listed = frozenset(
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    )
    return ResponseHead(101, reason, event.http_version, headers, "switched", None, False, listed)
