"""Deterministic simulation of the engine: fake Kafka group, fake Resend, virtual time.

Two real `Pipeline`s (members of one group) run on a `VirtualLoop`, an asyncio
event loop whose clock jumps to the next timer instead of sleeping, against:

- `FakeGroup`/`FakeConsumer`: partitions with records, a committed offset per
  partition, eager rebalances (every member's `on_partitions_revoked`, then a new
  split and `on_partitions_assigned`), started at seeded random moments --
  including in the same loop turn as a fetch that hands out records;
- `FakeCommitter`: a dead-letter write and the offset commit as one atomic step
  (what a Kafka transaction gives), refused for a member that no longer owns the
  partition, failing or slow at random;
- `FakeResend`: answers by seeded chance and by phase (healthy, 503 outage, 401
  auth failure), remembers keys like Resend (first 2xx sends, later ones replay).

After every turn of the loop `Invariants.check` asserts: committed offsets never
move backwards and never pass an offset without a final outcome; no lane holds
work without a live task; one idempotency key is never twice on the wire at once.
After the chaos phase faults stop, and the group must finish: every valid event
acknowledged, every bad record dead-lettered exactly once, every offset committed.
Everything random comes from one `random.Random(seed)`, so a seed replays exactly.
"""

from __future__ import annotations

import asyncio
import os
import random
import selectors
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import OffsetAndMetadata

from consumer.batching import Plan
from consumer.deadletter import DeadLetter
from consumer.errors import CommitFailed, DeadLetterUnavailable
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.prepare import Prepared, Preparer
from consumer.resend import ENDPOINT_BATCH, Answer, answer_from_response
from consumer.retry import RetryPolicy, ServiceGate
from consumer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "orders"


