"""The engine under a deterministic simulation: fake group, fake Resend, virtual time.

`tests/sim.py` holds the world; these tests run thousands of seeded chaos
schedules (invariants checked after every loop turn) and scripted scenarios,
one per mechanism that once stalled a partition or lost track of a record.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from consumer.logs import LogEvent
from consumer.state import BatchJob
from tests import sim
from tests.sim import World

ROOT = Path(__file__).resolve().parent.parent
#: seeds the CI run explores; raise it locally (SIM_SEEDS=20000) before touching the engine
SEEDS = int(os.environ.get("SIM_SEEDS", "1000"))


def test_seeded_chaos_schedules_keep_every_invariant() -> None:
    """Thousands of seeded schedules of churn, outages and failing commits: no invariant breaks,
    every group finishes, each email is acknowledged and each dead letter written once."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.sim", f"0:{SEEDS}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{SEEDS} seeds in" in done.stdout
    assert ", 0 failed" in done.stdout


def test_a_failing_seed_names_itself_for_replay() -> None:
    """A broken invariant raises with the seed and the command that replays it."""

    async def broken(world: World) -> None:
        world.group.committed[next(iter(world.group.records))] = 5
        world.invariants.check()

    with pytest.raises(AssertionError, match="committed before"):
        sim.run(broken, seed=7)
    with pytest.raises(AssertionError, match=r"seed 7: .*python -m tests.sim 7"):
        _failing_seed(7)


def _failing_seed(seed: int) -> None:
    """run_seed's wording around a breach, with a world made to break."""
    original = sim._chaos

    async def broken(world: World) -> sim.SeedResult:
        world.group.committed[next(iter(world.group.records))] = 5
        world.invariants.check()
        return world.outcome()

    sim._chaos = broken  # type: ignore[assignment]
    try:
        sim.run_seed(seed)
    finally:
        sim._chaos = original  # type: ignore[assignment]


async def _start_alone(world: World) -> sim.Member:
    member = world.members[0]
    member.start()
    await asyncio.sleep(0.1)
    return member


def test_revoke_in_the_same_turn_as_intake_leaves_no_dead_lane() -> None:
    """Every fetch that hands out records also starts a rebalance in the same loop turn:
    lanes cancelled before their first step are replaced, and the partition finishes."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = await _start_alone(world)
        member.consumer.churn = 1.0
        await asyncio.sleep(20.0)
        assert world.group.rebalances > 10
        world.calm()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    for ordering in ("partition", "key"):
        sim.run(scenario, seed=3, settings=sim.sim_settings(ordering=ordering))


def test_an_open_gate_probes_by_itself_after_a_rebalance() -> None:
    """Resend is down, the gate opens, a rebalance cancels every waiting delivery; once Resend
    is back the group resumes by itself (new records come in and probe)."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        world.resend.phase = "outage"
        member = await _start_alone(world)
        await asyncio.sleep(10.0)
        assert member.pipeline.gate.state == "open"
        await world.group.rebalance()
        await asyncio.sleep(5.0)
        world.resend.phase = "healthy"
        await world.settle()
        assert member.pipeline.gate.state == "closed"
        await world.close()
        world.check_exactly_once()

    sim.run(scenario, seed=11)


def test_a_dead_letter_outage_across_a_rebalance_ends_when_the_topic_is_back() -> None:
    """Dead letters cannot be written, the service pauses; after a rebalance and once the
    dead-letter topic is writable again, every partition finishes."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = await _start_alone(world)
        member.committer.dlq_failures = 1.0
        await asyncio.sleep(10.0)
        assert member.pipeline.health.ready()[1]["open_circuits"] == ["dlq_unavailable"]
        await world.group.rebalance()
        await asyncio.sleep(5.0)
        member.committer.dlq_failures = 0.0
        await world.settle()
        assert member.pipeline.health.ready()[1]["open_circuits"] == []
        await world.close()
        world.check_exactly_once()

    sim.run(scenario, seed=5)


def test_records_handed_out_while_the_committer_fences_are_read_again() -> None:
    """aiokafka may fetch before on_partitions_assigned returns: records dropped in that window
    are fetched again from the committed offset, none is skipped."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        slow = member.committer.assign

        async def slow_assign(partitions: object) -> object:
            await asyncio.sleep(1.0)  # fetches run meanwhile
            return await slow(partitions)  # type: ignore[arg-type]

        member.committer.assign = slow_assign  # type: ignore[method-assign]
        member.start()
        await asyncio.sleep(3.0)
        await world.group.rebalance()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    sim.run(scenario, seed=2)


