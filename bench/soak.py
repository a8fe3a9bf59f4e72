#!/usr/bin/env python3
"""
Soak test: mixed traffic through a real ingress process while its world
misbehaves, every transfer checked byte for byte, every client-visible
error classified as expected (caused by an injected fault) or unexpected.

    python3 bench/soak.py                       # 600 s, one ingress process
    python3 bench/soak.py --duration 60         # a short run
    python3 bench/soak.py --workers 2           # the ingress with --workers 2

It starts, from this checkout (its own code, whatever is installed):

  - a real C{redis-server} (renew intents on, 60 s interval);
  - two backend processes (this file's C{backend} subcommand, Twisted +
    Autobahn): C{stable}, never touched, and C{flaky}, killed with SIGKILL
    and restarted on the same port every minute;
  - the ingress (C{twistd opensandbox-ingress}, file provider, short idle
    and header timeouts, WebSocket keep-alive pings every 2 s, admin port).

Load, all at once, from this process: 50 keep-alive HTTP clients (one
connection each; GETs and uploads of small and 1 MiB bodies, some uploads
chunked so that both engines serve), 20 WebSocket sessions echoing binary
and text messages of 1 B to 1 MiB (the backend pings every second), 5
server-sent-event streams.  Faults: the sandboxes file churns every 10 s
(add, remove, ready flips) and is broken for 2 s once a minute; the flaky
backend is killed every minute; Redis is stopped for 20 s; every 10 s a
client sends half a request (half a head, or half a body, fixed-length or
chunked) and stalls.  Every 5 s it samples the ingress's RSS, fds and TCP
connections and scrapes C{/metrics}.

It ends with checks and C{N passed, M failed} (exit status 1 if any
failed): no unexpected error, no corrupted byte, each kind of traffic
flowed, RSS growth after warm-up under 20%, fds and connections back to
their baseline once the upstream pool's idle retention (60 s) has passed,
half-sent requests all answered as the contract says (header timeout:
closed; stalled body: 408 C{client_timeout}), the broken file never
touched routing, every busy sandbox renewed within seconds of Redis coming
back, no traceback in the ingress log, no ingress process died.  Not part
of the pytest suite (it takes minutes); see README "Soak test".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The bytes every transfer is cut from (backend and clients build the same
#: one), so a 200 can be checked exactly without sending the expectation.
PATTERN_SIZE = 1024 * 1024 + 65536
PATTERN = random.Random(20261130).randbytes(PATTERN_SIZE)
#: The same, as printable ASCII, for WebSocket text messages.
TEXT_PATTERN = bytes(32 + b % 95 for b in PATTERN)
MIB = 1024 * 1024

# Ingress settings of the soak (short, so that faults resolve within a run).
IDLE_TIMEOUT_S = 15.0
HEADER_TIMEOUT_S = 5.0
WS_PING_S = 2.0
BACKEND_PING_S = 1.0
#: Shorter than the Redis outage, so that busy sandboxes are owed an intent
#: when Redis comes back.
RENEW_INTERVAL_S = 30.0
#: The ingress's backend pool keeps idle connections this long (pool.py
#: POOLED_IDLE_S).
POOL_RETENTION_S = 60.0
#: The file provider polls the file every second; states are judged with slack.
RELOAD_SLACK_S = 3.0
#: After a flaky-backend restart, errors stay expected this long (pooled
#: connections to the dead process are noticed as they fail).
RESTART_SLACK_S = 2.0


def blob(offset: int, size: int) -> bytes:
    """C{size} bytes of the pattern from C{offset} (0 <= offset < 65536, size <= 1 MiB)."""
    return PATTERN[offset : offset + size]


def sse_event(i: int) -> bytes:
    """The C{i}th server-sent event of a stream."""
    return b"id: %d\ndata: %d %s\n\n" % (i, i, PATTERN[i * 16 % 65536 : i * 16 % 65536 + 16].hex().encode())


# =============================================================================
# backend subcommand: HTTP (blob, echo, SSE) and WebSocket echo on one port
# =============================================================================


def run_backend(port: int, ping_s: float) -> None:
    """Serve until killed; print the port once listening."""
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site

    class Echo(WebSocketServerProtocol):  # type: ignore[misc]
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    ws_factory = WebSocketServerFactory()
    ws_factory.protocol = Echo
    ws_factory.setProtocolOptions(
        maxFramePayloadSize=0,
        maxMessagePayloadSize=0,
        autoFragmentSize=0,
        # A backend that pings, as the `websockets` library does (every 20 s
        # there; every second here, so that pings meet long frames often).
        autoPingInterval=ping_s,
        autoPingTimeout=30,
        openHandshakeTimeout=30,
    )

    class Root(Resource):
        isLeaf = True

        def render(self, request: Request) -> Any:
            args: dict[bytes, list[bytes]] = request.args or {}
            path = request.path
            if path == b"/blob":
                size = int(args[b"size"][0])
                offset = int(args[b"off"][0])
                request.setHeader(b"Content-Type", b"application/octet-stream")
                return blob(offset, size)
            if path == b"/echo":
                return cast(Any, request.content).read()
            if path == b"/sse":
                count = int(args[b"n"][0])
                delay = int(args[b"ms"][0]) / 1000
                request.setHeader(b"Content-Type", b"text/event-stream")
                request.write(b"")
                gone: list[bool] = []
                request.notifyFinish().addBoth(lambda _: gone.append(True))

                def emit(i: int) -> None:
                    if gone:
                        return
                    if i == count:
                        request.finish()
                        return
                    request.write(sse_event(i))
                    reactor.callLater(delay, emit, i + 1)  # type: ignore[attr-defined]

                emit(0)
                return NOT_DONE_YET
            request.setResponseCode(404)
            return b"no such path"

    class Top(Resource):
        def getChild(self, name: bytes, request: Request) -> Resource:
            if name == b"ws":
                return cast(Resource, WebSocketResource(ws_factory))
            assert request.postpath is not None and request.prepath is not None
            request.postpath.insert(0, request.prepath.pop())
            return Root()

    site = Site(Top())
    site.noisy = False
    listening: Any = reactor.listenTCP(port, cast(Any, site), backlog=1024, interface="127.0.0.1")
    sys.stdout.write(f"{listening.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


# =============================================================================
# the harness
# =============================================================================


@dataclass
class ErrorRecord:
    """One client-visible error."""

    at: float
    kind: str
    target: str
    detail: str
    expected: bool


@dataclass
class Stats:
    """What the load did, for the report and the checks."""

    http_ok: Counter[str] = field(default_factory=Counter)
    http_bytes: int = 0
    ws_messages: int = 0
    ws_bytes: int = 0
    sse_events: int = 0
    sse_streams: int = 0
    corrupted_bytes: int = 0
    corrupted_transfers: int = 0
    probes: Counter[str] = field(default_factory=Counter)
    errors: list[ErrorRecord] = field(default_factory=list)
    broken_window_ok: int = 0


@dataclass
class Sample:
    """One sample of the ingress processes."""

    t: float
    rss_kib: int
    fds: int
    conns: int
    pids: list[int]
    metrics: dict[str, float]


def proc_children(pid: int) -> list[int]:
    """Direct children of C{pid}."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out += [int(x) for x in text.split()]
    except OSError:
        pass
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def socket_inodes(pid: int) -> tuple[int, set[str]]:
    """Number of fds of C{pid}, and the inodes of its sockets."""
    fds = 0
    inodes: set[str] = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        fds += 1
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return fds, inodes


