"""RecordFetcher on the real broker: every poison record a producer can write, among valid ones.

Each test writes its records with tests/poison.py (the bytes a librdkafka or
Java producer puts on the wire) to a fresh two-partition topic and reads them
back through `RecordFetcher.fetch()` with a plain assigned consumer.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.fetch import (
    UNDECODABLE_RECORD,
    Fetched,
    RecordFetcher,
    Undecodable,
    _decode_first_batch,
)
from tests.poison import (
    CODEC_GZIP,
    POISON_KINDS,
    Raw,
    codec_for,
    encode_batch,
    poison_records,
    produce_batch,
)

BAD_HEADER = (b"\xe9\x80", b"v")


def valid(tag: str, n: int) -> Raw:
    return Raw(key=f"{tag}-{n}".encode(), value=f'{{"n":{n}}}'.encode())


@pytest.fixture
async def reader(kafka_bootstrap: str) -> AsyncIterator[Callable[..., Awaitable[AIOKafkaConsumer]]]:
    """Factory of started consumers assigned to a topic's partitions (no group)."""
    started: list[AIOKafkaConsumer] = []

    async def make(topic: str, partitions: int = 2) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        started.append(consumer)
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        return consumer

    try:
        yield make
    finally:
        for consumer in started:
            await consumer.stop()


async def read(consumer: AIOKafkaConsumer, expected: int, *, max_records: int = 500) -> Fetched:
    """Call fetch() until `expected` items came back; then once more, to see no repeat."""
    total = Fetched()
    fetcher = RecordFetcher(consumer)

    async def loop() -> None:
        while len(total) < expected:
            got = await fetcher.fetch(timeout_ms=300, max_records=max_records)
            for tp, items in got.items.items():
                total.items.setdefault(tp, []).extend(items)

    await asyncio.wait_for(loop(), 60)
    extra = await fetcher.fetch(timeout_ms=300, max_records=max_records)
    assert len(extra) == 0, extra
    return total


def offsets(fetched: Fetched, partition: int) -> list[int]:
    return [r.offset for tp, rs in fetched.records.items() if tp.partition == partition for r in rs]


