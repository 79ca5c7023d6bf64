"""Delivery feedback: Resend's webhooks become CloudEvents on a Kafka topic.

`resend-consumer webhooks` serves `POST /webhooks/resend` beside `/healthz`,
`/readyz` and `/metrics` on WEBHOOK_HOST:WEBHOOK_PORT. Each request goes:

    size (WEBHOOK_MAX_BYTES) -> svix headers -> signature and timestamp
    -> JSON -> dedup window -> one CloudEvent produced to FEEDBACK_TOPIC
    -> 200 only once Kafka acknowledged it (acks=all, idempotent producer)

Answers: 200 produced (or a repeat of an id already produced); 400 body too
large, not JSON, not a webhook, missing or malformed svix headers; 401 bad
signature or a timestamp outside 5 minutes; 503 Kafka not connected, or no ack
within WEBHOOK_PRODUCE_TIMEOUT (Resend retries a non-2xx for about a day).
Nothing is produced for a refused request, and its body is never logged.

Signatures are checked by `standardwebhooks` (the Standard Webhooks reference
code, which Svix signs with); Resend's `svix-*` headers are its `webhook-*`
ones. Every secret of RESEND_WEBHOOK_SECRET is tried, so two can be accepted
during a rotation.

Guarantees: at least once into Kafka for every webhook answered 2xx. Repeats
of one `svix-id` within this process's window of the last
WEBHOOK_DEDUP_WINDOW ids (and concurrent repeats) are produced once; a repeat
after a restart, or after a 503 whose record still reached Kafka, is produced
again with the same CloudEvent `id` and Kafka key, so a consumer drops it by
`id`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson
import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from standardwebhooks import Webhook, WebhookVerificationError

from consumer import __version__
from consumer.errors import SettingsError
from consumer.events import CE_HEADER_PREFIX, CONTENT_TYPE_HEADER
from consumer.exitcodes import EXIT_OK
from consumer.health import HealthServer
from consumer.logs import configure_logging
from consumer.metrics import BUILD_INFO
from consumer.routes import EVENT_TAG, ROUTE_TAG, TRACE_TAG, decode_tag_value
from consumer.settings import FeedbackMode, Settings
from consumer.tracecontext import TRACEPARENT, traceparent_from_tag

__all__ = [
    "SOURCE",
    "TYPE_PREFIX",
    "WEBHOOK_PATH",
    "FeedbackMetrics",
    "Receiver",
    "Refused",
    "Verifier",
    "feedback_record",
    "run_webhooks",
]

log = structlog.get_logger("consumer.feedback")

WEBHOOK_PATH: Final = "/webhooks/resend"
#: CloudEvent `type` = this prefix + Resend's type: `com.resend.email.bounced`
TYPE_PREFIX: Final = "com.resend."
#: CloudEvent `source` of every feedback event
SOURCE: Final = "https://resend.com/webhooks"
#: extension attributes carrying the email's join tags (see consumer.routes.source_tags)
EXT_EVENT: Final = "sourceeventhash"
EXT_ROUTE: Final = "sourceroute"
STRUCTURED_TYPE: Final = b"application/cloudevents+json"
JSON_TYPE: Final = b"application/json"
#: seconds between attempts to connect the producer while Kafka is unreachable
CONNECT_BACKOFF: Final = (0.5, 15.0)
#: a source refused again within this many seconds is counted, not logged again
REFUSAL_LOG_INTERVAL: Final = 60.0
_MAX_SOURCES: Final = 4096

WebhookOutcome = Literal["produced", "duplicate", "unauthorized", "bad_request", "unavailable"]

_P: Final = "resend_consumer_"
WEBHOOKS: Final = _P + "webhooks"
PRODUCE_LATENCY: Final = _P + "webhook_produce_seconds"
PRODUCER_CONNECTED: Final = _P + "webhook_producer_connected"
#: every family the receiver exposes on /metrics
FEEDBACK_METRIC_NAMES: Final = (
    WEBHOOKS + "_total",
    PRODUCE_LATENCY,
    PRODUCER_CONNECTED,
    BUILD_INFO,
)


class FeedbackMetrics:
    """The receiver's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.webhooks = Counter(
            WEBHOOKS, "Webhook requests by how they were answered.", ["outcome", "type"], registry=r
        )
        self.produce_latency = Histogram(
            PRODUCE_LATENCY, "Time from a verified webhook to Kafka's ack.", registry=r
        )
        self.producer_connected = Gauge(
            PRODUCER_CONNECTED, "1 while the feedback producer is connected.", registry=r
        )
        build = Gauge(BUILD_INFO, "Always 1; the version as a label.", ["version"], registry=r)
        build.labels(version=__version__).set(1)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class Refused(Exception):
    """A webhook answered 4xx: `status` and a stable `reason` (a log field, never the body)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Verifier:
    """Svix signatures against every configured secret; 5 minutes of timestamp tolerance."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        if not secrets:
            raise SettingsError("RESEND_WEBHOOK_SECRET (or RESEND_WEBHOOK_SECRET_FILE) is not set")
        self._hooks = tuple(Webhook(s) for s in secrets)

    def __repr__(self) -> str:
        return f"<Verifier secrets={len(self._hooks)}>"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """The verified `svix-id`, or Refused(400 | 401, reason)."""
        svix = {name: headers.get(f"svix-{name}") for name in ("id", "timestamp", "signature")}
        if not all(svix.values()):
            raise Refused(400, "missing_headers")
        try:
            body.decode()
        except UnicodeDecodeError:
            raise Refused(400, "not_json") from None
        std = {f"webhook-{name}": value for name, value in svix.items() if value is not None}
        reason = "bad_signature"
        for hook in self._hooks:
            try:
                hook.verify(body, std, json_parse=False)
            except WebhookVerificationError as exc:
                text = str(exc)
                if "timestamp" in text:
                    # checked before the signature, the same for every secret
                    raise Refused(401, "stale_timestamp") from None
                if "Headers" in text:
                    raise Refused(400, "bad_timestamp") from None
            except ValueError:  # a signature list that is not `v1,<base64>` ...
                reason = "malformed_signature"
            else:
                assert svix["id"] is not None
                return svix["id"]
        raise Refused(401, reason)


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One CloudEvent as a Kafka record."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    event_type: str


