#!/usr/bin/env python3
"""
WebSocket benchmark: direct-to-backend versus through the ingress, same run.

    python3 bench/ws_bench.py [--messages 20000] [--idle 10000]

Starts an Autobahn echo backend process and the ingress (one twistd
process, file provider), then measures with websocket-client:

- echo throughput for 1 KiB and 64 KiB binary messages (one connection, a
  sender thread and a receiver, so sends are pipelined), messages/s and MB/s;
- ingress RSS with N idle sessions open through it (per-session KiB).

Prints a table with the ingress/direct ratio. Bounded in time; stops what
it started.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import websocket

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import free_port, rss_kib, stop, twistd, wait_healthy  # noqa: E402


def echo_throughput(url: str, headers: list[str], size: int, count: int) -> tuple[float, float]:
    """Messages/s and MB/s for C{count} echoed binary messages of C{size} bytes."""
    ws = websocket.create_connection(url, header=headers, timeout=60)
    payload = b"x" * size

    def send() -> None:
        for _ in range(count):
            ws.send_binary(payload)

    sender = threading.Thread(target=send)
    started = time.perf_counter()
    sender.start()
    got = 0
    for _ in range(count):
        got += len(ws.recv())
    elapsed = time.perf_counter() - started
    sender.join()
    ws.close()
    assert got == size * count
    return count / elapsed, got / elapsed / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="1 KiB messages per run")
    parser.add_argument("--idle", type=int, default=10000, help="idle sessions for the RSS figure")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backend = subprocess.Popen(
        [sys.executable, "-m", "tests.ws_echo_process"], cwd=REPO, stdout=subprocess.PIPE
    )
    assert backend.stdout is not None
    backend_port = int(backend.stdout.readline())
    with tempfile.TemporaryDirectory() as name:
        sandboxes = Path(name) / "s.json"
        sandboxes.write_text('[{"name": "ws", "endpoint": "127.0.0.1"}]')
        port = free_port()
        ingress = twistd(
            ["--provider-type", "file", "--sandboxes-file", str(sandboxes), "--port", str(port),
             "--log-level", "warn", "--websocket-ping-interval", "0"]
        )
        rows = []
        try:
            wait_healthy(ingress, port)
            direct = f"ws://127.0.0.1:{backend_port}/"
            proxied = f"ws://127.0.0.1:{port}/"
            route = [f"OpenSandbox-Ingress-To: ws-{backend_port}"]
            for size, count in ((1024, args.messages), (65536, max(200, args.messages // 20))):
                d = echo_throughput(direct, [], size, count)
                p = echo_throughput(proxied, route, size, count)
                rows.append((f"{size // 1024} KiB", d, p))
            base = rss_kib(ingress.pid)
            sessions = []
            idle = args.idle
            try:
                for _ in range(idle):
                    sessions.append(websocket.create_connection(proxied, header=route, timeout=30))
            except OSError as e:
                print(f"stopped opening sessions at {len(sessions)}: {e}")
            opened = len(sessions)
            loaded = rss_kib(ingress.pid)
            for ws in sessions:
                ws.close()
        finally:
            stop(ingress)
            stop(backend)
    print(f"{'message':<10}{'direct msg/s':>14}{'ingress msg/s':>15}{'ratio':>8}"
          f"{'direct MB/s':>13}{'ingress MB/s':>14}{'ratio':>8}")
    for label, (dm, dmb), (pm, pmb) in rows:
        print(f"{label:<10}{dm:>14.0f}{pm:>15.0f}{pm / dm:>8.2f}{dmb:>13.1f}{pmb:>14.1f}{pmb / dmb:>8.2f}")
    if opened:
        print(
            f"idle sessions: {opened}, ingress RSS {base / 1024:.0f} -> {loaded / 1024:.0f} MiB "
            f"({(loaded - base) / opened:.1f} KiB per session)"
        )


if __name__ == "__main__":
    main()
