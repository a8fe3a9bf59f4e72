"""
Tests for L{opensandbox_ingress.renew}: the intent payload, the throttle,
and the publisher against a real C{redis-server}.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from opensandbox_ingress import renew
from opensandbox_ingress.config import ConfigError, RenewIntentConfig
from opensandbox_ingress.renew import RenewIntentPublisher
from opensandbox_ingress.renew_rules import (
    RenewThrottle,
    format_observed_at,
    intent_payload,
    mask_dsn,
)
from tests.conftest_redis import redis_server, redis_server_factory  # noqa: F401
from tests.redis_server import RedisServer, free_port

#: The example intent of the OpenSandbox server (shared/examples/renew-intent.json).
EXAMPLE = (
    '{"sandbox_id": "sbx-7f3a9c", "observed_at": "2026-11-28T17:05:09.123456789Z", '
    '"port": 8080, "request_uri": "/api/users"}'
)
RFC3339_UTC_FRACTION = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z")
KEY = "opensandbox:renew:intent"


# --- payload -------------------------------------------------------------------


def test_payload_is_exact() -> None:
    """The payload is compact JSON with keys in the server's order."""
    observed = datetime(2026, 11, 28, 17, 5, 9, 123456, tzinfo=timezone.utc)
    assert intent_payload("sbx-7f3a9c", observed, 8080, "/api/users") == (
        b'{"sandbox_id":"sbx-7f3a9c","observed_at":"2026-11-28T17:05:09.123456Z",'
        b'"port":8080,"request_uri":"/api/users"}'
    )


def test_payload_has_the_example_shape() -> None:
    """Same keys, order and value types as the example; both timestamps are RFC 3339 UTC."""
    example = json.loads(EXAMPLE)
    ours = json.loads(intent_payload("sbx-7f3a9c", time.time(), 8080, "/api/users"))
    assert list(ours) == list(example)
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in example.items()}
    assert RFC3339_UTC_FRACTION.fullmatch(example["observed_at"])
    assert RFC3339_UTC_FRACTION.fullmatch(ours["observed_at"])


@pytest.mark.parametrize(
    ("port", "uri", "keys"),
    [
        (0, "", ["sandbox_id", "observed_at"]),
        (8080, "", ["sandbox_id", "observed_at", "port"]),
        (0, "/x", ["sandbox_id", "observed_at", "request_uri"]),
        (1, "/", ["sandbox_id", "observed_at", "port", "request_uri"]),
    ],
)
def test_payload_omits_zero_port_and_empty_uri(port: int, uri: str, keys: list[str]) -> None:
    """C{port} 0 and an empty C{request_uri} are left out, as Go's omitempty does."""
    assert list(json.loads(intent_payload("sb", 0.0, port, uri))) == keys


@pytest.mark.parametrize(
    ("observed", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (1.5, "1970-01-01T00:00:01.500000Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), "2026-01-02T03:04:05.000000Z"),
        (
            datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=timezone(timedelta(hours=2))),
            "2026-01-02T01:04:05.000007Z",
        ),
        (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000000Z"),
        (datetime(5, 1, 2, tzinfo=timezone.utc), "0005-01-02T00:00:00.000000Z"),
    ],
)
def test_observed_at_is_rfc3339_utc_with_fraction(observed: datetime | float, text: str) -> None:
    """Any zone becomes UTC with C{Z}; the fraction is always written; years are padded."""
    assert format_observed_at(observed) == text


def test_payload_is_ascii_whatever_the_input() -> None:
    """Non-ASCII and lone surrogates are escaped, so building a payload cannot fail."""
    payload = intent_payload("sb-é", 0.0, 1, "/caf\udce9")
    assert payload.isascii()
    assert json.loads(payload)["request_uri"] == "/caf\udce9"


@given(
    sandbox_id=st.text(min_size=1),
    observed=st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)
    ),
    port=st.integers(0, 65535),
    uri=st.text(),
)
def test_payload_round_trips(sandbox_id: str, observed: datetime, port: int, uri: str) -> None:
    """Decoding a payload gives back every field (timestamp to the microsecond)."""
    doc = json.loads(intent_payload(sandbox_id, observed, port, uri))
    assert doc.pop("sandbox_id") == sandbox_id
    stamp = doc.pop("observed_at")
    assert RFC3339_UTC_FRACTION.fullmatch(stamp)
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")) == observed
    assert doc.pop("port", 0) == port
    assert doc.pop("request_uri", "") == uri
    assert doc == {}


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://u:p%40ss@h:1/2", "redis://u:***@h:1/2"),
        ("rediss://:secret@h/0", "rediss://:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h/0?password=secret&db=1", "redis://h/0?password=***&db=1"),
    ],
)
def test_mask_dsn_hides_passwords(dsn: str, masked: str) -> None:
    """Passwords in user info or query are replaced by C{***}; the rest stays readable."""
    assert mask_dsn(dsn) == masked


