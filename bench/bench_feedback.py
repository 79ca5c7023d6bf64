"""The webhook receiver: verified webhooks per second to Kafka's ack, and CPU per webhook.

Runs `python -m consumer webhooks` as a child process against the broker in
KAFKA_BOOTSTRAP_SERVERS (a fresh topic, deleted afterwards) and posts
pre-signed Resend-shaped webhooks (about 700 bytes, unique `svix-id`s) over
keep-alive connections. Every answer must be 200 `produced`, and the topic
must hold exactly one record per webhook. The receiver's CPU time is read from
/proc for that process alone, over the measured phase only (start-up and
warm-up excluded), so the figure holds even with other load on the machine.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python bench/bench_feedback.py \\
        --webhooks 20000 --concurrency 32 [--mode binary]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import free_port, proc_stats  # noqa: E402

SECRET = "whsec_YmVuY2gtZmVlZGJhY2stc2VjcmV0LTMyLWJ5dGVzIQ=="
PATH = "/webhooks/resend"


def webhooks(n: int) -> list[tuple[bytes, dict[str, str]]]:
    """n signed webhooks, alternating sent / delivered, tagged like the service's emails."""
    hook = Webhook(SECRET)
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        body = orjson.dumps(
            {
                "type": "email.delivered" if i % 2 else "email.sent",
                "created_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "data": {
                    "email_id": str(uuid.UUID(int=i // 2)),
                    "created_at": "2026-01-02T03:04:05.678Z",
                    "from": "Acme <orders@acme.example>",
                    "to": [f"customer{i // 2}@example.com"],
                    "subject": f"Your Acme order A-{i // 2} is confirmed",
                    "tags": [
                        {"name": "category", "value": "order_confirmation"},
                        {"name": "rc_event", "value": uuid.uuid4().hex},
                        {"name": "rc_route", "value": "order-2econfirmed"},
                    ],
                },
            }
        )
        msg_id = f"msg_{uuid.uuid4().hex}"
        headers = {
            "svix-id": msg_id,
            "svix-timestamp": str(int(now.timestamp())),
            "svix-signature": hook.sign(msg_id, now, body.decode()),
            "content-type": "application/json",
        }
        out.append((body, headers))
    return out


async def post_all(
    session: aiohttp.ClientSession,
    url: str,
    batch: list[tuple[bytes, dict[str, str]]],
    concurrency: int,
) -> list[float]:
    """Post every webhook, at most `concurrency` at once; each one's latency in seconds."""
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(body: bytes, headers: dict[str, str]) -> None:
        async with slots:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as answer:
                data = await answer.read()
            latencies.append(time.perf_counter() - started)
            if answer.status != 200 or b'"produced"' not in data:
                raise RuntimeError(f"answer {answer.status}: {data[:200]!r}")

    await asyncio.gather(*(one(b, h) for b, h in batch))
    return latencies


async def topic_count(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("the receiver exited during start-up")
            try:
                async with session.get(url + "/readyz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the receiver did not become ready")


def start_receiver(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", "webhooks"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def bench(args: argparse.Namespace, bootstrap: str) -> None:
    topic = f"bench-feedback-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, args.partitions, 1)])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RESEND_"))}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        RESEND_WEBHOOK_SECRET=SECRET,
        FEEDBACK_TOPIC=topic,
        FEEDBACK_MODE=args.mode,
        WEBHOOK_HOST="127.0.0.1",
        WEBHOOK_PORT=str(port),
        LOG_FORMAT="json",
        LOG_LEVEL="warning",
    )
    proc = start_receiver(env)
    try:
        base = f"http://127.0.0.1:{port}"
        warmup = webhooks(args.warmup)
        measured = webhooks(args.webhooks)
        await wait_ready(base, proc)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await post_all(session, base + PATH, warmup, args.concurrency)
            _, cpu_before = proc_stats(proc.pid)
            client_cpu, wall = time.process_time(), time.perf_counter()
            latencies = await post_all(session, base + PATH, measured, args.concurrency)
            wall = time.perf_counter() - wall
            client_cpu = time.process_time() - client_cpu
            rss_kib, cpu_after = proc_stats(proc.pid)
        count = await topic_count(bootstrap, topic, args.partitions)
    finally:
        proc.terminate()
        proc.wait(30)
        await admin.delete_topics([topic])
        await admin.close()
    expected = args.warmup + args.webhooks
    if count != expected:
        raise RuntimeError(f"{count} records on the topic, {expected} expected")
    cpu = cpu_after - cpu_before
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"webhook receiver ({args.mode}, {args.concurrency} concurrent, {args.partitions} "
        f"partitions): {args.webhooks / wall:,.0f} verified webhooks/s to Kafka acks; "
        f"receiver CPU {cpu / args.webhooks * 1e6:.0f} us per webhook "
        f"({cpu / wall * 100:.0f} % of a core: {args.webhooks / cpu:,.0f}/s per receiver "
        f"CPU-second); client CPU {client_cpu / args.webhooks * 1e6:.0f} us per webhook; "
        f"latency p50 "
        f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
        f"peak RSS {rss_kib / 1024:.0f} MiB; {count} records on the topic, one per webhook"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webhooks", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument(
        "--concurrency", type=int, default=32, help="at most 128: the receiver's connection bound"
    )
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--mode", choices=("structured", "binary"), default="structured")
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("set KAFKA_BOOTSTRAP_SERVERS (deploy/dev kafka start runs a broker)", file=sys.stderr)
        return 2
    asyncio.run(bench(args, bootstrap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
