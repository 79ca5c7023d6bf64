"""Dispatch, drain and back-pressure on their own: fake Resend, fake consumer, real asyncio.

The real-broker tests (`test_pipeline`, `test_batch`, `test_churn`) and the
simulation (`test_simulation`) run these stages inside the whole engine; here
each stage's contract is pinned down alone, in milliseconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from consumer.backpressure import BackPressure
from consumer.batching import Item, Priority
from consumer.dispatch import Dispatcher, Planning
from consumer.events import Outcome
from consumer.metrics import Metrics
from consumer.outcome import Outcomes
from consumer.prepare import Prepared, Rejected
from consumer.resend import Answer, answer_from_response
from consumer.retry import RetryPolicy, ServiceGate
from consumer.settings import Settings
from consumer.state import Engine, PartitionState, Work
from consumer.tracing import NO_TRACER

TP = TopicPartition("orders", 0)


@dataclass
class FakeResend:
    """Answers 200 after `delay` seconds (or never, while `hold` is clear); records the order."""

    delay: float = 0.0
    hold: asyncio.Event | None = None
    sent: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    on_wire: int = 0
    most_on_wire: int = 0

    async def pace(self, priority: int = 1) -> None:
        return None

    async def send(
        self, *, endpoint: str, body: bytes, idempotency_key: str | None, **_: Any
    ) -> Answer:
        assert idempotency_key is not None
        self.started.append(idempotency_key)
        self.on_wire += 1
        self.most_on_wire = max(self.most_on_wire, self.on_wire)
        try:
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(self.delay)
        finally:
            self.on_wire -= 1
        self.sent.append(idempotency_key)
        raw = orjson.dumps({"id": f"em-{idempotency_key}"})
        return answer_from_response(200, {}, raw, endpoint=endpoint)


@dataclass
class _Table:
    routes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    engine: Engine
    dispatcher: Dispatcher
    resend: FakeResend
    part: PartitionState
    metrics: Metrics

    def work(
        self,
        offset: int,
        key: bytes | None,
        idempotency_key: str | None = None,
        priority: int = Priority.NORMAL,
    ) -> Work:
        ikey = idempotency_key or f"k-{offset}"
        prepared = Prepared(
            event_id=f"e-{offset}",
            event_type="order.confirmed",
            source="shop",
            idempotency_key=ikey,
            endpoint="/emails",
            body=b"{}",
            recipients=("a@example.com",),
            event_time=None,
            stale=False,
            priority=priority,
        )
        return self._track(offset, key, prepared)

    def rejected(self, offset: int) -> Work:
        payload = Rejected(
            reason="schema_violation",
            message="data must contain ['currency']",
            event_id=f"e-{offset}",
            event_type="order.confirmed",
            idempotency_key=None,
        )
        return self._track(offset, None, payload)

    def _track(self, offset: int, key: bytes | None, payload: Any) -> Work:
        self.engine.ledger.track(TP, offset)
        work = Work(
            tp=TP,
            offset=offset,
            generation=self.part.generation,
            key=key,
            value=b"{}",
            headers=(),
            timestamp_ms=None,
            fetched_at=0.0,
            payload=payload,
            size=2,
        )
        self.part.works[offset] = work
        self.engine.pending_bytes += work.size
        return work

    def submit(self, work: Work) -> None:
        prepared = work.prepared
        lane = self.dispatcher.lane_key(work, prepared) if prepared else ("offset", work.offset)
        self.dispatcher.submit(TP, lane, work)

    async def idle(self) -> None:
        while any(lane.alive() for lane in self.dispatcher.lanes.values()):
            await asyncio.sleep(0.001)


def _stage(resend: FakeResend, **settings: Any) -> Stage:
    engine = Engine(Settings(**settings))
    metrics = Metrics()
    outcomes = Outcomes(engine=engine, table=_Table(), metrics=metrics, tracer=NO_TRACER)  # type: ignore[arg-type]
    dispatcher = Dispatcher(
        engine=engine,
        outcomes=outcomes,
        client=resend,
        gate=ServiceGate(),
        policy=RetryPolicy(base=0.001, cap=0.001),
        metrics=metrics,
    )
    part = PartitionState(generation=engine.ledger.assign(TP, committed=None), progress_at=0.0)
    engine.parts[TP] = part
    return Stage(engine, dispatcher, resend, part, metrics)


async def test_one_lane_per_key_keeps_order_and_different_keys_run_together() -> None:
    """ORDERING=key: a key's records go one at a time in offset order; keys overlap."""
    stage = _stage(FakeResend(delay=0.01), ordering="key", max_in_flight=8)
    for offset in range(6):
        stage.submit(stage.work(offset, key=b"a" if offset % 2 == 0 else b"b"))
    await stage.idle()
    sent = stage.resend.sent
    assert [k for k in sent if k in {"k-0", "k-2", "k-4"}] == ["k-0", "k-2", "k-4"]
    assert [k for k in sent if k in {"k-1", "k-3", "k-5"}] == ["k-1", "k-3", "k-5"]
    assert stage.resend.most_on_wire == 2  # the two keys, never more, never one
    assert stage.engine.done == 6
    assert stage.engine.ledger.position(TP) == 6
    assert not stage.dispatcher.lanes
    assert not stage.dispatcher.key_locks
    assert stage.engine.pending_bytes == 0


