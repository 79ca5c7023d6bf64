"""Dead letters and offsets in one transaction, against a real Kafka broker."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from consumer.committer import PartitionCommitter
from consumer.deadletter import (
    H_KEY_REPLACED,
    H_REASON,
    H_SOURCE_OFFSET,
    H_VALUE_OMITTED,
    DeadLetter,
    coordinates_key,
)
from consumer.errors import CommitFailed, DeadLetterUnavailable, PartitionFenced, RetriableError
from consumer.settings import Secret
from tests.conftest import NewTopicFactory, Produce, unique_name
from tests.pipeline_support import read_to_end
from tests.test_deadletter import letter

API_KEY = "re_AbCdEf123456_SuperSecretKeyValue99"

MakeCommitter = Callable[..., PartitionCommitter]


@pytest.fixture
async def make_committer(kafka_bootstrap: str) -> AsyncIterator[MakeCommitter]:
    """Factory of committers on the shared broker; every one is stopped afterwards."""
    made: list[PartitionCommitter] = []

    def make(group_id: str, **overrides: Any) -> PartitionCommitter:
        options: dict[str, Any] = {
            "client": {"bootstrap_servers": kafka_bootstrap},
            "group_id": group_id,
            "topic_for": lambda topic: f"{topic}.dlq",
            "prefix": "test.",
            "secrets": [Secret(API_KEY)],
            "timeout": 10.0,
            "init_timeout": 20.0,
        }
        options.update(overrides)
        committer = PartitionCommitter(**options)
        made.append(committer)
        return committer

    try:
        yield make
    finally:
        for committer in made:
            await committer.stop()


async def source_and_dlq(new_topic: NewTopicFactory) -> tuple[TopicPartition, str]:
    source = await new_topic(prefix="src")
    dlq = await new_topic(name=f"{source}.dlq")
    return TopicPartition(source, 0), dlq


def dead(tp: TopicPartition, offset: int, **changes: Any) -> DeadLetter:
    fields: dict[str, Any] = {"source_topic": tp.topic, "partition": tp.partition}
    return letter(**(fields | {"offset": offset} | changes))


async def committed(bootstrap: str, group_id: str, tp: TopicPartition) -> OffsetAndMetadata | None:
    """The group's committed offset of `tp`, read by a plain admin client."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group_id, partitions=[tp])
    finally:
        await admin.close()
    meta = found.get(tp)
    return meta if meta is not None and meta.offset >= 0 else None


def source_offsets(records: list[Any]) -> list[int]:
    return [int(dict(r.headers)[H_SOURCE_OFFSET]) for r in records]


# -- commit -------------------------------------------------------------------------


