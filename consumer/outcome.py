"""Outcome: how an event's journey ends, said in one place.

Every event ends in exactly one `Outcome` (`consumer.events`): sent, dead-lettered
with a reason, or skipped (or, revoked before it finished, in nothing: the next
owner sends it). `Outcomes.finish` is the one place that ends it: it marks the
offset done in the ledger, releases the memory the work held, counts the
events metric, ends the trace span and writes the canonical `event.outcome`
line. A dead letter is kept in its partition's state, to be written by the
commit that covers its offset (`consumer.commit`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from consumer.deadletter import DeadLetter
from consumer.events import Outcome, Reason
from consumer.logs import LogEvent, log_outcome

if TYPE_CHECKING:
    from consumer.metrics import Metrics
    from consumer.retry import DeliveryResult
    from consumer.routes import RouteTable
    from consumer.state import Engine, Work
    from consumer.tracing import Tracer

__all__ = ["REASON_DUPLICATE", "REASON_MEMBER_REFUSED", "Outcomes"]

log = structlog.get_logger("consumer.outcome")

#: outcome reason of a second copy of an email that went out in a batch
REASON_DUPLICATE: Final = "duplicate"
#: reason of a batch member Resend refused (as for a single send answered 422)
REASON_MEMBER_REFUSED: Final = "validation_error"


class Outcomes:
    """Ends events: ledger, memory, metric, span and the canonical line, together."""

    def __init__(
        self,
        *,
        engine: Engine,
        table: RouteTable,
        metrics: Metrics,
        tracer: Tracer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._table = table
        self._metrics = metrics
        self._tracer = tracer
        self._clock = clock
        # A concrete logger, bound once: the module's lazy proxy rebuilds one per call,
        # which is a measurable share of the per-event cost of the outcome line.
        self._log = log.bind()
        self._counters: dict[tuple[str, str], Any] = {}

    def sent(self, work: Work, result: DeliveryResult, email_id: str | None = None) -> None:
        """Resend acknowledged it (`email_id`: its id within a batch answer)."""
        self._engine.done += 1
        if email_id != result.email_id:  # a batch member: its own id of the answer's list
            result = dataclasses.replace(result, email_id=email_id)
        self.finish(work, Outcome.SENT, result=result)

    def skipped(self, work: Work, reason: str, result: DeliveryResult | None = None) -> None:
        """A policy decided no email is sent (a stale event under skip, a duplicate)."""
        self._engine.skipped += 1
        self.finish(work, Outcome.SKIPPED, result=result, reason=reason)

    def delivery_ended(self, work: Work, result: DeliveryResult) -> None:
        """A delivery ended: sent, skipped, or a dead letter with its reason."""
        if result.outcome == Outcome.SENT:
            self.sent(work, result, result.email_id)
            return
        if result.outcome == Outcome.SKIPPED:  # aged while waiting, and STALE_POLICY=skip
            self.skipped(work, result.reason, result)
            return
        prepared = work.prepared
        last = result.last
        if (result.reason == Reason.STALE_EVENT or last is None) and prepared is not None:
            message = f"event aged past {prepared.max_age:.0f}s while waiting to be sent"
        else:
            message = last.message if last is not None else result.reason
        self.dead_letter(work, reason=result.reason, message=message, result=result)

    def bug(self, work: Work, exc: Exception) -> None:
        """An unexpected exception while processing: log it, then dead-letter the record."""
        log.error(
            LogEvent.INTERNAL_ERROR,
            error=type(exc).__name__,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            exc_info=exc,
        )
        self.dead_letter(
            work, reason=Reason.INTERNAL_ERROR, message=f"{type(exc).__name__} while processing"
        )

    def dead_letter(
        self,
        work: Work,
        *,
        reason: str,
        message: str,
        result: DeliveryResult | None = None,
    ) -> None:
        """Finish `work` as a dead letter, written by the commit that covers its offset."""
        engine = self._engine
        part = engine.current(work)
        if part is None:
            return  # revoked and gone: the next owner dead-letters it; nothing was committed
        payload = work.payload
        last = result.last if result is not None else None
        letter = DeadLetter(
            source_topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            key=work.key,
            value=work.value,
            headers=work.headers,
            reason=reason,
            error_name=last.error_name if last is not None else None,
            http_status=last.status if last is not None else None,
            message=message,
            attempts=result.attempts if result is not None else 0,
            first_attempt_at=result.first_attempt_at if result is not None else None,
            last_attempt_at=result.last_attempt_at if result is not None else None,
            idempotency_key=work.idempotency_key,
            event_type=payload.event_type,
        )
        size = len(work.value or b"")
        if self._tracer.enabled:
            part.letter_traces[id(letter)] = work.trace.dead_letter(
                topic=engine.settings.dlq_topic_for(work.tp.topic), reason=reason
            )
        part.letters.append(letter)
        part.letter_bytes += size
        engine.pending_bytes += size
        self.finish(work, Outcome.DEAD_LETTERED, result=result, reason=reason, message=message)

    def finish(
        self,
        work: Work,
        outcome: Outcome,
        *,
        result: DeliveryResult | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """The one end of every event: ledger, memory, metric, span, canonical line."""
        engine = self._engine
        part = engine.current(work)
        accepted = engine.ledger.done(work.tp, work.offset, work.generation)
        if part is not None and part.works.pop(work.offset, None) is work:
            engine.pending_bytes -= work.size
            part.progress_at = self._clock()
            if work.urgent:
                part.urgent -= 1
        payload = work.payload
        self._count(payload.event_type, outcome)
        final_reason = reason or (result.reason if result is not None else None)
        email_id = result.email_id if result is not None else None
        work.trace.end(outcome, reason=final_reason, email_id=email_id)
        if self._tracer.enabled and part is not None:
            part.traced.append((work.offset, work.trace))
        prepared = work.prepared
        log_outcome(
            self._log,
            outcome=outcome,
            reason=final_reason,
            message=message,
            event_id=payload.event_id,
            event_type=payload.event_type,
            source=prepared.source if prepared is not None else None,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            idempotency_key=work.idempotency_key,
            attempts=result.attempts if result is not None else 0,
            latency=self._clock() - work.fetched_at,
            answer_time=result.answer_time if result is not None and result.attempts else None,
            email_id=email_id,
            trace_id=work.trace.trace_id,
        )
        if not accepted:
            log.debug(LogEvent.LATE_COMPLETION, topic=work.tp.topic, offset=work.offset)

    def _count(self, event_type: str | None, outcome: Outcome) -> None:
        # event types come from producers: only routed ones become metric labels
        label = event_type if event_type is not None and event_type in self._table.routes else None
        key = (label or "unknown", str(outcome))
        child = self._counters.get(key)
        if child is None:  # label lookups cost more than the increment: keep the children
            child = self._counters[key] = self._metrics.events.labels(type=key[0], outcome=key[1])
        child.inc()
