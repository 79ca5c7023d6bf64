"""Commit: when offsets, plans and dead letters become durable.

An offset becomes committable only when its record's outcome is final: Resend
acknowledged it, a policy skipped it, or it is a dead letter that the committer
(`consumer.committer`) writes in the same step as the commit that covers it
(invariants 1 and 10). `Commits` commits each partition's contiguous done
prefix (`consumer.offsets`) on a timer, on revoke and on shutdown, never inside
a recorded batch, and records the batch planner's new decisions in the commit
metadata, at an unchanged offset, before any of them is sent (`consumer.batching`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from aiokafka import TopicPartition

from consumer.errors import CommitFailed, DeadLetterUnavailable, PartitionFenced
from consumer.logs import LogEvent
from consumer.tracing import NO_COMMIT, NO_LETTER

if TYPE_CHECKING:
    from consumer.committer import Committer
    from consumer.deadletter import DeadLetter
    from consumer.dispatch import Planning
    from consumer.health import Health
    from consumer.metrics import Metrics
    from consumer.state import Engine, PartitionState
    from consumer.tracing import Tracer

__all__ = ["Commits"]

log = structlog.get_logger("consumer.commit")


class Commits:
    """What to commit, and when: positions, plans and the dead letters they cover."""

    def __init__(
        self,
        *,
        engine: Engine,
        committer: Committer,
        planning: Planning,
        metrics: Metrics,
        health: Health,
        tracer: Tracer,
        on_fenced: Callable[[TopicPartition], None],
    ) -> None:
        self._engine = engine
        self.committer = committer
        self._planning = planning
        self._metrics = metrics
        self._health = health
        self._tracer = tracer
        #: a newer owner has the partition: the driver pauses and forgets it
        self._on_fenced = on_fenced
        self.lock = asyncio.Lock()

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._engine.settings.commit_interval)
            try:
                await self.commit(reason="interval")
            except Exception as exc:  # a bug here must not end commits for good
                log.error(
                    LogEvent.INTERNAL_ERROR, stage="commit", error=type(exc).__name__, exc_info=exc
                )

    async def record(self, tps: set[TopicPartition]) -> None:
        """Record the new decisions of `tps` (the planning loop's commit)."""
        await self.commit(reason="plan", only=tps)

    async def commit(self, *, reason: str, only: set[TopicPartition] | None = None) -> None:
        engine = self._engine
        ledger = engine.ledger
        async with self.lock:
            jobs = []
            for tp, part in engine.parts.items():
                if only is not None and tp not in only:
                    continue
                position = ledger.position(tp)
                committed = ledger.committed(tp)
                if position is None:
                    continue
                position = max(part.planner.safe_position(position), committed or 0)
                if part.planner.needs_record() and not part.plan_full:
                    # Decisions wait for this commit before anything of them is sent: it
                    # carries no letters, so a dead-letter outage cannot hold sends back.
                    first = min((letter.offset for letter in part.letters), default=position)
                    # (a letter between two members of a batch: stop before the batch)
                    at = max(part.planner.safe_position(min(position, first)), committed or 0)
                    jobs.append(self._record_then_letters(tp, part, at, reason))
                    continue
                if committed is not None and position <= committed:
                    continue
                letters = [letter for letter in part.letters if letter.offset < position]
                jobs.append(self._commit_one(tp, part, position, letters, reason))
            if jobs:
                await asyncio.gather(*jobs)
            self.refresh_dlq_state()

    async def _record_then_letters(
        self, tp: TopicPartition, part: PartitionState, position: int, reason: str
    ) -> None:
        """Record new decisions, then write waiting letters and move past them.

        The letters cannot wait for a round with nothing to record: while intake
        goes on there always is, and a letter between members of a recorded batch
        holds the commit before that batch, so the plan would fill its metadata
        budget and stop deciding anything.
        """
        await self._record_one(tp, part, position, reason)
        if self._engine.parts.get(tp) is not part or not part.letters:
            return
        ledger = self._engine.ledger
        current = ledger.position(tp)
        committed = ledger.committed(tp)
        if current is None:
            return
        current = max(part.planner.safe_position(current), committed or 0)
        if committed is not None and current <= committed:
            return
        letters = [letter for letter in part.letters if letter.offset < current]
        if letters:
            await self._commit_one(tp, part, current, letters, reason)

    async def _record_one(
        self, tp: TopicPartition, part: PartitionState, position: int, reason: str
    ) -> None:
        """Commit `position` (never past a letter) with the partition's new decisions."""
        metadata, token, plan = part.planner.snapshot(position)
        try:
            await self.committer.commit(tp, position, metadata, ())
        except (CommitFailed, DeadLetterUnavailable) as exc:
            log.warning(LogEvent.COMMIT_FAILED, reason=reason, error=str(exc))
            return
        except PartitionFenced as exc:
            self._fenced(tp, part, exc)
            return
        if self._engine.parts.get(tp) is not part:
            return  # revoked meanwhile: the next owner honours what was recorded
        self._committed(tp, part, position, [])
        # nothing fitted: wait for commits past listed batches, do not spin committing
        part.plan_full = token == 0
        for unit in part.planner.recorded(token, plan):
            self._planning.submit(tp, part, unit)

    async def _commit_one(
        self,
        tp: TopicPartition,
        part: PartitionState,
        position: int,
        letters: list[DeadLetter],
        reason: str,
    ) -> None:
        trace = (
            self._tracer.commit(
                topic=tp.topic,
                partition=tp.partition,
                position=position,
                events=[t for offset, t in part.traced if offset < position],
            )
            if self._tracer.enabled
            else NO_COMMIT
        )
        try:
            if letters:
                # What comes before the first letter goes first, so that a dead-letter
                # topic that is slow or gone holds back only what it must.
                first = part.planner.safe_position(min(letter.offset for letter in letters))
                committed = self._engine.ledger.committed(tp)
                if committed is None or first > committed:
                    await self.committer.commit(tp, first, part.planner.metadata(first), ())
                    self._committed(tp, part, first, [])
            await self.committer.commit(tp, position, part.planner.metadata(position), letters)
        except DeadLetterUnavailable as exc:
            trace.end(type(exc).__name__)
            if not part.dlq_failed:
                part.dlq_failed = True
                log.error(LogEvent.DLQ_UNAVAILABLE, error=str(exc), topic=tp.topic)
            return
        except CommitFailed as exc:
            trace.end(type(exc).__name__)
            # a rebalance or a coordinator move: keep the positions, try again later
            log.warning(LogEvent.COMMIT_FAILED, reason=reason, error=str(exc))
            return
        except PartitionFenced as exc:
            trace.end(type(exc).__name__)
            self._fenced(tp, part, exc)
            return
        trace.end()
        self._committed(tp, part, position, letters)
        if letters and part.dlq_failed:
            part.dlq_failed = False
        log.debug(LogEvent.COMMITTED, reason=reason, topic=tp.topic, position=position)

    def _fenced(self, tp: TopicPartition, part: PartitionState, exc: PartitionFenced) -> None:
        # a newer owner has it (we are the zombie): nothing more of ours may land
        log.warning(
            LogEvent.PARTITION_FENCED, topic=tp.topic, partition=tp.partition, error=str(exc)
        )
        if self._engine.parts.get(tp) is part:
            self._on_fenced(tp)

    def _committed(
        self, tp: TopicPartition, part: PartitionState, position: int, letters: list[DeadLetter]
    ) -> None:
        engine = self._engine
        if engine.parts.get(tp) is not part:
            return  # revoked meanwhile: its state is gone
        before = engine.ledger.committed(tp)
        engine.ledger.mark_committed(tp, position, part.generation)
        part.planner.committed(position)
        if part.plan_full and (before is None or position > before):
            part.plan_full = False  # listed batches committed past: room for new decisions
            engine.plan_due.set()
        self._metrics.committed_offset.labels(topic=tp.topic, partition=tp.partition).set(position)
        if part.traced:
            part.traced = [(offset, t) for offset, t in part.traced if offset >= position]
        if not letters:
            return
        written = {id(letter) for letter in letters}
        part.letters = [letter for letter in part.letters if id(letter) not in written]
        for letter in letters:
            size = len(letter.value or b"")
            part.letter_bytes -= size
            engine.pending_bytes -= size
            self._metrics.dead_letters.labels(reason=letter.reason).inc()
            part.letter_traces.pop(id(letter), NO_LETTER).end()
        engine.dead_lettered += len(letters)

    def refresh_dlq_state(self) -> None:
        """The dead-letter condition holds while any assigned partition fails to write one."""
        engine = self._engine
        down = any(part.dlq_failed for part in engine.parts.values())
        if down != engine.dlq_down:
            engine.dlq_down = down
            self._health.set_circuit(down, "dlq_unavailable")
            if not down:
                log.info(LogEvent.DLQ_AVAILABLE)
