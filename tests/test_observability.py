"""Log output: buffering, the direct access-line writer, JSON lines."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger

from opensandbox_ingress.observability import (
    ACCESS_NAMESPACE,
    AccessLineWriter,
    AccessLog,
    LogOutput,
    make_log_observer,
)


class _Reactor(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[object] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: object) -> None:
        self.triggers.append((phase, event, f))


def test_output_buffers_until_the_interval() -> None:
    """Lines are held until the flush interval, then written together."""
    out = io.StringIO()
    reactor = _Reactor()
    output = LogOutput(out, interval_s=0.1)
    output.start(reactor)
    output.write("a\n")
    output.write("b\n")
    assert out.getvalue() == ""
    reactor.advance(0.1)
    assert out.getvalue() == "a\nb\n"
    assert any(phase == "after" and event == "shutdown" for phase, event, _ in reactor.triggers)  # type: ignore[misc]


def test_output_flushes_when_full() -> None:
    """A full buffer is written at once, without waiting for the interval."""
    out = io.StringIO()
    output = LogOutput(out, max_pending=10)
    output.start(_Reactor())
    output.write("0123456789\n")
    assert out.getvalue() == "0123456789\n"


def test_access_lines_text_and_json() -> None:
    """The direct writer produces the documented text line and JSON object."""
    out = io.StringIO()
    output = LogOutput(out)  # not started: writes through
    AccessLineWriter(output, "text")(
        "http", "GET", "sbx", 8080, 200, 64, 1.5, "10.0.0.9", "/lab/tree"
    )
    line = out.getvalue()
    assert line.endswith(
        "[opensandbox_ingress.access#info] http GET sandbox=sbx port=8080 path=/lab/tree "
        "status=200 bytes=64 duration_ms=1.5 client=10.0.0.9\n"
    )
    out.seek(0)
    out.truncate()
    AccessLineWriter(output, "json")("ws", "GET", "sbx", 8080, 101, 5, 2.0, "::1")
    record = json.loads(out.getvalue())
    assert record["namespace"] == "opensandbox_ingress.access" and record["level"] == "info"
    assert (record["sandbox"], record["status"], record["bytes"], record["client"]) == (
        "sbx", 101, 5, "::1"
    )
    assert record["path"] == "-"
    assert record["time"].endswith("Z")


def test_access_log_sink_false_disables_lines_but_keeps_metrics() -> None:
    """With the access log off, metrics are still told about each request."""
    seen: list[tuple[str, int]] = []

    class Metrics:
        def observe_request(self, kind: str, status: int, duration: float) -> None:
            seen.append((kind, status))

    log = AccessLog(metrics=Metrics(), clock=lambda: 1.0)
    log.sink = False
    log.request(b"GET", "sbx", 80, 204, 0, 0.5, "127.0.0.1")
    assert seen == [("http", 204)]


def test_output_writes_through_once_the_reactor_stopped() -> None:
    """After the reactor stops (twistd then dies by signal, no atexit) lines go out at once."""
    out = io.StringIO()
    reactor = _Reactor()
    output = LogOutput(out)
    output.start(reactor)
    reactor.running = False
    output.write("Main loop terminated.\n")
    assert out.getvalue() == "Main loop terminated.\n"


class _Metrics:
    """Records what the access log tells the request metrics."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, float]] = []

    def observe_request(self, kind: str, status: int, duration: float) -> None:
        self.seen.append((kind, status, duration))


#: One session's end, as the relay hands it over (subprotocol untrusted).
SESSION: dict[str, Any] = {
    "subprotocol": 'v1 "x"',
    "extensions": "permessage-deflate",
    "upstream_extensions": "-",
    "bytes_in": 3260,
    "bytes_out": 19953,
    "frames_in": 10,
    "frames_out": 33,
    "close_code": 1000,
    "closed_by": "client",
}

