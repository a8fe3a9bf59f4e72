"""
What the twistd plugin does: options -> config -> service, with logging.

Kept out of C{twisted/plugins/} so the plugin file stays a few lines and
importing it (twistd scans every plugin for C{--help}) stays cheap.

With C{--workers 1} (the default) the service is the ingress itself; with
more, it is a L{opensandbox_ingress.workers.WorkerSupervisor} that binds the
listeners and runs that many ingress processes on them.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import Service

from . import heap
from .config import ConfigError
from .observability import (
    LogOutput,
    bridge_stdlib_logging,
    install_access_log,
    make_log_observer,
)
from .options import config_from_options
from .service import IngressService, build_ingress


def make_service(options: Any) -> Service:
    """
    Build the ingress (or, with C{--workers} > 1, its supervisor) for twistd.
    A bad flag value prints one line naming the flag to stderr and exits
    with status 2.
    """
    service: Any  # an IngressService or a WorkerSupervisor
    raise_open_files_limit()
    try:
        config = config_from_options(options)
        if config.workers > 1:
            from .workers import WorkerSupervisor

            service = WorkerSupervisor(config)
        else:
            service = build_ingress(config)
    except ConfigError as e:
        sys.stderr.write(f"opensandbox-ingress: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    out = sys.stdout
    parent = getattr(options, "parent", None)
    logfile = parent.get("logfile") if parent is not None else None
    if logfile and logfile != "-":
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(logfile)  # type: ignore[assignment]
    from twisted.internet import reactor

    output = LogOutput(out)
    output.start(reactor)
    service.log_observer = make_log_observer(config.log_level, config.log_format, output.as_file())
    if isinstance(service, IngressService):
        install_access_log(service, config, output)
        heap.settle_once_synced(service.core.registry, reactor)
    else:
        # The supervisor relays its workers' (already formatted) lines here.
        service.log_output = output
    bridge_stdlib_logging(config.log_level)
    return service


def raise_open_files_limit() -> tuple[int, int] | None:
    """
    Raise the soft limit on open files to the hard limit: every client
    connection and every backend connection is a descriptor, and the usual
    soft default (1024) caps an ingress at a few hundred sessions.  Returns
    the (old, new) soft limits, or None when nothing changed.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit for files; stay generous.
        hard = max(soft, 1 << 20)
    if soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ValueError, OSError):
        return None
    return soft, hard
