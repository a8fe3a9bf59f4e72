"""
What the twistd plugin does: options -> config -> service, with logging.

Kept out of C{twisted/plugins/} so the plugin file stays a few lines and
importing it (twistd scans every plugin for C{--help}) stays cheap.
"""

from __future__ import annotations

import sys
from typing import Any

from .config import ConfigError
from .observability import (
    AccessLineWriter,
    LogOutput,
    bridge_stdlib_logging,
    make_log_observer,
)
from .options import config_from_options
from .service import IngressService, build_ingress


def make_service(options: Any) -> IngressService:
    """
    Build the ingress for twistd.  A bad flag value prints one line naming
    the flag to stderr and exits with status 2.
    """
    try:
        config = config_from_options(options)
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
    access = service.core.access_log
    access.sink = (
        AccessLineWriter(output, config.log_format)
        if config.log_level in ("debug", "info")
        else False
    )
    bridge_stdlib_logging(config.log_level)
    return service
