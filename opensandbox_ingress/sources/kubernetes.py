"""
The Kubernetes source: list, then watch, a custom resource and feed the
registry (SPEC section 5).

Threads and ownership:

  - The official C{kubernetes} client blocks, so it runs in a
    C{ThreadPool} of one daemon thread that belongs to this source; never
    the reactor's shared pool, which also resolves DNS and is joined at
    shutdown (a watch blocked there would hang exit).
  - The registry and L{SourceStats} belong to the reactor thread.  The
    watch thread hands each event over whole with C{reactor.callFromThread};
    a list is handed over whole as the result of C{deferToThreadPool} and
    applied with one C{replace_all}.  Both travel through the reactor's
    one FIFO of thread calls, so they apply in the order they were read.
  - Objects are converted to records (pure functions) in the watch thread,
    so the reactor only swaps records in: a re-list of 100,000 sandboxes
    blocks it for the C{replace_all} alone, not for the conversion.
  - The loop that decides what to do next (list, watch, back off) is a
    coroutine on the reactor thread; only single blocking requests run in
    the thread.

Shutdown closes the socket of the request in flight from the stopping side
(a watch otherwise blocks until its server-side timeout), then stops the
pool.  Every request carries C{_request_timeout}, so a dead connection
cannot block a thread forever either.

The blocking requests and the conversion they feed live in
L{opensandbox_ingress.sources.kube_requests}; building a source from the
configuration and the environment knobs that tune its timings, in
L{opensandbox_ingress.sources.kube_setup}.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from random import random as _default_random
from typing import Any

from kubernetes.client import ApiClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..registry import SandboxRegistry
from ._kube_objects import ResourceKind
from .kube_requests import (
    CLOSED,
    DROPPED,
    ERROR,
    GONE,
    STOPPED,
    BlockingRequests,
    Change,
    KubeRequests,
    Listing,
    Skipped,
    WatchHandlers,
    describe_error,
)

#: Server-side duration of one watch request (C{timeoutSeconds}); the
#: server then ends the stream and the loop watches again from where it
#: was.  Setting it also turns off the client's own hidden retries.
WATCH_TIMEOUT_S = 300
#: Seconds to establish a connection to the API server.
CONNECT_TIMEOUT_S = 10.0
#: Seconds a list may stay silent; a watch may stay silent this long
#: beyond its C{timeoutSeconds} before its socket is declared dead.
REQUEST_TIMEOUT_S = 60.0
#: First retry delay after a failure, doubled per consecutive failure...
BACKOFF_BASE_S = 0.5
#: ...up to this cap.
BACKOFF_CAP_S = 30.0
#: A watch session that delivered nothing and ended sooner than this counts
#: as a failure, so a server that closes or expires every watch at once is
#: retried with backoff rather than in a tight loop.
MIN_HEALTHY_WATCH_S = 1.0
#: How long L{KubernetesSource.stopService} waits for the watch thread.
STOP_GRACE_S = 1.5

# Restart reasons (GONE, CLOSED, DROPPED, ERROR) are counted in
# SourceStats.restarts and logged; see kube_requests.


def backoff_delay(failures: int, base_s: float, cap_s: float, random: Callable[[], float]) -> float:
    """
    Seconds to wait after C{failures} consecutive failures (>= 1): capped
    exponential growth with "equal jitter" (half fixed, half random), so
    many ingresses restarted together spread out but never retry at once.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(failures - 1, 0), 60))
    return ceiling / 2 + random() * ceiling / 2


@dataclass
class SourceStats:
    """
    Counters of one source, for metrics and the routing view.  Touched only
    on the reactor thread.

    @ivar lists: Lists applied to the registry.
    @ivar events: Watch events received, by type (C{ADDED}, C{MODIFIED},
        C{DELETED}, C{BOOKMARK}).
    @ivar restarts: Watch restarts by reason (C{gone}, C{closed},
        C{dropped}, C{error}).
    @ivar skipped: Objects or lines skipped as malformed.
    @ivar resource_version: The last resourceVersion seen.
    @ivar last_error: One line about the last failure, if any.
    """

    lists: int = 0
    events: Counter[str] = field(default_factory=Counter)
    restarts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    resource_version: str | None = None
    last_error: str | None = None


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A thread stuck connecting to a black-holed API server must not keep
    # the process alive after the reactor has stopped.
    kwargs["daemon"] = True
    return threading.Thread(*args, **kwargs)


