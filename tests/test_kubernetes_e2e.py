"""
The Kubernetes providers end to end, as operators run them: the real
ingress process (C{twistd opensandbox-ingress --provider-type batchsandbox}
or C{agent-sandbox}, with C{--kubeconfig} pointing at the fake API server
that runs in this test process), a real HTTP backend process
(L{tests.stream_backend}) that every ready sandbox points at (endpoint
C{127.0.0.1}), and plain HTTP requests to the ingress.

Every change is made on the fake API server and then observed through
routing only: status codes, the C{OpenSandbox-Ingress-Error} code and the
C{OpenSandbox Ingress: <reason>} body.  Nothing sleeps for a fixed time:
each expectation polls until a deadline measured from the change.

The watch timings of the processes are shortened through the environment
knobs of L{opensandbox_ingress.sources.kube_setup} (backoff, watch and
request timeouts), so that recovery paths complete in seconds.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from opensandbox_ingress.config import ConfigError
from opensandbox_ingress.sources.agentsandbox import dns1035_name
from opensandbox_ingress.sources.kube_setup import (
    BACKOFF_BASE_ENV,
    BACKOFF_CAP_ENV,
    REQUEST_TIMEOUT_ENV,
    WATCH_TIMEOUT_ENV,
    watch_settings_from_env,
)
from tests._kube_helpers import agentsandbox, batchsandbox, write_kubeconfig
from tests.fake_kube_api import FakeKubeAPI
from tests.processes import REPO, TWISTD, free_port, start_stream_backend

NS = "opensandbox"
OTHER_NS = "other"
BATCH = "batchsandboxes"
AGENT = "sandboxes"
ENDPOINT = "127.0.0.1"
ERROR_HEADER = "OpenSandbox-Ingress-Error"
#: The contract: a change on the API server is visible to routing this fast.
VISIBLE_S = 1.0
POLL_S = 0.01
#: The backend answers GET /download?size=N with N bytes of "x".
PROBE_PATH = "/download?size=3"
PROBE_BODY = b"xxx"

#: Test timings for every ingress process: quick retries; list requests
#: that give up after 5 s of silence.
FAST_ENV = {BACKOFF_BASE_ENV: "0.05", BACKOFF_CAP_ENV: "0.4", REQUEST_TIMEOUT_ENV: "5"}


# -- the ingress process ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the ingress answered."""

    status: int
    code: str | None
    body: bytes

    def __str__(self) -> str:
        return f"{self.status} {self.code} {self.body[:200]!r}"


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One GET on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.getheader(ERROR_HEADER), response.read())
    finally:
        connection.close()


class Ingress:
    """One running C{twistd opensandbox-ingress} process and its log file."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"ingress exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        return fetch(self.port, path, headers)

    def route(self, sandbox_id: str, backend_port: int) -> Reply:
        """A request routed to C{sandbox_id} (header mode), port of the backend."""
        return self.get(PROBE_PATH, {"OpenSandbox-Ingress-To": f"{sandbox_id}-{backend_port}"})

    def health(self) -> Reply:
        return self.get("/status.ok")

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Wait until the listener answers HTTP at all (synced or not)."""

        def answers() -> bool:
            try:
                self.health()
            except OSError:
                return False
            return True

        poll_until(answers, time.monotonic() + timeout, "the ingress to listen", self)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def poll_until(
    predicate: Callable[[], object], deadline: float, what: str, ingress: Ingress | None = None
) -> Any:
    """Call C{predicate} until it is truthy; fail once C{deadline} (monotonic) passes."""
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"\ningress log:\n{ingress.log_tail()}" if ingress is not None else ""
            raise AssertionError(f"timed out waiting for {what}{log}")
        time.sleep(POLL_S)


