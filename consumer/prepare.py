"""Prepare: one Kafka record -> one deterministic Resend request, or a reason why not.

    decode (events) -> route (routes) -> schema -> key (keys) -> freshness -> render

`Preparer.prepare` never raises. It returns `Prepared` (the exact request bytes,
serialized once with sorted keys so every attempt, process and restart sends
the same bytes), `Rejected` (dead-letter it, with a stable `Reason` code) or
`Skipped` (a policy said drop it). The `render` and `check` commands that run
it by hand are in `consumer.commands.render`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from consumer.batching import UNBATCHABLE_FIELDS, Priority
from consumer.errors import InvalidEvent
from consumer.events import Decoder, Outcome, Reason, Refusal, invalid, validate_data
from consumer.redact import mask_addresses
from consumer.resend import ENDPOINT_EMAILS
from consumer.routes import Route, RouteTable, load_routes
from consumer.settings import Settings, StalePolicy
from consumer.tracecontext import TRACEPARENT, carrier, trace_tag

#: a file holding one Kafka record (binary mode): {"headers": {...}, "value": ...}
RECORD_KEYS: Final = frozenset({"headers", "value", "key"})
#: how far an event's time may be ahead of this host's clock before it is not trusted
CLOCK_SKEW: Final = 300.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready to send: same event, same key, same bytes.

    It also carries what freshness needs after admission: `event_time` (epoch
    seconds the age is measured from, None when unknown), the route's
    `max_age` and the `stale_policy` in force ("send" when age is not enforced).
    The defaults never call an event stale.
    """

    event_id: str
    event_type: str
    source: str
    idempotency_key: str
    endpoint: str
    body: bytes
    recipients: tuple[str, ...]
    event_time: float | None
    #: already older than max_age at admission, and sent anyway (STALE_POLICY=send)
    stale: bool
    max_age: float = float("inf")
    stale_policy: StalePolicy = "send"
    #: lower is served first (consumer.batching.Priority)
    priority: int = 1
    #: the largest batch its route allows (1: always singly) and the linger
    batch_size: int = 1
    batch_linger: float = 0.0

    def stale_reason(self, now: float) -> str | None:
        """The reason code if this event must not be sent at `now` (epoch seconds), else None.

        The admission rule, applied again right before each attempt: a gate
        pause or 429 waits can outlast the key window Resend remembers.
        STALE_POLICY=send never refuses.
        """
        if self.stale_policy == "send" or over_age(self.event_time, now, self.max_age) is None:
            return None
        return Reason.STALE_EVENT.value

    @property
    def stale_outcome(self) -> Refusal:
        """What a refusal by `stale_reason` ends in: skipped under STALE_POLICY=skip."""
        return Outcome.SKIPPED if self.stale_policy == "skip" else Outcome.DEAD_LETTERED


