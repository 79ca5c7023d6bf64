"""Prometheus metrics: every name declared once, in one registry per `Metrics` object.

Each `Metrics` owns its own `CollectorRegistry` (never the process-global
one), so tests and benchmarks can build as many as they like. The pipeline
updates the attributes; `/metrics` serves `render()`. Metrics observe, they
never steer: nothing reads them back to decide anything, except the periodic
progress line (`snapshot()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer import __version__

__all__ = [
    "CONTENT_TYPE",
    "METRIC_NAMES",
    "Metrics",
    "MetricsSnapshot",
]


#: Prometheus text format 0.0.4: what every scraper understands
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_P: Final = "resend_consumer_"
# Counter names are given without `_total`: prometheus_client appends it.
EVENTS: Final = _P + "events"
SENDS: Final = _P + "sends"
SEND_LATENCY: Final = _P + "send_latency_seconds"
RETRIES: Final = _P + "retries"
IN_FLIGHT: Final = _P + "in_flight"
PAUSED_PARTITIONS: Final = _P + "paused_partitions"
LAG: Final = _P + "lag"
COMMITTED_OFFSET: Final = _P + "committed_offset"
RATELIMIT_WAIT: Final = _P + "ratelimit_wait_seconds"
RATELIMIT_RATE: Final = _P + "ratelimit_rate"
CIRCUIT_OPEN: Final = _P + "circuit_open"
DEAD_LETTERS: Final = _P + "dead_letters"
ASSIGNED_PARTITIONS: Final = _P + "assigned_partitions"
STALLED_PARTITIONS: Final = _P + "stalled_partitions"
BUILD_INFO: Final = _P + "build_info"
READY: Final = _P + "ready"
OLDEST_EVENT: Final = _P + "oldest_event_timestamp_seconds"
MAX_EVENT_AGE: Final = _P + "max_event_age_seconds"
BATCH_EMAILS: Final = _P + "batch_emails"

#: one row per partition with unfinished work: topic, partition, event time (epoch seconds)
OldestEvents = Callable[[], Iterable[tuple[str, int, float]]]

#: every family as exposed on /metrics (README's list and the tests use this)
METRIC_NAMES: Final = (
    BATCH_EMAILS,
    EVENTS + "_total",
    SENDS + "_total",
    SEND_LATENCY,
    RETRIES + "_total",
    IN_FLIGHT,
    PAUSED_PARTITIONS,
    ASSIGNED_PARTITIONS,
    STALLED_PARTITIONS,
    LAG,
    COMMITTED_OFFSET,
    RATELIMIT_WAIT,
    RATELIMIT_RATE,
    CIRCUIT_OPEN,
    DEAD_LETTERS + "_total",
    BUILD_INFO,
    READY,
    OLDEST_EVENT,
    MAX_EVENT_AGE,
)

# Resend answers in tens to hundreds of milliseconds; the tail reaches the
# 30 s total timeout.
_LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Limiter waits are zero when under the limit; the long tail is a 429 retry-after.
_WAIT_BUCKETS: Final = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Totals at one moment, for the progress line (rates come from two snapshots)."""

    events: float
    retries: float
    dead_letters: float
    in_flight: float
    lag: float
    paused_partitions: float


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            EVENTS, "Events by type and final outcome.", ["type", "outcome"], registry=r
        )
        self.sends = Counter(
            SENDS,
            "Send attempts to Resend by HTTP status ('transport' when no answer came).",
            ["status"],
            registry=r,
        )
        self.send_latency = Histogram(
            SEND_LATENCY,
            "Duration of one send attempt to Resend.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            BATCH_EMAILS,
            "Emails per batch request sent to /emails/batch.",
            buckets=(2, 5, 10, 25, 50, 75, 100),
            registry=r,
        )
        self.retries = Counter(RETRIES, "Retried send attempts by reason.", ["reason"], registry=r)
        self.in_flight = Gauge(IN_FLIGHT, "Sends in flight now.", registry=r)
        self.paused_partitions = Gauge(
            PAUSED_PARTITIONS, "Partitions paused for back-pressure or a condition.", registry=r
        )
        self.assigned_partitions = Gauge(
            ASSIGNED_PARTITIONS, "Partitions assigned to this member.", registry=r
        )
        self.stalled_partitions = Gauge(
            STALLED_PARTITIONS,
            "Partitions with work that finished nothing for STALL_TIMEOUT, unexplained.",
            registry=r,
        )
        self.lag = Gauge(
            LAG, "Records behind the partition's end offset.", ["topic", "partition"], registry=r
        )
        self.committed_offset = Gauge(
            COMMITTED_OFFSET,
            "Last committed offset (the next record to read).",
            ["topic", "partition"],
            registry=r,
        )
        self.ratelimit_wait = Histogram(
            RATELIMIT_WAIT,
            "Time a send waited for the shared rate limiter.",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.ratelimit_rate = Gauge(
            RATELIMIT_RATE, "Current requests per second allowed by the limiter.", registry=r
        )
        self.circuit_open = Gauge(
            CIRCUIT_OPEN,
            "1 while a service-wide condition (auth, quota, outage, ...) holds sending.",
            ["condition"],
            registry=r,
        )
        self.dead_letters = Counter(
            DEAD_LETTERS,
            "Events written to the dead-letter topic by reason.",
            ["reason"],
            registry=r,
        )
        build = Gauge(BUILD_INFO, "Always 1; the version as a label.", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        self.max_event_age = Gauge(
            MAX_EVENT_AGE,
            "MAX_EVENT_AGE in force: older events are not sent blindly (STALE_POLICY).",
            registry=r,
        )
        # read at scrape time from the wiring's callables (see `observe_*`): nothing
        # on the event path pays for them
        self._scraped = _ScrapeTime()
        r.register(self._scraped)

    def observe_readiness(self, probe: Callable[[], bool]) -> None:
        """`resend_consumer_ready` is `probe()` at each scrape (1 while /readyz answers 200)."""
        self._scraped.ready = probe

    def observe_oldest_events(self, source: OldestEvents) -> None:
        """`resend_consumer_oldest_event_timestamp_seconds` per partition, from `source()`."""
        self._scraped.oldest = source

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the per-partition series of a revoked partition (no stale lag)."""
        for gauge in (self.lag, self.committed_offset):
            # KeyError: never set for this partition
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))

    def render(self) -> bytes:
        """The registry in Prometheus text format (see `CONTENT_TYPE`)."""
        return bytes(generate_latest(self.registry))

    def snapshot(self) -> MetricsSnapshot:
        """Current totals, read from the registry's samples."""
        totals = {
            EVENTS + "_total": 0.0,
            RETRIES + "_total": 0.0,
            DEAD_LETTERS + "_total": 0.0,
            IN_FLIGHT: 0.0,
            LAG: 0.0,
            PAUSED_PARTITIONS: 0.0,
        }
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
        return MetricsSnapshot(
            events=totals[EVENTS + "_total"],
            retries=totals[RETRIES + "_total"],
            dead_letters=totals[DEAD_LETTERS + "_total"],
            in_flight=totals[IN_FLIGHT],
            lag=totals[LAG],
            paused_partitions=totals[PAUSED_PARTITIONS],
        )

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"<Metrics events={s.events:.0f} in_flight={s.in_flight:.0f} "
            f"retries={s.retries:.0f} dead_letters={s.dead_letters:.0f}>"
        )


class _ScrapeTime(Collector):
    """The families computed when /metrics is read: readiness and the oldest events."""

    def __init__(self) -> None:
        self.ready: Callable[[], bool] | None = None
        self.oldest: OldestEvents | None = None

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(live=True))

    def _families(self, *, live: bool = False) -> Iterator[Metric]:
        ready = GaugeMetricFamily(READY, "1 while /readyz answers 200 (the pod is ready).")
        if live and self.ready is not None:
            ready.add_metric([], 1.0 if self.ready() else 0.0)
        yield ready
        oldest = GaugeMetricFamily(
            OLDEST_EVENT,
            "Event time of the oldest unfinished event of the partition (epoch seconds).",
            labels=["topic", "partition"],
        )
        if live and self.oldest is not None:
            for topic, partition, when in self.oldest():
                oldest.add_metric([topic, str(partition)], when)
        yield oldest
