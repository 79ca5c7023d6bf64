"""`resend-consumer quickstart`: the whole product on one machine, in one command.

Starts a local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS names one) and the
local Resend sandbox (unless RESEND_API_KEY is set), creates the topic and its
dead-letter topic, runs the service, publishes the example events, and prints
each email the sandbox accepts. Ctrl-C drains the service and stops everything
it started; nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from consumer.sandbox import Sandbox, SandboxConfig
from consumer.service import run_service
from consumer.settings import Secret, Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "deploy" / "kafka" / "broker.py"
SANDBOX_KEY = "re_quickstart_sandbox"

log = structlog.get_logger("consumer.quickstart")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="folder of example events to publish (default: schemas/examples beside routes)",
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions of a new topic")
    parser.add_argument(
        "--sandbox-port", type=int, default=8025, help="port of the local sandbox (0: any free)"
    )
    parser.add_argument(
        "--exit-when-delivered",
        action="store_true",
        help="stop by itself once every published example has a final outcome",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".cache/quickstart"),
        help="where the local broker keeps its data and the sandbox its delivery log",
    )


def _print(line: str) -> None:
    sys.stderr.write(
        f"\033[1m[quickstart]\033[0m {line}\n" if sys.stderr.isatty() else f"[quickstart] {line}\n"
    )
    sys.stderr.flush()


def _start_broker(state: Path) -> tuple[str, Path]:
    if not BROKER.exists():
        raise SettingsError(
            "no local Kafka here (deploy/kafka/broker.py is part of the source checkout); "
            "set KAFKA_BOOTSTRAP_SERVERS to a running broker"
        )
    run_dir = state / "kafka"
    out = subprocess.run(  # noqa: S603 - fixed argv
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
    return out.stdout.strip().splitlines()[-1], run_dir


def _stop_broker(run_dir: Path) -> None:
    subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, str(BROKER), "stop", "--dir", str(run_dir)], check=False
    )


async def _ensure_topics(settings: Settings, topics: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


def load_examples(folder: Path) -> list[dict[str, Any]]:
    """Structured-mode example events, with a fresh `time` so none is stale."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    events = []
    for path in sorted(folder.glob("*.json")):
        doc = orjson.loads(path.read_bytes())
        if not isinstance(doc, dict) or "specversion" not in doc:
            continue  # binary-mode examples carry their envelope elsewhere
        doc["time"] = now
        doc.setdefault("id", str(uuid.uuid4()))
        events.append(doc)
    return events


async def _publish(settings: Settings, topic: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(
        enable_idempotence=True, acks="all", **settings.kafka_client_kwargs()
    )
    await producer.start()
    try:
        for event in events:
            key = str(event.get("subject") or event["id"]).encode()
            await producer.send_and_wait(topic, orjson.dumps(event), key=key)
    finally:
        await producer.stop()


async def quickstart(settings: Settings, args: argparse.Namespace, stop: asyncio.Event) -> int:
    external_kafka: bool = getattr(args, "external_kafka", False)
    external_resend: bool = getattr(args, "external_resend", False)
    state: Path = args.state_dir
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    broker_dir: Path | None = None
    sandbox: Sandbox | None = None
    try:
        if not external_kafka:
            _print("starting a local Apache Kafka broker (first run fetches jars with Maven)")
            bootstrap, broker_dir = await asyncio.to_thread(_start_broker, state)
            settings = settings.replace(kafka_bootstrap_servers=bootstrap)
        _print(f"Kafka at {settings.kafka_bootstrap_servers}")
        if not external_resend:
            sandbox = Sandbox(
                config=SandboxConfig(api_key=SANDBOX_KEY, log_path=state / "deliveries.jsonl")
            )
            await sandbox.start(host="127.0.0.1", port=args.sandbox_port)
            settings = settings.replace(
                resend_base_url=sandbox.url, resend_api_key=Secret(SANDBOX_KEY)
            )
            _print(f"Resend sandbox at {sandbox.url} (deliveries also in {state}/deliveries.jsonl)")
        topic = settings.kafka_topics[0]
        await _ensure_topics(settings, [topic, settings.dlq_topic_for(topic)], args.partitions)
        service_stop = asyncio.Event()
        service = asyncio.create_task(run_service(settings, service_stop), name="service")
        examples_dir = args.examples or settings.routes_file.parent / "examples"
        events = load_examples(examples_dir)
        await _publish(settings, topic, events)
        _print(f"published {len(events)} example events to {topic}; Ctrl-C to stop")
        seen = 0
        while not stop.is_set() and not service.done():
            if sandbox is not None:
                deliveries = sandbox.deliveries()
                for d in deliveries[seen:]:
                    body = d.body if isinstance(d.body, dict) else {}
                    _print(
                        f"sandbox accepted {d.id}: {body.get('subject')!r} "
                        f"(key {d.idempotency_key})"
                    )
                seen = len(deliveries)
                if args.exit_when_delivered and seen >= len(events):
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        service_stop.set()
        code = await service
        _print("service stopped")
        return code
    finally:
        if sandbox is not None:
            await sandbox.stop()
        if broker_dir is not None:
            await asyncio.to_thread(_stop_broker, broker_dir)
            _print("local Kafka stopped")