@pytest.mark.parametrize("kind", POISON_KINDS)
async def test_each_poison_kind_comes_once_among_valid_records(
    kind: str,
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    reader: Callable[..., Awaitable[AIOKafkaConsumer]],
) -> None:
    """A poison record at offset 2 of partition 0: it and every valid record come exactly once."""
    topic = await new_topic(2)
    await produce_batch(kafka_bootstrap, topic, 0, encode_batch([valid("a", 0), valid("a", 1)]))
    await produce_batch(
        kafka_bootstrap, topic, 0, encode_batch(poison_records(kind), codec=codec_for(kind))
    )
    await produce_batch(kafka_bootstrap, topic, 0, encode_batch([valid("a", 3), valid("a", 4)]))
    await produce_batch(kafka_bootstrap, topic, 1, encode_batch([valid("b", n) for n in range(5)]))
    got = await read(await reader(topic), 10)
    p0 = offsets(got, 0)
    if kind == "bad_header_name":
        assert [(u.tp.partition, u.offset, u.reason) for u in got.undecodable] == [
            (0, 2, UNDECODABLE_RECORD)
        ]
        assert sorted(p0) == [0, 1, 3, 4]
    else:
        assert got.undecodable == []
        assert sorted(p0) == [0, 1, 2, 3, 4]
    assert sorted(offsets(got, 1)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("codec", [0, CODEC_GZIP])
async def test_a_bad_record_mid_batch_keeps_the_records_around_it(
    codec: int,
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    reader: Callable[..., Awaitable[AIOKafkaConsumer]],
) -> None:
    """Bad header names at offsets 2 and 5 of an 8-record batch: six others come once, in order."""
    topic = await new_topic(2)
    records = [valid("a", n) for n in range(8)]
    for n in (2, 5):
        records[n] = Raw(key=b"bad-%d" % n, value=b"v", headers=[(b"ok", b"1"), BAD_HEADER])
    await produce_batch(kafka_bootstrap, topic, 0, encode_batch(records, codec=codec))
    await produce_batch(kafka_bootstrap, topic, 0, encode_batch([valid("a", 8)]))
    await produce_batch(kafka_bootstrap, topic, 1, encode_batch([valid("b", n) for n in range(3)]))
    got = await read(await reader(topic), 12)
    assert offsets(got, 0) == [0, 1, 3, 4, 6, 7, 8]
    assert [u.offset for u in got.undecodable] == [2, 5]
    keys = [r.key for tp, rs in got.records.items() if tp.partition == 0 for r in rs]
    assert keys == [b"a-0", b"a-1", b"a-3", b"a-4", b"a-6", b"a-7", b"a-8"]
    assert Counter(offsets(got, 1)) == Counter([0, 1, 2])


async def test_what_can_be_read_of_a_bad_record_is_kept(
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    reader: Callable[..., Awaitable[AIOKafkaConsumer]],
) -> None:
    """The undecodable record keeps its key, value, timestamp and text-named headers."""
    topic = await new_topic(2)
    bad = Raw(
        key=b"k",
        value=b'{"a":1}',
        headers=[(b"ce_id", b"1"), BAD_HEADER],
        timestamp_ms=1_700_000_000_123,
    )
    await produce_batch(kafka_bootstrap, topic, 1, encode_batch([bad]))
    got = await read(await reader(topic), 1)
    [u] = got.undecodable
    assert (u.tp.partition, u.offset, u.key, u.value, u.timestamp) == (
        1,
        0,
        b"k",
        b'{"a":1}',
        1_700_000_000_123,
    )
    assert u.headers == (("ce_id", b"1"),)
    # UnicodeDecodeError from the C extension, CorruptRecordException from pure Python
    assert "header name #1 (2 bytes) not UTF-8" in u.detail
    assert u.rejected().reason == UNDECODABLE_RECORD


async def test_a_restart_just_past_a_bad_record_reports_it_no_more(
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    reader: Callable[..., Awaitable[AIOKafkaConsumer]],
) -> None:
    """Positioned after a bad record in its batch (a committed offset): only later records come."""
    topic = await new_topic(2)
    records = [valid("a", n) for n in range(5)]
    records[1] = Raw(key=b"bad", value=b"v", headers=[BAD_HEADER])
    await produce_batch(kafka_bootstrap, topic, 0, encode_batch(records))
    consumer = await reader(topic)
    consumer.seek(TopicPartition(topic, 0), 2)
    got = await read(consumer, 3)
    assert offsets(got, 0) == [2, 3, 4]
    assert got.undecodable == []


async def test_other_partitions_lose_nothing_when_plain_getmany_would(
    kafka_bootstrap: str,
    new_topic: Callable[..., Awaitable[str]],
    reader: Callable[..., Awaitable[AIOKafkaConsumer]],
) -> None:
    """Eight partitions, one bad: every valid record of the seven others comes exactly once."""
    topic = await new_topic(8)
    for p in range(8):
        records = [valid(f"p{p}", n) for n in range(20)]
        if p == 3:
            records[7] = Raw(key=b"bad", value=b"v", headers=[BAD_HEADER])
        await produce_batch(kafka_bootstrap, topic, p, encode_batch(records))
    got = await read(await reader(topic, 8), 160, max_records=50)
    for p in range(8):
        want = [n for n in range(20) if (p, n) != (3, 7)]
        assert offsets(got, p) == want, p
    assert [(u.tp.partition, u.offset) for u in got.undecodable] == [(3, 7)]


def test_a_batch_with_a_bad_crc_is_undecodable_offset_by_offset() -> None:
    """Pure decoder: a CRC mismatch makes each offset of the batch from the position undecodable."""
    batch = bytearray(encode_batch([valid("a", n) for n in range(4)]))
    struct.pack_into(">I", batch, 17, 0)  # the CRC field
    tp = TopicPartition("t", 0)
    decoded = _decode_first_batch(tp, bytes(batch), 1, "CorruptRecordException")
    assert decoded is not None
    items, next_offset = decoded
    assert next_offset == 4
    assert [(type(i), i.offset) for i in items] == [
        (Undecodable, 1),
        (Undecodable, 2),
        (Undecodable, 3),
    ]
    assert all("CRC" in i.detail for i in items if isinstance(i, Undecodable))