async def test_the_in_flight_bound_holds_across_lanes() -> None:
    """ORDERING=none: every record its own lane, at most MAX_IN_FLIGHT on the wire."""
    stage = _stage(FakeResend(delay=0.005), ordering="none", max_in_flight=3)
    for offset in range(20):
        stage.submit(stage.work(offset, key=None))
    await stage.idle()
    assert stage.resend.most_on_wire == 3
    assert sorted(stage.resend.sent) == sorted(f"k-{i}" for i in range(20))


async def test_records_sharing_an_idempotency_key_never_race() -> None:
    """Two keys of Kafka, one idempotency key (a duplicate publish): one at a time."""
    stage = _stage(FakeResend(delay=0.01), ordering="none", max_in_flight=8)
    for offset in range(4):
        stage.submit(stage.work(offset, key=None, idempotency_key="same"))
    await stage.idle()
    assert stage.resend.most_on_wire == 1
    assert stage.resend.sent == ["same"] * 4


async def test_a_rejected_record_becomes_a_dead_letter_without_a_request() -> None:
    stage = _stage(FakeResend())
    stage.submit(stage.rejected(0))
    await stage.idle()
    assert stage.resend.started == []
    [letter] = stage.part.letters
    assert (letter.reason, letter.offset) == ("schema_violation", 0)
    assert "currency" in letter.message
    assert stage.engine.ledger.position(TP) == 1  # done: the commit writes the letter


async def test_drain_lets_requests_on_the_wire_finish_and_drops_the_rest() -> None:
    """A revoke: what is on the wire completes (its answer counts); queued work is
    cancelled unfinished, its offsets stay uncommitted for the next owner."""
    hold = asyncio.Event()
    stage = _stage(FakeResend(hold=hold), ordering="key", max_in_flight=8)
    for offset in range(4):
        stage.submit(stage.work(offset, key=b"one-key"))
    while not stage.resend.started:
        await asyncio.sleep(0.001)
    drain = asyncio.create_task(stage.dispatcher.drain({TP}, limit=5.0))
    await asyncio.sleep(0.01)
    assert not drain.done()  # waits for the request on the wire
    assert stage.part.revoking
    hold.set()
    await drain
    assert stage.resend.sent == ["k-0"]
    assert stage.engine.done == 1
    assert stage.engine.ledger.position(TP) == 1
    assert sorted(stage.part.works) == [1, 2, 3]  # never started: the next owner sends them


