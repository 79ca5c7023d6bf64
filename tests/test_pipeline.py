"""The pipeline against a real Kafka broker and the sandbox over real sockets.

Exactly-once in effect is judged only from the sandbox's delivery ledger and
from the offsets committed in Kafka.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.prepare import Preparer
from consumer.sandbox import Faults, Sandbox
from consumer.service import run_service
from consumer.settings import Settings
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    API_KEY,
    FaultProxy,
    ServiceProcess,
    committed,
    delivered_keys,
    email_key,
    end_offsets,
    free_port,
    order_event,
    order_records,
    pipeline_settings,
    read_all,
    running_pipeline,
    wait_committed,
    wait_for,
)

pytestmark = pytest.mark.kafka


async def _service(settings: Settings, stop: asyncio.Event) -> asyncio.Task[int]:
    return asyncio.create_task(run_service(settings, stop))


async def _stop(task: asyncio.Task[int], stop: asyncio.Event) -> int:
    stop.set()
    return await asyncio.wait_for(task, 60)


@pytest.mark.slow
async def test_ten_thousand_events_each_delivered_exactly_once_under_random_latency(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """10,000 events under 1-20 ms random latency: one delivery per key, all offsets committed."""
    n = 10_000
    topic = await new_topic(6)
    await produce(topic, order_records(range(n)))
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(1.0, 20.0)))
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url, max_in_flight=128)
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n, 240, f"{n} deliveries")
        ends = await end_offsets(kafka_bootstrap, topic, 6)

        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, ends, 30, "every offset committed"
        )
    finally:
        assert await _stop(task, stop) == 0
    keys = delivered_keys(fast_sandbox)
    assert len(keys) == n
    assert set(keys.values()) == {1}
    assert sum(ends.values()) == n


async def test_event_stuck_in_retry_holds_its_partition_commit_right_before_it(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """Later events finish while one retries; the commit stops at its offset, then moves on."""
    topic = await new_topic(1)
    await produce(topic, order_records(range(20)))
    proxy = FaultProxy(fast_sandbox.url)
    await proxy.start()
    stuck_n = 5
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        proxy.url,
        ordering="none",
        retry_max_attempts=10_000,
        retry_max_elapsed=3600.0,
        batch_size=1,  # one event stuck on its own (a batch holds all its members)
    )
    stop = asyncio.Event()
    task = None
    try:
        # learn the stuck event's key from the dry-run preparer: same bytes, same key
        preparer = Preparer.from_settings(settings)
        prepared = preparer.prepare(
            order_event(stuck_n), [], topic=topic, partition=0, offset=stuck_n, timestamp_ms=None
        )
        stuck_key = prepared.idempotency_key  # type: ignore[union-attr]
        proxy.stuck.add(stuck_key)
        task = await _service(settings, stop)
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 19, 60, "19 deliveries")

        await wait_committed(
            kafka_bootstrap,
            settings.kafka_group_id,
            {0: stuck_n},
            20,
            f"commit to stop at offset {stuck_n}",
        )
        await asyncio.sleep(1.0)  # several commit intervals later, it still holds
        assert (await committed(kafka_bootstrap, settings.kafka_group_id))[0] == stuck_n
        assert proxy.refused[stuck_key] >= 2
        assert stuck_key not in delivered_keys(fast_sandbox)

        proxy.stuck.clear()

        await wait_committed(
            kafka_bootstrap,
            settings.kafka_group_id,
            {0: 20},
            30,
            "commit to reach the end once the event goes through",
        )
    finally:
        if task is not None:
            assert await _stop(task, stop) == 0
        await proxy.stop()
    assert set(delivered_keys(fast_sandbox).values()) == {1}
    assert len(delivered_keys(fast_sandbox)) == 20


@pytest.mark.slow
async def test_kill_minus_nine_mid_flight_then_restart_loses_nothing_and_sends_nothing_twice(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """SIGKILL mid-run, restart: every event delivered, none twice, offsets reach the end."""
    n = 3000
    topic = await new_topic(3)
    await produce(topic, order_records(range(n)))
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(5.0, 30.0)))
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url, max_in_flight=32)
    first = ServiceProcess(settings, tmp_path / "first.log")
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n // 4, 90, "a quarter delivered")
        first.kill()
    finally:
        first.ensure_dead()
    at_kill = len(fast_sandbox.deliveries())
    assert at_kill < n, "the kill must land mid-run"
    second = ServiceProcess(settings, tmp_path / "second.log")
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n, 180, "all delivered")
        ends = await end_offsets(kafka_bootstrap, topic, 3)

        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, ends, 30, "every offset committed"
        )
        second.terminate()
        assert await second.wait(60) == 0, second.output()[-3000:]
    finally:
        second.ensure_dead()
    keys = delivered_keys(fast_sandbox)
    assert len(keys) == n
    assert set(keys.values()) == {1}
    stats = fast_sandbox.stats()
    # the restart re-sent what the killed process had in flight: replays, not new emails
    assert stats["outcomes"].get("idempotency_conflict", 0) == 0
    # the restart re-sent what the killed process had sent but not committed:
    # Resend (the sandbox) answered those as replays of the original emails
    assert stats["outcomes"].get("replayed", 0) >= 1


@pytest.mark.slow
async def test_consumers_joining_and_leaving_mid_run_deliver_each_event_once(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """Two, then three processes join; two leave (SIGTERM, SIGKILL); one delivery per key."""
    n = 2000
    topic = await new_topic(6)
    await produce(topic, order_records(range(n)))
    # batches of 5 at about 200 emails/s: members join and leave while batches fly
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(100.0, 300.0)))
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, max_in_flight=8, log_level="info", batch_size=5
    )
    procs: list[ServiceProcess] = []
    try:
        procs.append(ServiceProcess(settings, tmp_path / "a.log"))
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 300, 90, "300 delivered")
        procs.append(ServiceProcess(settings, tmp_path / "b.log"))
        await procs[1].wait_assigned()
        at_b = len(fast_sandbox.deliveries())
        procs.append(ServiceProcess(settings, tmp_path / "c.log"))
        await procs[2].wait_assigned()
        await wait_for(
            lambda: len(fast_sandbox.deliveries()) >= at_b + 300, 90, "progress with three"
        )
        procs[1].terminate()
        assert await procs[1].wait(60) == 0, procs[1].output()[-3000:]
        at_kill = len(fast_sandbox.deliveries())
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= at_kill + 300, 90, "progress")
        procs[0].kill()
        assert len(fast_sandbox.deliveries()) < n, "the kill must land mid-run"
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n, 180, "all delivered")
        ends = await end_offsets(kafka_bootstrap, topic, 6)

        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, ends, 60, "every offset committed"
        )
        procs[2].terminate()
        assert await procs[2].wait(60) == 0, procs[2].output()[-3000:]
    finally:
        for p in procs:
            p.ensure_dead()
    keys = delivered_keys(fast_sandbox)
    assert len(keys) == n
    assert set(keys.values()) == {1}


async def test_sigterm_drains_in_flight_sends_commits_and_exits_zero(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """SIGTERM mid-run: exit 0, everything below the committed offsets was delivered."""
    n = 2000
    topic = await new_topic(2)
    await produce(topic, order_records(range(n)))
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(50.0, 150.0)))
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, max_in_flight=32, log_level="info"
    )
    proc = ServiceProcess(settings, tmp_path / "svc.log")
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 200, 60, "200 delivered")
        proc.terminate()
        code = await proc.wait(40)
    finally:
        proc.ensure_dead()
    assert code == 0, proc.output()[-3000:]
    assert "service.stopped" in proc.output()
    positions = await committed(kafka_bootstrap, settings.kafka_group_id)
    assert sum(positions.values()) >= 200
    delivered = set(delivered_keys(fast_sandbox))
    # every record below a committed position was acknowledged by Resend
    records = await read_all(kafka_bootstrap, topic, n)
    for rec in records:
        if rec.offset < positions.get(rec.partition, 0):
            assert f"order-confirmation:{orjson.loads(rec.value)['data']['order_id']}" in delivered
    # nothing that was in flight at SIGTERM was abandoned: deliveries match the commits
    assert len(delivered) == sum(positions.values())


async def test_dead_letters_carry_every_header_and_their_offsets_are_committed(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """Bad input and a Resend 422 are dead-lettered with headers; offsets move past them."""
    topic = await new_topic(1)
    dlq = await new_topic(1, name=f"{topic}.dlq")
    good = order_records(range(3))
    bad_json = (b"k-bad", b"{not json", [("trace", b"abc")])
    bad_recipient = (b"ord-99", order_event(99, email="not-an-address"), [])
    await produce(topic, [good[0], bad_json, good[1], bad_recipient, good[2]])
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url)
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        letters = await read_all(kafka_bootstrap, dlq, 2)

        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, {0: 5}, 30, "offsets past the dead letters"
        )
    finally:
        assert await _stop(task, stop) == 0
    assert len(fast_sandbox.deliveries()) == 3
    by_offset = {int(dict(r.headers)["dlq.source_offset"]): r for r in letters}
    assert set(by_offset) == {1, 3}
    first = by_offset[1]
    headers = dict(first.headers)
    assert first.key == b"k-bad"
    assert first.value == b"{not json"
    assert headers["trace"] == b"abc"
    assert headers["dlq.reason"] == b"not_json"
    assert headers["dlq.source_topic"] == topic.encode()
    assert headers["dlq.source_partition"] == b"0"
    for name in (
        "dlq.reason",
        "dlq.message",
        "dlq.attempts",
        "dlq.source_topic",
        "dlq.source_partition",
        "dlq.source_offset",
        "dlq.service_version",
        "dlq.dead_lettered_at",
    ):
        assert name in headers, name
    assert API_KEY.encode() not in b"".join(v for _, v in first.headers if v)
    second = dict(by_offset[3].headers)
    assert second["dlq.reason"] in {b"invalid_recipient", b"resend_rejected"}


async def test_backlog_pauses_partitions_and_pending_stays_bounded(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """With a slow Resend, fetched-but-unfinished records never pass the configured bounds."""
    topic = await new_topic(2)
    await produce(topic, order_records(range(1500)))
    fast_sandbox.set_faults(Faults(latency_ms=40.0))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        max_pending=100,
        max_pending_per_partition=60,
        max_in_flight=8,
    )
    samples: list[int] = []
    per_partition: list[int] = []
    paused_seen = 0
    async with running_pipeline(settings) as pipeline:
        for _ in range(60):
            await asyncio.sleep(0.05)
            samples.append(pipeline.ledger.total_pending())
            per_partition.extend(pipeline.ledger.pending(tp) for tp in pipeline.ledger.assigned())
            paused_seen = max(paused_seen, len(pipeline.engine.paused))
    # a single fetch may land on top of the bound once; never more than that
    assert max(samples) <= 100 + 60
    assert max(per_partition) <= 60 + 60
    assert paused_seen >= 1
    assert len(fast_sandbox.deliveries()) > 0


async def test_same_kafka_key_is_sent_in_offset_order(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """ordering=key: events sharing a Kafka key reach Resend one at a time, in offset order."""
    topic = await new_topic(1)
    rnd = random.Random(3)
    records = [(b"customer-1", order_event(i), []) for i in range(30)]
    records += [(f"other-{i}".encode(), order_event(100 + i), []) for i in range(30)]
    rnd.shuffle(records)
    await produce(topic, records)
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(1.0, 30.0)))
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url, ordering="key")
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 60, 60, "60 deliveries")
    finally:
        assert await _stop(task, stop) == 0
    sent_order = [
        email_key(d)
        for d in sorted(fast_sandbox.deliveries(), key=lambda d: d.received_at)
        if int(email_key(d).rsplit("-", 1)[1]) < 100
    ]
    produced_order = [
        f"order-confirmation:ord-{orjson.loads(v)['data']['order_id'].split('-')[1]}"
        for k, v, _ in records
        if k == b"customer-1"
    ]
    assert sent_order == produced_order


async def test_outage_pauses_without_dead_letters_and_resumes(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """A Resend outage keeps offsets and dead-letters nothing; recovery delivers everything."""
    topic = await new_topic(1)
    await new_topic(1, name=f"{topic}.dlq")
    fast_sandbox.set_faults(Faults(force_status={"status": 503, "name": "service_unavailable"}))
    await produce(topic, order_records(range(50)))
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, retry_max_attempts=3, retry_max_elapsed=2.0
    )
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await asyncio.sleep(5.0)  # far beyond the retry budget
        assert len(fast_sandbox.deliveries()) == 0
        assert (await committed(kafka_bootstrap, settings.kafka_group_id)).get(0, 0) == 0
        fast_sandbox.set_faults(Faults())
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 50, 60, "recovery")

        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, {0: 50}, 30, "offsets after recovery"
        )
    finally:
        assert await _stop(task, stop) == 0
    with pytest.raises(TimeoutError):
        await read_all(kafka_bootstrap, f"{topic}.dlq", 1, timeout=2.0)


async def test_health_and_metrics_follow_the_running_service(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """/readyz turns ready on assignment and not-ready on an auth failure; /metrics counts sends."""
    import aiohttp

    port = free_port()
    topic = await new_topic(2)
    await produce(topic, order_records(range(20)))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        health_port=port,
        health_host="127.0.0.1",
        batch_size=1,  # it counts requests: one per email
    )
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        async with aiohttp.ClientSession() as http:

            async def status(path: str) -> int:
                try:
                    async with http.get(base + path) as resp:
                        return resp.status
                except aiohttp.ClientError:
                    return 0

            async def ready() -> bool:
                return await status("/readyz") == 200

            await wait_for(ready, 30, "ready")
            await wait_for(lambda: len(fast_sandbox.deliveries()) >= 20, 30, "20 deliveries")
            async with http.get(base + "/metrics") as resp:
                text = await resp.text()
            assert 'resend_consumer_sends_total{status="200"} 20.0' in text
            assert (
                'resend_consumer_events_total{outcome="sent",type="order.confirmed"} 20.0' in text
            )
            assert "resend_consumer_assigned_partitions 2.0" in text
            assert API_KEY not in text
            assert await status("/healthz") == 200

            # a bad API key is service-wide: not ready, nothing dead-lettered
            fast_sandbox.set_faults(Faults(force_status={"status": 403, "name": "invalid_api_key"}))
            await produce(topic, order_records(range(20, 25)))

            async def not_ready() -> bool:
                return await status("/readyz") == 503

            await wait_for(not_ready, 30, "not ready on invalid_api_key")
            async with http.get(base + "/metrics") as resp:
                text = await resp.text()
            assert 'resend_consumer_circuit_open{condition="auth"} 1.0' in text
            fast_sandbox.set_faults(Faults())
            await wait_for(ready, 30, "ready again once the key works")
            await wait_for(lambda: len(fast_sandbox.deliveries()) >= 25, 30, "25 deliveries")
    finally:
        assert await _stop(task, stop) == 0


@pytest.mark.parametrize(("batch_size", "held_at"), [(1, 1), (100, 0)])
async def test_unwritable_dead_letter_topic_pauses_instead_of_skipping(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    batch_size: int,
    held_at: int,
) -> None:
    """With no DLQ topic a bad record holds its offset; once the topic exists it moves on.

    Batched, the two good events go out together around the letter, so the commit
    waits before their batch: a next owner must read both members back.
    """
    topic = await new_topic(1)
    await produce(topic, [order_records([0])[0], (b"bad", b"not json", []), order_records([1])[0]])
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, probe_max=0.5, batch_size=batch_size
    )
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 2, 30, "both good events sent")
        await asyncio.sleep(3.0)  # many commit intervals and dead-letter retries later
        assert (await committed(kafka_bootstrap, settings.kafka_group_id)).get(0) == held_at
        await new_topic(1, name=f"{topic}.dlq")

        await wait_committed(
            kafka_bootstrap,
            settings.kafka_group_id,
            {0: 3},
            60,
            "the commit to pass the dead letter once it is written",
        )
        letters = await read_all(kafka_bootstrap, f"{topic}.dlq", 1)
    finally:
        assert await _stop(task, stop) == 0
    assert letters[0].value == b"not json"
    assert dict(letters[0].headers)["dlq.reason"] == b"not_json"


async def test_second_signal_exits_at_once(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """SIGTERM starts a drain that a hanging Resend would stretch; a second SIGTERM ends it now."""
    topic = await new_topic(1)
    await produce(topic, order_records(range(5)))
    fast_sandbox.set_faults(Faults(hang_rate=1.0))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        shutdown_timeout=30.0,
        resend_total_timeout=60.0,
        resend_read_timeout=60.0,
        log_level="info",
    )
    proc = ServiceProcess(settings, tmp_path / "svc.log")
    try:
        await proc.wait_assigned()
        await wait_for(lambda: fast_sandbox.stats()["requests"] > 0, 30, "a hanging send")
        proc.terminate()
        await wait_for(lambda: "service.stopping" in proc.output(), 10, "the drain to start")
        assert proc.proc.poll() is None, "still draining the hanging send"
        proc.terminate()
        code = await proc.wait(5)
    finally:
        proc.ensure_dead()
    assert code == 130
    assert (await committed(kafka_bootstrap, settings.kafka_group_id)).get(0, 0) == 0


async def test_partition_ordering_sends_one_partition_in_offset_order(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """ordering=partition: one partition's events reach Resend strictly in offset order."""
    topic = await new_topic(1)
    records = [(f"key-{i}".encode(), order_event(i), []) for i in range(25)]
    await produce(topic, records)
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(1.0, 20.0)))
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url, ordering="partition")
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 25, 30, "25 deliveries")
    finally:
        assert await _stop(task, stop) == 0
    sent = [email_key(d) for d in sorted(fast_sandbox.deliveries(), key=lambda d: d.received_at)]
    assert sent == [f"order-confirmation:ord-{i}" for i in range(25)]


