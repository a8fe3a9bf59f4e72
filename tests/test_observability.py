"""Log output: buffering, the direct access-line writer, JSON lines."""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock

from opensandbox_ingress.observability import AccessLineWriter, AccessLog, LogOutput


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
