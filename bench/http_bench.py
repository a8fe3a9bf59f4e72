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

  aiohttp  bench/ref_aiohttp_proxy.py, a minimal streaming aiohttp proxy
           (skipped when aiohttp is not importable)
  go       bench/ref_go_proxy/main.go, net/http/httputil.ReverseProxy,
           built into a temporary directory when `go` is on PATH (Debian:
           golang-go) and run with GOMAXPROCS=1 (skipped without go)
  nginx    nginx as a streaming proxy with one worker

--pypy INTERPRETER adds the ingress under that interpreter (it needs the
package and its dependencies installed there).  Load comes from wrk (Debian
package `wrk`, one thread, pinned with the backend to --load-cpus, default
the last CPU).  Every target gets the same wrk parameters and a 2-second
warm-up before each measurement.

Scenarios: small (GET, 64 B response), large (GET, 1 MiB response), upload
(POST of 1 MiB through a wrk Lua script, 2-byte response).  Each prints a
table of req/s, p50, p99, MB/s (response bytes, or request bytes for
upload), req/s as a ratio to direct, CPU used by the target as a share of
one core, its peak RSS and errors (non-2xx plus wrk socket errors), then the
ingress's req/s and p99 as ratios to each reference.  A target that cannot
run prints "skipped: reason" in its row.  A full run takes about
(scenarios) x (targets + 1) x (duration + 2) seconds; everything started is
stopped at the end.
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
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
WARMUP = 2
PYPY_WARMUP = 8  # PyPy's JIT needs longer before the numbers settle.

# Proxy settings from the environment must not capture loopback polling.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 20,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll C{url} until it answers; SystemExit after C{timeout} seconds or if C{proc} exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"exited with status {proc.returncode}")
        try:
            with _OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=2):
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


def _nginx() -> str | None:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _nginx_conf(root: Path, server: str, upstream: str = "") -> str:
    """An nginx.conf keeping every file nginx writes under C{root}."""
    return f"""
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
    {upstream}
    server {{
{server}
    }}
}}
"""


