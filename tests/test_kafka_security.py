"""Kafka security settings against a real broker: TLS, mutual TLS, SASL PLAIN and SCRAM.

Every client here is built only from `Settings.kafka_client_kwargs()`, the same
way the service builds its consumer, dead-letter producer and admin clients.
The broker is the `secure_kafka` session broker (`broker.py start --secure`):
a throwaway CA, one user known to PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from consumer.errors import SettingsError
from consumer.sandbox import Sandbox, SandboxConfig
from consumer.service import run_service
from consumer.settings import SaslMechanism, Secret, SecurityProtocol, Settings
from tests.conftest import SecureKafka, unique_name
from tests.pipeline_support import (
    API_KEY,
    ServiceProcess,
    committed,
    email_key,
    order_records,
    pipeline_settings,
    wait_for,
)

pytestmark = pytest.mark.kafka

WRONG_PASSWORD = "wrong-Pa55word-do-not-print"


def secure_settings(
    kafka: SecureKafka,
    protocol: SecurityProtocol,
    mechanism: SaslMechanism | None = None,
    *,
    listener: str | None = None,
    password: str | None = None,
    client_cert: bool = False,
    **overrides: Any,
) -> Settings:
    """Settings for `protocol` on the matching listener of the secure broker."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka.listeners[listener or protocol],
        "kafka_security_protocol": protocol,
        "kafka_client_id": "security-test",
    }
    if protocol in ("SSL", "SASL_SSL"):
        values["kafka_ssl_cafile"] = kafka.ca_file
    if client_cert:
        values["kafka_ssl_certfile"] = kafka.client_cert_file
        values["kafka_ssl_keyfile"] = kafka.client_key_file
    if protocol.startswith("SASL"):
        values["kafka_sasl_mechanism"] = mechanism
        values["kafka_sasl_username"] = kafka.username
        values["kafka_sasl_password"] = Secret(password or kafka.password)
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def topic_over(settings: Settings, partitions: int = 1) -> AsyncIterator[str]:
    """A fresh topic created (and deleted afterwards) by an admin client from `settings`."""
    name = unique_name("sec")
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
        try:
            yield name
        finally:
            await admin.delete_topics([name])
    finally:
        await admin.close()


async def produce_over(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        enable_idempotence=True, acks="all", **settings.kafka_client_kwargs()
    )
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


ROUND_TRIPS = [
    pytest.param("SSL", None, "SSL", False, id="SSL"),
    pytest.param("SSL", None, "MTLS", True, id="SSL-client-certificate"),
    pytest.param("SASL_PLAINTEXT", "PLAIN", "SASL_PLAINTEXT", False, id="SASL_PLAINTEXT-PLAIN"),
    pytest.param(
        "SASL_PLAINTEXT", "SCRAM-SHA-256", "SASL_PLAINTEXT", False, id="SASL_PLAINTEXT-SCRAM-256"
    ),
    pytest.param("SASL_SSL", "SCRAM-SHA-512", "SASL_SSL", False, id="SASL_SSL-SCRAM-512"),
    pytest.param("SASL_SSL", "SCRAM-SHA-256", "SASL_SSL", False, id="SASL_SSL-SCRAM-256"),
    pytest.param("SASL_SSL", "PLAIN", "SASL_SSL", False, id="SASL_SSL-PLAIN"),
]


