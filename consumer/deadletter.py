"""Dead letters: write permanent failures to a Kafka topic, and replay them.

A dead letter is the original record (key, value and headers; original header
names starting with `dlq.` or `original.` are escaped under `original.`)
followed by `dlq.*` headers that say why it failed and where it came from.
A dead letter is always writable: it always has a key (the source coordinates
`topic/partition/offset` when the record had none, so repeats are easy to spot),
and `build_record` sizes it against the dead-letter topic's real limit
(`max.message.bytes`, read once per topic by `TopicLimits`) before anything is
sent, leaving the value out when it would not fit. Never sending an oversized
record matters: after a broker-side size failure an idempotent producer answers
every later write with `OutOfOrderSequenceNumber`, and a transactional one
aborts its transaction.

`DeadLetterWriter.write` returns only once the broker acknowledged the record
(the pipeline's producer uses acks=all and idempotence), because the source
offset is committed right after; any failure raises `DeadLetterUnavailable`,
a fatal error, so the service pauses instead of skipping the event.
`consumer.committer` writes dead letters and the source offset in one Kafka
transaction instead, so readers of a dead-letter topic use read_committed.

Reading a dead letter back (`dlq_values`, `original_headers`, `original_key`)
serves `resend-consumer dlq replay` (`consumer.commands.dlq`), which
republishes each record's key, value and original headers (the `dlq.*` ones
stripped, escaped names restored, so byte for byte) to its source topic, so
the replayed event derives the same idempotency key as the first time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson
from aiokafka.errors import MessageSizeTooLargeError

from consumer import __version__
from consumer.errors import DeadLetterUnavailable
from consumer.redact import mask_addresses, redact_secrets
from consumer.settings import Secret

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

# -- header names (declared once) -------------------------------------------------

DLQ_PREFIX: Final = "dlq."
#: a source record's own headers named `dlq.*` (or already starting with this prefix)
#: are written under it, so no producer can pre-set the service's dlq.* headers; replay
#: strips it again and restores the original names byte for byte
ESCAPE_PREFIX: Final = "original."
H_REASON: Final = "dlq.reason"
H_ERROR_NAME: Final = "dlq.error_name"
H_HTTP_STATUS: Final = "dlq.http_status"
H_MESSAGE: Final = "dlq.message"
H_ATTEMPTS: Final = "dlq.attempts"
H_FIRST_ATTEMPT_AT: Final = "dlq.first_attempt_at"
H_LAST_ATTEMPT_AT: Final = "dlq.last_attempt_at"
H_SOURCE_TOPIC: Final = "dlq.source_topic"
H_SOURCE_PARTITION: Final = "dlq.source_partition"
H_SOURCE_OFFSET: Final = "dlq.source_offset"
H_IDEMPOTENCY_KEY: Final = "dlq.idempotency_key"
H_EVENT_TYPE: Final = "dlq.event_type"
H_SERVICE_VERSION: Final = "dlq.service_version"
H_DEAD_LETTERED_AT: Final = "dlq.dead_lettered_at"
#: set when the original record was too large for the dead-letter topic: its value
#: (and its original headers) were left out; the header holds the value's size in bytes
H_VALUE_OMITTED: Final = "dlq.value_omitted"
#: set when the dead letter's key is not the original key (the record had none, or it
#: was too large): the key is the source coordinates; the header holds the original
#: key's size in bytes, or "none"
H_KEY_REPLACED: Final = "dlq.key_replaced"

#: every dlq.* header, in the order they are written
DLQ_HEADERS: Final[tuple[str, ...]] = (
    H_REASON,
    H_ERROR_NAME,
    H_HTTP_STATUS,
    H_MESSAGE,
    H_ATTEMPTS,
    H_FIRST_ATTEMPT_AT,
    H_LAST_ATTEMPT_AT,
    H_SOURCE_TOPIC,
    H_SOURCE_PARTITION,
    H_SOURCE_OFFSET,
    H_IDEMPOTENCY_KEY,
    H_EVENT_TYPE,
    H_SERVICE_VERSION,
    H_DEAD_LETTERED_AT,
)

#: CloudEvents binary-mode headers read by replay when dlq.* ones are missing
CE_TYPE: Final = "ce_type"
CE_TIME: Final = "ce_time"

#: the broker's default `message.max.bytes` (1 MiB + 12), used when a topic's own
#: `max.message.bytes` cannot be read
DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_588

MAX_MESSAGE_CHARS: Final = 1000


def message_text(text: str, secrets: Iterable[str] = ()) -> str:
    """A `dlq.message`: addresses masked, credentials redacted, at most MAX_MESSAGE_CHARS."""
    # Resend's error text may quote recipients: masked as the logs mask them
    text = redact_secrets(mask_addresses(text), secrets)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def rfc3339(ts: float) -> str:
    """Epoch seconds -> '2026-01-02T03:04:05.678Z' (UTC, milliseconds)."""
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """RFC 3339 (a missing offset means UTC) -> epoch seconds."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- writing ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter:
    """A record that can never succeed, with what is known about why."""

    source_topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    reason: str
    error_name: str | None
    http_status: int | None
    message: str
    attempts: int
    first_attempt_at: float | None
    last_attempt_at: float | None
    idempotency_key: str | None
    event_type: str | None


