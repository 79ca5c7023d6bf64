"""Cost of a commit transaction, and of fencing (initialising) partition producers.

Against the broker named by KAFKA_BOOTSTRAP_SERVERS: creates a source topic with
`--partitions` partitions and its `.dlq`, times `PartitionCommitter.assign` for
all of them at once (producers initialised concurrently, then one offset read),
then `--commits` commits on one partition with 0 letters and with 1 letter,
`--gap` seconds apart, and prints the median and 90th percentile of each. With
no gap a commit can meet the previous transaction's markers still being
written (CONCURRENT_TRANSACTIONS) and waits one retry backoff.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python bench/bench_committer.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.committer import PartitionCommitter
from consumer.deadletter import DeadLetter


def letter(topic: str, offset: int) -> DeadLetter:
    return DeadLetter(
        source_topic=topic,
        partition=0,
        offset=offset,
        key=b"k",
        value=b'{"id":"e"}',
        headers=[],
        reason="validation_error",
        error_name=None,
        http_status=422,
        message="bench",
        attempts=1,
        first_attempt_at=None,
        last_attempt_at=None,
        idempotency_key=None,
        event_type=None,
    )


def figures(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1]
    return f"{name}: median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms (n={len(ms)})"


async def main(partitions: int, commits: int, gap: float) -> None:
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    client = {"bootstrap_servers": bootstrap}
    topic = f"bench-txn-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(f"{topic}.dlq", 1, 1)])
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        assigns: list[float] = []
        for _ in range(3):
            committer = PartitionCommitter(
                client=client, group_id=f"bench-{topic}", topic_for=lambda t: f"{t}.dlq"
            )
            started = time.perf_counter()
            await committer.assign(tps)
            assigns.append(time.perf_counter() - started)
            await committer.stop()
        print(figures(f"assign {partitions} partitions (init + offset read)", assigns))
        singles: list[float] = []
        committer = PartitionCommitter(
            client=client, group_id=f"bench-{topic}", topic_for=lambda t: f"{t}.dlq"
        )
        for _ in range(5):
            started = time.perf_counter()
            await committer.assign(tps[:1])
            singles.append(time.perf_counter() - started)
        print(figures("assign 1 partition (init + offset read)", singles))
        empty: list[float] = []
        with_letter: list[float] = []
        position = 1_000
        for _ in range(commits):
            position += 1
            await asyncio.sleep(gap)
            started = time.perf_counter()
            await committer.commit(tps[0], position, "", [])
            empty.append(time.perf_counter() - started)
            position += 1
            await asyncio.sleep(gap)
            started = time.perf_counter()
            await committer.commit(tps[0], position, "", [letter(topic, position - 1)])
            with_letter.append(time.perf_counter() - started)
        print(figures("commit, 0 letters", empty))
        print(figures("commit, 1 letter", with_letter))
        await committer.stop()
    finally:
        await admin.delete_topics([topic, f"{topic}.dlq"])
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument(
        "--gap", type=float, default=0.2, help="seconds between commits (the commit interval)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.partitions, args.commits, args.gap))
