"""`resend-consumer dlq replay`: republish dead letters to their source topic.

The replay reads a dead-letter topic from its beginning up to the end offsets
seen at start, filters, and republishes each record's key, value and original
headers (the `dlq.*` ones stripped, escaped names restored, so byte for byte)
to its source topic, so the replayed event derives the same idempotency key as
the first time. Reading a dead letter (its `dlq.*` headers, the original
record) is `consumer.deadletter`'s; choosing, warning and counting is here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from consumer.deadletter import (
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_FIRST_ATTEMPT_AT,
    H_IDEMPOTENCY_KEY,
    H_REASON,
    H_SOURCE_TOPIC,
    dlq_values,
    event_time_of,
    event_type_of,
    meta_time,
    original_headers,
    original_key,
    parse_time,
    topic_partitions,
)
from consumer.exitcodes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from consumer.prepare import CLOCK_SKEW
from consumer.routes import MAX_AGE_LIMIT as IDEMPOTENCY_WINDOW
from consumer.settings import Settings, parse_duration

__all__ = ["ReplayArgs", "ReplaySummary", "add_arguments", "default_dlq_topic", "replay"]


# -- flags --------------------------------------------------------------------------


def _time_arg(text: str) -> float:
    """RFC 3339, or a duration meaning that long ago ('2h', '30m', '1d')."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use RFC 3339 like 2026-01-02T03:04:05Z, or 2h, 30m, 1d ago)"
        ) from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `resend-consumer dlq replay`."""
    parser.add_argument(
        "--from-topic",
        help="dead-letter topic to read (default DLQ_TOPIC, else the first KAFKA_TOPICS + .dlq)",
    )
    parser.add_argument(
        "--to-topic",
        help="republish here instead of each record's dlq.source_topic",
    )
    parser.add_argument(
        "--reason",
        action="append",
        default=[],
        help="replay only this dlq.reason (repeatable)",
    )
    parser.add_argument(
        "--type",
        dest="event_type",
        action="append",
        default=[],
        help="replay only this event type (repeatable)",
    )
    parser.add_argument(
        "--since",
        type=_time_arg,
        help="only dead letters written at or after this time (RFC 3339, or 2h = 2 hours ago)",
    )
    parser.add_argument(
        "--until",
        type=_time_arg,
        help="only dead letters written before this time (RFC 3339, or 30m = 30 minutes ago)",
    )
    parser.add_argument("--limit", type=_positive, help="replay at most N records")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; send nothing"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayArgs:
    """What `dlq replay` is asked: where from and to, which records, and whether to send.

    An empty `reasons` or `event_types` keeps every record; `since`/`until` are
    epoch seconds of `dlq.dead_lettered_at` (at or after / before).
    """

    from_topic: str | None = None
    to_topic: str | None = None
    reasons: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    limit: int | None = None
    dry_run: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ReplayArgs:
        return cls(
            from_topic=ns.from_topic,
            to_topic=ns.to_topic,
            reasons=frozenset(ns.reason or ()),
            event_types=frozenset(ns.event_type or ()),
            since=ns.since,
            until=ns.until,
            limit=ns.limit,
            dry_run=ns.dry_run,
        )

    def keeps(self, meta: dict[str, str], event_type: str | None, written_at: float) -> bool:
        """Whether the filters let this dead letter through."""
        if self.reasons and meta.get(H_REASON) not in self.reasons:
            return False
        if self.event_types and event_type not in self.event_types:
            return False
        if self.since is not None and written_at < self.since:
            return False
        return self.until is None or written_at < self.until


# -- the command --------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ReplaySummary:
    """Counts printed at the end of a replay."""

    read: int = 0
    replayed: int = 0
    skipped: int = 0
    warned: int = 0
    unroutable: int = 0
    incomplete: int = 0

    def line(self, *, dry_run: bool) -> str:
        verb = "would replay" if dry_run else "replayed"
        text = (
            f"{verb} {self.replayed}, skipped by filter {self.skipped}, "
            f"warned {self.warned} (of {self.read} read)"
        )
        if self.unroutable:
            text += f", {self.unroutable} without a source topic (not replayed)"
        if self.incomplete:
            text += f", {self.incomplete} without their original record (not replayed)"
        return text


def _warnings(
    meta: dict[str, str],
    headers: Sequence[tuple[str, bytes]],
    value: bytes | None,
    written_at: float,
    settings: Settings,
    now: float,
) -> list[str]:
    out: list[str] = []
    # An email may have reached Resend only if an attempt was made; past 24 h Resend
    # no longer knows its key, so a replay could send a second email.
    if meta.get(H_ATTEMPTS, "1") != "0":
        first = meta_time(meta, H_FIRST_ATTEMPT_AT)
        label = "first attempt"
        if first is None:
            first, label = written_at, "dead-lettered"
        if now - first > IDEMPOTENCY_WINDOW:
            out.append(
                f"{label} {(now - first) / 3600:.1f}h ago is past Resend's 24h "
                "idempotency window: a second email is possible if the first reached Resend"
            )
    event_time = event_time_of(headers, value)
    if event_time is not None and event_time > now + CLOCK_SKEW:
        out.append(
            f"event time is {(event_time - now) / 3600:.1f}h in the future: the service "
            "measures its age from the record timestamp, or dead-letters it again"
        )
    elif event_time is not None and now - event_time > settings.max_event_age:
        out.append(
            f"event time {(now - event_time) / 3600:.1f}h ago is past MAX_EVENT_AGE: "
            f"STALE_POLICY={settings.stale_policy} will apply again"
        )
    return out


def default_dlq_topic(settings: Settings) -> str | None:
    if settings.dlq_topic:
        return settings.dlq_topic
    if settings.kafka_topics:
        return settings.dlq_topic_for(settings.kafka_topics[0])
    return None


@dataclass(kw_only=True, slots=True)
class _Replay:
    """One replay run: its arguments, where it writes, and what it has seen so far."""

    args: ReplayArgs
    settings: Settings
    #: None on a dry run: the records are printed instead
    producer: Any
    out: TextIO
    err: TextIO
    #: the wall clock the warnings measure ages against (read once, after seeking)
    now: float = 0.0
    summary: ReplaySummary = field(default_factory=ReplaySummary)
    acks: list[asyncio.Future[Any]] = field(default_factory=list)

    async def one(self, record: Any) -> bool:
        """Filter, warn about and republish one dead letter; True if it counts as replayed."""
        summary, err = self.summary, self.err
        headers: Sequence[tuple[str, bytes]] = record.headers or ()
        meta = dlq_values(headers)
        event_type = event_type_of(meta, headers)
        written_at = meta_time(meta, H_DEAD_LETTERED_AT) or record.timestamp / 1000.0
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        if not self.args.keeps(meta, event_type, written_at):
            summary.skipped += 1
            return False
        target = self.args.to_topic or meta.get(H_SOURCE_TOPIC)
        if not target:
            summary.unroutable += 1
            print(f"dlq replay: {where}: no {H_SOURCE_TOPIC} header and no --to-topic", file=err)
            return False
        key, missing = original_key(meta, record.key, record.value)
        if missing:
            summary.incomplete += 1
            print(f"dlq replay: {where}: {missing}: not replayed", file=err)
            return False
        warnings = _warnings(meta, headers, record.value, written_at, self.settings, self.now)
        if warnings:
            summary.warned += 1
            for warning in warnings:
                print(f"dlq replay: warning: {where}: {warning}", file=err)
        if self.producer is None:
            print(
                f"{where} -> {target} reason={meta.get(H_REASON, '-')} "
                f"type={event_type or '-'} idempotency_key={meta.get(H_IDEMPOTENCY_KEY, '-')}",
                file=self.out,
            )
        else:
            self.acks.append(
                await self.producer.send(
                    target, key=key, value=record.value, headers=original_headers(headers)
                )
            )
        summary.replayed += 1
        return True

    async def settle(self) -> None:
        """Wait for every acknowledgement asked for so far."""
        pending = list(self.acks)
        self.acks.clear()
        for ack in pending:
            await ack


async def replay(
    settings: Settings,
    args: ReplayArgs,
    stop: asyncio.Event,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Republish dead letters to their source topic; 0 on success."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import KafkaError

    out = out or sys.stdout
    err = err or sys.stderr
    source = args.from_topic or default_dlq_topic(settings)
    if not source:
        print("dlq replay: no dead-letter topic: pass --from-topic or set DLQ_TOPIC", file=err)
        return EXIT_USAGE
    client = settings.kafka_client_kwargs()
    consumer = AIOKafkaConsumer(
        **client,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = None
    if not args.dry_run:
        producer = AIOKafkaProducer(**client, enable_idempotence=True, acks="all", linger_ms=5)
    run = _Replay(args=args, settings=settings, producer=producer, out=out, err=err)
    summary = run.summary
    try:
        await consumer.start()
        if producer is not None:
            await producer.start()
        partitions = await topic_partitions(client, source)
        if not partitions:
            print(f"dlq replay: topic {source!r} does not exist", file=err)
            return EXIT_FAILURE
        tps = [TopicPartition(source, p) for p in partitions]
        consumer.assign(tps)
        # Stop at the end seen now: records dead-lettered during the replay (perhaps
        # the replayed ones failing again) are left for a later run.
        ends: dict[Any, int] = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        run.now = time.time()
        while remaining and not stop.is_set():
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=1000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    summary.read += 1
                    done = await run.one(record)
                    if done and args.limit is not None and summary.replayed >= args.limit:
                        remaining.clear()
                        break
                if not remaining:
                    break
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            # Bound memory and surface a broken target early.
            if len(run.acks) >= 1000:
                await run.settle()
        await run.settle()
    except KafkaError as exc:
        name, text = type(exc).__name__, str(exc)
        shown = text if text.startswith(name) else f"{name}: {text}"
        print(f"dlq replay: Kafka error: {shown}", file=err)
        print(f"dlq replay: stopped after: {summary.line(dry_run=args.dry_run)}", file=err)
        return EXIT_FAILURE
    finally:
        for ack in run.acks:
            ack.cancel()
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    print(summary.line(dry_run=args.dry_run), file=out)
    if stop.is_set():
        print("dlq replay: interrupted before the end of the topic", file=err)
        return EXIT_INTERRUPTED
    if summary.unroutable:
        return EXIT_FAILURE
    return EXIT_OK
