"""Shared fixtures: a real Apache Kafka broker, fresh topics, a producer helper.

The broker is the one named by KAFKA_BOOTSTRAP_SERVERS when that is set
(`deploy/dev test` sets it after starting one); otherwise this session starts
its own from deploy/kafka/broker.py and stops it at the end. The broker
process is watched by a watchdog bound to this pytest process, so even a
killed test run leaves no JVM behind.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer.sandbox import Sandbox, SandboxConfig

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "deploy" / "kafka" / "broker.py"

Record = tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]
NewTopicFactory = Callable[..., Awaitable[str]]
Produce = Callable[[str, Sequence[Record]], Awaitable[None]]
MakeSandbox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that run the service configure logging globally; put it back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real Kafka broker for the whole test session."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    run_dir = tmp_path_factory.mktemp("kafka")
    out = subprocess.run(
        [
            sys.executable,
            str(BROKER),
            "start",
            "--dir",
            str(run_dir),
            "--watch-pid",
            str(os.getpid()),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([sys.executable, str(BROKER), "stop", "--dir", str(run_dir)], check=False)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free port of 127.0.0.1: its runner (to clean up) and its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def new_topic(kafka_bootstrap: str) -> AsyncIterator[NewTopicFactory]:
    """Factory of fresh, uniquely named topics; deletes them afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    created: list[str] = []

    async def make(partitions: int = 1, *, name: str | None = None, prefix: str = "t") -> str:
        topic = name or unique_name(prefix)
        await admin.create_topics([NewTopic(topic, partitions, 1)])
        created.append(topic)
        return topic

    try:
        yield make
    finally:
        if created:
            try:
                await admin.delete_topics(created)
            finally:
                await admin.close()
        else:
            await admin.close()


@pytest.fixture
async def produce(kafka_bootstrap: str) -> AsyncIterator[Produce]:
    """Send (key, value, headers) records with an idempotent acks=all producer."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()

    async def send(topic: str, records: Sequence[Record]) -> None:
        futures = [
            await producer.send(topic, value=value, key=key, headers=list(headers))
            for key, value, headers in records
        ]
        for fut in futures:
            await fut

    try:
        yield send
    finally:
        await producer.stop()


# -- the local Resend sandbox (consumer/sandbox) ------------------------------------


@pytest.fixture
async def make_sandbox() -> AsyncIterator[MakeSandbox]:
    """Factory: `sb = await make_sandbox(config=SandboxConfig(...))`; all stopped afterwards."""
    started: list[Sandbox] = []

    async def make(*, config: SandboxConfig | None = None) -> Sandbox:
        sb = Sandbox(config=config or SandboxConfig())
        await sb.start(host="127.0.0.1", port=0)
        started.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in started:
            await sb.stop()


@pytest.fixture
async def sandbox(make_sandbox: MakeSandbox) -> Sandbox:
    """An in-process sandbox on 127.0.0.1 (free port), rate limit raised to 1000/s for speed."""
    return await make_sandbox(config=SandboxConfig(rate_limit=1000.0))


@pytest.fixture
async def fast_sandbox(make_sandbox: MakeSandbox) -> Sandbox:
    """A sandbox that expects the pipeline tests' key, with no practical rate limit."""
    from tests.pipeline_support import API_KEY

    return await make_sandbox(config=SandboxConfig(api_key=API_KEY, rate_limit=100_000.0, seed=7))


# -- a second broker with SSL and SASL listeners (broker.py start --secure) ---------


@dataclass(frozen=True, kw_only=True)
class SecureKafka:
    """Where the secure broker listens and how to authenticate (from its secure.json)."""

    plaintext: str
    listeners: dict[str, str]  # SSL, SASL_PLAINTEXT, SASL_SSL, MTLS (SSL + client cert)
    ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    username: str
    password: str


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    """A session broker of its own with SSL, SASL_PLAINTEXT, SASL_SSL and mutual-TLS listeners."""
    run_dir = tmp_path_factory.mktemp("kafka-secure")
    cmd = [sys.executable, str(BROKER), "start", "--dir", str(run_dir), "--secure"]
    out = subprocess.run(
        [*cmd, "--watch-pid", str(os.getpid())], check=True, capture_output=True, text=True
    )
    try:
        info = json.loads((run_dir / "secure.json").read_text())
        yield SecureKafka(
            plaintext=out.stdout.strip().splitlines()[-1],
            listeners=info["listeners"],
            ca_file=Path(info["ca_file"]),
            client_cert_file=Path(info["client_cert_file"]),
            client_key_file=Path(info["client_key_file"]),
            username=info["username"],
            password=info["password"],
        )
    finally:
        subprocess.run([sys.executable, str(BROKER), "stop", "--dir", str(run_dir)], check=False)
