"""The Kafka driver: intake, lanes, back-pressure, rebalance, commit, watchdog, drain.

One fetch loop keeps calling `getmany()` whatever Resend does, so the member
never leaves the group for being slow (invariant 5). Each fetched record is
tracked in the offset ledger at once, prepared (decode, route, key, render)
inline, and handed to an ordering lane; lanes run deliveries concurrently,
bounded by a global in-flight semaphore held only during HTTP attempts.

An offset becomes committable only when its record's outcome is final: Resend
acknowledged it, or a policy skipped it, or it is a dead letter that the
committer writes in the same step as the commit that covers it (invariants 1
and 10). The committer commits the ledger's contiguous done prefix on a timer,
on revoke and on shutdown.

Back-pressure pauses partitions (never stops polling) once fetched-but-
unfinished records reach their count or byte bound, and resumes them below a
low-water mark (invariant 4). Service-wide conditions pause every partition
and keep offsets (invariant 3) -- but only while a delivery waits at the gate,
so that after a rebalance new records arrive and probe it (nothing else would).

A watchdog checks invariant 8: a partition with work (pending records,
unwritten dead letters or lag) that finishes nothing for `STALL_TIMEOUT` while
nothing explains it (a service-wide condition, a delivery of it under way, an
unreachable broker) is a stall; it is logged once, counted, and fails liveness.

The driver takes its Kafka consumer and committer from outside (`consumer.service`
builds the real ones; the simulation tests pass fakes):

    Kafka -> _intake -> _admit -> Lane -> _process -> deliver() -> _finish
          <- Committer.commit(position, dead letters) <- OffsetLedger <--/
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from consumer import __version__
from consumer.batching import Item, PartitionPlanner, Plan, PlannedBatch, Priority, Unit, recover
from consumer.deadletter import DeadLetter, DeadLetterWriter
from consumer.errors import CommitFailed, DeadLetterUnavailable, PartitionFenced
from consumer.events import Reason
from consumer.fetch import RecordFetcher, Undecodable
from consumer.health import Health
from consumer.logs import LogEvent, log_outcome
from consumer.metrics import Metrics
from consumer.observe import ProgressReporter
from consumer.offsets import OffsetLedger
from consumer.prepare import Prepared, Preparer, Rejected, Skipped
from consumer.resend import ENDPOINT_BATCH, HEADER_BATCH_VALIDATION
from consumer.retry import DeliveryResult, RetryPolicy, ServiceGate, deliver
from consumer.settings import Settings
from consumer.tracing import (
    NO_ATTEMPT,
    NO_COMMIT,
    NO_EVENT,
    NO_LETTER,
    NO_TRACER,
    AttemptTrace,
    EventTrace,
    LetterTrace,
    Tracer,
)

log = structlog.get_logger("consumer.pipeline")

#: outcome labels of the canonical per-event log line and the events metric
SENT: Final = "sent"
DEAD_LETTERED: Final = "dead_lettered"
SKIPPED: Final = "skipped"

#: commit metadata of versions before batch plans (a plan replaced it, see consumer.batching)
COMMIT_METADATA: Final = f"resend-consumer/{__version__}"
#: how early a timer may fire and still count as on time (asyncio fires within the clock resolution)
_TIMER_SLACK: Final = 0.001
#: outcome reason of a second copy of an email that went out in a batch
REASON_DUPLICATE: Final = "duplicate"
#: reason of a batch member Resend refused (as for a single send answered 422)
REASON_MEMBER_REFUSED: Final = "validation_error"
#: per-member errors instead of refusing a whole batch for one bad email
BATCH_HEADERS: Final = {HEADER_BATCH_VALIDATION: "permissive"}

#: seconds between two broker reachability checks (and their timeout)
BROKER_CHECK_INTERVAL: Final = 5.0
#: where an idle gate's probe goes (an empty body: refused, nothing is sent)
PROBE_ENDPOINT: Final = "/emails"
#: records admitted between two yields to the event loop
ADMIT_SLICE: Final = 256


# -- the seams --------------------------------------------------------------------


class Consumer(Protocol):
    """What the driver uses of `AIOKafkaConsumer` (the simulation's fake has the same)."""

    def subscribe(self, topics: Sequence[str] = (), pattern: str | None = None, **kw: Any) -> None:
        """Subscribe with a rebalance listener (keyword `listener`)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool: ...
    async def topics(self) -> set[str]: ...


class Committer(Protocol):
    """Commits a partition's position together with the dead letters it covers.

    `assign` fences earlier owners of the partitions and returns their committed
    offsets read after the fence (`OffsetAndMetadata`, or None when nothing is
    committed). `commit` returns only once letters and position are durable, or
    raises: `DeadLetterUnavailable` when a letter could not be written,
    `CommitFailed` when nothing happened (commit the same again), `PartitionFenced`
    when a newer owner has the partition. Nothing of a failed call becomes visible.
    """

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> Mapping[TopicPartition, OffsetAndMetadata | None]: ...
    async def commit(
        self, tp: TopicPartition, position: int, metadata: str, letters: Sequence[DeadLetter]
    ) -> None: ...
    async def revoke(self, partitions: Iterable[TopicPartition]) -> None: ...
    async def stop(self) -> None: ...


class ConsumerCommitter:
    """Dead letters through an idempotent producer, then the consumer's own offset commit.

    For brokers where transactions are not allowed (KAFKA_TRANSACTIONS=false): at
    least once for dead letters, since a crash between the two writes a letter again.
    """

    def __init__(self, *, consumer: Any, writer: DeadLetterWriter, timeout: float) -> None:
        self._consumer = consumer
        self._writer = writer
        self._timeout = timeout

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        tps = sorted(partitions)
        try:
            # offsets with their metadata (the batch plan): `committed()` drops it
            found = await asyncio.wait_for(
                self._consumer._coordinator.fetch_committed_offsets(tps), self._timeout
            )
        except (KafkaError, TimeoutError) as exc:
            raise CommitFailed(f"committed offsets not read: {type(exc).__name__}") from None
        out: dict[TopicPartition, OffsetAndMetadata | None] = {}
        for tp in tps:
            meta = found.get(tp)
            out[tp] = meta if meta is not None and meta.offset >= 0 else None
        return out

    async def commit(
        self, tp: TopicPartition, position: int, metadata: str, letters: Sequence[DeadLetter]
    ) -> None:
        for letter in letters:
            await self._writer.write(letter)
        try:
            # aiokafka retries a commit for as long as the coordinator is away; a
            # revoke or a shutdown must not wait that long behind the commit lock
            await asyncio.wait_for(self._consumer.commit({tp: (position, metadata)}), self._timeout)
        except (KafkaError, TimeoutError) as exc:
            where = f"{tp.topic}[{tp.partition}]"
            raise CommitFailed(f"commit of {where}: {type(exc).__name__}") from None

    async def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        return None

    async def stop(self) -> None:
        return None


# -- state ------------------------------------------------------------------------


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
    #: bytes held in memory for it (value and rendered body), released when finished
    size: int = 0
    prepared: Prepared | None = None
    rejected: Rejected | None = None
    #: an HTTP attempt is under way: a drain waits for it
    busy: bool = False
    #: its `process` span (a shared no-op while tracing is off)
    trace: EventTrace = NO_EVENT
    attempt_trace: AttemptTrace = NO_ATTEMPT
    attempts_traced: int = 0


@dataclass(slots=True, eq=False)
class Lane:
    """Work that must go one at a time, in offset order."""

    queue: deque[Work | BatchJob] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    current: Work | BatchJob | None = None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()


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
class _Part:
    """Driver state of one assigned partition within one generation."""

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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._pipeline.on_assigned(set(assigned))


class Pipeline:
    """Consumes events and turns each into exactly one acknowledged email (in effect)."""

    def __init__(
        self,
        *,
        settings: Settings,
        preparer: Preparer,
        client: Any,
        gate: ServiceGate,
        policy: RetryPolicy,
        metrics: Metrics,
        health: Health,
        consumer: Consumer,
        committer: Committer,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.settings = settings
        self.preparer = preparer
        self.client = client
        self.gate = gate
        self.policy = policy
        self.metrics = metrics
        self.health = health
        self.ledger = OffsetLedger()
        self._consumer = consumer
        self._committer = committer
        # the event loop's clock by default (what asyncio's sleeps and timeouts use)
        self._clock = clock or time.monotonic
        #: epoch seconds, for event ages (the simulation moves it with virtual time)
        self._wall = wall_clock
        self.tracer = tracer
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._lanes: dict[tuple[TopicPartition, object], Lane] = {}
        self._key_locks: dict[str, list[Any]] = {}  # key -> [lock, users]
        self._parts: dict[TopicPartition, _Part] = {}
        self._paused: set[TopicPartition] = set()
        #: assigned but not fenced and sought yet (the committer could not reach Kafka)
        self._unready: set[TopicPartition] = set()
        self._unready_since: float | None = None
        self._ready_lock = asyncio.Lock()
        self._unready_reported = False
        #: bumped by every assignment and revoke of a partition (see `_make_ready`)
        self._epochs: dict[TopicPartition, int] = {}
        self._commit_lock = asyncio.Lock()
        #: set when a partition has decisions to record (or a batch to close) now
        self._plan_due = asyncio.Event()
        self._dlq_down = False
        self._broker_ok = True
        #: deliveries inside deliver(): while the gate is open, one of them probes it
        self._delivering = 0
        #: bytes of admitted records, rendered bodies and unwritten dead letters
        self.pending_bytes = 0
        # A concrete logger, bound once: the module's lazy proxy rebuilds one per call,
        # which is a measurable share of the per-event cost of the outcome line.
        self._log = log.bind()
        self._event_counters: dict[tuple[str, str], Any] = {}
        # live counters for repr and the progress line
        self.done = 0
        self.dead_lettered = 0
        self.skipped = 0
        self.in_flight = 0
        self.stalled = 0

    def __repr__(self) -> str:
        return (
            f"<Pipeline in_flight={self.in_flight} pending={self.ledger.total_pending()} "
            f"done={self.done} dlq={self.dead_lettered} skipped={self.skipped} "
            f"paused={len(self._paused)} stalled={self.stalled} gate={self.gate.state}>"
        )

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until stop is set, then drain, commit and close everything.

        The consumer and the committer are started here and stopped at the end;
        `subscribe` and `start` errors propagate (the caller words them).
        """
        consumer = self._consumer
        try:
            listener = _Listener(self)
            if self.settings.kafka_topic_pattern:
                consumer.subscribe(pattern=self.settings.kafka_topic_pattern, listener=listener)
            else:
                consumer.subscribe(topics=list(self.settings.kafka_topics), listener=listener)
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await self._committer.stop()
            raise
        self.health.set_broker_ok(True)
        background = (
            asyncio.create_task(self._commit_loop(stop), name="committer"),
            asyncio.create_task(self._plan_loop(stop), name="planner"),
            asyncio.create_task(self._progress_loop(stop), name="progress"),
            asyncio.create_task(self._watch_broker(stop), name="broker-watch"),
            asyncio.create_task(self._watchdog(stop), name="watchdog"),
        )
        try:
            await self._intake(stop)
        finally:
            # a commit under way finishes first: cancelled in its transaction, its outcome
            # would be unknown (and its letters written again by the final commit)
            async with self._commit_lock:
                for task in background:
                    task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop fetching, drain in-flight work, commit, then close clients.

        `consumer.stop()` does not call the rebalance listener, so the drain and
        the final commit happen here, before it.
        """
        consumer = self._consumer
        self.health.set_stopping()
        assigned = set(self._parts)
        self._pause(assigned)
        log.info(LogEvent.STOPPING, in_flight=self.in_flight, pending=self.ledger.total_pending())
        try:
            await self._drain(assigned, self.settings.shutdown_timeout)
            await self._commit(reason="shutdown")
        finally:
            self._forget(assigned)
            await consumer.stop()
            await self._committer.stop()
        log.info(LogEvent.STOPPED, done=self.done, dead_lettered=self.dead_lettered)

    # -- ownership --------------------------------------------------------------------

    def _current(self, work: Work | BatchJob) -> _Part | None:
        """The partition state `work` belongs to, if its generation is still assigned."""
        part = self._parts.get(work.tp)
        return part if part is not None and part.generation == work.generation else None

    def _may_start(self, work: Work | BatchJob) -> bool:
        """New sends start only for partitions owned and not being revoked."""
        part = self._current(work)
        return part is not None and not part.revoking

    # -- intake ---------------------------------------------------------------------

    async def _intake(self, stop: asyncio.Event) -> None:
        consumer = self._consumer
        fetcher = RecordFetcher(consumer)
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self.health.mark_poll()
                room = self.settings.max_pending - self.ledger.total_pending()
                # Records are admitted only into the partition state they were fetched
                # for: one reassigned during the fetch was sought back, and reads them again.
                before = dict(self._parts)
                fetch = asyncio.ensure_future(
                    fetcher.fetch(timeout_ms=500, max_records=max(room, 1))
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, KafkaError):
                        await fetch
                    break
                try:
                    batch = fetch.result().in_offset_order()
                except KafkaError as exc:
                    # the client reconnects by itself; keep polling, report not-ready meanwhile
                    self.health.set_broker_ok(False)
                    log.warning(LogEvent.FETCH_FAILED, error=type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                admitted = 0
                for tp, records in batch.items():
                    found = self._parts.get(tp)
                    if found is None or found.revoking:
                        continue  # fetched just before a revoke: the new owner reads it again
                    part: _Part = found
                    if before.get(tp) is not part:
                        # assigned while this fetch ran: some records may predate the seek
                        # to the committed offset; nothing is admitted to the new state yet,
                        # so seek there again and read them from it
                        await self._seek_start(tp, part)
                        continue
                    for record in records:
                        if self._parts.get(tp) is not part or part.revoking:
                            break  # revoked (or reassigned) while this batch was admitted
                        if isinstance(record, Undecodable):
                            self.admit_undecodable(tp, record)
                        else:
                            self._admit(tp, part, record)
                        admitted += 1
                        if admitted % ADMIT_SLICE == 0:
                            # preparing costs ~100 us a record: let sends and heartbeats run
                            await asyncio.sleep(0)
                self._apply_backpressure()
        finally:
            stopping.cancel()

    def _admit(self, tp: TopicPartition, part: _Part, record: Any) -> None:
        """Track a fetched record and route it to its lane; never raises for bad input."""
        try:
            self.ledger.track(tp, record.offset)
        except ValueError:
            # an offset at or below one already tracked in this assignment: the
            # client handed a record out twice; its first copy is on its way already
            log.warning(LogEvent.DUPLICATE_RECORD, topic=tp.topic, offset=record.offset)
            return
        now = self._clock()
        part.progress_at = now
        work = Work(
            tp=tp,
            offset=record.offset,
            generation=part.generation,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp,
            fetched_at=now,
        )
        started = self.tracer.clock()
        result = self.preparer.prepare(
            record.value,
            work.headers,
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            now=self._wall(),
        )
        work.trace = self.tracer.start_event(
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            key=record.key,
            headers=work.headers,
            value=record.value,
            prepared=result,
            started=started,
        )
        work.size = len(record.value or b"")
        if isinstance(result, Prepared):
            work.size += len(result.body)
        part.works[record.offset] = work
        self.pending_bytes += work.size
        if isinstance(result, Skipped):
            self.skipped += 1
            self._passed(tp, part, record.offset)
            self._finish(
                work,
                SKIPPED,
                reason=result.reason,
                event_id=result.event_id,
                event_type=result.event_type,
            )
            return
        if isinstance(result, Rejected):
            work.rejected = result
            self._passed(tp, part, record.offset)
            self._enqueue(tp, ("offset", record.offset), work)
            return
        work.prepared = result
        self._plan(tp, part, work, result)

    def _passed(self, tp: TopicPartition, part: _Part, offset: int) -> None:
        """`offset` will never reach the planner (rejected, skipped, undecodable): a
        recovered batch that named it, with no later member to come, goes without it."""
        if part.planner.assembling():
            for unit in part.planner.passed(offset + 1):
                self._submit(tp, part, unit)

    def admit_undecodable(self, tp: TopicPartition, bad: Undecodable) -> None:
        """A record the client could not decode: dead-letter what could be read of it."""
        part = self._parts.get(tp)
        if part is None or part.revoking:
            return
        try:
            self.ledger.track(tp, bad.offset)
        except ValueError:
            return  # already tracked: its first copy is on its way
        now = self._clock()
        part.progress_at = now
        work = Work(
            tp=tp,
            offset=bad.offset,
            generation=part.generation,
            key=bad.key,
            value=bad.value,
            headers=tuple((name, value or b"") for name, value in bad.headers),
            timestamp_ms=bad.timestamp,
            fetched_at=now,
            size=len(bad.value or b""),
            rejected=bad.rejected(),
        )
        work.trace = self.tracer.start_event(
            topic=tp.topic,
            partition=tp.partition,
            offset=bad.offset,
            key=bad.key,
            headers=work.headers,
            value=bad.value,
            prepared=work.rejected,
        )
        part.works[bad.offset] = work
        self.pending_bytes += work.size
        self._passed(tp, part, bad.offset)
        self._enqueue(tp, ("offset", bad.offset), work)

    # -- plans (consumer.batching) --------------------------------------------------

    def _plan(self, tp: TopicPartition, part: _Part, work: Work, prepared: Prepared) -> None:
        """Hand a prepared record to its partition's planner; send what is decided."""
        if prepared.priority == Priority.URGENT:
            part.urgent += 1
        item = Item(
            offset=work.offset,
            idempotency_key=prepared.idempotency_key,
            lane=self._lane_key(work, prepared),
            batchable=prepared.batch_size > 1,
            batch_size=prepared.batch_size,
            linger=prepared.batch_linger,
            priority=Priority(prepared.priority),
            payload=work,
        )
        units, duplicate = part.planner.admit(item, self._clock())
        for unit in units:
            self._submit(tp, part, unit)
        if duplicate:
            # Its first copy went out in a batch, where it has no key of its own at
            # Resend: sending it again (singly or in another batch) would send it twice.
            self.skipped += 1
            self._finish(work, SKIPPED, reason=REASON_DUPLICATE)
        if part.planner.needs_record() or part.planner.deadline() is not None:
            self._plan_due.set()

    def _submit(self, tp: TopicPartition, part: _Part, unit: Unit[Work]) -> None:
        """A unit whose decision is recorded goes to its lanes."""
        if part.revoking or self._parts.get(tp) is not part:
            return  # no new sends while revoking: the next owner sends it as recorded
        works = [item.payload for item in unit.items if item.payload is not None]
        if unit.batch is None:
            work = works[0]
            assert work.prepared is not None
            self._enqueue(tp, self._lane_key(work, work.prepared), work)
            return
        mode = self.settings.ordering
        if mode == "key":
            keys: list[object] = list(dict.fromkeys(item.lane for item in unit.items))
        elif mode == "partition":
            keys = ["partition"]
        else:
            keys = [("batch", unit.batch.first)]
        job = BatchJob(
            tp=tp,
            generation=part.generation,
            batch=unit.batch,
            works=works,
            lanes=len(keys),
            priority=int(unit.priority),
        )
        if unit.missing:
            log.warning(
                LogEvent.BATCH_MEMBERS_MISSING,
                topic=tp.topic,
                partition=tp.partition,
                batch_key=unit.batch.key,
                missing=len(unit.missing),
            )
        for key in keys:
            self._enqueue(tp, key, job)

    async def _plan_loop(self, stop: asyncio.Event) -> None:
        """Close batches whose linger ran out and record new decisions as soon as made."""
        while not stop.is_set():
            now = self._clock()
            deadlines = [
                d for part in self._parts.values() if (d := part.planner.deadline()) is not None
            ]
            wait = min(deadlines) - now if deadlines else 1.0
            if wait > _TIMER_SLACK:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._plan_due.wait(), min(wait, 1.0))
            self._plan_due.clear()
            # timers may fire up to the clock's resolution early: a deadline that
            # close counts as reached, or this loop would spin without time passing
            now = self._clock() + _TIMER_SLACK
            try:
                dirty = set()
                for tp, part in list(self._parts.items()):
                    part.planner.due(now)
                    if part.planner.needs_record() and not part.revoking and not part.plan_full:
                        dirty.add(tp)
                if dirty:
                    await self._commit(reason="plan", only=dirty)
                    if any(
                        p.planner.needs_record() for tp, p in self._parts.items() if tp in dirty
                    ):
                        await asyncio.sleep(0.05)  # not recorded (commit failed): retry soon
                        self._plan_due.set()
            except Exception as exc:  # a bug here must not end recording for good
                log.error(
                    LogEvent.INTERNAL_ERROR, stage="plan", error=type(exc).__name__, exc_info=exc
                )
                await asyncio.sleep(0.5)

    def _count_event(self, event_type: str | None, outcome: str) -> None:
        key = (self._type_label(event_type), outcome)
        child = self._event_counters.get(key)
        if child is None:  # label lookups cost more than the increment: keep the children
            child = self._event_counters[key] = self.metrics.events.labels(
                type=key[0], outcome=outcome
            )
        child.inc()

    def _type_label(self, event_type: str | None) -> str:
        # event types come from producers: only routed ones become metric labels
        if event_type is not None and event_type in self.preparer.table.routes:
            return event_type
        return "unknown"

    def _lane_key(self, work: Work, prepared: Prepared) -> object:
        mode = self.settings.ordering
        if mode == "partition":
            return "partition"
        if mode == "none":
            return ("offset", work.offset)
        # "key": one lane per Kafka key; unkeyed records fall back to the idempotency key
        return ("k", work.key) if work.key is not None else ("i", prepared.idempotency_key)

    # -- lanes ------------------------------------------------------------------------

    def _enqueue(self, tp: TopicPartition, lane_key: object, work: Work | BatchJob) -> None:
        lane = self._lanes.get((tp, lane_key))
        if lane is None:
            lane = self._lanes[(tp, lane_key)] = Lane()
        lane.queue.append(work)
        # A task cancelled before its first step never runs its `finally` (a revoke in
        # the same loop turn as intake): a finished task is as good as none.
        if not lane.alive():
            lane.task = asyncio.create_task(self._run_lane(tp, lane_key, lane))

    async def _run_lane(self, tp: TopicPartition, lane_key: object, lane: Lane) -> None:
        try:
            while lane.queue:
                work = lane.queue.popleft()
                if not self._may_start(work):
                    continue  # revoked: no new sends; the next owner picks it up
                lane.current = work
                try:
                    if isinstance(work, BatchJob):
                        await self._run_batch(work)
                    else:
                        await self._process(work)
                except Exception as exc:  # a bug must not silently stall the partition
                    if isinstance(work, BatchJob):
                        for member in work.works:
                            self._on_bug(member, exc)
                    else:
                        self._on_bug(work, exc)
                finally:
                    lane.current = None
        finally:
            if lane.task is asyncio.current_task():
                lane.task = None
            if self._lanes.get((tp, lane_key)) is lane and not lane.queue:
                del self._lanes[(tp, lane_key)]

    # -- processing -----------------------------------------------------------------

    async def _process(self, work: Work) -> None:
        if work.rejected is not None:
            self._dead_letter(work, reason=work.rejected.reason, message=work.rejected.message)
            return
        prepared = work.prepared
        assert prepared is not None
        result = await self._deliver_keyed(
            work,
            endpoint=prepared.endpoint,
            body=prepared.body,
            idempotency_key=prepared.idempotency_key,
            on_attempt=lambda busy: self._on_attempt(work, busy),
            on_answer=lambda answer: work.attempt_trace.answer(answer),
            pace=lambda: self.client.pace(prepared.priority),
            # Resend forgets keys after 24 h: gate pauses and 429 waits are
            # unbounded, so the age is checked again before every attempt
            check=lambda: prepared.stale_reason(self._wall()),
            refused_as=prepared.stale_outcome,
        )
        if result is None:
            return  # revoked while waiting for the key
        if result.outcome == "sent":
            self.done += 1
            self._finish(work, SENT, result=result)
        else:
            self._finish_delivery(work, result)

    async def _run_batch(self, job: BatchJob) -> None:
        """Every member lane reaches the job; the last to arrive sends it, the others wait.

        Lanes are filled in decision order, so the job is at the head of all its
        lanes at once: what came before it in each key's lane has finished.
        """
        job.arrived += 1
        if job.arrived < job.lanes:
            await job.done.wait()
            return
        try:
            await self._process_batch(job)
        finally:
            job.done.set()

    async def _process_batch(self, job: BatchJob) -> None:
        works = job.works
        body = b"[" + b",".join(w.prepared.body for w in works if w.prepared) + b"]"
        prepared = [w.prepared for w in works if w.prepared is not None]
        # every member stays fresh, or none is sent: the oldest decides
        policies = {p.stale_outcome for p in prepared}
        refused_as: Literal["dead_letter", "skipped"] = (
            "skipped" if policies == {"skipped"} else "dead_letter"
        )

        def check() -> str | None:
            now = self._wall()
            return next((r for p in prepared if (r := p.stale_reason(now)) is not None), None)

        def on_attempt(busy: bool) -> None:
            job.busy = busy
            for work in works:
                self._trace_attempt(work, busy, ENDPOINT_BATCH)
            self._count_in_flight(busy)

        def on_answer(answer: Any) -> None:
            for work in works:
                work.attempt_trace.answer(answer)

        result = await self._deliver_keyed(
            job,
            endpoint=ENDPOINT_BATCH,
            body=body,
            idempotency_key=job.batch.key,
            headers=BATCH_HEADERS,
            on_attempt=on_attempt,
            on_answer=on_answer,
            pace=lambda: self.client.pace(job.priority),
            check=check,
            refused_as=refused_as,
        )
        if result is None:
            return
        self.metrics.batch_size.observe(len(works))
        if result.outcome != "sent":
            for work in works:
                self._finish_delivery(work, result)
            return
        errors = dict(result.last.batch_errors or ()) if result.last is not None else {}
        ids = list(result.email_ids or ())
        # Resend lists the ids of the emails it took, in input order (all of them
        # without errors); a permissive answer leaves out the refused ones
        aligned = len(ids) == len(works)
        taken = iter(ids)
        for index, work in enumerate(works):
            if index in errors:
                if aligned:
                    next(taken, None)
                self._dead_letter(
                    work, reason=REASON_MEMBER_REFUSED, message=errors[index], result=result
                )
                continue
            email_id = next(taken, None)
            self.done += 1
            self._finish(work, SENT, result=dataclasses.replace(result, email_id=email_id))

    def _finish_delivery(self, work: Work, result: DeliveryResult) -> None:
        """A delivery ended without being sent: skipped, or a dead letter with its reason."""
        prepared = work.prepared
        assert prepared is not None
        if result.outcome == "skipped":  # aged while waiting, and STALE_POLICY=skip
            self.skipped += 1
            self._finish(work, SKIPPED, result=result, reason=result.reason)
            return
        last = result.last
        if result.reason == Reason.STALE_EVENT or last is None:
            message = f"event aged past {prepared.max_age:.0f}s while waiting to be sent"
        else:
            message = last.message
        self._dead_letter(work, reason=result.reason, message=message, result=result)

    def _on_bug(self, work: Work, exc: Exception) -> None:
        """An unexpected exception while processing: log it, then dead-letter the record."""
        log.error(
            LogEvent.INTERNAL_ERROR,
            error=type(exc).__name__,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            exc_info=exc,
        )
        self._dead_letter(
            work, reason="internal_error", message=f"{type(exc).__name__} while processing"
        )

    async def _deliver_keyed(
        self, subject: Work | BatchJob, *, idempotency_key: str, **request: Any
    ) -> DeliveryResult | None:
        """`deliver` one request, one at a time per idempotency key; None if revoked.

        Records with different Kafka keys may still share an idempotency key (a
        duplicate publish): those go one at a time too, or Resend answers 409.
        """
        key = idempotency_key
        entry = self._key_locks.get(key)
        if entry is None:
            entry = self._key_locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                if not self._may_start(subject):
                    return None  # revoked while waiting for the key
                self._delivering += 1
                try:
                    return await deliver(
                        self.client,
                        idempotency_key=key,
                        policy=self.policy,
                        gate=self.gate,
                        slots=self._slots,
                        clock=self._clock,
                        **request,
                    )
                finally:
                    self._delivering -= 1
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._key_locks[key]

    def _on_attempt(self, work: Work, busy: bool) -> None:
        """An attempt starts (True) or ends (False): `in_flight` counts attempts on the wire."""
        endpoint = work.prepared.endpoint if work.prepared is not None else ""
        self._trace_attempt(work, busy, endpoint)
        self._count_in_flight(busy)

    def _trace_attempt(self, work: Work, busy: bool, endpoint: str) -> None:
        work.busy = busy
        if busy:
            work.attempts_traced += 1
            work.attempt_trace = work.trace.attempt(endpoint=endpoint, number=work.attempts_traced)
        else:
            work.attempt_trace.end()
            work.attempt_trace = NO_ATTEMPT

    def _count_in_flight(self, busy: bool) -> None:
        self.in_flight += 1 if busy else -1
        self.metrics.in_flight.set(self.in_flight)

    def _dead_letter(
        self,
        work: Work,
        *,
        reason: str,
        message: str,
        result: DeliveryResult | None = None,
    ) -> None:
        """Finish `work` as a dead letter, written by the commit that covers its offset."""
        part = self._current(work)
        if part is None:
            return  # revoked and gone: the next owner dead-letters it; nothing was committed
        prepared, rejected = work.prepared, work.rejected
        payload = prepared or rejected
        last = result.last if result is not None else None
        letter = DeadLetter(
            source_topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            key=work.key,
            value=work.value,
            headers=work.headers,
            reason=reason,
            error_name=last.error_name if last is not None else None,
            http_status=last.status if last is not None else None,
            message=message,
            attempts=result.attempts if result is not None else 0,
            first_attempt_at=result.first_attempt_at if result is not None else None,
            last_attempt_at=result.last_attempt_at if result is not None else None,
            idempotency_key=payload.idempotency_key if payload is not None else None,
            event_type=payload.event_type if payload is not None else None,
        )
        size = len(work.value or b"")
        if self.tracer.enabled:
            part.letter_traces[id(letter)] = work.trace.dead_letter(
                topic=self.settings.dlq_topic_for(work.tp.topic), reason=reason
            )
        part.letters.append(letter)
        part.letter_bytes += size
        self.pending_bytes += size
        self._finish(work, DEAD_LETTERED, result=result, reason=reason)

    def _finish(
        self,
        work: Work,
        outcome: str,
        *,
        result: DeliveryResult | None = None,
        reason: str | None = None,
        event_id: str | None = None,
        event_type: str | None = None,
    ) -> None:
        part = self._current(work)
        accepted = self.ledger.done(work.tp, work.offset, work.generation)
        if part is not None and part.works.pop(work.offset, None) is work:
            self.pending_bytes -= work.size
            part.progress_at = self._clock()
            if work.prepared is not None and work.prepared.priority == Priority.URGENT:
                part.urgent -= 1
        payload = work.prepared or work.rejected
        if payload is not None:
            event_id, event_type = payload.event_id, payload.event_type
        self._count_event(event_type, outcome)
        final_reason = reason or (result.reason if result is not None else None)
        work.trace.end(outcome, reason=final_reason, email_id=result.email_id if result else None)
        if self.tracer.enabled and part is not None:
            part.traced.append((work.offset, work.trace))
        prepared = work.prepared
        log_outcome(
            self._log,
            outcome=outcome,
            reason=final_reason,
            event_id=event_id,
            event_type=event_type,
            source=prepared.source if prepared else None,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            idempotency_key=payload.idempotency_key if payload is not None else None,
            attempts=result.attempts if result else 0,
            latency=self._clock() - work.fetched_at,
            email_id=result.email_id if result else None,
            trace_id=work.trace.trace_id,
        )
        if not accepted:
            log.debug(LogEvent.LATE_COMPLETION, topic=work.tp.topic, offset=work.offset)

    # -- back-pressure --------------------------------------------------------------

    def _pause(self, tps: Iterable[TopicPartition]) -> None:
        """Pause what is still assigned; one partition at a time, since aiokafka raises
        for the first one it no longer has (a pattern subscription being swapped)."""
        consumer = self._consumer
        assigned = consumer.assignment()
        for tp in tps:
            if tp in assigned:
                with contextlib.suppress(KafkaError, AssertionError):
                    consumer.pause(tp)

    def _resume(self, tps: Iterable[TopicPartition]) -> None:
        consumer = self._consumer
        assigned = consumer.assignment()
        for tp in tps:
            if tp in assigned:
                with contextlib.suppress(KafkaError, AssertionError):
                    consumer.resume(tp)

    def _apply_backpressure(self) -> None:
        s = self.settings
        total = self.ledger.total_pending()
        # An open gate holds intake only while a delivery waits there to probe it:
        # with none (all cancelled by a revoke) new records must come in and probe.
        gate_hold = self.gate.state != "closed" and self._delivering > 0
        hold_all = gate_hold or self._dlq_down
        count_over = total >= s.max_pending
        bytes_over = self.pending_bytes >= s.max_pending_bytes
        # memory is never exempt, except that a recovered batch may finish assembling
        # (at most MAX_BATCH records) within twice the bound
        bytes_hard = self.pending_bytes >= 2 * s.max_pending_bytes
        count_low = total < s.max_pending * s.resume_ratio
        bytes_low = self.pending_bytes < s.max_pending_bytes * s.resume_ratio
        to_pause: list[TopicPartition] = []
        to_resume: list[TopicPartition] = []
        for tp, part in self._parts.items():
            pending = self.ledger.pending(tp)
            # A recovered batch is sent only whole: its partition fetches on until
            # every member is in. A partition with urgent mail unfinished is not held
            # back by the count of other partitions' backlog (memory still bounds it).
            assembling = part.planner.assembling()
            urgent = part.urgent > 0
            if tp in self._paused:
                below = pending < s.max_pending_per_partition * s.resume_ratio
                if hold_all:
                    continue
                assembles = assembling and not bytes_hard
                # an empty partition holds nothing: the count bound cannot pause it
                # (a fetch over the bound takes one record), or the urgent mail it may
                # carry next would wait for every other partition's backlog
                if assembles or (below and bytes_low and (count_low or urgent or not pending)):
                    to_resume.append(tp)
            elif hold_all:
                to_pause.append(tp)
            elif assembling:
                if bytes_hard:
                    to_pause.append(tp)
            elif (
                bytes_over
                or (count_over and not urgent and pending > 0)
                or pending >= s.max_pending_per_partition
            ):
                to_pause.append(tp)
        if to_pause:
            self._pause(to_pause)
            self._paused.update(to_pause)
            log.info(
                LogEvent.PAUSED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_pause],
                pending=total,
                pending_bytes=self.pending_bytes,
                reason="service_condition" if hold_all else "backlog",
            )
        if to_resume:
            self._resume(to_resume)
            self._paused.difference_update(to_resume)
            log.info(
                LogEvent.RESUMED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_resume],
                pending=total,
            )
        self.metrics.paused_partitions.set(len(self._paused))

    # -- commit ---------------------------------------------------------------------

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.settings.commit_interval)
            try:
                await self._commit(reason="interval")
            except Exception as exc:  # a bug here must not end commits for good
                log.error(
                    LogEvent.INTERNAL_ERROR, stage="commit", error=type(exc).__name__, exc_info=exc
                )

    async def _commit(self, *, reason: str, only: set[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            jobs = []
            for tp, part in self._parts.items():
                if only is not None and tp not in only:
                    continue
                position = self.ledger.position(tp)
                committed = self.ledger.committed(tp)
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
            self._refresh_dlq_state()

    async def _record_then_letters(
        self, tp: TopicPartition, part: _Part, position: int, reason: str
    ) -> None:
        """Record new decisions, then write waiting letters and move past them.

        The letters cannot wait for a round with nothing to record: while intake
        goes on there always is, and a letter between members of a recorded batch
        holds the commit before that batch, so the plan would fill its metadata
        budget and stop deciding anything.
        """
        await self._record_one(tp, part, position, reason)
        if self._parts.get(tp) is not part or not part.letters:
            return
        current = self.ledger.position(tp)
        committed = self.ledger.committed(tp)
        if current is None:
            return
        current = max(part.planner.safe_position(current), committed or 0)
        if committed is not None and current <= committed:
            return
        letters = [letter for letter in part.letters if letter.offset < current]
        if letters:
            await self._commit_one(tp, part, current, letters, reason)

    async def _record_one(
        self, tp: TopicPartition, part: _Part, position: int, reason: str
    ) -> None:
        """Commit `position` (never past a letter) with the partition's new decisions."""
        metadata, token, plan = part.planner.snapshot(position)
        try:
            await self._committer.commit(tp, position, metadata, ())
        except (CommitFailed, DeadLetterUnavailable) as exc:
            log.warning(LogEvent.COMMIT_FAILED, reason=reason, error=str(exc))
            return
        except PartitionFenced as exc:
            log.warning(
                LogEvent.PARTITION_FENCED, topic=tp.topic, partition=tp.partition, error=str(exc)
            )
            if self._parts.get(tp) is part:
                self._pause({tp})
                self._forget({tp})
            return
        if self._parts.get(tp) is not part:
            return  # revoked meanwhile: the next owner honours what was recorded
        self._committed(tp, part, position, [])
        # nothing fitted: wait for commits past listed batches, do not spin committing
        part.plan_full = token == 0
        for unit in part.planner.recorded(token, plan):
            self._submit(tp, part, unit)

    async def _commit_one(
        self,
        tp: TopicPartition,
        part: _Part,
        position: int,
        letters: list[DeadLetter],
        reason: str,
    ) -> None:
        trace = (
            self.tracer.commit(
                topic=tp.topic,
                partition=tp.partition,
                position=position,
                events=[t for offset, t in part.traced if offset < position],
            )
            if self.tracer.enabled
            else NO_COMMIT
        )
        try:
            if letters:
                # What comes before the first letter goes first, so that a dead-letter
                # topic that is slow or gone holds back only what it must.
                first = part.planner.safe_position(min(letter.offset for letter in letters))
                committed = self.ledger.committed(tp)
                if committed is None or first > committed:
                    await self._committer.commit(tp, first, part.planner.metadata(first), ())
                    self._committed(tp, part, first, [])
            await self._committer.commit(tp, position, part.planner.metadata(position), letters)
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
            # a newer owner has it (we are the zombie): nothing more of ours may land
            log.warning(
                LogEvent.PARTITION_FENCED, topic=tp.topic, partition=tp.partition, error=str(exc)
            )
            if self._parts.get(tp) is part:
                self._pause({tp})
                self._forget({tp})
            return
        trace.end()
        self._committed(tp, part, position, letters)
        if letters and part.dlq_failed:
            part.dlq_failed = False
        log.debug(LogEvent.COMMITTED, reason=reason, topic=tp.topic, position=position)

    def _committed(
        self, tp: TopicPartition, part: _Part, position: int, letters: list[DeadLetter]
    ) -> None:
        if self._parts.get(tp) is not part:
            return  # revoked meanwhile: its state is gone
        before = self.ledger.committed(tp)
        self.ledger.mark_committed(tp, position, part.generation)
        part.planner.committed(position)
        if part.plan_full and (before is None or position > before):
            part.plan_full = False  # listed batches committed past: room for new decisions
            self._plan_due.set()
        self.metrics.committed_offset.labels(topic=tp.topic, partition=tp.partition).set(position)
        if part.traced:
            part.traced = [(offset, t) for offset, t in part.traced if offset >= position]
        if not letters:
            return
        written = {id(letter) for letter in letters}
        part.letters = [letter for letter in part.letters if id(letter) not in written]
        for letter in letters:
            size = len(letter.value or b"")
            part.letter_bytes -= size
            self.pending_bytes -= size
            self.metrics.dead_letters.labels(reason=letter.reason).inc()
            part.letter_traces.pop(id(letter), NO_LETTER).end()
        self.dead_lettered += len(letters)

    def _refresh_dlq_state(self) -> None:
        """The dead-letter condition holds while any assigned partition fails to write one."""
        down = any(part.dlq_failed for part in self._parts.values())
        if down != self._dlq_down:
            self._dlq_down = down
            self.health.set_circuit(down, "dlq_unavailable")
            if not down:
                log.info(LogEvent.DLQ_AVAILABLE)

    # -- rebalance ------------------------------------------------------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Fence the previous owners, then start each partition at its committed offset.

        aiokafka installs the assignment, and may read committed offsets and fetch,
        before this callback ends; that read may predate the fence (a zombie's last
        transaction could land after it). Records handed out before a partition's
        state exists are dropped by the intake, and each partition is sought to the
        committed offset the committer read after fencing. If the committer cannot
        fence (Kafka away), the partitions stay paused and are tried again.
        """
        # Every rebalance revokes everything first (eager protocol); state left from
        # before means that revoke never reached us (a subscription swapped under it).
        # Its work is dropped uncommitted: the generation it belongs to is gone.
        leftover = set(self._parts) | self._unready
        if leftover:
            log.warning(
                LogEvent.REVOKED,
                partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in leftover),
                implicit=True,
            )
            for tp in leftover:
                part = self._parts.get(tp)
                if part is not None:
                    part.revoking = True
            await self._drain(leftover, self.settings.drain_timeout)
            self._forget(leftover)
        if not assigned:
            self._report_assignment()
            return
        self._pause(assigned)
        for tp in assigned:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        self._unready.update(assigned)
        if self._unready_since is None:
            self._unready_since = self._clock()
        await self._make_ready()
        log.info(
            LogEvent.ASSIGNED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )

    async def _make_ready(self) -> None:
        """Fence and seek the partitions still waiting for it (see `on_assigned`)."""
        async with self._ready_lock:
            await self._make_ready_locked()

    async def _make_ready_locked(self) -> None:
        consumer = self._consumer
        tps = sorted(self._unready & consumer.assignment())
        self._unready.intersection_update(tps)
        if not tps:
            self._unready_since = None
            self._report_assignment()
            return
        # An assignment (or a revoke) that lands during the awaits below makes this
        # round's offsets stale for its partitions: each is checked against its epoch.
        epochs = {tp: self._epochs.get(tp, 0) for tp in tps}
        try:
            offsets = await self._committer.assign(tps)
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
                ends = await self._consumer.end_offsets(foreign)
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
            part = _Part(
                generation=self.ledger.assign(tp, committed=position),
                progress_at=self._clock(),
                start=position,
                planner=PartitionPlanner(plan),
            )
            await self._seek_start(tp, part)
            if not self._current_epoch(tp, epochs[tp]):
                continue
            self._parts[tp] = part
            self._paused.discard(tp)
            self._unready.discard(tp)
            ready.append(tp)
        if not self._unready:
            self._unready_since = None
        self._resume(ready)
        self._report_assignment()

    async def _seek_start(self, tp: TopicPartition, part: _Part) -> None:
        """Position the consumer where `part` starts: its committed offset, or the reset."""
        with contextlib.suppress(KafkaError, AssertionError):
            if part.start is not None:
                self._consumer.seek(tp, part.start)
            elif self.settings.kafka_auto_offset_reset == "earliest":
                await self._consumer.seek_to_beginning(tp)

    def _current_epoch(self, tp: TopicPartition, epoch: int) -> bool:
        return (
            self._epochs.get(tp, 0) == epoch
            and tp in self._unready
            and tp in self._consumer.assignment()
        )

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Start no new sends for `revoked`, drain what is in flight, commit, let go."""
        if not revoked:
            return
        started = self._clock()
        try:
            await self._drain(revoked, self.settings.drain_timeout)
            await self._commit(reason="revoke", only=revoked)
        finally:
            self._forget(revoked)
            with contextlib.suppress(KafkaError, CommitFailed, DeadLetterUnavailable):
                await self._committer.revoke(revoked)
        log.info(
            LogEvent.REVOKED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked),
            drained_in_ms=round((self._clock() - started) * 1000),
        )

    def _forget(self, tps: set[TopicPartition]) -> None:
        """Drop every trace of `tps`: lanes, works, unwritten letters, ledger, metrics."""
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        self._unready.difference_update(tps)
        if not self._unready:
            self._unready_since = None
        for key in [key for key in self._lanes if key[0] in tps]:
            lane = self._lanes.pop(key)
            lane.queue.clear()
            if lane.task is not None and not lane.task.done():
                lane.task.cancel()
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                for work in part.works.values():
                    work.trace.end("revoked")
                for letter_trace in part.letter_traces.values():
                    letter_trace.end("revoked")
                self.pending_bytes -= part.letter_bytes
                self.pending_bytes -= sum(work.size for work in part.works.values())
            self.ledger.revoke(tp)
            self._paused.discard(tp)
            self.metrics.forget_partition(tp.topic, tp.partition)
        self._refresh_dlq_state()
        self._report_assignment()

    def _report_assignment(self) -> None:
        self.health.set_assigned(len(self._parts))
        self.metrics.assigned_partitions.set(len(self._parts))
        self._share_rate_limit()

    def _share_rate_limit(self) -> None:
        """Tell the limiter this member's share of the group: its partitions over all."""
        limiter = getattr(self.client, "limiter", None)
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

    async def _drain(self, tps: set[TopicPartition], limit: float) -> None:
        """Let in-flight work of `tps` finish for up to `limit` seconds, then cancel the rest.

        Queued work that has not started is dropped (its offsets stay uncommitted,
        so the next owner, or the next run, sends it with the same key).
        """
        for tp in tps:
            part = self._parts.get(tp)
            if part is not None:
                part.revoking = True
        lanes = [lane for (tp, _), lane in list(self._lanes.items()) if tp in tps]
        for lane in lanes:
            lane.queue.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        cancelled: list[asyncio.Task[None]] = []
        waiting: list[asyncio.Task[None]] = []
        while True:
            waiting = []
            for lane in lanes:
                task = lane.task
                if task is None or task.done() or task in cancelled:
                    continue
                if lane.current is not None and lane.current.busy:
                    waiting.append(task)  # a request on the wire: let it finish
                else:
                    # waiting for a slot, a backoff or the gate: nothing is lost by stopping
                    task.cancel()
                    cancelled.append(task)
            remaining = deadline - loop.time()
            if not waiting or remaining <= 0:
                break
            await asyncio.wait(waiting, timeout=min(remaining, 0.05))
        for task in waiting:
            task.cancel()
            cancelled.append(task)
        if waiting:
            log.warning(LogEvent.DRAIN_TIMEOUT, cancelled=len(waiting), timeout_s=limit)
        if cancelled:
            await asyncio.wait(cancelled, timeout=5)

    # -- watching -------------------------------------------------------------------

    async def _watch_broker(self, stop: asyncio.Event) -> None:
        """Readiness needs a reachable broker; aiokafka hides fetch errors, so ask it.

        A metadata request every BROKER_CHECK_INTERVAL seconds; a change is logged once.
        """
        while not stop.is_set():
            await asyncio.sleep(BROKER_CHECK_INTERVAL)
            try:
                await asyncio.wait_for(self._consumer.topics(), BROKER_CHECK_INTERVAL)
                ok = True
            except (KafkaError, TimeoutError, OSError):
                ok = False
            self.health.set_broker_ok(ok)
            if ok != self._broker_ok:
                self._broker_ok = ok
                event = LogEvent.BROKER_REACHABLE if ok else LogEvent.BROKER_UNREACHABLE
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    event,
                    bootstrap=self.settings.kafka_bootstrap_servers,
                )

    async def _progress_loop(self, stop: asyncio.Event) -> None:
        reporter = ProgressReporter(metrics=self.metrics, interval=self.settings.progress_interval)
        while not stop.is_set():
            await asyncio.sleep(self.settings.progress_interval)
            reporter.tick()

    async def _watchdog(self, stop: asyncio.Event) -> None:
        """Lag of every assigned partition, and the stall check (invariant 8)."""
        interval = min(5.0, self.settings.stall_timeout / 4)
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                await self._probe_idle_gate()
                if self._unready:
                    await self._make_ready()
                with contextlib.suppress(KafkaError, TimeoutError, OSError, AssertionError):
                    await asyncio.wait_for(self._update_lag(), BROKER_CHECK_INTERVAL)
                self.check_stalls()
            except Exception as exc:  # the watchdog must outlive its own bugs
                log.error(
                    LogEvent.INTERNAL_ERROR,
                    stage="watchdog",
                    error=type(exc).__name__,
                    exc_info=exc,
                )

    async def _probe_idle_gate(self) -> None:
        """Probe an open gate that no delivery waits at (all were cancelled by a revoke,
        or refused as stale), so the service turns ready again by itself while idle.

        The probe is a request Resend refuses without sending anything: an empty body
        and no idempotency key. A validation answer shows Resend reachable and the key
        accepted, which closes the gate; 401, 5xx or a quota answer keep it open.
        """
        if self._delivering > 0:
            return  # a waiting delivery takes the probe turn itself
        ticket = self.gate.try_probe()
        if ticket is None:
            return
        try:
            answer = await self.client.send(
                endpoint=PROBE_ENDPOINT, body=b"{}", idempotency_key=None
            )
        except BaseException:
            self.gate.abandon(ticket)
            raise
        self.gate.record(ticket, answer)

    async def _update_lag(self) -> int:
        """End offset minus committed offset, for every assigned partition.

        A partition without a commit counts from its first tracked offset, or else
        from the log's beginning: held before its first fetch, it still shows its lag.
        """
        consumer = self._consumer
        no_end, no_base = [], []
        for tp in self._parts:
            if consumer.highwater(tp) is None:
                no_end.append(tp)
            if self.ledger.committed(tp) is None and self.ledger.position(tp) is None:
                no_base.append(tp)
        ends = await consumer.end_offsets(no_end) if no_end else {}
        starts = await consumer.beginning_offsets(no_base) if no_base else {}
        positions = {}
        for tp in list(self._parts):
            positions[tp] = await consumer.position(tp)
        total = 0
        for tp, part in self._parts.items():
            high = consumer.highwater(tp)
            if high is None:
                high = ends.get(tp)
            fetched_to = positions.get(tp)
            if high is not None and fetched_to is not None:
                # records not fetched yet: the watchdog's notion of work (a log ending in
                # a transaction marker keeps committed-based lag at 1, and is done)
                part.behind = max(high - fetched_to, 0)
            base = self.ledger.committed(tp)
            if base is None:
                base = self.ledger.position(tp)
            if base is None:
                base = starts.get(tp)
            if high is None or base is None:
                continue
            part.lag = max(high - base, 0)
            total += part.lag
            self.metrics.lag.labels(topic=tp.topic, partition=tp.partition).set(part.lag)
        return total

    def explain(self, tp: TopicPartition) -> str | None:
        """Why `tp` may rightly finish nothing now; None when nothing explains it."""
        if self.gate.state != "closed":
            return f"circuit_open:{self.gate.condition}"
        if self._dlq_down:
            return "dlq_unavailable"
        if not self._broker_ok:
            return "broker_unreachable"
        for (lane_tp, _), lane in self._lanes.items():
            current = lane.current
            if lane_tp == tp and current is not None and lane.alive():
                if isinstance(current, BatchJob) and current.arrived < current.lanes:
                    continue  # waiting for its other lanes is no progress of its own
                return "delivering"
        return None

    def check_stalls(self) -> int:
        """Flag partitions with work that nothing explains for STALL_TIMEOUT; returns how many."""
        now = self._clock()
        limit = self.settings.stall_timeout
        stalled = 0
        for tp, part in self._parts.items():
            has_work = bool(part.works or part.letters or part.behind > 0)
            if not has_work or self.explain(tp) is not None:
                part.progress_at = now
            if has_work and now - part.progress_at >= limit:
                stalled += 1
                if not part.stalled:
                    part.stalled = True
                    log.error(
                        LogEvent.PARTITION_STALLED,
                        topic=tp.topic,
                        partition=tp.partition,
                        position=self.ledger.position(tp),
                        committed=self.ledger.committed(tp),
                        pending=len(part.works),
                        unwritten_dead_letters=len(part.letters),
                        lag=part.lag,
                        paused=tp in self._paused,
                        not_fetched=part.behind,
                        waiting_for=self._waiting_for(tp, part),
                        stalled_for_s=round(now - part.progress_at, 1),
                    )
            elif part.stalled:
                part.stalled = False
                log.info(LogEvent.PARTITION_RECOVERED, topic=tp.topic, partition=tp.partition)
        since = self._unready_since
        if self._unready and since is not None and now - since >= limit:
            # assigned, but the committer could not fence them all this time
            if not self._unready_reported:
                self._unready_reported = True
                log.error(
                    LogEvent.PARTITION_STALLED,
                    partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in self._unready),
                    waiting_for="the committer to fence the previous owner (Kafka unreachable?)",
                    stalled_for_s=round(now - since, 1),
                )
            stalled += len(self._unready)
        else:
            self._unready_reported = False
        self.stalled = stalled
        self.health.set_stalled(stalled)
        self.metrics.stalled_partitions.set(stalled)
        return stalled

    def _waiting_for(self, tp: TopicPartition, part: _Part) -> str:
        position = self.ledger.position(tp)
        head = part.works.get(position) if position is not None else None
        if head is not None:

            def holds(lane: Lane) -> bool:
                return any(
                    w is head or (isinstance(w, BatchJob) and head in w.works)
                    for w in (*lane.queue, lane.current)
                )

            lanes = [ln for (ltp, _), ln in self._lanes.items() if ltp == tp and holds(ln)]
            if not lanes:
                return f"offset {head.offset} is in no lane"
            job = lanes[0].current
            if isinstance(job, BatchJob) and head in job.works:
                return (
                    f"offset {head.offset} is in batch {job.batch.key} that reached "
                    f"{job.arrived} of its {job.lanes} lanes"
                )
            return f"offset {head.offset} is queued in a lane without a running task"
        if part.letters:
            return "dead letters wait for a commit"
        if tp in self._paused:
            return "paused with lag and nothing in flight"
        return "no record fetched although the partition has lag"