SESSION_MESSAGE = (
    "ws GET sandbox=nb port=8888 path=/api/kernels/k1/channels status=101 "
    "subprotocol=v1%20%22x%22 extensions=permessage-deflate upstream_extensions=- "
    "bytes_in=3260 bytes_out=19953 frames_in=10 frames_out=33 close_code=1000 "
    "closed_by=client duration_ms=2500.0 client=10.0.0.7"
)


def _session(log: AccessLog, **overrides: Any) -> None:
    log.session(
        "nb", 8888, 10.0, "10.0.0.7", b"/api/kernels/k1/channels?token=secret",
        **{**SESSION, **overrides},
    )


def _through_observer(fmt: str) -> str:
    """A session line the default way: a twisted.logger event, rendered by the log observer."""
    out = io.StringIO()
    observer = make_log_observer("info", fmt, out)
    log = AccessLog(Logger(namespace=ACCESS_NAMESPACE, observer=observer), clock=lambda: 12.5)
    _session(log)
    return out.getvalue()


def _through_sink(fmt: str) -> tuple[str, list[tuple[str, int, float]]]:
    """A session line through the direct writer the twistd plugin installs."""
    out = io.StringIO()
    metrics = _Metrics()
    events: list[dict[str, Any]] = []
    logger = Logger(namespace=ACCESS_NAMESPACE, observer=events.append)
    log = AccessLog(logger, clock=lambda: 12.5, metrics=metrics)
    log.sink = AccessLineWriter(LogOutput(out), fmt)
    _session(log)
    assert events == [], "a sink replaces the twisted.logger event"
    return out.getvalue(), metrics.seen


def test_session_line_through_the_sink_is_written_once_and_counted() -> None:
    """A WebSocket session reaches the sink once, as the documented line, and metrics as ws 101."""
    text, seen = _through_sink("text")
    assert text.count("\n") == 1
    assert text.endswith(f" [opensandbox_ingress.access#info] {SESSION_MESSAGE}\n")
    assert seen == [("ws", 101, 2.5)]


def test_session_line_is_the_same_through_the_sink_and_the_observer() -> None:
    """The direct writer and the log observer give one session the same text and JSON line."""
    sink_text, _ = _through_sink("text")
    event_text = _through_observer("text")
    # The time prefix is the only part that may differ (the writer reads its own clock).
    assert sink_text.split(" ", 1)[1] == event_text.split(" ", 1)[1]
    sink_json, _ = _through_sink("json")
    event_json = _through_observer("json")
    (sink_line,) = sink_json.splitlines()
    (event_line,) = event_json.splitlines()
    sink_record, event_record = json.loads(sink_line), json.loads(event_line)
    del sink_record["time"], event_record["time"]
    assert sink_record == event_record
    assert list(sink_record) == list(event_record)
    assert sink_record["message"] == SESSION_MESSAGE
    assert (sink_record["kind"], sink_record["status"], sink_record["path"]) == (
        "ws", 101, "/api/kernels/k1/channels"
    )
    assert (sink_record["close_code"], sink_record["subprotocol"]) == (1000, "v1%20%22x%22")


def test_session_without_close_code_or_subprotocol_logs_dashes() -> None:
    """A session that ended without a close frame and without a subprotocol shows C{-} for both."""
    out = io.StringIO()
    log = AccessLog(clock=lambda: 12.5)
    log.sink = AccessLineWriter(LogOutput(out), "json")
    _session(log, subprotocol=None, close_code=None)
    record = json.loads(out.getvalue())
    assert (record["subprotocol"], record["close_code"]) == ("-", "-")


def test_session_with_the_access_log_off_is_still_counted() -> None:
    """With the lines off (log level above info) a session still reaches the metrics."""
    metrics = _Metrics()
    events: list[dict[str, Any]] = []
    logger = Logger(namespace=ACCESS_NAMESPACE, observer=events.append)
    log = AccessLog(logger, clock=lambda: 11.0, metrics=metrics)
    log.sink = False
    _session(log)
    assert events == []
    assert metrics.seen == [("ws", 101, 1.0)]
