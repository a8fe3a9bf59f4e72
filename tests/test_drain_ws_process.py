"""SIGTERM on a real twistd ingress closes open WebSocket sessions with 1001 on both hops."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import websocket

from tests.processes import REPO, free_port, stop, twistd, wait_healthy


def test_sigterm_closes_websockets_with_going_away(tmp_path: Path) -> None:
    """The client and the backend both see close code 1001, and the process exits in time."""
    backend = subprocess.Popen(
        [sys.executable, "-m", "tests.ws_echo_process"], cwd=REPO, stdout=subprocess.PIPE
    )
    assert backend.stdout is not None
    backend_port = int(backend.stdout.readline())
    sandboxes = tmp_path / "s.json"
    sandboxes.write_text('[{"name": "term", "endpoint": "127.0.0.1"}]')
    port = free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--shutdown-timeout", "10"]
    )
    try:
        wait_healthy(proc, port)
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/shell",
            header=[f"OpenSandbox-Ingress-To: term-{backend_port}"],
            timeout=10,
        )
        ws.send("hello")
        assert ws.recv() == "hello"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        opcode, frame = ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame.data[:2], "big") == 1001
        ws.close()
        proc.wait(10)
        assert time.monotonic() - sent < 10
    finally:
        stop(proc)
        backend.terminate()
        out, _ = backend.communicate(timeout=10)
    assert b"CLOSE 1001" in out
