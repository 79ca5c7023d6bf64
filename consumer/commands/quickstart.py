"""`resend-consumer quickstart`: the whole product on one machine, in one command.

Starts a local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS names one) and the
local Resend sandbox (unless RESEND_API_KEY is set), creates the topic and its
dead-letter topic, runs the service, publishes the example events, and prints
each email the sandbox accepts. With the sandbox it also runs the webhook
receiver (`resend-consumer webhooks`) on 127.0.0.1:WEBHOOK_PORT, has the
sandbox post its signed delivery webhooks there, and prints each feedback
event read back from FEEDBACK_TOPIC beside the deliveries: the whole loop,
event -> email -> webhook -> feedback event, in one terminal. Ctrl-C drains
the service and stops everything it started; nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from consumer.errors import SettingsError
from consumer.events import CE_HEADER_PREFIX, CONTENT_TYPE_HEADER
from consumer.feedback import EXT_EVENT, EXT_ROUTE, STRUCTURED_TYPE, TYPE_PREFIX, Receiver
from consumer.sandbox import Sandbox, SandboxConfig
from consumer.service import run_service
from consumer.settings import Secret, Settings

REPO = Path(__file__).resolve().parents[2]
BROKER = REPO / "deploy" / "kafka" / "broker.py"
SANDBOX_KEY = "re_quickstart_sandbox"
#: the sandbox posts each email's webhooks after it accepted it: sent, then its fate
FEEDBACK_PER_EMAIL = 2
#: defaults of the flags: partitions of a new topic, the sandbox's port, the state folder
PARTITIONS: Final = 3
SANDBOX_PORT: Final = 8025
STATE_DIR: Final = Path(".cache/quickstart")

log = structlog.get_logger("consumer.quickstart")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="folder of example events to publish (default: schemas/examples beside routes)",
    )
    parser.add_argument(
        "--partitions", type=int, default=PARTITIONS, help="partitions of a new topic"
    )
    parser.add_argument(
        "--sandbox-port",
        type=int,
        default=SANDBOX_PORT,
        help="port of the local sandbox (0: any free)",
    )
    parser.add_argument(
        "--exit-when-delivered",
        action="store_true",
        help="stop by itself once every published example has a final outcome",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        help="where the local broker keeps its data and the sandbox its delivery log",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QuickstartArgs:
    """What `quickstart` is asked, and what the environment already provides.

    `external_kafka` / `external_resend`: KAFKA_BOOTSTRAP_SERVERS or RESEND_API_KEY
    (or their flags) name a broker or a Resend account, so none is started.
    """

    examples: Path | None = None
    partitions: int = PARTITIONS
    sandbox_port: int = SANDBOX_PORT
    exit_when_delivered: bool = False
    state_dir: Path = STATE_DIR
    external_kafka: bool = False
    external_resend: bool = False

    @classmethod
    def from_namespace(
        cls, ns: argparse.Namespace, *, external_kafka: bool, external_resend: bool
    ) -> QuickstartArgs:
        return cls(
            examples=ns.examples,
            partitions=ns.partitions,
            sandbox_port=ns.sandbox_port,
            exit_when_delivered=ns.exit_when_delivered,
            state_dir=ns.state_dir,
            external_kafka=external_kafka,
            external_resend=external_resend,
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


async def _ensure_topics(settings: Settings, topics: list[str], partitions: int) -> dict[str, int]:
    """Create the topics that do not exist yet; their partition counts once all are known."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        async with asyncio.timeout(30):
            while True:  # a topic just created has its leaders a moment later
                described = await admin.describe_topics(topics)
                counts = {
                    d["topic"]: len(d["partitions"])
                    for d in described
                    if d["partitions"] and all(p["leader"] >= 0 for p in d["partitions"])
                }
                if set(counts) >= set(topics):
                    return counts
                await asyncio.sleep(0.1)
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


