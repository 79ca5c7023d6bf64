"""Dead letters against a real Kafka broker: headers, failure to write, and replay."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer import __version__
from consumer.commands.dlq import ReplayArgs, add_arguments
from consumer.commands.dlq import replay as replay_command
from consumer.deadletter import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DLQ_HEADERS,
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR_NAME,
    H_EVENT_TYPE,
    H_FIRST_ATTEMPT_AT,
    H_HTTP_STATUS,
    H_IDEMPOTENCY_KEY,
    H_KEY_REPLACED,
    H_LAST_ATTEMPT_AT,
    H_MESSAGE,
    H_REASON,
    H_SERVICE_VERSION,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    H_VALUE_OMITTED,
    MAX_MESSAGE_CHARS,
    DeadLetter,
    DeadLetterWriter,
    TopicLimits,
    build_record,
    coordinates_key,
    dead_letter_headers,
    dlq_values,
    message_text,
    original_headers,
    record_size,
    rfc3339,
)
from consumer.errors import DeadLetterUnavailable, FatalError
from consumer.redact import REDACTED
from consumer.settings import Secret, Settings
from tests.conftest import ROOT, NewTopicFactory, Produce
from tests.pipeline_support import read_to_end

API_KEY = "re_AbCdEf123456_SuperSecretKeyValue99"
NOW = time.time()
HOUR = 3600.0


def letter(**changes: Any) -> DeadLetter:
    fields: dict[str, Any] = {
        "source_topic": "orders",
        "partition": 2,
        "offset": 41,
        "key": b"order-1",
        "value": b'{"id":"e1"}',
        "headers": [("ce_type", b"order.placed"), ("trace", b"\x00\xff")],
        "reason": "validation_error",
        "error_name": "validation_error",
        "http_status": 422,
        "message": "The `to` field is invalid.",
        "attempts": 3,
        "first_attempt_at": NOW - 60,
        "last_attempt_at": NOW - 5,
        "idempotency_key": "order-confirmation:o-1",
        "event_type": "order.placed",
    }
    fields.update(changes)
    return DeadLetter(**fields)


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """The producer the pipeline would give the writer: idempotent, acks=all."""
    prod = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=3000,
    )
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


# -- headers (pure) ---------------------------------------------------------------


def test_scrub_removes_keys_tokens_and_known_secrets() -> None:
    """Resend keys, bearer tokens, key=value secrets and given values are redacted."""
    text = (
        f"bad key {API_KEY}; Authorization: Bearer abc.def-ghi; password=hunter2 "
        '{"api_key": "sk-live-1"} sasl pw plainvalue'
    )
    cleaned = message_text(text, secrets=["plainvalue"])
    for leaked in (API_KEY, "abc.def-ghi", "hunter2", "sk-live-1", "plainvalue"):
        assert leaked not in cleaned
    assert f"re_{REDACTED}" in cleaned
    assert f"Bearer {REDACTED}" in cleaned


def test_long_message_is_truncated() -> None:
    """Messages are capped at MAX_MESSAGE_CHARS characters."""
    assert len(message_text("x" * 10_000)) == MAX_MESSAGE_CHARS


def test_unknown_values_are_left_out_and_originals_come_first() -> None:
    """None fields produce no header; original headers precede the dlq.* ones unchanged."""
    headers = dead_letter_headers(
        letter(error_name=None, http_status=None, first_attempt_at=None, last_attempt_at=None),
        dead_lettered_at=NOW,
    )
    names = [name for name, _ in headers]
    assert headers[:2] == [("ce_type", b"order.placed"), ("trace", b"\x00\xff")]
    for absent in (H_ERROR_NAME, H_HTTP_STATUS, H_FIRST_ATTEMPT_AT, H_LAST_ATTEMPT_AT):
        assert absent not in names
    assert names[2:] == [h for h in DLQ_HEADERS if h in names]


def test_record_that_fits_is_kept_byte_for_byte() -> None:
    """A keyed letter under the limit keeps its key, value and original headers."""
    sent = letter()
    record = build_record(sent, limit=DEFAULT_MAX_MESSAGE_BYTES, dead_lettered_at=NOW)
    assert (record.key, record.value, record.value_omitted) == (sent.key, sent.value, False)
    assert record.headers[:2] == list(sent.headers)
    assert H_KEY_REPLACED not in dict(record.headers)


def test_keyless_record_gets_its_source_coordinates_as_key() -> None:
    """No key (even with no value): the key is topic/partition/offset, marked dlq.key_replaced."""
    sent = letter(key=None, value=None, headers=[])
    record = build_record(sent, limit=DEFAULT_MAX_MESSAGE_BYTES, dead_lettered_at=NOW)
    assert record.key == coordinates_key(sent) == b"orders/2/41"
    assert record.value is None
    assert dict(record.headers)[H_KEY_REPLACED] == b"none"


def test_record_over_the_limit_leaves_its_value_out_before_sending() -> None:
    """Value plus headers over the limit: value and original headers left out, under the limit."""
    limit = 10_000
    sent = letter(value=b"x" * limit)
    record = build_record(sent, limit=limit, dead_lettered_at=NOW)
    assert record.value is None
    assert record.value_omitted
    assert record.key == sent.key
    assert dict(record.headers)[H_VALUE_OMITTED] == str(limit).encode()
    assert ("trace", b"\x00\xff") not in record.headers
    assert record_size(record.key, record.value, record.headers) <= limit
    # A value that leaves room for the headers (and a few bytes of varints) is kept whole.
    room = limit - record_size(sent.key, b"", dead_letter_headers(sent, dead_lettered_at=NOW))
    assert not build_record(
        letter(value=b"x" * (room - 8)), limit=limit, dead_lettered_at=NOW
    ).value_omitted
    assert build_record(
        letter(value=b"x" * (room + 1)), limit=limit, dead_lettered_at=NOW
    ).value_omitted


def test_key_too_large_on_its_own_is_replaced_by_the_coordinates() -> None:
    """A key that alone passes the limit is replaced too, with its size in dlq.key_replaced."""
    sent = letter(key=b"k" * 5000, value=b"v")
    record = build_record(sent, limit=4000, dead_lettered_at=NOW)
    assert record.key == coordinates_key(sent)
    assert dict(record.headers)[H_KEY_REPLACED] == b"5000"
    assert record_size(record.key, record.value, record.headers) <= 4000


# -- writing (real broker) --------------------------------------------------------


async def test_written_dead_letter_reads_back_with_every_header(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """Key, value and original headers are unchanged and every dlq.* header is exact."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    writer = DeadLetterWriter(
        producer=producer,
        topic_for=settings.dlq_topic_for,
        secrets=[Secret(API_KEY)],
        clock=lambda: 1_767_312_245.678,
    )
    sent = letter(source_topic=source, message=f"rejected; key {API_KEY} Bearer tok123")
    written = await writer.write(sent)
    assert written.topic == dlq
    assert writer.written == 1
    assert "written=1" in repr(writer)

    [record] = await read_to_end(kafka_bootstrap, dlq)
    assert (record.partition, record.offset) == (written.partition, written.offset)
    assert record.key == b"order-1"
    assert record.value == b'{"id":"e1"}'
    headers = list(record.headers)
    assert headers[:2] == [("ce_type", b"order.placed"), ("trace", b"\x00\xff")]
    dlq_headers = {name: value.decode() for name, value in headers[2:]}
    assert list(dlq_headers) == list(DLQ_HEADERS)
    assert dlq_headers == {
        H_REASON: "validation_error",
        H_ERROR_NAME: "validation_error",
        H_HTTP_STATUS: "422",
        H_MESSAGE: f"rejected; key re_{REDACTED} Bearer {REDACTED}",
        H_ATTEMPTS: "3",
        H_FIRST_ATTEMPT_AT: rfc3339(sent.first_attempt_at or 0),
        H_LAST_ATTEMPT_AT: rfc3339(sent.last_attempt_at or 0),
        H_SOURCE_TOPIC: source,
        H_SOURCE_PARTITION: "2",
        H_SOURCE_OFFSET: "41",
        H_IDEMPOTENCY_KEY: "order-confirmation:o-1",
        H_EVENT_TYPE: "order.placed",
        H_SERVICE_VERSION: __version__,
        H_DEAD_LETTERED_AT: "2026-01-02T00:04:05.678Z",
    }


