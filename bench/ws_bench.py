#!/usr/bin/env python3
"""
WebSocket benchmark: direct-to-backend versus through the ingress, same run.

    python3 bench/ws_bench.py [--duration 5] [--connections 8] [--idle 10000]
                              [--big-mib 256] [--ingress-cpus 0] [--load-cpus 1]

Starts a WebSocket backend (C{bench/ws_peer.py backend}, Autobahn) and the
ingress as a real twistd process (file provider, C{--log-level warn},
default keep-alive pings), pinned with taskset: the ingress to
--ingress-cpus (default CPU 0), the backend and the load generator (its own
process, C{bench/ws_peer.py}) to --load-cpus (default the last CPU).  Then:

- echo throughput for 1 KiB and 64 KiB binary messages over several
  connections, each keeping a bounded window of messages in flight (a new
  one per echo), so throughput is measured, not latency: messages/s and
  MiB/s (payload, counted once per echo), direct and through the ingress,
  with the ratio and the ingress's CPU share;
- one 256 MiB message (a single frame, streamed) to a sink, direct and
  through the ingress, with the ingress's peak RSS growth;
- ingress RSS with 10,000 idle sessions open through it, per-session KiB,
  without and with permessage-deflate negotiated on the client hop.
  Each session costs the ingress two descriptors: RLIMIT_NOFILE is raised
  to the hard limit, and when that is too low the largest count that fits
  is measured (and the table says so).

Each memory figure comes from a fresh ingress process.  Bounded in time
(--timeout, default 480 s); stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
PEER = [sys.executable, str(REPO / "bench" / "ws_peer.py")]
MIB = 1024 * 1024
#: Descriptors kept free in the ingress besides two per session and those
#: it holds when idle (the backend dial may briefly need one more).
FD_SLACK = 8
LOAD_CPUS = str((os.cpu_count() or 1) - 1)


class BenchTimeout(Exception):
    pass


def pinned(cpus: str, argv: list[str]) -> list[str]:
    """C{argv} under C{taskset -c CPUS} ("" = unpinned)."""
    if cpus and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpus, *argv]
    return argv


def status_field(pid: int, field: str) -> int:
    """A C{/proc/PID/status} field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found for {pid}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Everything the bench started, stopped in reverse order at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, cwd=REPO, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15, grace: float = 0) -> None:
        """Stop C{proc}: let it exit by itself for C{grace} s, then SIGTERM, then SIGKILL."""
        if grace and proc.poll() is None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def read_json_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    """The next stdout line of C{proc}, parsed, within C{timeout} seconds."""
    assert proc.stdout is not None
    box: list[bytes] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        raise RuntimeError(f"{what}: no result within {timeout:.0f}s (exit {proc.poll()})")
    result: dict[str, Any] = json.loads(box[0])
    if result.get("error") and "opened" not in result:
        raise RuntimeError(f"{what}: {result['error']}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {url}") from None
            time.sleep(0.05)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.backend_port = 0
        self.backend_pid = 0
        self.ingresses = 0

    # -- processes -------------------------------------------------------------

    def start_backend(self) -> None:
        proc = self.procs.start(
            pinned(self.args.load_cpus, [*PEER, "backend"]), stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        self.backend_port = int(proc.stdout.readline())
        self.backend_pid = proc.pid

    @contextmanager
    def ingress(self) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
        """A fresh ingress process routing sandbox C{ws} to 127.0.0.1."""
        self.ingresses += 1
        sandboxes = self.tmp / "sandboxes.json"
        sandboxes.write_text('[{"name": "ws", "endpoint": "127.0.0.1"}]')
        port = free_port()
        log = self.tmp / f"ingress-{self.ingresses}.log"
        argv = [
            self.args.python, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "-l", str(log), "opensandbox-ingress",
            "--provider-type", "file", "--sandboxes-file", str(sandboxes),
            "--port", str(port), "--log-level", "warn", "--shutdown-timeout", "5",
        ]
        with open(log, "ab") as out:
            proc = self.procs.start(
                pinned(self.args.ingress_cpus, argv), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_http(f"http://127.0.0.1:{port}/status.ok")
            yield proc, port
        finally:
            self.procs.stop(proc)

    def url(self, port: int | None, path: str) -> list[str]:
        """Load-generator arguments for C{path} direct (None) or through the ingress."""
        if port is None:
            return [f"ws://127.0.0.1:{self.backend_port}{path}"]
        return [
            f"ws://127.0.0.1:{port}{path}",
            "--header", f"OpenSandbox-Ingress-To: ws-{self.backend_port}",
        ]

    def peer(self, argv: list[str], timeout: float, what: str) -> dict[str, Any]:
        """Run a load generator to completion; its JSON result."""
        proc = self.procs.start(
            pinned(self.args.load_cpus, [*PEER, *argv]),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            return read_json_line(proc, timeout, what)
        finally:
            self.procs.stop(proc, timeout=5, grace=10)

    # -- measurements -------------------------------------------------------------

    def throughput(self) -> list[dict[str, Any]]:
        args = self.args
        rows = []
        with self.ingress() as (ingress, port):
            for size, window in ((1024, args.window_small), (64 * 1024, args.window_large)):
                common = [
                    "--size", str(size), "--connections", str(args.connections),
                    "--window", str(window), "--warmup", str(args.warmup),
                    "--duration", str(args.duration),
                ]
                bound = args.warmup + args.duration + 30
                label = f"{size // 1024} KiB"
                runs: dict[str, dict[str, Any]] = {}
                # Alternate direct and ingress runs; keep each one's best (the
                # load shares a CPU with the backend, so a run can lose a
                # scheduling slice to noise).
                for _ in range(args.repeat):
                    for target, via in (("direct", None), ("ingress", port)):
                        pids = (self.backend_pid, ingress.pid)
                        before = [cpu_seconds(pid) for pid in pids]
                        result = self.peer(
                            ["throughput", *self.url(via, "/echo"), *common], bound,
                            f"{label} {target}",
                        )
                        # CPU shares over warm-up + measurement (the load
                        # generator reports its own over the measurement).
                        spent = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                        result["backend_cpu"], result["ingress_cpu"] = (
                            s / (args.warmup + args.duration) for s in spent
                        )
                        rate = result["messages"] / result["seconds"]
                        best = runs.get(target)
                        if best is None or rate > best["messages"] / best["seconds"]:
                            runs[target] = result
                rows.append({"label": label, "window": window, **runs})
        return rows

    def big(self) -> dict[str, Any]:
        size = self.args.big_mib * MIB
        bound = 60 + size / (20 * MIB)
        direct = self.peer(["big", *self.url(None, "/sink"), "--size", str(size)], bound, "big direct")
        with self.ingress() as (ingress, port):
            # Warm the path (first session, first frames) before the baseline.
            self.peer(["big", *self.url(port, "/sink"), "--size", str(MIB)], 30, "big warm-up")
            baseline = status_field(ingress.pid, "VmRSS")
            exact_peak = reset_peak(ingress.pid)
            sampled = [baseline]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.005):
                    try:
                        sampled.append(status_field(ingress.pid, "VmRSS"))
                    except (OSError, RuntimeError):
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                proxied = self.peer(
                    ["big", *self.url(port, "/sink"), "--size", str(size)], bound, "big ingress"
                )
            finally:
                done.set()
                sampler.join()
            peak = max(sampled)
            if exact_peak:
                peak = max(peak, status_field(ingress.pid, "VmHWM"))
        return {
            "size": size, "direct": direct, "ingress": proxied, "baseline": baseline,
            "peak": peak, "exact_peak": exact_peak,
        }

    def hold_idle(
        self, port: int, count: int, ingress: subprocess.Popen[bytes], deflate: bool = False
    ) -> dict[str, Any]:
        """
        Open C{count} idle sessions through the ingress; RSS while they are
        open.  With C{deflate}, each negotiates permessage-deflate and
        echoes one message first.
        """
        path, extra = ("/echo", ["--deflate"]) if deflate else ("/idle", [])
        proc = self.procs.start(
            pinned(
                self.args.load_cpus,
                [*PEER, "idle", *self.url(port, path), "--count", str(count),
                 "--concurrency", str(self.args.concurrency), *extra],
            ),
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        try:
            result = read_json_line(proc, 60 + count / 20, f"{count} idle sessions")
            # Settle: RSS read until two reads 100 ms apart agree within 1%
            # (at most 2 s), the sessions being all open already.
            rss = status_field(ingress.pid, "VmRSS")
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                time.sleep(0.1)
                again = status_field(ingress.pid, "VmRSS")
                if abs(again - rss) <= rss / 100:
                    rss = max(rss, again)
                    break
                rss = again
            result["rss"] = rss
            assert proc.stdin is not None
            proc.stdin.write(b"done\n")
            proc.stdin.flush()
            return result
        finally:
            self.procs.stop(proc, timeout=5, grace=30)

    def idle(self, hard: int, deflate: bool = False) -> dict[str, Any]:
        wanted = self.args.idle
        with self.ingress() as (ingress, port):
            self.hold_idle(port, min(100, wanted), ingress, deflate)  # warm-up
            baseline = status_field(ingress.pid, "VmRSS")
            # Two descriptors per session (client and backend sockets) on
            # top of what the idle ingress holds, with a little slack.
            fds = len(os.listdir(f"/proc/{ingress.pid}/fd"))
            count = min(wanted, (hard - fds - FD_SLACK) // 2)
            result = self.hold_idle(port, count, ingress, deflate)
        return {
            "wanted": wanted, "count": count, "fds": fds, "baseline": baseline,
            "deflate": deflate, **result,
        }


def report(
    args: argparse.Namespace,
    limits: tuple[int, int],
    rows: list[dict[str, Any]],
    big: dict[str, Any] | None,
    idles: list[dict[str, Any]],
) -> None:
    python = subprocess.run(
        [args.python, "-c", "import sys; print(sys.implementation.name, sys.version.split()[0])"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    print(
        f"ws_bench: python={python} ingress-cpus={args.ingress_cpus or 'any'} "
        f"load-cpus={args.load_cpus or 'any'} connections={args.connections} "
        f"duration={args.duration}s RLIMIT_NOFILE soft/hard={limits[0]}/{limits[1]}"
    )
    if rows:
        print(
            f"\nbinary echo, {args.connections} connections x window messages in flight "
            "(MiB/s = payload echoed, counted once)"
        )
        print(
            f"{'message':<9}{'window':>7}{'direct msg/s':>14}{'ingress msg/s':>15}"
            f"{'direct MiB/s':>14}{'ingress MiB/s':>15}{'ratio':>7}"
            f"{'CPU ingress':>13}{'load+backend':>14}"
        )
        for r in rows:
            d, p = r["direct"], r["ingress"]
            dm, pm = d["messages"] / d["seconds"], p["messages"] / p["seconds"]
            db, pb = d["bytes"] / d["seconds"] / MIB, p["bytes"] / p["seconds"] / MIB
            print(
                f"{r['label']:<9}{r['window']:>7}{dm:>14.0f}{pm:>15.0f}{db:>14.1f}{pb:>15.1f}"
                f"{pm / dm:>7.2f}{p['ingress_cpu']:>13.0%}"
                f"{d['cpu'] + d['backend_cpu']:>6.0%} / {p['cpu'] + p['backend_cpu']:.0%}"
            )
        print("(load+backend CPU: direct run / ingress run, on the load CPUs)")
    if big:
        d, p = big["direct"], big["ingress"]
        mib = big["size"] // MIB
        print(f"\none {mib} MiB binary message (single frame) to a sink")
        print(
            f"{'target':<9}{'seconds':>9}{'MiB/s':>9}{'ratio':>7}"
            f"{'ingress RSS MiB: before':>25}{'peak':>8}{'growth':>8}"
        )
        print(f"{'direct':<9}{d['seconds']:>9.2f}{mib / d['seconds']:>9.0f}")
        growth = (big["peak"] - big["baseline"]) / 1024
        print(
            f"{'ingress':<9}{p['seconds']:>9.2f}{mib / p['seconds']:>9.0f}"
            f"{d['seconds'] / p['seconds']:>7.2f}{big['baseline'] / 1024:>25.1f}"
            f"{big['peak'] / 1024:>8.1f}{growth:>+8.1f}"
        )
        print(
            "(peak: VmHWM reset before the message)"
            if big["exact_peak"]
            else "(peak: VmRSS sampled every 5 ms)"
        )
    if idles:
        print("\nidle sessions through the ingress (deflate: negotiated, one message echoed)")
        print(
            f"{'client hop':<12}{'sessions':>9}{'RSS before MiB':>16}{'RSS open MiB':>14}"
            f"{'KiB/session':>13}"
        )
    for idle in idles:
        opened = idle["opened"]
        per = (idle["rss"] - idle["baseline"]) / opened if opened else float("nan")
        label = f"deflate {idle.get('compressed', 0)}" if idle["deflate"] else "plain"
        print(
            f"{label:<12}{opened:>9}{idle['baseline'] / 1024:>16.1f}{idle['rss'] / 1024:>14.1f}"
            f"{per:>13.1f}"
        )
        if idle["count"] < idle["wanted"]:
            print(
                f"note: RLIMIT_NOFILE hard limit {limits[1]} is too low for {idle['wanted']} "
                f"sessions (the ingress needs 2 descriptors each + {idle['fds']} of its own); measured "
                f"{idle['count']}; raise `ulimit -Hn` for the full count"
            )
        if idle.get("error"):
            print(f"note: stopped at {opened} sessions: {idle['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1, help="seconds before each measurement")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs per target; the best is kept")
    parser.add_argument("--window-small", type=int, default=128, help="1 KiB messages in flight per connection")
    parser.add_argument("--window-large", type=int, default=16, help="64 KiB messages in flight per connection")
    parser.add_argument("--idle", type=int, default=10000, help="idle sessions for the RSS figure (0 = skip)")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight while opening them")
    parser.add_argument(
        "--idle-compression", choices=("off", "on", "both"), default="both",
        help="idle sessions without and/or with permessage-deflate negotiated",
    )
    parser.add_argument("--big-mib", type=int, default=256, help="single message size (0 = skip)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the ingress")
    parser.add_argument("--ingress-cpus", default="0", help="taskset CPU list for the ingress ('' = unpinned)")
    parser.add_argument("--load-cpus", default=LOAD_CPUS, help="taskset CPU list for backend and load")
    parser.add_argument("--timeout", type=int, default=480, help="overall bound in seconds")
    args = parser.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)

    def expired(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"bench exceeded --timeout {args.timeout}s")

    signal.signal(signal.SIGALRM, expired)
    signal.signal(signal.SIGTERM, expired)
    signal.alarm(args.timeout)
    procs = Processes()
    rows: list[dict[str, Any]] = []
    big = None
    idles: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as name:
            bench = Bench(args, Path(name), procs)
            try:
                bench.start_backend()
                rows = bench.throughput()
                if args.big_mib:
                    big = bench.big()
                if args.idle:
                    for deflate in {"off": [False], "on": [True], "both": [False, True]}[
                        args.idle_compression
                    ]:
                        idles.append(bench.idle(limits[1], deflate))
            except BaseException:
                for log in sorted(Path(name).glob("ingress-*.log")):
                    tail: IO[str]
                    with open(log) as tail:
                        lines = tail.readlines()[-20:]
                    if lines:
                        sys.stderr.write(f"--- {log.name} (tail)\n{''.join(lines)}")
                raise
            finally:
                signal.alarm(0)
                procs.stop_all()
    finally:
        procs.stop_all()
    report(args, limits, rows, big, idles)


if __name__ == "__main__":
    try:
        main()
    except BenchTimeout as e:
        raise SystemExit(f"ws_bench: {e}; everything it started was stopped") from None