def test_a_stalled_partition_is_logged_counted_and_fails_liveness() -> None:
    """A lane that never runs (the shape of the stall we shipped) is found by the watchdog:
    one partition.stalled line, the gauge, and /healthz failing; it clears once work moves."""
    found: dict[str, float] = {}

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        pipeline = member.pipeline
        pipeline_enqueue = pipeline.dispatch.submit
        sabotaged: list[object] = []

        def enqueue(tp, lane_key, work):  # type: ignore[no-untyped-def]
            if tp.partition == 1 and (not sabotaged or work is sabotaged[0]):
                sabotaged.append(work)  # dropped from all its lanes: never finished
                return
            pipeline_enqueue(tp, lane_key, work)

        pipeline.dispatch.submit = enqueue  # type: ignore[method-assign]
        world.loop.on_step = None  # the dropped record is the point of this test
        member.start()
        stall_started = world.loop.time()
        with capture_logs() as logs:
            while pipeline.health.live()[0]:
                await asyncio.sleep(0.5)
                assert world.loop.time() - stall_started < 600, "the stall was never reported"
        found["after"] = world.loop.time() - stall_started
        stalled = [e for e in logs if e["event"] == LogEvent.PARTITION_STALLED]
        assert len(stalled) == 1
        assert stalled[0]["partition"] == 1
        assert "in no lane" in stalled[0]["waiting_for"]
        assert pipeline.health.live()[1]["stalled_partitions"] == 1
        assert b"resend_consumer_stalled_partitions 1.0" in pipeline.metrics.render()
        # a restart (here: a rebalance, the same fresh start) sends it again
        pipeline.dispatch.submit = pipeline_enqueue  # type: ignore[method-assign]
        await world.group.rebalance()
        await world.settle()
        pipeline.check_stalls()
        assert pipeline.health.live()[0]
        await world.close()

    sim.run(scenario, seed=4)
    timeout = sim.sim_settings().stall_timeout
    # reported within one watchdog interval after STALL_TIMEOUT (virtual seconds)
    assert timeout <= found["after"] <= timeout + 5.0 + 1.0


def test_a_batch_one_of_whose_lanes_never_reaches_it_is_a_stall_not_a_delivery() -> None:
    """Lanes waiting at a batch's barrier are not progress: if one member lane never gets
    there, the watchdog reports the batch instead of calling it 'delivering' for ever."""
    found: list[dict[str, object]] = []

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        pipeline = member.pipeline
        pipeline_enqueue = pipeline.dispatch.submit
        dropped: list[object] = []

        def enqueue(tp, lane_key, work):  # type: ignore[no-untyped-def]
            if isinstance(work, BatchJob) and work.lanes > 1 and not dropped:
                dropped.append(work)  # one lane of a multi-lane batch loses it
                return
            pipeline_enqueue(tp, lane_key, work)

        pipeline.dispatch.submit = enqueue  # type: ignore[method-assign]
        world.loop.on_step = None
        member.start()
        started = world.loop.time()
        with capture_logs() as logs:
            while pipeline.health.live()[0]:
                await asyncio.sleep(0.5)
                assert world.loop.time() - started < 600, "the stall was never reported"
        found.extend(e for e in logs if e["event"] == LogEvent.PARTITION_STALLED)
        assert dropped
        pipeline.dispatch.submit = pipeline_enqueue  # type: ignore[method-assign]
        await world.group.rebalance()
        await world.settle()
        await world.close()

    sim.run(scenario, seed=4, settings=sim.sim_settings(batch_linger=5.0))
    assert len(found) == 1
    assert "lanes" in str(found[0]["waiting_for"]), found[0]


