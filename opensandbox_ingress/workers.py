"""
Multi-process mode (C{--workers N}, N > 1): one supervisor, N ingress
processes sharing the listening sockets.

The supervisor (the twistd process) binds every listener once, then runs N
workers (C{python -m opensandbox_ingress.workers}), each inheriting the
bound sockets as file descriptors 3, 4, ... and serving them with
C{reactor.adoptStreamPort}.  Every worker accepts from the same kernel
socket, so the kernel spreads connections across them; each worker is a
whole ingress built from the same configuration (its own registry, source,
upstream pool and renew publisher).

The supervisor:

 - hands each worker its configuration as one JSON line on the worker's
   stdin (never in argv or the environment: it may carry secrets) and keeps
   that pipe open; a worker whose stdin reaches EOF (supervisor gone, even
   by SIGKILL) drains and exits;
 - relays the workers' stdout (log lines, already tagged with C{worker=}
   and C{pid=} by the worker) to its own log output, whole lines only, so
   lines from different workers never interleave; worker stderr becomes
   supervisor log events;
 - restarts a worker that exits (crash, non-zero status, killed) after a
   backoff that doubles while it keeps dying young (L{FIRST_BACKOFF_S} up to
   L{MAX_BACKOFF_S});
 - on SIGTERM sends SIGTERM to every worker (each drains as a single
   process does, within C{--shutdown-timeout}), closes its own copy of the
   sockets, and exits once all workers are gone; a worker still running
   C{shutdown_timeout + kill_margin_s} later gets SIGKILL.

Limits: listeners must be C{tcp:}, C{tcp6:}, C{unix:} or C{systemd:}
(an C{ssl:} listener is refused with a L{ConfigError} naming C{--workers}:
terminate TLS in front or run one process).  The admin listener
(C{--admin-listen}) is bound by the supervisor too but served by worker 0
only: its routing view describes worker 0, while its C{/metrics} is the
whole tree's, merged by the supervisor over two extra pipes per worker
(L{opensandbox_ingress.tree_metrics}).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import site
import sys
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ConfigError, IngressConfig
from .secret_files import DSN_ENV
from .tree_metrics import SupervisorSide, TreeMetrics, WorkerSide

#: Delay before the first restart of a crashed worker; doubles per quick crash.
FIRST_BACKOFF_S = 0.25
#: Longest delay between restarts of a worker that keeps crashing.
MAX_BACKOFF_S = 10.0
#: A worker that ran this long before dying restarts after FIRST_BACKOFF_S.
STABLE_AFTER_S = 10.0
#: Seconds past --shutdown-timeout before a worker that has not exited is killed.
KILL_MARGIN_S = 5.0
#: Connections a worker accepts per readiness wake-up.  Twisted accepts up
#: to 100+ in a row; with several processes on one socket that hands a burst
#: of keep-alive connections to whichever worker woke first.  Accepting one
#: at a time lets the least busy worker take the next one (nginx's default).
ACCEPTS_PER_WAKEUP = 1

_SHAREABLE = (TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint, AdoptedStreamServerEndpoint)
_FIRST_CHILD_FD = 3


def check_shareable(config: IngressConfig, reactor: Any = None) -> None:
    """
    Raise L{ConfigError} (naming C{--workers}) unless every listener can be
    bound once and shared by worker processes.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    for flag, descriptions in (("listen", config.listen), ("admin-listen", config.admin_listen)):
        for description in descriptions:
            endpoint = serverFromString(reactor, description)
            if not isinstance(endpoint, _SHAREABLE):
                kind = description.split(":", 1)[0]
                raise ConfigError(
                    "workers",
                    f"--{flag} {kind}: cannot be shared by {config.workers} worker "
                    "processes; use tcp:, tcp6:, unix: or systemd: listeners "
                    "(terminate TLS in front) or --workers 1",
                )


# -- configuration over a pipe ----------------------------------------------


def config_to_json(config: IngressConfig) -> Any:
    """A JSON-friendly form of C{config} (bytes as base64, tuples as lists)."""
    return _encode(config)


