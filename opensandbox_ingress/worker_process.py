"""
One worker process of C{--workers N} (N > 1): C{python -m
opensandbox_ingress.worker_process}, started by
L{opensandbox_ingress.workers.WorkerSupervisor} only.

The worker reads its configuration as one JSON line on stdin, builds a whole
ingress from it, serves the listening sockets it inherited (file descriptors
3, 4, ...) with C{reactor.adoptStreamPort}, writes its log lines tagged with
C{worker=} and C{pid=} to stdout, and answers the supervisor's metrics
requests over two more inherited pipes.  SIGTERM, SIGINT or EOF on stdin
(the supervisor is gone) drain it and make it exit.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from dataclasses import replace
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from . import heap
from .tree_metrics import WorkerSide
from .worker_config import config_from_json

#: Connections a worker accepts per readiness wake-up.  Twisted accepts up
#: to 100+ in a row; with several processes on one socket that hands a burst
#: of keep-alive connections to whichever worker woke first.  Accepting one
#: at a time lets the least busy worker take the next one (nginx's default).
ACCEPTS_PER_WAKEUP = 1


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

    from .observability import (
        LogOutput,
        bridge_stdlib_logging,
        install_access_log,
        make_log_observer,
    )
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
    """C{python -m opensandbox_ingress.worker_process}: run by the supervisor only."""
    if os.isatty(0):
        raise SystemExit(
            "opensandbox_ingress.worker_process is started by "
            "`twistd opensandbox-ingress --workers N`"
        )
    run_worker(_read_spec())


if __name__ == "__main__":
    # Run the importable module, not __main__, so log namespaces read
    # opensandbox_ingress.worker_process.*.
    from opensandbox_ingress.worker_process import main as _main

    _main()