def ingress_env(**knobs: str) -> dict[str, str]:
    """The process environment: ours, without anything that selects a cluster."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KUBERNETES_", "OPENSANDBOX_INGRESS_")) and k != "KUBECONFIG"
    }
    env.update(FAST_ENV)
    env.update(knobs)
    return env


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    """The port of a real HTTP backend process; every ready sandbox points at it."""
    proc, port = start_stream_backend()
    yield port
    proc.terminate()
    proc.wait(10)


class Ingresses:
    """Starts ingress processes against fake API servers; stops them all at the end."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[Ingress] = []

    def start(
        self,
        fake: FakeKubeAPI,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Ingress:
        """C{twistd opensandbox-ingress --kubeconfig <fake> --listen <free port> ARGS}."""
        index = len(self._started)
        kubeconfig = write_kubeconfig(self._directory / f"kubeconfig-{index}", fake.url)
        log_path = self._directory / f"ingress-{index}.log"
        port = free_port()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [
                    *TWISTD, "-n", "--pidfile=", "-l", "-", "opensandbox-ingress",
                    "--kubeconfig", str(kubeconfig),
                    "--listen", f"tcp:{port}:interface=127.0.0.1",
                    *args,
                ],
                cwd=REPO,
                env=env if env is not None else ingress_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ingress = Ingress(proc, port, log_path)
        self._started.append(ingress)
        if wait:
            ingress.wait_serving()
        return ingress

    def stop_all(self) -> None:
        for ingress in self._started:
            ingress.stop()


@pytest.fixture(scope="module")
def module_ingresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingresses]:
    ingresses = Ingresses(tmp_path_factory.mktemp("ingress"))
    yield ingresses
    ingresses.stop_all()


@pytest.fixture
def ingresses(tmp_path: Path) -> Iterator[Ingresses]:
    ingresses = Ingresses(tmp_path)
    yield ingresses
    ingresses.stop_all()


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    """A fake API server of this test's own."""
    with FakeKubeAPI() as api:
        yield api


@dataclass
class Cluster:
    """The fake API server and the namespaced BatchSandbox ingress shared by a module."""

    fake: FakeKubeAPI
    ingress: Ingress
    backend_port: int

    def route(self, sandbox_id: str) -> Reply:
        return self.ingress.route(sandbox_id, self.backend_port)

    def expect(self, sandbox_id: str, status: int, **kwargs: Any) -> float:
        return expect_route(self.ingress, self.backend_port, sandbox_id, status, **kwargs)

    def steady(self) -> None:
        """Wait until the ingress has a watch open and no injected failure is left."""
        assert self.fake.clear_failures() == 0, "a test left failures behind"
        poll_until(
            lambda: self.fake.open_watches == 1,
            time.monotonic() + 5,
            "the ingress to watch",
            self.ingress,
        )