async def test_drain_cancels_a_request_that_outlives_its_limit() -> None:
    stage = _stage(FakeResend(hold=asyncio.Event()), ordering="key")
    stage.submit(stage.work(0, key=b"k"))
    while not stage.resend.started:
        await asyncio.sleep(0.001)
    await stage.dispatcher.drain({TP}, limit=0.02)
    assert stage.resend.sent == []
    assert stage.engine.done == 0
    assert stage.engine.ledger.position(TP) == 0  # nothing finished: nothing to commit
    stage.dispatcher.forget({TP})
    assert not stage.dispatcher.lanes


async def test_work_of_a_revoked_generation_never_starts() -> None:
    stage = _stage(FakeResend(), ordering="key")
    work = stage.work(0, key=b"k")
    stage.part.revoking = True
    stage.submit(work)
    await stage.idle()
    assert stage.resend.started == []
    assert stage.engine.done == 0


# -- back-pressure ---------------------------------------------------------------


class FakeConsumer:
    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)


def _pressure(n: int, **settings: Any) -> tuple[Engine, BackPressure, FakeConsumer, ServiceGate]:
    engine = Engine(Settings(**settings))
    tps = [TopicPartition("orders", i) for i in range(n)]
    for tp in tps:
        engine.parts[tp] = PartitionState(
            generation=engine.ledger.assign(tp, committed=None), progress_at=0.0
        )
    consumer = FakeConsumer(set(tps))
    gate = ServiceGate()
    return (
        engine,
        BackPressure(engine=engine, consumer=consumer, gate=gate, metrics=Metrics()),
        consumer,
        gate,
    )


def _fill(engine: Engine, tp: TopicPartition, count: int) -> None:
    start = (engine.ledger.position(tp) or 0) + engine.ledger.pending(tp)
    for offset in range(start, start + count):
        engine.ledger.track(tp, offset)


def test_a_backlog_over_the_count_bound_pauses_the_partitions_that_hold_it() -> None:
    engine, pressure, consumer, _ = _pressure(3, max_pending=100, max_pending_per_partition=100)
    a, b, _empty = sorted(engine.parts)
    _fill(engine, a, 60)
    _fill(engine, b, 40)
    pressure.apply()
    assert consumer.paused == {a, b}  # the empty one keeps fetching
    assert engine.paused == {a, b}


def test_urgent_mail_is_not_held_back_by_other_partitions_backlog() -> None:
    engine, pressure, consumer, _ = _pressure(2, max_pending=100, max_pending_per_partition=100)
    bulk, urgent = sorted(engine.parts)
    _fill(engine, bulk, 95)
    _fill(engine, urgent, 5)
    engine.parts[urgent].urgent = 1
    pressure.apply()
    assert consumer.paused == {bulk}


def test_memory_pauses_every_partition_urgent_or_not_and_resumes_below_the_mark() -> None:
    engine, pressure, consumer, _ = _pressure(
        2, max_pending_bytes=4_000_000, max_event_bytes=2_000_000, resume_ratio=0.5
    )
    a, b = sorted(engine.parts)
    _fill(engine, a, 1)
    _fill(engine, b, 1)
    engine.parts[b].urgent = 1
    engine.pending_bytes = 4_000_000
    pressure.apply()
    assert consumer.paused == {a, b}
    engine.pending_bytes = 2_400_000  # below the bound, above the low-water mark: still held
    pressure.apply()
    assert consumer.paused == {a, b}
    engine.pending_bytes = 1_600_000
    pressure.apply()
    assert consumer.paused == set()


@pytest.mark.parametrize("delivering", [0, 1])
async def test_an_open_gate_holds_intake_only_while_a_delivery_waits_to_probe_it(
    delivering: int,
) -> None:
    engine, pressure, consumer, gate = _pressure(2)
    gate.record(await gate.admit(), _auth_failure())
    assert gate.state == "open"
    engine.delivering = delivering
    pressure.apply()
    assert consumer.paused == (set(engine.parts) if delivering else set())