class Deadlock(AssertionError):
    """Nothing is scheduled and nothing can wake the loop."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        loop = self.loop
        assert loop is not None
        if not events:
            if timeout is None:
                raise Deadlock("the loop would wait for ever")
            loop.now += timeout
        loop.step()
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: waiting costs nothing, order is deterministic."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0
        self.steps = 0
        self.on_step: Callable[[], None] | None = None

    def time(self) -> float:
        return self.now

    def step(self) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step()


# -- records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: int
    #: the idempotency key it must be acknowledged under, None for a bad record
    expect_key: str | None


def order_value(n: int) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"evt-{n}",
            "source": "shop/orders",
            "type": "order.confirmed",
            "time": _now_rfc3339(),
            "subject": f"ord-{n}",
            "data": {
                "order_id": f"ord-{n}",
                "order_number": f"A-{n}",
                "customer": {"name": f"Customer {n}", "email": f"c{n}@example.com"},
                "currency": "EUR",
                "items": [{"sku": "S", "name": "W", "quantity": 1, "unit_price_cents": 100}],
                "total_cents": 100,
            },
        }
    )


def _now_rfc3339() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# -- fake Kafka ---------------------------------------------------------------------


class FakeGroup:
    """Partitions, committed offsets and membership of one consumer group."""

    def __init__(self, rng: random.Random, partitions: Mapping[int, list[Record]]) -> None:
        self.rng = rng
        self.records = {TopicPartition(TOPIC, p): recs for p, recs in partitions.items()}
        self.committed: dict[TopicPartition, int] = {}
        #: the metadata of each committed offset (batch plans)
        self.metadata: dict[TopicPartition, str] = {}
        self.letters: list[DeadLetter] = []
        #: commits whose position fell inside a recorded batch (the next owner could
        #: not read all of its members back)
        self.split_commits: list[str] = []
        self.members: list[FakeConsumer] = []
        self.generation = 0
        self.owner: dict[TopicPartition, FakeConsumer] = {}
        self.rebalancing = False
        self.again = False
        self.rebalances = 0
        self.background: set[asyncio.Future[None]] = set()

    def later(self) -> None:
        """Start a rebalance in the background (a member joined or left)."""
        task = asyncio.ensure_future(self.rebalance())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def end(self, tp: TopicPartition) -> int:
        recs = self.records[tp]
        return recs[-1].offset + 1 if recs else 0

    async def rebalance(self) -> None:
        """Eager: every member revokes everything, then a new split is assigned.

        A rebalance asked for while one runs (a member joins or leaves) runs next.
        """
        if self.rebalancing:
            self.again = True
            return
        self.rebalancing = True
        try:
            self.again = True
            while self.again:
                self.again = False
                await self._rebalance_once()
        finally:
            self.rebalancing = False

    async def _rebalance_once(self) -> None:
        self.rebalances += 1
        members = [m for m in self.members if m.started]
        await asyncio.gather(*(m.revoke_all() for m in members))
        self.generation += 1
        self.owner.clear()
        members = [m for m in members if m.started]
        if not members:
            return
        tps = sorted(self.records)
        self.rng.shuffle(tps)
        split: dict[FakeConsumer, set[TopicPartition]] = {m: set() for m in members}
        for i, tp in enumerate(tps):
            member = (
                members[i % len(members)] if self.rng.random() < 0.8 else (self.rng.choice(members))
            )
            split[member].add(tp)
            self.owner[tp] = member
        for member in members:
            await member.assign(split[member])


class FakeConsumer:
    """The part of AIOKafkaConsumer the driver uses, over a `FakeGroup`."""

    def __init__(self, group: FakeGroup, rng: random.Random, name: str) -> None:
        self.group = group
        self.rng = rng
        self.name = name
        self.listener: Any = None
        self.started = False
        self._assignment: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._position: dict[TopicPartition, int] = {}
        self._fetched: set[TopicPartition] = set()
        self.fetch_failures = 0.0
        #: chance that a fetch triggers a rebalance in the same loop turn
        self.churn = 0.0
        group.members.append(self)

    def __repr__(self) -> str:
        return f"<FakeConsumer {self.name} {sorted(tp.partition for tp in self._assignment)}>"

    def __hash__(self) -> int:
        return id(self)

    def subscribe(self, topics: Sequence[str] = (), pattern: str | None = None, **kw: Any) -> None:
        self.listener = kw["listener"]

    async def start(self) -> None:
        self.started = True
        await self.group.rebalance()

    async def stop(self) -> None:
        # leaving the group makes the coordinator rebalance the others
        self.started = False
        self._assignment = set()
        self.group.later()

    async def revoke_all(self) -> None:
        revoked, self._assignment = set(self._assignment), set()
        self._paused.clear()
        await self.listener.on_partitions_revoked(revoked)

    async def assign(self, tps: set[TopicPartition]) -> None:
        if not self.started:
            return
        self._assignment = set(tps)
        for tp in tps:
            self._position[tp] = self.group.committed.get(tp, 0)
        await self.listener.on_partitions_assigned(set(tps))

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tp for tp in tps if tp in self._assignment)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)

    def highwater(self, tp: TopicPartition) -> int | None:
        # like aiokafka: known only once a fetch answered for the partition
        return self.group.end(tp) if tp in self._fetched else None

    async def committed(self, tp: TopicPartition) -> int | None:
        await asyncio.sleep(self.rng.random() * 0.01)
        return self.group.committed.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        assert tp in self._assignment, f"seek of unassigned {tp}"
        self._position[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        assert tp in self._assignment, f"position of unassigned {tp}"
        return self._position.get(tp, 0)

    async def seek_to_beginning(self, *tps: TopicPartition) -> bool:
        for tp in tps:
            self._position[tp] = 0
        return True

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.group.end(tp) for tp in tps}

    async def topics(self) -> set[str]:
        return {TOPIC}

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        rng = self.rng
        await asyncio.sleep(rng.choice((0.0, 0.0, 0.001, 0.01)))
        if rng.random() < self.fetch_failures:
            raise KafkaConnectionError("simulated fetch failure")
        out: dict[TopicPartition, list[Record]] = {}
        budget = max_records or 1 << 30
        wanted = self._assignment & set(partitions) if partitions else self._assignment
        for tp in sorted(wanted - self._paused):
            pos = self._position.get(tp, 0)
            recs = [r for r in self.group.records[tp] if r.offset >= pos]
            take = recs[: min(budget, rng.randint(1, 12))]
            self._fetched.add(tp)
            if take:
                out[tp] = take
                self._position[tp] = take[-1].offset + 1
                budget -= len(take)
            if budget <= 0:
                break
        if out and rng.random() < self.churn:
            # the coordinator starts a rebalance in the very turn these records arrive
            asyncio.get_running_loop().call_soon(self.group.later)
        if not out:
            await asyncio.sleep(timeout_ms / 1000)
        return out


class FakeCommitter:
    """Dead letters and the offset commit as one atomic, owner-checked step."""

    def __init__(self, group: FakeGroup, consumer: FakeConsumer, rng: random.Random) -> None:
        self.group = group
        self.consumer = consumer
        self.rng = rng
        self.commit_failures = 0.0
        self.dlq_failures = 0.0
        self.assign_failures = 0.0
        self.commits = 0

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        await asyncio.sleep(self.rng.choice((0.0, 0.002)))
        if self.rng.random() < self.assign_failures:
            raise CommitFailed("simulated: the committer could not fence")
        committed, metadata = self.group.committed, self.group.metadata
        return {
            tp: OffsetAndMetadata(committed[tp], metadata.get(tp, "")) if tp in committed else None
            for tp in partitions
        }

    async def revoke(self, partitions: set[TopicPartition]) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def commit(
        self, tp: TopicPartition, position: int, metadata: str, letters: Sequence[DeadLetter]
    ) -> None:
        rng = self.rng
        await asyncio.sleep(rng.choice((0.0, 0.001, 0.02, 0.2)))
        if letters and rng.random() < self.dlq_failures:
            raise DeadLetterUnavailable("simulated dead-letter failure")
        if rng.random() < self.commit_failures:
            raise CommitFailed("simulated commit failure")
        # the generation stays valid until every member has revoked (owner cleared then)
        if self.group.owner.get(tp) is not self.consumer:
            raise CommitFailed("not the owner (stale generation)")
        for text in (self.group.metadata.get(tp), metadata):
            plan = Plan.decode(text)
            for batch in plan.batches if plan is not None else ():
                if batch.first < position <= batch.last:
                    self.group.split_commits.append(
                        f"{tp} committed {position} inside batch {batch.members}"
                    )
        self.group.letters.extend(letters)
        self.group.committed[tp] = position
        self.group.metadata[tp] = metadata
        self.commits += 1


# -- fake Resend --------------------------------------------------------------------


@dataclass
class FakeResend:
    """Answers like Resend: by phase and by seeded chance; remembers keys."""

    rng: random.Random
    phase: str = "healthy"  # healthy | outage | auth
    rejected_keys: frozenset[str] = frozenset()
    acked: dict[str, int] = field(default_factory=dict)
    on_wire: list[tuple[str, str]] = field(default_factory=list)
    chaos: bool = True
    #: seconds a request may wait for its rate-limit token (drawn per request)
    pace_choices: tuple[float, ...] = (0.0, 0.0, 0.01, 0.3)
    requests: int = 0
    probes: int = 0
    #: invariant breaches seen inside send (an assert there would be caught as a bug)
    violations: list[str] = field(default_factory=list)

    #: keys published by more than one record (a duplicate publish)
    shared_keys: frozenset[str] = frozenset()
    #: the idempotency key of each email body (batch members carry none of their own)
    body_keys: dict[bytes, str] = field(default_factory=dict)
    #: emails actually sent (first acceptance of a key), by the member's key
    delivered: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    _seen: set[str] = field(default_factory=set)

    def client(self, member: str) -> MemberClient:
        return MemberClient(self, member)

    def members(self, body: bytes) -> list[str]:
        return [
            self.body_keys[orjson.dumps(m, option=orjson.OPT_SORT_KEYS)] for m in orjson.loads(body)
        ]

    def _deliver(self, key: str) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.delivered[key] = self.delivered.get(key, 0) + 1

    async def send(self, member: str, endpoint: str, key: str, body: bytes = b"") -> Answer:
        wire = [m for k, m in self.on_wire if k == key]
        if member in wire:
            self.violations.append(f"{key} twice on the wire in member {member}")
        elif wire and key not in self.shared_keys:
            self.violations.append(f"{key} on the wire in members {member} and {wire[0]} at once")
        entry = (key, member)
        self.on_wire.append(entry)
        self.requests += 1
        try:
            await asyncio.sleep(self.rng.choice((0.001, 0.02, 0.08, 0.3)))
            batch = endpoint == ENDPOINT_BATCH
            members = self.members(body) if batch else [key]
            if len(wire):
                status, payload, extra = 409, {"name": "concurrent_idempotent_requests"}, {}
            else:
                status, payload, extra = self._answer("" if batch else key)
            if 200 <= status < 300 and batch:
                refused = [i for i, k in enumerate(members) if k in self.rejected_keys]
                payload = {
                    "data": [{"id": f"email-{k}"} for k in members if k not in self.rejected_keys]
                }
                if refused:
                    payload["errors"] = [{"index": i, "message": "refused"} for i in refused]
                if key not in self._seen:
                    self._seen.add(key)
                    self.batches += 1
                    for k in members:
                        if k not in self.rejected_keys:
                            self.delivered[k] = self.delivered.get(k, 0) + 1
                for k in members:
                    if k not in self.rejected_keys:
                        self.acked[k] = self.acked.get(k, 0) + 1
            elif 200 <= status < 300:
                self._deliver(key)
                self.acked[key] = self.acked.get(key, 0) + 1
            return answer_from_response(status, extra, orjson.dumps(payload), endpoint=endpoint)
        finally:
            self.on_wire.remove(entry)

    async def probe(self, endpoint: str) -> Answer:
        self.probes += 1
        await asyncio.sleep(self.rng.choice((0.001, 0.02)))
        if self.phase in ("auth", "outage"):
            status, payload, extra = self._answer("")
        else:
            status, payload, extra = 422, {"name": "validation_error", "message": "from"}, {}
        return answer_from_response(status, extra, orjson.dumps(payload), endpoint=endpoint)

    def _answer(self, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        if self.phase == "auth":
            return 401, {"name": "invalid_api_key", "message": "bad key"}, {}
        if self.phase == "outage":
            return 503, {"name": "internal_server_error", "message": "down"}, {}
        if key in self.rejected_keys:
            return 422, {"name": "validation_error", "message": "refused"}, {}
        if self.chaos:
            roll = self.rng.random()
            if roll < 0.05:
                return 503, {"name": "internal_server_error", "message": "blip"}, {}
            if roll < 0.08:
                return 429, {"name": "rate_limit_exceeded", "message": "slow"}, {"retry-after": "1"}
        return 200, {"id": f"email-{key}"}, {}


@dataclass
class MemberClient:
    """One member's view of `FakeResend` (the Sender and pace the pipeline calls)."""

    resend: FakeResend
    member: str

    #: requests served by `pace`, and those in it now (what a rate limiter reports)
    acquired: int = 0
    pacing: int = 0

    async def pace(self, priority: int = 1) -> None:
        self.pacing += 1
        try:
            await asyncio.sleep(self.resend.rng.choice(self.resend.pace_choices))
        finally:
            self.pacing -= 1
        self.acquired += 1

    @property
    def limiter(self) -> MemberClient:
        return self  # the planner asks the rate limiter what queues there

    def waiting(self, priority: int = 1) -> int:
        """Requests waiting in `pace` (any priority: the fake serves no order)."""
        return self.pacing

    def set_share(self, share: float) -> None:
        return None

    async def send(
        self,
        *,
        endpoint: str,
        body: bytes,
        idempotency_key: str | None,
        headers: Mapping[str, str] | None = None,
        paced: bool = False,
    ) -> Answer:
        if idempotency_key is None:  # the gate's idle probe: refused, nothing sent
            return await self.resend.probe(endpoint)
        return await self.resend.send(self.member, endpoint, idempotency_key, body)