class Written(NamedTuple):
    """Where a dead letter landed."""

    topic: str
    partition: int
    offset: int


def dead_letter_headers(
    letter: DeadLetter,
    *,
    dead_lettered_at: float,
    service_version: str = __version__,
    secrets: Iterable[str] = (),
) -> list[tuple[str, bytes]]:
    """The original headers followed by the dlq.* ones; unknown values are left out."""
    values: dict[str, str | None] = {
        H_REASON: letter.reason,
        H_ERROR_NAME: letter.error_name,
        H_HTTP_STATUS: None if letter.http_status is None else str(letter.http_status),
        H_MESSAGE: message_text(letter.message, secrets),
        H_ATTEMPTS: str(letter.attempts),
        H_FIRST_ATTEMPT_AT: _time_or_none(letter.first_attempt_at),
        H_LAST_ATTEMPT_AT: _time_or_none(letter.last_attempt_at),
        H_SOURCE_TOPIC: letter.source_topic,
        H_SOURCE_PARTITION: str(letter.partition),
        H_SOURCE_OFFSET: str(letter.offset),
        H_IDEMPOTENCY_KEY: letter.idempotency_key,
        H_EVENT_TYPE: letter.event_type,
        H_SERVICE_VERSION: service_version,
        H_DEAD_LETTERED_AT: rfc3339(dead_lettered_at),
    }
    headers = escape_headers(letter.headers)
    headers.extend((name, value.encode()) for name, value in values.items() if value is not None)
    return headers


def escape_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """A source record's headers with `dlq.*` and `original.*` names moved under `original.`.

    Only the service writes `dlq.*` headers on a dead letter: a producer's
    `dlq.event_type` must not pass for the service's own when the event could
    not be decoded (it would fool `dlq replay --type`). Escaping `original.*`
    too keeps the mapping reversible: `restore_headers` undoes it exactly.
    """
    return [
        (ESCAPE_PREFIX + name, value)
        if name.startswith((DLQ_PREFIX, ESCAPE_PREFIX))
        else (name, value)
        for name, value in headers
    ]


def restore_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The source record's headers, in order, from a dead letter's (inverse of escape)."""
    return [
        (name.removeprefix(ESCAPE_PREFIX), value)
        for name, value in headers
        if not name.startswith(DLQ_PREFIX)
    ]


def _time_or_none(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


class DeadLetterRecord(NamedTuple):
    """What is sent to the dead-letter topic: never without a key, never over the limit."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]
    #: the original value was left out to fit the topic's limit
    value_omitted: bool


