"""The start-up heap is frozen once the registry is synced (heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from opensandbox_ingress import heap
from opensandbox_ingress.registry import SandboxRegistry


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    # The test process must keep collecting its own cycles afterwards.
    gc.unfreeze()


def test_settle_freezes_what_survives_a_collection(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    frozen = heap.settle()
    assert frozen == gc.get_freeze_count() > 0


def test_settle_waits_for_the_first_sync_then_a_reactor_turn(unfrozen: None) -> None:
    clock = Clock()
    registry = SandboxRegistry()
    heap.settle_once_synced(registry, clock)
    clock.advance(60)
    assert gc.get_freeze_count() == 0, "froze before the registry was synced"
    registry.replace_all([])
    assert gc.get_freeze_count() == 0, "froze inside the sync's own call"
    clock.advance(0)
    assert gc.get_freeze_count() > 0
