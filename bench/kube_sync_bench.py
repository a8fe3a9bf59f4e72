#!/usr/bin/env python3
"""
Kubernetes sync benchmark: a large list, then a burst of watch events.

    python3 bench/kube_sync_bench.py [--objects 100000] [--events 50000]
                                     [--lookups 300000] [--deadline 300]

The fake API server of the test suite (tests/fake_kube_api.py) runs in a
child process (so that it does not share our GIL) holding C{--objects}
BatchSandbox objects.  In this process, the real C{KubernetesSource} (its
watch thread, the unmodified C{kubernetes} client, real HTTP on loopback)
feeds a real C{SandboxRegistry} on the real reactor:

  1. list: time from the request to the response body received, JSON
     parsed, converted to records (watch thread), and the registry synced
     (one C{replace_all}, the only part that blocks the reactor);
  2. watch: the fake records C{--events} changes (60% MODIFIED, 20% ADDED,
     20% DELETED) while holding delivery back, then releases them at once;
     the rate is events applied to the registry per second from the
     release to the last one (parsing and conversion in the watch thread,
     one C{callFromThread} each), and the reactor's share per event;
  3. lookups: mean ns per C{registry.lookup} (C{--lookups} each, best of
     5 runs) for hits and misses (misses raise
     C{SandboxNotFound}, as in the proxy), with the identity candidates of
     batchsandbox and the three SPEC 4.2 candidates of agent-sandbox.

The final registry is checked against the fake's objects.  Bounded in time
(C{--deadline}); stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NS = "opensandbox"
PLURAL = "batchsandboxes"


def sandbox_name(i: int) -> str:
    return f"sbx-{i:07d}"


def pod_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


# -- the fake API server, in a child process ------------------------------------------------


def serve_fake(objects: int) -> None:
    """
    Child process: hold C{objects} sandboxes, print the URL, then obey
    commands on stdin, one per line, answering one JSON line each:
    C{events N} (record N changes with delivery held back), C{resume}.
    """
    from tests._kube_helpers import batchsandbox
    from tests.fake_kube_api import FakeKubeAPI

    fake = FakeKubeAPI()
    fake.start()
    rng = random.Random(42)
    version = fake.create_many(
        [
            batchsandbox(sandbox_name(i), NS, endpoints=[pod_ip(i)], uid=f"uid-{i}")
            for i in range(objects)
        ],
        plural=PLURAL,
    )
    reply({"url": fake.url, "version": version})
    live = list(range(objects))
    next_id = objects
    for line in sys.stdin:
        command = line.split()
        if command[0] == "events":
            fake.pause_watches()
            counts = {"ADDED": 0, "MODIFIED": 0, "DELETED": 0}
            for n in range(int(command[1])):
                kind = n % 10
                if kind < 6:
                    i = live[rng.randrange(len(live))]
                    ready = rng.random() < 0.8
                    fake.update(
                        batchsandbox(
                            sandbox_name(i), NS, ready=int(ready), endpoints=[pod_ip(i + n)]
                        ),
                        plural=PLURAL,
                    )
                    counts["MODIFIED"] += 1
                elif kind < 8:
                    fake.create(
                        batchsandbox(sandbox_name(next_id), NS, endpoints=[pod_ip(next_id)]),
                        plural=PLURAL,
                    )
                    live.append(next_id)
                    next_id += 1
                    counts["ADDED"] += 1
                else:
                    position = rng.randrange(len(live))
                    live[position], live[-1] = live[-1], live[position]
                    fake.delete(NS, sandbox_name(live.pop()), plural=PLURAL)
                    counts["DELETED"] += 1
            reply({"counts": counts, "objects": len(live), "version": fake.revision})
        elif command[0] == "resume":
            fake.resume_watches()
            reply({"resumed": True})
    fake.stop()


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class FakeProcess:
    """The child process running L{serve_fake}; commands are blocking calls."""

    def __init__(self, objects: int, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake", "--objects", str(objects)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.proc.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise SystemExit(f"fake API process exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def command(self, text: str) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(text + "\n")
        stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# -- the source, instrumented ---------------------------------------------------------------


def instrumented_source_class() -> type:
    from opensandbox_ingress.sources.kubernetes import KubernetesSource

    class BenchSource(KubernetesSource):
        """A KubernetesSource that timestamps its list and counts applied events."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.marks: dict[str, float] = {}
            self.applied = 0
            self.apply_s = 0.0
            self.target = -1
            self.on_target: Callable[[], None] = lambda: None
            self.on_listed: Callable[[], None] = lambda: None

        def _request(self, **kwargs: Any) -> Any:
            response = super()._request(**kwargs)
            if not kwargs.get("watch"):
                self.marks.setdefault("list headers", time.perf_counter())
                # Read the body now (urllib3 caches it for the caller).
                response.data  # noqa: B018
                self.marks.setdefault("list received", time.perf_counter())
            return response

        def _list_blocking(self, stop: Any) -> Any:
            self.marks.setdefault("list requested", time.perf_counter())
            return super()._list_blocking(stop)

        def _convert_listing(self, *args: Any) -> Any:
            self.marks.setdefault("list parsed", time.perf_counter())
            listing = super()._convert_listing(*args)
            self.marks.setdefault("list converted", time.perf_counter())
            return listing

        def _apply_listing(self, listing: Any) -> None:
            self.marks.setdefault("list handed to reactor", time.perf_counter())
            # replace_all fires when_synced waiters synchronously, so the
            # run waits for on_listed instead.
            super()._apply_listing(listing)
            self.marks.setdefault("registry synced", time.perf_counter())
            self.on_listed()

        def _apply_change(self, change: Any) -> None:
            started = time.perf_counter()
            super()._apply_change(change)
            done = time.perf_counter()
            self.apply_s += done - started
            self.applied += 1
            if self.applied == self.target:
                self.marks["last event applied"] = done
                self.on_target()

    return BenchSource


