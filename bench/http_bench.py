#!/usr/bin/env python3
"""
HTTP benchmark: the ingress against direct-to-backend and reference
proxies, all measured in the same run.

    python3 bench/http_bench.py [--duration 10] [--connections 50]
                                [--scenarios small,large,upload]
                                [--refs aiohttp,go,nginx] [--pypy pypy3]
                                [--workers N] [--ingress-cpus 0] [--load-cpus 1]

Starts a backend (nginx from Debian if installed, else a small Twisted
server; the upload scenario needs nginx), the ingress on the file provider
(pinned to --ingress-cpus, default CPU 0, when taskset exists; --workers N
runs N worker processes), and each reference proxy pinned the same way:
a minimal aiohttp proxy (bench/ref_aiohttp_proxy.py, when aiohttp is
importable), a minimal Go httputil.ReverseProxy (bench/ref_go_proxy, built
when `go` is on PATH, run with GOMAXPROCS=1) and nginx as a proxy with one
worker.  --pypy INTERPRETER adds the ingress under that interpreter (it
needs the package and its dependencies installed there).  Load comes from
wrk (Debian package `wrk`, pinned with the backend to --load-cpus, default
the last CPU).

Scenarios: small (GET, 64 B body), large (GET, 1 MiB body), upload (POST
of 1 MiB, 2-byte answer).  For each, a table of req/s, p50, p99, MB/s and
ratios to direct, then the ingress's ratios to aiohttp and Go.  A target
that cannot run prints "skipped" with the reason.  Bounded in time; stops
everything it started.
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


def start_backend(tmp: Path, cpus: str = LOAD_CPUS) -> tuple[subprocess.Popen[bytes], int, str]:
    """nginx (or Twisted) serving /small (64 B), /large (1 MiB) and POST /upload."""
    port = free_port()
    # nginx workers run as an unprivileged user when started by root.
    tmp.chmod(0o755)
    (tmp / "www").mkdir()
    (tmp / "www" / "small").write_bytes(b"x" * 64)
    (tmp / "www" / "large").write_bytes(os.urandom(1 << 20))
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
    client_max_body_size 16m;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {tmp}/www; }}
        # Reads (and drops) the whole request body, then answers.
        location /upload {{ return 200 "ok"; }}
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
    wait_http(f"http://127.0.0.1:{port}/small")
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
        f"http://127.0.0.1:{port}/small",
        headers={"OpenSandbox-Ingress-To": f"bench-{backend_port}"},
    )
    return proc, port


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(
    url: str,
    duration: int,
    connections: int,
    header: str | None,
    cpus: str = LOAD_CPUS,
    script: Path | None = None,
) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if header:
        argv[1:1] = ["-H", header]
    if script is not None:
        argv[1:1] = ["-s", str(script)]
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


SCENARIOS = {
    # name: (path, wrk lua script or None, bytes moved per request for MB/s)
    "small": ("/small", None, 0),
    "large": ("/large", None, 0),
    "upload": ("/upload", "upload", 1 << 20),
}


def upload_script(tmp: Path) -> Path:
    """A wrk script that POSTs 1 MiB per request."""
    body = tmp / "upload.bin"
    body.write_bytes(os.urandom(1 << 20))
    script = tmp / "upload.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return script


class Target:
    """A proxy under test: how to reach it and how to stop it."""

    def __init__(
        self, label: str, port: int, header: str | None, procs: list[subprocess.Popen[bytes]]
    ) -> None:
        self.label = label
        self.port = port
        self.header = header
        self.procs = procs

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_aiohttp(backend_port: int, cpus: str) -> Target:
    """The aiohttp reference proxy (bench/ref_aiohttp_proxy.py)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise RuntimeError("aiohttp not installed (pip install aiohttp)") from None
    port = free_port()
    proc = subprocess.Popen(
        pinned(
            cpus,
            [sys.executable, str(REPO / "bench" / "ref_aiohttp_proxy.py"),
             "--port", str(port), "--backend", f"http://127.0.0.1:{backend_port}"],
        )
    )
    target = Target("aiohttp", port, None, [proc])
    try:
        wait_http(f"http://127.0.0.1:{port}/small")
    except SystemExit:
        target.stop()
        raise RuntimeError("aiohttp proxy did not start") from None
    return target


def start_go(tmp: Path, backend_port: int, cpus: str) -> Target:
    """The Go reference proxy (bench/ref_go_proxy), built here with `go build`."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go not on PATH (Debian: apt-get install golang-go)")
    binary = tmp / "refproxy"
    env = dict(
        os.environ,
        GOCACHE=str(tmp / "gocache"),
        GOPATH=str(tmp / "gopath"),
        GOFLAGS="",
        GO111MODULE="off",
        CGO_ENABLED="0",
    )
    build = subprocess.run(
        [go, "build", "-o", str(binary), str(REPO / "bench" / "ref_go_proxy" / "main.go")],
        env=env,
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        raise RuntimeError(f"go build failed: {build.stderr.strip().splitlines()[-1:]}")
    port = free_port()
    proc = subprocess.Popen(
        pinned(
            cpus,
            [str(binary), "-listen", f"127.0.0.1:{port}",
             "-backend", f"http://127.0.0.1:{backend_port}"],
        ),
        env=dict(os.environ, GOMAXPROCS="1"),
    )
    wait_http(f"http://127.0.0.1:{port}/small")
    return Target("go", port, None, [proc])


def start_nginx_proxy(tmp: Path, backend_port: int, cpus: str) -> Target:
    """nginx as a reverse proxy with one worker and a keep-alive upstream."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise RuntimeError("nginx not installed")
    port = free_port()
    root = tmp / "nginx-proxy"
    root.mkdir()
    root.chmod(0o755)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    client_max_body_size 16m;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(pinned(cpus, [nginx, "-c", str(conf), "-p", str(root)]))
    wait_http(f"http://127.0.0.1:{port}/small")
    return Target("nginx", port, None, [proc])


