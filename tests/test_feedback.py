"""The webhook receiver against the real broker and real sockets; the sandbox posting to it."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from standardwebhooks import Webhook

from consumer.errors import SettingsError
from consumer.events import Decoder, compile_schema, load_json_file
from consumer.feedback import SOURCE, TYPE_PREFIX, WEBHOOK_PATH, Receiver, feedback_record
from consumer.routes import encode_tag_value
from consumer.sandbox import Sandbox, SandboxConfig
from consumer.settings import Secret, Settings
from tests.conftest import NewTopicFactory
from tests.pipeline_support import end_offsets, free_port, read_all
from tests.sandbox.support import send

pytestmark = pytest.mark.kafka

SECRET = "whsec_" + base64.b64encode(b"first-secret-of-the-tests-32byte").decode()
OTHER = "whsec_" + base64.b64encode(b"second-secret-used-for-rotation!").decode()
ENVELOPE = Path(__file__).resolve().parent.parent / "schemas" / "envelope.schema.json"


def decoder() -> Decoder:
    """The decoder `run` uses, so feedback is consumable like any domain event."""
    return Decoder(envelope=compile_schema(load_json_file(ENVELOPE)), max_bytes=1_048_576)


def webhook(kind: str = "email.bounced", email_id: str = "em_1", **data: Any) -> bytes:
    return orjson.dumps(
        {
            "type": kind,
            "created_at": "2026-01-02T03:04:05.678Z",
            "data": {
                "email_id": email_id,
                "to": ["jane@example.com"],
                "tags": [
                    {"name": "rc_event", "value": "0123abcd"},
                    {"name": "rc_route", "value": encode_tag_value("order.confirmed")},
                ],
                **data,
            },
        }
    )


def signed(
    body: bytes, *, secret: str = SECRET, msg_id: str | None = None, when: datetime | None = None
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    when = when or datetime.now(UTC)
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, when, body.decode()),
        "content-type": "application/json",
    }


def settings_for(bootstrap: str, topic: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "webhook_host": "127.0.0.1",
        "webhook_port": 0,
        "resend_webhook_secret": (Secret(SECRET),),
        "feedback_topic": topic,
        "webhook_produce_timeout": 5.0,
    }
    return Settings(**{**base, **kw})


MakeReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def make_receiver() -> AsyncIterator[MakeReceiver]:
    """Factory of started receivers, ready (producer connected) unless told not to wait."""
    started: list[Receiver] = []

    async def make(settings: Settings, *, wait_ready: bool = True) -> Receiver:
        receiver = Receiver(settings=settings)
        await receiver.start()
        started.append(receiver)
        if wait_ready:
            async with asyncio.timeout(30):
                while not receiver.ready()[0]:
                    await asyncio.sleep(0.05)
        return receiver

    try:
        yield make
    finally:
        for receiver in started:
            await receiver.stop()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as answer,
    ):
        return answer.status, orjson.loads(await answer.read())


async def test_signed_webhook_becomes_one_structured_cloudevent(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """A verified webhook is answered 200 after Kafka's ack, as a CloudEvent keyed by email id."""
    topic = await new_topic()
    receiver = await make_receiver(settings_for(kafka_bootstrap, topic))
    body = webhook(bounce={"type": "Permanent"})
    headers = signed(body, msg_id="msg_abc")
    status, answer = await post(receiver.url, body, headers)
    assert (status, answer["outcome"]) == (200, "produced")
    (record,) = await read_all(kafka_bootstrap, topic, 1)
    assert record.key == b"em_1"
    assert dict(record.headers)["content-type"] == b"application/cloudevents+json"
    event = orjson.loads(record.value)
    assert event["specversion"] == "1.0"
    assert event["id"] == "msg_abc"
    assert event["type"] == TYPE_PREFIX + "email.bounced" == "com.resend.email.bounced"
    assert event["source"] == SOURCE
    assert event["subject"] == "em_1"
    assert event["time"] == "2026-01-02T03:04:05.678000Z"
    assert event["data"] == orjson.loads(body)["data"]
    assert event["sourceeventhash"] == "0123abcd"
    assert event["sourceroute"] == "order.confirmed"
    # the service's own decoder reads it like any other domain event
    decoded = decoder().decode(record.value, record.headers)
    assert (decoded.id, decoded.type) == ("msg_abc", "com.resend.email.bounced")


