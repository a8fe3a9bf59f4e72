"""
Graceful drain of open WebSocket sessions in a real twistd process.

A real backend (an Autobahn server in its own process, reporting every close
frame it receives on stdout), the ingress as a twistd process on the file
provider, and websocket-client as the client.  SIGTERM must close every
session with 1001 towards both peers and the process must exit within
C{--shutdown-timeout}, also when a client never answers the close.
"""

from __future__ import annotations

import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from opensandbox_ingress.web.websocket import DRAIN_REASON, GOING_AWAY
from tests.processes import REPO, free_port, stop, twistd, wait_healthy

#: The backend: echoes messages; prints its port, then ``OPEN`` per session
#: and ``CLOSE <code> <reason>`` per close frame received from its peer.
_BACKEND = r"""
import sys
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

class Backend(WebSocketServerProtocol):
    def onOpen(self):
        say("OPEN")

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)

    def onCloseFrame(self, code, reasonRaw):
        say(f"CLOSE {code} {(reasonRaw or b'').decode('utf-8', 'replace')}")
        return super().onCloseFrame(code, reasonRaw)

factory = WebSocketServerFactory()
factory.protocol = Backend
factory.setProtocolOptions(echoCloseCodeReason=True, autoPingInterval=0)
say(str(reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port))
reactor.run()
"""


class Backend:
    """The backend process and the lines it printed, read as they come."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BACKEND], cwd=REPO, stdout=subprocess.PIPE
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.next_line(15))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().rstrip("\n"))

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"backend printed nothing within {timeout}s") from None

    def expect(self, prefix: str, count: int, timeout: float) -> list[str]:
        """The next C{count} lines starting with C{prefix}, within C{timeout}."""
        deadline = time.monotonic() + timeout
        found: list[str] = []
        while len(found) < count:
            line = self.next_line(max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                found.append(line)
        return found


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.proc.terminate()
    try:
        b.proc.wait(10)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait()


def _ingress(tmp_path: Path, shutdown_timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text('[{"name": "term", "endpoint": "127.0.0.1"}]')
    port = free_port()
    proc = twistd(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
         "--shutdown-timeout", str(shutdown_timeout), "--websocket-ping-interval", "0"]
    )
    wait_healthy(proc, port)
    return proc, port


def _open(port: int, backend: Backend) -> websocket.WebSocket:
    """A websocket-client session through the ingress, proven open end to end."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/shell",
        header=[f"OpenSandbox-Ingress-To: term-{backend.port}"],
        timeout=10,
    )
    ws.send("hello")
    assert ws.recv() == "hello"
    return ws


def _close_frame(ws: websocket.WebSocket, timeout: float) -> tuple[int, str]:
    """Read frames until a close frame; its code and reason (no reply sent)."""
    ws.settimeout(timeout)
    while True:
        frame = ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            (code,) = struct.unpack("!H", frame.data[:2])
            return code, frame.data[2:].decode("utf-8")


def _exit_within(proc: subprocess.Popen[bytes], sent: float, bound: float) -> float:
    """Wait for C{proc} to exit no later than C{bound} s after C{sent}; the elapsed time."""
    try:
        proc.wait(max(0.1, sent + bound - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ingress still running {bound}s after SIGTERM") from None
    # twistd re-raises the terminating signal once shut down cleanly.
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    return time.monotonic() - sent


def test_sigterm_closes_open_sessions_with_1001_on_both_hops(
    tmp_path: Path, backend: Backend
) -> None:
    """Three open sessions: each client and the backend get 1001; the process exits in time."""
    shutdown_timeout = 10.0
    proc, port = _ingress(tmp_path, shutdown_timeout)
    clients: list[websocket.WebSocket] = []
    try:
        clients = [_open(port, backend) for _ in range(3)]
        backend.expect("OPEN", 3, timeout=5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for ws in clients:
            assert _close_frame(ws, timeout=5) == (GOING_AWAY, DRAIN_REASON)
            ws.send_close(GOING_AWAY)  # answer, as a browser does
        closes = backend.expect("CLOSE", 3, timeout=5)
        assert closes == [f"CLOSE {GOING_AWAY} {DRAIN_REASON}"] * 3
        # Every peer answered: nothing is left to wait for.
        elapsed = _exit_within(proc, sent, shutdown_timeout)
        assert elapsed < shutdown_timeout / 2, elapsed
    finally:
        for ws in clients:
            ws.shutdown()
        out, _ = stop(proc)
    assert b"draining: 3 requests in flight" in out


def test_client_that_never_answers_does_not_hold_the_drain(
    tmp_path: Path, backend: Backend
) -> None:
    """A client that stops reading still gets its 1001 frame, the backend its 1001, and
    the process exits within --shutdown-timeout instead of the close-handshake timeout."""
    shutdown_timeout = 2.0
    proc, port = _ingress(tmp_path, shutdown_timeout)
    ws = None
    try:
        ws = _open(port, backend)
        backend.expect("OPEN", 1, timeout=5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The client reads nothing until the process is gone.
        closes = backend.expect("CLOSE", 1, timeout=shutdown_timeout + 3)
        assert closes == [f"CLOSE {GOING_AWAY} {DRAIN_REASON}"]
        # Process teardown after the timeout fires gets one more second.
        _exit_within(proc, sent, shutdown_timeout + 1)
        # The close frame was sent before the connection was cut.
        assert _close_frame(ws, timeout=5) == (GOING_AWAY, DRAIN_REASON)
    finally:
        if ws is not None:
            ws.shutdown()
        stop(proc)
