"""
Renew intents end to end (SPEC section 6, section 10 "renew intents from
long sessions", issue 6): real clients through the running ingress, a real
HTTP or WebSocket backend, and a real C{redis-server} read back with
C{LRANGE}.  Time is real here, so every wait is a deadline, never a sleep.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from opensandbox_ingress import IngressService, renew
from opensandbox_ingress.config import RenewIntentConfig
from opensandbox_ingress.renew import RenewIntentPublisher
from tests.backend import Backend
from tests.helpers import ingress_url, request, start_ingress, wait_until
from tests.processes import (
    free_port,
    http_get,
    poll,
    start_stream_backend,
    stop,
    twistd,
    wait_healthy,
)
from tests.redis_server import RedisServer
from tests.ws_backend import WsBackend, connect_client

KEY = "opensandbox:renew:e2e"
#: observed_at as the ingress writes it: RFC 3339, UTC, microseconds, C{Z}.
OBSERVED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
#: An ACL user limited to list commands on the C{opensandbox:*} keys.
ACL_USER = "renewer on >s3cret-pw resetchannels ~opensandbox:* +@list +@connection"

SANDBOXES: list[dict[str, Any]] = [
    {"name": "sbx", "endpoint": "127.0.0.1"},
    {"name": "other", "endpoint": "127.0.0.1"},
    {"name": "private", "endpoint": "127.0.0.1", "secure_access_token": "tok-1"},
    {"name": "starting", "endpoint": "127.0.0.1", "ready": False},
]


# -- helpers ---------------------------------------------------------------------------


@asynccontextmanager
async def renewing_ingress(
    tmp_path: Path,
    dsn: str,
    *,
    key: str = KEY,
    min_interval_s: float = 0.0,
    queue_max_len: int = 0,
    **overrides: Any,
) -> AsyncIterator[IngressService]:
    """An ingress on the file provider publishing renew intents to C{dsn}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("websocket_ping_interval_s", 0)
    service = await start_ingress(
        tmp_path,
        SANDBOXES,
        renew_intent=RenewIntentConfig(
            enabled=True,
            redis_dsn=dsn,
            queue_key=key,
            min_interval_s=min_interval_s,
            queue_max_len=queue_max_len,
        ),
        **overrides,
    )
    try:
        yield service
    finally:
        await service.stopService()


def publisher(service: IngressService) -> RenewIntentPublisher:
    return service.core.renew


def raw_intents(server: RedisServer, key: str = KEY) -> list[bytes]:
    """The list as stored, newest first."""
    client = server.client()
    try:
        return cast(list[bytes], client.lrange(key, 0, -1))
    finally:
        client.close()


def intents(server: RedisServer, key: str = KEY) -> list[dict[str, Any]]:
    """The list decoded, newest first."""
    return [json.loads(item) for item in raw_intents(server, key)]


def list_length(server: RedisServer, key: str = KEY) -> int:
    client = server.client()
    try:
        return int(client.llen(key))
    finally:
        client.close()


def stamp(intent: dict[str, Any]) -> float:
    """An intent's C{observed_at} as Unix seconds, after checking its format."""
    text = intent["observed_at"]
    assert OBSERVED_AT.fullmatch(text), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed.timestamp()


def pause(seconds: float) -> Deferred[None]:
    """Let the reactor run for C{seconds}: pacing traffic, never waiting for a result."""
    return deferLater(reactor, seconds, lambda: None)


def to(sandbox: str, port: int) -> dict[str, str]:
    """Header-mode routing headers for C{sandbox}'s C{port}."""
    return {"OpenSandbox-Ingress-To": f"{sandbox}-{port}"}


async def get(url: str, headers: dict[str, str], pool: HTTPConnectionPool) -> int:
    """One GET over C{pool}; the status, once the body has arrived."""
    response = await treq.get(url, headers=headers, pool=pool)
    await treq.content(response)
    return int(response.code)


