"""The in-memory sandbox registry (SPEC section 4)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from opensandbox_ingress.errors import (
    RegistryNotSynced,
    SandboxAmbiguous,
    SandboxNotFound,
    SandboxNotReady,
)
from opensandbox_ingress.registry import SandboxRecord, SandboxRegistry

T = TypeVar("T")

READY = SandboxRecord("sbx", "ns", endpoint="10.0.0.1", generation="g1")
NOT_READY = SandboxRecord(
    "sbx", "ns", endpoint=None, ready=False, not_ready_reason="starting", generation="g0"
)


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired successfully."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    assert not failures, failures
    assert results, "Deferred has not fired"
    return results[0]


def failure_of(d: Deferred[Any]) -> Failure:
    """The failure of a Deferred that has already failed."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "Deferred has not failed"
    return failures[0]


def has_not_fired(d: Deferred[Any]) -> bool:
    """Whether C{d} has not fired yet."""
    return not d.called


def synced(*records: SandboxRecord, **kwargs: Any) -> SandboxRegistry:
    """A registry synced with C{records}."""
    registry = SandboxRegistry(**kwargs)
    registry.replace_all(records)
    return registry


class Changes:
    """A change listener that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[SandboxRecord, SandboxRecord | None]] = []

    def __call__(self, old: SandboxRecord, new: SandboxRecord | None) -> None:
        self.calls.append((old, new))


@pytest.fixture
def errors_logged() -> Iterator[list[dict[str, Any]]]:
    """Error-level log events emitted while the test runs."""
    events: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# -- lookup ----------------------------------------------------------------------


def test_lookup_before_sync() -> None:
    """Before the first snapshot every lookup is RegistryNotSynced (503)."""
    registry = SandboxRegistry()
    registry.upsert(READY)
    assert not registry.synced
    with pytest.raises(RegistryNotSynced) as e:
        registry.lookup("sbx")
    assert e.value.status == 503


def test_lookup_found() -> None:
    """A known id returns its record."""
    assert synced(READY).lookup("sbx") is READY


def test_lookup_not_found() -> None:
    """An unknown id is SandboxNotFound (404) naming the id."""
    with pytest.raises(SandboxNotFound, match="sandbox nope not found") as e:
        synced(READY).lookup("nope")
    assert e.value.status == 404


def test_lookup_empty_snapshot_is_synced() -> None:
    """An empty snapshot still marks the registry synced."""
    registry = synced()
    assert registry.synced
    with pytest.raises(SandboxNotFound):
        registry.lookup("sbx")


def test_lookup_ambiguous_names_namespaces() -> None:
    """A name in two namespaces is SandboxAmbiguous (502) naming both."""
    registry = synced(
        SandboxRecord("sbx", "team-b", endpoint="b"), SandboxRecord("sbx", "team-a", endpoint="a")
    )
    with pytest.raises(SandboxAmbiguous) as e:
        registry.lookup("sbx")
    assert e.value.status == 502
    assert "team-a, team-b" in e.value.reason


def test_removal_resolves_ambiguity() -> None:
    """Removing one of two same-named records makes the name resolve again."""
    a = SandboxRecord("sbx", "a", endpoint="1")
    registry = synced(a, SandboxRecord("sbx", "b", endpoint="2"))
    registry.remove("b", "sbx")
    assert registry.lookup("sbx") is a


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (["x", "sandbox-x", "X"], "x"),
        (["sandbox-x", "X"], "X"),
        (["sandbox-x"], "sandbox-x"),
        ([], None),
    ],
)
def test_name_candidates_order(present: list[str], expected: str | None) -> None:
    """The first candidate name that exists wins, in the order candidates gives."""

    def candidates(sandbox_id: str) -> Sequence[str]:
        return (sandbox_id.lower(), sandbox_id, f"sandbox-{sandbox_id.lower()}")

    registry = synced(
        *(SandboxRecord(name, endpoint=name) for name in present), candidates=candidates
    )
    if expected is None:
        with pytest.raises(SandboxNotFound):
            registry.lookup("X")
    else:
        assert registry.lookup("X").name == expected


def test_first_candidate_ambiguity_is_not_skipped() -> None:
    """An ambiguous earlier candidate is an error, not a reason to try the next."""
    registry = synced(
        SandboxRecord("a", "n1", endpoint="1"),
        SandboxRecord("a", "n2", endpoint="2"),
        SandboxRecord("b", "n1", endpoint="3"),
        candidates=lambda _: ("a", "b"),
    )
    with pytest.raises(SandboxAmbiguous):
        registry.lookup("anything")


# -- feeding ---------------------------------------------------------------------


def test_replace_all_removes_vanished() -> None:
    """A snapshot replaces the registry's content exactly."""
    other = SandboxRecord("other", "ns", endpoint="10.0.0.2")
    registry = synced(READY, other)
    new = SandboxRecord("new", "ns", endpoint="10.0.0.3")
    registry.replace_all([other, new])
    assert registry.records() == [new, other]
    assert len(registry) == 2
    with pytest.raises(SandboxNotFound):
        registry.lookup("sbx")