def test_lag_is_reported_for_a_partition_that_never_fetched() -> None:
    """A partition assigned but held before its first fetch still reports its lag."""

    async def scenario(world: World) -> None:
        member = world.members[0]
        member.consumer.pause = lambda *tps: None  # type: ignore[method-assign]
        original = member.consumer.getmany

        async def never(*a: object, **kw: object) -> dict[object, object]:
            await asyncio.sleep(0.5)
            return {}

        member.consumer.getmany = never  # type: ignore[method-assign]
        member.start()
        await asyncio.sleep(12.0)
        text = member.pipeline.metrics.render().decode()
        for tp in world.group.records:
            end = world.group.end(tp)
            assert (
                f'resend_consumer_lag{{partition="{tp.partition}",topic="orders"}} {end}.0' in text
            )
        member.consumer.getmany = original  # type: ignore[method-assign]
        await world.close()

    sim.run(scenario, seed=1)


def test_an_event_that_ages_while_the_gate_holds_it_is_not_sent() -> None:
    """Freshness is checked before every attempt: events that outlive MAX_EVENT_AGE behind an
    auth failure are dead-lettered as stale_event once the key works again, never sent."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        world.resend.phase = "auth"
        member = await _start_alone(world)
        await asyncio.sleep(90.0)  # longer than MAX_EVENT_AGE below
        before = dict(world.resend.acked)
        world.resend.phase = "healthy"
        await asyncio.sleep(30.0)
        assert world.resend.acked == before, "an event older than MAX_EVENT_AGE was sent"
        reasons = {letter.reason for letter in world.group.letters}
        assert "stale_event" in reasons
        await world.close()
        assert member.pipeline.pending_bytes == 0

    sim.run(scenario, seed=6, settings=sim.sim_settings(max_event_age=60.0))


def test_the_byte_bound_pauses_intake_before_memory_grows() -> None:
    """MAX_PENDING_BYTES bounds fetched-but-unfinished bytes (values and rendered bodies) even
    when the count bound is far away; nothing drifts once everything is finished."""
    peak: list[int] = [0]

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        member = world.members[0]
        pipeline = member.pipeline
        checks = world.loop.on_step

        def watch() -> None:
            assert checks is not None
            checks()
            peak[0] = max(peak[0], pipeline.pending_bytes)

        world.loop.on_step = watch
        member.start()
        await world.settle()
        await world.close()
        assert pipeline.pending_bytes == 0

    settings = sim.sim_settings(
        max_event_bytes=4096,
        max_pending_bytes=8192,
        max_pending=1000,
        max_pending_per_partition=1000,
    )
    sim.run(scenario, seed=8, settings=settings)
    # one fetch may overshoot the bound (at most 12 records of ~1 KiB per partition here)
    assert 0 < peak[0] <= 8192 + 3 * 12 * 1024


def test_an_idle_open_gate_probes_by_itself_and_turns_ready() -> None:
    """The gate opened, then every waiting delivery was refused as stale: with nothing left
    to send, the gate still probes (a request that sends nothing) and closes once Resend is
    back, so the pod turns ready again without new events."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        world.resend.phase = "auth"
        member = await _start_alone(world)
        await asyncio.sleep(90.0)  # every event ages past MAX_EVENT_AGE at the gate
        world.resend.phase = "healthy"
        await world.settle()  # all dead-lettered as stale_event: nothing waits any more
        assert member.pipeline.engine.delivering == 0
        probes = world.resend.probes
        for _ in range(60):
            if member.pipeline.gate.state == "closed":
                break
            await asyncio.sleep(1.0)
        assert member.pipeline.gate.state == "closed"
        assert member.pipeline.health.ready()[0]
        assert world.resend.probes >= probes
        assert not world.resend.acked, "a probe or a stale event was sent as an email"
        await world.close()

    sim.run(scenario, seed=6, settings=sim.sim_settings(max_event_age=60.0))


def test_a_dead_letter_inside_a_batch_does_not_wedge_a_long_partition() -> None:
    """Hundreds of small batches with bad records between their members: the letters are
    written while decisions keep coming, so commits pass the batches and the plan's
    metadata budget never fills up for good (it did: the commit waited before the first
    batch around a letter, the letter waited for a round with nothing new to record)."""

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        world.members[0].start()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    settings = sim.sim_settings(
        batch_size=5, max_pending=2000, max_pending_per_partition=2000, commit_interval=0.2
    )
    sim.run(scenario, seed=5, partitions=1, per_partition=1500, settings=settings)