# --- throttle ------------------------------------------------------------------


def test_throttle_admits_one_per_interval() -> None:
    """N offers within the interval admit one; after the interval, another."""
    clock = Clock()
    throttle = RenewThrottle(60, clock)
    assert [throttle.admit("a") for _ in range(5)] == [True, False, False, False, False]
    assert throttle.admit("b")
    clock.advance(59.9)
    assert not throttle.admit("a")
    clock.advance(0.1)
    assert throttle.admit("a")
    assert not throttle.admit("a")


def test_throttle_accepts_a_callable_clock() -> None:
    """C{now} may be a plain callable instead of an C{IReactorTime}."""
    now = [100.0]
    throttle = RenewThrottle(10, lambda: now[0])
    assert throttle.admit("a") and not throttle.admit("a")
    now[0] = 110.0
    assert throttle.admit("a")


def test_throttle_state_stays_bounded() -> None:
    """State holds about the sandboxes of the last interval, not every one ever seen."""
    clock = Clock()
    throttle = RenewThrottle(10, clock)
    per_second = 100
    for second in range(300):
        for i in range(per_second):
            throttle.admit(f"sb-{second}-{i}")
        clock.advance(1)
        # At most one interval of live entries plus what eviction lags behind.
        assert len(throttle) <= per_second * 11
    assert len(throttle) <= per_second * 11


def test_throttle_forgets_on_request() -> None:
    """After L{RenewThrottle.forget}, the next offer for that sandbox is admitted."""
    throttle = RenewThrottle(60, Clock())
    assert throttle.admit("a")
    throttle.forget("a")
    throttle.forget("never-seen")
    assert throttle.admit("a")


def test_throttle_forget_keeps_a_later_admission() -> None:
    """Forgetting a given admission leaves a newer one (whose intent may be in flight) charged."""
    clock = Clock()
    throttle = RenewThrottle(10, clock)
    assert throttle.admit("a")
    first = throttle.admitted_at("a")
    assert first == 0.0
    clock.advance(10)
    assert throttle.admit("a")
    throttle.forget("a", first)
    assert not throttle.admit("a")
    throttle.forget("a", throttle.admitted_at("a"))
    assert throttle.admit("a")
    assert throttle.admitted_at("never-seen") is None


def test_throttle_admits_when_the_clock_goes_back() -> None:
    """A wall clock set back does not silence a sandbox for the size of the jump."""
    now = [1000.0]
    throttle = RenewThrottle(60, lambda: now[0])
    assert throttle.admit("a")
    now[0] = 500.0
    assert throttle.admit("a")
    assert not throttle.admit("a")


def test_throttle_zero_interval_admits_everything() -> None:
    """An interval of 0 turns the throttle off and keeps no state."""
    throttle = RenewThrottle(0, Clock())
    assert all(throttle.admit("a") for _ in range(10))
    assert len(throttle) == 0


# --- publisher -----------------------------------------------------------------


def config_for(dsn: str, **kwargs: Any) -> RenewIntentConfig:
    """An enabled configuration publishing to C{dsn}."""
    kwargs.setdefault("queue_key", KEY)
    return RenewIntentConfig(enabled=True, redis_dsn=dsn, **kwargs)


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Let the reactor run until C{predicate()} holds, or fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