async def timed_gets(
    url: str, headers: dict[str, str], pool: HTTPConnectionPool, count: int,
    after_each: Callable[[], None],
) -> tuple[list[int], list[float]]:
    """C{count} sequential GETs: their statuses and latencies in seconds."""
    codes, latencies = [], []
    for _ in range(count):
        started = time.perf_counter()
        codes.append(await get(url, headers, pool))
        latencies.append(time.perf_counter() - started)
        after_each()
    return codes, latencies


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# -- payload ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_header_mode_payload_is_exact(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    """Header mode: C{sandbox_id}, C{observed_at}, C{port}; no C{request_uri}; compact JSON."""
    async with renewing_ingress(tmp_path, redis_server.url) as ingress:
        before = time.time()
        response, _ = await request(
            "GET", ingress_url(ingress, "/echo/x?q=1"), headers=to("sbx", backend.port_number)
        )
        after = time.time()
        assert response.code == 200
        await wait_until(lambda: list_length(redis_server) == 1, what="the intent")
    (raw,) = raw_intents(redis_server)
    intent = json.loads(raw)
    assert list(intent) == ["sandbox_id", "observed_at", "port"]
    assert intent["sandbox_id"] == "sbx"
    assert intent["port"] == backend.port_number
    assert before - 0.001 <= stamp(intent) <= after + 0.001
    assert raw == (
        b'{"sandbox_id":"sbx","observed_at":"%s","port":%d}'
        % (intent["observed_at"].encode(), backend.port_number)
    )


