"""
The Kubernetes source end to end: the real C{kubernetes} client, in the
source's watch thread, against the fake API server over loopback HTTP, on
the real reactor.  Nothing sleeps for a fixed time: tests wait for
conditions with a deadline (L{wait_for}).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import yaml
from kubernetes.client import ApiClient
from twisted.internet import reactor
from twisted.internet.task import Clock

from opensandbox_ingress.config import ConfigError, IngressConfig
from opensandbox_ingress.errors import (
    RegistryNotSynced,
    SandboxAmbiguous,
    SandboxNotFound,
    SandboxNotReady,
)
from opensandbox_ingress.registry import SandboxRegistry
from opensandbox_ingress.sources import build_source
from opensandbox_ingress.sources.agentsandbox import AGENTSANDBOX_KIND, name_candidates
from opensandbox_ingress.sources.batchsandbox import BATCHSANDBOX_KIND
from opensandbox_ingress.sources.kubeconfig import load_api_client
from opensandbox_ingress.sources.kubernetes import (
    KubernetesSource,
    backoff_delay,
)
from tests._kube_helpers import agentsandbox, api_client_for, batchsandbox, wait_for
from tests.fake_kube_api import FakeKubeAPI

NS = "opensandbox"
PLURAL = "batchsandboxes"
BATCH_RESOURCE = ("sandbox.opensandbox.io", "v1alpha1", PLURAL)


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    """A running fake API server."""
    with FakeKubeAPI() as api:
        yield api


def make_source(
    fake: FakeKubeAPI,
    registry: SandboxRegistry,
    namespace: str | None = NS,
    api_client: ApiClient | None = None,
    **knobs: Any,
) -> KubernetesSource:
    """A BatchSandbox source with test-sized timings."""
    settings: dict[str, Any] = {
        "watch_timeout_s": 60,
        "connect_timeout_s": 2.0,
        "request_timeout_s": 10.0,
        "backoff_base_s": 0.02,
        "backoff_cap_s": 0.1,
        "random": lambda: 0.5,
    }
    settings.update(knobs)
    kind = settings.pop("kind", BATCHSANDBOX_KIND)
    return KubernetesSource(
        reactor,
        registry,
        kind,
        namespace,
        api_client or api_client_for(fake.url),
        **settings,
    )


def watches_from(fake: FakeKubeAPI, version: str) -> list[Any]:
    return [r for r in fake.watch_requests() if r.resource_version == version]


def endpoint(registry: SandboxRegistry, sandbox_id: str) -> str | None:
    """The ready endpoint of a sandbox, or None when absent or not ready."""
    try:
        return registry.lookup(sandbox_id).require_ready()
    except (SandboxNotFound, SandboxNotReady, SandboxAmbiguous, RegistryNotSynced):
        return None


def absent(registry: SandboxRegistry, sandbox_id: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            registry.lookup(sandbox_id)
        except SandboxNotFound:
            return True
        return False

    return check


class Running:
    """Start a source for the duration of an C{async with} block."""

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source

    async def __aenter__(self) -> KubernetesSource:
        self.source.startService()
        return self.source

    async def __aexit__(self, *exc_info: object) -> None:
        if self.source.running:
            await self.source.stopService()


# -- list, then watch ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_list_is_applied_and_syncs_the_registry(fake: FakeKubeAPI) -> None:
    """The first list fills the registry in one replace_all and marks it synced."""
    fake.create(batchsandbox("ready", endpoints=["10.0.0.1"], token=" tok "), plural=PLURAL)
    fake.create(batchsandbox("starting", ready=0, endpoints=None), plural=PLURAL)
    registry = SandboxRegistry()
    assert not registry.synced
    async with Running(make_source(fake, registry)) as source:
        await registry.when_synced()
        assert [r.name for r in registry.records()] == ["ready", "starting"]
        ready = registry.lookup("ready")
        assert (ready.endpoint, ready.secure_access_token) == ("10.0.0.1", "tok")
        with pytest.raises(SandboxNotReady, match="status.ready is 0"):
            registry.lookup("starting").require_ready()
        assert source.stats.lists == 1
        [listing] = fake.list_requests()
        assert listing.path == f"/apis/sandbox.opensandbox.io/v1alpha1/namespaces/{NS}/{PLURAL}"


@pytest_twisted.ensureDeferred
async def test_watch_starts_from_the_list_version_with_bookmarks_and_timeouts(
    fake: FakeKubeAPI,
) -> None:
    """The watch resumes at the list's resourceVersion, asks for bookmarks, sets timeoutSeconds."""
    fake.create(batchsandbox("a"), plural=PLURAL)
    listed_at = fake.revision
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry, watch_timeout_s=42)):
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        [watch] = fake.watch_requests()
        assert watch.resource_version == listed_at
        # The API server parses booleans as Go's strconv.ParseBool does;
        # kubernetes < 36 writes "True".
        assert watch.params["allowWatchBookmarks"] in ("true", "True")
        assert watch.params["timeoutSeconds"] == "42"