@asynccontextmanager
async def running(publisher: RenewIntentPublisher) -> AsyncIterator[RenewIntentPublisher]:
    """Run C{publisher} for the body; stop it (and wait for its thread) afterwards."""
    publisher.startService()
    try:
        yield publisher
    finally:
        await publisher.stopService()


def fast_retries(publisher: RenewIntentPublisher) -> RenewIntentPublisher:
    """Make the publisher retry a failing Redis within a fraction of a second."""
    publisher.retry_initial_s = 0.05
    publisher.retry_max_s = 0.2
    return publisher


def captured_logs() -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """Collect every log event; the second value stops collecting."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    return events, lambda: globalLogPublisher.removeObserver(observer)


def published(publisher: RenewIntentPublisher, count: int) -> Callable[[], bool]:
    """A predicate: C{publisher} has published C{count} intents."""
    return lambda: publisher.stats.published == count


def listed(server: RedisServer, key: str = KEY) -> list[dict[str, Any]]:
    """The intents in the list, newest first, decoded."""
    client = server.client()
    try:
        return [json.loads(item) for item in client.lrange(key, 0, -1)]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_disabled_publisher_does_nothing() -> None:
    """Disabled: offer is a no-op, no thread starts, stop is immediate."""
    publisher = RenewIntentPublisher(reactor, RenewIntentConfig(enabled=False))
    async with running(publisher):
        publisher.offer("sb", 80, "/")
        assert publisher.stats.offered == 0
        assert publisher.queued == 0
        assert not any(t.name == "renew-intent-publisher" for t in threading.enumerate())


def test_unusable_dsn_is_a_config_error_without_the_secret() -> None:
    """A DSN redis-py rejects raises L{ConfigError} naming the flag, not the password."""
    dsn = "redis://u:hunter2@h/0?socket_timeout=abc"
    with pytest.raises(ConfigError) as caught:
        RenewIntentPublisher(reactor, config_for(dsn))
    assert caught.value.flag == "renew-intent-redis-dsn"
    assert "hunter2" not in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_intents_land_newest_first(redis_server: RedisServer) -> None:  # noqa: F811
    """Admitted intents are LPUSHed: LRANGE shows them newest first, throttled ones absent."""
    clock = Clock()
    publisher = RenewIntentPublisher(reactor, config_for(redis_server.url), clock=clock)
    before = time.time()
    async with running(publisher):
        publisher.offer("sb-1", 8080, "/api/users")
        await wait_for(lambda: publisher.stats.published == 1, "first intent")
        publisher.offer("sb-1", 8080, "/again")  # throttled
        publisher.offer("sb-2", 0, "")
        await wait_for(lambda: publisher.stats.published == 2, "second intent")
        clock.advance(60)
        publisher.offer("sb-1", 9000, "")
        await wait_for(lambda: publisher.stats.published == 3, "third intent")
    after = time.time()
    intents = listed(redis_server)
    assert [(i["sandbox_id"], i.get("port"), i.get("request_uri")) for i in intents] == [
        ("sb-1", 9000, None),
        ("sb-2", None, None),
        ("sb-1", 8080, "/api/users"),
    ]
    for intent in intents:
        stamp = datetime.fromisoformat(intent["observed_at"].replace("Z", "+00:00")).timestamp()
        assert before - 1 <= stamp <= after + 1
    assert publisher.stats.as_dict() == {
        "offered": 4,
        "throttled": 1,
        "dropped_overflow": 0,
        "published": 3,
        "failed": 0,
    }


@pytest_twisted.ensureDeferred
async def test_ltrim_caps_the_list(redis_server: RedisServer) -> None:  # noqa: F811
    """With C{queue_max_len}, the list keeps only the newest intents."""
    publisher = RenewIntentPublisher(
        reactor, config_for(redis_server.url, queue_max_len=3, min_interval_s=0)
    )
    async with running(publisher):
        for i in range(10):
            publisher.offer(f"sb-{i}", 80, "")
            # One at a time, so that the cap also holds across batches.
            await wait_for(published(publisher, i + 1), f"intent {i}")
        for i in range(10, 20):
            publisher.offer(f"sb-{i}", 80, "")
        await wait_for(lambda: publisher.stats.published == 20, "the burst")
    assert [i["sandbox_id"] for i in listed(redis_server)] == ["sb-19", "sb-18", "sb-17"]


@pytest_twisted.ensureDeferred
async def test_full_queue_drops_and_counts(redis_server: RedisServer) -> None:  # noqa: F811
    """While the thread is stuck on Redis, offers beyond C{queue_size} are dropped and counted."""
    publisher = RenewIntentPublisher(reactor, config_for(redis_server.url), queue_size=5)
    admin = redis_server.client()
    try:
        async with running(publisher):
            publisher.offer("warm", 80, "")  # open the connection before pausing
            await wait_for(lambda: publisher.stats.published == 1, "warm-up intent")
            admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            publisher.offer("stuck", 80, "")
            # The thread took it and now waits for Redis to answer LPUSH.
            await wait_for(lambda: publisher.queued == 0, "the thread to take the intent")
            for i in range(20):
                publisher.offer(f"sb-{i}", 80, "")
            assert publisher.queued == 5
            assert publisher.stats.dropped_overflow == 15
            # A dropped sandbox is not throttled: its next offer is queued
            # (once there is room).
            assert publisher.throttle.admit("sb-19")
            admin.execute_command("CLIENT", "UNPAUSE")
            await wait_for(lambda: publisher.stats.published == 7, "the queue to drain")
        assert len(listed(redis_server)) == 7
        assert publisher.stats.failed == 0
    finally:
        admin.close()


@pytest_twisted.ensureDeferred
async def test_redis_down_then_back(redis_server: RedisServer) -> None:  # noqa: F811
    """
    Redis stopped: offers stay fast, the queue stays bounded, losses are
    counted and logged a few times, not per intent; restarted on the same
    port: intents flow again by themselves.
    """
    publisher = fast_retries(
        RenewIntentPublisher(reactor, config_for(redis_server.url), queue_size=100)
    )
    events, stop_capture = captured_logs()
    try:
        async with running(publisher):
            publisher.offer("before", 80, "")
            await wait_for(lambda: publisher.stats.published == 1, "intent before the outage")
            redis_server.stop()

            started = time.perf_counter()
            for i in range(1000):
                publisher.offer(f"down-{i}", 80, "/x")
            elapsed = time.perf_counter() - started
            assert elapsed < 0.5, f"1000 offers took {elapsed:.3f}s"
            assert publisher.queued <= 100
            assert publisher.stats.dropped_overflow >= 1000 - 100 - renew.MAX_BATCH

            await wait_for(lambda: publisher.stats.failed > 0, "a failed attempt")
            # Keep offering while Redis is down: still bounded, still fast.
            for i in range(1000, 2000):
                publisher.offer(f"down-{i}", 80, "/x")
            assert publisher.queued <= 100

            redis_server.start()
            # Intents flow again by themselves: keep offering (as live
            # traffic would) until one lands.
            deadline = time.monotonic() + 10
            landed: list[dict[str, Any]] = []
            attempt = 0
            while not landed:
                assert time.monotonic() < deadline, "no intent landed after the restart"
                attempt += 1
                publisher.offer(f"after-{attempt}", 80, "")
                await deferLater(reactor, 0.02, lambda: None)
                landed = [i for i in listed(redis_server) if i["sandbox_id"].startswith("after-")]
        stats = publisher.stats
        assert stats.offered > 2001
        assert (
            stats.published + stats.failed + stats.dropped_overflow + publisher.queued
            == stats.offered - stats.throttled
        )
    finally:
        stop_capture()
    warnings = [formatEvent(e) for e in events if "cannot publish renew intents" in formatEvent(e)]
    assert 1 <= len(warnings) <= 3, warnings
    assert any("again" in formatEvent(e) for e in events)


def throttled_until_released(publisher: RenewIntentPublisher, sandbox_id: str) -> Callable[[], bool]:
    """A predicate: the throttle no longer holds C{sandbox_id} (its intent was released)."""
    return lambda: publisher.throttle.admitted_at(sandbox_id) is None


@pytest_twisted.ensureDeferred
async def test_failed_batch_releases_the_throttle() -> None:
    """
    An intent lost to a Redis failure no longer charges its sandbox: with
    the throttle's clock frozen inside the interval, the next offer is
    admitted and queued again (as after a full queue).
    """
    clock = Clock()
    publisher = RenewIntentPublisher(
        reactor, config_for(f"redis://127.0.0.1:{free_port()}/0", min_interval_s=60), clock=clock
    )
    publisher.retry_initial_s = 30.0  # one attempt, then a long backoff: the retry stays queued
    async with running(publisher):
        publisher.offer("sb", 80, "")
        publisher.offer("sb", 80, "")  # throttled: the first is in flight
        await wait_for(lambda: publisher.stats.failed == 1, "the refused attempt")
        await wait_for(throttled_until_released(publisher, "sb"), "the release")
        publisher.offer("sb", 80, "")
        assert publisher.stats.throttled == 1
        assert publisher.queued == 1
        publisher.offer("sb", 80, "")  # the queued one charges the throttle again
        assert publisher.stats.throttled == 2


@pytest_twisted.ensureDeferred
async def test_every_sandbox_busy_during_an_outage_is_renewed_after_it(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """
    Redis stopped while ten sandboxes have traffic, then restarted: each of
    them gets an intent within seconds, although the throttle's clock never
    leaves the interval in which their lost intents were admitted.
    """
    clock = Clock()
    publisher = fast_retries(
        RenewIntentPublisher(reactor, config_for(redis_server.url, min_interval_s=60), clock=clock)
    )
    names = [f"busy-{i}" for i in range(10)]
    async with running(publisher):
        publisher.offer("warm", 80, "")
        await wait_for(published(publisher, 1), "the intent before the outage")
        redis_server.stop()
        for name in names:
            publisher.offer(name, 80, "")
        await wait_for(lambda: publisher.stats.failed >= len(names), "the lost intents")
        redis_server.start()
        restarted = time.monotonic()

        def all_listed() -> bool:
            # Live traffic keeps offering; only a released throttle lets it through.
            for name in names:
                publisher.offer(name, 80, "")
            return {i["sandbox_id"] for i in listed(redis_server)} >= set(names)

        await wait_for(all_listed, "an intent for every busy sandbox", timeout=10)
    assert time.monotonic() - restarted < 5.0
    # One intent each since the restart: the throttle still holds after delivery.
    assert sorted(i["sandbox_id"] for i in listed(redis_server)) == sorted(names)


@pytest_twisted.ensureDeferred
async def test_stale_connection_after_restart_loses_nothing(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A Redis restart between two intents is absorbed: the next one is published, none fail."""
    publisher = RenewIntentPublisher(reactor, config_for(redis_server.url))
    async with running(publisher):
        publisher.offer("one", 80, "")
        await wait_for(lambda: publisher.stats.published == 1, "first intent")
        redis_server.restart()
        publisher.offer("two", 80, "")
        await wait_for(
            lambda: publisher.stats.published + publisher.stats.failed == 2, "second attempt"
        )
    assert publisher.stats.failed == 0
    assert [i["sandbox_id"] for i in listed(redis_server)] == ["two"]


