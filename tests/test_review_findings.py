"""Review of the rewritten engine: each test pins one defect found by reading it.

Every test here failed on the engine as first reviewed (each was written as a strict
xfail first, and watched fail) and passes since its fix.
The simulated ones use `tests/sim.py`; the committer one needs the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import OffsetAndMetadata

from consumer.errors import CommitFailed
from tests import sim, test_committer
from tests.pipeline_support import read_to_end
from tests.sim import FakeConsumer, World
from tests.test_committer import MakeCommitter, dead, source_and_dlq, source_offsets

#: the real-broker committer factory of tests/test_committer.py, shared as a fixture
make_committer = test_committer.make_committer

# -- helpers ----------------------------------------------------------------------


def script_rebalances(world: World, owners: list[str]) -> None:
    """Each rebalance gives every partition to the next named member (if it is started)."""
    group = world.group
    queue = list(owners)

    async def once() -> None:
        group.rebalances += 1
        members = [m for m in group.members if m.started]
        await asyncio.gather(*(m.revoke_all() for m in members))
        group.generation += 1
        group.owner.clear()
        members = [m for m in members if m.started]
        if not members:
            return
        name = queue.pop(0) if queue else members[0].name
        target = next((m for m in members if m.name == name), members[0])
        for tp in group.records:
            group.owner[tp] = target
        for member in members:
            await member.assign(set(group.records) if member is target else set())

    group._rebalance_once = once  # type: ignore[method-assign]


# -- 1. stale offsets from a fence that began before a reassignment ------------------


def test_a_fence_begun_before_a_reassignment_does_not_seek_to_stale_offsets() -> None:
    """A watchdog retry of a failed fence that outlives a revoke, another member's commits
    and a reassignment must not seek to the offsets it read before them."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        a, b = world.members
        script_rebalances(world, ["a", "b", "a"])
        real_assign = a.committer.assign
        calls = 0

        async def assign(parts: Iterable[TopicPartition]) -> Any:
            nonlocal calls
            calls += 1
            parts = list(parts)
            if calls == 1:
                raise CommitFailed("simulated: Kafka away for the first fence")
            if calls == 2:
                # the watchdog's retry: reads the offsets now, answers late
                committed = world.group.committed
                found = {
                    tp: OffsetAndMetadata(committed[tp], "") if tp in committed else None
                    for tp in parts
                }
                await asyncio.sleep(8.0)
                return found
            return await real_assign(parts)

        a.committer.assign = assign  # type: ignore[method-assign]
        a.start()
        await asyncio.sleep(6.0)  # the watchdog (every 5 s) is inside the slow fence now
        assert calls == 2
        b.start()  # everything moves to b, which sends and commits it all
        await asyncio.sleep(5.0)
        assert world.finished(), "b should have finished the group by now"
        await b.leave()  # everything moves back to a while a's old fence is still out
        await asyncio.sleep(5.0)  # the old fence answers; a must fence again, not seek there
        await world.settle()
        await world.close()
        world.check_exactly_once()

    sim.run(scenario, seed=21)


# -- 2. lag that no record will ever fill is not a stall -----------------------------