# -- the world ----------------------------------------------------------------------


_PREPARERS: dict[tuple[object, ...], Preparer] = {}


def _preparer(settings: Settings) -> Preparer:
    """Loading routes and templates costs milliseconds: one Preparer per distinct policy."""
    key = (
        settings.max_event_age,
        settings.stale_policy,
        settings.max_event_bytes,
        settings.batch_size,
        settings.batch_linger,
    )
    found = _PREPARERS.get(key)
    if found is None:
        found = _PREPARERS[key] = Preparer.from_settings(settings)
    return found


def build_records(
    rng: random.Random, partitions: int, per_partition: int
) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {}
    n = 0
    for p in range(partitions):
        recs = []
        for offset in range(per_partition):
            roll = rng.random()
            if roll < 0.1:
                recs.append(Record(offset, b"bad", b"not json", (), 0, None))
                continue
            if roll < 0.15 and n > 0:
                m = rng.randrange(n)  # a duplicate publish of an earlier event
            else:
                m = n
                n += 1
            key = f"k{m % 7}".encode() if rng.random() < 0.7 else None
            recs.append(Record(offset, key, order_value(m), (), 0, f"order-confirmation:ord-{m}"))
        out[p] = recs
    return out


class Invariants:
    """Checked after every loop turn; raise AssertionError with what broke."""

    def __init__(self, group: FakeGroup, pipelines: list[Pipeline], resend: FakeResend) -> None:
        self.group = group
        self.pipelines = pipelines
        self.resend = resend
        self.last: dict[TopicPartition, int] = {}

    def check(self) -> None:
        group = self.group
        assert not self.resend.violations, self.resend.violations[0]
        assert not group.split_commits, group.split_commits[0]
        for tp, pos in group.committed.items():
            before = self.last.get(tp, 0)
            assert pos >= before, f"{tp} committed went backwards: {before} -> {pos}"
            if pos != before:
                self._finished(tp, before, pos)
                self.last[tp] = pos
        for pipeline in self.pipelines:
            for key, lane in pipeline.dispatch.lanes.items():
                assert not lane.queue or lane.alive(), f"lane {key} holds work without a task"

    def _finished(self, tp: TopicPartition, first: int, last: int) -> None:
        """Every offset in first..last-1 has a final outcome: acknowledged or dead-lettered."""
        lettered = {(ltr.partition, ltr.offset) for ltr in self.group.letters}
        # a second copy of a batched email is skipped: its first copy's letter covers it
        lettered_keys = {ltr.idempotency_key for ltr in self.group.letters}
        for rec in self.group.records[tp]:
            if not first <= rec.offset < last or (tp.partition, rec.offset) in lettered:
                continue
            if rec.expect_key in self.resend.shared_keys and rec.expect_key in lettered_keys:
                continue
            assert rec.expect_key is not None, (
                f"{tp}@{rec.offset} committed before its dead letter was written"
            )
            assert rec.expect_key in self.resend.acked, (
                f"{tp}@{rec.offset} committed before {rec.expect_key} was acknowledged"
            )


