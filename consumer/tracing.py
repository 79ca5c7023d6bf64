"""Tracing with OpenTelemetry: one trace from the producer, through Kafka, to Resend.

Optional (`pip install 'resend-consumer[otel]'`) and off unless the standard
`OTEL_*` variables configure an exporter (`tracer_from_env`). When off, every
call below goes to the no-op base classes: a method call that returns a shared
singleton, no allocation, no clock read.

Per event, the spans are::

    process <topic>            CONSUMER  parent: the record's W3C trace context
      prepare                  INTERNAL  decode, validate, route, key, render
      POST /emails             CLIENT    one per Resend attempt: status, error name
      send <dlq topic>         PRODUCER  the dead-letter write, until Kafka acked it
    commit <topic>             CLIENT    its own trace, linked to every event it covers

The parent context is read from the record's `traceparent` / `tracestate`
headers, else the CloudEvents binary-mode `ce_traceparent` / `ce_tracestate`
headers, else the structured-mode `traceparent` / `tracestate` extension
attributes of the JSON envelope (`carrier`). A commit covers many events and a
span has one parent, so the commit span links to the events instead (the
messaging conventions' "settle" operation).

Attributes follow the OpenTelemetry messaging conventions (`messaging.system`,
`messaging.destination.name`, `messaging.destination.partition.id`,
`messaging.kafka.offset`, `messaging.consumer.group.name`,
`messaging.kafka.message.key`), the CloudEvents ones (`cloudevents.event_id`,
`cloudevents.event_type`, `cloudevents.event_source`) and ours under
`resend_consumer.` (route, idempotency key, outcome, reason, email id). Never an
address (a Kafka key holding one is masked) and never the API key: no request
header or body is recorded.

The pipeline holds one `EventTrace` per record (`Tracer.start_event`), asks it
for an `AttemptTrace` per HTTP attempt and a `LetterTrace` per dead letter,
ends it with the outcome, and wraps each commit in `Tracer.commit`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from consumer.errors import TracingUnavailable
from consumer.prepare import Prepared, Rejected, Skipped
from consumer.redact import mask_addresses
from consumer.tracecontext import (
    Headers,
    carrier,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from consumer.resend import Answer

__all__ = [
    "NO_ATTEMPT",
    "NO_COMMIT",
    "NO_EVENT",
    "NO_LETTER",
    "NO_TRACER",
    "AttemptTrace",
    "CommitTrace",
    "EventTrace",
    "LetterTrace",
    "OtelTracer",
    "Tracer",
    "carrier",
    "tracer_from_env",
]

#: what an OTLP-configured environment sets (any one turns tracing on)
_ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
#: a commit span links to at most this many events (the SDK's default link limit)
MAX_COMMIT_LINKS: Final = 128
_SCOPE: Final = "resend_consumer"


# -- the interface, and what it does when tracing is off ----------------------------------


class AttemptTrace:
    """One HTTP attempt to Resend. No-op base."""

    __slots__ = ()

    def answer(self, answer: Answer) -> None:
        """The attempt's classified answer: status, Resend error name, email id."""

    def end(self) -> None:
        """The attempt is over (answered, failed or cancelled)."""


class LetterTrace:
    """The write of one dead letter, from queued to acknowledged. No-op base."""

    __slots__ = ()

    def end(self, error: str | None = None) -> None:
        """Written (error None) or given up on (an error type name, never a message)."""


class CommitTrace:
    """One offset commit (with the dead letters it writes). No-op base."""

    __slots__ = ()

    def end(self, error: str | None = None) -> None:
        """Committed (error None) or failed (an error type name)."""


class EventTrace:
    """The `process` span of one record. No-op base: `trace_id` is None."""

    __slots__ = ()

    @property
    def trace_id(self) -> str | None:
        """32 hex digits for the `event.outcome` log line; None while tracing is off."""
        return None

    def attempt(self, *, endpoint: str, number: int) -> AttemptTrace:
        """Start the span of HTTP attempt `number` (1 for the first) to `endpoint`."""
        return NO_ATTEMPT

    def dead_letter(self, *, topic: str, reason: str) -> LetterTrace:
        """Start the span of this event's dead-letter write to `topic`."""
        return NO_LETTER

    def end(self, outcome: str, *, reason: str | None = None, email_id: str | None = None) -> None:
        """The event's outcome is final (sent, dead_lettered, skipped), or `revoked` here.

        Ending twice is harmless: the first outcome stays.
        """


