"""Chaos: the broker goes away mid-run and comes back. Judged from the sandbox and Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.sandbox import Faults, Sandbox, SandboxConfig
from consumer.service import run_service
from tests.pipeline_support import (
    API_KEY,
    ROOT,
    coordinates,
    delivered_keys,
    end_offsets,
    letter_sources,
    mixed_records,
    order_key,
    pipeline_settings,
    read_to_end,
    wait_committed,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BROKER = ROOT / "deploy" / "kafka" / "broker.py"


def _broker(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BROKER), *args], check=False, capture_output=True, text=True
    )
    assert out.returncode == 0, f"broker.py {args[0]} failed: {out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A broker of this test alone, so it can be stopped and resumed."""
    run_dir = tmp_path / "kafka"
    bootstrap = _broker("start", "--dir", str(run_dir), "--watch-pid", str(os.getpid()))
    try:
        yield bootstrap, run_dir
    finally:
        _broker("stop", "--dir", str(run_dir))


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = Sandbox(config=SandboxConfig(api_key=API_KEY, rate_limit=100_000.0, seed=11))
    await sb.start(host="127.0.0.1", port=0)
    try:
        yield sb
    finally:
        await sb.stop()


async def test_broker_restart_mid_run_loses_nothing_and_sends_nothing_twice(
    own_broker: tuple[str, Path], sandbox: Sandbox
) -> None:
    """The broker stops for a few seconds mid-run: the service rides it out, then finishes.

    Bad records among the events are dead-lettered exactly once, outage or not.
    """
    bootstrap, run_dir = own_broker
    n, partitions = 1500, 3
    records, bad_ns = mixed_records(n, bad=30)
    good = set(range(n)) - bad_ns
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("chaos", partitions, 1), NewTopic("chaos.dlq", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for key, value, _ in records:
            await producer.send("chaos", value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    # slow enough (batches of 10, about 150 emails/s) that the broker is down while
    # work remains: batches are recorded, sent and committed across the outage
    sandbox.set_faults(Faults(latency_uniform_ms=(150.0, 350.0)))
    settings = pipeline_settings(bootstrap, "chaos", sandbox.url, max_in_flight=4, batch_size=10)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop))
    try:
        await wait_for(lambda: len(sandbox.deliveries()) >= 200, 60, "200 deliveries")
        await asyncio.to_thread(_broker, "stop", "--dir", str(run_dir))
        at_stop = len(sandbox.deliveries())
        await asyncio.sleep(4.0)  # commits fail, fetches fail; the service must not give up
        assert not task.done(), "the service must ride out a broker outage"
        await asyncio.to_thread(_broker, "resume", "--dir", str(run_dir))
        await wait_for(lambda: len(sandbox.deliveries()) >= len(good), 120, "all delivered")
        ends = await end_offsets(bootstrap, "chaos", partitions)
        await wait_committed(bootstrap, settings.kafka_group_id, ends, 60, "all committed")
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 60)
    assert code == 0
    assert at_stop < len(good), "the outage must land mid-run"
    keys = delivered_keys(sandbox)
    assert set(keys) == {order_key(i) for i in good}
    assert set(keys.values()) == {1}
    assert sandbox.stats()["outcomes"].get("idempotency_conflict", 0) == 0
    bad = coordinates(await read_to_end(bootstrap, "chaos"), b"bad-")
    assert len(bad) == len(bad_ns)
    sources = letter_sources(await read_to_end(bootstrap, "chaos.dlq"))
    assert {src: c for src, c in sources.items() if c > 1} == {}, "duplicate dead letters"
    assert set(sources) == bad, "one dead letter per bad record"
    written = await read_to_end(bootstrap, "chaos.dlq", isolation_level="read_uncommitted")
    print(f"chaos: {len(sources)} dead letters read_committed, {len(written)} written")