@dataclass
class SeedResult:
    seed: int
    virtual_seconds: float
    steps: int
    rebalances: int
    requests: int


def sim_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_topics": (TOPIC,),
        "routes_file": ROOT / "schemas" / "routes.yaml",
        "max_in_flight": 4,
        "max_pending": 20,
        "max_pending_per_partition": 8,
        "max_pending_bytes": 4 * 1_048_576,
        "commit_interval": 0.5,
        "drain_timeout": 2.0,
        "shutdown_timeout": 2.0,
        "kafka_rebalance_timeout": 10.0,
        "retry_base": 0.05,
        "retry_cap": 1.0,
        "retry_max_attempts": 6,
        "retry_max_elapsed": 30.0,
        "probe_initial": 0.2,
        "probe_max": 2.0,
        "resend_total_timeout": 5.0,
        "stall_timeout": 60.0,
        "progress_interval": 3600.0,
        "health_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Member:
    consumer: FakeConsumer
    committer: FakeCommitter
    pipeline: Pipeline
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.stop.clear()
            self.task = asyncio.create_task(self.pipeline.run(self.stop))

    async def leave(self) -> None:
        if self.task is not None and not self.task.done():
            self.stop.set()
            await self.task


class World:
    """A group of two members over fake Kafka and fake Resend, on a `VirtualLoop`."""

    def __init__(
        self,
        loop: VirtualLoop,
        seed: int,
        *,
        partitions: int = 3,
        per_partition: int = 12,
        settings: Settings | None = None,
        tracer: Any = None,
    ) -> None:
        self.loop = loop
        self.tracer = tracer
        self.seed = seed
        #: epoch time at virtual 0: event ages follow virtual time
        self.wall_start = time.time()
        rng = self.rng = random.Random(seed)
        self.settings = settings or sim_settings()
        group = self.group = FakeGroup(rng, build_records(rng, partitions, per_partition))
        keys = [r.expect_key for recs in group.records.values() for r in recs if r.expect_key]
        self.expected = set(keys)
        self.rejected = frozenset(k for k in sorted(self.expected) if rng.random() < 0.05)
        shared = frozenset(k for k in keys if keys.count(k) > 1)
        self.resend = FakeResend(rng=rng, rejected_keys=self.rejected, shared_keys=shared)
        preparer = _preparer(self.settings)
        for recs in group.records.values():
            for r in recs:
                got = preparer.prepare(
                    r.value, (), topic=TOPIC, partition=0, offset=0, timestamp_ms=None
                )
                if isinstance(got, Prepared):
                    self.resend.body_keys[got.body] = got.idempotency_key
        self.members = [self._member(name) for name in ("a", "b")]
        self.invariants = Invariants(group, [m.pipeline for m in self.members], self.resend)
        loop.on_step = self.invariants.check

    def _member(self, name: str) -> Member:
        loop, rng, settings = self.loop, self.rng, self.settings
        consumer = FakeConsumer(self.group, rng, name)
        committer = FakeCommitter(self.group, consumer, rng)
        gate = ServiceGate(
            probe_initial=settings.probe_initial,
            probe_max=settings.probe_max,
            clock=loop.time,
            random=rng.random,
        )
        pipeline = Pipeline(
            settings=settings,
            preparer=_preparer(settings),
            client=self.resend.client(name),
            gate=gate,
            policy=RetryPolicy(
                base=settings.retry_base,
                cap=settings.retry_cap,
                max_attempts=settings.retry_max_attempts,
                max_elapsed=settings.retry_max_elapsed,
                random=rng.random,
            ),
            metrics=Metrics(),
            health=Health(clock=loop.time),
            consumer=consumer,
            committer=committer,
            clock=loop.time,
            wall_clock=lambda: self.wall_start + loop.time(),
            **({"tracer": self.tracer} if self.tracer is not None else {}),
        )
        return Member(consumer, committer, pipeline, asyncio.Event())

    def calm(self) -> None:
        """No more faults from here on."""
        self.resend.phase = "healthy"
        self.resend.chaos = False
        for m in self.members:
            m.consumer.churn = 0.0
            m.consumer.fetch_failures = 0.0
            m.committer.commit_failures = 0.0
            m.committer.dlq_failures = 0.0
            m.committer.assign_failures = 0.0

    def finished(self) -> bool:
        group = self.group
        return all(group.committed.get(tp, 0) == group.end(tp) for tp in group.records)

    async def settle(self, limit: float = 600.0) -> None:
        """Wait (virtual time) until every offset is committed; assert it happens."""
        deadline = self.loop.time() + limit
        while self.loop.time() < deadline and not self.finished():
            await asyncio.sleep(1.0)
        group = self.group
        unfinished = {
            tp.partition: (group.committed.get(tp, 0), group.end(tp))
            for tp in group.records
            if group.committed.get(tp, 0) != group.end(tp)
        }
        details = [repr(m.pipeline) for m in self.members]
        if unfinished and os.environ.get("SIM_DEBUG"):
            for m in self.members:
                for tp, part in m.pipeline.engine.parts.items():
                    pl = part.planner
                    print(
                        m.consumer.name,
                        tp.partition,
                        "works",
                        sorted(part.works),
                        "open",
                        pl._open and [i.offset for i in pl._open.items],
                        "unrec",
                        [[i.offset for i in u.items] for u in pl._unrecorded],
                        "pending",
                        sorted(pl._pending),
                        "lanes",
                        [
                            (
                                k,
                                [getattr(w, "offset", None) for w in ln.queue],
                                ln.alive(),
                                type(ln.current).__name__,
                            )
                            for k, ln in m.pipeline.dispatch.lanes.items()
                            if k[0] == tp
                        ],
                    )
        assert not unfinished, f"stalled: committed/end {unfinished}; {details}"

    async def close(self) -> None:
        for m in self.members:
            await m.leave()

    def check_exactly_once(self) -> None:
        resend, group = self.resend, self.group
        missing = self.expected - set(resend.acked) - self.rejected
        assert not missing, f"never acknowledged: {sorted(missing)[:5]}"
        # A duplicate publish in another partition (or after a rebalance) may go out
        # in two batches: a member has no key of its own at Resend (a documented limit).
        twice_sent = {
            k: n for k, n in resend.delivered.items() if n > 1 and k not in resend.shared_keys
        }
        assert not twice_sent, f"emails sent twice: {sorted(twice_sent)[:5]}"
        letters: dict[tuple[int, int], int] = {}
        for letter in group.letters:
            at = (letter.partition, letter.offset)
            letters[at] = letters.get(at, 0) + 1
        twice = {at: n for at, n in letters.items() if n > 1}
        assert not twice, f"dead letters written twice: {twice}"
        bad = {
            (tp.partition, r.offset)
            for tp, recs in group.records.items()
            for r in recs
            if r.expect_key is None or r.expect_key in self.rejected
        }
        # copies of a refused email after one in a batch are skipped as duplicates
        lettered_keys = {letter.idempotency_key for letter in group.letters}
        optional = {
            (tp.partition, r.offset)
            for tp, recs in group.records.items()
            for r in recs
            if r.expect_key in resend.shared_keys and r.expect_key in lettered_keys
        }
        differ = (set(letters) ^ bad) - optional
        assert not differ, f"dead letters {sorted(differ)[:5]} differ"

    def outcome(self) -> SeedResult:
        return SeedResult(
            seed=self.seed,
            virtual_seconds=self.loop.time(),
            steps=self.loop.steps,
            rebalances=self.group.rebalances,
            requests=self.resend.requests,
        )


