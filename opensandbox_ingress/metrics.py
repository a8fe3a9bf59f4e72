"""
Prometheus metrics of one ingress.

Each ingress owns a private C{CollectorRegistry} (no global state, so two
ingresses in one process keep separate numbers).  Labels never carry a
sandbox id: a fleet of thousands of ephemeral sandboxes would make the
series count unbounded.

The per-request counter and histogram are plain numbers exposed by
L{_RequestCollector} (a C{prometheus_client} child costs about ten
Python calls and three lock round trips per request, a few percent of a
small GET); the rarer counters are plain C{prometheus_client} metrics;
gauges that describe state owned elsewhere
(registry size, active connections, watch and renew statistics) are read
at scrape time by L{_StateCollector}, so the hot path pays nothing for
them.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import buildinfo

# `*_created` series (one per counter and histogram child) double the
# series count and mean nothing summed over workers; prometheus_client
# can only turn them off process-wide.
disable_created_metrics()

#: Request duration buckets, seconds: sub-millisecond proxying up to long polls.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class IngressMetrics:
    """
    The metrics of one ingress and their exposition.

    Ownership: reactor thread (prometheus_client's metrics are thread-safe,
    but every update here happens on the reactor).
    """

    def __init__(self, mode: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._mode = mode
        #: Requests and their durations: counted in plain numbers by
        #: L{observe_request}, exposed by this collector at scrape time.
        self._requests = _RequestCollector(mode)
        self.registry.register(self._requests)
        self.upstream_errors = Counter(
            "opensandbox_ingress_upstream_errors",
            "Upstream failures by reason: connect, timeout, reset, invalid.",
            ["reason"],
            registry=self.registry,
        )
        self.client_errors = Counter(
            "opensandbox_ingress_client_errors",
            "Requests the client failed, by reason: timeout (an upload stalled).",
            ["reason"],
            registry=self.registry,
        )
        # Pre-create the label sets so the series exist (at 0) from the start.
        for reason in ("connect", "timeout", "reset", "invalid"):
            self.upstream_errors.labels(reason)
        self.client_errors.labels("timeout")
        self._state = _StateCollector()
        self.registry.register(self._state)
        # process_cpu_seconds_total, process_resident_memory_bytes, ... of
        # this process (Linux /proc; nothing elsewhere).
        ProcessCollector(registry=self.registry)
        self.registry.register(_BuildInfoCollector())
        #: With --workers: returns the whole process tree's exposition
        #: (set by the worker; see L{opensandbox_ingress.workers}).
        self.tree_exposition: Callable[[], Any] | None = None

    def observe_request(self, kind: str, status: int, duration_s: float) -> None:
        """Count one finished request or WebSocket session."""
        self._requests.observe(kind, status, duration_s)

    def upstream_error(self, reason: str) -> None:
        """Count an upstream failure (C{connect}, C{timeout} or C{reset})."""
        self.upstream_errors.labels(reason).inc()

    def client_error(self, reason: str) -> None:
        """Count a request the client failed (C{timeout}: its upload stalled)."""
        self.client_errors.labels(reason).inc()

    def add_gauge(self, name: str, documentation: str, read: Callable[[], Any]) -> None:
        """
        Export C{read()} at each scrape: a number, or a mapping from one
        label value (under the label C{state}/C{type}/C{reason}, given as
        C{(label, {value: number})}) to numbers.
        """
        self._state.gauges.append((name, documentation, read, False))

    def add_counter(self, name: str, documentation: str, read: Callable[[], Any]) -> None:
        """Like L{add_gauge}, for monotonically increasing values."""
        self._state.gauges.append((name, documentation, read, True))

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """
    C{opensandbox_ingress_requests_total} and
    C{opensandbox_ingress_request_duration_seconds}, counted in plain
    numbers on the reactor thread and turned into metric families only
    when scraped.
    """

    def __init__(self, mode: str) -> None:
        self._mode = mode
        #: (kind, status // 100) -> [count, status class label]
        self._counts: dict[tuple[str, int], list[Any]] = {}
        #: kind -> per-bucket counts (not cumulative; the last one is
        #: +Inf) followed by the sum of durations.
        self._durations: dict[str, list[float]] = {}

    def observe(self, kind: str, status: int, duration_s: float) -> None:
        """Count one request of C{kind} that ended with C{status}."""
        key = (kind, status // 100)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = [0, _STATUS_CLASS.get(status // 100, "other")]
        count[0] += 1
        buckets = self._durations.get(kind)
        if buckets is None:
            buckets = self._durations[kind] = [0.0] * (len(DURATION_BUCKETS) + 2)
        # Bucket i holds durations <= DURATION_BUCKETS[i] (and above the
        # one before): bisect_left finds it; past the last bound is +Inf.
        buckets[bisect_left(DURATION_BUCKETS, duration_s)] += 1
        buckets[-1] += duration_s

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "opensandbox_ingress_requests",
            "Requests handled, by routing mode, kind (http, ws) and status class.",
            labels=["mode", "kind", "status_class"],
        )
        for (kind, _), (count, status_class) in self._counts.items():
            requests.add_metric([self._mode, kind, status_class], count)
        yield requests
        durations = HistogramMetricFamily(
            "opensandbox_ingress_request_duration_seconds",
            "Time from request head to response end (HTTP) or session end (ws).",
            labels=["kind"],
        )
        for kind, buckets in self._durations.items():
            cumulative = []
            total = 0.0
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), buckets):
                total += n
                cumulative.append((floatToGoString(bound), total))
            durations.add_metric([kind], cumulative, buckets[-1])
        yield durations

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class _StateCollector(Collector):
    """Reads state owned by other objects at scrape time."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], Any], bool]] = []

    def collect(self) -> Iterator[Metric]:
        for name, documentation, read, is_counter in self.gauges:
            value = read()
            family: Any
            if isinstance(value, tuple):
                label, values = value
                family = (
                    CounterMetricFamily(name, documentation, labels=[label])
                    if is_counter
                    else GaugeMetricFamily(name, documentation, labels=[label])
                )
                for label_value, number in sorted(values.items()):
                    family.add_metric([str(label_value)], float(number))
            else:
                family = (
                    CounterMetricFamily(name, documentation, value=float(value))
                    if is_counter
                    else GaugeMetricFamily(name, documentation, value=float(value))
                )
            yield family

    def describe(self) -> Iterator[Metric]:
        # Describing would call every reader at registration time; nothing
        # here needs collision checks beyond unique names.
        return iter(())