def test_a_recovered_batch_whose_last_member_is_now_rejected_goes_without_it() -> None:
    """The previous owner recorded batch {0, 1, 2}; by the restart offset 2 is stale, so it
    never reaches the planner. The batch must still go (without it) and 2 be dead-lettered;
    it hung for good before (only a later record resolved a recovered batch)."""
    import orjson

    from consumer.batching import Plan, PlannedBatch, batch_digest
    from consumer.prepare import Prepared

    found: dict[str, object] = {}

    def value(n: int, when: float) -> bytes:
        doc = orjson.loads(sim.order_value(n))
        doc["time"] = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
        return orjson.dumps(doc)

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        tp = TopicPartition(sim.TOPIC, 0)
        now = world.wall_start
        records = [
            sim.Record(0, b"k0", value(0, now), (), 0, "order-confirmation:ord-0"),
            sim.Record(1, b"k1", value(1, now), (), 0, "order-confirmation:ord-1"),
            sim.Record(2, b"k2", value(2, now - 65), (), 0, "order-confirmation:ord-2"),
        ]
        world.group.records = {tp: records}
        preparer = sim._preparer(world.settings)
        for r in records:
            got = preparer.prepare(
                r.value,
                (),
                topic=sim.TOPIC,
                partition=0,
                offset=0,
                timestamp_ms=None,
                enforce_age=False,
            )
            assert isinstance(got, Prepared)
            world.resend.body_keys[got.body] = got.idempotency_key
        keys = [r.expect_key for r in records]
        world.group.committed[tp] = 0
        world.group.metadata[tp] = Plan(
            None, (PlannedBatch((0, 1, 2), batch_digest(keys)),)
        ).encode()
        member = world.members[0]
        member.start()
        await asyncio.sleep(120.0)
        found["committed"] = world.group.committed[tp]
        found["acked"] = sorted(world.resend.acked)
        found["letters"] = [(x.offset, x.reason) for x in world.group.letters]
        await world.close()

    sim.run(
        scenario,
        seed=1,
        partitions=1,
        per_partition=3,
        settings=sim.sim_settings(max_event_age=60.0, stall_timeout=60.0),
    )
    assert found["committed"] == 3
    assert found["acked"] == ["order-confirmation:ord-0", "order-confirmation:ord-1"]
    assert found["letters"] == [(2, "stale_event")]


def test_a_fresh_batch_that_cannot_fit_below_recovered_ones_goes_singly() -> None:
    """The previous owner's plan fills the metadata budget, and fresh offsets fall between
    its batches (the new owner batches otherwise): waiting for room would never end,
    since no commit can pass the fresh batch. It goes singly; everything finishes."""
    from consumer.batching import PLAN_BUDGET, Plan, PlannedBatch, batch_digest
    from consumer.prepare import Prepared

    found: dict[str, int] = {}

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        tp = TopicPartition(sim.TOPIC, 0)
        records = [
            sim.Record(
                o, f"k{o}".encode(), sim.order_value(o), (), 0, f"order-confirmation:ord-{o}"
            )
            for o in range(400)
        ]
        preparer = sim._preparer(world.settings)
        for r in records:
            got = preparer.prepare(
                r.value, (), topic=sim.TOPIC, partition=0, offset=0, timestamp_ms=None
            )
            assert isinstance(got, Prepared)
            world.resend.body_keys[got.body] = got.idempotency_key
        key = {r.offset: r.expect_key for r in records}
        # recorded: {1, 3, 4}, then batches of three up to the budget; 0 and 2 are fresh
        batches = [PlannedBatch((1, 3, 4), batch_digest(key[o] for o in (1, 3, 4)))]
        o = 5
        while True:
            nxt = PlannedBatch((o, o + 1, o + 2), batch_digest(key[x] for x in (o, o + 1, o + 2)))
            if len(Plan(None, (*batches, nxt)).encode()) > PLAN_BUDGET:
                break
            batches.append(nxt)
            o += 3
        world.group.records = {tp: records[:o]}
        world.expected = {key[x] for x in range(o)}
        world.group.committed[tp] = 0
        world.group.metadata[tp] = Plan(None, tuple(batches)).encode()
        member = world.members[0]
        member.start()
        await world.settle(limit=120.0)
        found["committed"] = world.group.committed[tp]
        found["end"] = o
        found["commits"] = member.committer.commits
        await world.close()
        world.check_exactly_once()

    settings = sim.sim_settings(batch_size=2, max_pending=5000, max_pending_per_partition=5000)
    sim.run(scenario, seed=1, partitions=1, per_partition=3, settings=settings)
    assert found["committed"] == found["end"]
    assert found["commits"] < 100  # no commit storm while waiting for room