@pytest_twisted.ensureDeferred
async def test_added_modified_deleted_flow_through(fake: FakeKubeAPI) -> None:
    """Watch events upsert and remove records one by one."""
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await registry.when_synced()
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        created = fake.create(batchsandbox("sbx", ready=0), plural=PLURAL)
        await wait_for(lambda: "sbx" in [r.name for r in registry.records()], what="ADDED")
        assert endpoint(registry, "sbx") is None
        fake.update(batchsandbox("sbx", endpoints=["10.0.0.9"]), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "sbx") == "10.0.0.9", what="MODIFIED")
        record = registry.lookup("sbx")
        assert record.generation == f"{created['metadata']['uid']}/{fake.revision}"
        fake.delete(NS, "sbx", plural=PLURAL)
        await wait_for(absent(registry, "sbx"), what="DELETED")
        assert source.stats.events == {"ADDED": 1, "MODIFIED": 1, "DELETED": 1}
        assert source.stats.resource_version == fake.revision
        assert source.stats.lists == 1


@pytest_twisted.ensureDeferred
async def test_bookmark_advances_the_version_used_by_the_next_watch(fake: FakeKubeAPI) -> None:
    """A BOOKMARK only moves the resourceVersion; the next watch starts from it."""
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        records_before = registry.records()
        version = fake.bookmark()
        await wait_for(lambda: source.stats.resource_version == version, what="the bookmark")
        assert registry.records() == records_before
        assert source.stats.events["BOOKMARK"] == 1
        fake.end_watches()
        await wait_for(lambda: watches_from(fake, version), what="a watch from the bookmark")
        assert len(fake.list_requests()) == 1


# -- recovery ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
@pytest_twisted.ensureDeferred
async def test_gone_relists_and_replaces_the_registry(
    fake: FakeKubeAPI, as_http_status: bool
) -> None:
    """410 Gone (ERROR event or HTTP status) lists again; objects deleted meanwhile vanish."""
    fake.gone_as_http_status = as_http_status
    fake.create(batchsandbox("stays"), plural=PLURAL)
    fake.create(batchsandbox("goes"), plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        assert len(registry) == 2
        # While the client is cut off, "goes" is deleted and history compacted:
        # its DELETED event is lost for good; only a new list can tell.
        fake.drop_watches()
        fake.delete(NS, "goes", plural=PLURAL)
        fake.create(batchsandbox("new"), plural=PLURAL)
        fake.compact()
        await wait_for(absent(registry, "goes"), what="the re-list")
        assert endpoint(registry, "stays") == "10.0.0.1"
        assert endpoint(registry, "new") == "10.0.0.1"
        assert source.stats.lists == 2
        assert source.stats.restarts["gone"] == 1
        # The new watch starts at the new list's version.
        await wait_for(lambda: watches_from(fake, fake.revision), what="a watch after the list")


@pytest_twisted.ensureDeferred
async def test_gone_event_on_a_live_stream_relists(fake: FakeKubeAPI) -> None:
    """An ERROR 410 event in the middle of a healthy stream lists again at once."""
    fake.create(batchsandbox("a"), plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry, min_healthy_watch_s=0.0)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        fake.expire_watches()
        await wait_for(lambda: source.stats.lists == 2, what="the re-list")
        assert source.stats.restarts["gone"] == 1
        assert endpoint(registry, "a") == "10.0.0.1"


@pytest_twisted.ensureDeferred
async def test_dropped_stream_rewatches_from_the_last_version(fake: FakeKubeAPI) -> None:
    """A connection cut mid-stream is watched again from the last event seen, without a list."""
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        fake.create(batchsandbox("a"), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "a"), what="ADDED")
        last_seen = fake.revision
        assert fake.drop_watches() == 1
        await wait_for(lambda: watches_from(fake, last_seen), what="a watch from the last event")
        assert source.stats.restarts["dropped"] == 1
        assert len(fake.list_requests()) == 1
        fake.create(batchsandbox("b"), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "b"), what="ADDED on the new stream")