@pytest.fixture(scope="module")
def shared_cluster(module_ingresses: Ingresses, backend_port: int) -> Iterator[Cluster]:
    with FakeKubeAPI() as api:
        ingress = module_ingresses.start(
            api, "--provider-type", "batchsandbox", "--namespace", NS
        )
        poll_until(
            lambda: ingress.health().status == 200, time.monotonic() + 10, "sync", ingress
        )
        yield Cluster(api, ingress, backend_port)
        ingress.stop()


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, steady at the start of the test and left steady."""
    shared_cluster.steady()
    yield shared_cluster
    shared_cluster.fake.gone_as_http_status = False
    shared_cluster.fake.clear_failures()


def expect_route(
    ingress: Ingress,
    backend_port: int,
    sandbox_id: str,
    status: int,
    *,
    code: str | None = None,
    reason: str | None = None,
    since: float | None = None,
    within: float = VISIBLE_S,
) -> float:
    """
    Poll a request routed to C{sandbox_id} until the ingress answers
    C{status} (with error C{code} and C{reason} in the body, or the backend's
    body for 200); fail if that takes longer than C{within} seconds from
    C{since} (the moment of the change, default now).  Returns the latency.
    """
    since = time.monotonic() if since is None else since
    seen: list[Reply] = []

    def matches() -> bool:
        reply = ingress.route(sandbox_id, backend_port)
        seen.append(reply)
        if reply.status != status:
            return False
        if status == 200:
            return reply.code is None and reply.body == PROBE_BODY
        if not reply.body.startswith(b"OpenSandbox Ingress: "):
            return False
        if code is not None and reply.code != code:
            return False
        return reason is None or reason.encode() in reply.body

    try:
        poll_until(matches, since + within, "", ingress)
    except AssertionError:
        raise AssertionError(
            f"{sandbox_id}: wanted {status} {code} {reason!r} within {within}s of the "
            f"change; last answer {seen[-1] if seen else None}\n"
            f"ingress log:\n{ingress.log_tail()}"
        ) from None
    return time.monotonic() - since


def new_requests(fake: FakeKubeAPI, before: int) -> list[Any]:
    return fake.requests[before:]


# -- create, modify, delete ---------------------------------------------------------------


def test_lifecycle_is_visible_to_routing_within_a_second(cluster: Cluster) -> None:
    """Create, not ready -> ready -> not ready, delete: 404/503/200/503/404, each within 1 s."""
    fake = cluster.fake
    cluster.expect("life", 404, code="sandbox_not_found", reason="sandbox life not found")
    latencies = {}

    since = time.monotonic()
    fake.create(batchsandbox("life", NS, ready=0, endpoints=None), plural=BATCH)
    latencies["created"] = cluster.expect(
        "life",
        503,
        code="sandbox_not_ready",
        reason="sandbox life is not ready: status.ready is 0, needs >= 1; "
        "annotation sandbox.opensandbox.io/endpoints is missing",
        since=since,
    )

    since = time.monotonic()
    fake.update(batchsandbox("life", NS, endpoints=[ENDPOINT]), plural=BATCH)
    latencies["ready"] = cluster.expect("life", 200, since=since)

    since = time.monotonic()
    fake.update(batchsandbox("life", NS, ready=0, endpoints=[ENDPOINT]), plural=BATCH)
    latencies["not ready"] = cluster.expect(
        "life", 503, code="sandbox_not_ready", reason="status.ready is 0, needs >= 1", since=since
    )

    since = time.monotonic()
    fake.update(batchsandbox("life", NS, raw_endpoints="[]"), plural=BATCH)
    latencies["bad endpoints"] = cluster.expect(
        "life",
        503,
        code="sandbox_not_ready",
        reason="annotation sandbox.opensandbox.io/endpoints is an empty array",
        since=since,
    )

    since = time.monotonic()
    fake.delete(NS, "life", plural=BATCH)
    latencies["deleted"] = cluster.expect(
        "life", 404, code="sandbox_not_found", reason="sandbox life not found", since=since
    )

    assert all(latency <= VISIBLE_S for latency in latencies.values()), latencies
    print("visible after (s):", {k: round(v, 3) for k, v in latencies.items()})
    # The ingress authenticated with the kubeconfig's credentials.
    assert {r.authorization for r in fake.requests} == {"Bearer e2e-token"}
    # ... and said who it is, for the API server's audit log.
    (agent,) = {r.user_agent for r in fake.requests}
    assert agent is not None and agent.startswith("opensandbox-ingress/"), agent


# -- recovery -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
def test_gone_relists_and_drops_objects_deleted_meanwhile(
    cluster: Cluster, as_http_status: bool
) -> None:
    """A watch resumed after history was compacted gets 410; the re-list removes the deleted."""
    fake = cluster.fake
    fake.gone_as_http_status = as_http_status
    prefix = "http" if as_http_status else "event"
    fake.create(batchsandbox(f"{prefix}-stays", NS, endpoints=[ENDPOINT]), plural=BATCH)
    fake.create(batchsandbox(f"{prefix}-goes", NS, endpoints=[ENDPOINT]), plural=BATCH)
    cluster.expect(f"{prefix}-goes", 200)
    lists_before = len(fake.list_requests())
    # Take the watch down (every request fails) while things change and the
    # history is compacted: the DELETED event is gone for good.
    fake.fail_next(10_000)
    before = len(fake.requests)
    assert fake.drop_watches() == 1
    poll_until(lambda: len(fake.requests) > before, time.monotonic() + 5, "a failed re-watch")
    fake.delete(NS, f"{prefix}-goes", plural=BATCH)
    fake.create(batchsandbox(f"{prefix}-new", NS, endpoints=[ENDPOINT]), plural=BATCH)
    compacted = int(fake.compact())
    cluster.expect(f"{prefix}-goes", 200)  # still the last known state
    since = time.monotonic()
    fake.clear_failures()

    cluster.expect(f"{prefix}-goes", 404, code="sandbox_not_found", since=since, within=3.0)
    cluster.expect(f"{prefix}-new", 200, since=since, within=3.0)
    cluster.expect(f"{prefix}-stays", 200)
    assert len(fake.list_requests()) == lists_before + 1
    resumed = [
        r for r in fake.watch_requests() if r.at >= since and int(r.resource_version) < compacted
    ]
    assert resumed, "no watch resumed from the old version"
    # A resumed watch told 410 lists again at once, without a backoff.  Log
    # output is flushed every 100 ms, so wait for the line with a deadline.
    def gone_lines() -> list[str]:
        return [line for line in cluster.ingress.log().splitlines() if "restart (gone)" in line]

    poll_until(gone_lines, time.monotonic() + 5, "the 410 restart log line")
    gone = gone_lines()
    assert gone and not any("retrying in" in line for line in gone), gone


def test_dropped_stream_resumes_without_losing_updates(cluster: Cluster) -> None:
    """A watch cut mid-stream resumes from the last version seen; changes made meanwhile arrive."""
    fake = cluster.fake
    fake.create(batchsandbox("drop-a", NS, endpoints=[ENDPOINT]), plural=BATCH)
    fake.create(batchsandbox("drop-b", NS, endpoints=[ENDPOINT]), plural=BATCH)
    cluster.expect("drop-b", 200)
    last_seen = fake.revision
    lists_before = len(fake.list_requests())
    watches_before = len(fake.watch_requests())

    since = time.monotonic()
    assert fake.drop_watches() == 1
    fake.update(batchsandbox("drop-a", NS, ready=0, endpoints=[ENDPOINT]), plural=BATCH)
    fake.delete(NS, "drop-b", plural=BATCH)
    fake.create(batchsandbox("drop-c", NS, endpoints=[ENDPOINT]), plural=BATCH)

    cluster.expect("drop-a", 503, code="sandbox_not_ready", since=since, within=2.0)
    cluster.expect("drop-b", 404, code="sandbox_not_found", since=since, within=2.0)
    cluster.expect("drop-c", 200, since=since, within=2.0)
    new_watches = fake.watch_requests()[watches_before:]
    assert new_watches and new_watches[0].resource_version == last_seen
    assert len(fake.list_requests()) == lists_before


def test_api_errors_back_off_while_routing_serves_the_last_state(cluster: Cluster) -> None:
    """500s are retried with growing delays; routing keeps answering from the last state."""
    fake = cluster.fake
    fake.create(batchsandbox("steady", NS, endpoints=[ENDPOINT]), plural=BATCH)
    cluster.expect("steady", 200)
    failures = 4
    before = len(fake.requests)
    fake.fail_next(failures)
    assert fake.drop_watches() == 1

    def all_failed() -> bool:
        # Routing answers from the last known state all along.
        assert cluster.route("steady").status == 200
        return len(fake.requests) - before >= failures + 1

    poll_until(all_failed, time.monotonic() + 5, "the failed retries", cluster.ingress)
    since = time.monotonic()
    fake.create(batchsandbox("after-errors", NS, endpoints=[ENDPOINT]), plural=BATCH)
    cluster.expect("after-errors", 200, since=since, within=2.0)

    failed = new_requests(fake, before)[:failures]
    gaps = [b.at - a.at for a, b in zip(failed, failed[1:])]
    # Equal jitter: the n-th retry waits at least half of min(cap, base * 2^(n-1)),
    # and the first failed retry is at least the second failure in a row.
    base, cap = float(FAST_ENV[BACKOFF_BASE_ENV]), float(FAST_ENV[BACKOFF_CAP_ENV])
    floors = [min(cap, base * 2**n) / 2 for n in range(1, failures)]
    assert len(gaps) == len(floors)
    assert all(gap >= floor for gap, floor in zip(gaps, floors)), (gaps, floors)
    poll_until(
        lambda: "HTTP 500" in cluster.ingress.log()
        and "serving the last known state meanwhile" in cluster.ingress.log(),
        time.monotonic() + 5,
        "the backoff log lines",
    )


def test_stalled_stream_recovers_through_the_read_timeout(
    fake: FakeKubeAPI, ingresses: Ingresses, backend_port: int
) -> None:
    """A stream that goes silent without closing is abandoned after its read timeout."""
    watch_s, request_s = 2, 1
    ingress = ingresses.start(
        fake,
        "--provider-type", "batchsandbox", "--namespace", NS,
        env=ingress_env(**{WATCH_TIMEOUT_ENV: str(watch_s), REQUEST_TIMEOUT_ENV: str(request_s)}),
    )
    fake.create(batchsandbox("stall-a", NS, endpoints=[ENDPOINT]), plural=BATCH)
    expect_route(ingress, backend_port, "stall-a", 200, within=5.0)
    # Stall a watch that has just started, far from its timeoutSeconds.
    watches = len(fake.watch_requests())
    poll_until(
        lambda: len(fake.watch_requests()) > watches and fake.open_watches == 1,
        time.monotonic() + watch_s + 3,
        "a fresh watch",
        ingress,
    )
    last_seen = fake.watch_requests()[-1].resource_version
    lists_before = len(fake.list_requests())
    since = time.monotonic()
    assert fake.stall_watches() == 1
    fake.update(batchsandbox("stall-a", NS, ready=0, endpoints=[ENDPOINT]), plural=BATCH)
    fake.create(batchsandbox("stall-b", NS, endpoints=[ENDPOINT]), plural=BATCH)

    # Silence for watch + request timeout, a backoff, and the updates are there.
    within = watch_s + request_s + 2.0
    expect_route(
        ingress, backend_port, "stall-a", 503, code="sandbox_not_ready", since=since, within=within
    )
    expect_route(ingress, backend_port, "stall-b", 200, since=since, within=within)
    assert any(r.resource_version == last_seen for r in fake.watch_requests() if r.at > since)
    assert len(fake.list_requests()) == lists_before
    poll_until(
        lambda: "watch restart (dropped)" in ingress.log(), time.monotonic() + 5, "the restart line"
    )


# -- readiness ----------------------------------------------------------------------------


def test_status_ok_is_503_until_the_first_list(
    fake: FakeKubeAPI, ingresses: Ingresses, backend_port: int
) -> None:
    """/status.ok and routing answer 503 registry_not_synced while the list fails, then 200."""
    fake.create(batchsandbox("early", NS, endpoints=[ENDPOINT]), plural=BATCH)
    fake.fail_next(10_000, status=503)
    ingress = ingresses.start(fake, "--provider-type", "batchsandbox", "--namespace", NS)
    poll_until(
        lambda: len(fake.list_requests()) >= 3, time.monotonic() + 5, "list retries", ingress
    )
    health = ingress.health()
    assert (health.status, health.code) == (503, "registry_not_synced")
    assert health.body == b"OpenSandbox Ingress: sandbox registry is not synced yet\n"
    routed = ingress.route("early", backend_port)
    assert (routed.status, routed.code) == (503, "registry_not_synced")
    assert not fake.watch_requests()

    since = time.monotonic()
    fake.clear_failures()
    poll_until(
        lambda: ingress.health() == Reply(200, None, b"OK"),
        since + 3.0,
        "/status.ok 200 after the list",
        ingress,
    )
    expect_route(ingress, backend_port, "early", 200)


# -- namespaces ---------------------------------------------------------------------------


def test_namespace_scoping_and_cluster_wide_ambiguity(
    fake: FakeKubeAPI, ingresses: Ingresses, backend_port: int
) -> None:
    """--namespace sees only its namespace; --all-namespaces sees all and 502s on a shared name."""
    namespaced = ingresses.start(
        fake, "--provider-type", "batchsandbox", "--namespace", NS, wait=False
    )
    cluster_wide = ingresses.start(
        fake, "--provider-type", "batchsandbox", "--all-namespaces", wait=False
    )
    for ingress in (namespaced, cluster_wide):
        ingress.wait_serving()
    poll_until(lambda: fake.open_watches == 2, time.monotonic() + 5, "both watches")
    assert {r.path for r in fake.list_requests()} == {
        f"/apis/sandbox.opensandbox.io/v1alpha1/namespaces/{NS}/{BATCH}",
        f"/apis/sandbox.opensandbox.io/v1alpha1/{BATCH}",
    }

    # Created first: had it been in scope, it would arrive before the marker.
    fake.create(batchsandbox("elsewhere", OTHER_NS, endpoints=[ENDPOINT]), plural=BATCH)
    since = time.monotonic()
    fake.create(batchsandbox("marker", NS, endpoints=[ENDPOINT]), plural=BATCH)
    for ingress in (namespaced, cluster_wide):
        expect_route(ingress, backend_port, "marker", 200, since=since)
    expect_route(namespaced, backend_port, "elsewhere", 404, code="sandbox_not_found")
    expect_route(cluster_wide, backend_port, "elsewhere", 200)

    fake.create(batchsandbox("dup", NS, endpoints=[ENDPOINT]), plural=BATCH)
    since = time.monotonic()
    fake.create(batchsandbox("dup", OTHER_NS, endpoints=[ENDPOINT]), plural=BATCH)
    expect_route(
        cluster_wide,
        backend_port,
        "dup",
        502,
        code="sandbox_ambiguous",
        reason=f"sandbox dup is ambiguous: found in namespaces {NS}, {OTHER_NS}",
        since=since,
    )
    expect_route(namespaced, backend_port, "dup", 200)

    since = time.monotonic()
    fake.delete(OTHER_NS, "dup", plural=BATCH)
    expect_route(cluster_wide, backend_port, "dup", 200, since=since)


# -- agent-sandbox ------------------------------------------------------------------------


def test_agent_sandbox_routes_by_resource_name_candidates(
    fake: FakeKubeAPI, ingresses: Ingresses, backend_port: int
) -> None:
    """Sandbox ids reach Sandboxes named by their DNS-1035 form or sandbox-<id>; Ready rules."""
    ingress = ingresses.start(fake, "--provider-type", "agent-sandbox", "--namespace", NS)
    long_id = "Team_" + "x" * 70
    cases = {
        "Agent_Box": "agent-box",  # (a) DNS-1035: lower case, symbols to "-"
        "7up": "sandbox-7up",  # (a) DNS-1035: must start with a letter
        long_id: dns1035_name(long_id),  # (a) DNS-1035: cut to 63 with a hash suffix
        "legacy": "sandbox-legacy",  # (c) sandbox-<id>
    }
    assert len(cases[long_id]) == 63 and cases[long_id].startswith("team-xxx")
    since = time.monotonic()
    for name in cases.values():
        fake.create(agentsandbox(name, NS, fqdn=ENDPOINT), plural=AGENT)
    for sandbox_id in cases:
        expect_route(ingress, backend_port, sandbox_id, 200, since=since)

    # A BatchSandbox of the same name is not what agent-sandbox watches.
    fake.create(batchsandbox("batch-only", NS, endpoints=[ENDPOINT]), plural=BATCH)
    since = time.monotonic()
    fake.update(agentsandbox("agent-box", NS, ready="False", fqdn=ENDPOINT), plural=AGENT)
    expect_route(
        ingress,
        backend_port,
        "Agent_Box",
        503,
        code="sandbox_not_ready",
        reason="sandbox agent-box is not ready: condition Ready is False (DependenciesReady: ok)",
        since=since,
    )
    since = time.monotonic()
    fake.update(agentsandbox("agent-box", NS, fqdn=None), plural=AGENT)
    expect_route(
        ingress,
        backend_port,
        "Agent_Box",
        503,
        code="sandbox_not_ready",
        reason="status.serviceFQDN is empty",
        since=since,
    )
    expect_route(ingress, backend_port, "batch-only", 404, code="sandbox_not_found")
    since = time.monotonic()
    fake.delete(NS, "sandbox-legacy", plural=AGENT)
    expect_route(ingress, backend_port, "legacy", 404, code="sandbox_not_found", since=since)


# -- shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["watching", "list-unanswered"])
def test_sigterm_exits_promptly(fake: FakeKubeAPI, ingresses: Ingresses, state: str) -> None:
    """SIGTERM with a watch open (300 s timeout) or a list the server never answers: exit < 5 s."""
    env = ingress_env(**{REQUEST_TIMEOUT_ENV: "60"})  # the defaults: watch 300 s, request 60 s
    if state == "list-unanswered":
        fake.hold_next(1)
    ingress = ingresses.start(
        fake, "--provider-type", "batchsandbox", "--namespace", NS, env=env
    )
    if state == "watching":
        poll_until(lambda: fake.open_watches == 1, time.monotonic() + 5, "a watch", ingress)
        assert fake.watch_requests()[-1].params["timeoutSeconds"] == "300"
    else:
        poll_until(lambda: fake.requests, time.monotonic() + 5, "the list", ingress)
        assert ingress.health().code == "registry_not_synced"
    started = time.monotonic()
    ingress.proc.send_signal(signal.SIGTERM)
    try:
        returncode = ingress.proc.wait(5.0)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 5 s after SIGTERM:\n{ingress.log_tail()}") from None
    elapsed = time.monotonic() - started
    fake.release()
    assert elapsed < 5.0
    # Twisted re-raises the signal after a clean shutdown.
    assert returncode in (0, -signal.SIGTERM), returncode
    log = ingress.log()
    assert "Main loop terminated." in log
    if state == "watching":
        assert "did not stop within" not in log
        poll_until(lambda: fake.open_watches == 0, time.monotonic() + 5, "the watch to close")


# -- environment knobs --------------------------------------------------------------------


def test_environment_knobs_set_the_watch_timings() -> None:
    """The OPENSANDBOX_INGRESS_* knobs map onto the source's timings; unset ones are left out."""
    assert watch_settings_from_env({}) == {}
    assert watch_settings_from_env(
        {WATCH_TIMEOUT_ENV: "2", REQUEST_TIMEOUT_ENV: "1.5", BACKOFF_BASE_ENV: "0.1",
         BACKOFF_CAP_ENV: " 4 "}
    ) == {"watch_timeout_s": 2, "request_timeout_s": 1.5, "backoff_base_s": 0.1,
          "backoff_cap_s": 4.0}