@pytest_twisted.ensureDeferred
async def test_uri_mode_payload_carries_the_forwarded_path(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    """URI mode: C{request_uri} is the path the backend got, as sent, without the query."""
    port = backend.port_number
    async with renewing_ingress(tmp_path, redis_server.url, mode="uri") as ingress:
        before = time.time()
        response, body = await request(
            "GET", ingress_url(ingress, f"/sbx/{port}/echo/a%20b/deep?token=t0p&b=%2F")
        )
        assert response.code == 200
        assert json.loads(body)["uri"] == "/echo/a%20b/deep?token=t0p&b=%2F"
        response, body = await request("GET", ingress_url(ingress, f"/sbx/{port}?x=1"))
        assert response.code == 200
        assert json.loads(body)["uri"] == "/?x=1"
        after = time.time()
        await wait_until(lambda: list_length(redis_server) == 2, what="both intents")
    newest, oldest = raw_intents(redis_server)
    for raw, uri in ((oldest, "/echo/a%20b/deep"), (newest, "/")):
        intent = json.loads(raw)
        assert list(intent) == ["sandbox_id", "observed_at", "port", "request_uri"]
        assert (intent["sandbox_id"], intent["port"], intent["request_uri"]) == ("sbx", port, uri)
        assert before - 0.001 <= stamp(intent) <= after + 0.001
        assert raw == (
            b'{"sandbox_id":"sbx","observed_at":"%s","port":%d,"request_uri":"%s"}'
            % (intent["observed_at"].encode(), port, uri.encode())
        )


@pytest.mark.parametrize("mode", ["header", "uri"])
@pytest_twisted.ensureDeferred
async def test_failed_routing_or_authorisation_offers_nothing(
    tmp_path: Path, backend: Backend, redis_server: RedisServer, mode: str
) -> None:
    """400, 401, 404 and 503 answers publish no intent; an authorised secure request does."""
    port = str(backend.port_number)

    def route(sandbox: str, port: str, **headers: str) -> tuple[str, dict[str, str]]:
        extra = {k.replace("_", "-"): v for k, v in headers.items()}
        if mode == "uri":
            return f"/{sandbox}/{port}/echo", extra
        return "/echo", {"OpenSandbox-Ingress-To": f"{sandbox}-{port}", **extra}

    failing = [
        (route("sbx", "notaport"), 400),
        (route("missing", port), 404),
        (route("private", port), 401),
        (route("private", port, OpenSandbox_Secure_Access="wrong"), 401),
        (route("starting", port), 503),
    ]
    async with renewing_ingress(tmp_path, redis_server.url, mode=mode) as ingress:
        for (path, headers), status in failing:
            response, _ = await request("GET", ingress_url(ingress, path), headers=headers)
            assert response.code == status, (path, headers)
        assert publisher(ingress).stats.offered == 0
        path, headers = route("private", port, OpenSandbox_Secure_Access="tok-1")
        response, _ = await request("GET", ingress_url(ingress, path), headers=headers)
        assert response.code == 200
        await wait_until(lambda: list_length(redis_server) == 1, what="the authorised intent")
        assert publisher(ingress).stats.offered == 1
    assert [i["sandbox_id"] for i in intents(redis_server)] == ["private"]


# -- throttle and cap ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_throttle_one_intent_per_sandbox_per_interval(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    """N requests within the interval publish one intent per sandbox; after it, another."""
    interval = 0.5
    port = backend.port_number
    url_headers = to("sbx", port)
    async with renewing_ingress(
        tmp_path, redis_server.url, min_interval_s=interval
    ) as ingress:
        stats = publisher(ingress).stats
        url = ingress_url(ingress, "/echo")
        started = time.monotonic()
        for _ in range(10):
            response, _ = await request("GET", url, headers=url_headers)
            assert response.code == 200
        response, _ = await request("GET", url, headers=to("other", port))
        assert response.code == 200
        burst = time.monotonic() - started
        assert burst < interval, f"the burst took {burst:.3f}s, longer than the interval"
        await wait_until(lambda: stats.published == 2, what="one intent per sandbox")
        assert (stats.offered, stats.throttled) == (11, 9)
        assert sorted(i["sandbox_id"] for i in intents(redis_server)) == ["other", "sbx"]

        # Keep the traffic going until the interval is over: one more intent.
        deadline = time.monotonic() + 5
        while stats.published < 3:
            assert time.monotonic() < deadline, "no second intent after the interval"
            response, _ = await request("GET", url, headers=url_headers)
            assert response.code == 200
            await pause(0.02)
        await wait_until(lambda: list_length(redis_server) == 3, what="the second sbx intent")
    second, first = [i for i in intents(redis_server) if i["sandbox_id"] == "sbx"]
    assert stamp(second) - stamp(first) >= interval - 0.001


@pytest_twisted.ensureDeferred
async def test_ltrim_caps_the_list(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    """With C{queue_max_len}, the list keeps only the newest intents."""
    port = backend.port_number
    async with renewing_ingress(
        tmp_path, redis_server.url, mode="uri", queue_max_len=3
    ) as ingress:
        for i in range(8):
            response, _ = await request("GET", ingress_url(ingress, f"/sbx/{port}/echo/{i}"))
            assert response.code == 200
        await wait_until(lambda: publisher(ingress).stats.published == 8, what="8 intents")
    assert [i["request_uri"] for i in intents(redis_server)] == ["/echo/7", "/echo/6", "/echo/5"]


# -- WebSocket -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["header", "uri"])
@pytest_twisted.ensureDeferred
async def test_long_websocket_session_keeps_renewing(
    tmp_path: Path, ws_backend: WsBackend, redis_server: RedisServer, mode: str
) -> None:
    """Messages flowing over more than two intervals publish intents beyond the handshake's."""
    interval = 0.5
    port = ws_backend.port_number
    if mode == "uri":
        path, expected = f"/sbx/{port}/term/1?cols=80", {"request_uri": "/term/1"}
    else:
        path, expected = "/term/1?cols=80", {}
    async with renewing_ingress(
        tmp_path, redis_server.url, min_interval_s=interval, mode=mode
    ) as ingress:
        stats = publisher(ingress).stats
        client = await connect_client(
            int(ingress.addresses()[0].port), f"sbx-{port}", path=path
        )
        try:
            await wait_until(lambda: stats.published == 1, what="the handshake's intent")
            deadline = time.monotonic() + 10
            sent = 0
            # A keystroke every 50 ms on the one session, and no other request.
            while list_length(redis_server) < 3:
                assert time.monotonic() < deadline, f"{stats} after {sent} messages"
                client.sendMessage(b"keystroke %d" % sent, isBinary=False)
                sent += 1
                await wait_until(lambda n=sent: len(client.messages) == n, what="the echo")
                await pause(0.05)
        finally:
            client.transport.abortConnection()
        assert len(ws_backend.opened) == 1
        assert ws_backend.request_line() == "GET /term/1?cols=80 HTTP/1.1"
        # Every message both ways was offered; the throttle let few through.
        assert stats.offered == 1 + 2 * sent
    found = intents(redis_server)
    for intent in found:
        assert intent == {
            "sandbox_id": "sbx", "observed_at": intent["observed_at"], "port": port, **expected
        }
    times = sorted(stamp(i) for i in found)
    assert all(b - a >= interval - 0.001 for a, b in zip(times, times[1:]))
    assert times[-1] - times[0] >= 2 * interval - 0.002


# -- Redis down, back, and with credentials --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_hung_or_stopped_keeps_latency_and_memory(
    tmp_path: Path,
    backend: Backend,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Redis hung (writes paused) or stopped: every request still answers 200
    at the latency it had with Redis up, and the intent queue stays bounded.
    """
    monkeypatch.setattr(renew, "DEFAULT_QUEUE_SIZE", 16)
    pool = HTTPConnectionPool(reactor, persistent=True)
    admin = redis_server.client()
    headers = to("sbx", backend.port_number)
    medians: dict[str, float] = {}
    try:
        # Interval 0: every request makes an intent, the most work Redis can cause.
        async with renewing_ingress(tmp_path, redis_server.url) as ingress:
            renewer = publisher(ingress)
            assert renewer.queue_size == 16
            stats = renewer.stats
            url = ingress_url(ingress, "/echo")
            most_queued = 0

            def watch_queue() -> None:
                nonlocal most_queued
                most_queued = max(most_queued, renewer.queued)

            async def phase(name: str) -> None:
                codes, latencies = await timed_gets(url, headers, pool, 200, watch_queue)
                assert codes == [200] * 200, name
                medians[name] = statistics.median(latencies)

            def settled() -> bool:
                done = stats.published + stats.failed + stats.dropped_overflow
                return renewer.queued == 0 and done == stats.offered

            await timed_gets(url, headers, pool, 20, watch_queue)  # warm up
            await phase("up")
            await wait_until(lambda: stats.published == 220, what="intents while Redis is up")

            # Hung: Redis accepts but does not answer LPUSH; the publishing
            # thread is stuck in its first batch for the whole phase.
            admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
            try:
                await phase("hung")
                assert most_queued <= renewer.queue_size
                assert stats.dropped_overflow > 0
                assert stats.published == 220
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
            await wait_until(settled, what="the queue to drain after the pause")

            redis_server.stop()
            dropped_before = stats.dropped_overflow
            await phase("stopped")
            await wait_until(lambda: stats.failed > 0, what="a failed publish")
            assert most_queued <= renewer.queue_size
            assert renewer.queued <= renewer.queue_size
            assert stats.dropped_overflow > dropped_before
            assert len(renewer.throttle) == 0
    finally:
        admin.close()
        await pool.closeCachedConnections()
    bound = max(3 * medians["up"], medians["up"] + 0.020)
    for name in ("hung", "stopped"):
        assert medians[name] < bound, (
            f"median latency {medians[name] * 1000:.2f} ms with Redis {name}, "
            f"{medians['up'] * 1000:.2f} ms with it up"
        )


@pytest_twisted.ensureDeferred
async def test_redis_restarted_intents_flow_again(
    tmp_path: Path,
    backend: Backend,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    log_events: list[dict[str, Any]],
) -> None:
    """Redis restarted on the same port: publishing resumes by itself, the outage logged once or twice."""
    # Production backs off up to 5 s; a shorter cap keeps this test's deadline short.
    monkeypatch.setattr(RenewIntentPublisher, "retry_max_s", 1.0)
    port = backend.port_number
    async with renewing_ingress(tmp_path, redis_server.url, mode="uri") as ingress:
        stats = publisher(ingress).stats
        url = ingress_url(ingress, f"/sbx/{port}/echo/before")
        response, _ = await request("GET", url)
        assert response.code == 200
        await wait_until(lambda: list_length(redis_server) == 1, what="the intent before")

        redis_server.stop()
        for i in range(5):
            response, _ = await request("GET", ingress_url(ingress, f"/sbx/{port}/echo/down{i}"))
            assert response.code == 200
        await wait_until(lambda: stats.failed > 0, what="a failed publish")

        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 10
        attempt = 0
        while not raw_intents(redis_server):
            assert time.monotonic() < deadline, f"no intent after the restart: {stats}"
            attempt += 1
            response, _ = await request(
                "GET", ingress_url(ingress, f"/sbx/{port}/echo/after{attempt}")
            )
            assert response.code == 200
            await pause(0.05)
        await wait_until(
            lambda: any("publishing renew intents" in formatEvent(e) and "again" in formatEvent(e)
                        for e in log_events),
            what="the recovery log line",
        )
    landed = intents(redis_server)
    assert landed and all(i["sandbox_id"] == "sbx" and i["port"] == port for i in landed)
    assert any(i["request_uri"].startswith("/echo/after") for i in landed)
    warnings = [formatEvent(e) for e in log_events
                if "cannot publish renew intents" in formatEvent(e)]
    assert 1 <= len(warnings) <= 3, warnings


@pytest_twisted.ensureDeferred
async def test_sandboxes_busy_during_an_outage_are_renewed_once_redis_is_back(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    """
    With a 60 s interval, two sandboxes whose only intents were lost while
    Redis was stopped each get one within seconds of its restart (the
    failed batch releases the throttle), with production backoff.
    """
    port = backend.port_number
    names = ["sbx", "other"]
    async with renewing_ingress(tmp_path, redis_server.url, min_interval_s=60) as ingress:
        stats = publisher(ingress).stats
        redis_server.stop()
        for name in names:
            response, _ = await request("GET", ingress_url(ingress, "/echo/down"), to(name, port))
            assert response.code == 200
        await wait_until(lambda: stats.failed >= len(names), what="the lost intents")
        redis_server.start()  # same port, empty
        restarted = time.monotonic()
        deadline = restarted + 15
        while {i["sandbox_id"] for i in intents(redis_server)} != set(names):
            assert time.monotonic() < deadline, f"not renewed after the restart: {stats}"
            for name in names:  # live traffic continues
                response, _ = await request("GET", ingress_url(ingress, "/echo/up"), to(name, port))
                assert response.code == 200
            await pause(0.1)
        # The bound is production's backoff cap plus scheduling slack.
        assert time.monotonic() - restarted < renew.RETRY_MAX_S + 3
    assert sorted(i["sandbox_id"] for i in intents(redis_server)) == sorted(names)


@pytest_twisted.ensureDeferred
async def test_dsn_with_acl_user_and_password(
    tmp_path: Path,
    backend: Backend,
    redis_server_factory: Callable[..., RedisServer],
    log_events: list[dict[str, Any]],
) -> None:
    """An ACL user's DSN publishes; a wrong password publishes nothing and requests still pass."""
    server = redis_server_factory(acl_users=[ACL_USER])
    good_key, bad_key = "opensandbox:renew:good", "opensandbox:renew:bad"
    headers = to("sbx", backend.port_number)
    async with renewing_ingress(
        tmp_path / "good", server.dsn(user="renewer", password="s3cret-pw"), key=good_key
    ) as good, renewing_ingress(
        tmp_path / "bad", server.dsn(user="renewer", password="wr0ng-pw"), key=bad_key
    ) as bad:
        for ingress in (good, bad):
            response, _ = await request("GET", ingress_url(ingress, "/echo"), headers=headers)
            assert response.code == 200
        await wait_until(lambda: list_length(server, good_key) == 1, what="the good intent")
        await wait_until(lambda: publisher(bad).stats.failed == 1, what="the refused intent")
        response, _ = await request("GET", ingress_url(bad, "/echo"), headers=headers)
        assert response.code == 200
    (intent,) = intents(server, good_key)
    assert (intent["sandbox_id"], intent["port"]) == ("sbx", backend.port_number)
    assert list_length(server, bad_key) == 0
    assert publisher(bad).stats.published == 0
    text = "\n".join(formatEvent(e) for e in log_events)
    assert "AuthenticationError" in text and "renewer:***@" in text
    assert "s3cret-pw" not in text and "wr0ng-pw" not in text


# -- the twistd process ----------------------------------------------------------------


def test_twistd_flags_publish_intents(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    """C{twistd opensandbox-ingress --renew-intent-*} publishes to the given DSN and key."""
    server = redis_server_factory(acl_users=[ACL_USER])
    key = "opensandbox:renew:twistd"
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(json.dumps([{"name": "sbx", "endpoint": "127.0.0.1"}]))
    port = free_port()
    proc = twistd([
        "--provider-type", "file", "--sandboxes-file", str(sandboxes),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--renew-intent-enabled",
        "--renew-intent-redis-dsn", server.dsn(user="renewer", password="s3cret-pw"),
        "--renew-intent-queue-key", key,
        "--renew-intent-queue-max-len", "5",
        "--renew-intent-min-interval", "30",
    ])
    try:
        wait_healthy(proc, port)
        for _ in range(3):
            status, body = http_get(
                port, "/download?size=5", {"OpenSandbox-Ingress-To": f"sbx-{backend_port}"}
            )
            assert (status, body) == (200, b"xxxxx")
        poll(lambda: list_length(server, key) >= 1, 10, "the intent in Redis")
    finally:
        out, err = stop(proc)
        stop(backend)
    (intent,) = intents(server, key)  # the other two were throttled
    assert list(intent) == ["sandbox_id", "observed_at", "port"]
    assert (intent["sandbox_id"], intent["port"]) == ("sbx", backend_port)
    stamp(intent)
    logs = (out + err).decode()
    assert f"publishing renew intents to redis://renewer:***@127.0.0.1:{server.port}/0" in logs
    assert "s3cret-pw" not in logs
