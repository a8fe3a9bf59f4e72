"""Merging the workers' metrics (pure) and the single-process exposition's extras."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from opensandbox_ingress.metrics import IngressMetrics, merge_expositions


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def worker(requests: int, synced: bool, ready: int) -> bytes:
    metrics = IngressMetrics("header")
    for _ in range(requests):
        metrics.observe_request("http", 200, 0.003)
    metrics.add_gauge("opensandbox_ingress_registry_synced", "synced", lambda: int(synced))
    metrics.add_gauge(
        "opensandbox_ingress_sandboxes", "sandboxes", lambda: ("state", {"ready": ready})
    )
    metrics.add_gauge("opensandbox_ingress_active_requests", "in flight", lambda: 2)
    return metrics.exposition()


def test_merge_sums_counters_histograms_and_in_flight_gauges() -> None:
    """Requests and durations add up; in-flight gauges add up; the text round-trips."""
    merged = samples(merge_expositions([worker(3, True, 5), worker(4, True, 5)]))
    labels = (("kind", "http"), ("mode", "header"), ("status_class", "2xx"))
    assert merged[("opensandbox_ingress_requests_total", labels)] == 7
    assert merged[("opensandbox_ingress_request_duration_seconds_count", (("kind", "http"),))] == 7
    bucket = (("kind", "http"), ("le", "0.005"))
    assert merged[("opensandbox_ingress_request_duration_seconds_bucket", bucket)] == 7
    assert merged[("opensandbox_ingress_active_requests", ())] == 4


def test_merge_takes_min_of_synced_and_max_of_shared_state() -> None:
    """Synced only when every worker is; sandboxes known by the best-informed worker, not summed."""
    merged = samples(merge_expositions([worker(0, True, 5), worker(0, False, 4)]))
    assert merged[("opensandbox_ingress_registry_synced", ())] == 0
    assert merged[("opensandbox_ingress_sandboxes", (("state", "ready"),))] == 5
    (build,) = [k for k in merged if k[0] == "opensandbox_ingress_build_info"]
    assert merged[build] == 1


def test_single_process_exposition_has_process_and_build_info_but_no_created() -> None:
    """process_* and build_info are exported; *_created series are not."""
    text = worker(1, True, 1)
    found = samples(text)
    assert ("process_cpu_seconds_total", ()) in found
    assert ("process_resident_memory_bytes", ()) in found
    assert any(name == "opensandbox_ingress_build_info" for name, _ in found)
    assert b"_created" not in text