def test_upsert_and_remove() -> None:
    """upsert adds and replaces by (namespace, name); remove drops; unknown removes are no-ops."""
    registry = synced()
    registry.upsert(NOT_READY)
    assert registry.lookup("sbx") is NOT_READY
    registry.upsert(READY)
    assert registry.lookup("sbx") is READY
    assert len(registry) == 1
    registry.remove("other-ns", "sbx")
    registry.remove("ns", "nope")
    assert len(registry) == 1
    registry.remove("ns", "sbx")
    assert len(registry) == 0
    with pytest.raises(SandboxNotFound):
        registry.lookup("sbx")


def test_records_sorted() -> None:
    """records() lists every record by namespace, then name."""
    records = [
        SandboxRecord("b", "y"),
        SandboxRecord("a", "y"),
        SandboxRecord("z", "x"),
    ]
    assert synced(*records).records() == [records[2], records[1], records[0]]


def test_when_synced() -> None:
    """when_synced fires on the first snapshot, at once afterwards."""
    registry = SandboxRegistry()
    d = registry.when_synced()
    assert has_not_fired(d)
    registry.upsert(READY)
    assert has_not_fired(d)
    registry.replace_all([])
    assert result_of(d) is None
    assert result_of(registry.when_synced()) is None


# -- change listeners --------------------------------------------------------------


def test_listener_on_change_and_removal() -> None:
    """Listeners get (old, new) on a change and (old, None) on removal."""
    registry = synced(NOT_READY)
    changes = Changes()
    registry.add_change_listener(changes)
    registry.upsert(READY)
    registry.remove("ns", "sbx")
    assert changes.calls == [(NOT_READY, READY), (READY, None)]


def test_listener_not_called_for_identical_or_new() -> None:
    """An identical upsert or a brand-new record is not a change."""
    registry = synced(READY)
    changes = Changes()
    registry.add_change_listener(changes)
    registry.upsert(SandboxRecord("sbx", "ns", endpoint="10.0.0.1", generation="g1"))
    registry.upsert(SandboxRecord("fresh", "ns"))
    registry.replace_all(registry.records())
    assert changes.calls == []


def test_listener_on_replace_all() -> None:
    """replace_all reports changed and vanished records, not unchanged or new ones."""
    kept = SandboxRecord("kept", "ns", endpoint="1")
    gone = SandboxRecord("gone", "ns", endpoint="2")
    registry = synced(kept, gone, NOT_READY)
    changes = Changes()
    registry.add_change_listener(changes)
    registry.replace_all([kept, READY, SandboxRecord("new", "ns")])
    assert sorted(changes.calls, key=lambda c: c[0].name) == [
        (gone, None),
        (NOT_READY, READY),
    ]


def test_failing_listener_is_logged_and_isolated(errors_logged: list[dict[str, Any]]) -> None:
    """A listener that raises is logged; later listeners still run and the update applies."""
    registry = synced(NOT_READY)

    def broken(old: SandboxRecord, new: SandboxRecord | None) -> None:
        raise RuntimeError("boom")

    changes = Changes()
    registry.add_change_listener(broken)
    registry.add_change_listener(changes)
    registry.upsert(READY)
    assert changes.calls == [(NOT_READY, READY)]
    assert registry.lookup("sbx") is READY
    assert len(errors_logged) == 1
    assert errors_logged[0]["log_failure"].check(RuntimeError)