@pytest_twisted.ensureDeferred
async def test_stream_ended_by_the_server_rewatches(fake: FakeKubeAPI) -> None:
    """timeoutSeconds elapses, the server ends the stream; the source watches again at once."""
    registry = SandboxRegistry()
    source = make_source(fake, registry, watch_timeout_s=1, min_healthy_watch_s=0.5)
    async with Running(source):
        await registry.when_synced()
        listed_at = fake.revision
        await wait_for(lambda: len(watches_from(fake, listed_at)) >= 2, what="a second watch")
        assert source.stats.restarts["closed"] >= 1
        assert source.stats.restarts["error"] == 0
        assert len(fake.list_requests()) == 1


@pytest_twisted.ensureDeferred
async def test_server_errors_back_off_while_the_registry_keeps_serving(
    fake: FakeKubeAPI,
) -> None:
    """500s are retried with backoff; lookups keep answering from the last state; it recovers."""
    fake.create(batchsandbox("a"), plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        fake.fail_next(3)
        fake.drop_watches()
        await wait_for(lambda: source.stats.restarts["error"] == 3, what="three failed watches")
        assert endpoint(registry, "a") == "10.0.0.1"
        await wait_for(lambda: fake.open_watches == 1, what="a healthy watch again")
        fake.create(batchsandbox("b"), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "b"), what="ADDED after recovery")
        assert source.stats.last_error is not None and "HTTP 500" in source.stats.last_error
        assert len(fake.list_requests()) == 1


@pytest_twisted.ensureDeferred
async def test_backoff_grows_exponentially_and_caps(fake: FakeKubeAPI) -> None:
    """Consecutive failures wait base * 2^n with jitter, up to the cap; success then syncs."""
    fake.fail_next(5)
    clock = Clock()
    registry = SandboxRegistry()
    source = make_source(
        fake, registry, clock=clock, backoff_base_s=1.0, backoff_cap_s=5.0, random=lambda: 1.0
    )
    delays = []
    async with Running(source):
        for _ in range(5):
            await wait_for(lambda: clock.getDelayedCalls(), what="a backoff timer")
            [call] = clock.getDelayedCalls()
            delays.append(cast(Any, call).getTime() - clock.seconds())
            assert not registry.synced
            clock.advance(delays[-1])
        await registry.when_synced()
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert source.stats.restarts["error"] == 5


def test_backoff_delay_has_equal_jitter() -> None:
    """Half of each delay is fixed, half random, so retries never collapse to zero."""
    assert backoff_delay(1, 0.5, 30, lambda: 0.0) == 0.25
    assert backoff_delay(1, 0.5, 30, lambda: 0.999999) == pytest.approx(0.5)
    assert backoff_delay(3, 0.5, 30, lambda: 0.5) == 1.5
    assert backoff_delay(10_000, 0.5, 30, lambda: 1.0) == 30


# -- malformed input ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_malformed_objects_and_lines_are_skipped(fake: FakeKubeAPI) -> None:
    """Objects without a name, with wrong types, or lines that are not JSON are skipped."""
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        fake.create(batchsandbox("was-fine"), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "was-fine"), what="ADDED")
        nameless = batchsandbox("x")
        del nameless["metadata"]["name"]
        fake.emit("ADDED", nameless, resource=BATCH_RESOURCE, namespace=NS)
        broken = batchsandbox("was-fine")
        broken["metadata"]["annotations"] = ["not", "a", "map"]
        fake.emit("MODIFIED", broken, resource=BATCH_RESOURCE, namespace=NS)
        fake.emit("ADDED", "not an object", resource=BATCH_RESOURCE, namespace=NS)
        fake.emit_raw(b"{not json", resource=BATCH_RESOURCE, namespace=NS)
        fake.emit("SURPRISE", batchsandbox("y"), resource=BATCH_RESOURCE, namespace=NS)
        fake.create(batchsandbox("after"), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "after"), what="the event after the junk")
        assert source.stats.skipped == 5
        # A record whose object turned malformed is stale: it is removed.
        assert absent(registry, "was-fine")()
        assert source.stats.restarts == {}