def tcp_table() -> dict[str, tuple[int, int]]:
    """Socket inode -> (state, remote port) for every TCP socket."""
    table: dict[str, tuple[int, int]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            table[parts[9]] = (int(parts[3], 16), remote_port)
    return table


class Timeline:
    """The sandboxes file's states over time, per sandbox name."""

    def __init__(self) -> None:
        self._events: dict[str, list[tuple[float, str]]] = {}

    def record(self, name: str, state: str, at: float) -> None:
        self._events.setdefault(name, []).append((at, state))

    def states_between(self, name: str, start: float, end: float) -> set[str]:
        """Every state C{name} had at some time in [start, end]."""
        states = {"absent"}
        current = "absent"
        out: set[str] = set()
        for at, state in self._events.get(name, []):
            if at <= start:
                current = state
            elif at <= end:
                out.add(state)
        out.add(current)
        return out or states


class Soak:
    """One soak run; see the module docstring."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.duration: float = args.duration
        self.workers: int = args.workers
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.timeline = Timeline()
        self.kill_windows: list[list[float]] = []  # [killed_at, up_at or inf]
        self.broken_windows: list[tuple[float, float]] = []
        self.redis_outage: list[float] = []  # [stopped_at, started_at]
        self.renew_delays: dict[str, float] = {}
        self.t0 = 0.0
        self.running = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stable_port = 0
        self.flaky_port = 0
        self.flaky: subprocess.Popen[bytes] | None = None
        self.ingress: subprocess.Popen[bytes] | None = None
        self.ingress_port = 0
        self.admin_port = 0
        self.redis: Any = None
        self.sandboxes_path = tmp / "sandboxes.json"
        self.churn: dict[str, bool] = {}  # churn sandbox -> ready
        self.churn_seq = 0
        self.ingress_pids: list[int] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.loops: list[Any] = []

    # -- helpers ---------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self.now():7.1f}s] {text}", flush=True)

    def error(self, kind: str, target: str, detail: str, expected: bool, at: float | None = None) -> None:
        self.stats.errors.append(
            ErrorRecord(self.now() if at is None else at, kind, target, detail[:300], expected)
        )
        if not expected:
            self.log(f"UNEXPECTED {kind} {target}: {detail[:300]}")

    def active(self) -> bool:
        """Whether the load is still on (a call, so that checks after an await are not narrowed away)."""
        return self.running

    async def pause(self, seconds: float) -> None:
        """Sleep up to C{seconds}, returning early once the load stops."""
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            await sleep(min(0.5, deadline - time.monotonic()))

    def in_kill_window(self, start: float, end: float) -> bool:
        for killed, up in self.kill_windows:
            if start <= up + RESTART_SLACK_S and end >= killed - 0.5:
                return True
        return False

    def in_broken_window(self, start: float, end: float) -> bool:
        return any(start <= b and end >= a for a, b in self.broken_windows)

    # -- processes -------------------------------------------------------------

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The ingress (and its workers) must run this checkout's code.
        code = self.args.code
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(argv, cwd=code, env=env, **kwargs)
        self.procs.append(proc)
        return proc

    def start_backend(self, port: int = 0) -> tuple[subprocess.Popen[bytes], int]:
        proc = self.spawn(
            [sys.executable, str(Path(__file__).resolve()), "backend", "--port", str(port),
             "--ping", str(BACKEND_PING_S)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"backend did not start (exit {proc.wait()})")
        return proc, int(line)

    def write_sandboxes(self, broken: bool = False) -> None:
        """Write the sandboxes file atomically, as an operator's tool would."""
        tmp = self.sandboxes_path.with_suffix(".tmp")
        if broken:
            tmp.write_text('[{"name": "stable", "endpoint": ')
        else:
            entries: list[dict[str, Any]] = [
                {"name": "stable", "endpoint": "127.0.0.1"},
                {"name": "flaky", "endpoint": "127.0.0.1"},
            ]
            for name, ready in sorted(self.churn.items()):
                entries.append({"name": name, "endpoint": "127.0.0.1", "ready": ready})
            tmp.write_text(json.dumps(entries))
        tmp.replace(self.sandboxes_path)

    def start_ingress(self) -> None:
        from tests.redis_server import free_port

        self.ingress_port = free_port()
        self.admin_port = free_port()
        log = self.tmp / "ingress.log"
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "-l", str(log), "opensandbox-ingress",
            "--provider-type", "file", "--sandboxes-file", str(self.sandboxes_path),
            "--listen", f"tcp:{self.ingress_port}:interface=127.0.0.1",
            "--admin-listen", f"tcp:{self.admin_port}:interface=127.0.0.1",
            "--log-level", "warn",
            "--idle-timeout", str(IDLE_TIMEOUT_S),
            "--header-timeout", str(HEADER_TIMEOUT_S),
            "--websocket-ping-interval", str(WS_PING_S),
            "--shutdown-timeout", "5",
            "--renew-intent-enabled",
            "--renew-intent-redis-dsn", self.redis.url,
            "--renew-intent-queue-key", "soak:renew",
            "--renew-intent-min-interval", str(RENEW_INTERVAL_S),
            "--workers", str(self.workers),
        ]
        self.ingress = self.spawn(argv, stdin=subprocess.DEVNULL)

    # -- the run -----------------------------------------------------------------

    async def run(self) -> int:
        from tests.redis_server import RedisServer

        self.redis = RedisServer(self.tmp / "redis")
        self.redis.start()
        _, self.stable_port = self.start_backend()
        self.flaky, self.flaky_port = self.start_backend()
        self.write_sandboxes()
        self.start_ingress()
        self.t0 = time.monotonic()
        await self.wait_healthy()
        assert self.ingress is not None
        self.ingress_pids = sorted([self.ingress.pid, *self.all_children(self.ingress.pid)])
        if Path(self.args.code).resolve() == REPO:
            await self.check_own_code()
        # Prime: the renew publisher's Redis connection and a pooled
        # upstream connection exist in the baseline, as in steady state.
        for _ in range(4 * self.workers):
            await self.one_http(None, "stable", "GET", 16, False)
        await sleep(1.0)
        baseline = await self.sample()
        self.log(
            f"baseline: rss {baseline.rss_kib / 1024:.1f} MiB, fds {baseline.fds}, "
            f"connections {baseline.conns}, pids {baseline.pids}"
        )
        self.t0 = time.monotonic()
        self.running = True
        from twisted.internet.defer import DeferredList, ensureDeferred

        tasks = [ensureDeferred(self.http_client(i)) for i in range(self.args.http_clients)]
        tasks += [ensureDeferred(self.ws_session(i)) for i in range(self.args.ws_sessions)]
        tasks += [ensureDeferred(self.sse_stream(i)) for i in range(self.args.sse_streams)]
        tasks.append(ensureDeferred(self.sampler()))
        faults = {
            "churn": self.churner,
            "kill": self.flaky_killer,
            "redis": self.redis_outage_task,
            "probe": self.prober,
        }
        for name in self.args.faults.split(","):
            if name:
                tasks.append(ensureDeferred(faults[name]()))
        await sleep(self.duration)
        self.running = False
        last_loaded = await self.sample()
        self.log("load stopped; waiting for clients to finish")
        await DeferredList(tasks, consumeErrors=False)
        self.log(
            f"clients done; waiting up to {POOL_RETENTION_S + 30:.0f}s for fds and connections "
            "to return to baseline (pool idle retention)"
        )
        settled = await self.wait_settled(baseline, POOL_RETENTION_S + 30)
        self.final_checks(baseline, last_loaded, settled)
        return self.report()

    async def check_own_code(self) -> None:
        """The ingress runs this checkout (the client-timeout metric proves it)."""
        metrics = await self.scrape()
        if not any(k.startswith("opensandbox_ingress_client_errors_total") for k in metrics):
            raise RuntimeError("the ingress does not run this checkout's code")

    def all_children(self, pid: int) -> list[int]:
        out: list[int] = []
        for child in proc_children(pid):
            out.append(child)
            out += self.all_children(child)
        return out

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.ingress is not None
            if self.ingress.poll() is not None:
                raise RuntimeError(f"ingress exited {self.ingress.returncode}: see {self.tmp}/ingress.log")
            try:
                code, _ = await http_simple(f"http://127.0.0.1:{self.ingress_port}/status.ok")
                if code == 200:
                    await http_simple(f"http://127.0.0.1:{self.admin_port}/metrics")
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ingress not healthy within 30 s")
            await sleep(0.2)

    # -- HTTP clients ----------------------------------------------------------

    def target(self) -> tuple[str, int]:
        """A sandbox name and its port: mostly stable, some flaky, some churn."""
        roll = self.rng.random()
        if roll < 0.70 or not self.churn and roll >= 0.85:
            return "stable", self.stable_port
        if roll < 0.85:
            return "flaky", self.flaky_port
        names = sorted(self.churn) + [f"churn-gone-{self.rng.randrange(3)}"]
        return self.rng.choice(names), self.stable_port

    async def http_client(self, index: int) -> None:
        from twisted.internet import reactor
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1  # one keep-alive connection per client
        pool.retryAutomatically = False  # every failure is seen, none hidden
        try:
            while self.running:
                big = self.rng.random() < 0.2
                op = self.rng.choice(["GET", "POST", "POST-chunked"] if big else ["GET", "POST", "GET", "POST-chunked"])
                size = MIB if big else self.rng.randint(1, 4096)
                await self.one_http(pool, None, op, size, True)
        finally:
            await pool.closeCachedConnections()

    async def one_http(self, pool: Any, name: str | None, op: str, size: int, judge: bool) -> None:
        """One request; verify and classify its outcome."""
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers

        if name is None:
            name, port = self.target()
        else:
            port = self.stable_port if name != "flaky" else self.flaky_port
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool, connectTimeout=10)
        offset = self.rng.randrange(65536)
        expected = blob(offset, size)
        headers = Headers({b"OpenSandbox-Ingress-To": [f"{name}-{port}".encode()]})
        base = f"http://127.0.0.1:{self.ingress_port}"
        body: Any = None
        if op == "GET":
            url = f"{base}/blob?size={size}&off={offset}"
        else:
            url = f"{base}/echo"
            body = BytesBody(expected, chunked=op == "POST-chunked")
        started = self.now()
        status = 0
        code = ""
        failure = ""
        data = b""
        try:
            response = await with_timeout(
                agent.request(b"GET" if op == "GET" else b"POST", url.encode(), headers, body), 60
            )
            status = response.code
            code = (response.headers.getRawHeaders(b"opensandbox-ingress-error") or [b""])[0].decode()
            data = await with_timeout(read_body(response), 60)
        except Exception as e:  # noqa: BLE001 - every failure is classified below
            failure = describe(e)
        ended = self.now()
        if not judge:
            if status != 200 or data != expected:
                raise RuntimeError(f"priming request failed: {status} {failure}")
            return
        target = name if not name.startswith("churn") else "churn"
        if not failure and status == 200:
            if data == expected:
                self.stats.http_ok[target] += 1
                self.stats.http_bytes += len(data) + (len(expected) if body is not None else 0)
                if self.in_broken_window(started, ended):
                    self.stats.broken_window_ok += 1
                if name.startswith("churn") and "ready" not in self.timeline.states_between(
                    name, started - RELOAD_SLACK_S, ended
                ):
                    self.error("http", target, f"{op} 200 for {name} which was not ready", False)
                return
            self.corrupted(data, expected)
            self.error("http-corrupt", target, f"{op} {size}B: body differs", False)
            return
        what = f"{op} {size}B: " + (failure or f"{status} {code}")
        if name == "flaky":
            # Refused, cut or timed out while the backend was dead: expected.
            self.error("http", target, what, self.in_kill_window(started, ended), started)
        elif name.startswith("churn") and not failure:
            states = self.timeline.states_between(name, started - RELOAD_SLACK_S, ended)
            fits = (status == 404 and code == "sandbox_not_found" and "absent" in states) or (
                status == 503 and code == "sandbox_not_ready" and "not_ready" in states
            )
            self.error("http", target, f"{what} (states {sorted(states)})", fits, started)
        else:
            self.error("http", target, what, False, started)

    def corrupted(self, got: bytes, want: bytes) -> None:
        common = min(len(got), len(want))
        diff = sum(1 for a, b in zip(got[:common], want[:common]) if a != b)
        self.stats.corrupted_bytes += diff + abs(len(got) - len(want))
        self.stats.corrupted_transfers += 1

    # -- WebSocket sessions ----------------------------------------------------

    async def ws_session(self, index: int) -> None:
        while self.running:
            await self.one_ws_session(index)
            if self.running:
                await sleep(1.0)

    async def one_ws_session(self, index: int) -> None:
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import TCP4ClientEndpoint

        soak = self
        done: Deferred[None] = Deferred()

        class Client(WebSocketClientProtocol):  # type: ignore[misc]
            expected = b""
            binary = True
            timer: Any = None
            closing = False

            def onOpen(self) -> None:
                self.send_next()

            def send_next(self) -> None:
                if not soak.running:
                    self.closing = True
                    self.sendClose(1000)
                    return
                size = min(MIB, int(2 ** soak.rng.uniform(0, 20)))
                offset = soak.rng.randrange(65536)
                self.binary = soak.rng.random() < 0.9
                source = PATTERN if self.binary else TEXT_PATTERN
                self.expected = source[offset : offset + size]
                self.sendMessage(self.expected, self.binary)
                self.timer = reactor.callLater(60, self.stalled)  # type: ignore[attr-defined]

            def stalled(self) -> None:
                self.timer = None
                soak.error("ws", "stable", f"no echo of {len(self.expected)}B within 60 s", False)
                self.closing = True
                cast(Any, self.transport).abortConnection()

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                if self.timer is not None and self.timer.active():
                    self.timer.cancel()
                self.timer = None
                if payload != self.expected or isBinary != self.binary:
                    soak.corrupted(payload, self.expected)
                    soak.error("ws-corrupt", "stable", f"echo of {len(self.expected)}B differs", False)
                else:
                    soak.stats.ws_messages += 1
                    soak.stats.ws_bytes += 2 * len(payload)
                self.send_next()

            def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
                if self.timer is not None and self.timer.active():
                    self.timer.cancel()
                if not self.closing:
                    soak.error("ws", "stable", f"session closed: code {code} {reason!r} clean={wasClean}", False)
                if not done.called:
                    done.callback(None)

        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.ingress_port}/ws",
            headers={"OpenSandbox-Ingress-To": f"stable-{self.stable_port}"},
        )
        factory.protocol = Client
        factory.setProtocolOptions(
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            autoFragmentSize=0,
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.ingress_port, 10)
        try:
            await endpoint.connect(factory)
        except Exception as e:  # noqa: BLE001
            self.error("ws", "stable", f"connect: {describe(e)}", False)
            return
        await done

    # -- server-sent events ------------------------------------------------------

    async def sse_stream(self, index: int) -> None:
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool, connectTimeout=10)
        count = 100
        while self.running:
            url = f"http://127.0.0.1:{self.ingress_port}/sse?n={count}&ms=50"
            headers = Headers({b"OpenSandbox-Ingress-To": [f"stable-{self.stable_port}".encode()]})
            try:
                response = await with_timeout(agent.request(b"GET", url.encode(), headers), 30)
                if response.code != 200:
                    self.error("sse", "stable", f"status {response.code}", False)
                    await read_body(response)
                    continue
                events = await with_timeout(read_events(response, self), 30 + count * 0.05 * 4)
            except Exception as e:  # noqa: BLE001
                self.error("sse", "stable", describe(e), False)
                await sleep(1.0)
                continue
            expected = [sse_event(i) for i in range(count)]
            if events != expected:
                good = sum(1 for a, b in zip(events, expected) if a == b)
                self.corrupted(b"".join(events), b"".join(expected))
                self.error("sse-corrupt", "stable", f"{len(events)} events, {good} as sent", False)
            else:
                self.stats.sse_events += count
                self.stats.sse_streams += 1

    # -- faults ----------------------------------------------------------------

    async def churner(self) -> None:
        """Every 10 s: add, remove or flip a churn sandbox; once a minute, a broken file for 2 s."""
        cycle = 0
        while self.running:
            await self.pause(10)
            if not self.active():
                return
            cycle += 1
            if cycle % 6 == 3:
                start = self.now()
                self.write_sandboxes(broken=True)
                await sleep(2)
                self.write_sandboxes()
                self.broken_windows.append((start, self.now() + RELOAD_SLACK_S))
                self.log("sandboxes file broken for 2 s, then restored")
                continue
            names = sorted(self.churn)
            action = self.rng.choice(["add", "remove", "flip"]) if names else "add"
            if action == "add" and len(names) >= 6:
                action = "remove"
            at = self.now()
            if action == "add":
                self.churn_seq += 1
                name = f"churn-{self.churn_seq}"
                ready = self.rng.random() < 0.7
                self.churn[name] = ready
            elif action == "remove":
                name = self.rng.choice(names)
                del self.churn[name]
            else:
                name = self.rng.choice(names)
                self.churn[name] = not self.churn[name]
            state = "absent" if name not in self.churn else ("ready" if self.churn[name] else "not_ready")
            self.write_sandboxes()
            self.timeline.record(name, state, at)

    async def flaky_killer(self) -> None:
        """Every minute (first at 30 s): SIGKILL the flaky backend, restart it 2 s later."""
        next_at = 30.0
        while self.running:
            await self.pause(max(0.0, next_at - self.now()))
            if not self.active():
                return
            next_at += 60.0
            assert self.flaky is not None
            window = [self.now(), math.inf]
            self.kill_windows.append(window)
            self.flaky.kill()
            self.flaky.wait()
            self.procs.remove(self.flaky)
            await sleep(2.0)
            from twisted.internet.threads import deferToThread

            self.flaky, port = await deferToThread(self.start_backend, self.flaky_port)
            assert port == self.flaky_port
            window[1] = self.now()
            self.log(f"flaky backend killed and restarted ({window[1] - window[0]:.1f}s down)")

    async def redis_outage_task(self) -> None:
        """
        Stop Redis for 20 s at 40% of the run, then time how soon each busy
        sandbox is renewed: by its throttle's next opening, or within
        seconds of the restart if that opening fell inside the outage.
        """
        from twisted.internet.threads import deferToThread

        await self.pause(max(5.0, 0.4 * self.duration - 10))
        if not self.running:
            return
        # The last intent of each sandbox before the outage (the list is
        # lost with the restart: Redis runs without persistence).
        last: dict[str, float] = {}
        for item in await deferToThread(self.renew_list):
            stamp = parse_observed_at(item["observed_at"])
            last[item["sandbox_id"]] = max(last.get(item["sandbox_id"], 0.0), stamp)
        stopped = self.now()
        await deferToThread(self.redis.stop)
        self.log("redis stopped")
        await sleep(20)
        await deferToThread(self.redis.start)
        restarted = self.now()
        restarted_wall = time.time()
        self.redis_outage = [stopped, restarted]
        self.log("redis started again (empty)")
        pending = {"stable", "flaky"}
        due = {
            name: max(restarted_wall, last.get(name, 0.0) + RENEW_INTERVAL_S) for name in pending
        }
        deadline = time.monotonic() + RENEW_INTERVAL_S + 20
        while pending and time.monotonic() < deadline:
            await sleep(0.5)
            items = await deferToThread(self.renew_list)
            seen = time.time()
            for name in {item["sandbox_id"] for item in items} & pending:
                pending.discard(name)
                # How late after it was due (negative: early).
                self.renew_delays[name] = seen - due[name]
                owed = "owed at the restart" if due[name] == restarted_wall else (
                    f"due {due[name] - restarted_wall:.1f}s after the restart"
                )
                self.log(f"renew intent for {name}: {owed}, arrived {seen - restarted_wall:.1f}s after it")
        for name in pending:
            self.renew_delays[name] = math.inf

    def renew_list(self) -> list[dict[str, Any]]:
        client = self.redis.client()
        try:
            return [json.loads(x) for x in client.lrange("soak:renew", 0, -1)]
        except Exception:  # noqa: BLE001 - not up yet
            return []
        finally:
            client.close()

    async def prober(self) -> None:
        """Every 10 s a client sends half a request and stalls; judge what the ingress does."""
        kinds = ["half-head", "half-body", "half-chunked"]
        i = 0
        from twisted.internet.defer import ensureDeferred

        probes = []
        while self.running:
            await self.pause(10)
            if not self.active():
                break
            kind = kinds[i % len(kinds)]
            i += 1
            probes.append(ensureDeferred(self.probe(kind)))
        for d in probes:
            await d

    async def probe(self, kind: str) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.ingress_port), client)
        route = b"OpenSandbox-Ingress-To: stable-%d\r\n" % self.stable_port
        started = time.monotonic()
        assert client.transport is not None
        if kind == "half-head":
            client.transport.write(b"GET /blob?size=1&off=0 HTTP/1.1\r\nHost: x\r\n" + route)
            limit = HEADER_TIMEOUT_S
        elif kind == "half-body":
            client.transport.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\n" + route
                + b"Content-Length: 200000\r\n\r\n" + b"a" * 100000
            )
            limit = IDLE_TIMEOUT_S
        else:
            client.transport.write(
                b"POST /echo HTTP/1.1\r\nHost: x\r\n" + route
                + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % 100000 + b"a" * 100000 + b"\r\n"
            )
            limit = IDLE_TIMEOUT_S
        await client.wait_closed(limit + 10)
        took = time.monotonic() - started
        received = bytes(client.received)
        if not client.lost:
            cast(Any, client.transport).abortConnection()
            self.error("probe", kind, f"still open after {took:.1f}s", False)
            return
        if kind == "half-head":
            ok = received == b"" and took >= HEADER_TIMEOUT_S - 0.5
            detail = f"closed after {took:.1f}s with {len(received)} bytes"
        else:
            ok = received.startswith(b"HTTP/1.1 408 ") and b"client_timeout" in received and (
                took >= IDLE_TIMEOUT_S - 0.5
            )
            detail = f"after {took:.1f}s: {received[:60]!r}"
        if ok:
            self.stats.probes[kind] += 1
        else:
            self.error("probe", kind, detail, False)

    # -- sampling ----------------------------------------------------------------

    async def sample(self) -> Sample:
        assert self.ingress is not None
        pids = [self.ingress.pid, *self.all_children(self.ingress.pid)]
        rss = fds = 0
        inodes: set[str] = set()
        for pid in pids:
            try:
                rss += rss_kib(pid)
                n, ino = socket_inodes(pid)
            except OSError:
                continue
            fds += n
            inodes |= ino
        table = tcp_table()
        redis_port = self.redis.port
        # Established TCP connections, less the renew publishers' Redis
        # connections (one per worker, made with the first intent and kept).
        conns = sum(1 for i in inodes if i in table and table[i][0] == 1 and table[i][1] != redis_port)
        redis_fds = sum(1 for i in inodes if i in table and table[i][1] == redis_port)
        try:
            metrics = await self.scrape()
        except Exception:  # noqa: BLE001
            metrics = {}
        sample = Sample(self.now(), rss, fds - redis_fds, conns, sorted(pids), metrics)
        self.samples.append(sample)
        return sample

    async def scrape(self) -> dict[str, float]:
        _, body = await http_simple(f"http://127.0.0.1:{self.admin_port}/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("opensandbox_ingress_"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    async def sampler(self) -> None:
        last_print = -30.0
        while self.running:
            await self.pause(5)
            if not self.active():
                return
            s = await self.sample()
            if s.t - last_print >= 30:
                last_print = s.t
                unexpected = sum(1 for e in self.stats.errors if not e.expected)
                self.log(
                    f"rss {s.rss_kib / 1024:.1f} MiB, fds {s.fds}, conns {s.conns}; "
                    f"http ok {sum(self.stats.http_ok.values())}, ws msgs {self.stats.ws_messages}, "
                    f"sse events {self.stats.sse_events}; errors {len(self.stats.errors)} "
                    f"({unexpected} unexpected)"
                )

    async def wait_settled(self, baseline: Sample, timeout: float) -> Sample:
        deadline = time.monotonic() + timeout
        while True:
            s = await self.sample()
            if s.fds <= baseline.fds and s.conns <= baseline.conns:
                return s
            if time.monotonic() > deadline:
                return s
            await sleep(5)

    # -- checks and report ---------------------------------------------------------

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def final_checks(self, baseline: Sample, loaded: Sample, settled: Sample) -> None:
        st = self.stats
        unexpected = [e for e in st.errors if not e.expected]
        self.check("no unexpected client-visible error", not unexpected, f"{len(unexpected)} unexpected")
        self.check(
            "no corrupted byte",
            st.corrupted_bytes == 0 and st.corrupted_transfers == 0,
            f"{st.corrupted_bytes} bytes in {st.corrupted_transfers} transfers; "
            f"{st.http_bytes + st.ws_bytes:,} bytes checked",
        )
        self.check(
            "every kind of traffic flowed",
            all(st.http_ok[t] > 0 for t in ("stable", "flaky", "churn"))
            and st.ws_messages > 0 and st.sse_streams > 0,
            f"http ok {dict(st.http_ok)}, ws messages {st.ws_messages}, sse streams {st.sse_streams}",
        )
        warmup = 0.2 * self.duration
        after = [s for s in self.samples if s.t >= warmup and s.t <= self.duration + 1]
        if after:
            base = after[0]
            growth = (loaded.rss_kib - base.rss_kib) / base.rss_kib
            peak = max(s.rss_kib for s in after)
            self.check(
                "RSS growth after warm-up under 20%",
                growth < 0.20,
                f"{base.rss_kib / 1024:.1f} MiB at {base.t:.0f}s -> {loaded.rss_kib / 1024:.1f} MiB "
                f"at {loaded.t:.0f}s ({growth:+.1%}), peak {peak / 1024:.1f} MiB",
            )
        else:
            self.check("RSS growth after warm-up under 20%", False, "no samples after warm-up")
        self.check(
            "fds back to baseline after the pool's idle retention",
            settled.fds <= baseline.fds,
            f"baseline {baseline.fds}, under load {loaded.fds}, after {settled.fds} "
            f"({settled.t - self.duration:.0f}s after the load)",
        )
        self.check(
            "connections back to baseline after the pool's idle retention",
            settled.conns <= baseline.conns,
            f"baseline {baseline.conns}, under load {loaded.conns}, after {settled.conns}",
        )
        expected_probes = self.duration // 10 - 1
        self.check(
            "half-sent requests closed at the header timeout or answered 408",
            sum(st.probes.values()) >= max(1, expected_probes - 1)
            and not any(e.kind == "probe" for e in st.errors),
            f"{dict(st.probes)}",
        )
        # With --workers, /metrics sums every worker's counters.
        client_timeouts = settled.metrics.get(
            'opensandbox_ingress_client_errors_total{reason="timeout"}', -1
        )
        stalls = st.probes["half-body"] + st.probes["half-chunked"]
        self.check(
            "stalled uploads counted as client timeouts",
            client_timeouts == stalls,
            f"client_errors_total{{reason=timeout}} {client_timeouts:.0f}, stalled probes {stalls}",
        )
        self.check(
            "the broken file never touched routing",
            bool(self.broken_windows) and not any(
                e for e in unexpected if self.in_broken_window(e.at, e.at)
            ),
            f"{len(self.broken_windows)} broken windows, {st.broken_window_ok} requests served "
            "in them",
        )
        delays = self.renew_delays
        self.check(
            "busy sandboxes renewed within 8 s of Redis coming back (or of their throttle opening)",
            bool(delays) and all(d <= 8 for d in delays.values()),
            ", ".join(f"{k} {v:+.1f}s" for k, v in sorted(delays.items())) or "no outage",
        )
        log_text = (self.tmp / "ingress.log").read_text(errors="replace")
        tracebacks = log_text.count("Traceback")
        self.check("no traceback in the ingress log", tracebacks == 0, f"{tracebacks} tracebacks")
        assert self.ingress is not None
        pids = sorted([self.ingress.pid, *self.all_children(self.ingress.pid)])
        self.check(
            "no ingress process died",
            self.ingress.poll() is None and pids == self.ingress_pids,
            f"pids {self.ingress_pids} -> {pids}",
        )

    def report(self) -> int:
        st = self.stats
        print()
        print(f"soak: {self.duration:.0f}s, --workers {self.workers}, logs in {self.tmp}")
        print(
            f"traffic: http ok {dict(st.http_ok)} ({st.http_bytes / MIB:,.0f} MiB checked), "
            f"ws messages {st.ws_messages} ({st.ws_bytes / MIB:,.0f} MiB checked), "
            f"sse {st.sse_streams} streams / {st.sse_events} events, probes {dict(st.probes)}"
        )
        expected = Counter(f"{e.kind} {e.target}: {squash(e.detail)}" for e in st.errors if e.expected)
        print(f"expected errors: {sum(expected.values())}")
        for what, n in expected.most_common(30):
            print(f"  {n:6d}  {what}")
        unexpected = [e for e in st.errors if not e.expected]
        print(f"unexpected errors: {len(unexpected)}")
        for e in unexpected[:40]:
            print(f"  [{e.at:7.1f}s] {e.kind} {e.target}: {e.detail}")
        print(f"faults: flaky kills {len(self.kill_windows)}, broken files {len(self.broken_windows)}, "
              f"redis outage {[round(x, 1) for x in self.redis_outage]}")
        samples = self.tmp / "samples.json"
        samples.write_text(json.dumps([s.__dict__ for s in self.samples]))
        (self.tmp / "errors.json").write_text(json.dumps([e.__dict__ for e in st.errors]))
        print(f"samples: {samples}, every error: {self.tmp / 'errors.json'}")
        print()
        for name, ok, detail in self.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        passed = sum(1 for _, ok, _ in self.checks if ok)
        failed = len(self.checks) - passed
        print(f"\n{passed} passed, {failed} failed")
        return 0 if failed == 0 else 1

    def stop_all(self) -> None:
        if self.ingress is not None and self.ingress.poll() is None:
            self.ingress.send_signal(signal.SIGTERM)
            try:
                self.ingress.wait(20)
            except subprocess.TimeoutExpired:
                self.ingress.kill()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()


# -- small Twisted helpers ----------------------------------------------------------


def sleep(seconds: float) -> Any:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


async def with_timeout(d: Any, seconds: float) -> Any:
    """Await C{d} (a Deferred or a coroutine), cancelled after C{seconds}."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    d = ensureDeferred(d)
    d.addTimeout(seconds, reactor)
    return await d


def describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return f"{type(e).__name__}(" + ", ".join(describe(r.value) for r in reasons) + ")"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:200] if text else type(e).__name__


def parse_observed_at(text: str) -> float:
    """An intent's C{observed_at} (RFC 3339, UTC, C{Z}) as Unix seconds."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def squash(detail: str) -> str:
    """An error detail without its varying numbers, for grouping."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", detail)[:140]


class BytesBody:
    """An C{IBodyProducer} of known bytes, sent with a length or chunked."""

    def __init__(self, data: bytes, chunked: bool) -> None:
        from twisted.web.iweb import UNKNOWN_LENGTH

        self.data = data
        self.length: Any = UNKNOWN_LENGTH if chunked else len(data)

    def startProducing(self, consumer: Any) -> Any:
        from twisted.internet.defer import succeed

        for i in range(0, len(self.data), 65536):
            consumer.write(self.data[i : i + 65536])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _body_collector(on_data: Callable[[bytes], None]) -> tuple[Any, Any]:
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol
    from twisted.web.client import ResponseDone

    finished: Deferred[None] = Deferred()

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            on_data(data)

        def connectionLost(self, reason: Any = None) -> None:
            if reason is not None and reason.check(ResponseDone):
                finished.callback(None)
            else:
                finished.errback(reason)

    return Collect(), finished


async def read_body(response: Any) -> bytes:
    """The whole body; a body cut short (even PotentialDataLoss) is an error."""
    parts: list[bytes] = []
    protocol, finished = _body_collector(parts.append)
    response.deliverBody(protocol)
    await finished
    return b"".join(parts)


async def read_events(response: Any, soak: Soak) -> list[bytes]:
    """The events of a server-sent-event stream, as they arrive."""
    buf = bytearray()
    events: list[bytes] = []

    def on_data(data: bytes) -> None:
        buf.extend(data)
        while True:
            end = buf.find(b"\n\n")
            if end == -1:
                return
            events.append(bytes(buf[: end + 2]))
            del buf[: end + 2]

    protocol, finished = _body_collector(on_data)
    response.deliverBody(protocol)
    await finished
    if buf:
        events.append(bytes(buf))
    return events


async def http_simple(url: str) -> tuple[int, bytes]:
    """GET C{url} on a fresh connection: status and body."""
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=5)
    response = await with_timeout(agent.request(b"GET", url.encode()), 10)
    body = await with_timeout(read_body(response), 10)
    return response.code, body


class RawClient(Protocol):
    """A raw TCP client: writes what the probe says, records what arrives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False
        self._closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        if not self._closed.called:
            self._closed.callback(None)

    async def wait_closed(self, seconds: float) -> None:
        from twisted.internet import reactor

        timer: Deferred[None] = Deferred()
        call = reactor.callLater(seconds, timer.callback, None)  # type: ignore[attr-defined]
        self._closed.addBoth(lambda _: timer.callback(None) if not timer.called else None)
        await timer
        if call.active():
            call.cancel()


# -- entry point -------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    backend = sub.add_parser("backend", help="(internal) run one backend process")
    backend.add_argument("--port", type=int, default=0)
    backend.add_argument("--ping", type=float, default=BACKEND_PING_S)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--workers", type=int, default=1, help="the ingress's --workers (1)")
    parser.add_argument("--http-clients", type=int, default=50)
    parser.add_argument("--ws-sessions", type=int, default=20)
    parser.add_argument("--sse-streams", type=int, default=5)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--code", default=str(REPO), help="checkout whose ingress to run (default: this one)"
    )
    parser.add_argument(
        "--faults",
        default="churn,kill,redis,probe",
        help="faults to inject, comma-separated (default all: churn,kill,redis,probe); "
        "the checks that need a missing one fail",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.command == "backend":
        run_backend(args.port, args.ping)
        return
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(args, tmp)
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    code = [1]

    async def body(reactor: Any) -> None:
        try:
            code[0] = await soak.run()
        finally:
            from twisted.internet.threads import deferToThread

            await deferToThread(soak.stop_all)

    try:
        task.react(lambda reactor: ensureDeferred(body(reactor)))
    except SystemExit:
        pass
    finally:
        soak.stop_all()
    sys.exit(code[0])


if __name__ == "__main__":
    main()
