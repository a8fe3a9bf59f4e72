"""--workers N: a supervisor process and N ingress processes on shared sockets."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from opensandbox_ingress.config import IngressConfig, RenewIntentConfig
from opensandbox_ingress.worker_config import config_from_json, config_to_json
from opensandbox_ingress.worker_process import TaggedOutput
from opensandbox_ingress.workers import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    STABLE_AFTER_S,
    WorkerSupervisor,
)
from tests.processes import (
    REPO,
    TWISTD,
    free_port,
    http_get,
    poll,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
TEXT_ACCESS = re.compile(r" worker=(\d+) pid=(\d+) \[opensandbox_ingress\.access#info\] http .* status=(\d+)")


class Ingress:
    """A running `twistd opensandbox-ingress --workers N` and its collected output."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.err: list[str] = []
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._read, args=(proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for raw in stream:
            with self._lock:
                into.append(raw.decode("utf-8", "replace"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def workers(self) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's start lines."""
        pids: dict[int, int] = {}
        for line in self.output():
            m = STARTED.search(line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        return pids

    def access(self) -> list[tuple[int, int, int]]:
        """(worker, pid, status) of every access line so far, text or JSON."""
        found = []
        for line in self.output():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("namespace") == "opensandbox_ingress.access":
                    found.append((record["worker"], record["pid"], record["status"]))
            else:
                m = TEXT_ACCESS.search(line)
                if m:
                    found.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
        return found

    def stop(self, timeout: float = 40) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(10)


@contextmanager
def ingress(args: list[str], workers: int = 2) -> Iterator[Ingress]:
    running = Ingress(twistd(["--workers", str(workers), *args]))
    try:
        poll(lambda: len(running.workers()) == workers or running.proc.poll() is not None,
             20, "workers started")
        yield running
    finally:
        running.stop()
        # Never leave a worker behind, whatever the test did.
        for pid in running.workers().values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while C{pid} runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def get(port: int, route: str, path: str = "/download?size=3") -> int:
    """One request on a fresh connection; its status (0 if the connection failed)."""
    try:
        return http_get(port, path, {"OpenSandbox-Ingress-To": route})[0]
    except OSError:
        return 0


def load_until(port: int, route: str, done: Callable[[], bool], timeout: float = 30) -> list[int]:
    """Fresh-connection requests from 8 threads until C{done()}; their statuses."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(8) as pool:
        while True:
            statuses += pool.map(lambda _: get(port, route), range(32))
            if done() and len(statuses) >= 64:
                return statuses
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; {len(statuses)} requests sent")


def sandboxes(tmp_path: Path, name: str = "demo") -> Path:
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"name": name, "endpoint": "127.0.0.1"}]))
    return path


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Accepted into the backlog just as the listener closed: ask again.
        return False
    return False


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def test_two_workers_share_tcp_and_unix_listeners_and_stop_together(tmp_path: Path) -> None:
    """Both workers serve the shared TCP socket; the unix socket works; SIGTERM stops all."""
    backend, backend_port = start_stream_backend()
    port, admin = free_port(), free_port()
    unix_path = str(tmp_path / "ingress.sock")
    route = f"demo-{backend_port}"
    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--listen", f"unix:{unix_path}",
         "--admin-listen", f"tcp:{admin}:interface=127.0.0.1"]
    ) as running:
        try:
            wait_healthy(running.proc, port)
            pids = running.workers()
            assert sorted(pids) == [0, 1]
            assert all(parent_of(pid) == running.proc.pid for pid in pids.values())

            statuses = load_until(
                port, route, lambda: {pid for _, pid, _ in running.access()} >= set(pids.values())
            )
            assert set(statuses) == {200}, statuses

            conn = _UnixConnection(unix_path)
            conn.request("GET", "/download?size=4", headers={"OpenSandbox-Ingress-To": route})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"xxxx")
            conn.close()
            # The admin listener is worker 0's.
            assert http_get(admin, "/status.ok")[0] == 200

            sent = time.monotonic()
            running.proc.send_signal(signal.SIGTERM)
            running.proc.wait(20)
            assert time.monotonic() - sent < 10
            assert running.proc.returncode in (0, -signal.SIGTERM)
            poll(lambda: not any(alive(pid) for pid in pids.values()), 5, "workers gone")
            assert refused(port)
            assert not os.path.exists(unix_path)
        finally:
            stop(backend)
    text = "".join(running.output())
    assert "worker 0 (pid" in text and "worker 1 (pid" in text
    assert "all workers stopped" in text
    assert text.count("opensandbox-ingress version=") == 2


def test_killed_worker_is_restarted_and_service_continues(tmp_path: Path) -> None:
    """kill -9 of a worker: it is restarted with a new pid, requests keep succeeding (JSON logs)."""
    backend, backend_port = start_stream_backend()
    port = free_port()
    route = f"demo-{backend_port}"
    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--port", str(port), "--log-format", "json"]
    ) as running:
        try:
            wait_healthy(running.proc, port)
            before = running.workers()
            victim = before[1]
            os.kill(victim, signal.SIGKILL)
            # The survivor keeps serving the shared socket while worker 1 restarts.
            statuses = load_until(port, route, lambda: running.workers()[1] != victim)
            assert set(statuses) == {200}, statuses
            after = running.workers()
            assert after[0] == before[0] and after[1] != victim
            assert parent_of(after[1]) == running.proc.pid
            # The new worker serves too.
            load_until(port, route, lambda: after[1] in {pid for _, pid, _ in running.access()})
        finally:
            stop(backend)
    records = [json.loads(line) for line in running.output() if line.startswith("{")]
    restarts = [r for r in records if "was killed by SIGKILL" in r["message"]]
    assert restarts and restarts[0]["worker"] == 1 and restarts[0]["pid"] == victim
    assert "restarting in" in restarts[0]["message"]
    assert {r.get("worker") for r in records if r["namespace"] == "opensandbox_ingress.access"} == {0, 1}


class GateBackend:
    """A backend that holds each response until released (the request is in flight)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.arrived = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            self.arrived.set()
            self.release.wait(30)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    def close(self) -> None:
        self.release.set()
        self.server.close()


def test_sigterm_drains_in_flight_request_then_everything_exits(tmp_path: Path) -> None:
    """SIGTERM to the supervisor: listeners close, the in-flight request completes, all exit."""
    gate = GateBackend()
    port = free_port()
    result: dict[str, Any] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/slow", headers={"OpenSandbox-Ingress-To": f"demo-{gate.port}"})
        response = conn.getresponse()
        result["status"], result["body"] = response.status, response.read()

    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--shutdown-timeout", "20"]
    ) as running:
        try:
            wait_healthy(running.proc, port)
            pids = running.workers()
            client = threading.Thread(target=slow_request)
            client.start()
            assert gate.arrived.wait(10), "request never reached the backend"
            sent = time.monotonic()
            running.proc.send_signal(signal.SIGTERM)
            poll(lambda: refused(port), 5, "listener closed")
            # The worker holding the request waits for it; the other has gone.
            poll(lambda: sum(alive(pid) for pid in pids.values()) == 1, 5, "one worker draining")
            assert running.proc.poll() is None
            gate.release.set()
            client.join(10)
            assert result == {"status": 200, "body": b"slow"}
            running.proc.wait(10)
            assert running.proc.returncode in (0, -signal.SIGTERM)
            assert time.monotonic() - sent < 10
            assert not any(alive(pid) for pid in pids.values())
        finally:
            gate.close()
    assert "draining: 1 requests in flight" in "".join(running.output())


def test_worker_that_does_not_drain_is_killed_after_the_timeout(tmp_path: Path) -> None:
    """A stuck worker gets SIGKILL at --shutdown-timeout + margin; the supervisor exits."""
    port = free_port()
    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--port", str(port), "--shutdown-timeout", "1"]
    ) as running:
        wait_healthy(running.proc, port)
        pids = running.workers()
        # Stopped before it installs its SIGTERM handler, a worker would
        # still die of the SIGTERM (fatal by default): wait until it serves.
        poll(
            lambda: any(
                f"worker=0 pid={pids[0]} " in line and "listening on" in line
                for line in running.output()
            ),
            20,
            "worker 0 serving",
        )
        os.kill(pids[0], signal.SIGSTOP)  # cannot drain; SIGKILL still works
        sent = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        running.proc.wait(20)
        elapsed = time.monotonic() - sent
        assert not any(alive(pid) for pid in pids.values())
    assert 1 < elapsed < 10, elapsed
    assert "SIGKILL" in "".join(running.output())


def test_workers_exit_when_the_supervisor_dies(tmp_path: Path) -> None:
    """kill -9 of the supervisor: its workers see stdin close, drain and exit."""
    port = free_port()
    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--port", str(port)]
    ) as running:
        wait_healthy(running.proc, port)
        pids = running.workers()
        running.proc.kill()
        running.proc.wait(10)
        poll(lambda: not any(alive(pid) for pid in pids.values()), 15, "orphaned workers exit")


def test_ssl_listener_is_refused_with_workers(tmp_path: Path) -> None:
    """--workers > 1 with an ssl: listener stops with one line naming --workers."""
    from tests.test_listeners import make_certificate

    key, cert = make_certificate(tmp_path)
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "opensandbox-ingress", "--workers", "2",
         "--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--listen", f"ssl:0:privateKey={key}:certKey={cert}"],
        cwd=REPO, capture_output=True, timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opensandbox-ingress: --workers:"), lines
    assert "ssl:" in lines[0]


