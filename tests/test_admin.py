"""The admin listener: Prometheus metrics and the read-only routing view."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from opensandbox_ingress import IngressService
from tests.backend import Backend
from tests.helpers import ingress_url, request, start_ingress

SANDBOXES: list[dict[str, Any]] = [
    {"name": "sbx", "endpoint": "127.0.0.1"},
    {"name": "starting", "endpoint": "127.0.0.1", "ready": False},
    {"name": "private", "endpoint": "127.0.0.1", "secure_access_token": "tok-secret"},
]


@pytest_twisted.async_yield_fixture
async def ingress(tmp_path: Path) -> AsyncIterator[IngressService]:
    service = await start_ingress(
        tmp_path, SANDBOXES, admin_listen=("tcp:0:interface=127.0.0.1",)
    )
    assert service.admin_listeners is not None
    await service.admin_listeners.when_listening()
    yield service
    await service.stopService()


def admin_url(service: IngressService, path: str) -> str:
    assert service.admin_listeners is not None
    return f"http://127.0.0.1:{service.admin_listeners.ports[0].getHost().port}{path}"


async def scrape(service: IngressService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response, body = await request("GET", admin_url(service, "/metrics"))
    assert response.code == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_metrics_change_as_traffic_flows(ingress: IngressService, backend: Backend) -> None:
    """Request counters, duration histogram, upstream errors and registry gauges move with traffic."""
    before = await scrape(ingress)
    ok = ("opensandbox_ingress_requests_total", (("kind", "http"), ("mode", "header"), ("status_class", "2xx")))
    missing = ("opensandbox_ingress_requests_total", (("kind", "http"), ("mode", "header"), ("status_class", "4xx")))
    connect = ("opensandbox_ingress_upstream_errors_total", (("reason", "connect"),))
    assert before[("opensandbox_ingress_sandboxes", (("state", "ready"),))] == 2
    assert before[("opensandbox_ingress_sandboxes", (("state", "not_ready"),))] == 1
    assert before[("opensandbox_ingress_registry_synced", ())] == 1
    for _ in range(3):
        await request("GET", ingress_url(ingress, "/echo"), headers={"OpenSandbox-Ingress-To": f"sbx-{backend.port_number}"})
    await request("GET", ingress_url(ingress, "/"), headers={"OpenSandbox-Ingress-To": "nope-80"})
    await request("GET", ingress_url(ingress, "/"), headers={"OpenSandbox-Ingress-To": "sbx-9"})
    after = await scrape(ingress)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[missing] - before.get(missing, 0) == 1
    assert after[connect] - before[connect] == 1
    count = ("opensandbox_ingress_request_duration_seconds_count", (("kind", "http"),))
    assert after[count] - before.get(count, 0) == 5
    # No per-sandbox labels anywhere.
    assert not any(dict(labels).get("sandbox") for _, labels in after)


@pytest_twisted.ensureDeferred
async def test_routing_view_lists_and_explains(ingress: IngressService) -> None:
    """/sandboxes lists records without tokens; /sandboxes/{id} explains the outcome."""
    response, body = await request("GET", admin_url(ingress, "/sandboxes"))
    assert response.code == 200
    listing = json.loads(body)
    assert listing["synced"] is True and listing["count"] == 3
    assert b"tok-secret" not in body
    private = next(s for s in listing["sandboxes"] if s["name"] == "private")
    assert private["secure_access"] is True
    _, body = await request("GET", admin_url(ingress, "/sandboxes/starting"))
    view = json.loads(body)
    assert view["outcome"] == "sandbox_not_ready" and view["status"] == 503
    assert "marked not ready" in view["reason"]
    _, body = await request("GET", admin_url(ingress, "/sandboxes/ghost"))
    view = json.loads(body)
    assert (view["outcome"], view["status"]) == ("sandbox_not_found", 404)
    assert view["names_tried"] == ["ghost"]


@pytest_twisted.ensureDeferred
async def test_admin_paths_do_not_exist_on_the_proxy_port(ingress: IngressService) -> None:
    """/metrics on the proxy port is just a route (400 here), not the metrics."""
    response, body = await request("GET", ingress_url(ingress, "/metrics"), headers={"Host": "localhost"})
    assert response.code == 400
    assert b"opensandbox_ingress_requests" not in body


@pytest_twisted.ensureDeferred
async def test_liveness_stays_200_while_readiness_drains(ingress: IngressService) -> None:
    """While draining, /status.ok turns 503 but /livez stays 200 (a draining pod is not dead)."""
    response, body = await request("GET", admin_url(ingress, "/livez"))
    assert (response.code, body) == (200, b"OK")
    ingress.core.draining = True
    try:
        response, _ = await request("GET", admin_url(ingress, "/status.ok"))
        assert response.code == 503
        response, body = await request("GET", admin_url(ingress, "/livez"))
        assert (response.code, body) == (200, b"OK")
    finally:
        ingress.core.draining = False