@pytest.mark.parametrize("batch_size", [1, 100])
async def test_same_idempotency_key_under_different_kafka_keys_is_sent_one_at_a_time(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    batch_size: int,
) -> None:
    """A duplicate publish (same event, other Kafka key) never races its twin: no 409.

    Singly, the copies replay the first send. Batched, the first copy goes out in a
    batch (no key of its own at Resend), so the other copies are skipped as duplicates.
    """
    topic = await new_topic(1)
    twin = order_event(7)
    await produce(topic, [(f"k-{i}".encode(), twin, []) for i in range(6)])
    fast_sandbox.set_faults(Faults(latency_ms=100.0))
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, ordering="key", batch_size=batch_size
    )
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, {0: 6}, 30, "all six committed"
        )
    finally:
        assert await _stop(task, stop) == 0
    stats = fast_sandbox.stats()
    assert len(fast_sandbox.deliveries()) == 1
    assert stats["outcomes"].get("replayed", 0) == (5 if batch_size == 1 else 0)
    assert stats["outcomes"].get("idempotency_concurrent", 0) == 0
    assert stats["outcomes"].get("idempotency_conflict", 0) == 0


class _FailingCommits:
    """Wraps a committer so that commit() fails like it does in a rebalance."""

    def __init__(self, committer: Any) -> None:
        self._committer = committer
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._committer, name)

    async def commit(self, tp: Any, position: int, metadata: str, letters: Any) -> None:
        from consumer.errors import CommitFailed

        self.failures += 1
        raise CommitFailed("the group began to rebalance")


