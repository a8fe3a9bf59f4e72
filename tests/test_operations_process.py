"""Operating a real twistd ingress: metrics, routing view, ready-wait, URI prefixes."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.processes import (
    free_port,
    http_get,
    poll,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)


def metric(admin: int, name: str, **labels: str) -> float:
    _, body = http_get(admin, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_operating_a_running_process(tmp_path: Path) -> None:
    """Metrics move with traffic, the routing view explains, ready-wait holds, Location is rebased."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text(
        json.dumps(
            [
                {"name": "web", "endpoint": "127.0.0.1"},
                {"name": "booting", "endpoint": "127.0.0.1", "ready": False},
                {"name": "never", "endpoint": "127.0.0.1", "ready": False},
            ]
        )
    )
    port, admin = free_port(), free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--mode", "uri", "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
         "--ready-wait", "1.5"]
    )
    try:
        wait_healthy(proc, port)
        # Metrics change as traffic flows, scraped over HTTP.
        labels = {"mode": "uri", "kind": "http", "status_class": "2xx"}
        before = metric(admin, "opensandbox_ingress_requests_total", **labels)
        for _ in range(3):
            assert http_get(port, f"/web/{backend_port}/download?size=3")[0] == 200
        poll(
            lambda: metric(admin, "opensandbox_ingress_requests_total", **labels) == before + 3,
            5,
            "request counter",
        )
        assert metric(admin, "opensandbox_ingress_sandboxes", state="not_ready") == 2

        # The routing view explains a not-ready sandbox.
        status, body = http_get(admin, "/sandboxes/booting")
        view = json.loads(body)
        assert status == 200 and view["status"] == 503
        assert "marked not ready" in view["reason"]

        # A root-relative Location comes back under the sandbox prefix.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/web/{backend_port}/redirect")
        response = conn.getresponse()
        response.read()
        assert response.status == 302
        assert response.getheader("Location") == f"/web/{backend_port}/login"

        # A request for a starting sandbox completes within 1 s of it turning ready.
        result: dict[str, object] = {}

        def waiting_request() -> None:
            result["status"] = http_get(port, f"/booting/{backend_port}/download?size=2")[0]
            result["done"] = time.monotonic()

        worker = threading.Thread(target=waiting_request)
        worker.start()
        poll(lambda: metric(admin, "opensandbox_ingress_ready_waiters") == 1, 5, "waiting")
        sandboxes.write_text(
            json.dumps(
                [
                    {"name": "web", "endpoint": "127.0.0.1"},
                    {"name": "booting", "endpoint": "127.0.0.1"},
                    {"name": "never", "endpoint": "127.0.0.1", "ready": False},
                ]
            )
        )
        poll(
            lambda: json.loads(http_get(admin, "/sandboxes/booting")[1])["status"] == 200,
            5,
            "registry sees booting ready",
        )
        turned_ready = time.monotonic()
        worker.join(10)
        assert result["status"] == 200
        assert float(result["done"]) - turned_ready < 1.0
        # ... and one that stays not ready times out with 503 and Retry-After.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()
        conn.request("GET", f"/never/{backend_port}/")
        response = conn.getresponse()
        response.read()
        assert response.status == 503
        assert response.getheader("Retry-After") == "1"
        assert response.getheader("OpenSandbox-Ingress-Error") == "sandbox_not_ready"
        assert 1.4 < time.monotonic() - started < 5
    finally:
        stop(proc)
        stop(backend)
