"""
C{/metrics} for the whole process tree with C{--workers N}.

Each worker keeps its own private C{CollectorRegistry} (as a single
process does); the supervisor merges them on demand.  Why this and not
prometheus_client's multiprocess mode: that mode keeps every value in
memory-mapped files under a directory shared by all processes (a writable
volume, files left behind by dead workers to clean up, and a process-wide
global that breaks "two ingresses in one process"), and it cannot carry
the gauges read at scrape time from each worker's state.  Merging text
expositions needs none of that, costs nothing between scrapes, and a
worker that died simply drops out of the sum (its counters with it, as a
restarted single process's would).

The channel: two extra pipes per worker (the supervisor writes one, the
worker the other), carrying JSON messages, one a line:

  - worker 0 (which serves the admin listener) asks C{{"op": "scrape"}};
  - the supervisor asks every live worker C{{"op": "collect"}}, each
    answers C{{"op": "metrics", "text": ...}} with its own exposition; a
    worker that does not answer within L{COLLECT_TIMEOUT_S} is left out;
  - the supervisor adds its own C{process_*} series, merges
    (L{opensandbox_ingress.metrics.merge_expositions}) and answers worker 0
    C{{"op": "merged", "text": ...}}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from .metrics import merge_expositions

#: Seconds the supervisor waits for one worker's exposition.
COLLECT_TIMEOUT_S = 2.0
#: Seconds worker 0 waits for the merged exposition before it answers with
#: its own alone (and says so in the log).
SCRAPE_TIMEOUT_S = 5.0
#: The longest message accepted on the channel (an exposition is tens of KiB).
MAX_MESSAGE_BYTES = 16 << 20


class _Lines:
    """Splits a byte stream into JSON messages, one a line."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_MESSAGE_BYTES:
            raise ValueError("metrics channel message too long")
        return [json.loads(line) for line in lines if line]


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _Pending:
    """Requests waiting for an answer, by id."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[int, Deferred[Any]] = {}

    def new(self) -> tuple[int, Deferred[Any]]:
        self._next += 1
        ident = self._next

        def cancel(_: Deferred[Any]) -> None:
            self._waiting.pop(ident, None)

        d: Deferred[Any] = Deferred(cancel)
        self._waiting[ident] = d
        return ident, d

    def answer(self, ident: Any, value: Any) -> None:
        d = self._waiting.pop(ident, None) if isinstance(ident, int) else None
        if d is not None:
            d.callback(value)

    def fail_all(self, why: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(why)


class SupervisorSide:
    """
    The supervisor's end of one worker's channel.

    Ownership: the supervisor's reactor thread.  C{write} sends bytes to
    the worker (C{process.writeToChild}); L{data_received} is fed what the
    worker wrote.
    """

    _log = Logger()

    def __init__(self, tree: TreeMetrics, index: int, write: Callable[[bytes], None]) -> None:
        self._tree = tree
        self.index = index
        self._write = write
        self._lines = _Lines()
        self._pending = _Pending()

    def data_received(self, data: bytes) -> None:
        """Bytes from the worker."""
        try:
            messages = self._lines.feed(data)
        except ValueError as e:
            self._log.error("worker {worker}: {error}", worker=self.index, error=str(e))
            return
        for message in messages:
            op = message.get("op")
            if op == "metrics":
                self._pending.answer(message.get("id"), str(message.get("text", "")))
            elif op == "scrape":
                self._tree.scrape_for(self, message.get("id"))

    def collect(self, clock: Any) -> Deferred[Any]:
        """This worker's exposition (bytes), or None if it does not answer in time."""
        ident, d = self._pending.new()
        self._write(_encode({"op": "collect", "id": ident}))
        d.addTimeout(COLLECT_TIMEOUT_S, clock)
        d.addCallback(lambda text: text.encode("utf-8"))
        d.addErrback(lambda _: None)
        return d

    def send_merged(self, ident: Any, text: bytes) -> None:
        """Answer the worker's scrape."""
        self._write(_encode({"op": "merged", "id": ident, "text": text.decode("utf-8")}))

    def gone(self) -> None:
        """The worker exited: its pending answers will never come."""
        self._pending.fail_all(ConnectionError(f"worker {self.index} is gone"))


class TreeMetrics:
    """
    The supervisor's view of every worker's metrics.

    @ivar channels: the live workers' channels, by worker index.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.channels: dict[int, SupervisorSide] = {}
        # The supervisor's own process: part of the tree's CPU and memory.
        self._own = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._own)

    def attach(self, index: int, write: Callable[[bytes], None]) -> SupervisorSide:
        """A channel for the worker C{index} just spawned (replacing an old one)."""
        old = self.channels.get(index)
        if old is not None:
            old.gone()
        channel = self.channels[index] = SupervisorSide(self, index, write)
        return channel

    def detach(self, channel: SupervisorSide) -> None:
        """The worker of C{channel} exited."""
        channel.gone()
        if self.channels.get(channel.index) is channel:
            del self.channels[channel.index]

    def scrape_for(self, asker: SupervisorSide, ident: Any) -> None:
        """Collect from every live worker, merge, answer C{asker}."""
        Deferred.fromCoroutine(self._scrape(asker, ident))

    async def _scrape(self, asker: SupervisorSide, ident: Any) -> None:
        results = await DeferredList(
            [c.collect(self._clock) for c in list(self.channels.values())], consumeErrors=True
        )
        texts = [text for ok, text in results if ok and text]
        texts.append(generate_latest(self._own))
        asker.send_merged(ident, merge_expositions(texts))


class WorkerSide(Protocol):
    """
    A worker's end of the channel, connected to the two pipes with
    C{twisted.internet.stdio.StandardIO}.

    Answers the supervisor's C{collect} with C{exposition()}; L{scrape}
    asks the supervisor for the whole tree's exposition.
    """

    _log = Logger()

    def __init__(self, exposition: Callable[[], bytes], clock: Any) -> None:
        self._exposition = exposition
        self._clock = clock
        self._lines = _Lines()
        self._pending = _Pending()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._lines.feed(data)
        except ValueError as e:
            self._log.error("metrics channel: {error}", error=str(e))
            return
        for message in messages:
            op = message.get("op")
            if op == "collect":
                self._send({"op": "metrics", "id": message.get("id"),
                            "text": self._exposition().decode("utf-8")})
            elif op == "merged":
                self._pending.answer(message.get("id"), str(message.get("text", "")).encode())

    def connectionLost(self, reason: Any = None) -> None:
        self._pending.fail_all(ConnectionError("supervisor gone"))

    def _send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(_encode(message))

    def scrape(self) -> Deferred[bytes]:
        """
        The whole tree's exposition; if the supervisor does not answer in
        L{SCRAPE_TIMEOUT_S}, this worker's own (logged).
        """
        ident, d = self._pending.new()
        self._send({"op": "scrape", "id": ident})
        d.addTimeout(SCRAPE_TIMEOUT_S, self._clock)

        def alone(failure: Any) -> bytes:
            failure.trap(TimeoutError, ConnectionError)
            self._log.warn(
                "metrics of the other workers unavailable ({error}); serving worker 0's only",
                error=failure.getErrorMessage(),
            )
            return self._exposition()

        d.addErrback(alone)
        return d
