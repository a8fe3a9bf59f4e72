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
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from . import buildinfo

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
    return FilteringLogObserver(inner, [predicate])


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


class AccessLog:
    """
    One line per finished request.  Cheap by construction: the event is a
    format string plus fields, and C{twisted.logger} formats it only if an
    observer wants it.  Never carries header values (tokens, cookies).
    """

    def __init__(
        self,
        log: Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
    ) -> None:
        self._log = log or Logger(namespace="opensandbox_ingress.access")
        self._clock = clock
        #: An L{IngressMetrics}, told about every finished request too.
        self._metrics = metrics

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
    ) -> None:
        """
        Log (and count) one finished request or WebSocket session
        (C{started} from the same clock).
        """
        duration = self._clock() - started
        if self._metrics is not None:
            self._metrics.observe_request(kind, status, duration)
        self._log.info(
            "{kind} {method} sandbox={sandbox} port={port} status={status} "
            "bytes={bytes} duration_ms={duration_ms} client={client}",
            kind=kind,
            method=method.decode("latin-1"),
            sandbox=sandbox,
            port=port,
            status=status,
            bytes=nbytes,
            duration_ms=round(duration * 1000, 1),
            client=client,
        )