def config_from_json(data: Any) -> IngressConfig:
    """The inverse of L{config_to_json}; the result is validated."""
    return _decode_dataclass(IngressConfig, data).validate()


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot pass a {type(value).__name__} to a worker process")


def _decode_dataclass(cls: Any, data: dict[str, Any]) -> Any:
    defaults = cls()
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            default = getattr(defaults, f.name)
            if is_dataclass(default):
                kwargs[f.name] = _decode_dataclass(type(default), data[f.name])
            else:
                kwargs[f.name] = _decode(data[f.name])
    return cls(**kwargs)


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value


# -- supervisor ---------------------------------------------------------------


class SharedByWorkers(Factory):
    """The supervisor's own sockets are never read; workers accept."""

    noisy = False


@dataclass
class _Bound:
    port: Any
    family: int
    description: str
    admin: bool


@dataclass
class _Worker:
    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    failures: int = 0
    restart: Any = None


class WorkerSupervisor(Service):
    """
    Binds C{config.listen} (and C{config.admin_listen}) once and keeps
    C{config.workers} ingress processes serving them.

    @ivar log_observer: the ILogObserver installed on the twistd application.
    @ivar log_output: where relayed worker lines go (a L{LogOutput}; default
        C{sys.stdout}).
    """

    _log = Logger()

    def __init__(
        self,
        config: IngressConfig,
        reactor: Any = None,
        kill_margin_s: float = KILL_MARGIN_S,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        config.validate()
        check_shareable(config, reactor)
        self.config = config
        self.reactor = reactor
        self.kill_margin_s = kill_margin_s
        self.log_observer: Any = None
        self.log_output: Any = None
        self.workers = [_Worker(i) for i in range(config.workers)]
        self._bound: list[_Bound] | None = None
        self._stopping = False
        self._all_gone: list[Deferred[None]] = []
        #: Merges the workers' metrics for worker 0's /metrics.
        self.tree_metrics = TreeMetrics(reactor)
        # Workers are single-process ingresses; this is their configuration.
        self._config_json = config_to_json(replace(config, workers=1))

    def setServiceParent(self, parent: Any) -> None:
        # Same as IngressService: twistd uses the application's ILogObserver.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    # starting

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if self._bound is None:
            self._bind()
        if not self._bound:
            return
        self._log.info(
            "supervising {workers} worker processes (pid {pid})",
            workers=len(self.workers),
            pid=os.getpid(),
        )
        for worker in self.workers:
            self._spawn(worker)

    def _bind(self) -> None:
        self._bound = []
        factory = SharedByWorkers()
        try:
            for admin, descriptions in ((False, self.config.listen), (True, self.config.admin_listen)):
                for description in descriptions:
                    port = _listen_now(serverFromString(self.reactor, description), factory)
                    # Bound and listening; never accepted from here.
                    port.stopReading()
                    self._bound.append(_Bound(port, port.addressFamily, description, admin))
                    self._log.info(
                        "listening on {description} ({address}){admin}",
                        description=description,
                        address=_address(port),
                        admin=" for worker 0 (admin)" if admin else "",
                    )
        except Exception as e:
            self._log.critical("cannot listen: {error}", error=str(e))
            for bound in self._bound:
                self._close(bound)
            self._bound = []
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

    def addresses(self) -> list[Any]:
        """The bound addresses of the proxy listeners."""
        return [b.port.getHost() for b in self._bound or () if not b.admin]

    # workers

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        if self._stopping:
            return
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        listen: list[list[Any]] = []
        admin: list[list[Any]] = []
        fd = _FIRST_CHILD_FD
        for bound in self._bound or ():
            if bound.admin and worker.index != 0:
                continue
            child_fds[fd] = bound.port.fileno()
            (admin if bound.admin else listen).append([fd, bound.family, bound.description])
            fd += 1
        # The metrics channel: the worker reads to_worker, writes from_worker.
        to_worker, from_worker = fd, fd + 1
        child_fds[to_worker] = "w"
        child_fds[from_worker] = "r"
        spec = {
            "worker": worker.index,
            "config": self._config_json,
            "listen": listen,
            "admin": admin,
            "metrics": [to_worker, from_worker],
        }
        protocol = _WorkerProtocol(self, worker, json.dumps(spec).encode() + b"\n")
        argv = [sys.executable, "-m", "opensandbox_ingress.workers", f"--worker={worker.index}"]
        try:
            process = self.reactor.spawnProcess(
                protocol, sys.executable, argv, env=_worker_environment(), childFDs=child_fds
            )
        except Exception as e:
            self._log.error(
                "worker {worker}: cannot start: {error}", worker=worker.index, error=str(e)
            )
            self._schedule_restart(worker, 0.0)
            return
        worker.process = process
        worker.pid = process.pid

        def write(data: bytes) -> None:
            try:
                process.writeToChild(to_worker, data)
            except (KeyError, OSError):  # the pipe is already closed
                pass

        protocol.attach_metrics(self.tree_metrics.attach(worker.index, write), from_worker)
        worker.started = self.reactor.seconds()
        self._log.info(
            "worker {worker} started (pid {pid})", worker=worker.index, pid=worker.pid
        )

    def _worker_ended(self, worker: _Worker, reason: Failure) -> None:
        pid, worker.process = worker.pid, None
        how = _describe_exit(reason.value)
        if self._stopping:
            self._log.info(
                "worker {worker} (pid {pid}) {how}", worker=worker.index, pid=pid, how=how
            )
            if all(w.process is None for w in self.workers):
                waiters, self._all_gone = self._all_gone, []
                for d in waiters:
                    d.callback(None)
            return
        self._schedule_restart(worker, self.reactor.seconds() - worker.started, pid, how)

    def _schedule_restart(
        self, worker: _Worker, ran: float, pid: int | None = None, how: str = "did not start"
    ) -> None:
        if ran >= STABLE_AFTER_S:
            worker.failures = 0
        worker.failures += 1
        delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (worker.failures - 1))
        self._log.error(
            "worker {worker} (pid {pid}) {how} after {ran}s; restarting in {delay}s",
            worker=worker.index,
            pid=pid,
            how=how,
            ran=round(ran, 1),
            delay=delay,
        )
        worker.restart = self.reactor.callLater(delay, self._spawn, worker)

    def _relay(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        if self.log_output is not None:
            self.log_output.write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def _relay_stderr(self, worker: _Worker, data: bytes) -> None:
        self._log.warn(
            "worker {worker} (pid {pid}) stderr: {text}",
            worker=worker.index,
            pid=worker.pid,
            text=data.decode("utf-8", "replace").rstrip("\n"),
        )

    # stopping

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        self._stopping = True
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        live = [w for w in self.workers if w.process is not None]
        self._log.info(
            "stopping: SIGTERM to {count} workers (shutdown timeout {timeout}s)",
            count=len(live),
            timeout=self.config.shutdown_timeout_s,
        )
        for worker in live:
            _signal(worker, "TERM")
        # Once every worker has closed its copy too, the sockets are gone:
        # new connections are refused (a unix socket's path is removed now).
        bound, self._bound = self._bound or [], []
        await DeferredList([self._close(b) for b in bound])
        if not live:
            return
        gone: Deferred[None] = Deferred()
        if all(w.process is None for w in self.workers):
            gone.callback(None)
        else:
            self._all_gone.append(gone)
        killer = self.reactor.callLater(
            self.config.shutdown_timeout_s + self.kill_margin_s, self._kill_remaining
        )
        await gone
        if killer.active():
            killer.cancel()
        self._log.info("all workers stopped")

    def _kill_remaining(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                self._log.warn(
                    "worker {worker} (pid {pid}) still running {seconds}s after SIGTERM; SIGKILL",
                    worker=worker.index,
                    pid=worker.pid,
                    seconds=self.config.shutdown_timeout_s + self.kill_margin_s,
                )
                _signal(worker, "KILL")

    def _close(self, bound: _Bound) -> Deferred[Any]:
        # Closing must not shutdown() the socket: workers still serve it.
        if hasattr(bound.port, "_shouldShutdown"):
            bound.port._shouldShutdown = False
        if not getattr(bound.port, "connected", False):
            return succeed(None)
        result = bound.port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)


def _listen_now(endpoint: Any, factory: Any) -> Any:
    """Listen on one of the L{_SHAREABLE} endpoints, which do so synchronously."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{getattr(host, 'host', '')}:{host.port}"
    name = getattr(host, "name", host)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def _describe_exit(value: Any) -> str:
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {getattr(value, 'exitCode', 0) or 0}"


def _signal(worker: _Worker, name: str) -> None:
    try:
        worker.process.signalProcess(name)
    except (ierror.ProcessExitedAlready, OSError):
        pass


def _worker_environment() -> dict[str, str]:
    """
    The supervisor's environment; when the package is not installed (a
    source checkout), its directory goes first on PYTHONPATH so workers run
    the same code.
    """
    env = dict(os.environ)
    # Workers get the resolved DSN with their configuration, on stdin; a
    # secret need not sit in one more process's environment.
    env.pop(DSN_ENV, None)
    root = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class _WorkerProtocol(ProcessProtocol):
    """One worker process: its configuration in, its log lines out."""

    def __init__(self, supervisor: WorkerSupervisor, worker: _Worker, spec: bytes) -> None:
        self._supervisor = supervisor
        self._worker = worker
        self._spec = spec
        self._out = b""
        self._err = b""
        self._metrics: SupervisorSide | None = None
        self._metrics_fd = -1

    def attach_metrics(self, channel: SupervisorSide, fd: int) -> None:
        """Feed what the worker writes on C{fd} to its metrics C{channel}."""
        self._metrics = channel
        self._metrics_fd = fd

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self._metrics_fd and self._metrics is not None:
            self._metrics.data_received(data)
        else:
            super().childDataReceived(childFD, data)

    def connectionMade(self) -> None:
        # stdin stays open: its EOF tells the worker the supervisor is gone.
        assert self.transport is not None
        self.transport.write(self._spec)

    def outReceived(self, data: bytes) -> None:
        data = self._out + data if self._out else data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > 1 << 20:  # a "line" this long: pass it on
            data += b"\n"
            cut = len(data)
        self._out = data[cut:]
        if cut:
            self._supervisor._relay(data[:cut])

    def errReceived(self, data: bytes) -> None:
        data = self._err + data
        cut = data.rfind(b"\n") + 1
        self._err = data[cut:]
        if cut:
            self._supervisor._relay_stderr(self._worker, data[:cut])

    def processEnded(self, reason: Failure) -> None:
        if self._out:
            self._supervisor._relay(self._out + b"\n")
        if self._err:
            self._supervisor._relay_stderr(self._worker, self._err)
        self._out = self._err = b""
        if self._metrics is not None:
            self._supervisor.tree_metrics.detach(self._metrics)
        self._supervisor._worker_ended(self._worker, reason)


# -- worker -------------------------------------------------------------------


class TaggedOutput:
    """
    Tags every line a worker writes with its worker number and pid:
    C{TIME worker=N pid=P [namespace#level] ...} in text, and leading
    C{"worker":N,"pid":P} fields in JSON.  Wraps a L{LogOutput}.
    """

    def __init__(self, output: Any, fmt: str, worker: int, pid: int) -> None:
        self._output = output
        self._json = fmt == "json"
        self.tag = f"worker={worker} pid={pid} "
        self._json_tag = f'{{"worker":{worker},"pid":{pid},'

    def write(self, text: str) -> None:
        if self._json:
            # One JSON object per write.
            if text.startswith("{"):
                text = self._json_tag + text[1:]
        elif text.count("\n") <= 1:
            text = self._tag_line(text)
        else:
            text = "\n".join(
                line if not line or line[0] == "\t" else self._tag_line(line)
                for line in text.split("\n")
            )
        self._output.write(text)

    def _tag_line(self, line: str) -> str:
        # After the leading timestamp, which has no spaces.
        cut = line.find(" ") + 1
        return line[:cut] + self.tag + line[cut:]

    def as_file(self) -> Any:
        """A file-like view for C{textFileLogObserver}; flushing is scheduled."""
        return _Unflushed(self.write)


class _Unflushed:
    def __init__(self, write: Any) -> None:
        self.write = write

    def flush(self) -> None:
        pass


@implementer(IReadDescriptor)
class _SupervisorPipe:
    """Watches the worker's stdin: EOF means the supervisor is gone."""

    def __init__(self, gone: Any) -> None:
        self._gone = gone

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return ierror.ConnectionLost(str(e))
        if not data:
            return ierror.ConnectionDone()
        return None

    def connectionLost(self, reason: Any) -> None:
        self._gone("supervisor gone (stdin closed)")

    def logPrefix(self) -> str:
        return "supervisor-pipe"


class _Stopper:
    """Stops the reactor once, whatever asks first (SIGTERM, SIGINT, EOF)."""

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.asked = False

    def __call__(self, why: str) -> None:
        if self.asked:
            return
        self.asked = True
        self._log.info("stopping: {why}", why=why)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


def _read_spec() -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        more = os.read(0, 65536)
        if not more:
            raise SystemExit("opensandbox-ingress worker: no configuration on stdin")
        data += more
    spec: dict[str, Any] = json.loads(data)
    return spec


def _tune_adopted(port: Any) -> None:
    from twisted.internet import tcp, unix

    if isinstance(port, unix.Port):
        # The supervisor owns the socket's path and removes it; Twisted would
        # unlink it when this copy closes (and fail in every later worker).
        port.connectionLost = functools.partial(tcp.Port.connectionLost, port)  # type: ignore[method-assign]
    if isinstance(port, tcp.Port):
        read = port.doRead

        def do_read() -> Any:
            port.numberAccepts = ACCEPTS_PER_WAKEUP
            return read()

        port.doRead = do_read  # type: ignore[method-assign]


def run_worker(spec: dict[str, Any]) -> None:
    """Run one worker process until it is told to stop; see the module docstring."""
    from twisted.internet import reactor as default_reactor
    from twisted.logger import globalLogBeginner

    from . import heap
    from .observability import LogOutput, bridge_stdlib_logging, make_log_observer
    from .plugin import install_access_log
    from .service import build_ingress

    reactor: Any = default_reactor
    index = int(spec["worker"])
    config = config_from_json(spec["config"])
    if index != 0:
        config = replace(config, admin_listen=())
    output = LogOutput(sys.stdout)
    output.start(reactor)
    tagged = TaggedOutput(output, config.log_format, index, os.getpid())
    globalLogBeginner.beginLoggingTo(
        [make_log_observer(config.log_level, config.log_format, tagged.as_file())],
        redirectStandardIO=False,
    )
    bridge_stdlib_logging(config.log_level)
    service = build_ingress(config, reactor)
    install_access_log(service, config, tagged)
    heap.settle_once_synced(service.core.registry, reactor)
    for fd, family, description in spec["listen"]:
        service.listeners.adopt(fd, family, description)
    if service.admin_listeners is not None:
        for fd, family, description in spec["admin"]:
            service.admin_listeners.adopt(fd, family, description)
    if spec.get("metrics"):
        from twisted.internet.stdio import StandardIO

        to_worker, from_worker = spec["metrics"]
        side = WorkerSide(service.core.metrics.exposition, reactor)
        # mypy reads the Windows signature of StandardIO; the POSIX one
        # takes the descriptors to use instead of 0 and 1.
        StandardIO(side, stdin=to_worker, stdout=from_worker, reactor=reactor)  # type: ignore[call-arg]
        if index == 0:
            service.core.metrics.tree_exposition = side.scrape

    stop = _Stopper(reactor)

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reactor.addReader(_SupervisorPipe(stop))

    def start() -> None:
        service.startService()
        for listeners in (service.listeners, service.admin_listeners):
            if listeners is not None:
                for port in listeners.ports:
                    _tune_adopted(port)

    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)


def main() -> None:
    """C{python -m opensandbox_ingress.workers}: run by the supervisor only."""
    if os.isatty(0):
        raise SystemExit(
            "opensandbox_ingress.workers is started by `twistd opensandbox-ingress --workers N`"
        )
    run_worker(_read_spec())


if __name__ == "__main__":
    # Run the importable module, not __main__, so log namespaces read
    # opensandbox_ingress.workers.*.
    from opensandbox_ingress.workers import main as _main

    _main()