def test_port_in_use_stops_the_supervisor(tmp_path: Path) -> None:
    """A listener that cannot be bound: one critical line, no workers, the process exits."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "-l", "-", "opensandbox-ingress", "--workers", "2",
             "--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
             "--listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=REPO, capture_output=True, timeout=30,
        )
    out = proc.stdout.decode()
    assert "cannot listen:" in out and "Address already in use" in out
    assert "started (pid" not in out


def test_config_round_trips_through_json() -> None:
    """The configuration handed to workers keeps every field, secrets and nesting included."""
    config = IngressConfig(
        provider_type="file",
        sandboxes_file="/x.json",
        listen=("tcp:1", "unix:/tmp/s"),
        secure_access_keys=(("a", b"\x00secret\xff"),),
        renew_intent=RenewIntentConfig(enabled=True, queue_max_len=7, min_interval_s=1.5),
        workers=3,
    ).validate()
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


def test_restart_backoff_doubles_and_resets() -> None:
    """Quick crashes back off 0.25 s, 0.5 s, ... up to the cap; a stable run resets it."""
    clock = Clock()
    supervisor = WorkerSupervisor(
        IngressConfig(provider_type="file", sandboxes_file="/x", workers=2), reactor=clock
    )
    worker = supervisor.workers[0]
    delays = []
    for _ in range(8):
        supervisor._schedule_restart(worker, 0.5)
        delays.append(worker.restart.getTime() - clock.seconds())
        worker.restart.cancel()
    assert delays[:3] == [FIRST_BACKOFF_S, FIRST_BACKOFF_S * 2, FIRST_BACKOFF_S * 4]
    assert delays[-1] == MAX_BACKOFF_S
    supervisor._schedule_restart(worker, STABLE_AFTER_S)
    assert worker.restart.getTime() - clock.seconds() == FIRST_BACKOFF_S
    worker.restart.cancel()


@pytest.mark.parametrize(
    "fmt, written, expected",
    [
        ("text", "T [ns#info] hello\n", "T worker=1 pid=9 [ns#info] hello\n"),
        ("text", "T [ns#info] a\n\tb\nU [ns#info] c\n",
         "T worker=1 pid=9 [ns#info] a\n\tb\nU worker=1 pid=9 [ns#info] c\n"),
        ("json", '{"time":"t"}\n', '{"worker":1,"pid":9,"time":"t"}\n'),
    ],
)
def test_worker_lines_are_tagged(fmt: str, written: str, expected: str) -> None:
    """Worker log lines carry worker=N pid=P (text) or leading worker/pid fields (JSON)."""
    out: list[str] = []

    class Sink:
        write = out.append

    TaggedOutput(Sink(), fmt, 1, 9).write(written)
    assert "".join(out) == expected



def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_sum_every_worker(tmp_path: Path) -> None:
    """/metrics with --workers 2: both workers' requests summed, process_* of the tree, build info, no _created."""
    backend, backend_port = start_stream_backend()
    port, admin = free_port(), free_port()
    route = f"demo-{backend_port}"
    ok = ("opensandbox_ingress_requests_total",
          (("kind", "http"), ("mode", "header"), ("status_class", "2xx")))
    with ingress(
        ["--provider-type", "file", "--sandboxes-file", str(sandboxes(tmp_path)),
         "--port", str(port), "--admin-listen", f"tcp:{admin}:interface=127.0.0.1"]
    ) as running:
        try:
            wait_healthy(running.proc, port)
            pids = running.workers()
            statuses = load_until(
                port, route, lambda: {pid for _, pid, _ in running.access()} >= set(pids.values())
            )
            assert set(statuses) == {200}
            # Every request's access line is out: the counters are final.
            poll(lambda: len(running.access()) == len(statuses), 10, "all access lines")
            served = {pid: 0 for pid in pids.values()}
            for _, pid, _ in running.access():
                served[pid] += 1
            assert all(served.values()), served  # both workers served some

            status, body = http_get(admin, "/metrics")
            assert status == 200
            text = body.decode()
            samples = _samples(text)
            assert samples[ok] == len(statuses), (samples[ok], served)
            assert samples[("opensandbox_ingress_sandboxes", (("state", "ready"),))] == 1
            assert samples[("opensandbox_ingress_registry_synced", ())] == 1
            assert samples[("process_cpu_seconds_total", ())] > 0
            # Three processes' memory: more than any one of them.
            rss = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                   for pid in [running.proc.pid, *pids.values()]]
            assert samples[("process_resident_memory_bytes", ())] > max(rss)
            (build,) = [k for k in samples if k[0] == "opensandbox_ingress_build_info"]
            assert {name for name, _ in build[1]} == {"version", "commit", "python"}
            assert "_created" not in text
        finally:
            stop(backend)