async def test_missing_dead_letter_topic_raises_without_secrets(
    new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """A dead-letter topic that does not exist (auto-create off) is a fatal error."""
    source = await new_topic(prefix="src")
    writer = DeadLetterWriter(
        producer=producer,
        topic_for=lambda topic: f"{topic}.missing-dlq",
        secrets=[Secret(API_KEY)],
    )
    with pytest.raises(DeadLetterUnavailable) as caught:
        await writer.write(letter(source_topic=source, message=f"key {API_KEY}"))
    assert isinstance(caught.value, FatalError)
    assert caught.value.reason == "dlq_unavailable"
    text = str(caught.value)
    assert f"{source}.missing-dlq" in text
    assert "UnknownTopicOrPartitionError" in text
    assert API_KEY not in text
    assert caught.value.__cause__ is None
    assert writer.failed == 1


async def test_stopped_producer_raises_dead_letter_unavailable(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    """A producer that can no longer send turns into DeadLetterUnavailable, not a skip."""
    source = await new_topic(prefix="src")
    await new_topic(name=f"{source}.dlq")
    prod = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await prod.start()
    await prod.stop()
    # A stopped producer never answers: the writer's own timeout turns that into an error.
    writer = DeadLetterWriter(producer=prod, topic_for=lambda t: f"{t}.dlq", timeout=1.0)
    with pytest.raises(
        DeadLetterUnavailable,
        match=r"not written for src-\w+\[2\]@41: TimeoutError: no acknowledgement within 1s",
    ):
        await writer.write(letter(source_topic=source))
    assert await read_to_end(kafka_bootstrap, f"{source}.dlq") == []


async def test_record_too_large_for_the_topic_is_written_without_its_value(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """A dead letter too large to write keeps key, reason and position; the value is left out."""
    source = await new_topic(prefix="src")
    await new_topic(name=f"{source}.dlq")
    writer = DeadLetterWriter(producer=producer, topic_for=lambda t: f"{t}.dlq")
    big = letter(source_topic=source, value=b"x" * 1_100_000)
    written = await writer.write(big)
    records = await read_to_end(kafka_bootstrap, f"{source}.dlq")
    assert len(records) == 1
    record = records[0]
    assert written.offset == record.offset
    assert record.value is None
    assert record.key == big.key
    headers = dict(record.headers)
    assert headers["dlq.value_omitted"] == b"1100000"
    assert headers["dlq.reason"] == big.reason.encode()
    assert headers["dlq.source_offset"] == str(big.offset).encode()


async def test_null_key_and_value_and_keyless_big_value_are_written_and_writer_stays_healthy(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """Records any producer can write are dead-lettered; the idempotent producer keeps working."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")  # default max.message.bytes
    limits = TopicLimits(client={"bootstrap_servers": kafka_bootstrap})
    writer = DeadLetterWriter(producer=producer, topic_for=lambda t: f"{t}.dlq", limits=limits)
    empty = letter(source_topic=source, offset=1, key=None, value=None, headers=[])
    big = letter(source_topic=source, offset=2, key=None, value=b"x" * (1024 * 1024 - 200))
    await writer.write(empty)
    await writer.write(big)
    await writer.write(letter(source_topic=source, offset=3))
    assert writer.failed == 0

    first, second, third = await read_to_end(kafka_bootstrap, dlq)
    assert (first.key, first.value) == (coordinates_key(empty), None)
    assert (second.key, second.value) == (coordinates_key(big), None)
    assert dict(second.headers)[H_VALUE_OMITTED] == str(1024 * 1024 - 200).encode()
    assert (third.key, third.value) == (b"order-1", b'{"id":"e1"}')


async def test_topic_limits_read_the_topics_own_max_message_bytes(
    kafka_bootstrap: str, unused_tcp_port: int
) -> None:
    """A topic's max.message.bytes override is read (and capped by max_request_size)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"limits-{NOW:.0f}-{id(kafka_bootstrap)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "200000"})]
        )
        limits = TopicLimits(client={"bootstrap_servers": kafka_bootstrap})
        assert await limits.get(topic) == 200_000
        capped = TopicLimits(
            client={"bootstrap_servers": kafka_bootstrap}, max_request_size=100_000
        )
        assert await capped.get(topic) == 100_000
        assert "known=1" in repr(limits)
    finally:
        await admin.delete_topics([topic])
        await admin.close()
    away = TopicLimits(client={"bootstrap_servers": f"127.0.0.1:{unused_tcp_port}"}, timeout=1.0)
    assert await away.get("any") == 1_048_576
    assert "known=0" in repr(away)


# -- replay (real broker) ---------------------------------------------------------


def replay_args(*argv: str) -> ReplayArgs:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ReplayArgs.from_namespace(parser.parse_args(list(argv)))


class Run:
    """Result of one replay call."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


async def replay(settings: Settings, *argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = await replay_command(settings, replay_args(*argv), asyncio.Event(), out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


def fixed_clock(at: float) -> Callable[[], float]:
    return lambda: at


async def seed(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> tuple[Settings, str, str]:
    """A source topic and its DLQ holding four dead letters of different kinds."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(3, name=f"{source}.dlq")
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    old_event = orjson.dumps({"id": "e4", "type": "user.signup", "time": rfc3339(NOW - 30 * HOUR)})
    cases: Sequence[tuple[float, DeadLetter]] = (
        (NOW - 60, letter(source_topic=source, key=b"k1", value=b"v1", reason="validation_error")),
        (
            NOW - 60,
            letter(
                source_topic=source,
                key=b"k2",
                value=b"v2",
                reason="invalid_event",
                event_type=None,
                headers=[("ce_type", b"user.signup")],
                attempts=0,
                first_attempt_at=None,
                last_attempt_at=None,
            ),
        ),
        (
            NOW - 3 * HOUR,
            letter(
                source_topic=source, key=None, value=b"v3", reason="retries_exhausted", headers=[]
            ),
        ),
        (
            NOW - 26 * HOUR,
            letter(
                source_topic=source,
                key=b"k4",
                value=old_event,
                reason="retries_exhausted",
                event_type="user.signup",
                headers=[("content-type", b"application/cloudevents+json")],
                first_attempt_at=NOW - 27 * HOUR,
            ),
        ),
    )
    for at, dead in cases:
        writer = DeadLetterWriter(
            producer=producer, topic_for=settings.dlq_topic_for, clock=fixed_clock(at)
        )
        await writer.write(dead)
    return settings, source, dlq


async def test_replay_republishes_originals_unchanged_and_warns_past_24h(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """All dead letters go back with key, value and original headers; old ones are warned."""
    settings, source, _ = await seed(kafka_bootstrap, new_topic, producer)
    run = await replay(settings)
    assert run.code == 0, run.err
    assert run.out.strip() == "replayed 4, skipped by filter 0, warned 1 (of 4 read)"
    assert "24h idempotency window" in run.err
    assert "MAX_EVENT_AGE" in run.err
    assert run.err.count("warning:") == 2

    replayed = await read_to_end(kafka_bootstrap, source)
    by_value = {r.value: r for r in replayed}
    assert len(replayed) == 4
    [old] = [r for r in replayed if r.key == b"k4"]
    assert orjson.loads(old.value)["id"] == "e4"
    assert list(old.headers) == [("content-type", b"application/cloudevents+json")]
    assert by_value[b"v1"].key == b"k1"
    assert list(by_value[b"v1"].headers) == [("ce_type", b"order.placed"), ("trace", b"\x00\xff")]
    assert list(by_value[b"v2"].headers) == [("ce_type", b"user.signup")]
    assert by_value[b"v3"].key is None
    assert list(by_value[b"v3"].headers) == []
    assert all(not name.startswith("dlq.") for r in replayed for name, _ in r.headers)


async def test_replay_reads_committed_letters_only(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """A dead letter of an aborted transaction is never replayed."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    writer = DeadLetterWriter(producer=producer, topic_for=settings.dlq_topic_for)
    await writer.write(letter(source_topic=source, key=b"kept", value=b"v1"))
    txn = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"abort-{dlq}")
    await txn.start()
    try:
        await txn.begin_transaction()
        headers = [(H_REASON, b"x"), (H_SOURCE_TOPIC, source.encode())]
        await (await txn.send(dlq, key=b"aborted", value=b"v2", headers=headers))
        await txn.abort_transaction()
    finally:
        await txn.stop()
    assert len(await read_to_end(kafka_bootstrap, dlq, isolation_level="read_uncommitted")) == 2

    run = await replay(settings)
    assert run.code == 0, run.err
    assert run.out.startswith("replayed 1,")
    assert [r.key for r in await read_to_end(kafka_bootstrap, source)] == [b"kept"]


async def test_replay_skips_letters_whose_original_was_left_out(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """Value left out, or neither key nor value: reported, not replayed; others go back keyless."""
    source = await new_topic(prefix="src")
    await new_topic(name=f"{source}.dlq")
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    writer = DeadLetterWriter(producer=producer, topic_for=settings.dlq_topic_for)
    await writer.write(letter(source_topic=source, offset=1, value=b"x" * 1_100_000))
    await writer.write(letter(source_topic=source, offset=2, key=None, value=None))
    await writer.write(letter(source_topic=source, offset=3, key=None, value=b"keyless"))
    run = await replay(settings)
    assert run.code == 0, run.err
    assert "2 without their original record (not replayed)" in run.out
    assert "its value was too large" in run.err
    assert "neither key nor value" in run.err
    [back] = await read_to_end(kafka_bootstrap, source)
    assert (back.key, back.value) == (None, b"keyless")


async def test_replay_filters_by_reason_type_and_time(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """--reason, --type (incl. the ce_type fallback), --since and --until select records."""
    settings, source, dlq = await seed(kafka_bootstrap, new_topic, producer)

    async def values(*argv: str) -> set[bytes | None]:
        target = await new_topic(prefix="target")
        run = await replay(settings, "--from-topic", dlq, "--to-topic", target, *argv)
        assert run.code == 0, run.err
        return {r.value for r in await read_to_end(kafka_bootstrap, target)}

    assert await values("--reason", "validation_error", "--reason", "invalid_event") == {
        b"v1",
        b"v2",
    }
    assert await values("--type", "user.signup", "--reason", "invalid_event") == {b"v2"}
    assert await values("--type", "order.placed") == {b"v1", b"v3"}
    assert await values("--since", "2h") == {b"v1", b"v2"}
    assert await values("--until", "2h", "--since", rfc3339(NOW - 4 * HOUR)) == {b"v3"}
    assert await read_to_end(kafka_bootstrap, source) == []


async def test_replay_dry_run_and_limit(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """--dry-run sends nothing and lists records; --limit caps what is replayed."""
    settings, source, _ = await seed(kafka_bootstrap, new_topic, producer)
    run = await replay(settings, "--dry-run", "--reason", "retries_exhausted")
    assert run.code == 0, run.err
    assert "would replay 2, skipped by filter 2" in run.out
    assert f"-> {source} reason=retries_exhausted" in run.out
    assert await read_to_end(kafka_bootstrap, source) == []

    run = await replay(settings, "--limit", "1")
    assert run.code == 0, run.err
    assert run.out.startswith("replayed 1,")
    assert len(await read_to_end(kafka_bootstrap, source)) == 1


async def test_record_without_source_topic_is_not_replayed(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """A record with no dlq.source_topic is reported and makes the run fail, unless --to-topic."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    await produce(dlq, [(b"k", b"v", [(H_REASON, b"oversized")])])
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    run = await replay(settings)
    assert run.code == 1
    assert "no dlq.source_topic header" in run.err
    assert "1 without a source topic" in run.out
    run = await replay(settings, "--to-topic", source)
    assert run.code == 0, run.err
    [record] = await read_to_end(kafka_bootstrap, source)
    assert (record.key, record.value, list(record.headers)) == (b"k", b"v", [])


async def test_replay_stops_when_asked(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """A set stop event ends the replay early with the interrupted exit status."""
    settings, source, _ = await seed(kafka_bootstrap, new_topic, producer)
    stop = asyncio.Event()
    stop.set()
    out, err = io.StringIO(), io.StringIO()
    code = await replay_command(settings, replay_args(), stop, out=out, err=err)
    assert code == 130
    assert "interrupted" in err.getvalue()
    assert await read_to_end(kafka_bootstrap, source) == []


async def test_replay_with_unreachable_broker_fails_clearly(unused_tcp_port: int) -> None:
    """A broker that cannot be reached exits 1 with the Kafka error named."""
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{unused_tcp_port}")
    run = await replay(settings)
    assert run.code == 1
    assert "dlq replay: Kafka error: KafkaConnectionError: Unable to bootstrap" in run.err


async def test_replay_of_missing_topic_fails_clearly(kafka_bootstrap: str) -> None:
    """A dead-letter topic that does not exist exits non-zero with its name."""
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=("nope-xyz",))
    run = await replay(settings)
    assert run.code == 1
    assert "'nope-xyz.dlq' does not exist" in run.err


async def test_cli_dlq_replay_runs_end_to_end(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """`resend-consumer dlq replay` parses its flags and replays through the CLI."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    headers = [("ce_type", b"t.x"), (H_REASON, b"oversized"), (H_SOURCE_TOPIC, source.encode())]
    await produce(dlq, [(b"k", b"v", headers)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "dlq",
        "replay",
        "--kafka-bootstrap-servers",
        kafka_bootstrap,
        "--kafka-topics",
        source,
        "--reason",
        "oversized",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "replayed 1, skipped by filter 0, warned 0 (of 1 read)"
    [record] = await read_to_end(kafka_bootstrap, source)
    assert (record.key, record.value, list(record.headers)) == (b"k", b"v", [("ce_type", b"t.x")])


def test_replay_warns_about_future_dated_and_stale_events() -> None:
    """A future `time` gets its own warning; an old one warns that STALE_POLICY applies again."""
    from consumer.commands.dlq import _warnings

    settings = Settings(kafka_topics=("orders",))
    meta = {"dlq.attempts": "0"}

    def warnings_for(when: float) -> list[str]:
        value = orjson.dumps({"id": "e", "time": rfc3339(when)})
        return _warnings(meta, [], value, NOW, settings, NOW)

    future = warnings_for(NOW + 2 * HOUR)
    assert len(future) == 1
    assert "in the future" in future[0]
    stale = warnings_for(NOW - 30 * HOUR)
    assert len(stale) == 1
    assert "MAX_EVENT_AGE" in stale[0]
    assert warnings_for(NOW - 60) == []


# -- hostile producers and Resend's error text (issue 11, items 10 and 11) ----------


def test_dead_letter_message_masks_recipient_addresses() -> None:
    """Addresses Resend quotes in its error text are masked in dlq.message, like the logs."""
    message = "The `to` field is invalid: jane.doe@example.com, bob@corp.example"
    values = dict(dead_letter_headers(letter(message=message), dead_lettered_at=NOW))
    shown = values[H_MESSAGE].decode()
    assert "jane.doe@" not in shown
    assert "bob@" not in shown
    assert "@example.com" in shown


FORGED = [
    ("dlq.event_type", b"order.placed"),
    ("dlq.reason", b"validation_error"),
    ("original.dlq.reason", b"nested"),
    ("ce_type", b"user.signup"),
    ("dlq.source_topic", b"somewhere-else"),
]


def test_producer_set_dlq_headers_are_escaped_and_not_trusted() -> None:
    """A source record's own dlq.* headers move under original.; the service's stay alone."""
    dead = letter(headers=FORGED, event_type=None, reason="not_json")
    headers = dead_letter_headers(dead, dead_lettered_at=NOW)
    meta = dlq_values(headers)
    assert meta[H_REASON] == "not_json"
    assert H_EVENT_TYPE not in meta
    assert meta[H_SOURCE_TOPIC] == "orders"
    assert headers[: len(FORGED)] == [
        ("original.dlq.event_type", b"order.placed"),
        ("original.dlq.reason", b"validation_error"),
        ("original.original.dlq.reason", b"nested"),
        ("ce_type", b"user.signup"),
        ("original.dlq.source_topic", b"somewhere-else"),
    ]
    assert original_headers(headers) == FORGED


async def test_replay_restores_forged_headers_byte_for_byte_and_is_not_fooled(
    kafka_bootstrap: str, new_topic: NewTopicFactory, producer: AIOKafkaProducer
) -> None:
    """--type reads only the service's own headers; the replayed record is the original."""
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, kafka_topics=(source,))
    writer = DeadLetterWriter(producer=producer, topic_for=settings.dlq_topic_for)
    await writer.write(
        letter(source_topic=source, headers=FORGED, event_type=None, reason="not_json", value=b"{")
    )
    fooled = await new_topic(prefix="target")
    run = await replay(
        settings, "--from-topic", dlq, "--to-topic", fooled, "--type", "order.placed"
    )
    assert run.code == 0, run.err
    assert await read_to_end(kafka_bootstrap, fooled) == []
    run = await replay(settings, "--from-topic", dlq, "--type", "user.signup")
    assert run.code == 0, run.err
    [replayed] = await read_to_end(kafka_bootstrap, source)
    assert (replayed.key, replayed.value) == (b"order-1", b"{")
    assert list(replayed.headers) == FORGED