# -- lookups --------------------------------------------------------------------------------


REPEATS = 5


def lookup_ns(registry: Any, ids: list[str], count: int, miss: bool) -> float:
    """
    Mean ns per lookup, cycling through C{ids}: the best of L{REPEATS} runs
    of C{count / REPEATS} lookups (the least disturbed by other processes).
    """
    return min(
        _lookup_ns(registry, ids, max(count // REPEATS, 1), miss) for _ in range(REPEATS)
    )


def _lookup_ns(registry: Any, ids: list[str], count: int, miss: bool) -> float:
    from opensandbox_ingress.errors import SandboxNotFound

    rounds, rest = divmod(count, len(ids))
    work = ids * rounds + ids[:rest]
    lookup = registry.lookup
    if miss:
        started = time.perf_counter_ns()
        for sandbox_id in work:
            try:
                lookup(sandbox_id)
            except SandboxNotFound:
                pass
        elapsed = time.perf_counter_ns() - started
    else:
        started = time.perf_counter_ns()
        for sandbox_id in work:
            lookup(sandbox_id)
        elapsed = time.perf_counter_ns() - started
    return elapsed / len(work)


def loop_ns(ids: list[str], count: int) -> float:
    """The cost of the bare loop (calling len), for reference."""
    rounds, rest = divmod(count, len(ids))
    work = ids * rounds + ids[:rest]
    started = time.perf_counter_ns()
    for sandbox_id in work:
        len(sandbox_id)
    return (time.perf_counter_ns() - started) / len(work)


# -- the run --------------------------------------------------------------------------------


async def run(reactor: Any, args: argparse.Namespace, fake: FakeProcess) -> dict[str, Any]:
    from twisted.internet.defer import Deferred
    from twisted.internet.threads import deferToThread

    from opensandbox_ingress.registry import SandboxRegistry
    from opensandbox_ingress.sources.agentsandbox import name_candidates
    from opensandbox_ingress.sources.batchsandbox import BATCHSANDBOX_KIND
    from tests._kube_helpers import api_client_for

    results: dict[str, Any] = {}
    registry = SandboxRegistry()
    source = instrumented_source_class()(
        reactor,
        registry,
        BATCHSANDBOX_KIND,
        NS,
        api_client_for(fake.hello["url"]),
        watch_timeout_s=3600,
        request_timeout_s=args.deadline,
    )
    listed: Deferred[None] = Deferred()
    source.on_listed = lambda: listed.called or listed.callback(None)
    source.startService()
    try:
        await listed
        marks = source.marks
        results["objects listed"] = len(registry)
        results["list: request -> body received (s)"] = (
            marks["list received"] - marks["list requested"]
        )
        results["list: body received -> JSON parsed (s)"] = (
            marks["list parsed"] - marks["list received"]
        )
        results["list: parsed -> records, watch thread (s)"] = (
            marks["list converted"] - marks["list parsed"]
        )
        results["list: records -> reactor (s)"] = (
            marks["list handed to reactor"] - marks["list converted"]
        )
        results["list: replace_all, reactor blocked (s)"] = (
            marks["registry synced"] - marks["list handed to reactor"]
        )
        results["time to sync: list received -> registry synced (s)"] = (
            marks["registry synced"] - marks["list received"]
        )
        results["total: start -> registry synced (s)"] = (
            marks["registry synced"] - marks["list requested"]
        )

        recorded = await deferToThread(fake.command, f"events {args.events}")
        all_applied: Deferred[None] = Deferred()
        source.target = args.events
        source.on_target = lambda: all_applied.callback(None)
        released = time.perf_counter()
        await deferToThread(fake.command, "resume")
        await all_applied
        elapsed = source.marks["last event applied"] - released
        results["events"] = recorded["counts"]
        results["events applied per second"] = args.events / elapsed
        results["events: release -> last applied (s)"] = elapsed
        results["events: reactor time per event (us)"] = source.apply_s / args.events * 1e6
        if len(registry) != recorded["objects"]:
            raise SystemExit(
                f"registry has {len(registry)} sandboxes, the API server {recorded['objects']}"
            )
        results["sandboxes after events"] = len(registry)
    finally:
        await source.stopService()

    names = sorted(r.name for r in registry.records())
    rng = random.Random(7)
    hits = rng.sample(names, min(10_000, len(names)))
    misses = [f"gone-{i:07d}" for i in range(10_000)]
    n = args.lookups
    results["lookup hit (ns)"] = lookup_ns(registry, hits, n, miss=False)
    results["lookup miss (ns)"] = lookup_ns(registry, misses, n, miss=True)
    agent = SandboxRegistry(candidates=name_candidates)
    agent.replace_all(registry.records())
    results["agent-sandbox lookup hit, 1st candidate (ns)"] = lookup_ns(agent, hits, n, False)
    results["agent-sandbox lookup miss, 3 candidates (ns)"] = lookup_ns(agent, misses, n, True)
    results["bare loop, for reference (ns)"] = loop_ns(hits, n)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--lookups", type=int, default=300_000)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.objects)
        return

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    started = time.perf_counter()
    print(f"loading {args.objects} BatchSandbox objects into the fake API server ...", flush=True)
    fake = FakeProcess(args.objects, args.deadline)
    print(f"  ready in {time.perf_counter() - started:.1f}s at {fake.hello['url']}", flush=True)
    outcome: dict[str, Any] = {}

    def finished(result: Any) -> None:
        outcome["result"] = result
        if reactor.running:
            reactor.stop()

    def too_late() -> None:
        outcome.setdefault("result", SystemExit(f"deadline of {args.deadline}s exceeded"))
        reactor.stop()

    timer = reactor.callLater(args.deadline, too_late)
    d = Deferred.fromCoroutine(run(reactor, args, fake))
    d.addBoth(finished)
    try:
        reactor.run()
    finally:
        fake.stop()
    if timer.active():
        timer.cancel()
    result = outcome.get("result")
    if not isinstance(result, dict):
        failure = getattr(result, "value", result)
        raise SystemExit(f"benchmark failed: {failure!r}")
    width = max(len(k) for k in result)
    print(f"python {sys.version.split()[0]}, {args.objects} objects, {args.events} events")
    for key, value in result.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
