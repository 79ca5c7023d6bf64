"""Publishing domain events to a topic, as CloudEvents (`resend-consumer publish`).

The command itself (flags, choosing the input, the summary line) is
`consumer.commands.publish`; this module builds and produces the records.

Input, one of:

- `--type TYPE --data JSON`: one event from arguments;
- `--file FILE`: a JSON object, a JSON array of them, or JSON lines;
- `--stdin` or `-`: JSON lines on stdin.

Each input object is either a full envelope (it has `specversion`, or both
`type` and `data`), a binary-mode record written as `{"headers": {"ce_id": ...},
"value": data}` (published in binary mode), or, with `--type`, just the data.
Missing envelope fields are filled in (`specversion` 1.0, a uuid4 `id`, `time`
now in UTC, `source`, `datacontenttype`); given ones are kept, so a published
example keeps its id and publishing it twice is a duplicate the service must
absorb. `--fresh-time` replaces a given `time` with now: the shipped examples
carry fixed times, which the service would find stale a day later.

All input is read and checked before the first record is sent: a bad line
(reported with its line number) publishes nothing, never half a batch.

The Kafka key is the value at `--key-field` (a dot path into the envelope), or
by default the event's `subject`, or else the first data field whose name ends
in `_id`: events of one entity land on one partition, in order.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Final

import orjson

from consumer.errors import BadInput
from consumer.events import CE_HEADER_PREFIX, CONTENT_TYPE_HEADER, REQUIRED_ATTRIBUTES
from consumer.settings import Settings

__all__ = [
    "Record",
    "build_envelope",
    "build_records",
    "is_binary_form",
    "kafka_key",
    "parse_input",
    "publish_records",
    "to_record",
]

DEFAULT_SOURCE: Final = "resend-consumer/publish"
SPECVERSION: Final = "1.0"
DATA_CONTENT_TYPE: Final = "application/json"
#: content-type of a structured-mode record (CloudEvents Kafka binding)
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json; charset=UTF-8"

# the envelope schema's pattern (schemas/envelope.schema.json)
_RFC3339: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z"
)
#: outstanding sends before we wait for acknowledgements (bounds memory)
_WINDOW: Final = 2000
#: redraw the progress bar at most this often (seconds)
_BAR_EVERY: Final = 0.1


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record, ready to send."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


# -- building events ---------------------------------------------------------------------


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_envelope(obj: dict[str, Any]) -> bool:
    return "specversion" in obj or ("type" in obj and "data" in obj)


def is_binary_form(obj: Any) -> bool:
    """A record written out as `{"headers": {"ce_...": ...}, "value": data}` (binary examples)."""
    return (
        isinstance(obj, dict)
        and set(obj) == {"headers", "value"}
        and isinstance(obj["headers"], dict)
        and "ce_specversion" in obj["headers"]
    )


def _from_binary_form(obj: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {}
    for name, value in obj["headers"].items():
        low = str(name).lower()
        if low == CONTENT_TYPE_HEADER:
            event["datacontenttype"] = value
        elif low.startswith(CE_HEADER_PREFIX):
            event[low.removeprefix(CE_HEADER_PREFIX)] = value
    event["data"] = obj["value"]
    return event


def build_envelope(
    obj: Any,
    *,
    event_type: str | None = None,
    source: str = DEFAULT_SOURCE,
    now: str | None = None,
    fresh_time: bool = False,
) -> dict[str, Any]:
    """A complete CloudEvents envelope from an input object; ValueError says what is wrong.

    With `event_type`, an object that is not an envelope is the event's data. With
    `fresh_time`, the event's `time` is now even when the input gives one.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if is_binary_form(obj):
        event = _from_binary_form(obj)
    elif _is_envelope(obj):
        event = dict(obj)
    elif event_type is not None:
        event = {"data": obj}
    else:
        raise ValueError("not an event (no type and data); pass --type to publish it as data")
    if event_type is not None and "type" not in event:
        event["type"] = event_type
    event.setdefault("specversion", SPECVERSION)
    event.setdefault("id", str(uuid.uuid4()))
    if fresh_time:
        event["time"] = now or _now_rfc3339()
    else:
        event.setdefault("time", now or _now_rfc3339())
    event.setdefault("source", source)
    if "data" in event:
        event.setdefault("datacontenttype", DATA_CONTENT_TYPE)
    for name in REQUIRED_ATTRIBUTES:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if event["specversion"] != SPECVERSION:
        raise ValueError(f"specversion must be {SPECVERSION!r}")
    if not isinstance(event.get("time"), str) or not _RFC3339.match(event["time"]):
        raise ValueError(f"time is not an RFC 3339 timestamp: {event.get('time')!r}")
    if "data" in event and not isinstance(event["data"], dict):
        raise ValueError("data must be a JSON object")
    if "subject" in event and not isinstance(event["subject"], str):
        raise ValueError("subject must be a string")
    return event


