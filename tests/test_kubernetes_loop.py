"""
The Kubernetes source's list/watch/back-off loop, in memory: a scripted
blocking half and a C{MemoryReactorClock} as reactor and clock, so every
timer (backoff, healthy-watch threshold, stop grace) is driven exactly,
without threads or sleeps.

The blocking half itself (real HTTP against the fake API server) is tested
in C{test_kubernetes_source.py} and C{test_kubernetes_e2e.py}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes.client import ApiClient
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry
from opensandbox_ingress.sources.batchsandbox import BATCHSANDBOX_KIND
from opensandbox_ingress.sources.kube_requests import (
    CLOSED,
    DROPPED,
    GONE,
    STOPPED,
    Change,
    Listing,
    Stopping,
    WatchEnd,
    WatchHandlers,
)
from opensandbox_ingress.sources.kubernetes import KubernetesSource

NS = "team"
BASE_S = 1.0
CAP_S = 8.0
HEALTHY_S = 1.0
GRACE_S = 1.5

#: A scripted watch: the changes it delivers, then how it ends.
Delivered = tuple[list[Change], WatchEnd]


class ScriptedRequests:
    """
    The blocking half of the source, answering from scripts.  An empty
    script holds the request open (like a silent server) until the source
    aborts it, unless C{stuck} says the abort does not reach it.
    """

    def __init__(self) -> None:
        self.lists: list[Listing | Exception] = []
        self.watches: list[Delivered | Deferred[WatchEnd]] = []
        self.calls: list[tuple[str, ...]] = []
        self.stuck = False
        self._held: Deferred[Any] | None = None
        self._held_version = ""

    def abort_in_flight(self) -> None:
        held, self._held = self._held, None
        if held is None or self.stuck:
            return
        if self.calls[-1][0] == "list":
            held.errback(Stopping())
        else:
            held.callback(WatchEnd(STOPPED, self._held_version, 0))

    def list_blocking(self, stop: threading.Event) -> Any:
        self.calls.append(("list",))
        if not self.lists:
            self._held = Deferred()
            return self._held
        outcome = self.lists.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def watch_blocking(
        self,
        stop: threading.Event,
        resource_version: str,
        handlers: WatchHandlers,
        post: Callable[..., None],
    ) -> Any:
        self.calls.append(("watch", resource_version))
        if not self.watches:
            self._held = Deferred()
            self._held_version = resource_version
            return self._held
        outcome = self.watches.pop(0)
        if isinstance(outcome, Deferred):
            return outcome
        changes, end = outcome
        for change in changes:
            post(handlers.apply_change, change)
        return end


def record(name: str, endpoint: str = "10.0.0.1") -> SandboxRecord:
    """A ready record in L{NS}."""
    return SandboxRecord(name=name, namespace=NS, endpoint=endpoint)


def listing(version: str, *names: str) -> Listing:
    """A list result at C{version} holding ready records C{names}."""
    return Listing([record(n) for n in names], [], version)


def added(name: str, version: str) -> Change:
    """An ADDED event for C{name}."""
    return Change("ADDED", (NS, name), record(name), version)


class Harness:
    """A source on a MemoryReactorClock with a scripted blocking half."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.registry = SandboxRegistry()
        self.requests = ScriptedRequests()
        self.source = KubernetesSource(
            self.clock,
            self.registry,
            BATCHSANDBOX_KIND,
            NS,
            ApiClient(),
            backoff_base_s=BASE_S,
            backoff_cap_s=CAP_S,
            min_healthy_watch_s=HEALTHY_S,
            stop_grace_s=GRACE_S,
            clock=self.clock,
            random=lambda: 0.0,
            requests=self.requests,
            run_blocking=maybeDeferred,
        )

    def next_delay(self) -> float:
        """Seconds until the one pending timer (the backoff) fires."""
        (call,) = self.clock.getDelayedCalls()
        return float(call.getTime() - self.clock.seconds())

    def stop(self) -> Deferred[None]:
        return self.source.stopService()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if h.source.running:
        h.requests.stuck = False
        h.stop()
        h.clock.advance(GRACE_S)


def test_list_failures_back_off_then_the_list_is_applied(harness: Harness) -> None:
    """Failed lists retry after 0.5 s, then 1 s (equal jitter at 0); the good list syncs and a watch starts from it."""
    harness.requests.lists = [RuntimeError("boom"), RuntimeError("boom"), listing("10", "a")]
    harness.source.startService()
    assert harness.requests.calls == [("list",)]
    assert harness.next_delay() == 0.5
    harness.clock.advance(0.49)
    assert harness.requests.calls == [("list",)]
    harness.clock.advance(0.01)
    assert harness.requests.calls == [("list",), ("list",)]
    assert harness.next_delay() == 1.0
    assert not harness.registry.synced
    harness.clock.advance(1.0)
    assert harness.registry.synced
    assert harness.registry.lookup("a").endpoint == "10.0.0.1"
    assert harness.requests.calls[-1] == ("watch", "10")
    assert harness.source.stats.restarts["error"] == 2
    assert harness.source.stats.lists == 1
    assert harness.source.stats.last_error == "list failed: RuntimeError: boom"