@dataclass(frozen=True, slots=True)
class Rejected:
    """Dead-letter this record; `reason` is a `Reason` code, `message` holds no secrets."""

    reason: str
    message: str
    event_id: str | None
    event_type: str | None
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A policy dropped this record (unknown type or stale event set to skip)."""

    reason: str
    event_id: str | None
    event_type: str | None


#: what preparing a record made of it (each carries the event's id and type)
Payload = Prepared | Rejected | Skipped


class Preparer:
    """Turns records into requests with the loaded routes; `prepare` never raises."""

    __slots__ = (
        "_batch_linger",
        "_batch_size",
        "_counts",
        "_decoder",
        "_max_age",
        "_stale_policy",
        "table",
    )

    def __init__(
        self,
        *,
        table: RouteTable,
        max_event_bytes: int,
        max_event_age: float,
        stale_policy: StalePolicy,
        batch_size: int = 1,
        batch_linger: float = 0.0,
    ) -> None:
        self.table = table
        self._batch_size = batch_size
        self._batch_linger = batch_linger
        self._decoder = Decoder(envelope=table.envelope, max_bytes=max_event_bytes)
        self._max_age = max_event_age
        self._stale_policy: StalePolicy = stale_policy
        self._counts = {"prepared": 0, "rejected": 0, "skipped": 0}

    @classmethod
    def from_settings(cls, settings: Settings) -> Preparer:
        """Load and check routes, schemas and templates; RoutesError names file/route/field."""
        return cls(
            table=load_routes(settings.routes_file),
            max_event_bytes=settings.max_event_bytes,
            max_event_age=settings.max_event_age,
            stale_policy=settings.stale_policy,
            batch_size=settings.batch_size,
            batch_linger=settings.batch_linger,
        )

    def __repr__(self) -> str:
        c = self._counts
        return (
            f"<Preparer routes={len(self.table.routes)} prepared={c['prepared']} "
            f"rejected={c['rejected']} skipped={c['skipped']}>"
        )

    def prepare(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        *,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        now: float | None = None,
        enforce_age: bool = True,
    ) -> Prepared | Rejected | Skipped:
        """One record -> Prepared | Rejected | Skipped.

        topic/partition/offset name the record (kept for symmetry with the
        pipeline; the result does not depend on them, so a replayed record
        prepares identically). `enforce_age=False` (dry runs) ignores freshness.

        Freshness (see `event_time_for_age`): the age is measured from the
        CloudEvents `time`, else from the Kafka record timestamp. A `time` more
        than `CLOCK_SKEW` ahead of `now` is not trusted: the record timestamp
        stands in when it is sane, otherwise the record is Rejected as
        `invalid_envelope`. With no `time` and no usable record timestamp (None,
        -1 or itself in the future) the age is unknown and the event counts as
        fresh, on purpose: refusing it would drop mail from producers that never
        set a time, and Resend's idempotency key still guards a redelivery
        within 24 h.
        """
        event_id: str | None = None
        event_type: str | None = None
        key: str | None = None
        try:
            event = self._decoder.decode(value, headers)
            event_id, event_type = event.id, event.type
            route = self.table.routes.get(event.type)
            if route is None:
                return self._unknown(event_id, event_type)
            validate_data(route.validator, event)
            key = route.key.render(event)
            clock = time.time() if now is None else now
            event_time = event_time_for_age(
                event.event_time, timestamp_ms, now=clock, check_future=enforce_age
            )
            max_age = route.max_event_age or self._max_age
            policy: StalePolicy = (
                (route.stale_policy or self._stale_policy) if enforce_age else "send"
            )
            age = over_age(event_time, clock, max_age) if enforce_age else None
            stale = False
            if age is not None:
                # Resend may have forgotten the key: follow the policy, never send blindly.
                if policy == "skip":
                    self._counts["skipped"] += 1
                    return Skipped(Reason.STALE_EVENT.value, event_id, event_type)
                if policy == "dead-letter":
                    message = f"event is {age:.0f}s old, above the {max_age:.0f}s limit"
                    raise invalid(Reason.STALE_EVENT, message)
                stale = True
            body = route.body(event, trace_tag(carrier(headers, value).get(TRACEPARENT)))
            data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except InvalidEvent as exc:
            return self._rejected(exc.reason, str(exc), event_id, event_type, key)
        except Exception as exc:
            # A bug must not stop the partition: dead-letter with a code that says so.
            return self._rejected(
                Reason.INTERNAL_ERROR.value,
                f"unexpected {type(exc).__name__} while preparing",
                event_id,
                event_type,
                key,
            )
        self._counts["prepared"] += 1
        return Prepared(
            event_id=event.id,
            event_type=event.type,
            source=event.source,
            idempotency_key=key,
            endpoint=ENDPOINT_EMAILS,
            body=data,
            recipients=route.recipients(body),
            event_time=event_time,
            stale=stale,
            max_age=max_age,
            stale_policy=policy,
            priority=route.priority,
            batch_size=self._batch_size_for(route, body),
            # urgent mail never waits to fill a batch
            batch_linger=0.0
            if route.priority == Priority.URGENT
            else (route.batch_linger if route.batch_linger is not None else self._batch_linger),
        )

    def _batch_size_for(self, route: Route, body: dict[str, Any]) -> int:
        if UNBATCHABLE_FIELDS.intersection(body):
            return 1  # the batch endpoint refuses attachments and scheduled_at
        return route.batch_size if route.batch_size is not None else self._batch_size

    def _unknown(self, event_id: str, event_type: str) -> Rejected | Skipped:
        if self.table.unknown_type == "skip":
            self._counts["skipped"] += 1
            return Skipped(Reason.UNKNOWN_TYPE.value, event_id, event_type)
        return self._rejected(
            Reason.UNKNOWN_TYPE.value,
            f"no route for event type {event_type!r}",
            event_id,
            event_type,
            None,
        )

    def _rejected(
        self,
        reason: str,
        message: str,
        event_id: str | None,
        event_type: str | None,
        key: str | None,
    ) -> Rejected:
        self._counts["rejected"] += 1
        return Rejected(
            reason=reason,
            message=mask_addresses(message),
            event_id=event_id,
            event_type=event_type,
            idempotency_key=key,
        )


# -- freshness ------------------------------------------------------------------


def over_age(event_time: float | None, now: float, max_age: float) -> float | None:
    """The event's age at `now` when it is above `max_age`, else None.

    The one freshness rule, used at admission and before every attempt. An
    unknown time (None) counts as fresh (see `Preparer.prepare`).
    """
    if event_time is None:
        return None
    age = now - event_time
    return age if age > max_age else None


def event_time_for_age(
    event_time: float | None, timestamp_ms: int | None, *, now: float, check_future: bool = True
) -> float | None:
    """The time an event's age is measured from, or None when it is unknown.

    - a `time` at most `CLOCK_SKEW` ahead of `now` is used as it is;
    - a `time` further ahead is untrustworthy (a producer bug, or a date chosen
      to dodge the freshness guard): the Kafka record timestamp is used instead
      when it is sane (present, not -1, not itself beyond the skew allowance);
      otherwise InvalidEvent(invalid_envelope);
    - no `time`: the record timestamp when sane, else None (age unknown: the
      caller treats the event as fresh).

    `check_future=False` (dry runs) skips the future check and returns the
    event's own time.
    """
    record_time = None
    if timestamp_ms is not None and timestamp_ms >= 0:
        record_time = timestamp_ms / 1000.0
        if record_time > now + CLOCK_SKEW:
            record_time = None
    if event_time is None:
        return record_time
    if not check_future or event_time <= now + CLOCK_SKEW:
        return event_time
    if record_time is not None:
        return record_time
    ahead = event_time - now
    raise invalid(
        Reason.INVALID_ENVELOPE,
        f"event time is {ahead:.0f}s in the future (more than the {CLOCK_SKEW:.0f}s clock "
        "skew allowance) and the record has no usable Kafka timestamp to measure its age by",
    )


# -- files holding events (render, check, examples) ----------------------------


def record_from_file(raw: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Event file bytes -> (value, headers) as Kafka would deliver them.

    A structured-mode event is used as it is. A binary-mode record is written as
    `{"headers": {"ce_id": "...", ...}, "value": <data>}`.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw, []
    if isinstance(doc, dict) and "headers" in doc and set(doc) <= RECORD_KEYS:
        headers = doc["headers"]
        if isinstance(headers, dict):
            pairs = [(str(k), str(v).encode("utf-8")) for k, v in headers.items()]
            value = doc.get("value")
            if isinstance(value, str):
                return value.encode("utf-8"), pairs
            return (orjson.dumps(value) if value is not None else b""), pairs
    return raw, []