def _auth_failure() -> Answer:
    raw = orjson.dumps({"name": "invalid_api_key", "message": "bad key"})
    answer = answer_from_response(401, {}, raw, endpoint="/emails")
    assert answer.verdict == "fatal"
    return answer


def test_a_delivery_result_names_its_outcome_in_the_one_vocabulary() -> None:
    """`deliver` ends in the words the metric and the canonical line use."""
    assert {o.value for o in Outcome} == {"sent", "dead_lettered", "skipped", "revoked"}


# -- a batch kept open while full requests wait ahead of it ---------------------------


def _open_batch(
    part: PartitionState,
    first: int,
    count: int,
    priority: Priority,
    now: float = 0.0,
    lane: object = None,
) -> None:
    for offset in range(first, first + count):
        item: Item[Any] = Item(
            offset=offset,
            idempotency_key=f"k-{offset}",
            lane=lane if lane is not None else ("offset", offset),
            batchable=True,
            batch_size=10,
            linger=0.2,
            priority=priority,
            payload=None,
        )
        part.planner.admit(item, now=now)


class QueueAhead:
    """A rate limiter's view the planner asks: requests waiting ahead, by priority."""

    def __init__(self, by_priority: dict[Priority, int]) -> None:
        self.by_priority = by_priority
        #: requests served so far
        self.acquired = 0

    def waiting(self, priority: int = 1) -> int:
        return sum(n for p, n in self.by_priority.items() if p <= priority)


@pytest.mark.parametrize(
    ("queued", "priority", "revoking", "age", "held"),
    [
        ({Priority.NORMAL: 2}, Priority.NORMAL, False, 1.0, True),  # closed now, it would wait
        ({Priority.NORMAL: 1}, Priority.NORMAL, False, 1.0, False),  # next in line: the linger
        ({Priority.BULK: 50}, Priority.NORMAL, False, 1.0, False),  # bulk waits behind it
        ({Priority.URGENT: 3}, Priority.NORMAL, False, 1.0, True),  # urgent goes first
        ({Priority.NORMAL: 50}, Priority.URGENT, False, 1.0, False),  # urgent never waits
        ({Priority.NORMAL: 50}, Priority.NORMAL, True, 1.0, False),  # a revoke closes it
        ({Priority.NORMAL: 50}, Priority.NORMAL, False, 60.0, False),  # a minute at most
    ],
)
def test_a_batch_lingers_on_only_while_requests_served_before_it_queue(
    queued: dict[Priority, int], priority: Priority, revoking: bool, age: float, held: bool
) -> None:
    now = [100.0]
    stage = _stage(FakeResend())
    stage.resend.limiter = QueueAhead(queued)  # type: ignore[attr-defined]
    outcomes = stage.dispatcher._outcomes
    planning = Planning(
        engine=stage.engine, dispatcher=stage.dispatcher, outcomes=outcomes, clock=lambda: now[0]
    )
    for offset in range(3):
        stage.engine.ledger.track(TP, offset)
    _open_batch(stage.part, 0, 3, priority, now=now[0] - age)
    opened = stage.part.planner.open_batch()
    assert opened is not None
    assert (opened.members, opened.first, opened.size) == (3, 0, 10)
    assert (opened.opened_at, opened.priority) == (now[0] - age, priority)
    stage.part.revoking = revoking
    assert planning.lingers_on(TP, stage.part) is held


@pytest.mark.parametrize(
    ("ahead", "behind", "held"),
    [
        ({Priority.NORMAL: 10}, 0, True),  # a full batch's worth goes first anyway
        ({Priority.NORMAL: 9}, 0, False),
        ({Priority.URGENT: 4, Priority.NORMAL: 6}, 0, True),
        ({Priority.BULK: 50}, 0, False),  # bulk mail ahead is served after it
        ({}, 50, False),  # later records never hold it: they are not ahead of it
    ],
)
def test_a_batch_lingers_on_behind_a_full_batch_of_earlier_mail_of_its_lanes(
    ahead: dict[Priority, int], behind: int, held: bool
) -> None:
    stage, planning = _ahead(ahead, behind)
    assert planning.lingers_on(TP, stage.part) is held