# -- readiness -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (NOT_READY, "sandbox sbx is not ready: starting"),
        (SandboxRecord("sbx", ready=False), "sandbox sbx is not ready: no endpoint"),
        (SandboxRecord("sbx", endpoint=None), "sandbox sbx is not ready: no endpoint"),
        (
            SandboxRecord("sbx", endpoint="1.2.3.4", ready=False, not_ready_reason="ready=0"),
            "sandbox sbx is not ready: ready=0",
        ),
    ],
)
def test_require_ready_reason(record: SandboxRecord, reason: str) -> None:
    """require_ready raises SandboxNotReady (503) with the record's reason."""
    with pytest.raises(SandboxNotReady) as e:
        record.require_ready()
    assert e.value.reason == reason
    assert e.value.status == 503


def test_require_ready_returns_endpoint() -> None:
    """A ready record with an endpoint returns the endpoint."""
    assert READY.require_ready() == "10.0.0.1"


def test_wait_until_ready_fires_on_ready_upsert() -> None:
    """A waiter fires with the record once an upsert makes it ready, not before."""
    registry = synced(NOT_READY)
    d = registry.wait_until_ready("sbx")
    registry.upsert(SandboxRecord("sbx", "ns", endpoint=None, ready=True))
    registry.upsert(SandboxRecord("sbx", "ns", endpoint="x", ready=False))
    assert has_not_fired(d)
    registry.upsert(READY)
    assert result_of(d) is READY


def test_wait_until_ready_fires_on_snapshot() -> None:
    """A waiter fires when a snapshot (even the first) brings the ready record."""
    registry = SandboxRegistry()
    d = registry.wait_until_ready("sbx")
    registry.upsert(READY)  # not synced yet: no answer
    assert has_not_fired(d)
    registry.replace_all([READY])
    assert result_of(d) is READY


def test_wait_until_ready_after_ambiguity_resolves() -> None:
    """A waiter for an ambiguous name fires when removal leaves one ready record."""
    a = SandboxRecord("sbx", "a", endpoint="1")
    registry = synced(a, SandboxRecord("sbx", "b", endpoint="2"))
    d = registry.wait_until_ready("sbx")
    registry.upsert(SandboxRecord("other", "a", endpoint="3"))
    assert has_not_fired(d)
    registry.remove("b", "sbx")
    assert result_of(d) is a


def test_wait_until_ready_through_candidates() -> None:
    """A waiter fires when any candidate name of its id becomes ready."""
    registry = synced(candidates=lambda i: (i, f"sandbox-{i}"))
    d = registry.wait_until_ready("x")
    record = SandboxRecord("sandbox-x", endpoint="1")
    registry.upsert(record)
    assert result_of(d) is record


def test_wait_until_ready_fires_each_waiter_once() -> None:
    """Several waiters for one id all fire, and later upserts do not fire them again."""
    registry = synced(NOT_READY)
    waiters = [registry.wait_until_ready("sbx") for _ in range(3)]
    registry.upsert(READY)
    registry.upsert(SandboxRecord("sbx", "ns", endpoint="10.0.0.9"))
    assert [result_of(d) for d in waiters] == [READY] * 3


def test_cancel_removes_waiter() -> None:
    """Cancelling a waiter fails it with CancelledError and frees its slot."""
    registry = synced(NOT_READY, max_waiters=1)
    d = registry.wait_until_ready("sbx")
    d.cancel()
    assert failure_of(d).check(CancelledError)
    # The slot is free again, and the ready upsert does not touch the cancelled one.
    d2 = registry.wait_until_ready("sbx")
    registry.upsert(READY)
    assert result_of(d2) is READY


def test_max_waiters_bound() -> None:
    """Beyond max_waiters, wait_until_ready raises SandboxNotReady at once."""
    registry = synced(NOT_READY, max_waiters=2)
    first = registry.wait_until_ready("sbx")
    registry.wait_until_ready("other")
    with pytest.raises(SandboxNotReady, match="too many requests wait"):
        registry.wait_until_ready("sbx")
    registry.upsert(READY)
    assert result_of(first) is READY
    # A fired waiter frees its slot.
    registry.wait_until_ready("sbx")