class Tracer:
    """Tracing off: every method returns a shared no-op object. See `OtelTracer`."""

    __slots__ = ()
    enabled: bool = False

    def clock(self) -> int:
        """A start time for `start_event(started=...)`: 0 (never read) while off."""
        return 0

    def start_event(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        headers: Headers,
        value: bytes | None,
        prepared: Prepared | Rejected | Skipped | None = None,
        started: int = 0,
    ) -> EventTrace:
        """Open the `process` span of a record, with its `prepare` child.

        Called once the record is prepared, with `started` taken by `clock()`
        just before preparing it: the `prepare` span runs from `started` to now.
        """
        return NO_EVENT

    def commit(
        self, *, topic: str, partition: int, position: int, events: Iterable[EventTrace] = ()
    ) -> CommitTrace:
        """Open the span of a commit up to `position`, linked to the `events` it covers."""
        return NO_COMMIT

    def shutdown(self) -> None:
        """Flush and stop exporting (at service stop)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} enabled={self.enabled}>"


#: the shared no-op objects (defaults for fields that hold a trace)
NO_ATTEMPT: Final = AttemptTrace()
NO_LETTER: Final = LetterTrace()
NO_COMMIT: Final = CommitTrace()
NO_EVENT: Final = EventTrace()
#: the tracer while tracing is off
NO_TRACER: Final = Tracer()


# -- OpenTelemetry ---------------------------------------------------------------------------


def _key_text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary keys are not recorded
    return mask_addresses(text)


class _OtelAttempt(AttemptTrace):
    __slots__ = ("_answered", "_span")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._answered = False

    def answer(self, answer: Answer) -> None:
        from opentelemetry.trace import StatusCode

        span = self._span
        self._answered = True
        if answer.status is not None:
            span.set_attribute("http.response.status_code", answer.status)
        if answer.error_name is not None:
            span.set_attribute("resend_consumer.error_name", answer.error_name)
        if answer.email_id is not None:
            span.set_attribute("resend_consumer.email_id", answer.email_id)
        span.set_attribute("resend_consumer.verdict", answer.verdict)
        if answer.verdict != "ok":
            kind = answer.error_name or (str(answer.status) if answer.status else "transport")
            span.set_attribute("error.type", kind)
            span.set_status(StatusCode.ERROR, answer.reason)

    def end(self) -> None:
        if not self._span.is_recording():
            return
        if not self._answered:
            from opentelemetry.trace import StatusCode

            # cancelled (a revoke, shutdown) or the client raised: no answer came
            self._span.set_attribute("error.type", "no_answer")
            self._span.set_status(StatusCode.ERROR)
        self._span.end()


class _OtelSpanEnd(LetterTrace, CommitTrace):
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def end(self, error: str | None = None) -> None:
        if not self._span.is_recording():
            return  # ended already, or not sampled
        if error is not None:
            from opentelemetry.trace import StatusCode

            self._span.set_attribute("error.type", error)
            self._span.set_status(StatusCode.ERROR)
        self._span.end()


class _OtelEvent(EventTrace):
    __slots__ = ("_context", "_owner", "_span")

    def __init__(self, owner: OtelTracer, span: Span, context: Context) -> None:
        self._owner = owner
        self._span = span
        self._context = context

    @property
    def span(self) -> Span:
        return self._span

    @property
    def trace_id(self) -> str | None:
        return format(self._span.get_span_context().trace_id, "032x")

    def attempt(self, *, endpoint: str, number: int) -> AttemptTrace:
        from opentelemetry.trace import SpanKind

        span = self._owner.tracer.start_span(
            f"POST {endpoint}",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "url.path": endpoint,
                "server.address": self._owner.server_address,
                # the semantic conventions count resends, not attempts
                "http.request.resend_count": number - 1,
            },
        )
        return _OtelAttempt(span)

    def dead_letter(self, *, topic: str, reason: str) -> LetterTrace:
        from opentelemetry.trace import SpanKind

        span = self._owner.tracer.start_span(
            f"send {topic}",
            context=self._context,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": topic,
                "resend_consumer.reason": _plain(reason),
            },
        )
        return _OtelSpanEnd(span)

    def end(self, outcome: str, *, reason: str | None = None, email_id: str | None = None) -> None:
        span = self._span
        if not span.is_recording():
            return  # ended already (a revoke ended it, then the lane finished), or not sampled
        span.set_attribute("resend_consumer.outcome", _plain(outcome))
        if reason is not None:
            reason = _plain(reason)
            span.set_attribute("resend_consumer.reason", reason)
        if email_id is not None:
            span.set_attribute("resend_consumer.email_id", email_id)
        if outcome == "dead_lettered":
            from opentelemetry.trace import StatusCode

            span.set_attribute("error.type", reason or "dead_lettered")
            span.set_status(StatusCode.ERROR, reason)
        span.end()


class OtelTracer(Tracer):
    """Spans through an OpenTelemetry `TracerProvider` (tests give one an in-memory exporter)."""

    __slots__ = ("_propagator", "group", "provider", "server_address", "tracer")
    enabled = True

    def __init__(self, *, provider: TracerProvider, group: str, resend_base_url: str = "") -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from consumer import __version__

        self.provider = provider
        self.tracer = provider.get_tracer(_SCOPE, __version__)
        self.group = group
        self.server_address = _host(resend_base_url)
        self._propagator = TraceContextTextMapPropagator()

    def clock(self) -> int:
        return time.time_ns()

    def start_event(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        headers: Headers,
        value: bytes | None,
        prepared: Prepared | Rejected | Skipped | None = None,
        started: int = 0,
    ) -> EventTrace:
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self._propagator.extract(carrier(headers, value))
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
            "messaging.consumer.group.name": self.group,
        }
        key_text = _key_text(key)
        if key_text is not None:
            attributes["messaging.kafka.message.key"] = key_text
        if prepared is not None:
            attributes.update(_prepared_attributes(prepared))
        start = started or time.time_ns()
        span = self.tracer.start_span(
            f"process {topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=start,
        )
        context = set_span_in_context(span)
        child = self.tracer.start_span("prepare", context=context, start_time=start)
        if isinstance(prepared, Rejected | Skipped):
            child.set_attribute("resend_consumer.reason", _plain(prepared.reason))
        child.end()
        return _OtelEvent(self, span, context)

    def commit(
        self, *, topic: str, partition: int, position: int, events: Iterable[EventTrace] = ()
    ) -> CommitTrace:
        from opentelemetry.trace import Link, SpanKind

        links: list[Link] = []
        for event in events:
            if isinstance(event, _OtelEvent):
                links.append(Link(event.span.get_span_context()))
                if len(links) == MAX_COMMIT_LINKS:
                    break
        span = self.tracer.start_span(
            f"commit {topic}",
            kind=SpanKind.CLIENT,
            links=links,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "settle",
                "messaging.operation.name": "commit",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(partition),
                "messaging.kafka.offset": position,
                "messaging.consumer.group.name": self.group,
            },
        )
        return _OtelSpanEnd(span)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _plain(text: str) -> str:
    """A plain str: reason codes may be StrEnum members, which exporters need not know."""
    return str.__str__(text)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def _prepared_attributes(prepared: Prepared | Rejected | Skipped) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if prepared.event_id is not None:
        out["cloudevents.event_id"] = prepared.event_id
    if prepared.event_type is not None:
        out["cloudevents.event_type"] = prepared.event_type
    if isinstance(prepared, Prepared):  # a route matched: the route is its event type
        out["cloudevents.event_source"] = prepared.source
        out["resend_consumer.route"] = prepared.event_type
    if not isinstance(prepared, Skipped) and prepared.idempotency_key is not None:
        out["resend_consumer.idempotency_key"] = prepared.idempotency_key
    return out


# -- configuration from the environment --------------------------------------------------


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """True when the standard OTEL_* variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(environ.get(name, "").strip() for name in _ENDPOINT_VARS)


def tracer_from_env(environ: Mapping[str, str], *, group: str, resend_base_url: str = "") -> Tracer:
    """`NO_TRACER` unless OTEL_* configures an exporter; then an `OtelTracer`.

    The SDK reads the other standard variables itself (`OTEL_SERVICE_NAME`,
    `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
    `OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*`). `OTEL_TRACES_EXPORTER` may be `otlp`
    (the default: OTLP over HTTP/protobuf) or `console`.
    """
    if not tracing_requested(environ):
        return NO_TRACER
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise TracingUnavailable(
            "OTEL_* variables ask for tracing but OpenTelemetry is not installed: "
            "install resend-consumer[otel], or unset them"
        ) from None
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[SpanExporter] = []
    for name in filter(None, names):
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            raise TracingUnavailable(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported (otlp, console or none)"
            )
    attrs = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "resend-consumer"}
    provider = TracerProvider(resource=Resource.create(attrs))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return OtelTracer(provider=provider, group=group, resend_base_url=resend_base_url)