def start_backend(tmp: Path, cpus: str = LOAD_CPUS) -> tuple[subprocess.Popen[bytes], int, str]:
    """nginx (or Twisted) serving /small (64 B), /large (1 MiB) and POST /upload."""
    port = free_port()
    # nginx workers run as an unprivileged user when started by root.
    tmp.chmod(0o755)
    (tmp / "www").mkdir()
    (tmp / "www" / "small").write_bytes(b"x" * 64)
    (tmp / "www" / "large").write_bytes(os.urandom(1 << 20))
    nginx = _nginx()
    if nginx:
        conf = tmp / "nginx.conf"
        conf.write_text(
            _nginx_conf(
                tmp,
                f"""        listen 127.0.0.1:{port};
        location / {{ root {tmp}/www; }}
        # A bare `return` answers before the body has arrived, and a proxy
        # then drops the connection mid-upload; wrk would count that as a
        # fast request.  proxy_pass reads the whole body (into memory)
        # before asking /ok, without the body, for the answer.
        location = /upload {{
            client_body_buffer_size 2m;
            proxy_pass http://self/ok;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /ok {{ return 200 "ok"; }}""",
                upstream=f"upstream self {{ server 127.0.0.1:{port}; keepalive 16; }}",
            )
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
    try:
        wait_http(f"http://127.0.0.1:{port}/small", proc=proc)
    except SystemExit:
        _stop(proc)
        raise
    return proc, port, kind


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Target:
    """A proxy under test: how to reach it and how to stop it."""

    def __init__(
        self,
        label: str,
        port: int,
        header: str | None,
        proc: subprocess.Popen[bytes],
        warmup: int = WARMUP,
    ) -> None:
        self.label = label
        self.port = port
        self.header = header
        self.proc = proc
        self.warmup = warmup

    def pids(self) -> list[int]:
        """The target's process and its children (ingress workers, nginx worker)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            return [pid, *(int(c) for c in children.read_text().split())]
        except OSError:
            return [pid]

    def stop(self) -> None:
        """Terminate the target, killing it if it lingers."""
        _stop(self.proc)


def _started(label: str, proc: subprocess.Popen[bytes], port: int, log: Path | None,
             header: str | None = None, warmup: int = WARMUP) -> Target:
    """A Target once it answers; stops it and raises RuntimeError if it never does."""
    target = Target(label, port, header, proc, warmup)
    try:
        wait_http(f"http://127.0.0.1:{port}/small", headers=_headers(header), proc=proc)
    except SystemExit as e:
        target.stop()
        tail = ""
        if log is not None and log.exists():
            tail = " ".join(log.read_text(errors="replace").strip().splitlines()[-2:])
        raise RuntimeError(f"did not start ({e}){': ' + tail if tail else ''}") from None
    return target


def _headers(header: str | None) -> dict[str, str]:
    if not header:
        return {}
    name, _, value = header.partition(":")
    return {name.strip(): value.strip()}


def start_ingress(
    tmp: Path,
    backend_port: int,
    python: str,
    workers: int = 1,
    cpus: str = "0",
    label: str = "ingress",
    warmup: int = WARMUP,
) -> Target:
    """The ingress on the file provider, routing bench-PORT to the backend."""
    port = free_port()
    sandboxes = tmp / "sandboxes.json"
    sandboxes.write_text('[{"name": "bench", "endpoint": "127.0.0.1"}]')
    log = tmp / "ingress.log"
    # Start-up failures (a missing module under --pypy) go to stderr, not the log.
    err = tmp / "ingress.err"
    with err.open("wb") as out:
        proc = subprocess.Popen(
            pinned(
                cpus,
                [
                    python, "-c", "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "-l", str(log),
                    "opensandbox-ingress", "--provider-type", "file",
                    "--sandboxes-file", str(sandboxes), "--port", str(port),
                    "--log-level", "warn", "--workers", str(workers),
                ],
            ),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    header = f"OpenSandbox-Ingress-To: bench-{backend_port}"
    return _started(label, proc, port, err, header, warmup)


def start_aiohttp(tmp: Path, backend_port: int, cpus: str) -> Target:
    """The aiohttp reference proxy (bench/ref_aiohttp_proxy.py)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise RuntimeError("aiohttp not installed") from None
    port = free_port()
    log = tmp / "aiohttp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(
                cpus,
                [sys.executable, str(REPO / "bench" / "ref_aiohttp_proxy.py"),
                 "--port", str(port), "--backend", f"http://127.0.0.1:{backend_port}"],
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _started("aiohttp", proc, port, log)


def start_go(tmp: Path, backend_port: int, cpus: str) -> Target:
    """The Go reference proxy (bench/ref_go_proxy), built here with `go build`."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go not on PATH (Debian package golang-go)")
    binary = tmp / "refproxy"
    # A lone file in GOPATH mode: no go.mod, nothing to download.  The
    # default build cache is kept so later runs link in a second.
    env = dict(os.environ, GO111MODULE="off", CGO_ENABLED="0", GOFLAGS="")
    try:
        build = subprocess.run(
            [go, "build", "-o", str(binary), str(REPO / "bench" / "ref_go_proxy" / "main.go")],
            env=env, capture_output=True, text=True, timeout=600,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError("go build took over 10 minutes") from None
    if build.returncode != 0:
        last = (build.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"go build failed: {last}")
    port = free_port()
    log = tmp / "go.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(
                cpus,
                [str(binary), "-listen", f"127.0.0.1:{port}",
                 "-backend", f"http://127.0.0.1:{backend_port}"],
            ),
            # One P, like the single-threaded Python proxies on their one core.
            env=dict(os.environ, GOMAXPROCS="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _started("go", proc, port, log)


def start_nginx_proxy(tmp: Path, backend_port: int, cpus: str) -> Target:
    """nginx as a streaming reverse proxy with one worker and a keep-alive upstream."""
    nginx = _nginx()
    if nginx is None:
        raise RuntimeError("nginx not installed")
    port = free_port()
    root = tmp / "nginx-proxy"
    root.mkdir()
    root.chmod(0o755)
    conf = root / "nginx.conf"
    conf.write_text(
        _nginx_conf(
            root,
            f"""        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream both ways like the other proxies, rather than spooling
            # bodies to temp files; 64k reads instead of the 4k default.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
        }}""",
            upstream=f"upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}",
        )
    )
    log = root / "error.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            pinned(cpus, [nginx, "-c", str(conf), "-p", str(root)]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _started("nginx", proc, port, log)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(
    url: str,
    duration: int,
    connections: int,
    header: str | None,
    cpus: str = LOAD_CPUS,
    script: Path | None = None,
) -> dict[str, float]:
    """One wrk run: req/s, p50 and p99 in ms, MB/s received, errors."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if header:
        argv[1:1] = ["-H", header]
    if script is not None:
        argv[1:1] = ["-s", str(script)]
    out = subprocess.run(
        pinned(cpus, argv), capture_output=True, text=True, check=True, timeout=duration + 60
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
    mbps = float(transfer.group(1)) * scale.get(transfer.group(2), 1.0) if transfer else 0.0

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "mbps": mbps,
        "errors": (float(non2xx.group(1)) if non2xx else 0.0)
        + (sum(float(n) for n in sock.groups()) if sock else 0.0),
    }


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m.group(1)) / 1024 if m else 0.0