@pytest_twisted.ensureDeferred
async def test_acl_user_and_password(
    redis_server_factory: Callable[..., RedisServer],  # noqa: F811
) -> None:
    """A DSN with an ACL user and password publishes; a wrong password fails, is counted, never logged."""
    server = redis_server_factory(
        acl_users=["renewer on >s3cret-pw resetchannels ~opensandbox:* +@list +@connection"]
    )
    good = RenewIntentPublisher(
        reactor, config_for(server.dsn(user="renewer", password="s3cret-pw"))
    )
    bad = RenewIntentPublisher(
        reactor, config_for(server.dsn(user="renewer", password="wr0ng-pa55"))
    )
    events, stop_capture = captured_logs()
    try:
        async with running(good), running(bad):
            good.offer("sb-acl", 8080, "")
            bad.offer("sb-denied", 8080, "")
            await wait_for(lambda: good.stats.published == 1, "the intent with good credentials")
            await wait_for(lambda: bad.stats.failed == 1, "the failure with bad credentials")
            await wait_for(
                lambda: any("cannot publish" in formatEvent(e) for e in events), "the warning"
            )
    finally:
        stop_capture()
    assert [i["sandbox_id"] for i in listed(server)] == ["sb-acl"]
    assert bad.stats.published == 0
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "s3cret-pw" not in text and "wr0ng-pa55" not in text
    assert "renewer:***@" in text
    assert "AuthenticationError" in text


