"""The broker is a real Apache Kafka and aiokafka works against it as the service needs."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import NewTopicFactory, Produce, unique_name

pytestmark = pytest.mark.kafka

N_RECORDS = 10_000
PARTITIONS = 6


def _consumer(bootstrap: str, topic: str, group: str, **kwargs: object) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **kwargs,
    )


async def _read(
    consumer: AIOKafkaConsumer, count: int, timeout: float = 60.0
) -> list[tuple[int, int, bytes]]:
    """Read exactly `count` records (partition, offset, value) or fail after timeout."""
    got: list[tuple[int, int, bytes]] = []

    async def loop() -> None:
        while len(got) < count:
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            for tp, records in batch.items():
                got.extend((tp.partition, r.offset, r.value or b"") for r in records)

    await asyncio.wait_for(loop(), timeout)
    return got


async def test_ten_thousand_records_all_read_by_group_with_manual_commit(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """10,000 records over 6 partitions from an idempotent producer are all read once."""
    topic = await new_topic(PARTITIONS)
    await produce(topic, [(f"k{i}".encode(), f"v{i}".encode(), []) for i in range(N_RECORDS)])
    consumer = _consumer(kafka_bootstrap, topic, unique_name("g"))
    await consumer.start()
    try:
        got = await _read(consumer, N_RECORDS)
        await consumer.commit()
        extra = await consumer.getmany(timeout_ms=500)
    finally:
        await consumer.stop()
    values = sorted(int(v[1:]) for _, _, v in got)
    assert values == list(range(N_RECORDS))
    assert {p for p, _, _ in got} == set(range(PARTITIONS))
    assert not any(extra.values())
    # per partition, offsets are 0..n-1 with no gap and no duplicate
    per_partition: dict[int, list[int]] = defaultdict(list)
    for p, off, _ in got:
        per_partition[p].append(off)
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets)))


async def test_restart_resumes_exactly_at_committed_offsets(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """A new consumer of the group starts at the committed positions, not at 0 or at the end."""
    topic = await new_topic(PARTITIONS)
    group = unique_name("g")
    await produce(topic, [(f"k{i}".encode(), f"v{i}".encode(), []) for i in range(1200)])

    first = _consumer(kafka_bootstrap, topic, group)
    await first.start()
    try:
        await _read(first, 1200)
        # commit an arbitrary, partition-specific position: 10 * (p + 1)
        positions = {TopicPartition(topic, p): 10 * (p + 1) for p in range(PARTITIONS)}
        await first.commit(positions)
    finally:
        await first.stop()

    second = _consumer(kafka_bootstrap, topic, group)
    await second.start()
    try:
        counts: dict[int, int] = {}
        for p in range(PARTITIONS):
            end = (await second.end_offsets([TopicPartition(topic, p)]))[TopicPartition(topic, p)]
            counts[p] = end
        expected = sum(end - 10 * (p + 1) for p, end in counts.items())
        got = await _read(second, expected)
        for p in range(PARTITIONS):
            assert await second.committed(TopicPartition(topic, p)) == 10 * (p + 1)
    finally:
        await second.stop()
    first_offsets: dict[int, int] = {}
    for p, off, _ in got:
        first_offsets[p] = min(off, first_offsets.get(p, off))
    assert all(counts[p] > 10 * (p + 1) for p in range(PARTITIONS))
    assert first_offsets == {p: 10 * (p + 1) for p in range(PARTITIONS)}
    assert len(got) == expected


async def test_two_consumers_in_one_group_split_the_partitions(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    """Two members of one group each own a disjoint half of the partitions."""
    topic = await new_topic(PARTITIONS)
    group = unique_name("g")
    a = _consumer(kafka_bootstrap, topic, group)
    b = _consumer(kafka_bootstrap, topic, group)
    await a.start()
    await b.start()
    try:

        async def settled() -> tuple[set[TopicPartition], set[TopicPartition]]:
            while True:
                # polling keeps both members in the group and lets the rebalance finish
                await asyncio.gather(a.getmany(timeout_ms=200), b.getmany(timeout_ms=200))
                sa, sb = a.assignment(), b.assignment()
                if sa and sb and len(sa) + len(sb) == PARTITIONS:
                    return sa, sb

        sa, sb = await asyncio.wait_for(settled(), 60)
    finally:
        await a.stop()
        await b.stop()
    assert not sa & sb
    assert {tp.partition for tp in sa | sb} == set(range(PARTITIONS))
    assert len(sa) == len(sb) == PARTITIONS // 2


async def test_commit_metadata_reads_back_through_the_admin_client(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """Metadata committed beside an offset is returned by the admin client's offset listing."""
    topic = await new_topic(2)
    group = unique_name("g")
    await produce(topic, [(None, b"x", []) for _ in range(5)])
    consumer = _consumer(kafka_bootstrap, topic, group)
    await consumer.start()
    try:
        await _read(consumer, 5)
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        await consumer.commit({tp0: (1, "resend-consumer:gen=7"), tp1: (0, "")})
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    assert offsets[tp0].offset == 1
    assert offsets[tp0].metadata == "resend-consumer:gen=7"
    assert offsets[tp1].offset == 0
