"""What the engine's stages share: work items, partition state, and who owns what.

The stages (`pipeline` the Kafka driver, `dispatch`, `outcome`, `commit`,
`backpressure`, `watchdog`) each hold a reference to one `Engine`, the state of
the partitions this member owns in this generation. Nothing here does I/O.

A `Work` is one fetched record on its way to a final outcome; it carries one
payload, what `Preparer.prepare` made of the record. A `BatchJob` is one
recorded batch of works, sent as one request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from consumer.batching import PartitionPlanner, Plan, PlannedBatch, Priority
from consumer.deadletter import DeadLetter
from consumer.offsets import OffsetLedger
from consumer.prepare import Payload, Prepared, Skipped
from consumer.settings import Settings
from consumer.tracing import NO_ATTEMPT, NO_EVENT, AttemptTrace, EventTrace, LetterTrace

__all__ = ["BatchJob", "Engine", "PartitionState", "Work"]


@dataclass(slots=True, eq=False)
class Work:
    """One fetched record on its way to a final outcome."""

    tp: TopicPartition
    offset: int
    generation: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp_ms: int | None
    fetched_at: float
    payload: Payload
    #: bytes held in memory for it (value and rendered body), released when finished
    size: int = 0
    #: an HTTP attempt is under way: a drain waits for it
    busy: bool = False
    #: its `process` span (a shared no-op while tracing is off)
    trace: EventTrace = NO_EVENT
    attempt_trace: AttemptTrace = NO_ATTEMPT
    attempts_traced: int = 0

    @property
    def prepared(self) -> Prepared | None:
        """The email request, when the record became one."""
        payload = self.payload
        return payload if isinstance(payload, Prepared) else None

    @property
    def idempotency_key(self) -> str | None:
        payload = self.payload
        return None if isinstance(payload, Skipped) else payload.idempotency_key

    @property
    def urgent(self) -> bool:
        payload = self.payload
        return isinstance(payload, Prepared) and payload.priority == Priority.URGENT


@dataclass(slots=True, eq=False)
class BatchJob:
    """A recorded batch on its way: one request for its members, in every member's lane."""

    tp: TopicPartition
    generation: int
    batch: PlannedBatch
    works: list[Work]
    lanes: int
    priority: int = 1
    arrived: int = 0
    busy: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True, eq=False)
class PartitionState:
    """Engine state of one assigned partition within one generation."""

    generation: int
    #: last time it finished an offset, admitted a record or was explained
    progress_at: float
    #: the committed offset it started from (None: none, the reset policy applies)
    start: int | None = None
    #: admitted, unfinished work by offset
    works: dict[int, Work] = field(default_factory=dict)
    #: finished as dead letters; written by the commit that covers their offset
    letters: list[DeadLetter] = field(default_factory=list)
    letter_bytes: int = 0
    revoking: bool = False
    dlq_failed: bool = False
    stalled: bool = False
    lag: int = 0
    #: end offset minus the consumer's fetch position
    behind: int = 0
    #: finished events' spans, linked from the commit that covers them (tracing on)
    traced: list[tuple[int, EventTrace]] = field(default_factory=list)
    letter_traces: dict[int, LetterTrace] = field(default_factory=dict)
    #: how each offset is sent, decided once and recorded before sending (batches)
    planner: PartitionPlanner[Work] = field(default_factory=lambda: PartitionPlanner(Plan()))
    #: unfinished urgent events: while any, other partitions' backlog does not pause it
    urgent: int = 0
    #: the plan's metadata is full: nothing more is recorded until a commit frees room
    plan_full: bool = False


class Engine:
    """The partitions owned now, the offset ledger, the memory held and live counters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = OffsetLedger()
        self.parts: dict[TopicPartition, PartitionState] = {}
        self.paused: set[TopicPartition] = set()
        #: assigned but not fenced and sought yet (the committer could not reach Kafka)
        self.unready: set[TopicPartition] = set()
        self.unready_since: float | None = None
        #: bytes of admitted records, rendered bodies and unwritten dead letters
        self.pending_bytes = 0
        #: deliveries inside deliver(): while the gate is open, one of them probes it
        self.delivering = 0
        self.dlq_down = False
        self.broker_ok = True
        #: set when a partition has decisions to record (or a batch to close) now
        self.plan_due = asyncio.Event()
        # live counters for repr, the progress line and the tests
        self.done = 0
        self.dead_lettered = 0
        self.skipped = 0
        self.in_flight = 0
        self.stalled = 0

    def owns(self, tp: TopicPartition, part: PartitionState) -> bool:
        """`part` is still `tp`'s state and not being revoked: new work may start for it.

        The one ownership check: a revoke sets `revoking`, a reassignment replaces
        the state (a new generation), and either ends every new send of the old one.
        """
        return self.parts.get(tp) is part and not part.revoking

    def current(self, work: Work | BatchJob) -> PartitionState | None:
        """The partition state `work` belongs to, if its generation is still assigned."""
        part = self.parts.get(work.tp)
        return part if part is not None and part.generation == work.generation else None

    def may_start(self, work: Work | BatchJob) -> bool:
        """New sends start only for partitions owned and not being revoked."""
        part = self.current(work)
        return part is not None and self.owns(work.tp, part)

    def oldest_events(self) -> Iterator[tuple[str, int, float]]:
        """Per partition with unfinished work: the oldest event time among that work.

        The event time is the one MAX_EVENT_AGE is measured from (the CloudEvent's
        `time`), else the Kafka record timestamp.
        """
        for tp, part in list(self.parts.items()):
            oldest: float | None = None
            for work in list(part.works.values()):
                prepared = work.prepared
                when = prepared.event_time if prepared is not None else None
                if when is None and work.timestamp_ms is not None:
                    when = work.timestamp_ms / 1000
                if when is not None and (oldest is None or when < oldest):
                    oldest = when
            if oldest is not None:
                yield tp.topic, tp.partition, oldest