@pytest_twisted.ensureDeferred
async def test_malformed_list_items_are_skipped(fake: FakeKubeAPI) -> None:
    """A bad item in the list does not prevent the sync."""
    fake.create(batchsandbox("good"), plural=PLURAL)
    bad = batchsandbox("bad")
    bad["metadata"]["annotations"] = "oops"
    fake.create(bad, plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry)) as source:
        await registry.when_synced()
        assert [r.name for r in registry.records()] == ["good"]
        assert source.stats.skipped == 1


# -- namespaces ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_namespace_scoping(fake: FakeKubeAPI) -> None:
    """--namespace sees only its namespace, before and after the list."""
    fake.create(batchsandbox("mine", NS), plural=PLURAL)
    fake.create(batchsandbox("theirs", "other"), plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry, namespace=NS)) as source:
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        fake.create(batchsandbox("theirs-too", "other"), plural=PLURAL)
        fake.create(batchsandbox("mine-too", NS), plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "mine-too"), what="ADDED in my namespace")
        assert [r.name for r in registry.records()] == ["mine", "mine-too"]
        assert source.stats.events["ADDED"] == 1


@pytest_twisted.ensureDeferred
async def test_all_namespaces_and_ambiguous_names(fake: FakeKubeAPI) -> None:
    """--all-namespaces lists and watches cluster-wide; a name in two namespaces is ambiguous."""
    fake.create(batchsandbox("dup", "team-a"), plural=PLURAL)
    fake.create(batchsandbox("solo", "team-b"), plural=PLURAL)
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry, namespace=None)):
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
        assert fake.list_requests()[0].path == f"/apis/sandbox.opensandbox.io/v1alpha1/{PLURAL}"
        assert registry.lookup("dup").namespace == "team-a"
        fake.create(batchsandbox("dup", "team-b", endpoints=["10.0.0.2"]), plural=PLURAL)
        await wait_for(lambda: len(registry) == 3, what="ADDED in another namespace")
        with pytest.raises(SandboxAmbiguous, match="team-a, team-b"):
            registry.lookup("dup")
        assert endpoint(registry, "solo") == "10.0.0.1"
        fake.delete("team-a", "dup", plural=PLURAL)
        await wait_for(lambda: endpoint(registry, "dup") == "10.0.0.2", what="unambiguous again")


@pytest_twisted.ensureDeferred
async def test_agent_sandboxes_resolve_through_name_candidates(fake: FakeKubeAPI) -> None:
    """An agent-sandbox source feeds a registry that resolves ids via SPEC 4.2 candidates."""
    fake.create(agentsandbox("sandbox-4f2a1b"), plural="sandboxes")
    fake.create(batchsandbox("not-an-agent"), plural=PLURAL)
    registry = SandboxRegistry(candidates=name_candidates)
    async with Running(make_source(fake, registry, kind=AGENTSANDBOX_KIND)):
        await registry.when_synced()
        assert registry.lookup("4f2a1b").endpoint == "sandbox-4f2a1b.opensandbox.svc.cluster.local"
        assert len(registry) == 1
        fake.create(agentsandbox("my-box", ready="False"), plural="sandboxes")
        await wait_for(lambda: len(registry) == 2, what="ADDED")
        with pytest.raises(SandboxNotReady, match="condition Ready is False"):
            registry.lookup("My.Box").require_ready()


# -- shutdown ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_mid_stream_is_prompt_and_leaves_no_threads(fake: FakeKubeAPI) -> None:
    """stopService aborts a watch that would block for minutes and joins its thread."""
    registry = SandboxRegistry()
    source = make_source(fake, registry, watch_timeout_s=300, request_timeout_s=300.0)
    source.startService()
    await wait_for(lambda: fake.open_watches == 1, what="a watch")
    threads = source.watch_threads
    assert threads
    started = time.monotonic()
    await source.stopService()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert not any(t.is_alive() for t in threads)
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-kube-watch")]
    await wait_for(lambda: fake.open_watches == 0, what="the server to see the close")


