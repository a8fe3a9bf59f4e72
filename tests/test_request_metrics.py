"""The per-request counter and duration histogram (metrics._RequestCollector)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from opensandbox_ingress.metrics import DURATION_BUCKETS, IngressMetrics


def samples(metrics: IngressMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_are_counted_by_kind_and_status_class() -> None:
    metrics = IngressMetrics("uri")
    for kind, status in [("http", 200), ("http", 204), ("http", 404), ("ws", 101), ("http", 700)]:
        metrics.observe_request(kind, status, 0.0)
    got = samples(metrics)

    def count(kind: str, status_class: str) -> float | None:
        key = (("kind", kind), ("mode", "uri"), ("status_class", status_class))
        return got.get(("opensandbox_ingress_requests_total", key))

    assert count("http", "2xx") == 2
    assert count("http", "4xx") == 1
    assert count("ws", "1xx") == 1
    assert count("http", "other") == 1
    assert count("http", "5xx") is None


def test_durations_fall_in_le_buckets_with_count_and_sum() -> None:
    metrics = IngressMetrics("header")
    # On a bound, just above it, and past the last bound.
    durations = [DURATION_BUCKETS[0], DURATION_BUCKETS[0] + 1e-9, 0.3, 61.0]
    for d in durations:
        metrics.observe_request("http", 200, d)
    got = samples(metrics)

    def bucket(le: str) -> float:
        key = (("kind", "http"), ("le", le))
        return got[("opensandbox_ingress_request_duration_seconds_bucket", key)]

    assert bucket("0.001") == 1
    assert bucket("0.0025") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("60.0") == 3
    assert bucket("+Inf") == 4
    kind = (("kind", "http"),)
    assert got[("opensandbox_ingress_request_duration_seconds_count", kind)] == 4
    total = got[("opensandbox_ingress_request_duration_seconds_sum", kind)]
    assert abs(total - sum(durations)) < 1e-9
    assert ("opensandbox_ingress_request_duration_seconds_count", (("kind", "ws"),)) not in got
