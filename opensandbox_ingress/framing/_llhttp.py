"""
Framing by llhttp (the parser of Node.js) through C{httptools}: the
default on CPython, where its wheel installs.

llhttp runs strict (no leniency flags): it refuses obs-fold, bare CR or
LF, duplicate C{Content-Length}, C{Content-Length} with
C{Transfer-Encoding}, bad chunk sizes and control bytes.  The ingress's
policy (L{_policy.accept_request}, L{_policy.accept_response}) runs when a
head is complete; a refusal there stops the parser (the callback raises).
"""

from __future__ import annotations

import httptools

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
)

_OWS = (b" ", b"\t")


class _Refused(Exception):
    """Raised from a callback to stop llhttp with the policy's answer."""

    def __init__(self, error: FramingError) -> None:
        super().__init__(error.reason)
        self.error = error


class LlhttpRequestParser:
    """
    Request framing for one client connection (see L{RequestParser}).

    llhttp parses every complete message in a feed, so pipelined requests
    come out as several heads in one list.
    """

    name = "httptools"

    def __init__(
        self, max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADER_COUNT
    ) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._max_head = max_head_bytes
        self._max_headers = max_headers
        self._events: list[Event] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: Between a message's first byte and its complete head.
        self._in_head = False
        #: Head bytes seen so far by an incomplete head (an upper bound
        #: after the first feed of the message).
        self._partial = 0
        self._begun_in_feed = False
        self._switched = False
        self._dead = False
        self._keep_alive = True
        #: Body bytes still to come of a Content-Length body (see L{feed}).
        self._left = 0

    @property
    def awaiting_head(self) -> bool:
        """Whether part of a request head has arrived, but not all of it."""
        return self._in_head

    # -- llhttp callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._begun_in_feed = True
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url = self._url + url if self._url else url

    def on_header(self, name: bytes, value: bytes) -> None:
        if value[-1:] in _OWS:
            # llhttp keeps trailing whitespace; it is not part of the value.
            value = value.rstrip(b" \t")
        self._headers.append((name, value))
        if len(self._headers) > self._max_headers:
            raise _Refused(FramingError(431, f"more than {self._max_headers} header fields"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        head = accept_request(
            parser.get_method(),
            self._url,
            parser.get_http_version().encode("ascii"),
            self._headers,
            self._max_head,
            self._max_headers,
            # llhttp (strict) refused bad names and control bytes itself.
            fields_checked=True,
        )
        if isinstance(head, FramingError):
            raise _Refused(head)
        self._keep_alive = head.keep_alive
        self._left = head.content_length or 0
        self._events.append(head)
        # Trailer fields (checked by llhttp, then dropped) go elsewhere.
        self._headers = []

    def on_body(self, body: bytes) -> None:
        if self._left:
            self._left -= len(body)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._left = 0
        self._events.append(EndOfMessage())
        if not self._keep_alive:
            # The connection's last request: what follows is ignored.
            self._dead = True

    # -- feeding ---------------------------------------------------------------

    def _ended(self) -> bool:
        # (A method, not the attribute: callbacks set it during feed_data,
        # which a type checker cannot see.)
        return self._dead

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""
        try:
            return self._feed(data)
        finally:
            # The events are the caller's now: holding the list would keep
            # its body bytes (up to a whole read) alive per connection.
            self._events = []

    def _feed(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        if self._switched:
            return [Switched(data)] if data else []
        left = self._left
        if left:
            # The rest of a Content-Length body whose head an earlier feed
            # carried: counted, not copied through llhttp (an upload's bytes
            # pass as they came).  llhttp's idea of the message is then
            # stale, so the next message gets a fresh parser.
            if len(data) < left:
                self._left = left - len(data)
                return [Data(data)]
            self._left = 0
            events: list[Event] = [Data(data[:left]) if len(data) > left else Data(data)]
            events.append(EndOfMessage())
            if not self._keep_alive:
                self._dead = True
                return events
            self._parser = httptools.HttpRequestParser(self)
            if len(data) > left:
                events += self.feed(data[left:])
            return events
        events = self._events = []
        self._begun_in_feed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # An upgrade request is complete: the rest is the new protocol.
            self._switched = True
            rest = data[e.args[0] :]
            if rest:
                events.append(Switched(rest))
        except httptools.HttpParserCallbackError as e:
            if self._ended():
                return events
            self._dead = True
            cause = e.__context__
            if isinstance(cause, _Refused):
                events.append(cause.error)
            else:
                raise
        except httptools.HttpParserError as e:
            if self._ended():
                # Bytes after the connection's last request.
                return events
            self._dead = True
            # llhttp refuses a Transfer-Encoding whose last coding is not
            # chunked itself, before the policy sees the head: the same
            # 501 the policy gives an unknown coding.
            status = (
                501
                if "invalid `transfer-encoding`" in str(e).lower()
                or isinstance(e, httptools.HttpParserInvalidMethodError)
                else 400
            )
            events.append(FramingError(status, f"malformed request: {e}"))
        else:
            if self._in_head:
                # A head still incomplete after this feed: bound it however
                # it arrives (one byte at a time or one huge read).
                if self._begun_in_feed:
                    self._partial = len(self._url) + sum(
                        len(n) + len(v) + 4 for n, v in self._headers
                    )
                else:
                    self._partial += len(data)
                if self._partial > self._max_head:
                    self._dead = True
                    events.append(
                        FramingError(431, f"request head larger than {self._max_head} bytes")
                    )
        return events


class LlhttpResponseParser:
    """
    Response framing for one backend connection (see L{ResponseParser}).
    Call L{expect} with each request's method before its response arrives.
    """

    name = "httptools"

    def __init__(self, max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES) -> None:
        self._max_head = max_head_bytes
        self._parser: httptools.HttpResponseParser | None = None
        #: llhttp itself completed the last response, which was not an
        #: answer to HEAD: its state is at the start of the next message.
        self._in_step = False
        self._method = b"GET"
        self._events: list[Event] = []
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: ResponseHead | None = None
        self._in_head = False
        self._partial = 0
        #: Bytes fed since this response began (bounds its head's size).
        self._fed = 0
        self._complete = False
        self._unclean = False
        self._dead = False
        #: Body bytes still to come of a Content-Length body, or -1 for a
        #: body read until the backend closes (see L{feed}).
        self._left = 0

    def expect(self, method: bytes) -> None:
        """A request with C{method} was sent; parse its response next."""
        if not self._in_step or self._dead:
            # llhttp's state is not at a message boundary: after a HEAD
            # (it does not know the request was a HEAD, so it expects the
            # declared body), a body counted past it (see L{feed}), or an
            # error.  A fresh parser then, so nothing of the last response
            # carries over; otherwise the one that just completed a
            # response is at the start of the next, as for pipelining.
            self._parser = httptools.HttpResponseParser(self)
        self._in_step = False
        self._method = method
        self._head = None
        self._complete = False
        self._unclean = False
        self._dead = False
        self._in_head = False
        self._partial = 0
        self._fed = 0
        self._left = 0

    # -- llhttp callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # Bytes after the response: nobody asked for them.
            self._unclean = True
            raise _Refused(FramingError(502, "bytes after the response"))
        self._in_head = True
        self._reason = b""
        self._headers = []

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if value[-1:] in _OWS:
            value = value.rstrip(b" \t")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise _Refused(FramingError(502, "unexpected protocol switch"))
            if parser.get_http_version() != "1.1":
                raise _Refused(FramingError(502, "interim response in HTTP/1.0"))
            # An interim response: skipped; the final one follows.
            return
        if self._fed > self._max_head and (
            len(self._reason) + sum(len(n) + len(v) + 4 for n, v in self._headers)
            > self._max_head
        ):
            # (Only summed when the bytes fed for it could be that many.)
            raise _Refused(FramingError(502, "response head too large"))
        head = accept_response(
            status,
            self._reason,
            parser.get_http_version().encode("ascii"),
            self._headers,
            self._method,
            fields_checked=True,
        )
        if isinstance(head, FramingError):
            raise _Refused(head)
        self._head = head
        self._events.append(head)
        self._headers = []
        if head.framing == "length":
            self._left = head.content_length or 0
        elif head.framing == "close":
            self._left = -1
        if head.framing == "none":
            # HEAD, 204, 304: no body whatever the headers say (llhttp does
            # not know the request was a HEAD, so it is told nothing and
            # any body bytes it reports taint the connection).
            self._complete = True
            self._events.append(EndOfMessage())

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._unclean = True
            return
        if self._left > 0:
            self._left -= len(body)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an interim response
        self._in_step = self._method != b"HEAD"
        if self._complete:
            return  # the end of a bodyless one (204, 304), already reported
        self._complete = True
        self._left = 0
        self._events.append(EndOfMessage())

    # -- feeding ---------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Parse C{data}; the events it completes, in order."""
        try:
            return self._feed(data)
        finally:
            # The events are the caller's now: holding the list would keep
            # its body bytes (up to a whole read) alive per connection.
            self._events = []

    def _feed(self, data: bytes) -> list[Event]:
        if self._dead or not data:
            return []
        parser = self._parser
        if parser is None or self._complete:
            # Unasked-for bytes (idle in the pool, or after the response).
            self._dead = True
            return [FramingError(502, "bytes after the response")]
        left = self._left
        if left:
            # The rest of a body whose head an earlier feed carried, framed
            # by length or by close: counted, not copied through llhttp.
            if left < 0 or len(data) < left:
                if left > 0:
                    self._left = left - len(data)
                return [Data(data)]
            self._left = 0
            self._complete = True
            if len(data) == left:
                return [Data(data), EndOfMessage()]
            # Bytes after the response: this connection is not reused.
            self._dead = True
            return [Data(data[:left]), EndOfMessage(clean=False)]
        self._fed += len(data)
        events = self._events = []
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            self._dead = True
            cause = e.__context__
            if not isinstance(cause, _Refused):
                raise
            if not self._unclean:
                events.append(cause.error)
        except httptools.HttpParserUpgrade:
            self._dead = True
            events.append(FramingError(502, "unexpected protocol switch"))
        except httptools.HttpParserError as e:
            self._dead = True
            if any(isinstance(event, EndOfMessage) for event in events):
                # Garbage after a complete response.
                self._unclean = True
            else:
                events.append(FramingError(502, f"malformed response: {e}"))
        else:
            if self._in_head:
                self._partial += len(data)
                if self._partial > self._max_head:
                    self._dead = True
                    events.append(FramingError(502, "response head too large"))
        if self._unclean:
            self._dead = True
            for event in events:
                if isinstance(event, EndOfMessage):
                    event.clean = False
        return events

    def feed_eof(self) -> list[Event]:
        """The backend closed: the end of a read-until-close body, or an error."""
        if self._dead or self._parser is None or self._complete:
            return []
        self._dead = True
        head = self._head
        if head is not None and head.framing == "close":
            self._complete = True
            return [EndOfMessage()]
        return [FramingError(502, "connection closed before the response was complete")]
