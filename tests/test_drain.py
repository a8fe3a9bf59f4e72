"""Graceful drain of a real twistd process on SIGTERM."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.processes import (
    free_port,
    http_get,
    poll,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)


def _active_requests(admin_port: int) -> float:
    _, body = http_get(admin_port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("opensandbox_ingress_active_requests "):
            return float(line.split()[1])
    return -1.0


def test_sigterm_lets_in_flight_request_finish_and_refuses_new(tmp_path: Path) -> None:
    """SIGTERM: health turns 503, new connections are refused, the slow request still completes."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text('[{"name": "slow", "endpoint": "127.0.0.1"}]')
    port, admin = free_port(), free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1", "--shutdown-timeout", "20"]
    )
    result: dict[str, object] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/slow?ms=1500", headers={"OpenSandbox-Ingress-To": f"slow-{backend_port}"})
        response = conn.getresponse()
        result["status"], result["body"] = response.status, response.read()

    try:
        wait_healthy(proc, port)
        worker = threading.Thread(target=slow_request)
        worker.start()
        poll(lambda: _active_requests(admin) == 1, 10, "request in flight")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        poll(lambda: http_get(admin, "/status.ok")[0] == 503, 5, "health 503")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        poll(refused, 5, "listener closed")
        worker.join(30)
        assert result == {"status": 200, "body": b"slow"}
        proc.wait(20)
        # twistd re-raises the terminating signal once shut down cleanly.
        assert proc.returncode in (0, -signal.SIGTERM)
        assert time.monotonic() - sent < 15
    finally:
        out, _ = stop(proc)
        stop(backend)
    assert b"draining: 1 requests in flight" in out


@pytest.mark.parametrize("timeout_s", ["1"])
def test_shutdown_timeout_bounds_the_drain(tmp_path: Path, timeout_s: str) -> None:
    """A request slower than --shutdown-timeout is cut and the process still exits."""
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text('[{"name": "slow", "endpoint": "127.0.0.1"}]')
    port, admin = free_port(), free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1", "--shutdown-timeout", timeout_s]
    )
    errors: list[BaseException] = []

    def slow_request() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/slow?ms=20000", headers={"OpenSandbox-Ingress-To": f"slow-{backend_port}"})
            conn.getresponse().read()
        except BaseException as e:  # the cut connection is the expected outcome
            errors.append(e)

    try:
        wait_healthy(proc, port)
        worker = threading.Thread(target=slow_request)
        worker.start()
        poll(lambda: _active_requests(admin) == 1, 10, "request in flight")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        elapsed = time.monotonic() - sent
        worker.join(10)
    finally:
        stop(proc)
        stop(backend)
    assert elapsed < 8, elapsed
    assert errors, "the in-flight request should have been cut"
