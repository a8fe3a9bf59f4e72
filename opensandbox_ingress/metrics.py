"""
Prometheus metrics of one ingress.

Each ingress owns a private C{CollectorRegistry} (no global state, so two
ingresses in one process keep separate numbers).  Labels never carry a
sandbox id: a fleet of thousands of ephemeral sandboxes would make the
series count unbounded.

Counters that the proxy updates per request are plain
C{prometheus_client} metrics; gauges that describe state owned elsewhere
(registry size, active connections, watch and renew statistics) are read
at scrape time by L{_StateCollector}, so the hot path pays nothing for
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self.requests = Counter(
            "opensandbox_ingress_requests",
            "Requests handled, by routing mode, kind (http, ws) and status class.",
            ["mode", "kind", "status_class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "opensandbox_ingress_request_duration_seconds",
            "Time from request head to response end (HTTP) or session end (ws).",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "opensandbox_ingress_upstream_errors",
            "Upstream failures by reason: connect, timeout, reset, invalid.",
            ["reason"],
            registry=self.registry,
        )
        # Pre-create the label sets so the series exist (at 0) from the start.
        for reason in ("connect", "timeout", "reset", "invalid"):
            self.upstream_errors.labels(reason)
        self._state = _StateCollector()
        self.registry.register(self._state)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, kind: str, status: int, duration_s: float) -> None:
        """Count one finished request or WebSocket session."""
        # labels() takes a lock and builds a key per call: cache the children.
        children = self._children.get((kind, status // 100))
        if children is None:
            children = self._children[(kind, status // 100)] = (
                self.requests.labels(self._mode, kind, _STATUS_CLASS.get(status // 100, "other")),
                self.duration.labels(kind),
            )
        children[0].inc()
        children[1].observe(duration_s)

    def upstream_error(self, reason: str) -> None:
        """Count an upstream failure (C{connect}, C{timeout} or C{reset})."""
        self.upstream_errors.labels(reason).inc()

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