@pytest.mark.parametrize(("protocol", "mechanism", "listener", "client_cert"), ROUND_TRIPS)
async def test_admin_producer_and_group_consumer_work_from_settings(
    secure_kafka: SecureKafka,
    protocol: SecurityProtocol,
    mechanism: SaslMechanism | None,
    listener: str,
    client_cert: bool,
) -> None:
    """Topic creation, idempotent produce, group consume and commit all work over the protocol."""
    settings = secure_settings(
        secure_kafka, protocol, mechanism, listener=listener, client_cert=client_cert
    )
    async with topic_over(settings, partitions=2) as topic:
        sent = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(6)]
        await produce_over(settings, topic, sent)
        consumer = AIOKafkaConsumer(
            topic,
            group_id=unique_name("g"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **settings.kafka_client_kwargs(),
        )
        await consumer.start()
        try:
            got: list[tuple[bytes, bytes]] = []
            while len(got) < len(sent):
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 20)
                got.extend((r.key or b"", r.value or b"") for rs in batch.values() for r in rs)
            await consumer.commit()
            offsets = [await consumer.committed(TopicPartition(topic, p)) for p in (0, 1)]
        finally:
            await consumer.stop()
    assert sorted(got) == sorted(sent)
    assert sum(o or 0 for o in offsets) == len(sent)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_wrong_password_fails_with_authentication_reason_and_no_password(
    secure_kafka: SecureKafka, mechanism: SaslMechanism, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password cannot connect; the log names the SASL failure; no password shows."""
    settings = secure_settings(secure_kafka, "SASL_SSL", mechanism, password=WRONG_PASSWORD)
    producer = AIOKafkaProducer(**settings.kafka_client_kwargs())
    with caplog.at_level(logging.ERROR, logger="aiokafka"):
        try:
            with pytest.raises(KafkaConnectionError) as failed:
                await producer.start()
        finally:
            await producer.stop()
    reasons = [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]
    assert any("SaslAuthenticationFailed" in m and "Authentication failed" in m for m in reasons)
    shown = " ".join([str(failed.value), repr(failed.value), caplog.text, repr(settings)])
    assert WRONG_PASSWORD not in shown
    assert secure_kafka.password not in shown
    assert WRONG_PASSWORD not in str(settings)


async def test_service_with_wrong_password_exits_and_logs_reason_without_password(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    """`resend-consumer run` with a wrong SCRAM password exits non-zero, says why, hides it."""
    settings = pipeline_settings(
        secure_kafka.listeners["SASL_SSL"],
        "never-read",
        "http://127.0.0.1:9",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=secure_kafka.username,
        kafka_sasl_password=Secret(WRONG_PASSWORD),
        kafka_ssl_cafile=secure_kafka.ca_file,
    )
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        code = await service.wait(60)
    finally:
        service.ensure_dead()
    log = service.output()
    assert code == 1
    assert "Authentication failed" in log
    assert "SCRAM-SHA-512" in log
    assert "[kafka_unavailable]" in log
    assert "Traceback" not in log
    assert WRONG_PASSWORD not in log


async def test_tls_is_verified_against_the_ca_not_trusted_blindly(
    secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the broker's CA (system CAs only) the TLS handshake is refused."""
    settings = Settings(
        kafka_bootstrap_servers=secure_kafka.listeners["SSL"], kafka_security_protocol="SSL"
    )
    context = settings.kafka_client_kwargs()["ssl_context"]
    assert context.check_hostname
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    with caplog.at_level(logging.ERROR, logger="aiokafka"):
        try:
            with pytest.raises(KafkaConnectionError):
                await admin.start()
        finally:
            await admin.close()
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_mutual_tls_listener_refuses_a_client_without_certificate(
    secure_kafka: SecureKafka,
) -> None:
    """The client-certificate listener rejects a CA-only client: the cert settings count."""
    settings = secure_settings(secure_kafka, "SSL", listener="MTLS", client_cert=False)
    admin = AIOKafkaAdminClient(**settings.kafka_client_kwargs())
    try:
        with pytest.raises(KafkaConnectionError):
            await admin.start()
    finally:
        await admin.close()


def test_settings_refuse_credentials_the_protocol_would_ignore() -> None:
    """SASL credentials or TLS files with a protocol that ignores them are a SettingsError."""
    with pytest.raises(SettingsError, match=r"KAFKA_SASL_USERNAME.*SASL_SSL") as sasl:
        Settings.from_env(
            {"KAFKA_SASL_USERNAME": "alice", "KAFKA_SASL_PASSWORD": WRONG_PASSWORD},
        )
    assert WRONG_PASSWORD not in str(sasl.value)
    with pytest.raises(SettingsError, match="KAFKA_SSL_CAFILE"):
        Settings(kafka_security_protocol="PLAINTEXT", kafka_ssl_cafile=Path("ca.pem"))
    with pytest.raises(SettingsError, match="KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_keyfile=Path("client.key"))


def test_unreadable_tls_files_are_settings_errors_naming_the_variable(tmp_path: Path) -> None:
    """A missing CA file or a non-PEM certificate names its variable instead of an ssl traceback."""
    missing = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "nope.pem")
    with pytest.raises(SettingsError, match="KAFKA_SSL_CAFILE: cannot load"):
        missing.kafka_client_kwargs()
    garbage = tmp_path / "client.pem"
    garbage.write_text("not a certificate\n")
    bad_cert = Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=garbage)
    with pytest.raises(SettingsError, match="KAFKA_SSL_CERTFILE"):
        bad_cert.kafka_client_kwargs()


async def test_service_consumes_and_delivers_over_sasl_ssl_scram_sha_512(
    secure_kafka: SecureKafka,
) -> None:
    """The real service reads events over SASL_SSL + SCRAM-SHA-512, delivers each, commits all."""
    n = 5
    sb = Sandbox(config=SandboxConfig(api_key=API_KEY, rate_limit=100_000.0))
    await sb.start(host="127.0.0.1", port=0)
    try:
        security = secure_settings(secure_kafka, "SASL_SSL", "SCRAM-SHA-512")
        async with topic_over(security, partitions=2) as topic:
            await produce_over(security, topic, [(k, v) for k, v, _ in order_records(range(n))])
            settings = pipeline_settings(
                security.kafka_bootstrap_servers,
                topic,
                sb.url,
                kafka_security_protocol="SASL_SSL",
                kafka_sasl_mechanism="SCRAM-SHA-512",
                kafka_sasl_username=security.kafka_sasl_username,
                kafka_sasl_password=security.kafka_sasl_password,
                kafka_ssl_cafile=security.kafka_ssl_cafile,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(run_service(settings, stop))
            try:
                await wait_for(lambda: len(sb.deliveries()) >= n, 30, f"{n} deliveries")

                async def all_committed() -> bool:
                    offsets = await committed(secure_kafka.plaintext, settings.kafka_group_id)
                    return sum(offsets.values()) == n

                await wait_for(all_committed, 20, "every offset committed")
            finally:
                stop.set()
                code = await asyncio.wait_for(task, 60)
    finally:
        await sb.stop()
    assert code == 0
    keys = [email_key(d) for d in sb.deliveries()]
    assert len(keys) == len(set(keys)) == n