async def test_commit_makes_letters_and_offset_visible_together(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """One commit: its letters are readable read_committed and the next owner reads its offset."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(group)
    assert await owner.assign([tp]) == {tp: None}
    await owner.commit(tp, 5, "plan-a", [dead(tp, 1), dead(tp, 3)])
    assert "commits=1 letters=2" in repr(owner)

    records = await read_to_end(kafka_bootstrap, dlq)
    assert source_offsets(records) == [1, 3]
    assert all(r.key == b"order-1" for r in records)
    assert dict(records[0].headers)[H_REASON] == b"validation_error"

    # The next owner's fence settles the transaction: the offset it reads is final.
    successor = make_committer(group)
    assert await successor.assign([tp]) == {tp: OffsetAndMetadata(5, "plan-a")}
    assert await committed(kafka_bootstrap, group, tp) == OffsetAndMetadata(5, "plan-a")


async def test_commit_without_letters_moves_only_the_offset(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """A commit with no letters moves the offset and writes nothing to the dead-letter topic."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(group)
    await owner.assign([tp])
    await owner.commit(tp, 3, "", [])
    await owner.commit(tp, 9, "m", [])
    assert await make_committer(group).assign([tp]) == {tp: OffsetAndMetadata(9, "m")}
    assert await read_to_end(kafka_bootstrap, dlq) == []


async def test_commit_at_or_below_the_committed_offset_writes_nothing(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """Letters below the committed offset were written by the commit that moved it: not again."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    first = make_committer(group)
    await first.assign([tp])
    await first.commit(tp, 4, "", [dead(tp, 2)])
    second = make_committer(group)
    assert await second.assign([tp]) == {tp: OffsetAndMetadata(4, "")}
    await second.commit(tp, 4, "", [dead(tp, 2)])
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [2]
    assert second.commits == 0


async def test_new_metadata_at_the_committed_offset_is_recorded_without_letters(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """A batch plan is recorded with the offset unchanged before the batch is sent: it must
    reach Kafka (it was once skipped as a no-op), and letters below it stay written once;
    the same metadata again is still a no-op. Below the committed offset (a lost answer)
    it is recorded at the committed offset: offsets never go back."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(group)
    await owner.assign([tp])
    await owner.commit(tp, 4, "rc1|h4", [dead(tp, 2)])
    await owner.commit(tp, 4, "rc1|h9|plan", [dead(tp, 2)])
    assert await committed(kafka_bootstrap, group, tp) == OffsetAndMetadata(4, "rc1|h9|plan")
    assert owner.commits == 2
    await owner.commit(tp, 4, "rc1|h9|plan", [])
    assert owner.commits == 2
    await owner.commit(tp, 3, "rc1|h12|plan2", [])
    assert await committed(kafka_bootstrap, group, tp) == OffsetAndMetadata(4, "rc1|h12|plan2")
    successor = make_committer(group)
    assert await successor.assign([tp]) == {tp: OffsetAndMetadata(4, "rc1|h12|plan2")}
    await successor.commit(tp, 4, "rc1|h12|plan2", [])
    assert successor.commits == 0
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [2]


# -- fencing ------------------------------------------------------------------------


async def test_zombie_transaction_is_aborted_when_a_new_owner_assigns(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """A zombie's open transaction (letter + offset) is fenced: invisible, offset unmoved."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(group)
    zombie = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=owner.transactional_id(tp)
    )
    await zombie.start()
    try:
        await zombie.begin_transaction()
        ack = await zombie.send(dlq, key=b"zombie", value=b"letter")
        await ack
        await zombie.send_offsets_to_transaction({tp: (7, "zombie")}, group)

        assert await owner.assign([tp]) == {tp: None}
        with pytest.raises(ProducerFenced):
            await zombie.commit_transaction()
    finally:
        await zombie.stop()

    assert await read_to_end(kafka_bootstrap, dlq) == []
    # The letter did reach the log: only its transaction keeps it from readers.
    uncommitted = await read_to_end(kafka_bootstrap, dlq, isolation_level="read_uncommitted")
    assert [r.key for r in uncommitted] == [b"zombie"]
    assert await committed(kafka_bootstrap, group, tp) is None
    # The new owner commits normally over the aborted transaction.
    await owner.commit(tp, 2, "", [dead(tp, 1)])
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [1]


async def test_fenced_committer_stays_fenced_until_assigned_again(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """A fenced committer commits nothing and does not fence the new owner back."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    old, new = make_committer(group), make_committer(group)
    await old.assign([tp])
    await new.assign([tp])

    with pytest.raises(PartitionFenced) as caught:
        await old.commit(tp, 5, "old", [dead(tp, 4)])
    assert caught.value.reason == "partition_fenced"
    assert old.state(tp) == "fenced"
    with pytest.raises(PartitionFenced):
        await old.commit(tp, 5, "old", [dead(tp, 4)])

    await new.commit(tp, 3, "new", [dead(tp, 2)])
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [2]
    assert await make_committer(group).assign([tp]) == {tp: OffsetAndMetadata(3, "new")}


CHILD = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

async def main(bootstrap, tid, dlq, source, group):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=tid)
    await producer.start()
    await producer.begin_transaction()
    await (await producer.send(dlq, key=b"crashed", value=b"letter"))
    await producer.send_offsets_to_transaction({TopicPartition(source, 0): (9, "x")}, group)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_process_killed_mid_transaction_leaves_no_letter_and_no_offset(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """kill -9 between the letter and the commit: the next owner sees no letter, no offset."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(group)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        kafka_bootstrap,
        owner.transactional_id(tp),
        dlq,
        tp.topic,
        group,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.strip() == b"ready"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    assert await owner.assign([tp]) == {tp: None}
    assert await read_to_end(kafka_bootstrap, dlq) == []
    uncommitted = await read_to_end(kafka_bootstrap, dlq, isolation_level="read_uncommitted")
    assert [r.key for r in uncommitted] == [b"crashed"]
    await owner.commit(tp, 9, "", [dead(tp, 8)])
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [8]


# -- failures -----------------------------------------------------------------------


async def test_unwritable_letter_aborts_and_next_commit_recovers(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """A letter for a missing topic: DeadLetterUnavailable, offset unmoved, producer renewed."""
    tp, dlq = await source_and_dlq(new_topic)
    group = unique_name("g")
    owner = make_committer(
        group, timeout=2.0, topic_for=lambda t: f"{t}.dlq" if t == tp.topic else f"{t}.absent"
    )
    await owner.assign([tp])
    await owner.commit(tp, 1, "", [dead(tp, 0)])
    stray = dead(tp, 1, source_topic=unique_name("gone"), message=f"key {API_KEY}")
    with pytest.raises(DeadLetterUnavailable) as caught:
        await owner.commit(tp, 2, "", [dead(tp, 1), stray])
    assert API_KEY not in str(caught.value)
    assert owner.state(tp) == "broken"
    assert owner.aborted == 1

    await owner.commit(tp, 3, "after", [dead(tp, 2)])
    assert owner.state(tp) == "ready"
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [0, 2]
    assert await make_committer(group).assign([tp]) == {tp: OffsetAndMetadata(3, "after")}


async def test_assign_without_a_broker_raises_commit_failed(
    unused_tcp_port: int, make_committer: MakeCommitter
) -> None:
    """No broker: assign raises CommitFailed (retriable) and the partition stays broken."""
    tp = TopicPartition("nowhere", 0)
    committer = make_committer(
        "g",
        client={"bootstrap_servers": f"127.0.0.1:{unused_tcp_port}"},
        init_timeout=1.0,
    )
    with pytest.raises(CommitFailed) as caught:
        await committer.assign([tp])
    assert isinstance(caught.value, RetriableError)
    assert committer.state(tp) == "broken"


# -- letters that must always be writable -------------------------------------------


async def test_keyless_empty_and_oversized_records_are_dead_lettered_in_a_transaction(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_committer: MakeCommitter
) -> None:
    """Null key and value, and a keyless value just under 1 MiB: both written; next one too."""
    tp, dlq = await source_and_dlq(new_topic)  # default max.message.bytes
    group = unique_name("g")
    owner = make_committer(group)
    await owner.assign([tp])
    empty = dead(tp, 0, key=None, value=None, headers=[])
    big = dead(tp, 1, key=None, value=b"x" * (1024 * 1024 - 200), headers=[("h", b"v")])
    await owner.commit(tp, 2, "", [empty, big])
    await owner.commit(tp, 3, "", [dead(tp, 2)])

    first, second, third = await read_to_end(kafka_bootstrap, dlq)
    assert (first.key, first.value) == (coordinates_key(empty), None)
    assert dict(first.headers)[H_KEY_REPLACED] == b"none"
    assert H_VALUE_OMITTED not in dict(first.headers)
    assert (second.key, second.value) == (coordinates_key(big), None)
    assert dict(second.headers)[H_VALUE_OMITTED] == str(len(big.value or b"")).encode()
    assert ("h", b"v") not in second.headers
    assert (third.key, third.value) == (b"order-1", b'{"id":"e1"}')


# -- why the pipeline seeks after assign ----------------------------------------------


async def test_assign_returns_an_offset_committed_after_the_consumer_read_its_own(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    make_committer: MakeCommitter,
    produce: Produce,
) -> None:
    """aiokafka reads the committed offset before the listener returns; assign's read is final."""
    tp, _ = await source_and_dlq(new_topic)
    await produce(tp.topic, [(None, b"e%d" % i, []) for i in range(10)])
    group = unique_name("g")
    owner = make_committer(group)
    zombie = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=owner.transactional_id(tp)
    )
    await zombie.start()
    await zombie.begin_transaction()
    await zombie.send_offsets_to_transaction({tp: (7, "zombie")}, group)
    seen: dict[str, Any] = {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            pass

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            consumer.pause(*assigned)
            # The consumer's own read of the committed offset is already done here...
            seen["consumer"] = await consumer.position(tp)
            # ...so the old owner's transaction, committed just before the fence, is
            # invisible to it; the read after the fence sees it.
            await zombie.commit_transaction()
            offsets = await owner.assign(assigned)
            seen["assign"] = offsets[tp]
            for part, found in offsets.items():
                if found is not None:
                    consumer.seek(part, found.offset)
            consumer.resume(*assigned)

    await consumer.start()
    try:
        consumer.subscribe([tp.topic], listener=Listener())
        batch: dict[TopicPartition, list[Any]] = {}
        while not batch.get(tp):
            batch = await consumer.getmany(timeout_ms=1000)
    finally:
        await consumer.stop()
        await zombie.stop()
    assert seen["consumer"] == 0
    assert seen["assign"] == OffsetAndMetadata(7, "zombie")
    assert batch[tp][0].offset == 7