async def test_revoke_drains_in_flight_then_commits_the_finished_prefix(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """On revoke: requests on the wire finish, queued ones are dropped, the prefix is committed;
    a failing commit neither crashes the service nor moves an offset."""
    topic = await new_topic(1)
    await produce(topic, order_records(range(40)))
    fast_sandbox.set_faults(Faults(latency_ms=300.0))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        ordering="none",
        max_in_flight=4,
        commit_interval=3600.0,  # only the revoke commits
        batch_size=1,  # singles: no plan to record, and one request is one email
    )
    async with running_pipeline(settings) as pipeline:
        real = pipeline.commits.committer
        try:
            await wait_for(lambda: pipeline.in_flight == 4, 30, "four requests on the wire")
            tp = next(iter(pipeline.ledger.assigned()))
            # first a revoke whose commit fails: no crash, nothing committed
            failing = _FailingCommits(real)
            pipeline.commits.committer = failing  # type: ignore[assignment]
            await pipeline.on_revoked({tp})  # type: ignore[arg-type]
            assert failing.failures == 1
            # (singles were recorded before they went out, at offset 0: nothing moved)
            assert (await committed(kafka_bootstrap, settings.kafka_group_id)).get(0, 0) == 0
            in_flight_at_revoke = len(fast_sandbox.deliveries())
        finally:
            pipeline.commits.committer = real
    # the four requests on the wire finished (the drain waited for them)...
    assert in_flight_at_revoke == 4
    # ...and nothing queued behind them was started after the revoke
    assert len(fast_sandbox.deliveries()) == 4


