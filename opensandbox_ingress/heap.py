"""
Keeping the cyclic garbage collector's pauses short on a busy ingress.

CPython's collector walks every tracked object of a generation it collects.
A running ingress holds tens of thousands of long-lived objects from
start-up (modules, the Kubernetes client's models, metric families, the
registry) that never become garbage, and a collection of the oldest
generation walks them all: tens of milliseconds during which no request
moves, which is what an ingress's p99 latency is made of under load.

Once start-up is over, L{settle} collects once and then freezes what
survived (C{gc.freeze}): those objects are left out of every later
collection, so a collection only walks what requests and sessions
created since.  Frozen objects are still freed by reference counting; only
a cycle among them would never be collected, and start-up state lives as
long as the process anyway.
"""

from __future__ import annotations

import gc
from typing import Any


def settle() -> int:
    """
    Collect garbage once, then exclude every surviving object from later
    collections.  Call it when start-up is over (listening and synced).

    @return: how many objects are now frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def settle_once_synced(registry: Any, reactor: Any) -> None:
    """
    L{settle} once C{registry} (a L{SandboxRegistry}) is first synced, from
    a fresh reactor turn: by then the listeners are bound and the first
    listing is in memory.  For a process that runs one ingress; an
    embedder calls L{settle} itself when its own start-up is over.
    """
    registry.when_synced().addCallback(lambda _: reactor.callLater(0, settle))
