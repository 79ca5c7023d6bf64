"""Cost of tracing per event: off (the no-op tracer) and on (the OpenTelemetry SDK).

    .venv/bin/python bench/bench_tracing.py [--events 20000]

Runs the calls the pipeline makes for one sent event (start_event with its
prepare span, one attempt with its answer, the outcome) and one commit span per
100 events, and prints microseconds of CPU per event. "on" uses a batch span
processor whose exporter drops the spans (the SDK's work, not the network's);
"on, not sampled" is OTEL_TRACES_SAMPLER=traceidratio with ratio 0. Needs the
`otel` extra; no broker.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from consumer.prepare import Prepared
from consumer.resend import Answer
from consumer.tracing import NO_TRACER, EventTrace, OtelTracer, Tracer

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PREPARED = Prepared(
    event_id="evt-1",
    event_type="order.confirmed",
    source="shop/orders",
    idempotency_key="order-confirmation:ord-1",
    endpoint="/emails",
    body=b"{}",
    recipients=("c@example.com",),
    event_time=None,
    stale=False,
)
ANSWER = Answer(status=200, verdict="ok", email_id="4ef9a417-02e9-4d39-ad75-9611e0fcc33c")


class Drop(SpanExporter):
    """Accepts every span and does nothing with it."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_event(tracer: Tracer, i: int, headers: Sequence[tuple[str, bytes]]) -> EventTrace:
    started = tracer.clock()
    event = tracer.start_event(
        topic="domain-events",
        partition=i % 6,
        offset=i,
        key=b"ord-1",
        headers=headers,
        value=b'{"specversion":"1.0"}',
        prepared=PREPARED,
        started=started,
    )
    attempt = event.attempt(endpoint="/emails", number=1)
    attempt.answer(ANSWER)
    attempt.end()
    event.end("sent", email_id=ANSWER.email_id)
    return event


def run(name: str, tracer: Tracer, n: int, with_parent: bool) -> float:
    headers = [("traceparent", TRACEPARENT)] if with_parent else []
    window: list[EventTrace] = []
    started = time.process_time()
    for i in range(n):
        window.append(one_event(tracer, i, headers))
        if len(window) == 100:
            tracer.commit(topic="domain-events", partition=0, position=i, events=window).end()
            window = []
    per = (time.process_time() - started) / n * 1e6
    print(f"{name:<48} {per:8.2f} us CPU per event")
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    n = args.events
    run("off (NO_TRACER)", NO_TRACER, n * 10, with_parent=True)
    for sampled in (True, False):
        provider = TracerProvider(sampler=None if sampled else TraceIdRatioBased(0.0))
        provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
        tracer = OtelTracer(provider=provider, group="bench", resend_base_url="http://x")
        label = "on" if sampled else "on, not sampled (ratio 0)"
        run(f"{label}, producer traceparent", tracer, n, with_parent=True)
        run(f"{label}, no trace context", tracer, n, with_parent=False)
        provider.shutdown()


if __name__ == "__main__":
    main()
