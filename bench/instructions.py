#!/usr/bin/env python3
"""
Instructions per small GET through the ingress, counted by callgrind.

Throughput figures swing with whatever else the machine runs; an
instruction count does not (the same tree gives the same count within
about half a percent, loaded or not), so this is how to tell whether a
change to the data path made a small request cheaper or dearer, even on a
busy machine.  It counts user-space instructions of the ingress process
only: system calls and the kernel's share (about a third of a small GET's
CPU) are not in it.

    python3 bench/instructions.py                 # this checkout
    python3 bench/instructions.py /path/to/other  # another checkout, same run

Needs valgrind (Debian: valgrind) and a backend answering C{GET /small}:
it starts a small Twisted one.  The ingress runs under callgrind with
instrumentation off while it starts and warms up, then on for exactly
C{--requests} requests sent over C{--connections} keep-alive connections
in lockstep, then off again.
"""

from __future__ import annotations

import argparse
import glob
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port} after {deadline_s:.0f} s")


def drive(port: int, backend_port: int, requests: int, connections: int) -> None:
    """Send C{requests} GETs over C{connections} connections; check every answer."""
    request = (
        b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"OpenSandbox-Ingress-To: bench-%d\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
        % (port, backend_port)
    )
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    left = {s: requests // connections for s in socks}
    bufs = {s: b"" for s in socks}
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
        s.sendall(request)
    while left:
        for key, _ in selector.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            data = s.recv(65536)
            if not data:
                raise SystemExit("the ingress closed a connection")
            bufs[s] += data
            while b"\r\n\r\n" in bufs[s]:
                head, _, rest = bufs[s].partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"unexpected answer: {head[:80]!r}")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(rest) < length:
                    break
                bufs[s] = rest[length:]
                left[s] -= 1
                if left[s] == 0:
                    del left[s]
                    selector.unregister(s)
                else:
                    s.sendall(request)
    for s in socks:
        s.close()


def count(repo: Path, backend_port: int, requests: int, connections: int, tmp: Path) -> int:
    """Instructions the ingress run from C{repo} spends on C{requests} GETs."""
    port = free_port()
    sandboxes = tmp / "sandboxes.json"
    sandboxes.write_text('[{"name": "bench", "endpoint": "127.0.0.1"}]')
    out = tmp / f"callgrind.{port}"
    python = os.path.realpath(sys.executable)  # not a shim: valgrind runs it
    proc = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p",
            python, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "-l", "/dev/null", "opensandbox-ingress",
            "--provider-type", "file", "--sandboxes-file", str(sandboxes),
            "--port", str(port), "--log-level", "warn",
        ],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 300)
        drive(port, backend_port, 400, connections)  # warm-up: pools, caches
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
        drive(port, backend_port, requests, connections)
        subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
        # The dump is written by the ingress process itself, on its next turn.
        deadline = time.monotonic() + 60
        while not glob.glob(f"{out}.*.1") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        proc.terminate()
        proc.wait()
    total = 0
    for path in glob.glob(f"{out}.*"):
        for line in Path(path).read_text().splitlines():
            # (A dump's "summary" counts from the last zeroing; "totals"
            # is what the dump holds.)
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repos", nargs="*", default=[str(HERE.parent)], help="checkouts to measure")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=10)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "www").mkdir()
        (tmp / "www" / "small").write_bytes(b"x" * 64)
        backend_port = free_port()
        code = (
            "import sys;from twisted.web import server, static;"
            "from twisted.internet import reactor;"
            f"reactor.listenTCP({backend_port}, server.Site(static.File(sys.argv[1])),"
            " interface='127.0.0.1');reactor.run()"
        )
        backend = subprocess.Popen([sys.executable, "-c", code, str(tmp / "www")])
        try:
            wait_port(backend_port, 30)
            for repo in args.repos:
                total = count(Path(repo).resolve(), backend_port, args.requests, args.connections, tmp)
                print(
                    f"{repo}: {total:,} instructions for {args.requests} requests, "
                    f"{total // args.requests:,} per request",
                    flush=True,
                )
        finally:
            backend.terminate()
            backend.wait()


if __name__ == "__main__":
    main()