def _time(value: Any) -> str | None:
    """Resend's `created_at` as RFC 3339 UTC, or None when it is not a timestamp."""
    if not isinstance(value, str):
        return None
    text = value.strip().replace(" ", "T", 1)
    if text.endswith(("+00", "-00")):
        text += ":00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _tags(data: Mapping[str, Any]) -> dict[str, str]:
    """Resend's `data.tags`, a list of {name, value} or an object, as a plain mapping."""
    tags = data.get("tags")
    if isinstance(tags, Mapping):
        return {str(k): v for k, v in tags.items() if isinstance(v, str)}
    out: dict[str, str] = {}
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, Mapping) and isinstance(tag.get("value"), str):
                out[str(tag.get("name"))] = tag["value"]
    return out


def feedback_record(webhook_id: str, body: bytes, mode: FeedbackMode) -> FeedbackRecord:
    """A verified webhook body -> its CloudEvent record; Refused(400) when it is not one.

    Key and `subject`: the Resend email id (per-email order on one partition);
    events without one (`contact.*`, `domain.*`) are keyed by the webhook id.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused(400, "not_json") from None
    if not isinstance(payload, dict):
        raise Refused(400, "not_a_webhook")
    kind, data = payload.get("type"), payload.get("data")
    if not isinstance(kind, str) or not kind or not isinstance(data, dict):
        raise Refused(400, "not_a_webhook")
    email_id = data.get("email_id")
    subject = email_id if isinstance(email_id, str) and email_id else None
    attrs: dict[str, str] = {
        "specversion": "1.0",
        "id": webhook_id,
        "source": SOURCE,
        "type": TYPE_PREFIX + kind,
    }
    if subject is not None:
        attrs["subject"] = subject
    when = _time(payload.get("created_at"))
    if when is not None:
        attrs["time"] = when
    tags = _tags(data)
    if EVENT_TAG in tags:
        attrs[EXT_EVENT] = tags[EVENT_TAG]
    route = decode_tag_value(tags[ROUTE_TAG]) if ROUTE_TAG in tags else None
    if route is not None:
        attrs[EXT_ROUTE] = route
    # the send's trace (the producer's context the email was tagged with): the
    # CloudEvents tracing extension, and the plain header instrumentation reads
    traceparent = traceparent_from_tag(tags.get(TRACE_TAG))
    trace_headers: list[tuple[str, bytes]] = []
    if traceparent is not None:
        attrs[TRACEPARENT] = traceparent
        trace_headers.append((TRACEPARENT, traceparent.encode()))
    key = (subject or webhook_id).encode()
    if mode == "binary":
        headers = [(CE_HEADER_PREFIX + name, value.encode()) for name, value in attrs.items()]
        headers.append((CONTENT_TYPE_HEADER, JSON_TYPE))
        return FeedbackRecord(key, orjson.dumps(data), [*headers, *trace_headers], kind)
    envelope = {**attrs, "datacontenttype": "application/json", "data": data}
    value = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
    headers = [(CONTENT_TYPE_HEADER, STRUCTURED_TYPE), *trace_headers]
    return FeedbackRecord(key, value, headers, kind)


class _Window:
    """Recently produced webhook ids (LRU, bounded) and the ids being produced now."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._done: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, asyncio.Future[bool]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def seen(self, webhook_id: str) -> bool:
        if webhook_id in self._done:
            self._done.move_to_end(webhook_id)
            return True
        return False

    def pending(self, webhook_id: str) -> asyncio.Future[bool] | None:
        return self._pending.get(webhook_id)

    def begin(self, webhook_id: str) -> None:
        self._pending[webhook_id] = asyncio.get_running_loop().create_future()

    def end(self, webhook_id: str, produced: bool) -> None:
        future = self._pending.pop(webhook_id)
        future.set_result(produced)
        if produced:
            self._done[webhook_id] = None
            if len(self._done) > self.size:
                self._done.popitem(last=False)


