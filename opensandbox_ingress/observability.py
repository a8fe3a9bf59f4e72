"""
Logging: level filtering, text or JSON output, the stdlib bridge, the
start-up build line and the access log.

Everything here logs through C{twisted.logger}.  The kubernetes client and
urllib3 log through stdlib C{logging}; L{bridge_stdlib_logging} forwards
those records into C{twisted.logger} so one observer sees everything.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from . import buildinfo
from .routing import loggable_path, loggable_text

if TYPE_CHECKING:
    from .config import IngressConfig
    from .service import IngressService

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_STDLIB_TO_TWISTED = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


@implementer(ILogObserver)
class JsonLineObserver:
    """
    Writes each event as one JSON object on one line: C{time} (RFC 3339
    UTC), C{level}, C{namespace}, C{message} and the event's own
    non-private, JSON-friendly fields.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": _rfc3339(event.get("log_time", time.time())),
            "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record or key in ("format", "message"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()


def _rfc3339(t: float) -> str:
    micros = int((t % 1) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{micros:06d}Z"


def make_log_observer(level: str, fmt: str, out: IO[str]) -> ILogObserver:
    """
    An observer that writes events at C{level} or above to C{out}, as text
    lines or JSON lines.
    """
    inner: ILogObserver
    if fmt == "json":
        inner = JsonLineObserver(out)
    else:
        inner = textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(inner, [PortNoiseFilter(), predicate])


#: The lines Twisted's listening ports log unconditionally through the
#: legacy C{log.msg} (C{"ProxyServerFactory starting on 28888"}, C{"(TCP
#: Port 28888 Closed)"}; see C{twisted/internet/tcp.py} C{Port.startListening}
#: and C{connectionLost}): a factory's C{noisy = False} does not cover them.
_PORT_NOISE = re.compile(r"\S+ starting on \S+|\((?:[A-Z]+ )?Port \S+ Closed\)")


@implementer(ILogFilterPredicate)
class PortNoiseFilter:
    """
    A log filter predicate that drops Twisted's own port start/stop lines;
    the ingress logs C{listening on <endpoint> (<address>)} instead, once,
    with the endpoint the operator gave.
    """

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_namespace") == "log_legacy" and not event.get("isError"):
            message = event.get("message")
            if (
                isinstance(message, tuple)
                and len(message) == 1
                and isinstance(message[0], str)
                and _PORT_NOISE.fullmatch(message[0])
            ):
                return PredicateResult.no
        return PredicateResult.maybe


class _TwistedLoggerHandler(logging.Handler):
    """Forwards stdlib logging records into C{twisted.logger}."""

    def __init__(self) -> None:
        super().__init__()
        self._loggers: dict[str, Logger] = {}

    def emit(self, record: logging.LogRecord) -> None:
        log = self._loggers.get(record.name)
        if log is None:
            log = self._loggers[record.name] = Logger(namespace=record.name)
        level = _STDLIB_TO_TWISTED.get(record.levelno, LogLevel.info)
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        log.emit(level, "{message}", message=message)


_bridge_installed: list[_TwistedLoggerHandler] = []


def bridge_stdlib_logging(level: str) -> None:
    """
    Route stdlib C{logging} (kubernetes client, urllib3) into
    C{twisted.logger} at C{level}; idempotent.
    """
    root = logging.getLogger()
    if not _bridge_installed:
        handler = _TwistedLoggerHandler()
        root.addHandler(handler)
        _bridge_installed.append(handler)
    root.setLevel(
        {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}.get(
            level, logging.ERROR
        )
    )
    # urllib3 is chatty at debug about every pooled connection; keep it at
    # warn unless the operator asks for debug explicitly.
    logging.getLogger("urllib3").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def log_build_info(log: Logger) -> None:
    """Emit the one start-up line with the build metadata."""
    info = buildinfo.current()
    log.info(
        "opensandbox-ingress version={version} commit={git_commit} "
        "built={build_time} python={python_version} platform={platform}",
        version=info.version,
        git_commit=info.git_commit,
        build_time=info.build_time,
        python_version=platform.python_version(),
        platform=f"{sys.platform}/{platform.machine()}",
    )


class LogOutput:
    """
    Buffered line output shared by the log observer and the access log.

    Writing a line per request straight to stdout costs a syscall (and a
    flush) per request; here lines are appended to a buffer that is written
    out every C{interval_s} seconds, when C{max_pending} bytes are waiting,
    at reactor shutdown and at process exit.

    Ownership: reactor thread (stdlib logging from other threads reaches
    it through C{twisted.logger}, whose observers run in the emitting
    thread: the buffer's list appends are atomic under the GIL, and a flush
    swaps the list before writing).
    """

    def __init__(self, out: IO[str], interval_s: float = 0.1, max_pending: int = 65536) -> None:
        self._out = out
        self._interval = interval_s
        self._max = max_pending
        self._pending: list[str] = []
        self._size = 0
        self._call: Any = None
        self._reactor: Any = None

    def start(self, reactor: Any) -> None:
        """Flush periodically on C{reactor}, and at its shutdown."""
        import atexit

        self._reactor = reactor
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        atexit.register(self.flush)

    def write(self, text: str) -> None:
        """Queue C{text} (one or more whole lines)."""
        self._pending.append(text)
        self._size += len(text)
        # Before the reactor runs and once it has stopped (twistd then
        # re-raises SIGTERM, so atexit never runs) every line goes out now.
        if self._reactor is None or not self._reactor.running or self._size >= self._max:
            self.flush()
        elif self._call is None:
            self._call = self._reactor.callLater(self._interval, self._scheduled)

    def _scheduled(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> None:
        """Write out everything queued."""
        pending, self._pending = self._pending, []
        self._size = 0
        if pending:
            try:
                self._out.write("".join(pending))
                self._out.flush()
            except (OSError, ValueError):
                pass

    def as_file(self) -> IO[str]:
        """A file-like view whose C{flush} is left to the schedule."""
        return _NoFlush(self)  # type: ignore[return-value]


class _NoFlush:
    """C{textFileLogObserver} flushes after every event; we flush on a schedule."""

    def __init__(self, output: LogOutput) -> None:
        self.write = output.write

    def flush(self) -> None:
        pass


def _classic_time(t: float, cache: list[Any] = [None, ""]) -> str:  # noqa: B006
    second = int(t)
    if cache[0] != second:
        cache[0] = second
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
    return cache[1]  # type: ignore[no-any-return]


class AccessLineWriter:
    """
    Writes access lines directly, in the same text or JSON shape as the log
    observer, without building a C{twisted.logger} event per request.
    """

    def __init__(self, output: LogOutput, fmt: str) -> None:
        self._output = output
        self._json = fmt == "json"

    def __call__(
        self,
        kind: str,
        method: str,
        sandbox: str,
        port: int,
        status: int,
        nbytes: int,
        duration_ms: float,
        client: str,
        path: str = "-",
    ) -> None:
        message = (
            f"{kind} {method} sandbox={sandbox} port={port} path={path} status={status} "
            f"bytes={nbytes} duration_ms={duration_ms} client={client}"
        )
        now = time.time()
        if self._json:
            self._output.write(
                json.dumps(
                    {
                        "time": _rfc3339(now),
                        "level": "info",
                        "namespace": ACCESS_NAMESPACE,
                        "message": message,
                        "kind": kind,
                        "method": method,
                        "sandbox": sandbox,
                        "port": port,
                        "path": path,
                        "status": status,
                        "bytes": nbytes,
                        "duration_ms": duration_ms,
                        "client": client,
                    },
                    separators=(",", ":"),
                )
                + "\n"
            )
        else:
            self._output.write(f"{_classic_time(now)} [{ACCESS_NAMESPACE}#info] {message}\n")

    def session(self, fields: dict[str, Any]) -> None:
        """
        Write one WebSocket session's end line: C{fields} are the event
        fields L{AccessLog.session} builds, in the order the line shows them.
        """
        message = SESSION_FORMAT.format(**fields)
        now = time.time()
        if self._json:
            record: dict[str, Any] = {
                "time": _rfc3339(now),
                "level": "info",
                "namespace": ACCESS_NAMESPACE,
                "message": message,
            }
            record.update(fields)
            self._output.write(json.dumps(record, separators=(",", ":")) + "\n")
        else:
            self._output.write(f"{_classic_time(now)} [{ACCESS_NAMESPACE}#info] {message}\n")


ACCESS_NAMESPACE = "opensandbox_ingress.access"

#: A finished request's line (and a WebSocket request refused before its
#: upgrade, with kind C{ws}).
REQUEST_FORMAT = (
    "{kind} {method} sandbox={sandbox} port={port} path={path} status={status} "
    "bytes={bytes} duration_ms={duration_ms} client={client}"
)

#: A WebSocket session's end line, after its 101: what each hop negotiated
#: and what crossed in each direction instead of one byte count.
SESSION_FORMAT = (
    "{kind} {method} sandbox={sandbox} port={port} path={path} status={status} "
    "subprotocol={subprotocol} extensions={extensions} "
    "upstream_extensions={upstream_extensions} "
    "bytes_in={bytes_in} bytes_out={bytes_out} frames_in={frames_in} "
    "frames_out={frames_out} close_code={close_code} closed_by={closed_by} "
    "duration_ms={duration_ms} client={client}"
)

#: The status a WebSocket session is logged and counted with: its 101.
SESSION_STATUS = 101


class AccessLog:
    """
    The one exit of every finished exchange: a plain request, a request
    refused or answered by the ingress, a WebSocket request refused before
    its upgrade (L{request}) and a WebSocket session after its 101
    (L{session}).  Each is counted in the request metrics and written as
    one line that never carries header values (tokens, cookies).  By
    default the line is a C{twisted.logger} event (so an embedding
    program's observers see it); the twistd plugin installs an
    L{AccessLineWriter} as C{sink} instead, which skips building an event
    per request (the access log was a third of the per-request CPU).
    """

    def __init__(
        self,
        log: Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
        uri_mode: bool = False,
    ) -> None:
        self._log = log or Logger(namespace=ACCESS_NAMESPACE)
        self._clock = clock
        #: Which route grammar the logged paths follow (for redaction).
        self.uri_mode = uri_mode
        #: An L{IngressMetrics}, told about every finished request too.
        self._metrics = metrics
        #: When set (an L{AccessLineWriter}, or anything with its call and
        #: C{session}), given the line's fields instead of logging an event;
        #: C{False} turns the lines off (log level above info).
        self.sink: Any = None

    def request(
        self,
        method: bytes,
        sandbox: str,
        port: int,
        status: int,
        nbytes: int,
        started: float,
        client: str,
        kind: str = "http",
        target: bytes = b"",
    ) -> None:
        """
        Log (and count) one finished request or WebSocket session
        (C{started} from the same clock).  C{target} is the request target
        as the client sent it; the line shows its path, redacted
        (L{loggable_path}), or C{-} when there is none.
        """
        duration = self._clock() - started
        if self._metrics is not None:
            self._metrics.observe_request(kind, status, duration)
        sink = self.sink
        if sink is not None:
            if sink:
                sink(
                    kind,
                    method.decode("latin-1"),
                    sandbox,
                    port,
                    status,
                    nbytes,
                    round(duration * 1000, 1),
                    client,
                    loggable_path(target, self.uri_mode) if target else "-",
                )
            return
        self._log.info(
            REQUEST_FORMAT,
            kind=kind,
            method=method.decode("latin-1"),
            sandbox=sandbox,
            port=port,
            path=loggable_path(target, self.uri_mode) if target else "-",
            status=status,
            bytes=nbytes,
            duration_ms=round(duration * 1000, 1),
            client=client,
        )

    def session(
        self,
        sandbox: str,
        port: int,
        started: float,
        client: str,
        target: bytes,
        *,
        subprotocol: str | None,
        extensions: str,
        upstream_extensions: str,
        bytes_in: int,
        bytes_out: int,
        frames_in: int,
        frames_out: int,
        close_code: int | None,
        closed_by: str,
    ) -> None:
        """
        Log (and count, as kind C{ws}, status 101) one WebSocket session
        that ended after its upgrade (C{started} from the same clock).
        C{subprotocol} is the backend's choice, untrusted text (written
        loggable); C{extensions} and C{upstream_extensions} are the
        extension names each hop negotiated (C{-} for none); C{bytes_*}
        and C{frames_*} count message payload and frames toward the
        backend (in) and toward the client (out).
        """
        duration = self._clock() - started
        if self._metrics is not None:
            self._metrics.observe_request("ws", SESSION_STATUS, duration)
        sink = self.sink
        if sink is False:
            return
        # The event's fields, in the order the line shows them (a JSON line
        # keeps this order); the same for the sink and for twisted.logger.
        fields: dict[str, Any] = {
            "kind": "ws",
            "method": "GET",
            "status": SESSION_STATUS,
            "sandbox": sandbox,
            "port": port,
            "path": loggable_path(target, self.uri_mode) if target else "-",
            "subprotocol": loggable_text(subprotocol.encode()) if subprotocol else "-",
            "extensions": extensions,
            "upstream_extensions": upstream_extensions,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "frames_in": frames_in,
            "frames_out": frames_out,
            "close_code": close_code if close_code is not None else "-",
            "closed_by": closed_by,
            "duration_ms": round(duration * 1000, 1),
            "client": client,
        }
        if sink is not None:
            sink.session(fields)
            return
        self._log.info(SESSION_FORMAT, **fields)


def install_access_log(service: IngressService, config: IngressConfig, output: Any) -> None:
    """
    Write C{service}'s access lines straight to C{output} (a L{LogOutput}
    or anything with its C{write}), or drop them above log level info.
    Used by the twistd plugin and by each worker process.
    """
    service.core.access_log.sink = (
        AccessLineWriter(output, config.log_format)
        if config.log_level in ("debug", "info")
        else False
    )
