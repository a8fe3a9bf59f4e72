"""
C{--renew-intent-shared-throttle}: two ingress processes (one of them with
two workers) and a real redis-server publish one intent per sandbox per
interval between them; without the flag each process publishes its own.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest_redis import redis_server_factory  # noqa: F401
from tests.processes import free_port, http_get, poll, start_stream_backend, stop, twistd
from tests.redis_server import RedisServer

KEY = "opensandbox:renew:shared"
SANDBOXES = ("sbx", "other")
REQUESTS = 6  # per sandbox and process


def renew_outcomes(admin: int) -> dict[str, float]:
    """The ingress's (whole tree's) renew-intent counters by outcome."""
    status, body = http_get(admin, "/metrics")
    assert status == 200
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "opensandbox_ingress_renew_intents_total"
    }


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-process"])
def test_two_ingresses_publish_one_intent_per_sandbox_per_interval(
    tmp_path: Path, shared: bool, redis_server_factory: Callable[..., RedisServer]  # noqa: F811
) -> None:
    """Shared: one intent per sandbox across both processes; per process: one each."""
    server = redis_server_factory()
    backend, backend_port = start_stream_backend()
    sandboxes = tmp_path / "sandboxes.json"
    sandboxes.write_text(json.dumps([{"name": n, "endpoint": "127.0.0.1"} for n in SANDBOXES]))
    ingresses: list[tuple[subprocess.Popen[bytes], int, int]] = []
    try:
        for workers in ("2", "1"):
            port, admin = free_port(), free_port()
            args = [
                "--provider-type", "file", "--sandboxes-file", str(sandboxes),
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
                "--workers", workers,
                "--renew-intent-enabled", f"--renew-intent-redis-dsn={server.url}",
                f"--renew-intent-queue-key={KEY}", "--renew-intent-min-interval=60",
            ]
            if shared:
                args.append("--renew-intent-shared-throttle")
            ingresses.append((twistd(args), port, admin))
        for proc, port, _ in ingresses:
            def ready(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                assert proc.poll() is None, proc.communicate()
                try:
                    return http_get(port, "/status.ok")[0] == 200
                except OSError:
                    return False

            poll(ready, 30, "ingress ready")

        for _ in range(REQUESTS):
            for _, port, _ in ingresses:
                for name in SANDBOXES:
                    status, _ = http_get(
                        port, "/download?size=2", {"OpenSandbox-Ingress-To": f"{name}-{backend_port}"}
                    )
                    assert status == 200

        # Every offer is settled (published or throttled) in every process,
        # so nothing more is on its way to Redis.
        offers = REQUESTS * len(SANDBOXES)
        for _, _, admin in ingresses:
            poll(
                lambda admin=admin: (  # type: ignore[misc]
                    (o := renew_outcomes(admin)).get("published", 0) + o.get("throttled", 0)
                    == offers
                ),
                15,
                "every offer settled",
            )
        client = server.client()
        try:
            intents = [json.loads(item) for item in client.lrange(KEY, 0, -1)]
        finally:
            client.close()
        per_sandbox = {name: sum(1 for i in intents if i["sandbox_id"] == name) for name in SANDBOXES}
        published = sum(renew_outcomes(admin)["published"] for _, _, admin in ingresses)
        assert published == len(intents)
        if shared:
            assert per_sandbox == {name: 1 for name in SANDBOXES}, intents
        else:
            # Three processes (two workers and a single one), each its own
            # throttle: at least one intent per process that saw the sandbox.
            assert all(count >= 2 for count in per_sandbox.values()), intents
    finally:
        for proc, _, _ in ingresses:
            stop(proc)
        stop(backend)