@pytest_twisted.ensureDeferred
async def test_stop_is_prompt_when_redis_is_down() -> None:
    """With Redis refusing connections and the thread backing off, stop takes well under a second."""
    publisher = RenewIntentPublisher(reactor, config_for(f"redis://127.0.0.1:{free_port()}/0"))
    publisher.retry_initial_s = 30.0  # the thread sits in a long backoff
    publisher.startService()
    publisher.offer("sb", 80, "")
    await wait_for(lambda: publisher.stats.failed == 1, "the refused attempt")
    publisher.offer("sb-2", 80, "")  # stays queued: Redis is failing
    thread = publisher._thread
    assert thread is not None
    started = time.monotonic()
    await publisher.stopService()
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()


@pytest_twisted.ensureDeferred
async def test_stop_is_bounded_when_redis_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that accepts but never answers cannot hold stopService beyond its bound."""
    monkeypatch.setattr(renew, "REDIS_SOCKET_TIMEOUT_S", 1.0)
    monkeypatch.setattr(renew, "STOP_TIMEOUT_S", 0.2)
    # The kernel completes the handshake (backlog); nobody ever reads.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        publisher = RenewIntentPublisher(reactor, config_for(f"redis://127.0.0.1:{port}/0"))
        publisher.startService()
        publisher.offer("sb", 80, "")
        await wait_for(lambda: publisher.queued == 0, "the thread to take the intent")
        thread = publisher._thread
        assert thread is not None
        started = time.monotonic()
        await publisher.stopService()
        assert time.monotonic() - started < 0.9
        # The thread still ends by itself once its socket times out.
        await wait_for(lambda: not thread.is_alive(), "the thread to time out", timeout=5)
        assert publisher.stats.failed == 1
    finally:
        silent.close()


@pytest_twisted.ensureDeferred
async def test_offers_before_start_are_sent_on_start(redis_server: RedisServer) -> None:  # noqa: F811
    """Intents offered before the service starts wait (bounded) and go out once it runs."""
    publisher = RenewIntentPublisher(reactor, config_for(redis_server.url))
    publisher.offer("early", 80, "")
    assert publisher.queued == 1
    async with running(publisher):
        await wait_for(lambda: publisher.stats.published == 1, "the early intent")
    # And the service can be started again after a stop.
    async with running(publisher):
        publisher.offer("later", 80, "")
        await wait_for(lambda: publisher.stats.published == 2, "an intent after restart")
    assert [i["sandbox_id"] for i in listed(redis_server)] == ["later", "early"]


def test_offer_never_raises() -> None:
    """Whatever goes wrong inside, offer returns normally."""

    class BrokenClock:
        def seconds(self) -> float:
            raise RuntimeError("boom")

    publisher = RenewIntentPublisher(
        reactor, config_for("redis://127.0.0.1:1/0"), clock=BrokenClock()
    )
    events, stop_capture = captured_logs()
    try:
        publisher.offer("sb", 80, "")
    finally:
        stop_capture()
    assert any(e.get("log_failure") is not None for e in events)
