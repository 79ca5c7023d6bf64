"""The whole feedback loop on real parts: broker, sandbox, the `run` service, the receiver.

Events become emails (service -> sandbox), the sandbox posts signed webhooks
for them (sandbox -> receiver), and the receiver turns each into a CloudEvent
on the feedback topic (receiver -> Kafka). Judged from the sandbox's ledgers
and the topic, read with read_committed like any downstream consumer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import ConsumerRecord

from consumer.feedback import TYPE_PREFIX, WEBHOOK_PATH, Receiver
from consumer.routes import event_tag
from consumer.sandbox import Sandbox, SandboxConfig
from consumer.service import run_service
from consumer.settings import Secret, Settings
from tests.conftest import NewTopicFactory, Produce
from tests.pipeline_support import (
    API_KEY,
    ChildProcess,
    email_key,
    free_port,
    order_event,
    pipeline_settings,
    read_to_end,
    wait_for,
)
from tests.sandbox.support import send

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SECRET = "whsec_bG9vcC10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcyEh"
#: Resend's retry schedule scaled down: 5 s becomes 5 ms, 5 min 0.3 s, 30 min 1.8 s ...
TIME_SCALE = 0.001
Record = ConsumerRecord[bytes, bytes]


def receiver_settings(bootstrap: str, topic: str, port: int = 0) -> Settings:
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        webhook_host="127.0.0.1",
        webhook_port=port,
        resend_webhook_secret=(Secret(SECRET),),
        feedback_topic=topic,
        webhook_produce_timeout=5.0,
    )


@contextlib.asynccontextmanager
async def ready_receiver(settings: Settings) -> AsyncIterator[Receiver]:
    """An in-process receiver whose producer is connected."""
    receiver = Receiver(settings=settings)
    await receiver.start()
    try:
        await wait_for(lambda: receiver.ready()[0], 30, "the receiver's producer")
        yield receiver
    finally:
        await receiver.stop()


async def test_every_accepted_email_comes_back_once_as_feedback_with_its_source_tags(
    kafka_bootstrap: str, new_topic: NewTopicFactory, produce: Produce
) -> None:
    """Service + sandbox + receiver: sent then fate per email, once each, joined to its event
    and continuing its producer's trace."""
    n, partitions = 30, 3
    bounced, complained = 7, 13
    topic = await new_topic(partitions)
    feedback_topic = await new_topic(partitions, prefix="fb")
    settings = pipeline_settings(kafka_bootstrap, topic, "http://127.0.0.1:9")
    await new_topic(1, name=settings.dlq_topic_for(topic))
    emails = {bounced: "bounced@resend.dev", complained: "complained@resend.dev"}

    def traceparent(i: int) -> str:  # the producer's span of order i (even orders only)
        return f"00-{i + 1:032x}-{i + 1:016x}-01"

    await produce(
        topic,
        [
            (
                f"ord-{i}".encode(),
                order_event(i, email=emails.get(i)),
                [("traceparent", traceparent(i).encode())] if i % 2 == 0 else [],
            )
            for i in range(n)
        ],
    )
    async with ready_receiver(receiver_settings(kafka_bootstrap, feedback_topic)) as receiver:
        config = SandboxConfig(
            api_key=API_KEY,
            rate_limit=5000.0,
            webhook_url=receiver.url,
            webhook_secret=SECRET,
            webhook_time_scale=TIME_SCALE,
        )
        async with Sandbox(config=config) as sandbox:
            stop = asyncio.Event()
            service = asyncio.create_task(
                run_service(settings.replace(resend_base_url=sandbox.url), stop)
            )
            try:
                await wait_for(lambda: len(sandbox.deliveries()) >= n, 60, "every email sent")
                await wait_for(
                    lambda: not sandbox.webhooks_pending and len(sandbox.webhook_posts()) >= 2 * n,
                    60,
                    "every webhook answered",
                )
            finally:
                stop.set()
                code = await asyncio.wait_for(service, 60)
            deliveries, posts = sandbox.deliveries(), sandbox.webhook_posts()
        counts = dict(receiver.counts)
    assert code == 0
    records = await read_to_end(kafka_bootstrap, feedback_topic)
    events = [orjson.loads(r.value) for r in records]

    # once by svix id: one record per webhook the sandbox posted, each answered 200 at once
    assert len(deliveries) == n
    assert len(posts) == 2 * n
    assert all(p.answers == [200] for p in posts)
    assert counts["produced"] == 2 * n
    assert counts["duplicate"] == 0
    assert sorted(e["id"] for e in events) == sorted(p.id for p in posts)
    # once by email id, in order (the key is the email id: one partition per email)
    assert all(r.key == e["subject"].encode() for r, e in zip(records, events, strict=True))
    by_email: dict[str, list[str]] = {}
    for event in events:
        by_email.setdefault(event["subject"], []).append(event["type"].removeprefix(TYPE_PREFIX))
    assert set(by_email) == {d.id for d in deliveries}
    # each feedback event names the domain event that caused its email
    expected_fate = {bounced: "email.bounced", complained: "email.complained"}
    order_of = {d.id: int(email_key(d).rsplit("-", 1)[1]) for d in deliveries}
    for record, event in zip(records, events, strict=True):
        i = order_of[event["subject"]]
        # the order's trace continues on its feedback (attribute and plain header)
        header = dict(record.headers).get("traceparent")
        if i % 2 == 0:
            assert event["traceparent"] == traceparent(i)
            assert header == traceparent(i).encode()
        else:
            assert "traceparent" not in event
            assert header is None
        assert event["sourceeventhash"] == event_tag("shop/orders", f"evt-{i}")
        assert event["sourceroute"] == "order.confirmed"
        assert event["data"]["email_id"] == event["subject"]
    for email_id, types in by_email.items():
        fate = expected_fate.get(order_of[email_id], "email.delivered")
        assert types == ["email.sent", fate], email_id
    fates = Counter(types[1] for types in by_email.values())
    assert fates == {"email.delivered": n - 2, "email.bounced": 1, "email.complained": 1}