class KubernetesSource(Service):
    """
    Lists and watches one custom resource and keeps a L{SandboxRegistry}
    in step with it.

    Lifecycle: C{startService} starts the loop (list, apply with
    C{replace_all}, watch from the list's resourceVersion with bookmarks,
    apply each event); C{stopService} returns a Deferred that fires once
    the watch thread is gone (within about L{STOP_GRACE_S} seconds).

    Recovery: 410 Gone (HTTP status or C{ERROR} event) lists again and
    replaces the registry contents; a stream the server ends is watched
    again from the last version seen; a stream that breaks is watched again
    from there after a backoff; any other failure is retried after a
    capped, jittered exponential backoff.  The registry keeps serving its
    last state meanwhile.

    Ownership: the registry, C{stats} and the loop belong to the reactor
    thread; the pool's single thread only performs requests and parses.
    The source owns C{api_client} and closes it when stopped.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        registry: SandboxRegistry,
        kind: ResourceKind,
        namespace: str | None,
        api_client: ApiClient,
        *,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        min_healthy_watch_s: float = MIN_HEALTHY_WATCH_S,
        stop_grace_s: float = STOP_GRACE_S,
        clock: Any = None,
        random: Callable[[], float] = _default_random,
        requests: BlockingRequests | None = None,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """
        @param reactor: Provides C{IReactorFromThreads} (and C{IReactorTime}
            unless C{clock} is given).
        @param registry: The registry to feed (reactor thread only).
        @param kind: The resource to watch and its record converter.
        @param namespace: The namespace to watch, or C{None} for every
            namespace (cluster-wide list and watch).
        @param api_client: The client to use; this source closes it.
        @param watch_timeout_s: C{timeoutSeconds} of each watch request.
        @param connect_timeout_s: Seconds to connect to the API server.
        @param request_timeout_s: Seconds a list may stay silent, and a
            watch beyond C{watch_timeout_s}.
        @param backoff_base_s: First retry delay after a failure.
        @param backoff_cap_s: Largest retry delay.
        @param min_healthy_watch_s: See L{MIN_HEALTHY_WATCH_S}.
        @param stop_grace_s: How long C{stopService} waits for the thread.
        @param clock: C{IReactorTime} for backoff and shutdown timers;
            defaults to C{reactor}.
        @param random: Source of jitter in [0, 1).
        @param requests: The blocking half; defaults to L{KubeRequests} on
            C{api_client}.
        @param run_blocking: Runs one blocking call and returns a Deferred
            of its result.  By default calls run in this source's own
            thread and events are posted with C{reactor.callFromThread};
            when given, calls run where it runs them (tests run them on the
            reactor thread, to drive every timer with a fake clock) and
            events are applied directly.
        """
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._registry = registry
        self._kind = kind
        self._api_client = api_client
        self._requests: BlockingRequests = (
            requests
            if requests is not None
            else KubeRequests(
                api_client,
                kind,
                namespace,
                watch_timeout_s=watch_timeout_s,
                connect_timeout_s=connect_timeout_s,
                request_timeout_s=request_timeout_s,
            )
        )
        self._run_blocking = run_blocking
        self._handlers = WatchHandlers(self._apply_change, self._note_bookmark, self._skip_line)
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._min_healthy_watch_s = min_healthy_watch_s
        self._stop_grace_s = stop_grace_s
        self._random = random
        self.stats = SourceStats()
        scope = namespace if namespace is not None else "all-namespaces"
        self._scope = scope
        self._thread_name = f"kube-watch-{kind.plural}-{scope}"
        self._pool: ThreadPool | None = None
        self._done: Deferred[None] | None = None
        self._sleeping: Deferred[None] | None = None
        # The stop flag of the current run, shared with the watch thread.
        # Each run gets its own Event, passed down, so a thread left over
        # from an earlier run can never see a fresh flag.
        self._stop_event = threading.Event()

    def __repr__(self) -> str:
        return f"<KubernetesSource {self._kind.description} in {self._scope}>"

    @property
    def watch_threads(self) -> list[threading.Thread]:
        """The threads of this source's pool that are still alive."""
        pool = self._pool
        return [t for t in pool.threads if t.is_alive()] if pool is not None else []

    # -- lifecycle (reactor thread) ------------------------------------------

    def startService(self) -> None:
        """Start the pool and the list/watch loop."""
        super().startService()
        stop = self._stop_event = threading.Event()
        if self._run_blocking is None:
            pool = ThreadPool(minthreads=0, maxthreads=1, name=self._thread_name)
            pool.threadFactory = _daemon_thread  # type: ignore[assignment]
            pool.start()
            self._pool = pool
        self._log.info("watching {kind} in {scope}", kind=self._kind.description, scope=self._scope)
        done = Deferred.fromCoroutine(self._run(stop))
        done.addErrback(
            lambda f: self._log.failure("{kind} watch loop crashed", f, kind=self._kind.description)
        )
        self._done = done

    def stopService(self) -> Deferred[None]:
        """
        Stop watching: abort the request in flight, end the loop, stop the
        pool.  The Deferred fires when the thread is gone, or after
        C{stop_grace_s} with a warning if it is stuck (it is a daemon thread
        and its request timeout bounds it).
        """
        super().stopService()
        self._stop_event.set()
        if self._sleeping is not None:
            self._sleeping.cancel()
        self._requests.abort_in_flight()
        return Deferred.fromCoroutine(self._finish_stop())

    async def _finish_stop(self) -> None:
        done, pool = self._done, self._pool
        self._done = None
        clean = True
        if done is not None and not done.called:
            # Wait on a separate Deferred so that timing out does not cancel
            # (or swallow the result of) the loop itself.
            finished: Deferred[None] = Deferred()

            def loop_ended(result: object) -> object:
                if not finished.called:
                    finished.callback(None)
                return result

            done.addBoth(loop_ended)
            finished.addTimeout(self._stop_grace_s, self._clock)
            try:
                await finished
            except TimeoutError:
                clean = False
        self._pool = None
        if pool is not None:
            if clean:
                # The loop is over, so the thread is idle: joining is quick.
                pool.stop()
            else:
                self._log.warn(
                    "{kind} watch thread did not stop within {grace}s; leaving it "
                    "to its request timeout",
                    kind=self._kind.description,
                    grace=self._stop_grace_s,
                )
                threading.Thread(target=pool.stop, daemon=True).start()
        if clean:
            self._api_client.close()

    # -- the loop (reactor thread) --------------------------------------------

    async def _run(self, stop: threading.Event) -> None:
        """
        List, watch, recover, until C{stop} is set.  Failures are counted
        across steps and reset only by a healthy watch session.
        """
        resource_version: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                # Whether this watch starts from a list made just now (rather
                # than resuming from a version seen on an earlier stream).
                fresh = resource_version is None
                if resource_version is None:
                    try:
                        listing = await self._in_thread(self._requests.list_blocking, stop)
                    except Exception as e:
                        if stop.is_set():
                            return
                        failures += 1
                        detail = f"list failed: {describe_error(e)}"
                        if not await self._back_off(failures, ERROR, detail, stop):
                            return
                        continue
                    if stop.is_set():
                        return
                    self._apply_listing(listing)
                    resource_version = listing.resource_version
                started = self._clock.seconds()
                end = await self._in_thread(
                    self._requests.watch_blocking,
                    stop,
                    resource_version,
                    self._handlers,
                    self._post,
                )
            except Exception as e:
                # A bug, not a network failure: say so loudly, keep going.
                self._log.failure("{kind} watch loop error", kind=self._kind.description)
                if stop.is_set():
                    return
                failures += 1
                if not await self._back_off(failures, ERROR, describe_error(e), stop):
                    return
                continue
            if end.reason == STOPPED or stop.is_set():
                return
            healthy = end.events > 0 or (
                self._clock.seconds() - started >= self._min_healthy_watch_s
            )
            if healthy:
                failures = 0
            resource_version = None if end.reason == GONE else end.resource_version
            detail = end.detail or {
                GONE: "resourceVersion expired (410), listing again",
                CLOSED: "stream ended, watching again",
            }.get(end.reason, "")
            # A watch resumed from an old version that is told 410 at once is
            # the normal sequel of a long disconnection: list again at once
            # (the registry is stale until then).  Told 410 right after a
            # list, the server expires everything: back off like any failure.
            resumed_gone = end.reason == GONE and not fresh
            if (healthy and end.reason in (GONE, CLOSED)) or resumed_gone:
                # The normal life of a watch: go again at once.
                self.stats.restarts[end.reason] += 1
                self._log.info(
                    "{kind} watch restart ({reason}): {detail}; from {version}",
                    kind=self._kind.description,
                    reason=end.reason,
                    detail=detail,
                    version=resource_version or "a new list",
                )
                continue
            failures += 1
            if not await self._back_off(failures, end.reason, detail, stop):
                return

    async def _back_off(
        self, failures: int, reason: str, detail: str, stop: threading.Event
    ) -> bool:
        """Count and log a restart, then wait; C{False} when stopped meanwhile."""
        delay = backoff_delay(failures, self._backoff_base_s, self._backoff_cap_s, self._random)
        self.stats.restarts[reason] += 1
        if reason in (ERROR, DROPPED):
            self.stats.last_error = detail
        self._log.warn(
            "{kind} watch restart ({reason}): {detail}; retrying in {delay:.2f}s "
            "(failure {failures}), serving the last known state meanwhile",
            kind=self._kind.description,
            reason=reason,
            detail=detail,
            delay=delay,
            failures=failures,
        )
        self._sleeping = deferLater(self._clock, delay, lambda: None)
        try:
            await self._sleeping
        except CancelledError:
            return False
        finally:
            self._sleeping = None
        return not stop.is_set()

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_blocking is not None:
            return self._run_blocking(function, *args)
        assert self._pool is not None
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def _post(self, function: Callable[..., Any], *args: Any) -> None:
        """Hand a watch event's work to the reactor thread."""
        if self._run_blocking is not None:
            function(*args)
        else:
            self._reactor.callFromThread(function, *args)

    # -- applying (reactor thread) ---------------------------------------------

    def _apply_listing(self, listing: Listing) -> None:
        for skipped in listing.skipped:
            self._skip(skipped)
        # Stats first: replace_all fires when_synced waiters synchronously.
        self.stats.lists += 1
        self.stats.resource_version = listing.resource_version
        self._registry.replace_all(listing.records)
        self._log.info(
            "{kind}: listed {count} objects at resourceVersion {version}",
            kind=self._kind.description,
            count=len(listing.records),
            version=listing.resource_version,
        )

    def _apply_change(self, change: Change) -> None:
        """Apply one converted watch event (called via callFromThread)."""
        self.stats.events[change.event_type] += 1
        if change.resource_version is not None:
            self.stats.resource_version = change.resource_version
        if change.skipped is not None:
            self._skip(change.skipped)
        if change.key is None:
            return
        if change.record is None:
            self._registry.remove(*change.key)
        else:
            self._registry.upsert(change.record)

    def _note_bookmark(self, resource_version: str) -> None:
        self.stats.events["BOOKMARK"] += 1
        self.stats.resource_version = resource_version

    def _skip(self, skipped: Skipped) -> None:
        self.stats.skipped += 1
        self._log.warn(
            "{kind}: skipping malformed {what} ({object}): {error}",
            kind=self._kind.description,
            what=skipped.what,
            object=skipped.obj,
            error=skipped.error,
        )

    def _skip_line(self, reason: str) -> None:
        self.stats.skipped += 1
        self._log.warn(
            "{kind}: skipping watch line: {reason}", kind=self._kind.description, reason=reason
        )
