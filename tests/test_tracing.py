"""Tracing (consumer/tracing.py) with the OpenTelemetry SDK's in-memory exporter.

Spans are made from real prepared records (the routes of schemas/), and the
attempts from real `deliver()` calls against the sandbox on a socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from consumer.deadletter import DeadLetter, build_record, original_headers
from consumer.errors import TracingUnavailable
from consumer.events import Outcome
from consumer.prepare import Prepared, Preparer, Rejected
from consumer.resend import ResendClient
from consumer.retry import RetryPolicy, ServiceGate, deliver
from consumer.sandbox import Faults, Sandbox
from consumer.settings import Secret
from consumer.tracing import NO_TRACER, EventTrace, OtelTracer, Tracer, carrier, tracer_from_env
from tests.pipeline_support import API_KEY, order_event, pipeline_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
GROUP = "g-trace"


@pytest.fixture
def spans() -> Iterator[tuple[OtelTracer, InMemorySpanExporter]]:
    """An OtelTracer whose spans land in memory, exported as each one ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = OtelTracer(provider=provider, group=GROUP, resend_base_url="http://127.0.0.1:9")
    yield tracer, exporter
    provider.shutdown()


@pytest.fixture(scope="module")
def preparer() -> Preparer:
    """The real preparer over schemas/routes.yaml."""
    return Preparer.from_settings(pipeline_settings("127.0.0.1:9", "t", "http://127.0.0.1:9"))