def test_an_urgent_event_never_lifts_the_memory_bound() -> None:
    """A password reset at the head of a partition lets that partition past the count
    of other partitions' backlog while it is unfinished, never past MAX_PENDING_BYTES
    (it once did, for the rest of the assignment)."""
    import orjson

    from consumer.prepare import Prepared

    reset = orjson.loads((ROOT / "schemas/examples/password_reset.requested.json").read_text())

    def peak(first_urgent: bool) -> int:
        high = [0]

        async def scenario(world: World) -> None:
            world.resend.chaos = False
            tp = TopicPartition(sim.TOPIC, 0)
            preparer = sim._preparer(world.settings)
            head = (
                orjson.dumps(dict(reset, time=sim._now_rfc3339()))
                if first_urgent
                else sim.order_value(10_000)
            )
            values = [head, *(sim.order_value(o) for o in range(1, 600))]
            records = []
            for o, value in enumerate(values):
                got = preparer.prepare(
                    value, (), topic=sim.TOPIC, partition=0, offset=0, timestamp_ms=None
                )
                assert isinstance(got, Prepared)
                world.resend.body_keys[got.body] = got.idempotency_key
                records.append(sim.Record(o, f"k{o}".encode(), value, (), 0, got.idempotency_key))
            world.group.records = {tp: records}
            world.expected = {r.expect_key for r in records}
            member = world.members[0]
            checks = world.loop.on_step
            assert checks is not None

            def watch() -> None:
                checks()
                high[0] = max(high[0], member.pipeline.pending_bytes)

            world.loop.on_step = watch
            member.start()
            await world.settle()
            await world.close()

        settings = sim.sim_settings(
            max_event_bytes=4096,
            max_pending_bytes=8192,
            max_pending=1000,
            max_pending_per_partition=1000,
            batch_size=1,
        )
        sim.run(scenario, seed=3, partitions=1, per_partition=1, settings=settings)
        return high[0]

    normal, urgent = peak(False), peak(True)
    assert urgent <= 2 * normal, (normal, urgent)


def test_an_empty_partition_is_never_paused_by_the_count_bound() -> None:
    """With the backlog of one partition over MAX_PENDING, a partition holding nothing
    (an urgent topic's, between events) keeps fetching: paused with the backlog, the
    urgent mail it carries next waited for all of it (p99 23 s in bench_batch.py)."""
    from consumer.prepare import Prepared

    seen: dict[str, int] = {"over": 0, "empty_paused": 0}

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        busy, empty = TopicPartition(sim.TOPIC, 0), TopicPartition(sim.TOPIC, 1)
        preparer = sim._preparer(world.settings)
        records = []
        for o in range(300):
            value = sim.order_value(o)
            got = preparer.prepare(
                value, (), topic=sim.TOPIC, partition=0, offset=0, timestamp_ms=None
            )
            assert isinstance(got, Prepared)
            world.resend.body_keys[got.body] = got.idempotency_key
            records.append(sim.Record(o, f"k{o}".encode(), value, (), 0, got.idempotency_key))
        world.group.records = {busy: records, empty: []}
        world.expected = {r.expect_key for r in records}
        member = world.members[0]
        checks = world.loop.on_step
        assert checks is not None
        settings = world.settings

        def watch() -> None:
            checks()
            p = member.pipeline
            if p.ledger.total_pending() >= settings.max_pending and empty in p.engine.parts:
                seen["over"] += 1
                seen["empty_paused"] += empty in p.engine.paused

        world.loop.on_step = watch
        member.start()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    settings = sim.sim_settings(max_pending=20, max_pending_per_partition=20, batch_size=1)
    sim.run(scenario, seed=2, partitions=2, per_partition=1, settings=settings)
    assert seen["over"] > 0  # the bound was reached while both partitions were owned
    assert seen["empty_paused"] == 0