async def test_binary_mode_puts_attributes_in_ce_headers(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """FEEDBACK_MODE=binary: ce_* headers, the webhook's data as the value."""
    topic = await new_topic()
    receiver = await make_receiver(settings_for(kafka_bootstrap, topic, feedback_mode="binary"))
    body = webhook("email.delivered", "em_2")
    status, _ = await post(receiver.url, body, signed(body, msg_id="msg_bin"))
    assert status == 200
    (record,) = await read_all(kafka_bootstrap, topic, 1)
    headers = dict(record.headers)
    assert headers["ce_id"] == b"msg_bin"
    assert headers["ce_type"] == b"com.resend.email.delivered"
    assert headers["ce_subject"] == b"em_2"
    assert orjson.loads(record.value) == orjson.loads(body)["data"]
    decoded = decoder().decode(record.value, record.headers)
    assert decoded.data["email_id"] == "em_2"


async def test_refused_webhooks_produce_nothing(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """Tampered, wrong secret, stale, no headers, not JSON, oversized: 4xx, nothing produced."""
    topic = await new_topic()
    receiver = await make_receiver(settings_for(kafka_bootstrap, topic, webhook_max_bytes=4096))
    body = webhook()
    good = signed(body)
    stale = signed(body, when=datetime.now(UTC) - timedelta(minutes=6))
    future = signed(body, when=datetime.now(UTC) + timedelta(minutes=6))
    not_json = b"{not json"
    big = webhook(padding="x" * 5000)
    cases = {
        "tampered": (body.replace(b"em_1", b"em_9"), good, 401, "bad_signature"),
        "wrong_secret": (body, signed(body, secret=OTHER), 401, "bad_signature"),
        "stale": (body, stale, 401, "stale_timestamp"),
        "future": (body, future, 401, "stale_timestamp"),
        "no_signature": (body, {k: v for k, v in good.items() if k != "svix-signature"}, 400, ""),
        "no_id": (body, {k: v for k, v in good.items() if k != "svix-id"}, 400, ""),
        "garbled_signature": (body, {**good, "svix-signature": "nonsense"}, 401, ""),
        "not_json": (not_json, signed(not_json), 400, "not_json"),
        "not_a_webhook": (b"[1]", signed(b"[1]"), 400, "not_a_webhook"),
        "oversized": (big, signed(big), 400, "too_large"),
    }
    for name, (data, headers, status, reason) in cases.items():
        got, answer = await post(receiver.url, data, headers)
        assert got == status, name
        if reason:
            assert answer["reason"] == reason, name
    assert receiver.counts["produced"] == 0
    assert (await end_offsets(kafka_bootstrap, topic, 1))[0] == 0


async def test_repeated_svix_id_is_produced_once(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """The same svix-id, again and concurrently, is answered 200 each time and on the topic once."""
    topic = await new_topic()
    receiver = await make_receiver(settings_for(kafka_bootstrap, topic))
    body = webhook()
    answers = await asyncio.gather(
        *(post(receiver.url, body, signed(body, msg_id="msg_dup")) for _ in range(5))
    )
    answers.append(await post(receiver.url, body, signed(body, msg_id="msg_dup")))
    assert [status for status, _ in answers] == [200] * 6
    assert sorted(a["outcome"] for _, a in answers) == ["duplicate"] * 5 + ["produced"]
    assert (await end_offsets(kafka_bootstrap, topic, 1))[0] == 1


async def test_two_secrets_accepted_during_rotation(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """With two secrets configured, webhooks signed with either are produced."""
    topic = await new_topic()
    parsed = Settings.from_env({"RESEND_WEBHOOK_SECRET": f"{SECRET}, {OTHER}"})
    settings = settings_for(
        kafka_bootstrap, topic, resend_webhook_secret=parsed.resend_webhook_secret
    )
    assert len(settings.resend_webhook_secret) == 2
    receiver = await make_receiver(settings)
    for secret in (SECRET, OTHER):
        body = webhook(email_id=f"em_{secret[-6:]}")
        status, _ = await post(receiver.url, body, signed(body, secret=secret))
        assert status == 200
    assert (await end_offsets(kafka_bootstrap, topic, 1))[0] == 2


async def test_kafka_unavailable_answers_503(make_receiver: MakeReceiver) -> None:
    """Nothing listening at the bootstrap address: webhooks 503, /readyz 503, /healthz 200."""
    settings = settings_for(f"127.0.0.1:{free_port()}", "feedback")
    receiver = await make_receiver(settings, wait_ready=False)
    body = webhook()
    status, answer = await post(receiver.url, body, signed(body))
    assert (status, answer["outcome"]) == (503, "unavailable")
    base = f"http://127.0.0.1:{receiver.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/readyz") as ready:
            assert ready.status == 503
            assert "broker_unreachable" in (await ready.json())["reasons"]
        async with session.get(base + "/healthz") as live:
            assert live.status == 200
        async with session.get(base + "/metrics") as metrics:
            text = await metrics.text()
    assert 'resend_consumer_webhooks_total{outcome="unavailable"' in text


async def test_sandbox_posts_signed_webhooks_end_to_end(
    kafka_bootstrap: str, new_topic: NewTopicFactory, make_receiver: MakeReceiver
) -> None:
    """Sandbox -> receiver -> Kafka: sent, then delivered, bounced or complained as Resend does."""
    topic = await new_topic()
    receiver = await make_receiver(settings_for(kafka_bootstrap, topic))
    config = SandboxConfig(
        rate_limit=1000.0, webhook_url=receiver.url, webhook_secret=SECRET, webhook_time_scale=0.001
    )
    async with Sandbox(config=config) as sandbox:
        ids = {}
        async with aiohttp.ClientSession() as session:
            for to in ("jane@example.com", "bounced@resend.dev", "complained@resend.dev"):
                email = {
                    "from": "a@acme.test",
                    "to": [to],
                    "subject": "hi",
                    "text": "x",
                    "tags": [{"name": "rc_event", "value": "abc"}],
                }
                answer = await send(session, sandbox, email)
                assert answer.status == 200
                ids[to] = answer.json()["id"]
        records = await read_all(kafka_bootstrap, topic, 6)
        async with asyncio.timeout(10):
            while sandbox.webhooks_pending:
                await asyncio.sleep(0.02)
        posts = sandbox.webhook_posts()
    events = [orjson.loads(r.value) for r in records]
    by_email: dict[str, list[str]] = {}
    for event in events:
        by_email.setdefault(event["subject"], []).append(event["type"])
    p = TYPE_PREFIX
    assert by_email[ids["jane@example.com"]] == [p + "email.sent", p + "email.delivered"]
    assert by_email[ids["bounced@resend.dev"]] == [p + "email.sent", p + "email.bounced"]
    assert by_email[ids["complained@resend.dev"]] == [p + "email.sent", p + "email.complained"]
    assert all(e["sourceeventhash"] == "abc" for e in events)
    assert len(posts) == 6
    assert all(post.answers == [200] for post in posts)
    assert {e["id"] for e in events} == {post.id for post in posts}


async def test_webhooks_command_exits_0_on_sigterm(
    kafka_bootstrap: str, new_topic: NewTopicFactory, tmp_path: Path
) -> None:
    """`resend-consumer webhooks` as a child: serves, produces, exits 0 on SIGTERM."""
    topic = await new_topic()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RESEND_WEBHOOK_SECRET_FILE": str(secret_file),
        "FEEDBACK_TOPIC": topic,
        "WEBHOOK_HOST": "127.0.0.1",
        "WEBHOOK_PORT": str(port),
        "LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "webhooks",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + "/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        body = webhook()
        status, _ = await post(url + WEBHOOK_PATH, body, signed(body))
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert b"service.stopped" in out
    assert SECRET.encode() not in out + err
    assert (await end_offsets(kafka_bootstrap, topic, 1))[0] == 1


def test_webhook_secrets_parse_and_never_show() -> None:
    """Several whsec_ secrets, space or comma separated; a bad one is refused without echo."""
    s = Settings.from_env({"RESEND_WEBHOOK_SECRET": f"{SECRET} {OTHER},{SECRET}"})
    assert [x.get() for x in s.resend_webhook_secret] == [SECRET, OTHER]
    assert SECRET not in repr(s)
    assert SECRET not in repr(s.resend_webhook_secret)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RESEND_WEBHOOK_SECRET": f"{SECRET} re_notawebhooksecret"})
    assert "secret 2 of 2" in str(info.value)
    assert "re_notawebhooksecret" not in str(info.value)


def test_record_without_email_id_is_keyed_by_webhook_id() -> None:
    """A domain.* webhook has no email id: no subject, the svix-id is the key."""
    body = orjson.dumps({"type": "domain.updated", "created_at": "x", "data": {"id": "d_1"}})
    record = feedback_record("msg_d", body, "structured")
    event = orjson.loads(record.value)
    assert record.key == b"msg_d"
    assert "subject" not in event
    assert "time" not in event
    assert event["type"] == "com.resend.domain.updated"


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_feedback_continues_the_trace_the_email_was_tagged_with(mode: str) -> None:
    """An email tagged `rc_trace` (the producer's trace context) comes back as a record
    carrying that traceparent: the plain header instrumentation reads, and the
    CloudEvents tracing extension attribute."""
    data = {
        "email_id": "em_1",
        "tags": {"rc_event": "e" * 32, "rc_trace": f"{TRACE_ID}-{PARENT_ID}"},
    }
    body = orjson.dumps({"type": "email.delivered", "created_at": "x", "data": data})
    record = feedback_record("msg_t", body, mode)  # type: ignore[arg-type]
    headers = dict(record.headers)
    expected = f"00-{TRACE_ID}-{PARENT_ID}-01"
    assert headers["traceparent"] == expected.encode()
    if mode == "binary":
        assert headers["ce_traceparent"] == expected.encode()
    else:
        assert orjson.loads(record.value)["traceparent"] == expected


@pytest.mark.parametrize(
    "value", [None, "", "nothex", f"{'0' * 32}-{PARENT_ID}", f"{TRACE_ID}-{'0' * 16}", TRACE_ID]
)
def test_feedback_ignores_a_trace_tag_that_is_not_one(value: str | None) -> None:
    tags = {"rc_event": "e" * 32} if value is None else {"rc_trace": value}
    body = orjson.dumps({"type": "email.sent", "data": {"email_id": "em_2", "tags": tags}})
    record = feedback_record("msg_u", body, "binary")
    names = {name for name, _ in record.headers}
    assert "traceparent" not in names
    assert "ce_traceparent" not in names