def run(scenario: Callable[[World], Any], seed: int = 0, **kw: Any) -> Any:
    """Run `scenario(world)` (a coroutine function) on a fresh virtual loop."""
    loop = VirtualLoop()
    random.seed(seed)  # the fetcher shuffles partitions with the module's generator
    try:
        world = World(loop, seed, **kw)
        return loop.run_until_complete(scenario(world))
    finally:
        loop.on_step = None
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(_gather(left))
        loop.close()


async def _gather(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def run_seed(seed: int, *, partitions: int = 3, per_partition: int = 12) -> SeedResult:
    """One seeded world: chaos, then calm; raises AssertionError naming the seed."""
    try:
        return run(_chaos, seed, partitions=partitions, per_partition=per_partition)
    except AssertionError as exc:
        raise AssertionError(
            f"seed {seed}: {exc} (replay: PYTHONHASHSEED=0 .venv/bin/python -m tests.sim {seed})"
        ) from exc


async def _chaos(world: World) -> SeedResult:
    loop, rng, group, resend = world.loop, world.rng, world.group, world.resend
    first, second = world.members
    first.start()
    # chaos: the second member joins and leaves, rebalances in the middle of fetches,
    # outages and auth failures open the gate, commits and dead-letter writes fail
    chaos_until = loop.time() + rng.uniform(5.0, 40.0)
    for m in world.members:
        m.consumer.churn = rng.choice((0.0, 0.05, 0.3))
        m.consumer.fetch_failures = rng.choice((0.0, 0.05))
        m.committer.commit_failures = rng.choice((0.0, 0.1, 0.3))
        m.committer.dlq_failures = rng.choice((0.0, 0.2, 0.6))
        m.committer.assign_failures = rng.choice((0.0, 0.0, 0.3))
    while loop.time() < chaos_until:
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        roll = rng.random()
        if roll < 0.25:
            if second.task is None or second.task.done():
                second.start()
            else:
                await second.leave()
        elif roll < 0.4:
            group.later()
        elif roll < 0.5:
            resend.phase = rng.choice(("outage", "auth"))
        elif roll < 0.6:
            resend.phase = "healthy"
    world.calm()
    await world.settle()
    await world.close()
    world.check_exactly_once()
    for m in world.members:
        p = m.pipeline
        assert p.pending_bytes == 0, f"{p!r} holds {p.pending_bytes} bytes after it stopped"
        assert not p.dispatch.lanes, f"{p!r} left lanes behind"
        assert not p.dispatch.key_locks, f"{p!r} left key locks behind"
        assert p.in_flight == 0, f"{p!r} counts requests on the wire after it stopped"
    return world.outcome()


def main(argv: Sequence[str]) -> int:
    """`python -m tests.sim SEED` replays one seed; `A:B` runs seeds A..B-1."""
    import logging
    import sys
    import time

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    text = argv[0] if argv else "0:200"
    first, _, last = text.partition(":")
    seeds = range(int(first), int(last)) if last else range(int(first), int(first) + 1)
    started = time.perf_counter()
    failed = []
    for seed in seeds:
        try:
            run_seed(seed)
        except AssertionError as exc:
            failed.append(seed)
            print(exc, file=sys.stderr)
    took = time.perf_counter() - started
    print(f"{len(seeds)} seeds in {took:.1f}s ({len(seeds) / took:.0f}/s), {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
