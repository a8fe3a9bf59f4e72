"""
L{PollingService}: a service that looks at something every few seconds on
an injected clock and logs a rejected version once per distinct problem.

The sandboxes file (L{opensandbox_ingress.sources.file.FileSource}) and the
secure-access keys file (L{opensandbox_ingress.secret_files.KeysFileWatcher})
are both polled this way; a file changed behind our back (a Kubernetes
Secret volume swaps a symlink) needs no inotify support to be picked up.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class PollingService(Service):
    """
    Calls L{check} when started and then every C{interval_s} seconds of
    C{clock}, until stopped.  Subclasses implement L{check} and report each
    outcome with L{accepted} or L{rejected}.

    Ownership: the reactor thread (a C{LoopingCall} on the injected clock,
    so tests drive it with C{twisted.internet.task.Clock}).

    @ivar failures: Versions rejected so far.
    """

    _log = Logger()

    #: The error line for a rejected version, a C{twisted.logger} format
    #: with a C{{problem}} field; subclasses say what was rejected.
    rejected_format = "rejected: {problem}"

    def __init__(self, clock: IReactorTime, interval_s: float) -> None:
        """
        @param clock: The clock the polling runs on (the reactor).
        @param interval_s: Seconds between two calls of L{check}.
        """
        self._poll_clock = clock
        self._poll_interval_s = interval_s
        self._loop: LoopingCall | None = None
        self._last_problem: str | None = None
        self.failures = 0

    def startService(self) -> None:
        """Check at once, then every interval."""
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._poll_clock
        self._loop.start(self._poll_interval_s, now=True)

    def stopService(self) -> None:
        """Stop polling."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        super().stopService()

    def check(self) -> None:
        """Look once; subclasses implement it."""
        raise NotImplementedError

    def accepted(self) -> None:
        """A good version was taken: the next problem is logged again."""
        self._last_problem = None

    def rejected(self, problem: str) -> None:
        """
        Count a rejected version and log C{problem}, unless it is the same
        problem as the last one logged (a broken file stays broken for many
        polls; one line says so).
        """
        self.failures += 1
        if problem != self._last_problem:
            self._last_problem = problem
            self._log.error(self.rejected_format, problem=problem)