@pytest_twisted.ensureDeferred
async def test_stop_during_backoff_is_prompt(fake: FakeKubeAPI) -> None:
    """A long backoff wait is cancelled by stopService."""
    fake.fail_next(1)
    registry = SandboxRegistry()
    source = make_source(fake, registry, backoff_base_s=600.0, backoff_cap_s=600.0)
    source.startService()
    await wait_for(lambda: source.stats.restarts["error"] == 1, what="a failure")
    threads = source.watch_threads
    started = time.monotonic()
    await source.stopService()
    assert time.monotonic() - started < 2.0
    assert not any(t.is_alive() for t in threads)
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_stop_before_first_list_answers(fake: FakeKubeAPI) -> None:
    """Stopping while the first request is in flight does not apply anything late."""
    registry = SandboxRegistry()
    source = make_source(fake, registry)
    source.startService()
    await source.stopService()
    assert source.watch_threads == []


@pytest_twisted.ensureDeferred
async def test_stop_with_a_request_stuck_on_a_silent_server(fake: FakeKubeAPI) -> None:
    """A request that cannot be aborted does not hold up stopService; its thread is a daemon."""
    fake.hold_next(1)
    registry = SandboxRegistry()
    source = make_source(fake, registry, stop_grace_s=0.2)
    source.startService()
    await wait_for(lambda: fake.requests, what="the request")
    threads = source.watch_threads
    started = time.monotonic()
    await source.stopService()
    assert time.monotonic() - started < 2.0
    assert threads and all(t.daemon for t in threads)
    fake.release()
    await wait_for(lambda: not any(t.is_alive() for t in threads), what="the thread to end")
    assert not registry.synced


@pytest_twisted.ensureDeferred
async def test_restart_after_stop(fake: FakeKubeAPI) -> None:
    """A stopped source can start again and lists afresh."""
    fake.create(batchsandbox("a"), plural=PLURAL)
    registry = SandboxRegistry()
    source = make_source(fake, registry)
    async with Running(source):
        await wait_for(lambda: fake.open_watches == 1, what="a watch")
    fake.create(batchsandbox("b"), plural=PLURAL)
    async with Running(source):
        await wait_for(lambda: source.stats.lists == 2, what="a second list")
        assert endpoint(registry, "b") == "10.0.0.1"


# -- client configuration -------------------------------------------------------------------


def write_kubeconfig(path: Path, fake_url: str, current: str | None = "alpha") -> Path:
    """A kubeconfig with two contexts on the fake server, told apart by their tokens."""
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": fake_url}}],
        "users": [
            {"name": "alice", "user": {"token": "token-alpha"}},
            {"name": "bob", "user": {"token": "token-beta"}},
        ],
        "contexts": [
            {"name": "alpha", "context": {"cluster": "fake", "user": "alice"}},
            {"name": "beta", "context": {"cluster": "fake", "user": "bob"}},
        ],
    }
    if current:
        config["current-context"] = current
    path.write_text(yaml.safe_dump(config))
    return path


async def sync_with(fake: FakeKubeAPI, api_client: ApiClient) -> str | None:
    """Run a source on C{api_client} until synced; the Authorization it sent."""
    registry = SandboxRegistry()
    async with Running(make_source(fake, registry, api_client=api_client)):
        await registry.when_synced()
    return fake.list_requests()[-1].authorization


