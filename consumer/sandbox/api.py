"""Resend's email endpoints: `POST /emails`, `POST /emails/batch`, `GET /emails/{id}`.

Order of checks on the two POSTs, chosen to match what a client of the real
API can observe:

    forced status -> auth -> User-Agent -> 429 storm / token bucket
    -> Idempotency-Key shape -> JSON -> idempotent replay or 409
    -> validation -> [key in flight] latency -> hang / 5xx / quota / accept
    -> [accepted] record, remember key -> answer, or drop the connection

Only accepted sends (2xx) remember their idempotency key, so a retry after a
5xx, 429, hang or validation error with the same key can still succeed. A
dropped answer did send, so its key is remembered and a retry replays it.
Latency applies to every answer of the POSTs, rejections included.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from consumer.ratelimit import HEADER_RETRY_AFTER
from consumer.resend import ENDPOINT_BATCH, ENDPOINT_EMAILS
from consumer.sandbox.config import APPLICATION_ERROR, SERVICE_UNAVAILABLE, Faults, SandboxConfig
from consumer.sandbox.state import (
    Answered,
    Delivery,
    IdempotencyStore,
    IdemScope,
    Ledger,
    Quotas,
    TokenBucket,
    fingerprint,
)
from consumer.sandbox.validation import (
    ApiError,
    batch_shape,
    validate_email,
    validate_idempotency_key,
)

EMAILS: Final = ENDPOINT_EMAILS
BATCH: Final = ENDPOINT_BATCH
JSON_TYPE: Final = "application/json"
_HTML_PAGE: Final = (
    b"<html>\r\n<head><title>{status} Service Temporarily Unavailable</title></head>\r\n"
    b"<body>\r\n<center><h1>{status} Service Temporarily Unavailable</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
#: how often a hanging request checks whether its client gave up
_HANG_POLL: Final = 0.05


class EmailApi:
    """State and handlers of the Resend endpoints; `Sandbox` serves and controls it."""

    def __init__(
        self,
        *,
        config: SandboxConfig,
        stopping: asyncio.Event,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        #: accepted requests so far (names each in the ledger)
        self._requests = 0
        self._clock = clock
        self._wall = wall
        self._stopping = stopping
        self.faults = config.faults
        #: called with every accepted request's deliveries (the webhook sender)
        self.on_accept: Callable[[list[Delivery]], None] | None = None
        self.ledger = Ledger(max_deliveries=config.max_deliveries)
        self.idem = IdempotencyStore(ttl=config.idempotency_ttl, clock=clock)
        self._quotas = Quotas(daily=config.daily_quota, monthly=config.monthly_quota, wall=wall)
        self._buckets: dict[str, TokenBucket] = {}
        self._seed_rngs()
        rate = config.rate_limit
        self._limit_header = str(int(rate)) if rate >= 1 else f"{rate:g}"
        self._policy_header = f"{self._limit_header};w=1"

    def _seed_rngs(self) -> None:
        # Two generators: drawing ids must not shift the sequence of faults.
        self._rng = random.Random(self.config.seed)
        self._id_rng = random.Random(self.config.seed ^ 0x5EED_1D5)

    def reset(self) -> None:
        """Forget everything: deliveries, keys, buckets, quotas, stats; faults back to config."""
        self.ledger.clear()
        self.idem.clear()
        self._quotas.clear()
        self._buckets.clear()
        self.faults = self.config.faults
        self._seed_rngs()

    # -- answers -----------------------------------------------------------------

    def rate_headers(self, bucket: TokenBucket | None) -> dict[str, str]:
        return {
            "Content-Type": JSON_TYPE,
            "ratelimit-limit": self._limit_header,
            "ratelimit-remaining": str(bucket.remaining()) if bucket else self._limit_header,
            "ratelimit-reset": str(bucket.reset_after()) if bucket else "1",
            "ratelimit-policy": self._policy_header,
        }

    def _error(self, err: ApiError, outcome: Answered, headers: dict[str, str]) -> web.Response:
        self.ledger.count(outcome, err.status, err.name)
        return web.Response(status=err.status, body=err.body(), headers=headers)

    async def _reject(
        self, err: ApiError, outcome: Answered, headers: dict[str, str], delay: float
    ) -> web.Response:
        if delay > 0:
            await asyncio.sleep(delay)
        return self._error(err, outcome, headers)

    def _auth(self, request: web.Request) -> tuple[str, ApiError | None]:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "", ApiError(
                401, "missing_api_key", "Missing API key in the authorization header."
            )
        if self.config.api_key is not None and token != self.config.api_key:
            return "", ApiError(403, "invalid_api_key", "API key is invalid.")
        if not request.headers.get("User-Agent"):
            return "", ApiError(403, "validation_error", "The `User-Agent` header is required.")
        return token, None

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(rate=self.config.rate_limit, clock=self._clock)
            self._buckets[key] = bucket
        return bucket

    def _gate(
        self, request: web.Request, faults: Faults
    ) -> tuple[str, dict[str, str], web.Response | None]:
        """Forced status, auth and rate limit, shared by every API route."""
        forced = faults.forced
        if forced is not None:
            headers = self.rate_headers(None)
            if forced.retry_after is not None:
                headers[HEADER_RETRY_AFTER] = f"{forced.retry_after:g}"
            elif forced.status == 429:
                headers[HEADER_RETRY_AFTER] = "1"  # Resend always says when to come back
            answer = ApiError(forced.status, forced.name, forced.message)
            return "", headers, self._error(answer, Answered.FORCED, headers)
        key, denied = self._auth(request)
        if denied is not None:
            headers = self.rate_headers(None)
            return "", headers, self._error(denied, Answered.AUTH, headers)
        bucket = self._bucket(key)
        storm = faults.storm_429_rate > 0 and self._rng.random() < faults.storm_429_rate
        if storm:
            bucket.drain()
        if storm or not bucket.take():
            headers = self.rate_headers(bucket)
            headers["ratelimit-remaining"] = "0"
            headers[HEADER_RETRY_AFTER] = str(bucket.retry_after())
            err = ApiError(429, "rate_limit_exceeded", "Too many requests. Slow down.")
            outcome = Answered.FAULT_429 if storm else Answered.RATE_LIMITED
            return key, headers, self._error(err, outcome, headers)
        return key, self.rate_headers(bucket), None

    def _quota_headers(self, key: str, headers: dict[str, str]) -> None:
        if not self._quotas.enabled:
            return
        daily, monthly = self._quotas.used(key)
        if self.config.daily_quota is not None:
            headers["x-resend-daily-quota"] = str(daily)
        if self.config.monthly_quota is not None:
            headers["x-resend-monthly-quota"] = str(monthly)

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    # -- /emails ------------------------------------------------------------------

    async def post_email(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, EMAILS)

    async def post_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._send(request, BATCH)

    async def _send(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        faults = self.faults
        delay = faults.sample_latency(self._rng)
        key, headers, rejected = self._gate(request, faults)
        if rejected is not None:
            if delay > 0:
                await asyncio.sleep(delay)
            return rejected
        idem = request.headers.get("Idempotency-Key")
        bad_key = validate_idempotency_key(idem)
        if bad_key is not None:
            return await self._reject(bad_key, Answered.INVALID, headers, delay)
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            bad_json = ApiError(400, "validation_error", "The request body is not valid JSON.")
            return await self._reject(bad_json, Answered.INVALID, headers, delay)

        scope: IdemScope | None = None
        fp = b""
        if idem is not None:
            scope = (key, endpoint, idem)
            fp = fingerprint(raw)
            entry = self.idem.completed(scope)
            if entry is not None:
                if entry.fingerprint != fp:
                    err = ApiError(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload.",
                    )
                    return await self._reject(err, Answered.CONFLICT, headers, delay)
                if delay > 0:
                    await asyncio.sleep(delay)
                self._quota_headers(key, headers)
                self.ledger.count(Answered.REPLAYED, entry.status)
                return web.Response(status=entry.status, body=entry.body, headers=headers)
            if self.idem.in_flight(scope):
                err = ApiError(
                    409,
                    "concurrent_idempotent_requests",
                    "Same idempotency key used while the original request is still in progress.",
                )
                return await self._reject(err, Answered.CONCURRENT, headers, delay)

        emails, errors, invalid = self._validate(request, body, endpoint, faults)
        if invalid is not None:
            return await self._reject(invalid, Answered.INVALID, headers, delay)

        if scope is not None:
            self.idem.begin(scope, fp)
        try:
            return await self._process(
                request, endpoint, key, idem, scope, fp, emails, errors, headers, faults, delay
            )
        finally:
            if scope is not None:
                self.idem.finish(scope)

    def _validate(
        self, request: web.Request, body: Any, endpoint: str, faults: Faults
    ) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]] | None, ApiError | None]:
        """(emails to send with their index, permissive errors or None, whole-request error)."""
        if endpoint == EMAILS:
            err = validate_email(body) or faults.refuses(body)
            return ([(0, body)], None, None) if err is None else ([], None, err)
        err = batch_shape(body)
        if err is not None:
            return [], None, err
        mode = request.headers.get("x-batch-validation", "strict").lower()
        if mode not in ("strict", "permissive"):
            err = ApiError(
                422, "validation_error", "`x-batch-validation` must be `strict` or `permissive`."
            )
            return [], None, err
        emails: list[tuple[int, dict[str, Any]]] = []
        errors: list[dict[str, Any]] = []
        for i, item in enumerate(body):
            problem = validate_email(item, in_batch=True) or faults.refuses(item)
            if problem is None:
                emails.append((i, item))
            elif mode == "strict":
                return (
                    [],
                    None,
                    ApiError(problem.status, problem.name, f"emails[{i}]: {problem.message}"),
                )
            else:
                errors.append({"index": i, "message": problem.message})
        return emails, (errors if mode == "permissive" else None), None

    async def _process(
        self,
        request: web.Request,
        endpoint: str,
        key: str,
        idem: str | None,
        scope: IdemScope | None,
        fp: bytes,
        emails: list[tuple[int, dict[str, Any]]],
        errors: list[dict[str, Any]] | None,
        headers: dict[str, str],
        faults: Faults,
        delay: float,
    ) -> web.StreamResponse:
        """The "still being processed" window: the key is in flight until this returns."""
        if delay > 0:
            await asyncio.sleep(delay)
        rng = self._rng
        if faults.hang_rate > 0 and rng.random() < faults.hang_rate:
            self.ledger.count(Answered.FAULT_HANG, None)
            await self._hang(request)
            return _dropped(request)
        if faults.error_rate > 0 and rng.random() < faults.error_rate:
            return self._fault_error(faults, headers)
        drop = faults.drop_after_accept_rate > 0 and rng.random() < faults.drop_after_accept_rate
        # Checked only now, right before recording, so concurrent requests cannot overrun it.
        quota = self._quotas.check(key, len(emails))
        if quota is not None:
            name, reset = quota
            self._quota_headers(key, headers)
            headers[HEADER_RETRY_AFTER] = str(reset)
            err = ApiError(429, name, "You have reached your email sending quota.")
            return self._error(err, Answered.QUOTA, headers)

        now = self._wall()
        batch = endpoint == BATCH
        self._requests += 1
        request_id = f"req_{self._requests}"
        deliveries = [
            Delivery(
                id=self._new_id(),
                idempotency_key=idem,
                endpoint=endpoint,
                body=email,
                received_at=now,
                batch_index=i if batch else None,
                request_id=request_id,
            )
            for i, email in emails
        ]
        self.ledger.record(deliveries, idem)
        if self.on_accept is not None:
            self.on_accept(deliveries)
        self._quotas.add(key, len(deliveries))
        if batch:
            answer: dict[str, Any] = {"data": [{"id": d.id} for d in deliveries]}
            if errors is not None:
                answer["errors"] = errors
            payload = orjson.dumps(answer)
        else:
            payload = b'{"id":"' + deliveries[0].id.encode() + b'"}'
        if scope is not None:
            self.idem.complete(scope, fp, 200, payload)
        if drop:
            self.ledger.count(Answered.FAULT_DROPPED, None)
            return _dropped(request)
        self._quota_headers(key, headers)
        self.ledger.count(Answered.SENT, 200)
        return web.Response(body=payload, headers=headers)

    def _fault_error(self, faults: Faults, headers: dict[str, str]) -> web.Response:
        rng = self._rng
        status = 503 if rng.random() < 0.5 else 500
        html = faults.html_error_share > 0 and rng.random() < faults.html_error_share
        if html:
            headers["Content-Type"] = "text/html"
            self.ledger.count(Answered.FAULT_ERROR, status, "html_error_page")
            return web.Response(
                status=status,
                body=_HTML_PAGE.replace(b"{status}", str(status).encode()),
                headers=headers,
            )
        name = SERVICE_UNAVAILABLE if status == 503 else APPLICATION_ERROR
        err = ApiError(status, name, "Injected by the sandbox.")
        return self._error(err, Answered.FAULT_ERROR, headers)

    async def _hang(self, request: web.Request) -> None:
        # aiohttp does not cancel handlers when the client goes away, so poll.
        while not self._stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(_HANG_POLL)

    # -- GET /emails/{id} -------------------------------------------------------------

    async def get_email(self, request: web.Request) -> web.StreamResponse:
        _key, headers, rejected = self._gate(request, self.faults)
        if rejected is not None:
            return rejected
        email_id = request.match_info["email_id"]
        if email_id == "batch":
            err = ApiError(
                405, "method_not_allowed", "Method is not allowed for the requested path."
            )
            return self._error(err, Answered.INVALID, headers)
        try:
            uuid.UUID(email_id)
        except ValueError:
            err = ApiError(422, "validation_error", "The `id` must be a valid UUID.")
            return self._error(err, Answered.INVALID, headers)
        d = self.ledger.by_id.get(email_id)
        if d is None:
            err = ApiError(404, "not_found", "Email not found.")
            return self._error(err, Answered.NOT_FOUND, headers)
        self.ledger.count(Answered.FETCHED, 200)
        return web.Response(body=orjson.dumps(email_object(d)), headers=headers)


def email_object(d: Delivery) -> dict[str, Any]:
    """`GET /emails/{id}` answer, shaped as the OpenAPI `Email` schema."""
    body = d.body

    def listed(value: Any) -> list[str]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    out: dict[str, Any] = {
        "object": "email",
        "id": d.id,
        "to": listed(body.get("to")),
        "from": body.get("from"),
        "created_at": d.created_at(),
        "subject": body.get("subject"),
        "bcc": listed(body.get("bcc")),
        "cc": listed(body.get("cc")),
        "reply_to": listed(body.get("reply_to")),
        "last_event": "scheduled" if body.get("scheduled_at") else "delivered",
    }
    for optional in ("html", "text", "scheduled_at", "tags"):
        if body.get(optional) is not None:
            out[optional] = body[optional]
    return out


def _dropped(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer: the client sees a reset or EOF."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp will not write to a closed transport; this response goes nowhere.
    return web.Response(status=500)
