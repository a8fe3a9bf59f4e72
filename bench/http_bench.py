#!/usr/bin/env python3
"""
HTTP benchmark: direct-to-backend versus through the ingress, same run.

    python3 bench/http_bench.py [--duration 10] [--connections 50] [--body 64]
                                [--workers N] [--ingress-cpus 0] [--load-cpus 1]

Starts a backend (nginx from Debian if installed, else a small Twisted
server), the ingress on the file provider (pinned to --ingress-cpus,
default CPU 0, when taskset exists; --workers N runs N worker processes),
and drives load with wrk (Debian package `wrk`, pinned with the backend to
--load-cpus, default the last CPU). Prints req/s, p50, p99 and MB/s for
each target, the ingress's ratio to direct, and the CPU seconds each
ingress process used. Bounded in time; stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {url}")


def pinned(cpus: str, argv: list[str]) -> list[str]:
    """C{argv} under C{taskset -c CPUS} (a list such as 0 or 0-1; "" = unpinned)."""
    if cpus and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpus, *argv]
    return argv


LOAD_CPUS = str((os.cpu_count() or 1) - 1)


def start_backend(tmp: Path, body_size: int, cpus: str = LOAD_CPUS) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    # nginx workers run as an unprivileged user when started by root.
    tmp.chmod(0o755)
    (tmp / "www").mkdir()
    (tmp / "www" / "body").write_bytes(b"x" * body_size)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {tmp}/www; }}
    }}
}}
"""
        )
        proc = subprocess.Popen(pinned(cpus, [nginx, "-c", str(conf), "-p", str(tmp)]))
        kind = "nginx"
    else:
        code = (
            "import sys;from twisted.web import server, static;from twisted.internet import reactor;"
            f"reactor.listenTCP({port}, server.Site(static.File(sys.argv[1])), interface='127.0.0.1');"
            "reactor.run()"
        )
        proc = subprocess.Popen(pinned(cpus, [sys.executable, "-c", code, str(tmp / "www")]))
        kind = "twisted"
    wait_http(f"http://127.0.0.1:{port}/body")
    return proc, port, kind


def start_ingress(
    tmp: Path, backend_port: int, python: str, workers: int = 1, cpus: str = "0"
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    sandboxes = tmp / "sandboxes.json"
    sandboxes.write_text('[{"name": "bench", "endpoint": "127.0.0.1"}]')
    proc = subprocess.Popen(
        pinned(
            cpus,
            [
                python, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "-l", str(tmp / "ingress.log"),
                "opensandbox-ingress", "--provider-type", "file",
                "--sandboxes-file", str(sandboxes), "--port", str(port),
                "--log-level", "warn", "--workers", str(workers),
            ],
        ),
        cwd=REPO,
    )
    wait_http(
        f"http://127.0.0.1:{port}/body",
        headers={"OpenSandbox-Ingress-To": f"bench-{backend_port}"},
    )
    return proc, port


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(
    url: str, duration: int, connections: int, header: str | None, cpus: str = LOAD_CPUS
) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if header:
        argv[1:1] = ["-H", header]
    out = subprocess.run(pinned(cpus, argv), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
    mbps = float(transfer.group(1)) * scale.get(transfer.group(2), 1.0) if transfer else 0.0

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "mbps": mbps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ingress_processes(pid: int) -> list[int]:
    """The ingress process and, in --workers mode, its worker processes."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [pid, *(int(c) for c in children.read_text().split())]
    except OSError:
        return [pid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--body", type=int, default=64, help="response body bytes")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the ingress")
    parser.add_argument("--workers", type=int, default=1, help="ingress --workers")
    parser.add_argument(
        "--ingress-cpus", default="0", help="taskset CPU list for the ingress ('' = unpinned)"
    )
    parser.add_argument(
        "--load-cpus", default=LOAD_CPUS, help="taskset CPU list for wrk and the backend"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    load = args.load_cpus
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        backend, backend_port, kind = start_backend(tmp, args.body, load)
        ingress = None
        try:
            ingress, ingress_port = start_ingress(
                tmp, backend_port, args.python, args.workers, args.ingress_cpus
            )
            header = f"OpenSandbox-Ingress-To: bench-{backend_port}"
            # Warm both paths (pool, JIT on PyPy) before measuring.
            run_wrk(f"http://127.0.0.1:{backend_port}/body", 2, args.connections, None, load)
            run_wrk(f"http://127.0.0.1:{ingress_port}/body", 2, args.connections, header, load)
            direct = run_wrk(
                f"http://127.0.0.1:{backend_port}/body", args.duration, args.connections, None, load
            )
            pids = _ingress_processes(ingress.pid)
            cpu_before = {pid: _cpu_seconds(pid) for pid in pids}
            proxied = run_wrk(
                f"http://127.0.0.1:{ingress_port}/body", args.duration, args.connections,
                header, load,
            )
            cpu = {pid: _cpu_seconds(pid) - cpu_before[pid] for pid in pids}
        finally:
            for proc in (ingress, backend):
                if proc is None:
                    continue
                proc.terminate()
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(
        f"backend={kind} body={args.body}B connections={args.connections} "
        f"duration={args.duration}s python={args.python} workers={args.workers} "
        f"ingress-cpus={args.ingress_cpus or 'any'} load-cpus={load or 'any'}"
    )
    print(f"{'target':<10}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'MB/s':>10}{'non-2xx':>9}")
    for label, r in (("direct", direct), ("ingress", proxied)):
        print(
            f"{label:<10}{r['rps']:>12.0f}{r['p50']:>10.2f}{r['p99']:>10.2f}"
            f"{r['mbps']:>10.1f}{r['non2xx']:>9.0f}"
        )
    print(
        f"{'ratio':<10}{proxied['rps'] / direct['rps']:>12.3f}"
        f"{proxied['p50'] / direct['p50']:>10.2f}{proxied['p99'] / direct['p99']:>10.2f}"
        f"{(proxied['mbps'] / direct['mbps']) if direct['mbps'] else 0:>10.3f}"
    )
    busy = ", ".join(f"{pid}: {seconds / args.duration:.0%}" for pid, seconds in cpu.items())
    print(f"ingress CPU per process during the run (supervisor first): {busy}")


if __name__ == "__main__":
    main()