def test_a_partition_ending_in_a_transaction_marker_is_not_a_stall() -> None:
    """A source written by a transactional producer ends in a commit marker: the high
    watermark is one past the last record, the committed offset can never reach it, and
    that is no stall (no partition.stalled, /healthz stays 200)."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        for member in world.members:
            consumer = member.consumer

            def highwater(tp: TopicPartition, c: FakeConsumer = consumer) -> int | None:
                return world.group.end(tp) + 1 if tp in c._fetched else None

            async def end_offsets(tps: list[TopicPartition]) -> dict[TopicPartition, int]:
                return {tp: world.group.end(tp) + 1 for tp in tps}

            real_getmany = consumer.getmany

            async def getmany(
                *tps: TopicPartition,
                c: FakeConsumer = consumer,
                real: Any = real_getmany,
                **kw: Any,
            ) -> Any:
                # aiokafka steps over a control batch on the fetch after the last record:
                # the position then passes the marker, and nothing is handed out for it
                for tp in c._assignment:
                    if c._position.get(tp, 0) == world.group.end(tp):
                        c._position[tp] = world.group.end(tp) + 1
                return await real(*tps, **kw)

            consumer.highwater = highwater  # type: ignore[method-assign]
            consumer.end_offsets = end_offsets  # type: ignore[method-assign]
            consumer.getmany = getmany  # type: ignore[method-assign]
        member = world.members[0]
        member.start()
        await world.settle()
        await asyncio.sleep(world.settings.stall_timeout + 15.0)
        live, detail = member.pipeline.health.live()
        assert live, f"a finished partition is reported stalled: {detail}"
        await world.close()

    sim.run(scenario, seed=8)


# -- 3. a record the client cannot decode is not fatal ---------------------------------


def test_a_fetch_that_cannot_be_decoded_does_not_end_the_service() -> None:
    """getmany() raising UnicodeDecodeError (a non-UTF-8 header name) must not end run()."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        consumer = member.consumer
        real_getmany = consumer.getmany
        raised: list[bool] = []

        async def getmany(*tps: TopicPartition, **kw: Any) -> Any:
            if not raised and world.loop.time() > 1.0:
                raised.append(True)
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return await real_getmany(*tps, **kw)

        consumer.getmany = getmany  # type: ignore[method-assign]
        member.start()
        await asyncio.sleep(5.0)
        assert member.task is not None
        assert not member.task.done(), f"run() ended: {member.task.exception()!r}"
        await world.settle()
        await world.close()

    sim.run(scenario, seed=9)


# -- 4. pause/resume of a partition the consumer no longer holds -----------------------


def test_a_subscription_change_under_backpressure_does_not_end_the_service() -> None:
    """With a topic pattern, aiokafka replaces the subscription when a matching topic
    appears: assignment() is empty and pause()/resume() raise until the rebalance revokes
    the old partitions. Back-pressure in that window must not end run()."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        consumer = member.consumer
        real_pause, real_resume = consumer.pause, consumer.resume

        def held(tps: tuple[TopicPartition, ...]) -> None:
            # aiokafka: SubscriptionState._assigned_state asserts an assignment exists
            missing = [tp for tp in tps if tp not in consumer._assignment]
            assert not missing, f"no current assignment for {missing[0]}"

        def pause(*tps: TopicPartition) -> None:
            held(tps)
            real_pause(*tps)

        def resume(*tps: TopicPartition) -> None:
            held(tps)
            real_resume(*tps)

        consumer.pause = pause  # type: ignore[method-assign]
        consumer.resume = resume  # type: ignore[method-assign]
        member.start()
        await asyncio.sleep(1.0)
        # a new topic matched the pattern: the old assignment is gone, the rebalance follows
        consumer._assignment = set()
        await asyncio.sleep(3.0)
        assert member.task is not None
        assert not member.task.done(), f"run() ended: {member.task.exception()!r}"
        await world.group.rebalance()
        await world.settle()
        await world.close()

    sim.run(scenario, seed=10, settings=sim.sim_settings(max_pending_per_partition=2))


# -- 5. a commit whose answer was lost must not write its letters again -----------------


@pytest.mark.kafka
async def test_letters_of_a_commit_that_landed_despite_an_error_are_not_written_again(
    kafka_bootstrap: str, new_topic: Any, make_committer: MakeCommitter
) -> None:
    """The transaction commits but its answer is lost (timeout, cancellation at shutdown):
    CommitFailed. The pipeline keeps the letters and commits further on with them; the
    letters the landed transaction wrote must not be written a second time."""
    tp, dlq = await source_and_dlq(new_topic)
    owner = make_committer("g-review-ambiguous")
    await owner.assign([tp])
    producer = owner._slots[tp].producer
    assert producer is not None
    real_commit = producer.commit_transaction

    async def commit_then_lose_the_answer() -> None:
        await real_commit()
        raise KafkaTimeoutError("answer lost after the broker committed")

    producer.commit_transaction = commit_then_lose_the_answer  # type: ignore[method-assign]
    with pytest.raises(CommitFailed):
        await owner.commit(tp, 3, "", [dead(tp, 1)])
    # what the pipeline does next: the letter is still unwritten in its eyes
    await owner.commit(tp, 6, "", [dead(tp, 1), dead(tp, 4)])
    assert source_offsets(await read_to_end(kafka_bootstrap, dlq)) == [1, 4]