# -- kill -9 of the receiver while webhooks arrive -----------------------------------


class ReceiverProcess(ChildProcess):
    """`python -m consumer webhooks` as a child, its output kept in a file."""

    def __init__(self, bootstrap: str, topic: str, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RESEND_"))}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            RESEND_WEBHOOK_SECRET=SECRET,
            FEEDBACK_TOPIC=topic,
            WEBHOOK_HOST="127.0.0.1",
            WEBHOOK_PORT=str(port),
            LOG_FORMAT="json",
            LOG_LEVEL="warning",
            PYTHONUNBUFFERED="1",
        )
        super().__init__("webhooks", env, log_path)

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.proc.poll() is None, "the receiver exited"
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(self.url + "/readyz") as answer,
                ):
                    return answer.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_for(ready, 60, "the receiver ready")


def answered_2xx(answers: list[int | None]) -> bool:
    return any(a is not None and a < 300 for a in answers)


async def test_kill_9_of_the_receiver_loses_no_acknowledged_webhook_and_retries_fill_the_gap(
    kafka_bootstrap: str, new_topic: NewTopicFactory, tmp_path: Path
) -> None:
    """SIGKILL mid-stream: every webhook answered 2xx is on the topic; retries bring the rest."""
    emails, partitions = 1000, 3
    topic = await new_topic(partitions, prefix="fb")
    port = free_port()
    first = ReceiverProcess(kafka_bootstrap, topic, port, tmp_path / "receiver-1.log")
    second: ReceiverProcess | None = None
    try:
        await first.wait_ready()
        config = SandboxConfig(
            rate_limit=100_000.0,
            webhook_url=first.url + WEBHOOK_PATH,
            webhook_secret=SECRET,
            webhook_time_scale=TIME_SCALE,
        )
        async with Sandbox(config=config) as sandbox, aiohttp.ClientSession() as session:
            for batch in range(emails // 100):
                body = [
                    {
                        "from": "a@acme.test",
                        "to": [f"user{batch * 100 + i}@example.com"],
                        "subject": "s",
                        "text": "t",
                    }
                    for i in range(100)
                ]
                answer = await send(session, sandbox, body, path="/emails/batch")
                assert answer.status == 200
            await wait_for(
                lambda: sum(p.delivered for p in sandbox.webhook_posts()) >= 300,
                60,
                "300 webhooks produced",
            )
            first.kill()
            at_kill = sandbox.webhook_posts()
            acknowledged = {p.id for p in at_kill if answered_2xx(p.answers)}
            assert len(acknowledged) < 2 * emails, "the kill must land mid-stream"
            on_topic = {
                orjson.loads(r.value)["id"] for r in await read_to_end(kafka_bootstrap, topic)
            }
            missing = acknowledged - on_topic
            assert not missing, f"{len(missing)} webhooks answered 2xx are not on the topic"

            second = ReceiverProcess(kafka_bootstrap, topic, port, tmp_path / "receiver-2.log")
            await second.wait_ready()
            await wait_for(lambda: not sandbox.webhooks_pending, 90, "every webhook answered")
            posts = sandbox.webhook_posts()
    finally:
        first.ensure_dead()
        if second is not None:
            second.ensure_dead()
    assert len(posts) == 2 * emails
    assert all(p.delivered for p in posts), "the sandbox's retries reach the new receiver"
    retried = [p for p in posts if len(p.answers) > 1]
    assert retried, "some webhooks were refused or unanswered while the receiver was down"
    assert all(p.answers[0] is None or p.answers[0] >= 300 for p in retried)
    records = await read_to_end(kafka_bootstrap, topic)
    by_id: dict[str, set[bytes]] = {}
    for record in records:
        by_id.setdefault(orjson.loads(record.value)["id"], set()).add(record.value)
    assert set(by_id) == {p.id for p in posts}
    # a repeat (acked by Kafka, answer lost in the kill) is the same CloudEvent: drop by id
    assert all(len(values) == 1 for values in by_id.values())
    assert len(records) - len(by_id) <= len(retried)