@pytest.mark.parametrize(
    "environ, variable, problem",
    [
        ({WATCH_TIMEOUT_ENV: "1.5"}, WATCH_TIMEOUT_ENV, "not a whole number"),
        ({WATCH_TIMEOUT_ENV: "0"}, WATCH_TIMEOUT_ENV, "> 0"),
        ({REQUEST_TIMEOUT_ENV: "soon"}, REQUEST_TIMEOUT_ENV, "not a number"),
        ({REQUEST_TIMEOUT_ENV: "inf"}, REQUEST_TIMEOUT_ENV, "finite"),
        ({BACKOFF_BASE_ENV: "-1"}, BACKOFF_BASE_ENV, "> 0"),
        ({BACKOFF_CAP_ENV: "0.1"}, BACKOFF_CAP_ENV, "below the backoff base"),
        ({BACKOFF_BASE_ENV: "60"}, BACKOFF_BASE_ENV, "below the backoff base"),
    ],
)
def test_bad_environment_knob_is_one_line(
    environ: dict[str, str], variable: str, problem: str
) -> None:
    """A bad knob is a ConfigError whose one line starts with the variable's name."""
    with pytest.raises(ConfigError) as info:
        watch_settings_from_env(environ)
    text = str(info.value)
    assert text.startswith(f"{variable}: ") and problem in text and "\n" not in text


def test_bad_environment_knob_stops_start_up(fake: FakeKubeAPI, ingresses: Ingresses) -> None:
    """The process exits 2 with one stderr line naming the variable."""
    ingress = ingresses.start(
        fake,
        "--provider-type", "batchsandbox",
        env=ingress_env(**{WATCH_TIMEOUT_ENV: "forever"}),
        wait=False,
    )
    assert ingress.proc.wait(30) == 2
    lines = ingress.log().strip().splitlines()
    assert lines == [
        f"opensandbox-ingress: {WATCH_TIMEOUT_ENV}: 'forever' is not a whole number of seconds"
    ]
    assert not fake.requests