class _BuildInfoCollector(Collector):
    """C{opensandbox_ingress_build_info{version,commit,python} 1}."""

    def collect(self) -> Iterator[Metric]:
        info = buildinfo.current()
        family = GaugeMetricFamily(
            "opensandbox_ingress_build_info",
            "Build metadata of the running ingress; always 1.",
            labels=["version", "commit", "python"],
        )
        family.add_metric([info.version, info.git_commit, platform.python_version()], 1.0)
        yield family


#: How L{merge_expositions} combines one series over processes, by family
#: name; everything else is summed (counters, histograms, in-flight gauges,
#: CPU seconds, memory, descriptors).
_MERGE_MIN = frozenset({"opensandbox_ingress_registry_synced", "process_start_time_seconds"})
_MERGE_MAX = frozenset(
    {
        # Every worker holds the same sandboxes: the tree knows as many as
        # the best-informed worker, not N times as many.
        "opensandbox_ingress_sandboxes",
        "opensandbox_ingress_build_info",
        "process_max_fds",
    }
)


def merge_expositions(texts: Iterable[bytes]) -> bytes:
    """
    One Prometheus text exposition for several processes (the workers and
    their supervisor): each series summed over the processes that report
    it, except a few taken as the minimum (C{registry_synced}: 1 only when
    every worker is synced; C{process_start_time_seconds}) or maximum
    (sandboxes known, C{build_info}, C{process_max_fds}).
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = (
                min if family.name in _MERGE_MIN else max if family.name in _MERGE_MAX else None
            )
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = series.get(key)
                if old is None:
                    series[key] = sample.value
                elif combine is None:
                    series[key] = old + sample.value
                else:
                    series[key] = combine(old, sample.value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families, values))
    return generate_latest(registry)


class _Fixed(Collector):
    """Yields already computed families (for L{merge_expositions})."""

    def __init__(
        self,
        families: dict[str, Metric],
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]],
    ) -> None:
        self._families = families
        self._values = values

    def collect(self) -> Iterator[Metric]:
        for name, family in self._families.items():
            for (sample_name, labels), value in self._values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
