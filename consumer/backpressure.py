"""Back-pressure: pause partitions, never stop polling (invariant 4).

Once fetched-but-unfinished records reach their count or byte bound, partitions
are paused, and resumed below a low-water mark. Service-wide conditions pause
every partition and keep offsets (invariant 3) -- but only while a delivery
waits at the gate, so that after a rebalance new records arrive and probe it
(nothing else would). Urgent mail is never held back by other partitions'
backlog count (memory still bounds it), and a recovered batch may finish
assembling within twice the byte bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer.logs import LogEvent

if TYPE_CHECKING:
    from consumer.metrics import Metrics
    from consumer.retry import ServiceGate
    from consumer.state import Engine

__all__ = ["BackPressure"]

log = structlog.get_logger("consumer.backpressure")


class BackPressure:
    """Decides which partitions fetch, from memory held and service conditions."""

    def __init__(
        self, *, engine: Engine, consumer: Any, gate: ServiceGate, metrics: Metrics
    ) -> None:
        self._engine = engine
        self._consumer = consumer
        self._gate = gate
        self._metrics = metrics

    def pause(self, tps: Iterable[TopicPartition]) -> None:
        self._each(self._consumer.pause, tps)

    def resume(self, tps: Iterable[TopicPartition]) -> None:
        self._each(self._consumer.resume, tps)

    def _each(self, call: Callable[[TopicPartition], None], tps: Iterable[TopicPartition]) -> None:
        """`call` for each partition still assigned; one at a time, since aiokafka raises
        for the first one it no longer has (a pattern subscription being swapped)."""
        assigned = self._consumer.assignment()
        for tp in tps:
            if tp in assigned:
                with contextlib.suppress(KafkaError, AssertionError):
                    call(tp)

    def apply(self) -> None:
        """Pause what is over its bound, resume what is below the low-water mark."""
        engine = self._engine
        s = engine.settings
        paused = engine.paused
        total = engine.ledger.total_pending()
        held = engine.pending_bytes
        # An open gate holds intake only while a delivery waits there to probe it:
        # with none (all cancelled by a revoke) new records must come in and probe.
        gate_hold = self._gate.state != "closed" and engine.delivering > 0
        hold_all = gate_hold or engine.dlq_down
        count_over = total >= s.max_pending
        bytes_over = held >= s.max_pending_bytes
        # memory is never exempt, except that a recovered batch may finish assembling
        # (at most MAX_BATCH records) within twice the bound
        bytes_hard = held >= 2 * s.max_pending_bytes
        count_low = total < s.max_pending * s.resume_ratio
        bytes_low = held < s.max_pending_bytes * s.resume_ratio
        to_pause: list[TopicPartition] = []
        to_resume: list[TopicPartition] = []
        for tp, part in engine.parts.items():
            pending = engine.ledger.pending(tp)
            # A recovered batch is sent only whole: its partition fetches on until
            # every member is in. A partition with urgent mail unfinished is not held
            # back by the count of other partitions' backlog (memory still bounds it).
            assembling = part.planner.assembling()
            urgent = part.urgent > 0
            # records in the open batch wait for more to fill it: a partition holding
            # only those holds nothing the count bound should stop (a paused one would
            # close its batch half full at the linger, spending a request on it)
            opened = part.planner.open_batch()
            filling = opened.members if opened is not None else 0
            if tp in paused:
                below = pending < s.max_pending_per_partition * s.resume_ratio
                if hold_all:
                    continue
                assembles = assembling and not bytes_hard
                # an empty partition holds nothing: the count bound cannot pause it
                # (a fetch over the bound takes one record), or the urgent mail it may
                # carry next would wait for every other partition's backlog
                if assembles or (
                    below and bytes_low and (count_low or urgent or pending <= filling)
                ):
                    to_resume.append(tp)
            elif hold_all:
                to_pause.append(tp)
            elif assembling:
                if bytes_hard:
                    to_pause.append(tp)
            elif (
                bytes_over
                or (count_over and not urgent and pending > filling)
                or pending >= s.max_pending_per_partition
            ):
                to_pause.append(tp)
        if to_pause:
            self.pause(to_pause)
            paused.update(to_pause)
            log.info(
                LogEvent.PAUSED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_pause],
                pending=total,
                pending_bytes=held,
                reason="service_condition" if hold_all else "backlog",
            )
        if to_resume:
            self.resume(to_resume)
            paused.difference_update(to_resume)
            log.info(
                LogEvent.RESUMED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_resume],
                pending=total,
            )
        self._metrics.paused_partitions.set(len(paused))
