"""Batch sending on a real broker and the sandbox: crash safety and per-member outcomes.

Events are counted by event (the sandbox ledger, `email_key`), never by request:
every event is delivered once, none both singly and in a batch, and no batch key
is ever sent with other bytes (`idempotency_conflict`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

from consumer.sandbox import Faults, Sandbox
from consumer.service import run_service
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    ServiceProcess,
    delivered_keys,
    email_key,
    end_offsets,
    member,
    order_event,
    order_key,
    order_records,
    pipeline_settings,
    read_all,
    wait_committed,
    wait_for,
)


def _endpoints_by_event(sb: Sandbox) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for d in sb.deliveries():
        found[email_key(d)].add(d.endpoint)
    return found


async def test_kill_minus_nine_with_batches_in_flight_then_other_batch_settings(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """kill -9 twice with batches recorded and on the wire, each restart with other
    BATCH_SIZE/BATCH_LINGER (the last one batching off), 10 % of answers dropped after
    the sandbox accepted: every event once, none both singly and in a batch."""
    n, partitions = 2000, 3
    topic = await new_topic(partitions)
    await produce(topic, order_records(range(n)))
    fast_sandbox.set_faults(Faults(latency_uniform_ms=(100.0, 300.0), drop_after_accept_rate=0.1))
    settings = pipeline_settings(
        kafka_bootstrap,
        topic,
        fast_sandbox.url,
        max_in_flight=4,
        # a bounded intake: each owner decides only part of what is left, so the
        # next owner meets recorded batches first and plans the rest its own way
        max_pending=150,
        max_pending_per_partition=50,
        log_level="info",
        kafka_session_timeout=6.0,
        resend_read_timeout=2.0,
        resend_total_timeout=3.0,
    )
    runs = [
        {"batch_size": 40, "batch_linger": 0.5},
        {"batch_size": 7, "batch_linger": 0.05},
        {"batch_size": 1, "batch_linger": 0.0},
    ]
    procs: list[ServiceProcess] = []
    try:
        for i, overrides in enumerate(runs):
            proc = member(settings, tmp_path / f"run-{i}.log", **overrides)
            procs.append(proc)
            if i == len(runs) - 1:
                break
            target = n * (i + 1) // 3
            await wait_for(lambda t=target: len(fast_sandbox.deliveries()) >= t, 120, f"{target}")
            proc.kill()
            assert len(fast_sandbox.deliveries()) < n, "the kill must land mid-run"
        await wait_for(lambda: len(fast_sandbox.deliveries()) >= n, 240, "all delivered")
        ends = await end_offsets(kafka_bootstrap, topic, partitions)
        await wait_committed(kafka_bootstrap, settings.kafka_group_id, ends, 60, "all committed")
        procs[-1].terminate()
        assert await procs[-1].wait(60) == 0
    finally:
        for proc in procs:
            proc.ensure_dead()
    keys = delivered_keys(fast_sandbox)
    assert set(keys) == {order_key(i) for i in range(n)}
    assert set(keys.values()) == {1}
    endpoints = _endpoints_by_event(fast_sandbox)
    assert all(len(e) == 1 for e in endpoints.values()), "an event went out singly and batched"
    both = {e for ends_ in endpoints.values() for e in ends_}
    assert both == {"/emails", "/emails/batch"}, both  # each way was used
    outcomes = fast_sandbox.stats()["outcomes"]
    assert outcomes.get("idempotency_conflict", 0) == 0
    assert outcomes.get("fault_dropped", 0) > 0  # answers were lost after acceptance
    output = "".join(p.output() for p in procs)
    assert '"reason":"invalid_idempotent_request"' not in output


@pytest.mark.parametrize("batch_size", [1, 100])
async def test_refused_members_are_dead_lettered_alone_and_the_rest_sent_once(
    kafka_bootstrap: str,
    new_topic: NewTopicFactory,
    produce: Produce,
    fast_sandbox: Sandbox,
    batch_size: int,
) -> None:
    """Resend refuses three recipients: exactly those events are dead-lettered with
    reason validation_error and Resend's message; the other 27 are sent once."""
    topic = await new_topic(1)
    dlq = await new_topic(1, name=f"{topic}.dlq")
    refused = {3, 11, 17}
    records = [
        (
            f"k-{i}".encode(),
            order_event(i, email=f"blocked-{i}@example.com" if i in refused else None),
            [],
        )
        for i in range(30)
    ]
    await produce(topic, records)
    fast_sandbox.set_faults(Faults(refuse_to=("blocked-",)))
    settings = pipeline_settings(
        kafka_bootstrap, topic, fast_sandbox.url, batch_size=batch_size, batch_linger=0.5
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop))
    try:
        await wait_committed(kafka_bootstrap, settings.kafka_group_id, {0: 30}, 60, "all 30")
        letters = await read_all(kafka_bootstrap, dlq, len(refused))
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 60) == 0
    keys = delivered_keys(fast_sandbox)
    assert set(keys) == {order_key(i) for i in range(30) if i not in refused}
    assert set(keys.values()) == {1}
    assert sorted(int(dict(x.headers)["dlq.source_offset"]) for x in letters) == sorted(refused)
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["dlq.reason"] == b"validation_error"
        assert b"not allowed" in headers["dlq.message"]
    endpoints = {d.endpoint for d in fast_sandbox.deliveries()}
    assert endpoints == ({"/emails"} if batch_size == 1 else {"/emails/batch"})