SCENARIOS = {
    # name: (description, path, POSTs the 1 MiB upload body)
    "small": ("GET, 64 B response", "/small", False),
    "large": ("GET, 1 MiB response, MB/s received", "/large", False),
    "upload": ("POST of 1 MiB, 2 B response, MB/s sent", "/upload", True),
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


HEAD = (
    f"{'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'MB/s':>9}"
    f"{'x direct':>9}{'CPU':>6}{'RSS MiB':>9}{'errors':>8}"
)


def _row(label: str, r: dict[str, float], direct: dict[str, float]) -> str:
    cpu = f"{r['cpu']:.0%}" if "cpu" in r else "-"
    rss = f"{r['rss']:.0f}" if "rss" in r else "-"
    return (
        f"{label:<14}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['mbps']:>9.1f}"
        f"{r['rps'] / direct['rps']:>9.3f}{cpu:>6}{rss:>9}{r['errors']:>8.0f}"
    )


def main() -> None:
    """Parse the command line, run every scenario against every target, print tables."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument(
        "--scenarios", default="small,large,upload", help="comma list of small, large, upload"
    )
    parser.add_argument(
        "--refs", default="aiohttp,go,nginx",
        help="comma list of reference proxies: aiohttp, go, nginx ('' = none)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the ingress")
    parser.add_argument("--pypy", default="", help="also run the ingress under this interpreter")
    parser.add_argument("--workers", type=int, default=1, help="ingress --workers")
    parser.add_argument(
        "--ingress-cpus", default="0",
        help="taskset CPU list for the ingress and every reference proxy ('' = unpinned)",
    )
    parser.add_argument(
        "--load-cpus", default=LOAD_CPUS, help="taskset CPU list for wrk and the backend"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian package wrk)")
    scenarios = [s for s in args.scenarios.split(",") if s]
    for name in scenarios:
        if name not in SCENARIOS:
            raise SystemExit(f"--scenarios: unknown scenario {name!r}")
    refs = [r for r in args.refs.split(",") if r]
    for ref in refs:
        if ref not in ("aiohttp", "go", "nginx"):
            raise SystemExit(f"--refs: unknown reference {ref!r}")
    load = args.load_cpus
    cpus = args.ingress_cpus
    labels = ["ingress", *(["ingress-pypy"] if args.pypy else []), *refs]
    estimate = len(scenarios) * (len(labels) + 1) * (args.duration + WARMUP)
    print(f"about {estimate} s of load to run", file=sys.stderr)

    results: dict[str, dict[str, dict[str, float]]] = {}
    skipped: dict[str, str] = {}
    per_process: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        backend, backend_port, kind = start_backend(tmp, load)
        script = upload_script(tmp)
        targets: list[Target] = []
        try:
            starters: dict[str, Callable[[], Target]] = {
                "ingress": lambda: start_ingress(tmp, backend_port, args.python, args.workers, cpus),
                "aiohttp": lambda: start_aiohttp(tmp, backend_port, cpus),
                "go": lambda: start_go(tmp, backend_port, cpus),
                "nginx": lambda: start_nginx_proxy(tmp, backend_port, cpus),
            }
            if args.pypy:
                pypy_dir = tmp / "pypy"
                pypy_dir.mkdir()
                starters["ingress-pypy"] = lambda: start_ingress(
                    pypy_dir, backend_port, args.pypy, args.workers, cpus,
                    label="ingress-pypy", warmup=PYPY_WARMUP,
                )
            for label in labels:
                try:
                    targets.append(starters[label]())
                except (RuntimeError, OSError) as e:
                    skipped[label] = str(e)
            if "ingress" in skipped:
                raise SystemExit(f"the ingress {skipped['ingress']}")
            for scenario in scenarios:
                _, path, upload = SCENARIOS[scenario]
                if upload and kind != "nginx":
                    skipped[f"{scenario} scenario"] = "needs nginx as the backend"
                    continue
                rows = results[scenario] = {}

                def measure(
                    port: int, hdr: str | None, seconds: int,
                    path: str = path, upload: bool = upload,
                ) -> dict[str, float]:
                    r = run_wrk(f"http://127.0.0.1:{port}{path}", seconds, args.connections,
                                hdr, load, script if upload else None)
                    if upload:
                        # wrk counts bytes received; here the payload is sent.
                        r["mbps"] = r["rps"]
                    return r

                measure(backend_port, None, WARMUP)
                rows["direct"] = measure(backend_port, None, args.duration)
                for target in targets:
                    measure(target.port, target.header, target.warmup)
                    pids = target.pids()
                    before = {pid: _cpu_seconds(pid) for pid in pids}
                    r = measure(target.port, target.header, args.duration)
                    used = {pid: _cpu_seconds(pid) - before[pid] for pid in pids}
                    r["cpu"] = sum(used.values()) / args.duration
                    r["rss"] = sum(_peak_rss_mib(pid) for pid in pids)
                    rows[target.label] = r
                    if target.label == "ingress" and scenario == scenarios[0]:
                        per_process = used
        finally:
            for target in targets:
                target.stop()
            _stop(backend)

    print(
        f"backend={kind} connections={args.connections} duration={args.duration}s "
        f"python={args.python} workers={args.workers} "
        f"proxy-cpus={cpus or 'any'} load-cpus={load or 'any'}"
    )
    for label, reason in skipped.items():
        if label not in labels:
            print(f"skipped {label}: {reason}")
    for scenario, rows in results.items():
        print(f"\n[{scenario}: {SCENARIOS[scenario][0]}]")
        print(HEAD)
        direct = rows["direct"]
        for label in ["direct", *labels]:
            if label in rows:
                print(_row(label, rows[label], direct))
            else:
                print(f"{label:<14}skipped: {skipped.get(label, '?')}")
        ours = rows.get("ingress")
        for ref in refs:
            theirs = rows.get(ref)
            if ours and theirs:
                print(
                    f"ingress / {ref:<8} req/s {ours['rps'] / theirs['rps']:.2f}x"
                    f"  p99 {ours['p99'] / theirs['p99']:.2f}x"
                )
    if args.workers > 1 and per_process:
        busy = ", ".join(f"{pid}: {s / args.duration:.0%}" for pid, s in per_process.items())
        print(f"\ningress CPU per process, first scenario (supervisor first): {busy}")


if __name__ == "__main__":
    main()
