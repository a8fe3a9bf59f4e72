"""Helpers for tests that run the ingress as a real twistd process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate, timeout: float, what: str, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Call C{predicate} until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def twistd(args: list[str], **kwargs) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """Start C{twistd -n --pidfile= -l - opensandbox-ingress ARGS} from the repository."""
    env = dict(os.environ)
    env.pop("OPENSANDBOX_INGRESS_VERSION", None)
    env.update(kwargs.pop("env", {}))
    return subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "-l", "-", "opensandbox-ingress", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 15) -> None:
    def healthy() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ingress exited {proc.returncode}: {out!r} {err!r}")
        try:
            return http_get(port, "/status.ok")[0] == 200
        except OSError:
            return False

    poll(healthy, timeout, "ingress /status.ok")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not found for {pid}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def start_stream_backend() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.stream_backend"], cwd=REPO, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line: IO[bytes] | bytes = proc.stdout.readline()
    return proc, int(line)