def _fmt(r: dict[str, float], direct: dict[str, float]) -> str:
    return (
        f"{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['mbps']:>10.1f}"
        f"{r['rps'] / direct['rps']:>9.3f}{r['non2xx']:>8.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--scenarios", default="small,large,upload", help="comma list of small, large, upload"
    )
    parser.add_argument(
        "--refs", default="aiohttp,go,nginx", help="reference proxies: aiohttp, go, nginx ('' = none)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the ingress")
    parser.add_argument("--pypy", default="", help="also run the ingress under this interpreter")
    parser.add_argument("--workers", type=int, default=1, help="ingress --workers")
    parser.add_argument(
        "--ingress-cpus", default="0", help="taskset CPU list for the proxies ('' = unpinned)"
    )
    parser.add_argument(
        "--load-cpus", default=LOAD_CPUS, help="taskset CPU list for wrk and the backend"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    scenarios = [s for s in args.scenarios.split(",") if s]
    for name in scenarios:
        if name not in SCENARIOS:
            raise SystemExit(f"--scenarios: unknown scenario {name!r}")
    load = args.load_cpus
    cpus = args.ingress_cpus
    results: dict[str, dict[str, dict[str, float]]] = {}
    skipped: dict[str, str] = {}
    cpu: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        backend, backend_port, kind = start_backend(tmp, load)
        script = upload_script(tmp)
        targets: list[Target] = []
        try:
            ingress, ingress_port = start_ingress(tmp, backend_port, args.python, args.workers, cpus)
            header = f"OpenSandbox-Ingress-To: bench-{backend_port}"
            targets.append(Target("ingress", ingress_port, header, [ingress]))
            if args.pypy:
                try:
                    pypy_dir = tmp / "pypy"
                    pypy_dir.mkdir()
                    proc, port = start_ingress(pypy_dir, backend_port, args.pypy, args.workers, cpus)
                    targets.append(Target("ingress-pypy", port, header, [proc]))
                except (OSError, SystemExit) as e:
                    skipped["ingress-pypy"] = f"did not start under {args.pypy}: {e}"
            starters = {
                "aiohttp": lambda: start_aiohttp(backend_port, cpus),
                "go": lambda: start_go(tmp, backend_port, cpus),
                "nginx": lambda: start_nginx_proxy(tmp, backend_port, cpus),
            }
            for ref in [r for r in args.refs.split(",") if r]:
                if ref not in starters:
                    raise SystemExit(f"--refs: unknown reference {ref!r}")
                try:
                    targets.append(starters[ref]())
                except (RuntimeError, OSError, SystemExit) as e:
                    skipped[ref] = str(e)
            for scenario in scenarios:
                path, lua, moved = SCENARIOS[scenario]
                if scenario == "upload" and kind != "nginx":
                    skipped[f"{scenario} scenario"] = "needs nginx as the backend"
                    continue
                s = script if lua else None
                rows = results[scenario] = {}

                def measure(
                    port: int, hdr: str | None, seconds: int,
                    path: str = path, s: Path | None = s, moved: int = moved,
                ) -> dict[str, float]:
                    r = run_wrk(f"http://127.0.0.1:{port}{path}", seconds, args.connections,
                                hdr, load, s)
                    if moved:
                        r["mbps"] = r["rps"] * moved / 2**20
                    return r

                measure(backend_port, None, 2)
                rows["direct"] = measure(backend_port, None, args.duration)
                for target in targets:
                    # Warm up (pool, PyPy's JIT) before measuring.
                    measure(target.port, target.header, 2 if target.label != "ingress-pypy" else 8)
                    pids = _ingress_processes(target.procs[0].pid)
                    before = {pid: _cpu_seconds(pid) for pid in pids}
                    rows[target.label] = measure(target.port, target.header, args.duration)
                    if target.label == "ingress" and scenario == scenarios[0]:
                        cpu = {pid: _cpu_seconds(pid) - before[pid] for pid in pids}
        finally:
            for target in targets:
                target.stop()
            backend.terminate()
            backend.wait(timeout=20)
    print(
        f"backend={kind} connections={args.connections} duration={args.duration}s "
        f"python={args.python} workers={args.workers} "
        f"proxy-cpus={cpus or 'any'} load-cpus={load or 'any'}"
    )
    for label, reason in skipped.items():
        print(f"skipped {label}: {reason}")
    for scenario, rows in results.items():
        print(f"\n[{scenario}]")
        print(f"{'target':<14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'MB/s':>10}{'x direct':>9}{'non-2xx':>8}")
        direct = rows["direct"]
        for label, r in rows.items():
            print(f"{label:<14}{_fmt(r, direct)}")
        ours = rows.get("ingress")
        for ref in ("aiohttp", "go", "nginx"):
            theirs = rows.get(ref)
            if ours and theirs:
                print(
                    f"ingress / {ref:<8} req/s {ours['rps'] / theirs['rps']:.2f}x  "
                    f"p99 {ours['p99'] / theirs['p99']:.2f}x  "
                    f"MB/s {(ours['mbps'] / theirs['mbps']) if theirs['mbps'] else 0:.2f}x"
                )
    if cpu:
        busy = ", ".join(f"{pid}: {seconds / args.duration:.0%}" for pid, seconds in cpu.items())
        print(f"\ningress CPU per process, first scenario (supervisor first): {busy}")


if __name__ == "__main__":
    main()
