"""
The worker supervisor's timers, in memory: restart backoff and the kill
after the shutdown timeout, driven by a C{MemoryReactorClock} that records
spawned processes instead of forking.

Real processes (sockets shared by workers, SIGTERM drain, a supervisor that
dies) are tested in C{test_workers.py}.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from opensandbox_ingress.config import IngressConfig
from opensandbox_ingress.workers import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    STABLE_AFTER_S,
    WorkerSupervisor,
)

SHUTDOWN_S = 3.0
MARGIN_S = 1.0


@implementer(IListeningPort)
class BoundPort:
    """A listening socket as the supervisor holds it: bound, never read."""

    addressFamily = socket.AF_INET

    def __init__(self, port: int) -> None:
        self._address = IPv4Address("TCP", "127.0.0.1", port)
        self.connected = True
        self.reading = True

    def startListening(self) -> None:
        pass

    def stopReading(self) -> None:
        self.reading = False

    def fileno(self) -> int:
        return 100 + self._address.port

    def getHost(self) -> IPv4Address:
        return self._address

    def stopListening(self) -> None:
        self.connected = False


class Worker:
    """One spawned worker process, as the supervisor's reactor saw it."""

    def __init__(self, protocol: Any, args: list[str], pid: int) -> None:
        self.protocol = protocol
        self.args = args
        self.pid = pid
        self.stdin = b""
        self.signals: list[str] = []

    # the process transport the protocol writes to
    def write(self, data: bytes) -> None:
        self.stdin += data

    def writeToChild(self, fd: int, data: bytes) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    # what the test makes happen
    def exits(self, status: int = 0) -> None:
        reason = ProcessDone(status) if status == 0 else ProcessTerminated(exitCode=status)
        self.protocol.processEnded(Failure(reason))

    def spec(self) -> Any:
        return json.loads(self.stdin.decode())


@implementer(IReactorProcess)
class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose listeners are L{BoundPort}s and whose processes are L{Worker}s."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Worker] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return BoundPort(port or 40000 + len(self.tcpServers))

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: Any,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: Any = False,
        childFDs: Any = None,
    ) -> Any:
        worker = Worker(processProtocol, list(args), 5000 + len(self.spawned))
        self.spawned.append(worker)
        processProtocol.makeConnection(worker)
        return worker


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor()


@pytest.fixture
def supervisor(reactor: ProcessReactor) -> Iterator[WorkerSupervisor]:
    config = IngressConfig(
        provider_type="file",
        sandboxes_file="/sandboxes.yaml",
        workers=2,
        listen=("tcp:41000:interface=127.0.0.1",),
        shutdown_timeout_s=SHUTDOWN_S,
    )
    service = WorkerSupervisor(config, reactor=reactor, kill_margin_s=MARGIN_S)
    service.log_output = Discard()
    yield service


class Discard:
    """A log output that keeps nothing (the supervisor relays worker lines to it)."""

    def write(self, text: str) -> None:
        pass


def latest(reactor: ProcessReactor, index: int) -> Worker:
    """The most recently spawned process of worker C{index}."""
    return [w for w in reactor.spawned if w.spec()["worker"] == index][-1]


def test_each_worker_gets_its_spec_on_stdin_and_runs_the_worker_module(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """Start spawns N workers, each told its index, listener fds and a single-process config."""
    supervisor.startService()
    assert len(reactor.spawned) == 2
    first = reactor.spawned[0]
    assert first.args[1:] == ["-m", "opensandbox_ingress.worker_process", "--worker=0"]
    spec = first.spec()
    assert spec["worker"] == 0
    assert spec["listen"] == [[3, socket.AF_INET, "tcp:41000:interface=127.0.0.1"]]
    assert spec["config"]["workers"] == 1
    assert reactor.spawned[1].spec()["worker"] == 1


def test_a_worker_that_keeps_dying_young_restarts_later_each_time(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """A crash restarts the worker after 0.25 s, doubling per quick crash up to 10 s, and only that worker."""
    supervisor.startService()
    delays = []
    for _ in range(7):
        latest(reactor, 0).exits(1)
        (restart,) = reactor.getDelayedCalls()
        delays.append(round(restart.getTime() - reactor.seconds(), 6))
        before = len(reactor.spawned)
        reactor.advance(delays[-1] - 0.001)
        assert len(reactor.spawned) == before
        reactor.advance(0.002)  # past the timer whatever the float rounding
        assert len(reactor.spawned) == before + 1
    assert delays == [FIRST_BACKOFF_S * 2**i for i in range(6)] + [MAX_BACKOFF_S]
    assert [w.spec()["worker"] for w in reactor.spawned].count(1) == 1


def test_a_worker_that_ran_long_enough_restarts_after_the_first_delay(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """After a stable run the backoff starts again from 0.25 s."""
    supervisor.startService()
    for _ in range(3):
        latest(reactor, 0).exits(1)
        (restart,) = reactor.getDelayedCalls()
        reactor.advance(restart.getTime() - reactor.seconds())
    reactor.advance(STABLE_AFTER_S)
    latest(reactor, 0).exits(1)
    (restart,) = reactor.getDelayedCalls()
    assert restart.getTime() - reactor.seconds() == FIRST_BACKOFF_S


def test_stop_sigterms_then_sigkills_after_the_timeout_plus_margin(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """Stop sends TERM to every worker; one still running shutdown_timeout + margin later gets KILL."""
    supervisor.startService()
    slow, quick = reactor.spawned
    stopped = supervisor.stopService()
    assert slow.signals == quick.signals == ["TERM"]
    quick.exits(0)
    reactor.advance(SHUTDOWN_S + MARGIN_S - 0.001)
    assert slow.signals == ["TERM"]
    assert not stopped.called
    reactor.advance(0.002)
    assert slow.signals == ["TERM", "KILL"]
    assert quick.signals == ["TERM"]
    slow.exits(-9)
    assert stopped.called
    assert reactor.getDelayedCalls() == []


def test_stop_after_every_worker_exited_needs_no_kill(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """Workers that drain in time end the stop at once; the kill timer is cancelled."""
    supervisor.startService()
    stopped = supervisor.stopService()
    for worker in reactor.spawned:
        worker.exits(0)
    assert stopped.called
    assert reactor.getDelayedCalls() == []
    assert all(w.signals == ["TERM"] for w in reactor.spawned)


def test_stop_cancels_a_pending_restart(
    reactor: ProcessReactor, supervisor: WorkerSupervisor
) -> None:
    """A worker waiting to be restarted is not restarted once stopping began."""
    supervisor.startService()
    reactor.spawned[0].exits(1)
    assert len(reactor.getDelayedCalls()) == 1
    supervisor.stopService()
    reactor.spawned[1].exits(0)
    reactor.advance(MAX_BACKOFF_S + SHUTDOWN_S + MARGIN_S)
    assert len(reactor.spawned) == 2
