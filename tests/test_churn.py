"""Group churn on the real broker: members join, leave and die while work flows.

Judged only from outside the processes: the sandbox's delivery ledger, the
group's committed offsets, the dead-letter topic read as its readers do
(read_committed), each process's /healthz and its JSON log lines.

Seeds: CHURN_SEED fixes the churn schedule (it is printed, and shown on failure).
KILL9_EVENTS and KILL9_BAD size the kill -9 run (default 3,000 events, 60 bad;
the issue's figure is 20,000 and 300); KILL9_TRANSACTIONS=false runs it with
KAFKA_TRANSACTIONS=false, where it is expected to find duplicate dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from consumer.sandbox import Faults, Sandbox
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    ServiceProcess,
    committed,
    coordinates,
    delivered_keys,
    end_offsets,
    http_status,
    letter_sources,
    member,
    mixed_records,
    order_key,
    pipeline_settings,
    read_to_end,
    wait_committed,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

STALLED = '"partition.stalled"'


def _seed(name: str) -> int:
    seed = int(os.environ.get(name) or random.SystemRandom().randrange(1_000_000))
    print(f"{name}={seed}")
    return seed


def _healthz(port: int) -> str:
    return f"http://127.0.0.1:{port}/healthz"


def _last_assignment(proc: ServiceProcess) -> int | None:
    """How many partitions the last `partitions.assigned` line of `proc` lists."""
    found = None
    for line in proc.output().splitlines():
        if line.startswith("{") and '"partitions.assigned"' in line:
            found = len(orjson.loads(line).get("partitions", []))
    return found


def _delivery_report(sb: Sandbox, good: set[int]) -> str:
    keys = delivered_keys(sb)
    expected = {order_key(n) for n in good}
    missing = sorted(expected - set(keys))
    doubled = sorted(k for k, c in keys.items() if c > 1)
    extra = sorted(set(keys) - expected)
    return f"missing={missing[:20]} ({len(missing)}) doubled={doubled[:20]} extra={extra[:20]}"


class LetterWatch:
    """Tails a dead-letter topic read_uncommitted, so a letter shows before its commit.

    A letter written in a transaction is in the log before the transaction commits
    (or aborts); a kill aimed at its writer then lands in the window that matters.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            isolation_level="read_uncommitted",
            fetch_max_wait_ms=20,
        )
        self._fresh: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._tail())

    async def _tail(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for source in letter_sources(records):
                    self._fresh.put_nowait(source)

    async def next_letter(self, timeout: float) -> tuple[int, int] | None:
        """Source (partition, offset) of the next letter written from now on, if any comes."""
        while not self._fresh.empty():
            self._fresh.get_nowait()
        try:
            return await asyncio.wait_for(self._fresh.get(), timeout)
        except TimeoutError:
            return None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


class Holdings:
    """Which member holds which partition, read incrementally from the members' log lines."""

    def __init__(self) -> None:
        self._read: dict[Path, int] = {}
        self._held: dict[Path, set[str]] = {}

    def refresh(self, procs: list[ServiceProcess]) -> bool:
        """Read what the members logged since last time (keeps `holder` quick); False."""
        for proc in procs:
            self._update(proc.log_path)
        return False

    def holder(self, procs: list[ServiceProcess], partition: str) -> int | None:
        for i, proc in enumerate(procs):
            if partition in self._update(proc.log_path):
                return i
        return None

    def _update(self, path: Path) -> set[str]:
        held = self._held.setdefault(path, set())
        with path.open("rb") as f:
            f.seek(self._read.get(path, 0))
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._read[path] = self._read.get(path, 0) + len(complete)
        for line in complete.splitlines():
            if b'"partitions.assigned"' in line or b'"partitions.revoked"' in line:
                event = orjson.loads(line)
                parts = set(event.get("partitions", []))
                if event["event"] == "partitions.assigned":
                    held |= parts
                else:
                    held -= parts
        return held


async def _assert_dead_letters_exact(
    bootstrap: str, dlq: str, bad: set[tuple[int, int]], what: str
) -> tuple[int, int]:
    """Exactly one read_committed letter per bad record; returns (committed, all written)."""
    letters = await read_to_end(bootstrap, dlq)
    sources = letter_sources(letters)
    everything = await read_to_end(bootstrap, dlq, isolation_level="read_uncommitted")
    doubled = {src: c for src, c in sources.items() if c > 1}
    assert not doubled, f"{what}: duplicate dead letters {sorted(doubled.items())[:20]}"
    assert set(sources) == bad, (
        f"{what}: letters for no bad record {sorted(set(sources) - bad)[:20]}, "
        f"bad records without a letter {sorted(bad - set(sources))[:20]}"
    )
    # letters of aborted transactions stay in the log, invisible to read_committed readers
    return len(letters), len(everything)


async def test_churning_member_under_load_and_outage_loses_nothing_and_stalls_nothing(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """A member joining and leaving for the whole run, plus a 503 outage: all done, once, live."""
    seed = _seed("CHURN_SEED")
    rng = random.Random(seed)
    n, partitions = 3000, 6
    topic = await new_topic(partitions)
    dlq = await new_topic(1, name=f"{topic}.dlq")
    records, bad_ns = mixed_records(n, bad=n // 50)
    good = set(range(n)) - bad_ns
    await produce(topic, records)
    bad = coordinates(await read_to_end(kafka_bootstrap, topic), b"bad-")
    assert len(bad) == len(bad_ns) == 60
    # batches of 5 at about 200 emails/s: the churn lasts the whole run
    latency = Faults(latency_ms=200.0)
    fast_sandbox.set_faults(latency)
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        max_in_flight=8,
        batch_size=5,
        log_level="info",
        kafka_session_timeout=6.0,
        health_host="127.0.0.1",
        # short enough that a stall shows within the run (it must exceed the longest
        # quiet gap of a healthy partition, RETRY_CAP + RESEND_TOTAL_TIMEOUT)
        resend_total_timeout=4.0,
        stall_timeout=6.0,
    )
    started = time.monotonic()
    steady = member(settings, tmp_path / "steady.log")
    churned: list[ServiceProcess] = []
    exits: list[tuple[str, int]] = []
    health: list[int | None] = []
    done = asyncio.Event()

    async def churn() -> None:
        """Join, stay 1-3 s after the assignment, leave (SIGTERM and kill -9 in turn), repeat."""
        cycle = 0
        while not done.is_set():
            proc = member(settings, tmp_path / f"churn-{cycle}.log")
            churned.append(proc)
            try:
                # a SIGTERM before its handler is installed would just kill it
                await wait_for(
                    lambda p=proc: "service.started" in p.output(), 60, f"churn {cycle} started"
                )
                await wait_for(
                    lambda p=proc: "partitions.assigned" in p.output() or done.is_set(),
                    60,
                    f"churn member {cycle} assigned",
                )
                if not done.is_set():
                    await asyncio.sleep(rng.uniform(1.0, 3.0))
                if cycle % 2 and not done.is_set():
                    proc.kill()
                    exits.append(("SIGKILL", -9))
                else:
                    proc.terminate()
                    exits.append(("SIGTERM", await proc.wait(60)))
            finally:
                proc.ensure_dead()
            cycle += 1
            if not done.is_set():
                await asyncio.sleep(rng.uniform(0.3, 1.5))

    async def watch_health() -> None:
        """/healthz of the steady member every 0.5 s, once it first answered."""
        while not done.is_set():
            status = await http_status(_healthz(steady.health_port))
            if status is not None or health:
                health.append(status)
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_health())
    churner: asyncio.Task[None] | None = None
    try:
        await steady.wait_assigned()
        churner = asyncio.create_task(churn())
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n // 3, 60, "a third delivered")
        fast_sandbox.set_faults(
            dataclasses.replace(
                latency, force_status={"status": 503, "name": "service_unavailable"}
            )
        )
        await asyncio.sleep(0.5)  # requests already inside the sandbox are answered
        at_outage = len(fast_sandbox.deliveries())
        await asyncio.sleep(rng.uniform(4.5, 9.5))
        fast_sandbox.set_faults(latency)
        assert len(fast_sandbox.deliveries()) == at_outage, "nothing is sent during the outage"
        assert at_outage < len(good), "the outage must land mid-run"
        await wait_for(
            lambda: len(fast_sandbox.deliveries()) >= len(good) or churner.done(),
            90,
            f"all delivered ({_delivery_report(fast_sandbox, good)})",
        )
        ends = await end_offsets(kafka_bootstrap, topic, partitions)
        await wait_committed(
            kafka_bootstrap,
            settings.kafka_group_id,
            ends,
            60,
            f"every offset committed (ends {ends})",
        )
        done.set()
        await asyncio.wait_for(churner, 90)
        # the steady member alone now: it holds every partition and reports itself live
        await wait_for(
            lambda: _last_assignment(steady) == partitions, 30, "the steady member holds all"
        )
        await asyncio.sleep(2 * 1.5)  # two watchdog rounds (min(5 s, STALL_TIMEOUT / 4))
        final_health = await http_status(_healthz(steady.health_port))
        final_committed = await committed(kafka_bootstrap, settings.kafka_group_id)
        steady.terminate()
        steady_exit = await steady.wait(60)
    finally:
        done.set()
        watcher.cancel()
        if churner is not None and not churner.done():
            churner.cancel()
        for proc in [steady, *churned]:
            proc.ensure_dead()
    elapsed = time.monotonic() - started
    logs = {p.log_path.name: p.output() for p in [steady, *churned]}
    stalled = {name: text.count(STALLED) for name, text in logs.items() if STALLED in text}
    print(
        f"churn: {len(churned)} joins, exits {Counter(sig for sig, _ in exits)}, "
        f"{elapsed:.1f}s, health polls {Counter(health)}, stats {fast_sandbox.stats()['outcomes']}"
    )
    assert steady_exit == 0, logs["steady.log"][-3000:]
    assert {code for sig, code in exits if sig == "SIGTERM"} == {0}, exits
    assert Counter(sig for sig, _ in exits)["SIGKILL"] >= 2, f"too little churn: {exits}"
    assert not stalled, f"partition.stalled logged (seed {seed}): {stalled}"
    assert final_health == 200
    assert health, "the steady member's /healthz never answered"
    assert set(health) == {200}, f"steady /healthz answers (seed {seed}): {Counter(health)}"
    assert final_committed == ends
    keys = delivered_keys(fast_sandbox)
    assert set(keys) == {order_key(n) for n in good}, _delivery_report(fast_sandbox, good)
    assert set(keys.values()) == {1}, _delivery_report(fast_sandbox, good)
    assert fast_sandbox.stats()["outcomes"].get("idempotency_conflict", 0) == 0
    visible, written = await _assert_dead_letters_exact(
        kafka_bootstrap, dlq, bad, f"churn seed {seed}"
    )
    print(f"churn: {visible} dead letters read_committed, {written} written (aborted included)")


async def test_kill_minus_nine_five_times_writes_each_dead_letter_once(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """Three members, kill -9 and restart five times: letters = bad records, emails exact."""
    seed = _seed("KILL9_SEED")
    rng = random.Random(seed)
    n = int(os.environ.get("KILL9_EVENTS", "3000"))
    n_bad = int(os.environ.get("KILL9_BAD", str(n // 50)))
    partitions, kills = 6, 5
    topic = await new_topic(partitions)
    dlq = await new_topic(1, name=f"{topic}.dlq")
    records, bad_ns = mixed_records(n, bad=n_bad)
    good = set(range(n)) - bad_ns
    await produce(topic, records)
    bad = coordinates(await read_to_end(kafka_bootstrap, topic), b"bad-")
    assert len(bad) == len(bad_ns) == n_bad
    # batches of 10, four on the wire (about 200 emails/s): kills land with batches
    # recorded, in flight and acknowledged but not yet committed
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(100.0, 300.0)))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        max_in_flight=4,
        batch_size=10,
        log_level="info",
        kafka_transactions=os.environ.get("KILL9_TRANSACTIONS", "true") != "false",
        kafka_session_timeout=6.0,
        health_host="127.0.0.1",
    )
    started = time.monotonic()
    procs = [member(settings, tmp_path / f"m{i}-0.log") for i in range(3)]
    every: list[ServiceProcess] = list(procs)
    killed_at: list[int] = []
    aimed: list[str] = []
    holdings = Holdings()
    watch = LetterWatch(kafka_bootstrap, dlq)
    await watch.start()
    try:
        for k in range(kills):
            # spread the kills over the run: the k-th once (k+1)/(kills+2) is delivered,
            # aimed at the member that just wrote a dead letter, before its commit lands
            target = len(good) * (k + 1) // (kills + 2)
            await wait_for(
                lambda t=target: holdings.refresh(procs) or len(fast_sandbox.deliveries()) >= t,
                120,
                f"{target} delivered",
            )
            letter = await watch.next_letter(10.0)
            victim = None
            if letter is not None:
                victim = holdings.holder(procs, f"{topic}-{letter[0]}")
            if victim is None:
                victim = rng.randrange(3)
                aimed.append(f"m{victim} (at random)")
            else:
                aimed.append(f"m{victim} (holder of letter {letter})")
            procs[victim].kill()
            killed_at.append(len(fast_sandbox.deliveries()))
            procs[victim] = member(settings, tmp_path / f"m{victim}-{k + 1}.log")
            every.append(procs[victim])
        assert killed_at[-1] < len(good), "every kill must land mid-run"
        await wait_for(
            lambda: len(fast_sandbox.deliveries()) >= len(good),
            180,
            f"all delivered ({_delivery_report(fast_sandbox, good)})",
        )
        ends = await end_offsets(kafka_bootstrap, topic, partitions)
        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, ends, 60, f"every offset committed ({ends})"
        )
        for proc in procs:
            proc.terminate()
        codes = [await proc.wait(60) for proc in procs]
    finally:
        await watch.stop()
        for proc in every:
            proc.ensure_dead()
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], [p.output()[-2000:] for p in procs]
    keys = delivered_keys(fast_sandbox)
    assert set(keys) == {order_key(i) for i in good}, _delivery_report(fast_sandbox, good)
    assert set(keys.values()) == {1}, _delivery_report(fast_sandbox, good)
    assert fast_sandbox.stats()["outcomes"].get("idempotency_conflict", 0) == 0
    visible, written = await _assert_dead_letters_exact(
        kafka_bootstrap, dlq, bad, f"kill -9 seed {seed}"
    )
    print(
        f"kill -9 x{kills}: {n} events, {n_bad} bad -> {visible} dead letters read_committed "
        f"({written} written, aborted included), kills at {killed_at} aimed at {aimed}, "
        f"{elapsed:.1f}s, "
        f"stats {fast_sandbox.stats()['outcomes']}"
    )
