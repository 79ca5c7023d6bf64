"""Poison records on the real broker: the service stays up and every partition keeps flowing.

Every record a producer can write and this service cannot send (issue 10,
section 3) sits on a partition of its own among valid events; `python -m
consumer run` reads the topic against the in-process sandbox.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from consumer.deadletter import H_REASON, H_SOURCE_OFFSET, H_SOURCE_PARTITION, dlq_values
from consumer.sandbox import SandboxConfig
from tests.conftest import MakeSandbox, NewTopicFactory
from tests.pipeline_support import (
    API_KEY,
    ServiceProcess,
    email_key,
    end_offsets,
    order_event,
    pipeline_settings,
    read_all,
    wait_committed,
    wait_for,
)
from tests.poison import POISON_KINDS, Raw, codec_for, encode_batch, poison_records, produce_batch

pytestmark = pytest.mark.kafka

#: valid events before and after each poison record, per partition
AROUND = 6


def event(n: int) -> Raw:
    return Raw(key=f"ord-{n}".encode(), value=order_event(n))


async def write_partition(bootstrap: str, topic: str, p: int, kind: str) -> int:
    """Valid events, the poison record, valid events; returns the poison record's offset."""
    first = p * 100
    before = [event(first + i) for i in range(AROUND)]
    after = [event(first + AROUND + i) for i in range(AROUND)]
    poison = poison_records(kind)
    if kind == "bad_header_name":
        # in the middle of one batch: the client fails on it before the events after it
        await produce_batch(bootstrap, topic, p, encode_batch([*before, *poison, *after[:2]]))
        await produce_batch(bootstrap, topic, p, encode_batch(after[2:]))
    else:
        await produce_batch(bootstrap, topic, p, encode_batch(before))
        await produce_batch(bootstrap, topic, p, encode_batch(poison, codec=codec_for(kind)))
        await produce_batch(bootstrap, topic, p, encode_batch(after))
    return AROUND


@pytest.mark.slow
async def test_every_poison_kind_is_dead_lettered_and_every_valid_event_sent_once(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    """Six poison kinds, one per partition: service up, valid events sent once, all committed."""
    kinds = POISON_KINDS
    topic = await new_topic(len(kinds))
    dlq = await new_topic(1, name=f"{topic}.dlq")
    poison_at = {
        p: await write_partition(kafka_bootstrap, topic, p, kind) for p, kind in enumerate(kinds)
    }
    valid = {p * 100 + i for p in range(len(kinds)) for i in range(2 * AROUND)}
    sandbox = await make_sandbox(config=SandboxConfig(api_key=API_KEY, rate_limit=100_000.0))
    settings = pipeline_settings(kafka_bootstrap, topic, sandbox.url, log_level="info")
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        ends = await end_offsets(kafka_bootstrap, topic, len(kinds))
        assert ends == dict.fromkeys(range(len(kinds)), 2 * AROUND + 1)
        await wait_for(lambda: len(sandbox.deliveries()) >= len(valid), 90, "every email")
        await wait_committed(
            kafka_bootstrap, settings.kafka_group_id, ends, 60, "every offset committed"
        )
        assert service.proc.poll() is None, service.output()[-3000:]
        letters = await read_all(kafka_bootstrap, dlq, len(kinds))
        service.terminate()
        assert await service.wait(60) == 0, service.output()[-3000:]
    finally:
        service.ensure_dead()
    sent = Counter(
        int(m.group(1))
        for d in sandbox.deliveries()
        if (m := re.fullmatch(r"order-confirmation:ord-(\d+)", email_key(d)))
    )
    assert set(sent) == valid
    assert set(sent.values()) == {1}
    found = {}
    for letter in letters:
        meta = dlq_values(letter.headers)
        found[int(meta[H_SOURCE_PARTITION])] = (int(meta[H_SOURCE_OFFSET]), meta[H_REASON])
    assert {p: at for p, (at, _) in found.items()} == poison_at
    assert found[kinds.index("bad_header_name")][1] == "undecodable_record"
    assert "Traceback" not in service.output()