def prepare(preparer: Preparer, value: bytes, headers: Any = ()) -> Any:
    return preparer.prepare(
        value, tuple(headers), topic="orders", partition=3, offset=41, timestamp_ms=None, now=None
    )


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The first finished span of each name."""
    out: dict[str, ReadableSpan] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, span)
    return out


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def start(
    tracer: Tracer, preparer: Preparer, value: bytes, headers: Any = (), key: bytes | None = None
) -> tuple[EventTrace, Any]:
    started = tracer.clock()
    result = prepare(preparer, value, headers)
    event = tracer.start_event(
        topic="orders",
        partition=3,
        offset=41,
        key=key,
        headers=tuple(headers),
        value=value,
        prepared=result,
        started=started,
    )
    return event, result


# -- the context of a record ---------------------------------------------------------------


def test_carrier_prefers_kafka_headers_then_binary_mode_then_the_structured_extension() -> None:
    """traceparent header wins over ce_traceparent, which wins over the JSON extension."""
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    structured = orjson.dumps({"specversion": "1.0", "traceparent": other, "tracestate": "a=1"})
    assert carrier([], structured) == {"traceparent": other, "tracestate": "a=1"}
    binary = [("ce_traceparent", other.encode()), ("ce_tracestate", b"b=2")]
    assert carrier(binary, structured) == {"traceparent": other, "tracestate": "b=2"}
    both = [("traceparent", TRACEPARENT.encode()), *binary]
    assert carrier(both, structured) == {"traceparent": TRACEPARENT}
    assert carrier([("traceparent", b"\xff\xfe")], b"{}") == {}
    assert carrier([], b'{"traceparent": 7}') == {}
    assert carrier([], b'not json but "traceparent"') == {}
    assert carrier([("other", None)], None) == {}


# -- spans ------------------------------------------------------------------------------------


def test_process_span_continues_the_producers_trace_with_messaging_attributes(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """The Kafka traceparent is the parent, prepare a child; messaging conventions apply."""
    tracer, exporter = spans
    event, result = start(
        tracer, preparer, order_event(1), [("traceparent", TRACEPARENT.encode())], key=b"ord-1"
    )
    assert isinstance(result, Prepared)
    event.end("sent", email_id="em_1")
    got = by_name(exporter)
    process, prep = got["process orders"], got["prepare"]
    assert process.kind is SpanKind.CONSUMER
    assert event.trace_id == TRACE_ID == hexid(process.context.trace_id, 32)
    assert process.parent is not None
    assert hexid(process.parent.span_id, 16) == PARENT_ID
    assert prep.parent is not None
    assert prep.parent.span_id == process.context.span_id
    assert prep.start_time == process.start_time
    assert prep.end_time is not None
    assert dict(process.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.destination.partition.id": "3",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": GROUP,
        "messaging.kafka.message.key": "ord-1",
        "cloudevents.event_id": "evt-1",
        "cloudevents.event_type": "order.confirmed",
        "cloudevents.event_source": "shop/orders",
        "resend_consumer.route": "order.confirmed",
        "resend_consumer.idempotency_key": result.idempotency_key,
        "resend_consumer.outcome": "sent",
        "resend_consumer.email_id": "em_1",
    }
    assert process.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_cloudevents_traceparent_extension_is_the_parent(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer, mode: str
) -> None:
    """Without a traceparent header, the CloudEvents extension (either mode) is the parent."""
    tracer, exporter = spans
    if mode == "structured":
        envelope = orjson.loads(order_event(2))
        envelope["traceparent"] = TRACEPARENT
        value, headers = orjson.dumps(envelope), []
    else:
        value, headers = order_event(2), [("ce_traceparent", TRACEPARENT.encode())]
    event, _ = start(tracer, preparer, value, headers)
    event.end("sent")
    process = by_name(exporter)["process orders"]
    assert hexid(process.context.trace_id, 32) == TRACE_ID
    assert process.parent is not None
    assert hexid(process.parent.span_id, 16) == PARENT_ID


def test_no_context_starts_a_new_trace(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """A record without trace context gets a root process span of its own trace."""
    tracer, exporter = spans
    first, _ = start(tracer, preparer, order_event(3))
    second, _ = start(tracer, preparer, order_event(4))
    first.end("sent")
    second.end("sent")
    roots = [s for s in exporter.get_finished_spans() if s.name == "process orders"]
    assert [s.parent for s in roots] == [None, None]
    assert first.trace_id != second.trace_id


async def test_each_resend_attempt_is_a_client_span_in_the_events_trace(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer, sandbox: Sandbox
) -> None:
    """A 503 then a 200 through real deliver(): two CLIENT children with status and error name."""
    tracer, exporter = spans
    event, prepared = start(
        tracer, preparer, order_event(5), [("traceparent", TRACEPARENT.encode())]
    )
    assert isinstance(prepared, Prepared)
    sandbox.set_faults(Faults(force_status={"status": 503, "name": "service_unavailable"}))
    current: list[Any] = []
    attempts = [0]

    def on_attempt(busy: bool) -> None:
        if busy:
            attempts[0] += 1
            current.append(event.attempt(endpoint=prepared.endpoint, number=attempts[0]))
        else:
            current.pop().end()

    def on_answer(answer: Any) -> None:
        current[-1].answer(answer)
        sandbox.set_faults(Faults())  # the next attempt goes through

    async with ResendClient(base_url=sandbox.url, api_key=Secret(API_KEY)) as client:
        result = await deliver(
            client,
            endpoint=prepared.endpoint,
            body=prepared.body,
            idempotency_key=prepared.idempotency_key,
            policy=RetryPolicy(base=0.01, cap=0.02, max_attempts=3, max_elapsed=10.0),
            gate=ServiceGate(probe_initial=0.01, probe_max=0.05),
            slots=asyncio.Semaphore(1),
            on_attempt=on_attempt,
            on_answer=on_answer,
        )
    assert (result.outcome, result.attempts) == ("sent", 2)
    event.end("sent", email_id=result.email_id)
    finished = exporter.get_finished_spans()
    process = next(s for s in finished if s.name == "process orders")
    tries = [s for s in finished if s.name == "POST /emails"]
    assert len(tries) == 2
    for n, span in enumerate(tries):
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == process.context.span_id
        assert hexid(span.context.trace_id, 32) == TRACE_ID
        assert span.attributes is not None
        assert span.attributes["http.request.resend_count"] == n
        assert span.attributes["server.address"] == "127.0.0.1"
    failed, ok = (dict(s.attributes or {}) for s in tries)
    assert failed["http.response.status_code"] == 503
    assert failed["error.type"] == failed["resend_consumer.error_name"] == "service_unavailable"
    assert tries[0].status.status_code is StatusCode.ERROR
    assert ok["http.response.status_code"] == 200
    assert ok["resend_consumer.email_id"] == result.email_id
    assert "error.type" not in ok


def test_attempt_without_an_answer_ends_as_an_error(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """A cancelled attempt (no answer) still ends its span, marked no_answer."""
    tracer, exporter = spans
    event, _ = start(tracer, preparer, order_event(6))
    event.attempt(endpoint="/emails", number=1).end()
    span = by_name(exporter)["POST /emails"]
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "no_answer"


def test_dead_letter_and_commit_spans(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """A rejected record: prepare says why, the letter write is a PRODUCER child, commit links."""
    tracer, exporter = spans
    headers = [("traceparent", TRACEPARENT.encode())]
    event, result = start(tracer, preparer, b'{"specversion": "1.0"}', headers)
    assert isinstance(result, Rejected)
    letter = event.dead_letter(topic="orders.dlq", reason=result.reason)
    event.end(Outcome.DEAD_LETTERED, reason=result.reason)  # what Outcomes.finish passes
    sent, _ = start(tracer, preparer, order_event(7))
    sent.end("sent")
    commit = tracer.commit(topic="orders", partition=3, position=42, events=[event, sent])
    letter.end()
    commit.end()
    got = by_name(exporter)
    process, write, link = got["process orders"], got["send orders.dlq"], got["commit orders"]
    reason = (got["prepare"].attributes or {})["resend_consumer.reason"]
    assert reason == result.reason
    assert type(reason) is str  # not the StrEnum member: exporters know plain types only
    assert type((process_attrs := dict(process.attributes or {}))["resend_consumer.reason"]) is str
    assert process_attrs["error.type"] == result.reason
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["resend_consumer.outcome"] == "dead_lettered"
    assert type(process_attrs["resend_consumer.outcome"]) is str
    assert write.kind is SpanKind.PRODUCER
    assert write.parent is not None
    assert write.parent.span_id == process.context.span_id
    assert hexid(write.context.trace_id, 32) == TRACE_ID
    assert dict(write.attributes or {})["messaging.destination.name"] == "orders.dlq"
    assert link.parent is None
    processes = [s for s in exporter.get_finished_spans() if s.name == "process orders"]
    assert [lk.context.span_id for lk in link.links] == [s.context.span_id for s in processes]
    assert len(link.links) == 2
    commit_attrs = dict(link.attributes or {})
    assert commit_attrs["messaging.operation.type"] == "settle"
    assert commit_attrs["messaging.kafka.offset"] == 42
    failing = tracer.commit(topic="orders", partition=3, position=43)
    failing.end("CommitFailed")
    last = exporter.get_finished_spans()[-1]
    assert last.name == "commit orders"
    assert last.status.status_code is StatusCode.ERROR
    assert (last.attributes or {})["error.type"] == "CommitFailed"


def test_no_span_holds_an_address_or_the_api_key(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """Recipients and keys shaped like addresses are masked; no attribute holds the API key."""
    tracer, exporter = spans
    event, _ = start(
        tracer, preparer, order_event(8, email="jane@example.com"), key=b"jane@example.com"
    )
    attempt = event.attempt(endpoint="/emails", number=1)
    attempt.end()
    event.end("sent")
    values = [str(v) for s in exporter.get_finished_spans() for v in (s.attributes or {}).values()]
    assert "ja***@example.com" in values
    assert not [v for v in values if "jane@" in v or API_KEY in v]


# -- off ---------------------------------------------------------------------------------------


def test_off_unless_otel_variables_configure_an_exporter() -> None:
    """No OTEL_* (or disabled, or exporter none) is the no-op tracer; an endpoint turns it on."""
    assert tracer_from_env({}, group=GROUP) is NO_TRACER
    assert tracer_from_env({"OTEL_SERVICE_NAME": "x"}, group=GROUP) is NO_TRACER
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert tracer_from_env({**on, "OTEL_SDK_DISABLED": "true"}, group=GROUP) is NO_TRACER
    assert tracer_from_env({**on, "OTEL_TRACES_EXPORTER": "none"}, group=GROUP) is NO_TRACER
    tracer = tracer_from_env(on, group=GROUP)
    try:
        assert isinstance(tracer, OtelTracer)
        assert tracer.enabled
        assert tracer.group == GROUP
    finally:
        tracer.shutdown()
    with pytest.raises(TracingUnavailable, match="zipkin"):
        tracer_from_env({"OTEL_TRACES_EXPORTER": "zipkin"}, group=GROUP)


def test_the_no_op_tracer_makes_nothing(preparer: Preparer) -> None:
    """Off: one shared object per call, no trace id, nothing recorded, no clock read."""
    event, _ = start(NO_TRACER, preparer, order_event(9), [("traceparent", TRACEPARENT.encode())])
    again, _ = start(NO_TRACER, preparer, order_event(10))
    assert event is again
    assert event.trace_id is None
    assert NO_TRACER.clock() == 0
    assert event.attempt(endpoint="/emails", number=1) is event.attempt(endpoint="/e", number=2)
    assert event.dead_letter(topic="d", reason="r") is event.dead_letter(topic="e", reason="s")
    assert NO_TRACER.commit(topic="t", partition=0, position=1) is NO_TRACER.commit(
        topic="u", partition=1, position=2
    )
    assert not NO_TRACER.enabled
    assert repr(NO_TRACER) == "<Tracer enabled=False>"


def test_a_replayed_dead_letter_continues_the_same_trace(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """The dead letter keeps the traceparent header; replay's headers give the same parent."""
    tracer, exporter = spans
    original = [("traceparent", TRACEPARENT.encode()), ("dlq.reason", b"forged")]
    letter = DeadLetter(
        source_topic="orders",
        partition=3,
        offset=41,
        key=b"ord-11",
        value=order_event(11),
        headers=original,
        reason="schema_invalid",
        error_name=None,
        http_status=None,
        message="m",
        attempts=0,
        first_attempt_at=None,
        last_attempt_at=None,
        idempotency_key=None,
        event_type=None,
    )
    record = build_record(letter, limit=1_000_000, dead_lettered_at=1.0)
    replayed = original_headers(record.headers)
    assert replayed == original
    event, _ = start(tracer, preparer, order_event(11), replayed)
    event.end("sent")
    assert event.trace_id == TRACE_ID
    parent = by_name(exporter)["process orders"].parent
    assert parent is not None
    assert hexid(parent.span_id, 16) == PARENT_ID