def test_every_outcome_line_says_why_and_splits_its_latency() -> None:
    """The canonical line of each event: a dead letter carries its message, and a line of
    an event that made requests splits `latency_ms` into Resend's time and the waits."""
    lines: list[dict[str, object]] = []

    async def scenario(world: World) -> None:
        world.resend.chaos = True  # 429s and 503s: attempts that wait between them
        with capture_logs() as logs:
            world.members[0].start()
            await world.settle()
            await world.close()
        lines.extend(e for e in logs if e["event"] == LogEvent.OUTCOME)

    sim.run(scenario, seed=7)
    dead = [e for e in lines if e["outcome"] == "dead_lettered"]
    sent = [e for e in lines if e["outcome"] == "sent"]
    assert dead
    assert sent
    assert all(isinstance(e.get("message"), str) and e["message"] for e in dead)
    assert not any("message" in e for e in sent)
    for e in lines:
        if e["attempts"]:
            assert isinstance(e["resend_ms"], float)
            assert isinstance(e["wait_ms"], float)
            assert e["resend_ms"] >= 0
            assert e["wait_ms"] >= 0
            assert abs(e["resend_ms"] + e["wait_ms"] - e["latency_ms"]) <= 0.2
        else:
            assert "resend_ms" not in e
            assert "wait_ms" not in e
    # the chaos answers make some events wait between attempts
    assert any(e["wait_ms"] > 0 for e in sent)


def test_batches_kept_open_behind_a_queue_at_the_limiter_still_go_exactly_once() -> None:
    """Every request waits for its token, so open batches are held past their linger
    while requests queue ahead; churn and chaos meanwhile. Holds end (what they wait
    for is served, or a minute passes), every email goes once, nothing stalls."""
    holds: list[bool] = []

    async def scenario(world: World) -> None:
        world.resend.pace_choices = (0.3, 0.5)
        for member in world.members:
            planning = member.pipeline.planning
            lingers_on = planning.lingers_on

            def watched(tp, part, lingers_on=lingers_on):  # type: ignore[no-untyped-def]
                held = lingers_on(tp, part)
                holds.append(held)
                return held

            planning.lingers_on = watched  # type: ignore[method-assign]
            member.start()
        await asyncio.sleep(5.0)
        await world.group.rebalance()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    # ORDERING=none: every batch a lane of its own, so many wait for tokens at once
    settings = sim.sim_settings(batch_size=5, batch_linger=0.05, ordering="none")
    sim.run(scenario, seed=11, settings=settings, partitions=2, per_partition=200)
    assert sum(holds) >= 5, f"{sum(holds)} holds of {len(holds)}: the scenario tests nothing"
    assert not all(holds)


def test_a_partition_holding_only_its_lingering_batch_is_not_a_stall() -> None:
    """BATCH_LINGER may outlast STALL_TIMEOUT (10 s against 6.5 s is accepted): a
    partition whose only work is the batch being filled is explained, never stalled."""
    not_live: list[float] = []

    async def scenario(world: World) -> None:
        world.resend.chaos = False
        world.resend.pace_choices = (0.0,)
        member = world.members[0]
        checks = world.loop.on_step
        assert checks is not None

        def watch() -> None:
            checks()
            if not member.pipeline.health.live()[0]:
                not_live.append(world.loop.time())

        world.loop.on_step = watch
        member.start()
        await world.settle()
        await world.close()
        world.check_exactly_once()

    settings = sim.sim_settings(batch_size=100, batch_linger=10.0, stall_timeout=6.5)
    sim.run(scenario, seed=0, settings=settings, partitions=1, per_partition=3)
    assert not not_live, f"/healthz failed at {not_live[0]:.1f} s with nothing stalled"
