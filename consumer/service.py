"""Service wiring: builds every part of `resend-consumer run` from `Settings`.

The pipeline (`consumer.pipeline`) is the Kafka driver and takes its clients
from outside; this module makes the real ones (aiokafka consumer, dead-letter
producer and committer, the Resend client) and the observers that feed
readiness and metrics from the gate and the client.
"""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer import __version__
from consumer.committer import Committer, ConsumerCommitter, PartitionCommitter
from consumer.deadletter import DeadLetterWriter
from consumer.errors import KafkaUnavailable, SettingsError
from consumer.exitcodes import EXIT_OK
from consumer.health import Health, HealthServer
from consumer.logs import LogEvent, configure_logging
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.prepare import Preparer
from consumer.ratelimit import RateLimiter
from consumer.resend import RULES, Answer, ResendClient
from consumer.retry import GateCondition, GateState, OnChange, RetryPolicy, ServiceGate
from consumer.settings import Settings
from consumer.tracing import NO_TRACER, Tracer, tracer_from_env

log = structlog.get_logger("consumer.service")

KNOWN_ERROR_NAMES: Final = frozenset(rule.name for rule in RULES if rule.name is not None)
GATE_CONDITIONS: Final = ("auth", "endpoint", "quota_daily", "quota_monthly", "outage")
#: the largest single fetch, whatever MAX_PENDING_BYTES allows (aiokafka's default)
FETCH_MAX_BYTES: Final = 52_428_800


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The group member: manual commits, read_committed, fetches bounded in bytes."""
    s = settings
    return AIOKafkaConsumer(
        group_id=s.kafka_group_id,
        group_instance_id=s.kafka_group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset=s.kafka_auto_offset_reset,
        session_timeout_ms=int(s.kafka_session_timeout * 1000),
        heartbeat_interval_ms=int(s.kafka_heartbeat_interval * 1000),
        rebalance_timeout_ms=int(s.kafka_rebalance_timeout * 1000),
        max_poll_interval_ms=int(s.kafka_max_poll_interval * 1000),
        # one fetch stays well inside the memory bound (compressed size; see the README)
        fetch_max_bytes=max(1_048_576, min(FETCH_MAX_BYTES, s.max_pending_bytes // 4)),
        # a transactional producer's aborted events must never become emails
        isolation_level="read_committed",
        **s.kafka_client_kwargs(),
    )


def dead_letter_request_size(settings: Settings) -> int:
    """A dead letter is the original record plus a few hundred bytes of headers."""
    return max(1_048_576, settings.max_event_bytes + 65_536)


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """The dead-letter producer without transactions (KAFKA_TRANSACTIONS=false)."""
    return AIOKafkaProducer(
        enable_idempotence=True,
        acks="all",
        request_timeout_ms=15_000,
        max_request_size=dead_letter_request_size(settings),
        **settings.kafka_client_kwargs(),
    )


def commit_timeout(settings: Settings) -> float:
    """A commit must fit in what is left of the rebalance timeout after a drain."""
    return max(1.0, min(10.0, (settings.kafka_rebalance_timeout - settings.drain_timeout) / 2))


def gate_observer(health: Health, metrics: Metrics) -> OnChange:
    """The service gate's on_change: readiness and the circuit metric follow its state.

    Only the gate's own condition is closed again: a dead-letter outage reported
    beside it stays open until the dead-letter topic is writable.
    """
    current: list[str | None] = [None]

    def on_change(old: GateState, new: GateState, condition: GateCondition | None) -> None:
        previous = current[0]
        if previous is not None and (new == "closed" or previous != condition):
            health.set_circuit(False, previous)
        current[0] = condition if new != "closed" else None
        if new != "closed":
            health.set_circuit(True, condition)
        for name in GATE_CONDITIONS:
            metrics.circuit_open.labels(condition=name).set(
                1 if new != "closed" and condition == name else 0
            )

    return on_change


def observe_client(client: ResendClient, metrics: Metrics, limiter: RateLimiter) -> None:
    """Feed the client's answers and rate-limit waits into the metrics."""

    sends: dict[str, Any] = {}

    def on_answer(answer: Answer, seconds: float) -> None:
        status = str(answer.status) if answer.status is not None else "transport"
        child = sends.get(status)
        if child is None:
            child = sends[status] = metrics.sends.labels(status=status)
        child.inc()
        metrics.send_latency.observe(seconds)
        if answer.verdict == "retry":
            # only names of the contract's table become labels: servers may invent others
            name = answer.error_name
            metrics.retries.labels(reason=name if name in KNOWN_ERROR_NAMES else status).inc()
        metrics.ratelimit_rate.set(limiter.rate)

    def on_rate_wait(seconds: float) -> None:
        metrics.ratelimit_wait.observe(seconds)

    client.on_answer = on_answer
    client.on_rate_wait = on_rate_wait