def test_a_healthy_watch_end_rewatches_at_once_from_its_last_version(harness: Harness) -> None:
    """A stream that lasted the healthy threshold and ended is watched again, no timer, from where it was."""
    first: Deferred[WatchEnd] = Deferred()
    harness.requests.lists = [listing("10")]
    harness.requests.watches = [first]
    harness.source.startService()
    harness.clock.advance(HEALTHY_S)
    first.callback(WatchEnd(CLOSED, "12", 0))
    assert harness.requests.calls == [("list",), ("watch", "10"), ("watch", "12")]
    assert harness.clock.getDelayedCalls() == []
    assert harness.source.stats.restarts["closed"] == 1


def test_quick_empty_watches_back_off_growing_to_the_cap(harness: Harness) -> None:
    """Watches that end at once with nothing count as failures: 0.5, 1, 2, 4, 4 s (cap 8 s, half fixed)."""
    harness.requests.lists = [listing("10")]
    harness.requests.watches = [([], WatchEnd(CLOSED, "10", 0)) for _ in range(5)]
    harness.source.startService()
    delays = []
    for _ in range(5):
        delays.append(harness.next_delay())
        harness.clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert harness.requests.calls[-1] == ("watch", "10")
    assert harness.source.stats.restarts["closed"] == 5


def test_a_watch_that_delivered_resets_the_backoff(harness: Harness) -> None:
    """After failures, a stream that delivered events counts as healthy: the next delay is the base again."""
    harness.requests.lists = [listing("10")]
    harness.requests.watches = [
        ([], WatchEnd(CLOSED, "10", 0)),
        ([], WatchEnd(CLOSED, "10", 0)),
        ([added("b", "11")], WatchEnd(DROPPED, "11", 1, "stream broke: reset")),
    ]
    harness.source.startService()
    harness.clock.advance(harness.next_delay())
    assert harness.next_delay() == 1.0
    harness.clock.advance(1.0)
    # The delivering stream broke: a backoff, but from the first step again.
    assert harness.next_delay() == 0.5
    assert harness.registry.lookup("b").endpoint == "10.0.0.1"
    assert harness.source.stats.events["ADDED"] == 1
    assert harness.source.stats.resource_version == "11"
    harness.clock.advance(0.5)
    assert harness.requests.calls[-1] == ("watch", "11")


def test_gone_on_a_resumed_watch_relists_at_once_but_right_after_a_list_backs_off(
    harness: Harness,
) -> None:
    """410 on a resumed watch relists without delay; 410 on the watch of a fresh list is a failure."""
    first: Deferred[WatchEnd] = Deferred()
    harness.requests.lists = [listing("10", "old"), listing("20", "new"), listing("30", "new")]
    harness.requests.watches = [
        first,
        ([], WatchEnd(GONE, "15", 0)),
        ([], WatchEnd(GONE, "20", 0)),
    ]
    harness.source.startService()
    harness.clock.advance(HEALTHY_S)
    first.callback(WatchEnd(CLOSED, "15", 0))
    # Resumed from 15, told 410, listed again at once, watched from 20, told 410 again.
    assert harness.requests.calls == [
        ("list",), ("watch", "10"), ("watch", "15"), ("list",), ("watch", "20"),
    ]
    assert harness.registry.lookup("new").endpoint == "10.0.0.1"
    assert harness.next_delay() == 0.5
    harness.clock.advance(0.5)
    assert harness.requests.calls[-2:] == [("list",), ("watch", "30")]
    assert harness.source.stats.restarts["gone"] == 2
    assert harness.source.stats.lists == 3


def test_stop_during_backoff_cancels_the_timer_and_fires_at_once(harness: Harness) -> None:
    """Stopping while backing off ends the loop now: no timer left, no further request."""
    harness.requests.lists = [RuntimeError("down")]
    harness.source.startService()
    assert len(harness.clock.getDelayedCalls()) == 1
    stopped = harness.stop()
    assert stopped.called
    assert harness.clock.getDelayedCalls() == []
    harness.clock.advance(60)
    assert harness.requests.calls == [("list",)]


def test_stop_mid_watch_aborts_the_request_and_waits_for_the_loop(harness: Harness) -> None:
    """Stop aborts the open watch; once the loop has ended the Deferred fires and no timer is left."""
    harness.requests.lists = [listing("10")]
    harness.source.startService()
    assert harness.requests.calls[-1] == ("watch", "10")
    stopped = harness.stop()
    assert stopped.called
    assert harness.clock.getDelayedCalls() == []
    assert harness.requests.calls == [("list",), ("watch", "10")]


def test_stop_gives_up_on_a_stuck_request_after_the_grace(harness: Harness) -> None:
    """A request the abort cannot reach holds stop for exactly stop_grace_s, not longer."""
    harness.requests.lists = [listing("10")]
    harness.requests.stuck = True
    harness.source.startService()
    stopped = harness.stop()
    harness.clock.advance(GRACE_S - 0.01)
    assert not stopped.called
    harness.clock.advance(0.01)
    assert stopped.called
    assert harness.clock.getDelayedCalls() == []