def kafka_key(event: dict[str, Any], key_field: str | None = None) -> bytes | None:
    """The record key: `key_field` (dot path), else `subject`, else data's first `*_id`."""
    if key_field:
        value: Any = event
        for part in key_field.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise ValueError(f"key field {key_field!r} is missing")
        if value is None or isinstance(value, dict | list):
            raise ValueError(f"key field {key_field!r} is not a scalar")
        return _scalar(value).encode()
    subject = event.get("subject")
    if isinstance(subject, str) and subject:
        return subject.encode()
    data = event.get("data")
    if isinstance(data, dict):
        for name, value in data.items():
            if name.endswith("_id") and value is not None and not isinstance(value, dict | list):
                return _scalar(value).encode()
    return None


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _exact(value: bytes) -> bytes:
    # orjson's result keeps its 4 KiB working buffer; a right-sized copy keeps
    # 100k buffered records at tens of MB instead of ~450 MB.
    return bytes(memoryview(value))


def to_record(event: dict[str, Any], *, key: bytes | None, binary: bool = False) -> Record:
    """Encode one envelope: structured (one JSON value) or binary (ce_ headers + data)."""
    if not binary:
        value = _exact(orjson.dumps(event))
        return Record(key, value, ((CONTENT_TYPE_HEADER, STRUCTURED_CONTENT_TYPE.encode()),))
    headers: list[tuple[str, bytes]] = []
    for name, attr in event.items():
        if name == "data":
            continue
        if name == "datacontenttype":
            headers.append((CONTENT_TYPE_HEADER, str(attr).encode()))
        elif attr is not None:
            text = attr if isinstance(attr, str) else orjson.dumps(attr).decode()
            headers.append((CE_HEADER_PREFIX + name, text.encode()))
    data = _exact(orjson.dumps(event["data"])) if "data" in event else b""
    return Record(key, data, tuple(headers))


# -- reading input -----------------------------------------------------------------------


def _substitute(value: Any, n: int) -> Any:
    """Replace `{n}` in every string of value (makes --count copies distinct)."""
    if isinstance(value, str):
        return value.replace("{n}", str(n))
    if isinstance(value, dict):
        return {k: _substitute(v, n) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, n) for v in value]
    return value


def _json_lines(lines: Iterable[str]) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    items: list[tuple[int, Any]] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append((number, orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg})"))
    return items, problems


def parse_input(text: str, *, lines: bool) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """(line number, object) pairs and (line number, problem) pairs from input text.

    With `lines`, every non-empty line is one object. Otherwise the text is one
    JSON value (an object or an array); if it is not, it is read as JSON lines.
    """
    if lines:
        return _json_lines(text.splitlines())
    try:
        whole = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        items, problems = _json_lines(text.splitlines())
        if problems and not items:
            # not JSON lines either: one malformed document, report where it breaks
            return [], [(exc.lineno, f"not JSON ({exc.msg})")]
        return items, problems
    if isinstance(whole, list):
        # an array: its items are numbered from 1 in messages
        return list(enumerate(whole, start=1)), []
    return [(1, whole)], []


def build_records(
    items: Sequence[tuple[int, Any]],
    *,
    event_type: str | None,
    source: str,
    key_field: str | None,
    binary: bool,
    count: int = 1,
    fresh_time: bool = False,
) -> list[Record]:
    """Envelopes and records for every input object (`count` copies each); BadInput if any fail."""
    records: list[Record] = []
    problems: list[tuple[int, str]] = []
    for number, obj in items:
        for n in range(count):
            copy = _substitute(obj, n) if count > 1 else obj
            try:
                event = build_envelope(
                    copy, event_type=event_type, source=source, fresh_time=fresh_time
                )
                # a record given in binary form stays binary, whatever --binary says
                as_binary = binary or is_binary_form(copy)
                records.append(to_record(event, key=kafka_key(event, key_field), binary=as_binary))
            except ValueError as exc:
                problems.append((number, str(exc)))
                break
    if problems:
        raise BadInput(problems)
    return records


# -- sending -----------------------------------------------------------------------------


class _Bar:
    """A plain progress bar on stderr, redrawn at most every 0.1 s."""

    def __init__(self, total: int, stream: IO[str], *, enabled: bool) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _BAR_EVERY:
            return
        self._drawn = now
        share = done / self.total
        width = 30
        filled = int(share * width)
        rate = done / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"{share:4.0%} {rate:,.0f}/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _producer(settings: Settings) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        **settings.kafka_client_kwargs(),
        # idempotent + acks=all: a retried batch is never written twice
        enable_idempotence=True,
        acks="all",
        # batching for throughput on large inputs; 10 ms is invisible to a human
        linger_ms=10,
        max_batch_size=256 * 1024,
    )


async def publish_records(
    settings: Settings,
    topic: str,
    records: Sequence[Record],
    *,
    stop: asyncio.Event | None = None,
    progress: IO[str] | None = None,
) -> int:
    """Send records in order and wait for every acknowledgement; the number acknowledged.

    Stops early (after the records already sent are acknowledged) when stop is set.
    """
    bar = _Bar(len(records), progress or sys.stderr, enabled=progress is not None)
    producer = _producer(settings)
    acked = 0
    try:
        # inside the try: a failed start must still close the producer
        await producer.start()
        pending: list[asyncio.Future[Any]] = []
        for record in records:
            if stop is not None and stop.is_set():
                break
            pending.append(
                await producer.send(
                    topic, value=record.value, key=record.key, headers=list(record.headers)
                )
            )
            if len(pending) >= _WINDOW:
                await asyncio.gather(*pending)
                acked += len(pending)
                pending.clear()
                bar.update(acked)
        await asyncio.gather(*pending)
        acked += len(pending)
        bar.update(acked, force=True)
    finally:
        bar.close()
        await producer.stop()
    return acked