def test_earlier_mail_on_the_wire_or_in_other_lanes_does_not_hold_a_batch() -> None:
    stage, planning = _ahead({Priority.NORMAL: 10}, 0)
    assert planning.lingers_on(TP, stage.part)
    first = next(iter(stage.part.works.values()))
    first.busy = True  # past the limiter: it does not make this batch wait
    assert not planning.lingers_on(TP, stage.part)
    first.busy = False
    other, planning = _ahead({Priority.NORMAL: 10}, 0, key=b"other-key")
    assert not planning.lingers_on(TP, other.part)  # ORDERING=key: another lane
    alone, planning = _ahead({Priority.NORMAL: 10}, 0, ordering="none")
    assert not planning.lingers_on(TP, alone.part)  # a lane of its own


def _ahead(
    ahead: dict[Priority, int], behind: int, *, key: bytes = b"k", ordering: str = "key"
) -> tuple[Stage, Planning]:
    stage = _stage(FakeResend(), ordering=ordering)
    stage.resend.limiter = QueueAhead({})  # type: ignore[attr-defined]
    outcomes = stage.dispatcher._outcomes
    planning = Planning(
        engine=stage.engine, dispatcher=stage.dispatcher, outcomes=outcomes, clock=lambda: 1.0
    )
    offset = 0
    for priority, count in ahead.items():
        for _ in range(count):
            stage.work(offset, key=key, priority=priority)
            offset += 1
    first = offset
    for i in range(3):
        stage.engine.ledger.track(TP, first + i)
    _open_batch(stage.part, first, 3, Priority.NORMAL, lane=("k", b"k"))
    for i in range(behind):
        stage.work(first + 3 + i, key=b"k")  # decided singly after the batch opened
    return stage, planning


def test_requests_queued_after_its_linger_ran_out_do_not_keep_a_batch_open() -> None:
    """The hold waits for what queued at the limiter when the linger ran out: newer
    requests line up behind the batch, so they must not extend it."""
    stage = _stage(FakeResend())
    limiter = QueueAhead({Priority.NORMAL: 3})
    stage.resend.limiter = limiter  # type: ignore[attr-defined]
    planning = Planning(
        engine=stage.engine,
        dispatcher=stage.dispatcher,
        outcomes=stage.dispatcher._outcomes,
        clock=lambda: 1.0,
    )
    _open_batch(stage.part, 0, 3, Priority.NORMAL)
    assert planning.lingers_on(TP, stage.part)  # three ahead when it was asked first
    limiter.acquired, limiter.by_priority = 1, {Priority.NORMAL: 50}
    assert planning.lingers_on(TP, stage.part)  # two of those three still wait
    limiter.acquired = 2
    assert not planning.lingers_on(TP, stage.part)  # one left: next in line, close it


def test_without_a_rate_limiter_a_batch_closes_at_its_linger() -> None:
    stage = _stage(FakeResend())
    planning = Planning(
        engine=stage.engine, dispatcher=stage.dispatcher, outcomes=stage.dispatcher._outcomes
    )
    _open_batch(stage.part, 0, 3, Priority.NORMAL)
    assert not planning.lingers_on(TP, stage.part)


def test_a_partition_holding_only_its_open_batch_is_not_paused_by_the_count_bound() -> None:
    """Paused, it would close that batch half full at the linger and spend a request."""
    engine, pressure, consumer, _ = _pressure(2, max_pending=100, max_pending_per_partition=100)
    busy, filling = sorted(engine.parts)
    _fill(engine, busy, 100)
    _fill(engine, filling, 3)
    _open_batch(engine.parts[filling], 0, 3, Priority.NORMAL)
    pressure.apply()
    assert consumer.paused == {busy}
    consumer.paused.add(filling)  # paused earlier, when it held more
    engine.paused.add(filling)
    pressure.apply()
    assert consumer.paused == {busy}
