"""Dispatch: from a prepared record to Resend's answer.

`Planning` hands each prepared record to its partition's batch planner
(`consumer.batching`), which decides once how the offset goes out, singly or in a
batch; a decision is sent only after the commit that records it
(`consumer.commit`). `Dispatcher` runs what is decided:

* ordering lanes: work that must go one at a time, in offset order (one lane per
  Kafka key, per partition, or per offset, after ORDERING); a batch is one job in
  every lane of its members, sent when it reaches the head of all of them;
* per-idempotency-key locks: two records with one key never race at Resend;
* the in-flight bound: a slot is held only during an HTTP attempt;
* `drain`: on revoke and shutdown, requests on the wire may finish, the rest is
  cancelled (its offsets stay uncommitted: the next owner sends it with the same key).

The interface is small: `submit(tp, lane_key, work)`, `drain(tps, limit)`,
`forget(tps)`. Each result goes to `consumer.outcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiokafka import TopicPartition

from consumer.batching import Item, Priority, Unit
from consumer.events import Outcome, Refusal
from consumer.logs import LogEvent
from consumer.outcome import REASON_DUPLICATE, REASON_MEMBER_REFUSED
from consumer.prepare import Prepared, Rejected
from consumer.resend import ENDPOINT_BATCH, HEADER_BATCH_VALIDATION
from consumer.retry import DeliveryResult, RetryPolicy, ServiceGate, deliver
from consumer.state import BatchJob, Work
from consumer.tracing import NO_ATTEMPT

if TYPE_CHECKING:
    from consumer.metrics import Metrics
    from consumer.outcome import Outcomes
    from consumer.state import Engine, PartitionState

__all__ = ["BATCH_HEADERS", "Dispatcher", "Lane", "Planning"]

log = structlog.get_logger("consumer.dispatch")

#: per-member errors instead of refusing a whole batch for one bad email
BATCH_HEADERS: Final = {HEADER_BATCH_VALIDATION: "permissive"}
#: requests queued at the limiter ahead of it that keep an open batch open past its linger
HOLD_QUEUE: Final = 2
#: seconds between two looks at a batch kept open that way, and the longest it stays open
HOLD_CHECK: Final = 0.2
HOLD_LIMIT: Final = 60.0
#: how early a timer may fire and still count as on time (asyncio fires within the clock resolution)
TIMER_SLACK: Final = 0.001


@dataclass(slots=True, eq=False)
class Lane:
    """Work that must go one at a time, in offset order."""

    queue: deque[Work | BatchJob] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    current: Work | BatchJob | None = None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()


class Dispatcher:
    """Ordering lanes, per-key locks and the in-flight bound around `deliver`."""

    def __init__(
        self,
        *,
        engine: Engine,
        outcomes: Outcomes,
        client: Any,
        gate: ServiceGate,
        policy: RetryPolicy,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._outcomes = outcomes
        self.client = client
        self._gate = gate
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._wall = wall_clock
        self._slots = asyncio.Semaphore(engine.settings.max_in_flight)
        self.lanes: dict[tuple[TopicPartition, object], Lane] = {}
        self.key_locks: dict[str, list[Any]] = {}  # key -> [lock, users]

    def lane_key(self, work: Work, prepared: Prepared) -> object:
        """The lane `work` waits in, after ORDERING."""
        mode = self._engine.settings.ordering
        if mode == "partition":
            return "partition"
        if mode == "none":
            return ("offset", work.offset)
        # "key": one lane per Kafka key; unkeyed records fall back to the idempotency key
        return ("k", work.key) if work.key is not None else ("i", prepared.idempotency_key)

    # -- lanes ------------------------------------------------------------------------

    def submit(self, tp: TopicPartition, lane_key: object, work: Work | BatchJob) -> None:
        """Queue `work` at the tail of its lane; the lane runs it when it comes up."""
        lane = self.lanes.get((tp, lane_key))
        if lane is None:
            lane = self.lanes[(tp, lane_key)] = Lane()
        lane.queue.append(work)
        # A task cancelled before its first step never runs its `finally` (a revoke in
        # the same loop turn as intake): a finished task is as good as none.
        if not lane.alive():
            lane.task = asyncio.create_task(self._run_lane(tp, lane_key, lane))

    async def _run_lane(self, tp: TopicPartition, lane_key: object, lane: Lane) -> None:
        try:
            while lane.queue:
                work = lane.queue.popleft()
                if not self._engine.may_start(work):
                    continue  # revoked: no new sends; the next owner picks it up
                lane.current = work
                try:
                    if isinstance(work, BatchJob):
                        await self._run_batch(work)
                    else:
                        await self._process(work)
                except Exception as exc:  # a bug must not silently stall the partition
                    for member in work.works if isinstance(work, BatchJob) else (work,):
                        self._outcomes.bug(member, exc)
                finally:
                    lane.current = None
        finally:
            if lane.task is asyncio.current_task():
                lane.task = None
            if self.lanes.get((tp, lane_key)) is lane and not lane.queue:
                del self.lanes[(tp, lane_key)]

    # -- one email ------------------------------------------------------------------

    async def _process(self, work: Work) -> None:
        payload = work.payload
        if isinstance(payload, Rejected):
            self._outcomes.dead_letter(work, reason=payload.reason, message=payload.message)
            return
        prepared = work.prepared
        assert prepared is not None
        result = await self._deliver_keyed(
            work,
            endpoint=prepared.endpoint,
            body=prepared.body,
            idempotency_key=prepared.idempotency_key,
            on_attempt=lambda busy: self._on_attempt(work, busy, prepared.endpoint),
            on_answer=lambda answer: work.attempt_trace.answer(answer),
            pace=lambda: self.client.pace(prepared.priority),
            # Resend forgets keys after 24 h: gate pauses and 429 waits are
            # unbounded, so the age is checked again before every attempt
            check=lambda: prepared.stale_reason(self._wall()),
            refused_as=prepared.stale_outcome,
        )
        if result is not None:  # None: revoked while waiting for the key
            self._outcomes.delivery_ended(work, result)

    # -- one batch ------------------------------------------------------------------

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
        prepared = [p for w in works if (p := w.prepared) is not None]
        body = b"[" + b",".join(p.body for p in prepared) + b"]"
        # every member stays fresh, or none is sent: the oldest decides
        policies = {p.stale_outcome for p in prepared}
        refused_as: Refusal = (
            Outcome.SKIPPED if policies == {Outcome.SKIPPED} else Outcome.DEAD_LETTERED
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
        self._metrics.batch_size.observe(len(works))
        if result.outcome != Outcome.SENT:
            for work in works:
                self._outcomes.delivery_ended(work, result)
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
                self._outcomes.dead_letter(
                    work, reason=REASON_MEMBER_REFUSED, message=errors[index], result=result
                )
                continue
            self._outcomes.sent(work, result, next(taken, None))

    # -- around deliver() -------------------------------------------------------------

    async def _deliver_keyed(
        self, subject: Work | BatchJob, *, idempotency_key: str, **request: Any
    ) -> DeliveryResult | None:
        """`deliver` one request, one at a time per idempotency key; None if revoked.

        Records with different Kafka keys may still share an idempotency key (a
        duplicate publish): those go one at a time too, or Resend answers 409.
        """
        key = idempotency_key
        entry = self.key_locks.get(key)
        if entry is None:
            entry = self.key_locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                if not self._engine.may_start(subject):
                    return None  # revoked while waiting for the key
                self._engine.delivering += 1
                try:
                    return await deliver(
                        self.client,
                        idempotency_key=key,
                        policy=self._policy,
                        gate=self._gate,
                        slots=self._slots,
                        clock=self._clock,
                        **request,
                    )
                finally:
                    self._engine.delivering -= 1
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self.key_locks[key]

    def _on_attempt(self, work: Work, busy: bool, endpoint: str) -> None:
        """An attempt starts (True) or ends (False): `in_flight` counts attempts on the wire."""
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
        engine = self._engine
        engine.in_flight += 1 if busy else -1
        self._metrics.in_flight.set(engine.in_flight)

    # -- revoke and shutdown ------------------------------------------------------------

    async def drain(self, tps: set[TopicPartition], limit: float) -> None:
        """Let in-flight work of `tps` finish for up to `limit` seconds, then cancel the rest.

        Queued work that has not started is dropped (its offsets stay uncommitted,
        so the next owner, or the next run, sends it with the same key).
        """
        for tp in tps:
            part = self._engine.parts.get(tp)
            if part is not None:
                part.revoking = True
        lanes = [lane for (tp, _), lane in list(self.lanes.items()) if tp in tps]
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

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop the lanes of `tps`, cancelling whatever still runs in them."""
        for key in [key for key in self.lanes if key[0] in tps]:
            lane = self.lanes.pop(key)
            lane.queue.clear()
            if lane.task is not None and not lane.task.done():
                lane.task.cancel()

    # -- what the watchdog asks -----------------------------------------------------------

    def delivering(self, tp: TopicPartition) -> bool:
        """A lane of `tp` is running work of its own (not only waiting for a batch's lanes)."""
        for (lane_tp, _), lane in self.lanes.items():
            current = lane.current
            if lane_tp == tp and current is not None and lane.alive():
                if isinstance(current, BatchJob) and current.arrived < current.lanes:
                    continue  # waiting for its other lanes is no progress of its own
                return True
        return False

    def where(self, tp: TopicPartition, head: Work) -> str:
        """Where `head`, the first unfinished offset of `tp`, waits (for the stall line)."""

        def holds(lane: Lane) -> bool:
            return any(
                w is head or (isinstance(w, BatchJob) and head in w.works)
                for w in (*lane.queue, lane.current)
            )

        lanes = [ln for (ltp, _), ln in self.lanes.items() if ltp == tp and holds(ln)]
        if not lanes:
            return f"offset {head.offset} is in no lane"
        job = lanes[0].current
        if isinstance(job, BatchJob) and head in job.works:
            return (
                f"offset {head.offset} is in batch {job.batch.key} that reached "
                f"{job.arrived} of its {job.lanes} lanes"
            )
        return f"offset {head.offset} is queued in a lane without a running task"


