"""Rebalance: taking partitions over and letting them go.

aiokafka's eager protocol revokes everything at every rebalance. On assignment,
the committer fences the previous owners of each partition (their last
transaction completes or aborts), reads the committed offset and plan after the
fence, and each partition is sought there before anything of it is processed.
On revoke, nothing new starts, what is on the wire may finish within
DRAIN_TIMEOUT, the done prefix is committed, and every trace of the partition goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer.batching import PartitionPlanner, Plan, recover
from consumer.errors import CommitFailed, DeadLetterUnavailable
from consumer.logs import LogEvent
from consumer.state import PartitionState

if TYPE_CHECKING:
    from consumer.backpressure import BackPressure
    from consumer.commit import Commits
    from consumer.dispatch import Dispatcher
    from consumer.health import Health
    from consumer.metrics import Metrics
    from consumer.state import Engine

__all__ = ["Rebalance"]

log = structlog.get_logger("consumer.rebalance")


class Rebalance:
    """Assignment and revocation of partitions, for the driver's rebalance listener."""

    def __init__(
        self,
        *,
        engine: Engine,
        consumer: Any,
        client: Any,
        dispatch: Dispatcher,
        commits: Commits,
        backpressure: BackPressure,
        metrics: Metrics,
        health: Health,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._consumer = consumer
        self._client = client
        self._dispatch = dispatch
        self._commits = commits
        self._backpressure = backpressure
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._ready_lock = asyncio.Lock()
        #: bumped by every assignment and revoke of a partition (see `make_ready`)
        self._epochs: dict[TopicPartition, int] = {}

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Fence the previous owners, then start each partition at its committed offset.

        aiokafka installs the assignment, and may read committed offsets and fetch,
        before this callback ends; that read may predate the fence (a zombie's last
        transaction could land after it). Records handed out before a partition's
        state exists are dropped by the intake, and each partition is sought to the
        committed offset the committer read after fencing. If the committer cannot
        fence (Kafka away), the partitions stay paused and are tried again.
        """
        engine = self._engine
        # Every rebalance revokes everything first (eager protocol); state left from
        # before means that revoke never reached us (a subscription swapped under it).
        # Its work is dropped uncommitted: the generation it belongs to is gone.
        leftover = set(engine.parts) | engine.unready
        if leftover:
            log.warning(
                LogEvent.REVOKED,
                partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in leftover),
                implicit=True,
            )
            await self._dispatch.drain(leftover, self._engine.settings.drain_timeout)
            self.forget(leftover)
        if not assigned:
            self._report_assignment()
            return
        self._backpressure.pause(assigned)
        for tp in assigned:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        engine.unready.update(assigned)
        if engine.unready_since is None:
            engine.unready_since = self._clock()
        await self.make_ready()
        log.info(
            LogEvent.ASSIGNED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )

    async def make_ready(self) -> None:
        """Fence and seek the partitions still waiting for it (see `on_assigned`)."""
        async with self._ready_lock:
            await self._make_ready_locked()

    async def _make_ready_locked(self) -> None:
        engine = self._engine
        consumer = self._consumer
        tps = sorted(engine.unready & consumer.assignment())
        engine.unready.intersection_update(tps)
        if not tps:
            engine.unready_since = None
            self._report_assignment()
            return
        # An assignment (or a revoke) that lands during the awaits below makes this
        # round's offsets stale for its partitions: each is checked against its epoch.
        epochs = {tp: self._epochs.get(tp, 0) for tp in tps}
        try:
            offsets = await self._commits.committer.assign(tps)
        except CommitFailed as exc:
            log.warning(LogEvent.ASSIGN_FAILED, partitions=len(tps), error=str(exc))
            return
        # Committed by a writer that records no plans (an older version): whatever it
        # had read may have gone out singly, so up to the end offset all goes singly.
        foreign = [
            tp
            for tp in tps
            if (found := offsets.get(tp)) is not None and Plan.decode(found.metadata) is None
        ]
        ends: Mapping[TopicPartition, int] = {}
        if foreign:
            try:
                ends = await consumer.end_offsets(foreign)
            except (KafkaError, TimeoutError) as exc:
                log.warning(LogEvent.ASSIGN_FAILED, partitions=len(tps), error=type(exc).__name__)
                return
        ready = []
        for tp in tps:
            if not self._current_epoch(tp, epochs[tp]):
                continue  # revoked, reassigned or stopping meanwhile: a newer round does it
            found = offsets.get(tp)
            position = None if found is None else found.offset
            plan, _ = recover(found.metadata if found else None, position, ends.get(tp))
            part = PartitionState(
                generation=engine.ledger.assign(tp, committed=position),
                progress_at=self._clock(),
                start=position,
                planner=PartitionPlanner(plan),
            )
            await self.seek_start(tp, part)
            if not self._current_epoch(tp, epochs[tp]):
                continue
            engine.parts[tp] = part
            engine.paused.discard(tp)
            engine.unready.discard(tp)
            ready.append(tp)
        if not engine.unready:
            engine.unready_since = None
        self._backpressure.resume(ready)
        self._report_assignment()

    async def seek_start(self, tp: TopicPartition, part: PartitionState) -> None:
        """Position the consumer where `part` starts: its committed offset, or the reset."""
        with contextlib.suppress(KafkaError, AssertionError):
            if part.start is not None:
                self._consumer.seek(tp, part.start)
            elif self._engine.settings.kafka_auto_offset_reset == "earliest":
                await self._consumer.seek_to_beginning(tp)

    def _current_epoch(self, tp: TopicPartition, epoch: int) -> bool:
        return (
            self._epochs.get(tp, 0) == epoch
            and tp in self._engine.unready
            and tp in self._consumer.assignment()
        )

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Start no new sends for `revoked`, drain what is in flight, commit, let go."""
        if not revoked:
            return
        started = self._clock()
        try:
            await self._dispatch.drain(revoked, self._engine.settings.drain_timeout)
            await self._commits.commit(reason="revoke", only=revoked)
        finally:
            self.forget(revoked)
            with contextlib.suppress(KafkaError, CommitFailed, DeadLetterUnavailable):
                await self._commits.committer.revoke(revoked)
        log.info(
            LogEvent.REVOKED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked),
            drained_in_ms=round((self._clock() - started) * 1000),
        )

    def fenced(self, tp: TopicPartition) -> None:
        """A newer owner has `tp`: nothing more of ours may land."""
        self._backpressure.pause({tp})
        self.forget({tp})

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop every trace of `tps`: lanes, works, unwritten letters, ledger, metrics."""
        engine = self._engine
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        engine.unready.difference_update(tps)
        if not engine.unready:
            engine.unready_since = None
        self._dispatch.forget(tps)
        for tp in tps:
            part = engine.parts.pop(tp, None)
            if part is not None:
                for work in part.works.values():
                    work.trace.end("revoked")
                for letter_trace in part.letter_traces.values():
                    letter_trace.end("revoked")
                engine.pending_bytes -= part.letter_bytes
                engine.pending_bytes -= sum(work.size for work in part.works.values())
            engine.ledger.revoke(tp)
            engine.paused.discard(tp)
            self._metrics.forget_partition(tp.topic, tp.partition)
        self._commits.refresh_dlq_state()
        self._report_assignment()

    def _report_assignment(self) -> None:
        parts = len(self._engine.parts)
        self._health.set_assigned(parts)
        self._metrics.assigned_partitions.set(parts)
        self._share_rate_limit()

    def _share_rate_limit(self) -> None:
        """Tell the limiter this member's share of the group: its partitions over all."""
        limiter = getattr(self._client, "limiter", None)
        consumer = self._consumer
        partitions_for = getattr(consumer, "partitions_for_topic", None)
        subscription = getattr(consumer, "subscription", None)
        if limiter is None or partitions_for is None or subscription is None:
            return
        try:
            assigned = len(consumer.assignment())
            total = sum(len(partitions_for(topic) or ()) for topic in subscription())
        except Exception:  # metadata not known yet: keep the share as it is
            return
        if assigned and total:
            limiter.set_share(min(1.0, assigned / total))