def coordinates_key(letter: DeadLetter) -> bytes:
    """`topic/partition/offset` of the source record: the key of a keyless dead letter."""
    return f"{letter.source_topic}/{letter.partition}/{letter.offset}".encode()


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """Upper bound of the record batch holding only this record, as the broker counts it."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    return size


def build_record(
    letter: DeadLetter,
    *,
    limit: int,
    dead_lettered_at: float,
    secrets: Iterable[str] = (),
    omit_value: bool = False,
) -> DeadLetterRecord:
    """The dead letter for `letter`, sized to fit `limit` bytes (the topic's and producer's).

    The original key, value and headers are kept when they fit. A record without a
    key gets its source coordinates as key (aiokafka refuses a record with neither
    key nor value, and the key makes a repeat recognisable). When the whole would not
    fit (or `omit_value` is set), the value and the original headers are left out
    (`dlq.value_omitted`), and then a key too large on its own is replaced by the
    coordinates too.
    """
    secrets = tuple(secrets)
    headers = dead_letter_headers(letter, dead_lettered_at=dead_lettered_at, secrets=secrets)
    key = letter.key
    if key is None:
        key = coordinates_key(letter)
        headers.append((H_KEY_REPLACED, b"none"))
    if not omit_value and record_size(key, letter.value, headers) <= limit:
        return DeadLetterRecord(key, letter.value, headers, value_omitted=False)
    slim = replace(letter, value=None, headers=())
    headers = dead_letter_headers(slim, dead_lettered_at=dead_lettered_at, secrets=secrets)
    headers.append((H_VALUE_OMITTED, str(len(letter.value or b"")).encode()))
    key = letter.key
    if key is None or record_size(key, None, headers) > limit:
        headers.append((H_KEY_REPLACED, b"none" if key is None else str(len(key)).encode()))
        key = coordinates_key(letter)
    return DeadLetterRecord(key, None, headers, value_omitted=True)


class TopicLimits:
    """The largest record each dead-letter topic accepts, read once per topic.

    The limit is the topic's `max.message.bytes` (its override, else the broker's
    `message.max.bytes`, as the broker reports it), capped by the producer's
    `max_request_size`. When the config cannot be read (no DescribeConfigs ACL, a
    broker away) the broker default is assumed and not cached, so a later call reads
    it again.
    """

    def __init__(
        self,
        *,
        client: dict[str, Any],
        max_request_size: int = 1_048_576,
        default: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float = 10.0,
    ) -> None:
        self._client = client
        self._max_request_size = max_request_size
        self._default = default
        self._timeout = timeout
        self._known: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<TopicLimits known={len(self._known)}>"

    async def get(self, topic: str) -> int:
        """Largest record, in bytes as `record_size` counts them, that `topic` accepts."""
        if topic not in self._known:
            async with self._lock:
                if topic not in self._known:
                    found = await self._read(topic)
                    if found is None:
                        return min(self._default, self._max_request_size)
                    self._known[topic] = found
        return min(self._known[topic], self._max_request_size)

    async def _read(self, topic: str) -> int | None:
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
        from aiokafka.errors import KafkaError

        admin = AIOKafkaAdminClient(**self._client, request_timeout_ms=int(self._timeout * 1000))
        try:
            await asyncio.wait_for(admin.start(), self._timeout)
            wanted = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
            answers = await asyncio.wait_for(admin.describe_configs([wanted]), self._timeout)
        except (KafkaError, TimeoutError, OSError):
            return None
        finally:
            await admin.close()
        for answer in answers:
            for error_code, _, _, name, entries in answer.resources:
                if name != topic or error_code != 0:
                    continue
                for entry in entries:
                    if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                        return int(entry[1])
        return None


class DeadLetterWriter:
    """Writes dead letters and waits for the broker's acknowledgement.

    The producer belongs to the caller (created with enable_idempotence=True and
    acks="all", started and stopped by the pipeline). Each letter is sized with
    `build_record` against `limits` (the broker default when none is given).
    """

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        topic_for: Callable[[str], str],
        timeout: float = 60.0,
        secrets: Iterable[Secret | None] = (),
        clock: Callable[[], float] = time.time,
        limits: TopicLimits | None = None,
    ) -> None:
        self._producer = producer
        self._topic_for = topic_for
        self._timeout = timeout
        self._secrets = tuple(s.get() for s in secrets if s)
        self._clock = clock
        self._limits = limits
        from aiokafka.errors import KafkaError

        # What a broken or unreachable Kafka raises; anything else is a bug and propagates.
        self._failures: tuple[type[BaseException], ...] = (KafkaError, TimeoutError, OSError)
        self.written = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<DeadLetterWriter written={self.written} failed={self.failed}>"

    async def write(self, letter: DeadLetter) -> Written:
        """Write `letter` and wait for the ack; DeadLetterUnavailable on any failure."""
        topic = self._topic_for(letter.source_topic)
        try:
            limit = await self._limit(topic)
            record = build_record(
                letter, limit=limit, dead_lettered_at=self._clock(), secrets=self._secrets
            )
            try:
                meta = await asyncio.wait_for(self._send(topic, record), self._timeout)
            except MessageSizeTooLargeError:
                # The limit was wrong (the topic's config changed since it was read):
                # write the letter without its value rather than pause for good.
                record = build_record(
                    letter,
                    limit=limit,
                    dead_lettered_at=self._clock(),
                    secrets=self._secrets,
                    omit_value=True,
                )
                meta = await asyncio.wait_for(self._send(topic, record), self._timeout)
        except self._failures as exc:
            self.failed += 1
            raise unavailable(topic, letter, exc, self._timeout, self._secrets) from None
        self.written += 1
        return Written(meta.topic, meta.partition, meta.offset)

    async def _limit(self, topic: str) -> int:
        if self._limits is None:
            return min(DEFAULT_MAX_MESSAGE_BYTES, 1_048_576)
        return await self._limits.get(topic)

    async def _send(self, topic: str, record: DeadLetterRecord) -> Any:
        ack = await self._producer.send(
            topic, value=record.value, key=record.key, headers=record.headers
        )
        return await ack


def unavailable(
    topic: str, letter: DeadLetter, exc: BaseException, timeout: float, secrets: Iterable[str]
) -> DeadLetterUnavailable:
    """The DeadLetterUnavailable for a failed write of `letter`, its text scrubbed."""
    # Kafka client errors carry no credentials, but scrub anyway: this text is
    # logged and may end up in a readiness report.
    if isinstance(exc, TimeoutError):
        name, detail = "TimeoutError", f"no acknowledgement within {timeout:g}s"
    else:
        name, detail = type(exc).__name__, redact_secrets(str(exc), secrets)
    return DeadLetterUnavailable(
        f"dead-letter topic {topic!r} not written for {letter.source_topic}"
        f"[{letter.partition}]@{letter.offset}: {name}" + (f": {detail}" if detail else "")
    )


# -- reading ------------------------------------------------------------------------


def dlq_values(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """The dlq.* headers of a record as text; a repeated name keeps its last value."""
    out: dict[str, str] = {}
    for name, value in headers:
        if name.startswith(DLQ_PREFIX):
            out[name] = (value or b"").decode("utf-8", "replace")
    return out


def original_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The headers the record had before it was dead-lettered, in their order, byte for byte."""
    return restore_headers(headers)