def _webhook_secret(settings: Settings) -> Secret:
    """The configured RESEND_WEBHOOK_SECRET, or a fresh one only this run knows."""
    if settings.resend_webhook_secret:
        return settings.resend_webhook_secret[0]
    return Secret("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())


class FeedbackReader:
    """Reads FEEDBACK_TOPIC from its end at `start()`: what this run's webhooks produce."""

    def __init__(self, settings: Settings, partitions: int, log_path: Path) -> None:
        self.topic = settings.feedback_topic
        self.partitions = partitions
        self.events: list[dict[str, Any]] = []
        self._log_path = log_path
        self._consumer = AIOKafkaConsumer(
            group_id=None, isolation_level="read_committed", **settings.kafka_client_kwargs()
        )

    async def start(self) -> None:
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end now, before any webhook is posted
            await self._consumer.position(tp)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self) -> list[dict[str, Any]]:
        """The feedback events that arrived since the last poll (also appended to the log)."""
        batches = await self._consumer.getmany(timeout_ms=0)
        new = [_cloudevent(r) for records in batches.values() for r in records]
        if new:
            lines = b"".join(orjson.dumps(e) + b"\n" for e in new)
            await asyncio.to_thread(_append, self._log_path, lines)
            self.events.extend(new)
        return new


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _cloudevent(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    """A feedback record as a CloudEvent dict, whichever FEEDBACK_MODE wrote it."""
    headers = dict(record.headers)
    value = orjson.loads(record.value) if record.value else None
    if headers.get(CONTENT_TYPE_HEADER) == STRUCTURED_TYPE and isinstance(value, dict):
        return value
    prefix = len(CE_HEADER_PREFIX)
    event: dict[str, Any] = {
        k[prefix:]: v.decode(errors="replace")
        for k, v in headers.items()
        if k.startswith(CE_HEADER_PREFIX)
    }
    event["data"] = value
    return event


def feedback_line(event: dict[str, Any], subjects: dict[str, str]) -> str:
    """One printed line per feedback event: type, email, its subject line and its route."""
    kind = str(event.get("type", "?")).removeprefix(TYPE_PREFIX)
    email_id = str(event.get("subject", "?"))
    line = f"  feedback {kind:<16} {email_id}"
    subject = subjects.get(email_id)
    if subject is not None:
        line += f" {subject!r}"
    if EXT_ROUTE in event:
        line += f" (route {event[EXT_ROUTE]}, event {str(event.get(EXT_EVENT, '?'))[:12]})"
    return line


async def quickstart(settings: Settings, args: QuickstartArgs, stop: asyncio.Event) -> int:
    """Start what is missing, run the service, publish the examples, print what happens.

    The exit code is the service's (`EXIT_OK` after a drain).
    """
    external_kafka = args.external_kafka
    external_resend = args.external_resend
    state = args.state_dir
    await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True)
    broker_dir: Path | None = None
    sandbox: Sandbox | None = None
    receiver: Receiver | None = None
    reader: FeedbackReader | None = None
    try:
        if not external_kafka:
            _print("starting a local Apache Kafka broker (first run fetches jars with Maven)")
            bootstrap, broker_dir = await asyncio.to_thread(_start_broker, state)
            settings = settings.replace(kafka_bootstrap_servers=bootstrap)
        _print(f"Kafka at {settings.kafka_bootstrap_servers}")
        topic = settings.kafka_topics[0]
        topics = [topic, settings.dlq_topic_for(topic)]
        if not external_resend:
            # Resend itself cannot post to this machine: the loop closes with the sandbox only
            secret = _webhook_secret(settings)
            settings = settings.replace(webhook_host="127.0.0.1", resend_webhook_secret=(secret,))
            topics.append(settings.feedback_topic)
        partitions = await _ensure_topics(settings, topics, args.partitions)
        if not external_resend:
            feedback_log = state / "feedback.jsonl"
            reader = FeedbackReader(settings, partitions[settings.feedback_topic], feedback_log)
            await reader.start()
            receiver = Receiver(settings=settings)
            await receiver.start()
            _print(
                f"webhook receiver at {receiver.url} -> {settings.feedback_topic} "
                f"(feedback events also in {state}/feedback.jsonl)"
            )
            sandbox = Sandbox(
                config=SandboxConfig(
                    api_key=SANDBOX_KEY,
                    log_path=state / "deliveries.jsonl",
                    webhook_url=receiver.url,
                    webhook_secret=settings.resend_webhook_secret[0].get(),
                )
            )
            await sandbox.start(host="127.0.0.1", port=args.sandbox_port)
            settings = settings.replace(
                resend_base_url=sandbox.url, resend_api_key=Secret(SANDBOX_KEY)
            )
            _print(f"Resend sandbox at {sandbox.url} (deliveries also in {state}/deliveries.jsonl)")
        service_stop = asyncio.Event()
        service = asyncio.create_task(run_service(settings, service_stop), name="service")
        examples_dir = args.examples or settings.routes_file.parent / "examples"
        events = load_examples(examples_dir)
        await _publish(settings, topic, events)
        _print(f"published {len(events)} example events to {topic}; Ctrl-C to stop")
        seen = 0
        subjects: dict[str, str] = {}
        while not stop.is_set() and not service.done():
            if sandbox is not None:
                deliveries = sandbox.deliveries()
                for d in deliveries[seen:]:
                    body = d.body if isinstance(d.body, dict) else {}
                    subjects[d.id] = str(body.get("subject"))
                    _print(
                        f"sandbox accepted {d.id}: {body.get('subject')!r} "
                        f"(key {d.idempotency_key})"
                    )
                seen = len(deliveries)
            if reader is not None:
                for event in await reader.poll():
                    _print(feedback_line(event, subjects))
            if args.exit_when_delivered and sandbox is not None and seen >= len(events):
                feedback = len(reader.events) if reader is not None else 0
                if reader is None or feedback >= FEEDBACK_PER_EMAIL * seen:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        service_stop.set()
        code = await service
        _print("service stopped")
        return code
    finally:
        if sandbox is not None:
            await sandbox.stop()
        if receiver is not None:
            await receiver.stop()
            _print("webhook receiver stopped")
        if reader is not None:
            await reader.stop()
        if broker_dir is not None:
            await asyncio.to_thread(_stop_broker, broker_dir)
            _print("local Kafka stopped")
