"""
The in-memory registry of sandboxes that every request is resolved against.

Ownership: a L{SandboxRegistry} belongs to the reactor thread.  Sources that
run elsewhere (the Kubernetes watch threads) hand whole events to it with
C{reactor.callFromThread}; nothing else mutates it.  Lookups are O(1) dict
reads (a few, for providers with several name candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ._compat import DATACLASS_SLOTS
from .errors import (
    RegistryNotSynced,
    SandboxAmbiguous,
    SandboxNotFound,
    SandboxNotReady,
)

#: How many requests may wait for sandboxes to become ready at once, per
#: registry; beyond it they are answered 503 at once so that a flood of
#: requests for a starting sandbox cannot exhaust memory.
MAX_READY_WAITERS = 10_000


@dataclass(frozen=True, **DATACLASS_SLOTS)
class SandboxRecord:
    """
    What the ingress knows about one sandbox resource.

    @ivar name: The resource's C{metadata.name}.
    @ivar namespace: Its namespace (empty for the file provider).
    @ivar endpoint: Host (IP or DNS name) of the sandbox, when it has one.
    @ivar ready: Whether requests may be forwarded to C{endpoint}.
    @ivar not_ready_reason: Why not, for the 503 body and the routing view.
    @ivar secure_access_token: The OSEP-0011 access token, when the sandbox
        requires secure access; C{None} otherwise.
    @ivar generation: Identity of this version of the sandbox's resource
        (for Kubernetes, uid and resourceVersion).  Pooled upstream
        connections belong to one generation and are never reused for
        another.
    @ivar incarnation: Identity of the sandbox's life, unchanged by status
        updates (for Kubernetes, the resource's uid; empty for the file
        provider).  Open WebSocket sessions end when it changes.
    """

    name: str
    namespace: str = ""
    endpoint: str | None = None
    ready: bool = True
    not_ready_reason: str = ""
    secure_access_token: str | None = None
    generation: str = ""
    incarnation: str = ""

    def require_ready(self) -> str:
        """Return the endpoint, or raise L{SandboxNotReady} with the reason."""
        if self.ready and self.endpoint:
            return self.endpoint
        raise SandboxNotReady(
            f"sandbox {self.name} is not ready: "
            + (self.not_ready_reason or "no endpoint")
        )

    @property
    def key(self) -> tuple[str, str]:
        """The registry's identity of the resource: (namespace, name)."""
        return (self.namespace, self.name)


ChangeListener = Callable[[SandboxRecord, "SandboxRecord | None"], None]


def _identity_candidates(sandbox_id: str) -> Sequence[str]:
    return (sandbox_id,)


