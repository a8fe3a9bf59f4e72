"""
OSEP-0009 renew intents: tell the OpenSandbox server, through a Redis list,
that a sandbox is in use so that it keeps the sandbox alive.

The proxy calls L{RenewIntentPublisher.offer} for every request it routed
successfully (and, throttled, while a WebSocket session keeps exchanging
messages).  Publishing is best effort and must never slow the proxy down, so
the work is split in three:

  - pure parts, tested without a reactor, in L{opensandbox_ingress.renew_rules}:
    L{intent_payload} (the exact JSON the server consumes) and
    L{RenewThrottle} (at most one intent per sandbox per interval, with
    state bounded by the sandboxes active in that interval);
  - the reactor side of L{RenewIntentPublisher}: throttle, then append to a
    bounded in-memory queue, O(1), never blocking, never raising;
  - one dedicated publishing thread that owns the redis-py client, drains the
    queue in batches (one pipeline per batch: C{LPUSH key payload...} then
    C{LTRIM key 0 max_len-1}), and backs off while Redis is down.

This implements section 6 of the behaviour contract (SPEC.md) and the
"renew intents from long sessions" item of its section 10: calling L{offer}
for every WebSocket message is cheap, the throttle keeps it to one intent
per sandbox per interval.  C{observed_at} is wall-clock time (C{time.time}),
whatever clock drives the throttle.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .config import ConfigError, RenewIntentConfig
from .renew_rules import RenewThrottle, intent_payload, mask_dsn

#: Seconds allowed to open a TCP (or TLS) connection to Redis.
REDIS_CONNECT_TIMEOUT_S = 2.0
#: Seconds allowed for one Redis reply; a stalled server fails the batch.
REDIS_SOCKET_TIMEOUT_S = 3.0
#: Seconds a pooled Redis connection may sit idle before it is PINGed
#: before use (catches connections that died with a Redis restart).
REDIS_HEALTH_CHECK_INTERVAL_S = 15
#: Most intents sent in one pipeline.
MAX_BATCH = 1000
#: Intents held at most, by default, while Redis is slow or down (a few
#: hundred bytes each); read when a publisher is made, so tests may lower it.
DEFAULT_QUEUE_SIZE = 10000
#: First and largest delay, in seconds, between two attempts while Redis fails.
#: The cap bounds how long intents wait once Redis is back (an attempt is
#: one refused or timed-out connect, cheap enough every few seconds).
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 5.0
#: Seconds between two log lines about the same ongoing problem
#: (Redis down, queue overflowing).
LOG_INTERVAL_S = 30.0
#: Seconds L{RenewIntentPublisher.stopService} waits for the thread to exit
#: before giving up on it (it exits by itself once its socket times out).
STOP_TIMEOUT_S = 10.0

class _LogLimiter:
    """
    Decides whether a repeated problem deserves a log line now: the first
    occurrence, then at most one per C{interval_s}, reporting how many
    occurrences were not logged in between.  Owned by one thread.
    """

    def __init__(self, interval_s: float, now: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._now = now
        self._next_at = float("-inf")
        self.suppressed = 0

    def hit(self) -> int | None:
        """
        Record one occurrence; return the number suppressed since the last
        line if this one should be logged, else C{None}.
        """
        now = self._now()
        if now < self._next_at:
            self.suppressed += 1
            return None
        self._next_at = now + self._interval
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed

    def reset(self) -> int:
        """The problem is over: log the next occurrence at once; return the
        number suppressed since the last line."""
        self._next_at = float("-inf")
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


# --- the service ---------------------------------------------------------------


@dataclass
class RenewStats:
    """
    Counters of one publisher, for metrics and tests.  Each field is written
    by one thread only (the first three by the reactor, the last two by the
    publishing thread), so plain increments do not race.
    """

    #: Calls to L{RenewIntentPublisher.offer} while enabled.
    offered: int = 0
    #: Offers dropped because the sandbox had an intent within the interval.
    throttled: int = 0
    #: Offers dropped because the queue was full.
    dropped_overflow: int = 0
    #: Intents Redis accepted.
    published: int = 0
    #: Intents lost to a Redis error (down, refused credentials, ...).
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)


# An intent waiting in the queue: sandbox id, Unix time observed, port, URI,
# and the throttle time of its admission (to release exactly that admission
# if the intent is lost; None when the throttle keeps no state).
_Intent = tuple[str, float, int, str, float | None]


class RenewIntentPublisher(Service):
    """
    Publishes renew intents to a Redis list, best effort.

    Threads: L{offer} and the service methods run on the reactor thread; a
    dedicated publishing thread (started by L{startService}, stopped by
    L{stopService}) owns the redis-py client.  They share only the bounded
    queue, under a condition variable held for O(1) (reactor) or O(batch)
    (publisher, to pop) steps.  Log lines from the publishing thread are
    handed to the reactor with C{callFromThread}.

    Invariants: the queue never holds more than C{queue_size} intents; the
    proxy never waits on Redis; while Redis fails, attempts are spaced by a
    capped exponential backoff and the queue is left to overflow (counted).

    @ivar stats: the L{RenewStats} counters.
    """

    _log = Logger()

    #: Backoff bounds in seconds; instance attributes may override them.
    retry_initial_s = RETRY_INITIAL_S
    retry_max_s = RETRY_MAX_S

    def __init__(
        self,
        reactor: Any,
        config: RenewIntentConfig,
        *,
        queue_size: int | None = None,
        clock: Any = None,
    ) -> None:
        """
        @param reactor: provides C{callFromThread} and C{callLater}.
        @param config: what to publish where; nothing happens unless
            C{config.enabled}.
        @param queue_size: intents held at most while the thread is busy or
            Redis is down; more are dropped and counted.  L{DEFAULT_QUEUE_SIZE}
            when not given.
        @param clock: C{IReactorTime} (or a callable returning seconds) for
            the throttle; the reactor by default.
        @raise ConfigError: the DSN cannot make a Redis client.
        """
        if queue_size is None:
            queue_size = DEFAULT_QUEUE_SIZE
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._reactor = reactor
        self._config = config
        self._enabled = config.enabled
        self._queue_size = queue_size
        self._throttle = RenewThrottle(
            config.min_interval_s, clock if clock is not None else reactor
        )
        self.stats = RenewStats()
        self._queue: deque[_Intent] = deque()
        self._cond = threading.Condition(threading.Lock())
        # Set (under _cond) to tell the current thread to exit; one per run,
        # so a thread that outlived its stop never resumes after a restart.
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # stopService callers waiting for a publishing thread to exit.
        self._exited: dict[threading.Thread, list[Deferred[None]]] = {}
        self._shutdown_trigger: Any = None
        self._overflow_log = _LogLimiter(LOG_INTERVAL_S)
        self._client: redis.Redis | None = None
        if self._enabled:
            self._client = self._make_client()

    @property
    def queue_size(self) -> int:
        """Intents held at most; offers beyond it are dropped and counted."""
        return self._queue_size

    @property
    def queued(self) -> int:
        """Intents waiting for the publishing thread."""
        return len(self._queue)

    @property
    def throttle(self) -> RenewThrottle:
        """The per-sandbox throttle (reactor thread only)."""
        return self._throttle

    def _make_client(self) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self._config.redis_dsn,
                socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                health_check_interval=REDIS_HEALTH_CHECK_INTERVAL_S,
                # The publishing loop owns retries and backoff; redis-py's
                # own retries would stretch a failing call (and shutdown).
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as e:
            # The message may quote the DSN; name the problem, not the secret.
            raise ConfigError(
                "renew-intent-redis-dsn", f"unusable DSN: {type(e).__name__}"
            ) from None

    # -- reactor side ------------------------------------------------------------

    def offer(self, sandbox_id: str, port: int, request_uri: str) -> None:
        """
        Offer one renew intent for C{sandbox_id}.  Reactor thread only; O(1);
        never blocks and never raises.  Does nothing when disabled; drops
        (and counts) the intent when the sandbox had one within the interval
        or the queue is full.

        @param port: the routed port, 0 if none.
        @param request_uri: the forwarded target in URI mode, empty
            otherwise.  Only its path goes into the intent: a query (which
            often carries tokens) is cut off at the first C{?}, as upstream
            sends C{URL.Path}.
        """
        if not self._enabled:
            return
        try:
            stats = self.stats
            stats.offered += 1
            if not self._throttle.admit(sandbox_id):
                stats.throttled += 1
                return
            intent: _Intent = (
                sandbox_id,
                time.time(),
                port,
                request_uri.partition("?")[0],
                self._throttle.admitted_at(sandbox_id),
            )
            with self._cond:
                full = len(self._queue) >= self._queue_size
                if not full:
                    self._queue.append(intent)
                    self._cond.notify()
            if full:
                stats.dropped_overflow += 1
                # Let the next request for this sandbox try again.
                self._throttle.forget(sandbox_id)
                suppressed = self._overflow_log.hit()
                if suppressed is not None:
                    self._log.warn(
                        "renew-intent queue full ({size} intents): dropping intents "
                        "({suppressed} more dropped since the last report)",
                        size=self._queue_size,
                        suppressed=suppressed,
                    )
        except Exception:
            # Never let bookkeeping break the request that offered.
            self._log.failure("offering a renew intent failed")

    def startService(self) -> None:
        """Start the publishing thread (when enabled)."""
        super().startService()
        if not self._enabled or self._thread is not None:
            return
        self._log.info(
            "publishing renew intents to {dsn} list {key} "
            "(max length {max_len}, min interval {interval}s)",
            dsn=mask_dsn(self._config.redis_dsn),
            key=self._config.queue_key,
            max_len=self._config.queue_max_len or "unbounded",
            interval=self._config.min_interval_s,
        )
        self._stop = stop = threading.Event()
        # Not a daemon: stopService (or, for an embedder that never stops
        # us, reactor shutdown) tells it to exit, and it exits within its
        # socket timeouts.
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name="renew-intent-publisher", daemon=False
        )
        self._thread.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._signal_stop, stop
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop the publishing thread.  The returned Deferred fires once it has
        exited, or after L{STOP_TIMEOUT_S} if a Redis call is still stuck
        (the thread then exits by itself when its socket times out).
        """
        super().stopService()
        thread, self._thread = self._thread, None
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if thread is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._exited.setdefault(thread, []).append(done)
        self._signal_stop(self._stop)
        if not thread.is_alive():
            self._thread_exited(thread)
            return done
        timer = self._reactor.callLater(STOP_TIMEOUT_S, self._give_up, thread, done)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(cancel_timer)
        return done

    def _give_up(self, thread: threading.Thread, done: Deferred[None]) -> None:
        if done.called:
            return
        self._log.warn(
            "renew-intent publisher did not stop within {timeout}s; leaving it to time out",
            timeout=STOP_TIMEOUT_S,
        )
        waiters = self._exited.get(thread, [])
        if done in waiters:
            waiters.remove(done)
        done.callback(None)

    def _signal_stop(self, stop: threading.Event) -> None:
        with self._cond:
            stop.set()
            self._cond.notify_all()

    def _thread_exited(self, thread: threading.Thread) -> None:
        # Reactor thread.  The thread asked for this as its very last step,
        # so this join is over at once; after it, "stopped" means exited.
        thread.join(1.0)
        for d in self._exited.pop(thread, []):
            if not d.called:
                d.callback(None)

    def _release(self, admissions: list[tuple[str, float | None]]) -> None:
        """
        Reactor thread: the intents of a failed batch are lost, so their
        sandboxes are no longer charged to the throttle; the next request
        for each queues a fresh intent, delivered once Redis is back,
        rather than waiting out the interval (as a full queue already does).
        """
        for sandbox_id, admitted_at in admissions:
            if admitted_at is not None:
                self._throttle.forget(sandbox_id, admitted_at)

    def _from_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        # Log lines and completion move to the reactor thread, which owns
        # logging and Deferreds.
        self._reactor.callFromThread(f, *args, **kwargs)

    # -- publishing thread -------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        client = self._client
        assert client is not None
        health = _Health(self.retry_initial_s, self.retry_max_s)
        try:
            while (batch := self._next_batch(stop, health.retry_at)) is not None:
                self._attempt(client, batch, health)
            # Stopping: one last attempt for what is still queued, unless
            # Redis is failing (then it stays queued; a restart sends it).
            if health.healthy:
                with self._cond:
                    batch = self._take()
                if batch:
                    self._attempt(client, batch, health)
        finally:
            try:
                client.connection_pool.disconnect()
            finally:
                self._from_thread(self._thread_exited, threading.current_thread())

    def _attempt(self, client: redis.Redis, batch: list[_Intent], health: _Health) -> None:
        try:
            self._publish(client, batch, retry_stale=health.healthy)
        except Exception as e:  # whatever it is: drop the batch, back off, go on
            self.stats.failed += len(batch)
            self._from_thread(self._release, [(intent[0], intent[4]) for intent in batch])
            suppressed = health.failed()
            if suppressed is not None:
                self._from_thread(
                    self._log.warn,
                    "cannot publish renew intents to {dsn}: {error}; dropped {count} "
                    "intents ({suppressed} more failed attempts since the last "
                    "report); retrying with backoff",
                    dsn=mask_dsn(self._config.redis_dsn),
                    error=_describe(e),
                    count=len(batch),
                    suppressed=suppressed,
                )
        else:
            self.stats.published += len(batch)
            if health.succeeded():
                self._from_thread(
                    self._log.info,
                    "publishing renew intents to {dsn} again",
                    dsn=mask_dsn(self._config.redis_dsn),
                )

    def _next_batch(self, stop: threading.Event, retry_at: float) -> list[_Intent] | None:
        """
        Wait for intents (and, while backing off, for C{retry_at}); return up
        to L{MAX_BATCH} of them, oldest first, or C{None} once told to stop.
        """
        with self._cond:
            while not stop.is_set():
                wait = retry_at - time.monotonic()
                if wait > 0:
                    # Backing off: leave intents queued (bounded) so that a
                    # short Redis restart loses nothing.
                    self._cond.wait(wait)
                elif self._queue:
                    return self._take()
                else:
                    self._cond.wait()
            return None

    def _take(self) -> list[_Intent]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]

    def _publish(self, client: redis.Redis, batch: Sequence[_Intent], retry_stale: bool) -> None:
        payloads = [intent_payload(*intent[:4]) for intent in batch]
        try:
            self._send(client, payloads)
        except redis.exceptions.ConnectionError:
            if not retry_stale:
                raise
            # The pooled connection may have died with a Redis restart since
            # the last success; redis-py dropped it, so try once more on a
            # fresh one before calling Redis down.
            self._send(client, payloads)

    def _send(self, client: redis.Redis, payloads: list[bytes]) -> None:
        # One variadic LPUSH (oldest first, so the newest ends at the head)
        # then one LTRIM: the same list as a push+trim per intent, in one
        # round trip.
        key = self._config.queue_key
        max_len = self._config.queue_max_len
        pipe = client.pipeline(transaction=False)
        pipe.lpush(key, *payloads)
        if max_len > 0:
            pipe.ltrim(key, 0, max_len - 1)
        pipe.execute()


class _Health:
    """
    The publishing thread's view of Redis: healthy, or failing with a capped
    exponential backoff (with jitter, so that many ingresses do not retry in
    step) and a rate-limited failure log.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial = initial_s
        self._max = max_s
        self.healthy = True
        self.failures = 0
        #: time.monotonic() before which no attempt is made.
        self.retry_at = 0.0
        self._log = _LogLimiter(LOG_INTERVAL_S)

    def failed(self) -> int | None:
        """Record a failed attempt; return what L{_LogLimiter.hit} says."""
        self.healthy = False
        self.failures += 1
        delay = min(self._max, self._initial * 2 ** min(self.failures - 1, 32))
        self.retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
        return self._log.hit()

    def succeeded(self) -> bool:
        """Record a success; return whether it ends a failure spell."""
        recovered = not self.healthy
        self.healthy = True
        self.failures = 0
        self.retry_at = 0.0
        if recovered:
            self._log.reset()
        return recovered


def _describe(error: BaseException) -> str:
    # redis-py messages name host and port, never the password.
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
