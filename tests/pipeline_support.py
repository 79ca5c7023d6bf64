"""Helpers for the pipeline's integration tests: events, settings, service processes.

Everything here talks to real things: the Kafka broker, the in-process sandbox
on a real socket, and `python -m consumer run` child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer import AIOKafkaConsumer

from consumer.deadletter import topic_partitions
from consumer.health import Health
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.prepare import Preparer
from consumer.ratelimit import RateLimiter
from consumer.resend import ResendClient
from consumer.retry import RetryPolicy, ServiceGate
from consumer.service import run_pipeline
from consumer.settings import FIELDS, Secret, Settings
from tests.conftest import serve

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ROOT / "schemas" / "routes.yaml"
API_KEY = "re_test_pipeline_secret_123"


def order_event(n: int, *, email: str | None = None, when: datetime | None = None) -> bytes:
    """A structured-mode `order.confirmed` CloudEvent with entity id `ord-{n}`."""
    event = {
        "specversion": "1.0",
        "id": f"evt-{n}",
        "source": "shop/orders",
        "type": "order.confirmed",
        "time": (when or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "subject": f"ord-{n}",
        "datacontenttype": "application/json",
        "data": {
            "order_id": f"ord-{n}",
            "order_number": f"A-{n}",
            "customer": {"name": f"Customer {n}", "email": email or f"customer{n}@example.com"},
            "currency": "EUR",
            "items": [{"sku": "SKU-1", "name": "Widget", "quantity": 1, "unit_price_cents": 4200}],
            "total_cents": 4200,
        },
    }
    return orjson.dumps(event)


def order_records(ns: Iterable[int]) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"ord-{n}".encode(), order_event(n), []) for n in ns]


def bad_record(n: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A record that is not JSON (dead-lettered as `not_json`), key `bad-{n}`."""
    return (f"bad-{n}".encode(), f"{{not json {n}".encode(), [])


