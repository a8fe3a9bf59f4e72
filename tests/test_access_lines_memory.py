"""
Front-end A's access lines, in memory: a forwarded request, an answer of
the ingress's own and a framing refusal each leave through the channel's
one access-log exit, once, as the documented line and one request count.
"""

from __future__ import annotations

import io
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from opensandbox_ingress.observability import AccessLineWriter, LogOutput
from tests.memory_ingress import OK, MemoryIngress, get


def _requests_total(ingress: MemoryIngress) -> dict[str, float]:
    """opensandbox_ingress_requests_total by status class (kind http)."""
    text = ingress.service.core.metrics.exposition().decode()
    return {
        s.labels["status_class"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "opensandbox_ingress_requests_total" and s.labels["kind"] == "http"
    }


def test_forwarded_answered_and_refused_requests_leave_one_line_each(tmp_path: Path) -> None:
    """One line and one count per request, whichever way the channel finished it."""
    ingress = MemoryIngress(tmp_path)
    out = io.StringIO()
    ingress.service.core.access_log.sink = AccessLineWriter(LogOutput(out), "text")
    client = ingress.connect()

    ingress.clock.advance(1.0)
    client.send(get("/x?token=s3"))
    ingress.clock.advance(0.25)
    ingress.accept_dial().answer(OK)
    client.send(
        b"GET /y HTTP/1.1\r\nHost: ingress.example\r\nOpenSandbox-Ingress-To: nope-8080\r\n\r\n"
    )
    client.send(b"GET /w HTTP/1.1\r\nHost: ingress.example\r\n\r\n")  # no route
    client.send(
        b"HEAD /v HTTP/1.1\r\nHost: ingress.example\r\nOpenSandbox-Ingress-To: nope-8080\r\n\r\n"
    )
    client.send(b"GET /z HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # two Hosts: refused
    assert client.statuses() == [200, 404, 400, 404, 400]

    prefix = "[opensandbox_ingress.access#info] "
    lines = [line.split(prefix, 1)[1] for line in out.getvalue().splitlines()]
    assert lines[0] == (
        "http GET sandbox=sbx port=8080 path=/x status=200 bytes=2 duration_ms=250.0 "
        "client=192.0.2.7"
    )
    assert lines[1].startswith("http GET sandbox=nope port=8080 path=/y status=404 bytes=")
    assert lines[2].startswith("http GET sandbox=- port=0 path=/w status=400 bytes=")
    # HEAD: the answer has no body, and the line says so.
    assert lines[3].startswith("http HEAD sandbox=nope port=8080 path=/v status=404 bytes=0 ")
    assert lines[4].startswith("http - sandbox=- port=0 path=- status=400 bytes=")
    assert len(lines) == 5
    assert _requests_total(ingress) == {"2xx": 1, "4xx": 4}