class SandboxRegistry:
    """
    Sandbox records by name, fed by one source.

    Feeding API (for sources): L{replace_all} installs a whole snapshot
    atomically (records missing from it disappear) and marks the registry
    synced; L{upsert} and L{remove} apply single events.

    Reading API (for the proxy): L{lookup}, L{wait_until_ready}, L{synced},
    L{records}.

    Observers: L{add_change_listener} callbacks run, synchronously, whenever
    a record is replaced by a different one or removed; the HTTP connection
    pool uses this to drop sockets of a sandbox generation that is gone.
    """

    _log = Logger()

    def __init__(
        self,
        candidates: Callable[[str], Sequence[str]] = _identity_candidates,
        max_waiters: int = MAX_READY_WAITERS,
    ) -> None:
        """
        @param candidates: Maps a sandbox id from a route to the resource
            names to try, in order (SPEC 4.2 for agent-sandbox).
        @param max_waiters: Bound on concurrent L{wait_until_ready} calls.
        """
        self._candidates = candidates
        self._by_name: dict[str, dict[str, SandboxRecord]] = {}
        self._listeners: list[ChangeListener] = []
        self._synced = False
        self._sync_waiters: list[Deferred[None]] = []
        # candidate name -> sandbox ids waiting -> their Deferreds
        self._ready_waiters: dict[str, dict[str, list[Deferred[SandboxRecord]]]] = {}
        self._waiter_count = 0
        self._max_waiters = max_waiters

    # -- reading --------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Whether the source has delivered its first complete snapshot."""
        return self._synced

    @property
    def ready_waiters(self) -> int:
        """How many L{wait_until_ready} calls are pending."""
        return self._waiter_count

    def __len__(self) -> int:
        return sum(len(by_ns) for by_ns in self._by_name.values())

    def records(self) -> list[SandboxRecord]:
        """Every record, sorted by namespace and name."""
        return sorted(
            (r for by_ns in self._by_name.values() for r in by_ns.values()),
            key=lambda r: (r.namespace, r.name),
        )

    def candidates(self, sandbox_id: str) -> Sequence[str]:
        """The resource names tried for C{sandbox_id}, in order."""
        return self._candidates(sandbox_id)

    def lookup(self, sandbox_id: str) -> SandboxRecord:
        """
        Find the record a route's sandbox id refers to.

        @raise RegistryNotSynced: before the first snapshot.
        @raise SandboxNotFound: no candidate name is known.
        @raise SandboxAmbiguous: the first known candidate exists in
            several namespaces.
        """
        if not self._synced:
            raise RegistryNotSynced("sandbox registry is not synced yet")
        for name in self._candidates(sandbox_id):
            by_ns = self._by_name.get(name)
            if by_ns:
                if len(by_ns) == 1:
                    return next(iter(by_ns.values()))
                raise SandboxAmbiguous(
                    f"sandbox {sandbox_id} is ambiguous: found in namespaces "
                    + ", ".join(sorted(by_ns))
                )
        raise SandboxNotFound(f"sandbox {sandbox_id} not found")

    def when_synced(self) -> Deferred[None]:
        """A Deferred that fires once the registry is synced."""
        if self._synced:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._sync_waiters.append(d)
        return d

    def wait_until_ready(self, sandbox_id: str) -> Deferred[SandboxRecord]:
        """
        A Deferred that fires with the record once C{sandbox_id} resolves to
        a ready sandbox; it never fires by itself otherwise, so callers bound
        it (C{addTimeout}) and cancel it when the client leaves.

        Raises L{SandboxNotReady} at once when too many requests wait.
        """
        if self._waiter_count >= self._max_waiters:
            raise SandboxNotReady(
                f"sandbox {sandbox_id} is not ready and too many requests wait"
            )
        names = list(self._candidates(sandbox_id))

        def cancel(d: Deferred[SandboxRecord]) -> None:
            self._forget_waiter(names, sandbox_id, d)

        d: Deferred[SandboxRecord] = Deferred(cancel)
        for name in names:
            self._ready_waiters.setdefault(name, {}).setdefault(sandbox_id, []).append(d)
        self._waiter_count += 1
        return d

    def _forget_waiter(
        self, names: Iterable[str], sandbox_id: str, d: Deferred[SandboxRecord]
    ) -> None:
        found = False
        for name in names:
            by_id = self._ready_waiters.get(name)
            if by_id is None:
                continue
            waiters = by_id.get(sandbox_id)
            if waiters and d in waiters:
                waiters.remove(d)
                found = True
                if not waiters:
                    del by_id[sandbox_id]
                if not by_id:
                    del self._ready_waiters[name]
        if found:
            self._waiter_count -= 1

    # -- observers ----------------------------------------------------------

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call C{listener(old, new_or_None)} when a record changes or goes."""
        self._listeners.append(listener)

    def _changed(self, old: SandboxRecord, new: SandboxRecord | None) -> None:
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:
                self._log.failure("registry change listener failed")

    # -- feeding ------------------------------------------------------------

    def upsert(self, record: SandboxRecord) -> None:
        """Add or replace one record (a watch ADDED/MODIFIED event)."""
        by_ns = self._by_name.setdefault(record.name, {})
        old = by_ns.get(record.namespace)
        by_ns[record.namespace] = record
        if old is not None and old != record:
            self._changed(old, record)
        if record.ready and record.endpoint:
            self._wake(record.name)

    def remove(self, namespace: str, name: str) -> None:
        """Remove one record (a watch DELETED event); unknown keys are fine."""
        by_ns = self._by_name.get(name)
        if not by_ns or namespace not in by_ns:
            return
        old = by_ns.pop(namespace)
        if not by_ns:
            del self._by_name[name]
        self._changed(old, None)
        # A name that was ambiguous may now resolve.
        if name in self._by_name:
            self._wake(name)

    def replace_all(self, records: Iterable[SandboxRecord]) -> None:
        """
        Install a whole snapshot (a list, or a re-list after 410 Gone): the
        registry then holds exactly C{records}; it is marked synced.
        """
        new: dict[str, dict[str, SandboxRecord]] = {}
        for record in records:
            new.setdefault(record.name, {})[record.namespace] = record
        old_by_name = self._by_name
        self._by_name = new
        for name, old_by_ns in old_by_name.items():
            new_by_ns = new.get(name, {})
            for namespace, old in old_by_ns.items():
                replacement = new_by_ns.get(namespace)
                if replacement != old:
                    self._changed(old, replacement)
        if not self._synced:
            self._synced = True
            waiters, self._sync_waiters = self._sync_waiters, []
            for d in waiters:
                d.callback(None)
        for name in list(self._ready_waiters):
            if name in new:
                self._wake(name)

    def _wake(self, name: str) -> None:
        by_id = self._ready_waiters.get(name)
        if not by_id:
            return
        for sandbox_id in list(by_id):
            try:
                record = self.lookup(sandbox_id)
            except Exception:
                continue
            if not (record.ready and record.endpoint):
                continue
            names = list(self._candidates(sandbox_id))
            for d in list(by_id.get(sandbox_id, ())):
                self._forget_waiter(names, sandbox_id, d)
                d.callback(record)