def test_ending_an_event_twice_keeps_the_first_outcome(
    spans: tuple[OtelTracer, InMemorySpanExporter], preparer: Preparer
) -> None:
    """A revoke ends the span as revoked; the lane finishing later changes nothing."""
    tracer, exporter = spans
    event, _ = start(tracer, preparer, order_event(12))
    event.end("revoked")
    event.end("sent", email_id="em_late")
    (process,) = [s for s in exporter.get_finished_spans() if s.name == "process orders"]
    assert (process.attributes or {})["resend_consumer.outcome"] == "revoked"
    assert "resend_consumer.email_id" not in (process.attributes or {})


def test_the_engine_traces_every_event_attempt_dead_letter_and_commit(
    spans: tuple[OtelTracer, InMemorySpanExporter],
) -> None:
    """The pipeline's calls into the tracer, in the engine simulation: one `process` span
    per record, its attempts and dead-letter writes as children, commits linking them."""
    from tests import sim

    tracer, exporter = spans

    async def scenario(world: sim.World) -> None:
        world.resend.chaos = False
        world.members[0].start()
        await world.settle()
        await world.close()

    world_records: list[int] = []

    def run(world: sim.World) -> Any:
        world_records.append(sum(len(r) for r in world.group.records.values()))
        return scenario(world)

    sim.run(run, seed=3, tracer=tracer)
    finished = exporter.get_finished_spans()
    process = [s for s in finished if s.name.startswith("process ")]
    assert len(process) == world_records[0]
    ids = {s.context.span_id for s in process}
    attempts = [s for s in finished if s.name.startswith("POST ")]
    letters = [s for s in finished if s.name.startswith("send ")]
    commits = [s for s in finished if s.name.startswith("commit ")]
    assert attempts
    assert letters
    assert all(s.parent is not None and s.parent.span_id in ids for s in attempts + letters)
    linked = {link.context.span_id for c in commits for link in c.links}
    assert linked <= ids
    assert len(linked) == len(ids)  # every finished event is covered by a commit