def _unavailable(settings: Settings, exc: BaseException) -> KafkaUnavailable:
    s = settings
    how: str = s.kafka_security_protocol
    if s.kafka_sasl_mechanism:
        how += f" {s.kafka_sasl_mechanism} as {s.kafka_sasl_username}"
    return KafkaUnavailable(
        f"cannot start the Kafka clients for {s.kafka_bootstrap_servers} ({how}): "
        f"{type(exc).__name__}; check the address, TLS files and SASL credentials"
    )


async def run_pipeline(
    settings: Settings,
    stop: asyncio.Event,
    *,
    preparer: Preparer,
    client: ResendClient,
    gate: ServiceGate,
    policy: RetryPolicy,
    metrics: Metrics,
    health: Health,
    ready: Any = None,
    tracer: Tracer = NO_TRACER,
) -> Pipeline:
    """Make the Kafka clients, run a pipeline until stop, close them; returns the pipeline.

    `ready(pipeline)`, when given, is called once the pipeline exists (tests look inside).
    """
    consumer = make_consumer(settings)
    secrets = (settings.resend_api_key, settings.kafka_sasl_password)
    timeout = commit_timeout(settings)
    producer: AIOKafkaProducer | None = None
    committer: Committer
    if settings.kafka_transactions:
        committer = PartitionCommitter(
            client=settings.kafka_client_kwargs(),
            group_id=settings.kafka_group_id,
            topic_for=settings.dlq_topic_for,
            secrets=secrets,
            timeout=timeout,
            init_timeout=timeout,
            max_request_size=dead_letter_request_size(settings),
        )
    else:
        producer = make_producer(settings)
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise _unavailable(settings, exc) from None
        writer = DeadLetterWriter(
            producer=producer,
            topic_for=settings.dlq_topic_for,
            # letters are written by the commit that covers them: within its time budget
            timeout=timeout,
            secrets=secrets,
        )
        committer = ConsumerCommitter(consumer=consumer, writer=writer, timeout=timeout)
    pipeline = Pipeline(
        settings=settings,
        preparer=preparer,
        client=client,
        gate=gate,
        policy=policy,
        metrics=metrics,
        health=health,
        consumer=consumer,
        committer=committer,
        tracer=tracer,
    )
    metrics.observe_oldest_events(pipeline.oldest_events)
    if ready is not None:
        ready(pipeline)
    try:
        await pipeline.run(stop)
    except KafkaError as exc:
        raise _unavailable(settings, exc) from None
    finally:
        if producer is not None:
            await producer.stop()
    return pipeline


async def run_service(settings: Settings, stop: asyncio.Event) -> int:
    """`resend-consumer run`: build every part from settings, run until stop, drain, exit 0."""
    configure_logging(settings)
    if settings.resend_api_key is None:
        raise SettingsError(
            "RESEND_API_KEY (or RESEND_API_KEY_FILE) is not set; for a local run without a "
            "Resend account use `resend-consumer quickstart` or point RESEND_BASE_URL at "
            "`resend-consumer sandbox` with any key"
        )
    preparer = Preparer.from_settings(settings)
    metrics = Metrics()
    health = Health(liveness_window=max(60.0, settings.kafka_max_poll_interval / 2))
    metrics.max_event_age.set(settings.max_event_age)
    metrics.observe_readiness(lambda: health.ready()[0])
    gate = ServiceGate(
        probe_initial=settings.probe_initial,
        probe_max=settings.probe_max,
        on_change=gate_observer(health, metrics),
    )
    limiter = RateLimiter(rate=settings.rate_limit)
    policy = RetryPolicy.from_settings(settings)
    # OpenTelemetry is configured by its own standard OTEL_* variables, read here once
    tracer = tracer_from_env(
        os.environ, group=settings.kafka_group_id, resend_base_url=settings.resend_base_url
    )
    server = None
    if settings.health_port:
        server = HealthServer(
            health=health, metrics=metrics, host=settings.health_host, port=settings.health_port
        )
        await server.start()
    try:
        async with ResendClient.from_settings(settings, limiter=limiter) as client:
            observe_client(client, metrics, limiter)
            # Everything loaded so far (routes, compiled templates and validators,
            # clients) lives as long as the process: move it out of the cyclic
            # collector's scans, which otherwise cost about a tenth of each event.
            gc.collect()
            gc.freeze()
            log.info(
                LogEvent.STARTED,
                version=__version__,
                topics=list(settings.kafka_topics),
                group=settings.kafka_group_id,
                resend=settings.resend_base_url,
            )
            await run_pipeline(
                settings,
                stop,
                preparer=preparer,
                client=client,
                gate=gate,
                policy=policy,
                metrics=metrics,
                health=health,
                tracer=tracer,
            )
    finally:
        tracer.shutdown()
        if server is not None:
            await server.stop()
    return EXIT_OK