def mixed_records(
    n: int, *, bad: int
) -> tuple[list[tuple[bytes, bytes, list[tuple[str, bytes]]]], set[int]]:
    """`n` records, `bad` of them (spread evenly) not JSON; returns them and the bad numbers."""
    bad_ns = {(2 * j + 1) * n // (2 * bad) for j in range(bad)}
    records = [bad_record(i) if i in bad_ns else order_records([i])[0] for i in range(n)]
    return records, bad_ns


def order_key(n: int) -> str:
    """The idempotency key the shipped routes derive for `order_event(n)`."""
    return f"order-confirmation:ord-{n}"


def email_key(d: Any) -> str:
    """The idempotency key of the event an accepted email came from.

    A single send carries it; a batch member carries only the batch's key, so its
    event is read from the email itself: the shipped routes set `X-Entity-Ref-ID`
    on order confirmations, and every email has its `rc_event` tag.
    """
    key = d.idempotency_key
    if key is not None and not key.startswith(".:"):
        return str(key)
    ref = (d.body.get("headers") or {}).get("X-Entity-Ref-ID")
    if ref is not None:
        return f"order-confirmation:{ref}"
    tags = {t["name"]: t["value"] for t in d.body.get("tags") or ()}
    return f"event:{tags.get('rc_event')}"


def delivered_keys(sb: Any) -> Counter[str]:
    """Accepted emails per event key in a sandbox's delivery ledger (replays not counted)."""
    return Counter(email_key(d) for d in sb.deliveries())


def pipeline_settings(bootstrap: str, topic: str, base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topics": (topic,),
        "kafka_group_id": f"g-{uuid.uuid4().hex[:10]}",
        "kafka_session_timeout": 10.0,
        "kafka_heartbeat_interval": 1.0,
        "kafka_rebalance_timeout": 20.0,
        "drain_timeout": 5.0,
        "shutdown_timeout": 10.0,
        "resend_base_url": base_url,
        "resend_api_key": Secret(API_KEY),
        "routes_file": ROUTES,
        "rate_limit": 5000.0,
        "retry_base": 0.05,
        "retry_cap": 0.5,
        "commit_interval": 0.2,
        "health_port": 0,
        "log_level": "warning",
        "log_format": "json",
        "probe_initial": 0.2,
        "probe_max": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def service_env(settings: Settings) -> dict[str, str]:
    """Environment for a `python -m consumer run` child with exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RESEND_"))}
    for f in FIELDS:
        value = getattr(settings, f.name)
        if value is None:
            continue
        if isinstance(value, Secret):
            text = value.get()
        elif isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif getattr(f.parse, "__name__", "") in {"_positive_duration", "parse_duration"}:
            text = f"{value}s"
        else:
            text = str(value)
        env[f.env] = text
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """An in-process Pipeline (for tests that look inside it), running until the block ends."""
    limiter = RateLimiter(rate=settings.rate_limit)
    gate = ServiceGate(probe_initial=0.2, probe_max=1.0)
    stop = asyncio.Event()
    made: list[Pipeline] = []
    async with ResendClient.from_settings(settings, limiter=limiter) as client:
        task = asyncio.create_task(
            run_pipeline(
                settings,
                stop,
                preparer=Preparer.from_settings(settings),
                client=client,
                gate=gate,
                policy=RetryPolicy.from_settings(settings),
                metrics=Metrics(),
                health=Health(liveness_window=60.0),
                ready=made.append,
            )
        )
        try:
            while not made:
                await asyncio.sleep(0.01)
            yield made[0]
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


class ChildProcess:
    """`python -m consumer COMMAND` as a child process with its output kept in a file."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consumer", command],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """kill -9: no drain, no commit, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 60.0) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


class ServiceProcess(ChildProcess):
    """`python -m consumer run` with exactly these settings."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        super().__init__("run", service_env(settings), log_path)
        self.health_port = settings.health_port

    async def wait_assigned(self, timeout: float = 60.0) -> None:
        """Wait until this process logged a partition assignment (needs LOG_LEVEL=info)."""
        await wait_for(lambda: "partitions.assigned" in self.output(), timeout, "an assignment")


def member(settings: Settings, log_path: Path, **overrides: Any) -> ServiceProcess:
    """A service process of a group with a HEALTH_PORT of its own, `overrides` applied."""
    changed = dataclasses.replace(settings, health_port=free_port(), **overrides)
    return ServiceProcess(changed, log_path)


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str
) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def committed(bootstrap: str, group: str) -> dict[int, int]:
    """Committed offsets of a group by partition, read through the admin client."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def wait_committed(
    bootstrap: str, group: str, expected: dict[int, int], timeout: float, what: str
) -> None:
    """Wait until the group's committed offsets for `expected`'s partitions equal it."""

    async def reached() -> bool:
        positions = await committed(bootstrap, group)
        return {p: positions.get(p) for p in expected} == expected

    await wait_for(reached, timeout, what)


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: off for tp, off in ends.items()}


async def read_all(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Read `count` records of `topic` from the beginning (no group)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    got: list[Any] = []
    try:

        async def loop() -> None:
            while len(got) < count:
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    got.extend(records)

        await asyncio.wait_for(loop(), timeout)
    finally:
        await consumer.stop()
    return got


async def read_to_end(
    bootstrap: str, topic: str, *, isolation_level: str = "read_committed", timeout: float = 60.0
) -> list[Any]:
    """Every record of `topic` up to its end now, in (partition, offset) order.

    read_committed by default, as every reader of a dead-letter topic: records of
    aborted transactions are skipped, and the end is the last stable offset.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    partitions = await topic_partitions({"bootstrap_servers": bootstrap}, topic)
    assert partitions, f"topic {topic} does not exist"
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []

        async def loop() -> None:
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                batch = await consumer.getmany(timeout_ms=300)
                for recs in batch.values():
                    records.extend(recs)

        await asyncio.wait_for(loop(), timeout)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


def coordinates(records: Iterable[Any], key_prefix: bytes) -> set[tuple[int, int]]:
    """(partition, offset) of the source records whose key starts with `key_prefix`."""
    return {(r.partition, r.offset) for r in records if (r.key or b"").startswith(key_prefix)}


def letter_sources(letters: Iterable[Any]) -> Counter[tuple[int, int]]:
    """Dead letters per source (partition, offset), from their dlq.source_* headers."""
    counts: Counter[tuple[int, int]] = Counter()
    for letter in letters:
        headers = dict(letter.headers)
        counts[int(headers["dlq.source_partition"]), int(headers["dlq.source_offset"])] += 1
    return counts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a child's HEALTH_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def http_status(url: str, timeout: float = 5.0) -> int | None:
    """Status of GET `url`, or None when nothing answered."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


class FaultProxy:
    """A real HTTP proxy in front of the sandbox that answers 503 for chosen keys.

    Lets a test hold one particular event in retry while every other one flows.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.stuck: set[str] = set()
        self.refused: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.url = await serve(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        if key in self.stuck:
            self.refused[key] = self.refused.get(key, 0) + 1
            return web.json_response(
                {"statusCode": 503, "name": "service_unavailable", "message": "held by test"},
                status=503,
            )
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as resp:
            data = await resp.read()
            out_headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in {"content-length", "transfer-encoding", "content-encoding"}
            }
            return web.Response(status=resp.status, body=data, headers=out_headers)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self._session.close()