async def test_revoke_commits_exactly_the_finished_prefix(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """After a revoke the committed offset is the end of the contiguous finished prefix."""
    topic = await new_topic(1)
    await produce(topic, order_records(range(40)))
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(50.0, 400.0)))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        ordering="none",
        max_in_flight=8,
        commit_interval=3600.0,
    )
    async with running_pipeline(settings) as pipeline:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 10, 30, "ten deliveries")
        tp = next(iter(pipeline.ledger.assigned()))
        await pipeline.on_revoked({tp})  # type: ignore[arg-type]
        position = (await committed(kafka_bootstrap, settings.kafka_group_id)).get(0)
    delivered = {email_key(d) for d in fast_sandbox.deliveries()}
    assert position is not None
    # every offset below the committed position was delivered...
    assert all(f"order-confirmation:ord-{i}" in delivered for i in range(position))
    # ...and the position stops right at the first offset that was not
    if position < 40:
        assert f"order-confirmation:ord-{position}" not in delivered


async def test_topic_pattern_consumes_every_matching_topic_with_a_dlq_each(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce, fast_sandbox: Sandbox
) -> None:
    """KAFKA_TOPIC_PATTERN: both matching topics are consumed; bad records go to <topic>.dlq."""
    import uuid

    stem = f"pat-{uuid.uuid4().hex[:8]}"
    first = await new_topic(2, name=f"{stem}.orders")
    second = await new_topic(1, name=f"{stem}.users")
    other = await new_topic(1, name=f"other-{stem}")
    for topic in (first, second):
        await new_topic(1, name=f"{topic}.dlq")
    await produce(first, order_records(range(5)))
    await produce(second, [*order_records(range(5, 8)), (b"x", b"[1, 2]", [])])
    await produce(other, order_records(range(100, 103)))
    settings = pipeline_settings(
        kafka_bootstrap,
        first,
        fast_sandbox.url,
        kafka_topics=(),
        # the pattern must not match the dead-letter topics themselves
        kafka_topic_pattern=rf"^{stem}\.(orders|users)$",
    )
    stop = asyncio.Event()
    task = await _service(settings, stop)
    try:
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= 8, 60, "8 deliveries")
        letters = await read_all(kafka_bootstrap, f"{second}.dlq", 1)
    finally:
        assert await _stop(task, stop) == 0
    keys = {email_key(d) for d in fast_sandbox.deliveries()}
    assert keys == {f"order-confirmation:ord-{i}" for i in range(8)}
    assert dict(letters[0].headers)["dlq.reason"] == b"not_object"
    assert dict(letters[0].headers)["dlq.source_topic"] == second.encode()