def event_type_of(meta: dict[str, str], headers: Sequence[tuple[str, bytes]]) -> str | None:
    """The event type: the service's `dlq.event_type`, else the record's own `ce_type`."""
    if meta.get(H_EVENT_TYPE):
        return meta[H_EVENT_TYPE]
    for name, value in headers:
        if name == CE_TYPE and value:
            return value.decode("utf-8", "replace")
    return None


def event_time_of(headers: Sequence[tuple[str, bytes]], value: bytes | None) -> float | None:
    """The CloudEvents `time` (binary-mode header or structured-mode field), if readable."""
    text: str | None = None
    for name, raw in headers:
        if name == CE_TIME and raw:
            text = raw.decode("utf-8", "replace")
    if text is None and value and value[:1] == b"{":
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        found = doc.get("time") if isinstance(doc, dict) else None
        text = found if isinstance(found, str) else None
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


def meta_time(meta: dict[str, str], name: str) -> float | None:
    """A dlq.* time header (RFC 3339) as epoch seconds; None when missing or unreadable."""
    text = meta.get(name)
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


async def topic_partitions(client: dict[str, Any], topic: str) -> list[int]:
    """Partition numbers of `topic`; empty when it does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    # A consumer only learns a topic's partitions by subscribing; the admin client's
    # metadata request answers directly and needs no group.
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        part["partition"]
        for found in described
        if found["topic"] == topic and found["error_code"] == 0
        for part in found["partitions"]
    )


def original_key(
    meta: dict[str, str], key: bytes | None, value: bytes | None
) -> tuple[bytes | None, str | None]:
    """The source record's key, or why the source record cannot be rebuilt."""
    if H_VALUE_OMITTED in meta:
        return None, "its value was too large and was left out when it was dead-lettered"
    replaced = meta.get(H_KEY_REPLACED)
    if replaced is None:
        return key, None
    if replaced != "none":
        return None, "its key was too large and was left out when it was dead-lettered"
    if value is None:
        return None, "the source record had neither key nor value"
    return None, None
