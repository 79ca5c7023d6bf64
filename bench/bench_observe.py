"""Cost of observing: one canonical log line, one /metrics render, building publish records.

    .venv/bin/python bench/bench_observe.py

Prints microseconds per operation; no broker needed. (Publishing to a broker is
measured with the CLI itself: `resend-consumer publish --count 100000 ...`.)
"""

from __future__ import annotations

import io
import time

import structlog

from consumer import publish
from consumer.logs import configure_logging, log_outcome
from consumer.metrics import Metrics
from consumer.settings import Settings

N = 50_000


def bench_log_lines(mask: bool) -> None:
    buf = io.BytesIO()
    configure_logging(Settings(log_format="json", mask_recipients=mask), stream=buf)
    log = structlog.get_logger("bench")
    started = time.perf_counter()
    for i in range(N):
        log_outcome(
            log,
            outcome="sent",
            event_id=f"e-{i}",
            event_type="order.confirmed",
            source="https://shop.example",
            topic="domain-events",
            partition=i % 6,
            offset=i,
            idempotency_key=f"order-confirmation:o-{i}",
            attempts=1,
            latency=0.0123,
            email_id="4ef9a417-02e9-4d39-ad75-9611e0fcc33c",
        )
    per = (time.perf_counter() - started) / N * 1e6
    size = len(buf.getvalue()) // N
    print(f"canonical log line, mask_recipients={mask}: {per:.1f} us ({size} bytes)")


def bench_metrics() -> None:
    m = Metrics()
    started = time.perf_counter()
    for _ in range(N):
        m.events.labels(type="order.confirmed", outcome="sent").inc()
        m.send_latency.observe(0.05)
        m.sends.labels(status="200").inc()
    per = (time.perf_counter() - started) / N * 1e6
    print(f"metrics per event (3 updates): {per:.1f} us")
    for p in range(24):
        m.lag.labels(topic="domain-events", partition=str(p)).set(p)
        m.committed_offset.labels(topic="domain-events", partition=str(p)).set(p)
    started = time.perf_counter()
    for _ in range(200):
        body = m.render()
    per = (time.perf_counter() - started) / 200 * 1e3
    print(f"/metrics render (24 partitions): {per:.2f} ms ({len(body)} bytes)")


def bench_publish_build() -> None:
    items, _ = publish.parse_input(
        '{"order_id": "o-{n}", "customer": {"email": "c{n}@example.com"}}', lines=False
    )
    started = time.perf_counter()
    records = publish.build_records(
        items,
        event_type="order.confirmed",
        source="bench",
        key_field=None,
        binary=False,
        count=N,
    )
    per = (time.perf_counter() - started) / N * 1e6
    print(f"publish: envelope + record build: {per:.1f} us per event ({len(records)} events)")


if __name__ == "__main__":
    bench_log_lines(mask=True)
    bench_log_lines(mask=False)
    bench_metrics()
    bench_publish_build()
    structlog.reset_defaults()