async def test_each_member_gives_its_limiter_its_share_of_the_partitions(
    kafka_bootstrap: str, new_topic: NewTopicFactory, fast_sandbox: Sandbox
) -> None:
    """Two members on four partitions: each limiter learns a share of one half (and the
    one left alone all of it), so replicas probe Resend's team limit as one would."""
    topic = await new_topic(4)
    settings = pipeline_settings(kafka_bootstrap, topic, fast_sandbox.url)
    async with running_pipeline(settings) as first:
        await wait_for(lambda: len(first.ledger.assigned()) == 4, 30, "first holds all")
        limiter = first.client.limiter
        assert limiter is not None
        assert limiter.share == 1.0
        async with running_pipeline(settings) as second:
            await wait_for(
                lambda: len(first.ledger.assigned()) == 2 and len(second.ledger.assigned()) == 2,
                60,
                "two partitions each",
            )
            other = second.client.limiter
            assert other is not None
            # the ledger takes a partition before the assignment is reported (the seek
            # between them awaits): the share follows within that round
            await wait_for(
                lambda: abs(limiter.share - 0.5) < 1e-6 and abs(other.share - 0.5) < 1e-6,
                10,
                "both shares at one half",
            )
            assert limiter.share == pytest.approx(0.5)
            assert other.share == pytest.approx(0.5)
        await wait_for(lambda: limiter.share == 1.0, 60, "the whole share back")