class Receiver:
    """The webhook receiver: HTTP server, verifier, dedup window and producer.

    `start()` binds the server at once and connects the producer in the
    background (webhooks get 503 until it is connected); `stop()` stops
    accepting, lets requests in progress finish, and closes the producer.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        verifier: Verifier | None = None,
        metrics: FeedbackMetrics | None = None,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier or Verifier(tuple(s.get() for s in settings.resend_webhook_secret))
        self.metrics = metrics or FeedbackMetrics()
        self._producer = producer
        self._connected = False
        self._stopping = False
        self._connector: asyncio.Task[None] | None = None
        self._window = _Window(settings.webhook_dedup_window)
        self._refusals: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self.counts: dict[str, int] = dict.fromkeys(
            ("produced", "duplicate", "unauthorized", "bad_request", "unavailable"), 0
        )
        self.server = HealthServer(
            health=self,
            metrics=self.metrics,
            host=settings.webhook_host,
            port=settings.webhook_port,
            routes=[web.post(WEBHOOK_PATH, self._post)],
            client_max_size=settings.webhook_max_bytes,
            settings=("WEBHOOK_HOST", "WEBHOOK_PORT"),
        )

    def __repr__(self) -> str:
        c = self.counts
        return (
            f"<Receiver connected={self._connected} produced={c['produced']} "
            f"duplicate={c['duplicate']} refused={c['unauthorized'] + c['bad_request']} "
            f"unavailable={c['unavailable']} window={len(self._window)}>"
        )

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        host = self.settings.webhook_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - compared, not bound
            host = "127.0.0.1"
        return f"http://{host}:{self.port}{WEBHOOK_PATH}"

    # -- probes (HealthServer asks) -----------------------------------------------

    def live(self) -> tuple[bool, dict[str, Any]]:
        """The loop answers: that is all liveness means here (Kafka trouble is readiness)."""
        return True, {"live": True}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self._stopping:
            reasons.append("stopping")
        if not self._connected:
            reasons.append("broker_unreachable")
        ok = not reasons
        return ok, {"ready": ok, "reasons": reasons, "broker_ok": self._connected}

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.server.start()
        self._connector = asyncio.create_task(self._connect(), name="feedback-producer")

    async def stop(self) -> None:
        self._stopping = True
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.cancel()
            try:
                await connector
            except asyncio.CancelledError:
                if not connector.cancelled():  # this task itself was cancelled
                    raise
        await self.server.stop()  # requests in progress finish first
        if self._producer is not None:
            await self._producer.stop()
        self._connected = False
        self.metrics.producer_connected.set(0)

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _make_producer(self) -> AIOKafkaProducer:
        s = self.settings
        timeout_ms = max(1000, int(s.webhook_produce_timeout * 1000))
        return AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=timeout_ms,
            max_request_size=max(1_048_576, s.webhook_max_bytes * 2 + 65_536),
            **s.kafka_client_kwargs(),
        )

    async def _connect(self) -> None:
        delay, cap = CONNECT_BACKOFF
        warned = False
        while True:
            producer = self._producer or self._make_producer()
            try:
                await producer.start()
            except KafkaError as exc:
                await producer.stop()
                self._producer = None
                if not warned:
                    log.warning(
                        "feedback.broker_unreachable",
                        bootstrap=self.settings.kafka_bootstrap_servers,
                        error=type(exc).__name__,
                    )
                    warned = True
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)
                continue
            self._producer = producer
            self._connected = True
            self.metrics.producer_connected.set(1)
            log.info("feedback.broker_reachable", topic=self.settings.feedback_topic)
            return

    # -- the endpoint -------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and (
            request.content_length > self.settings.webhook_max_bytes
        ):
            return self._refuse(request, Refused(400, "too_large"))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, Refused(400, "too_large"))
        try:
            webhook_id = self.verifier.verify(body, request.headers)
            record = feedback_record(webhook_id, body, self.settings.feedback_mode)
        except Refused as refused:
            return self._refuse(request, refused)
        return await self._produce_once(webhook_id, record)

    async def _produce_once(self, webhook_id: str, record: FeedbackRecord) -> web.Response:
        while True:
            if self._window.seen(webhook_id):
                return self._answer(200, "duplicate", record.event_type)
            pending = self._window.pending(webhook_id)
            if pending is None:
                break
            # the same id is being produced now: its result decides this one
            await asyncio.shield(pending)
        if not self._connected or self._producer is None:
            return self._answer(503, "unavailable", record.event_type)
        self._window.begin(webhook_id)
        produced = False
        started = time.perf_counter()
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self.settings.feedback_topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                ),
                timeout=self.settings.webhook_produce_timeout,
            )
            produced = True
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "feedback.produce_failed",
                topic=self.settings.feedback_topic,
                webhook_id=webhook_id,
                error=type(exc).__name__,
            )
            return self._answer(503, "unavailable", record.event_type)
        finally:
            self._window.end(webhook_id, produced)
        self.metrics.produce_latency.observe(time.perf_counter() - started)
        return self._answer(200, "produced", record.event_type)

    def _answer(self, status: int, outcome: WebhookOutcome, event_type: str) -> web.Response:
        self.counts[outcome] += 1
        self.metrics.webhooks.labels(outcome=outcome, type=_label(event_type)).inc()
        body = {"ok": status < 300, "outcome": outcome}
        return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())

    def _refuse(self, request: web.Request, refused: Refused) -> web.Response:
        outcome: WebhookOutcome = "unauthorized" if refused.status == 401 else "bad_request"
        source = request.remote or "unknown"
        now = time.monotonic()
        key = (source, refused.reason)
        last, suppressed = self._refusals.pop(key, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "feedback.refused",
                source=source,
                reason=refused.reason,
                status=refused.status,
                suppressed=suppressed,
            )
            last, suppressed = now, 0
        else:
            suppressed += 1
        self._refusals[key] = (last, suppressed)
        if len(self._refusals) > _MAX_SOURCES:
            self._refusals.popitem(last=False)
        self.counts[outcome] += 1
        self.metrics.webhooks.labels(outcome=outcome, type="").inc()
        body = {"ok": False, "outcome": outcome, "reason": refused.reason}
        return web.json_response(
            body, status=refused.status, dumps=lambda o: orjson.dumps(o).decode()
        )


_KNOWN_PREFIXES: Final = ("email.", "contact.", "domain.")


def _label(event_type: str) -> str:
    """Only Resend's families become metric labels: a sender cannot invent series."""
    known = event_type.startswith(_KNOWN_PREFIXES) and len(event_type) < 40
    return event_type if known else "other"


async def run_webhooks(settings: Settings, stop: asyncio.Event) -> int:
    """`resend-consumer webhooks`: serve until stop, finish requests in progress, exit 0."""
    configure_logging(settings)
    receiver = Receiver(settings=settings)
    await receiver.start()
    try:
        log.info(
            "service.started",
            version=__version__,
            command="webhooks",
            listen=f"{settings.webhook_host}:{receiver.port}",
            path=WEBHOOK_PATH,
            topic=settings.feedback_topic,
            mode=settings.feedback_mode,
            secrets=len(settings.resend_webhook_secret),
        )
        await stop.wait()
        log.info("service.stopping", command="webhooks")
    finally:
        await receiver.stop()
    log.info("service.stopped", command="webhooks", **receiver.counts)
    return EXIT_OK