@pytest_twisted.ensureDeferred
async def test_kubeconfig_and_context_are_honoured(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """--kubeconfig selects the file; --context overrides its current-context."""
    path = write_kubeconfig(tmp_path / "config", fake.url)
    assert await sync_with(fake, load_api_client(str(path))) == "Bearer token-alpha"
    assert await sync_with(fake, load_api_client(str(path), "beta")) == "Bearer token-beta"


def _service_account(directory: Path) -> dict[str, str]:
    """Mount a pod's service account under C{directory}; the pod's environment."""
    directory.mkdir()
    (directory / "token").write_text("pod-token")
    (directory / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


@pytest_twisted.ensureDeferred
async def test_kubeconfig_env_used_outside_a_cluster(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """$KUBECONFIG (a list; missing files skipped) is used outside a cluster."""
    path = write_kubeconfig(tmp_path / "config", fake.url, current="beta")
    environ = {"KUBECONFIG": f"{tmp_path / 'missing'}:{path}"}
    client = load_api_client(
        environ=environ,
        service_account_dir=str(tmp_path / "none"),
        default_kubeconfig=str(tmp_path / "none"),
    )
    assert await sync_with(fake, client) == "Bearer token-beta"


@pytest_twisted.ensureDeferred
async def test_kubeconfig_env_beats_in_cluster(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """In a pod, a $KUBECONFIG set on purpose wins over the service account
    (client-go's order, which the Go ingress follows)."""
    path = write_kubeconfig(tmp_path / "config", fake.url, current="beta")
    account = tmp_path / "sa"
    pod_env = {**_service_account(account), "KUBECONFIG": str(path)}
    client = load_api_client(environ=pod_env, service_account_dir=str(account))
    assert await sync_with(fake, client) == "Bearer token-beta"
    # --context applies to the $KUBECONFIG file too.
    client = load_api_client(context="alpha", environ=pod_env, service_account_dir=str(account))
    assert await sync_with(fake, client) == "Bearer token-alpha"


@pytest_twisted.ensureDeferred
async def test_explicit_kubeconfig_beats_env_and_in_cluster(
    fake: FakeKubeAPI, tmp_path: Path
) -> None:
    """--kubeconfig wins over $KUBECONFIG and over the service account."""
    path = write_kubeconfig(tmp_path / "config", fake.url, current="beta")
    account = tmp_path / "sa"
    pod_env = {**_service_account(account), "KUBECONFIG": str(tmp_path / "elsewhere")}
    explicit = load_api_client(str(path), environ=pod_env, service_account_dir=str(account))
    assert await sync_with(fake, explicit) == "Bearer token-beta"


def test_in_cluster_beats_default_kubeconfig(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """In a pod without $KUBECONFIG (empty counts as unset), the service account
    wins over ~/.kube/config."""
    default = write_kubeconfig(tmp_path / "config", fake.url)
    account = tmp_path / "sa"
    pod_env = {**_service_account(account), "KUBECONFIG": ""}
    client = load_api_client(
        environ=pod_env, service_account_dir=str(account), default_kubeconfig=str(default)
    )
    assert client.configuration.host == "https://10.96.0.1:443"
    client.close()


@pytest_twisted.ensureDeferred
async def test_default_kubeconfig_last(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """~/.kube/config is used outside a pod without $KUBECONFIG, and in a pod when
    --context asks for a kubeconfig context (the service account has none)."""
    default = write_kubeconfig(tmp_path / "config", fake.url)
    client = load_api_client(
        environ={}, service_account_dir=str(tmp_path / "none"), default_kubeconfig=str(default)
    )
    assert await sync_with(fake, client) == "Bearer token-alpha"
    account = tmp_path / "sa"
    pod_env = _service_account(account)
    client = load_api_client(
        context="beta",
        environ=pod_env,
        service_account_dir=str(account),
        default_kubeconfig=str(default),
    )
    assert await sync_with(fake, client) == "Bearer token-beta"


def test_in_cluster_service_account(tmp_path: Path) -> None:
    """In a pod (service host set, token mounted) the service account is used."""
    (tmp_path / "token").write_text("pod-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    client = load_api_client(environ=environ, service_account_dir=str(tmp_path))
    configuration = client.configuration
    assert configuration.host == "https://10.96.0.1:443"
    # What the client will send (kubernetes < 36 keeps the key elsewhere).
    assert configuration.auth_settings()["BearerToken"]["value"] == "bearer pod-token"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")
    client.close()


def one_line_error(flag: str, call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    text = str(info.value)
    assert text.startswith(f"--{flag}: ")
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "content",
    [
        "clusters: [unclosed",
        "",
        "just a string",
        "apiVersion: v1\ncurrent-context: alpha\ncontexts: []\n",
        "apiVersion: v1\ncurrent-context: alpha\ncontexts:\n- name: alpha\n  context: {cluster: nope}\n",
    ],
    ids=["bad-yaml", "empty", "scalar", "no-contexts", "dangling-cluster"],
)
def test_invalid_kubeconfig_is_one_clear_line(tmp_path: Path, content: str) -> None:
    """An unusable kubeconfig stops start-up with one line naming --kubeconfig."""
    path = tmp_path / "config"
    path.write_text(content)
    text = one_line_error("kubeconfig", lambda: load_api_client(str(path)))
    assert str(path) in text


def test_missing_configuration_is_one_clear_line(tmp_path: Path) -> None:
    """No file, no cluster: the error says what was tried."""
    text = one_line_error("kubeconfig", lambda: load_api_client(str(tmp_path / "nope")))
    assert "no such file" in text
    # $KUBECONFIG set on purpose but wrong: an error, not a silent fallback.
    text = one_line_error(
        "kubeconfig",
        lambda: load_api_client(
            environ={"KUBECONFIG": str(tmp_path / "nope")}, service_account_dir=str(tmp_path)
        ),
    )
    assert "$KUBECONFIG" in text and "no such file" in text
    text = one_line_error(
        "kubeconfig",
        lambda: load_api_client(
            environ={},
            service_account_dir=str(tmp_path),
            default_kubeconfig=str(tmp_path / "nope"),
        ),
    )
    assert "not running in a pod" in text and str(tmp_path / "nope") in text
    text = one_line_error(
        "kubeconfig",
        lambda: load_api_client(
            context="alpha",
            environ={},
            service_account_dir=str(tmp_path),
            default_kubeconfig=str(tmp_path / "nope"),
        ),
    )
    assert "--context" in text


def test_unknown_context_names_the_known_ones(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """--context must exist; the error lists the contexts there are."""
    path = write_kubeconfig(tmp_path / "config", fake.url)
    text = one_line_error("context", lambda: load_api_client(str(path), "gamma"))
    assert "alpha, beta" in text


def test_missing_current_context_asks_for_context(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """Without current-context the operator is told to pass --context."""
    path = write_kubeconfig(tmp_path / "config", fake.url, current=None)
    text = one_line_error("kubeconfig", lambda: load_api_client(str(path)))
    assert "--context" in text
    load_api_client(str(path), "alpha").close()


@pytest_twisted.ensureDeferred
async def test_build_kubernetes_source_from_config(fake: FakeKubeAPI, tmp_path: Path) -> None:
    """The service built from an IngressConfig watches its namespace with its context."""
    path = write_kubeconfig(tmp_path / "config", fake.url)
    fake.create(batchsandbox("sbx", "team"), plural=PLURAL)
    config = IngressConfig(
        namespace="team", kubeconfig=str(path), context="beta", provider_type="batchsandbox"
    ).validate()
    registry = SandboxRegistry()
    # Any: mypy cannot see through the zope interface IService.
    service: Any = build_source(config, registry, reactor)
    service.startService()
    try:
        await registry.when_synced()
        assert endpoint(registry, "sbx") == "10.0.0.1"
        request = fake.list_requests()[-1]
        assert request.path.endswith("/namespaces/team/batchsandboxes")
        assert request.authorization == "Bearer token-beta"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_user_agent_names_the_ingress_and_its_version(
    fake: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists and watches carry User-Agent opensandbox-ingress/<build version>."""
    monkeypatch.setenv("OPENSANDBOX_INGRESS_VERSION", "7.7.7-ua")
    path = write_kubeconfig(tmp_path / "config", fake.url)
    config = IngressConfig(kubeconfig=str(path)).validate()
    registry = SandboxRegistry()
    service: Any = build_source(config, registry, reactor)
    service.startService()
    try:
        await registry.when_synced()
        await wait_for(lambda: bool(fake.watch_requests()), what="a watch")
    finally:
        await service.stopService()
    assert {r.user_agent for r in fake.requests} == {"opensandbox-ingress/7.7.7-ua"}


def test_build_kubernetes_source_rejects_bad_configuration(tmp_path: Path) -> None:
    """A broken kubeconfig fails while building, before anything starts."""
    path = tmp_path / "config"
    path.write_text("::: not yaml :::\n\t")
    config = IngressConfig(kubeconfig=str(path))
    one_line_error(
        "kubeconfig", lambda: build_source(config, SandboxRegistry(), reactor)
    )