class Planning:
    """Batches: each prepared record goes to its partition's planner; what is decided
    and recorded goes to the dispatcher's lanes."""

    def __init__(
        self,
        *,
        engine: Engine,
        dispatcher: Dispatcher,
        outcomes: Outcomes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._outcomes = outcomes
        self._clock = clock
        #: partitions whose open batch lingers on past its linger (see `lingers_on`)
        self.held: set[TopicPartition] = set()
        #: per partition, the open batch a hold began for and the limiter's count it waits for
        self._hold_marks: dict[TopicPartition, tuple[int, float, int]] = {}

    def plan(self, tp: TopicPartition, part: PartitionState, work: Work) -> None:
        """Hand a prepared record to its partition's planner; send what is decided."""
        prepared = work.prepared
        assert prepared is not None
        if work.urgent:
            part.urgent += 1
        item = Item(
            offset=work.offset,
            idempotency_key=prepared.idempotency_key,
            lane=self._dispatcher.lane_key(work, prepared),
            batchable=prepared.batch_size > 1,
            batch_size=prepared.batch_size,
            linger=prepared.batch_linger,
            priority=Priority(prepared.priority),
            payload=work,
        )
        units, duplicate = part.planner.admit(item, self._clock())
        for unit in units:
            self.submit(tp, part, unit)
        if duplicate:
            # Its first copy went out in a batch, where it has no key of its own at
            # Resend: sending it again (singly or in another batch) would send it twice.
            self._outcomes.skipped(work, REASON_DUPLICATE)
        if part.planner.needs_record() or part.planner.deadline() is not None:
            self._engine.plan_due.set()

    def passed(self, tp: TopicPartition, part: PartitionState, offset: int) -> None:
        """`offset` will never reach the planner (rejected, skipped, undecodable): a
        recovered batch that named it, with no later member to come, goes without it."""
        if part.planner.assembling():
            for unit in part.planner.passed(offset + 1):
                self.submit(tp, part, unit)

    def submit(self, tp: TopicPartition, part: PartitionState, unit: Unit[Work]) -> None:
        """A unit whose decision is recorded goes to its lanes."""
        if not self._engine.owns(tp, part):
            return  # no new sends while revoking: the next owner sends it as recorded
        dispatcher = self._dispatcher
        works = [item.payload for item in unit.items if item.payload is not None]
        if unit.batch is None:
            work = works[0]
            assert work.prepared is not None
            dispatcher.submit(tp, dispatcher.lane_key(work, work.prepared), work)
            return
        mode = self._engine.settings.ordering
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
            dispatcher.submit(tp, key, job)

    def lingers_on(self, tp: TopicPartition, part: PartitionState) -> bool:
        """Asked once the open batch's linger ran out: it stays open while what
        would be served before it still waits. Closed now, it would only wait
        behind that (the rate limiter serves the most urgent first, FIFO within
        one), and a fuller batch spends fewer requests of the team's limit.

        Served before it: the requests queued at the limiter with its priority or
        a more urgent one when its linger ran out (those arriving later do not
        count: they would queue behind it), or a full batch's worth of such emails
        of its own partition, at lower offsets, waiting in its lanes and not on
        the wire. Urgent batches never wait, and none longer than HOLD_LIMIT from
        when it opened; with no rate limiter nothing waits.
        """
        opened = part.planner.open_batch()
        limiter = getattr(self._dispatcher.client, "limiter", None)
        if opened is None or part.revoking or limiter is None:
            self._hold_marks.pop(tp, None)
            return False
        priority = opened.priority
        if priority == Priority.URGENT or self._clock() - opened.opened_at >= HOLD_LIMIT:
            return False
        mark = self._hold_marks.get(tp)
        if mark is None or mark[:2] != (opened.first, opened.opened_at):
            # the limiter has served `acquired` requests: wait for those queued now
            mark = (opened.first, opened.opened_at, limiter.acquired + limiter.waiting(priority))
            self._hold_marks[tp] = mark
        if limiter.acquired <= mark[2] - HOLD_QUEUE:
            return True
        dispatcher = self._dispatcher
        mode = self._engine.settings.ordering
        if mode == "none":
            return False  # its own lane: nothing of its partition goes before it
        ahead = 0
        for offset, work in part.works.items():  # in offset order
            if offset >= opened.first:
                return False
            prepared = work.prepared
            if prepared is None or work.busy or prepared.priority > priority:
                continue
            if mode == "key" and dispatcher.lane_key(work, prepared) not in opened.lanes:
                continue  # another lane: it does not hold this batch back
            ahead += 1
            if ahead >= opened.size:
                return True
        return False

    async def loop(
        self,
        stop: asyncio.Event,
        record: Callable[[set[TopicPartition]], Awaitable[None]],
    ) -> None:
        """Close batches whose linger ran out and `record` new decisions as soon as made."""
        engine = self._engine
        while not stop.is_set():
            now = self._clock()
            held = self.held
            deadlines = [
                d
                for tp, part in engine.parts.items()
                if tp not in held and (d := part.planner.deadline()) is not None
            ]
            wait = min(deadlines) - now if deadlines else 1.0
            if held:  # what holds them finishes without telling: look again soon
                wait = min(wait, HOLD_CHECK)
            if wait > TIMER_SLACK:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(engine.plan_due.wait(), min(wait, 1.0))
            engine.plan_due.clear()
            # timers may fire up to the clock's resolution early: a deadline that
            # close counts as reached, or this loop would spin without time passing
            now = self._clock() + TIMER_SLACK
            try:
                dirty = set()
                held = set()
                for tp, part in list(engine.parts.items()):
                    deadline = part.planner.deadline()
                    if deadline is not None and deadline <= now:
                        if self.lingers_on(tp, part):
                            held.add(tp)
                        else:
                            part.planner.due(now)
                    if part.planner.needs_record() and not part.revoking and not part.plan_full:
                        dirty.add(tp)
                self.held = held
                if dirty:
                    await record(dirty)
                    if any(
                        p.planner.needs_record() for tp, p in engine.parts.items() if tp in dirty
                    ):
                        await asyncio.sleep(0.05)  # not recorded (commit failed): retry soon
                        engine.plan_due.set()
            except Exception as exc:  # a bug here must not end recording for good
                self.held = set()
                log.error(
                    LogEvent.INTERNAL_ERROR, stage="plan", error=type(exc).__name__, exc_info=exc
                )
                await asyncio.sleep(0.5)
