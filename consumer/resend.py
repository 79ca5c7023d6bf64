"""Resend HTTP client: one attempt per `send`, every answer classified.

`ResendClient.send` makes exactly one HTTP request with the bytes it is given and
never raises for HTTP or transport trouble: it returns an `Answer` whose
`verdict` says what to do next ("ok", "retry", "reject", "fatal"). Retrying,
backing off and pausing live in `consumer.retry`; pacing lives in
`consumer.ratelimit`.

How answers are classified is data: `RULES` below is the contract's table
(../shared/resend/CONTRACT.md), one row per (statuses, error name), looked up
by `classify`. Names Resend has not documented fall back to a per-status row
(name None) and then to the status class: 2xx ok, 3xx wrong base URL, other
4xx reject, 5xx and anything stranger retry. A 400, 403 or 407 whose body is
not a JSON object did not come from Resend (a WAF, a corporate proxy, a block
page): it would refuse every email alike, so it is the service-wide `endpoint`
condition (rows marked `foreign`), never a per-email rejection.
"""

from __future__ import annotations

import email.utils
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import aiohttp
import orjson

from consumer import __version__
from consumer.errors import (
    AuthError,
    ConsumerError,
    EndpointError,
    QuotaExceeded,
    ResendRejected,
    ResendRetriable,
    SettingsError,
    TransportError,
)
from consumer.ratelimit import HEADER_RESET, HEADER_RETRY_AFTER
from consumer.redact import redact_secrets, without_userinfo
from consumer.settings import Secret, base_url_problem

if TYPE_CHECKING:
    from consumer.ratelimit import RateLimiter
    from consumer.settings import Settings

Verdict = Literal["ok", "retry", "reject", "fatal"]
#: service-wide conditions an answer can name; "outage" is decided by the gate
Condition = Literal["auth", "endpoint", "quota_daily", "quota_monthly"]

#: Resend's two sending endpoints (the sandbox serves the same paths)
ENDPOINT_EMAILS: Final = "/emails"
ENDPOINT_BATCH: Final = "/emails/batch"

HEADER_AUTHORIZATION: Final = "Authorization"
HEADER_USER_AGENT: Final = "User-Agent"
HEADER_CONTENT_TYPE: Final = "Content-Type"
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
HEADER_BATCH_VALIDATION: Final = "x-batch-validation"

USER_AGENT: Final = f"resend-consumer/{__version__}"
#: longest server message kept in an Answer (dead-letter headers stay small)
MAX_MESSAGE_CHARS: Final = 300


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the answer table: which answers it matches and what they mean."""

    statuses: tuple[int, ...]
    #: Resend's error `name`; None matches any other name (or no JSON body) for these statuses
    name: str | None
    verdict: Verdict
    condition: Condition | None = None
    #: reason code for dead letters and metrics; defaults to the name
    reason: str | None = None
    #: matches only answers whose body is not a JSON object (not Resend's); tried first
    foreign: bool = False


_AUTH_NAMES = (
    "missing_api_key",
    "invalid_api_key",
    "restricted_api_key",
    "suspended_api_key",
    "invalid_permission",
)
_5XX = (500, 502, 503, 504)

# The contract's table, row by row. Order matters only between a named row and
# the name-None row of the same status: named rows are tried first.
RULES: Final[tuple[Rule, ...]] = (
    # A bug in key derivation: no retry can fix it.
    Rule((400,), "invalid_idempotency_key", "reject"),
    Rule((400, 403, 422), "validation_error", "reject"),
    Rule((422,), "missing_required_field", "reject"),
    Rule((422,), "invalid_parameter", "reject"),
    Rule((422,), "invalid_attachment", "reject"),
    Rule((422,), "missing_required_parameter", "reject"),
    # Configuration of one route, not of the service: other routes still send.
    Rule((403,), "invalid_from_address", "reject"),
    *(Rule((401, 403), name, "fatal", "auth") for name in _AUTH_NAMES),
    Rule((404,), "not_found", "fatal", "endpoint"),
    Rule((405,), "method_not_allowed", "fatal", "endpoint"),
    # The body was not reproduced byte for byte: retrying with it is useless.
    Rule((409,), "invalid_idempotent_request", "reject"),
    Rule((409,), "concurrent_idempotent_requests", "retry"),
    Rule((409,), "resource_locked", "retry"),
    Rule((429,), "rate_limit_exceeded", "retry"),
    Rule((429,), "daily_quota_exceeded", "fatal", "quota_daily"),
    Rule((429,), "monthly_quota_exceeded", "fatal", "quota_monthly"),
    Rule(_5XX, "application_error", "retry"),
    Rule(_5XX, "internal_server_error", "retry"),
    Rule(_5XX, "service_unavailable", "retry"),
    # Unknown names (or non-JSON bodies) for statuses whose meaning does not
    # depend on the name.
    Rule((401,), None, "fatal", "auth", reason="unauthorized"),
    Rule((404,), None, "fatal", "endpoint", reason="not_found"),
    Rule((405,), None, "fatal", "endpoint", reason="method_not_allowed"),
    Rule((408,), None, "retry", reason="request_timeout"),
    # A 429 we cannot name is most likely rate limiting: slow down and retry.
    Rule((429,), None, "retry", reason="too_many_requests"),
    # Not Resend at all: a WAF, proxy or block page between us and the API refuses
    # every email alike, so dead-lettering them one by one would empty the topic.
    Rule((400, 403, 407), None, "fatal", "endpoint", reason="block_page", foreign=True),
)

_BY_STATUS_NAME: Final[dict[tuple[int, str | None], Rule]] = {
    (status, rule.name): rule for rule in RULES if not rule.foreign for status in rule.statuses
}
_FOREIGN_BY_STATUS: Final[dict[int, Rule]] = {
    status: rule for rule in RULES if rule.foreign for status in rule.statuses
}


def classify(status: int, name: str | None, *, resend_body: bool = True) -> Rule:
    """The table row for an HTTP status and Resend error name (None if unnamed).

    `resend_body=False`: the body was not a JSON object, so not an answer of Resend's.
    """
    if not resend_body:
        foreign = _FOREIGN_BY_STATUS.get(status)
        if foreign is not None:
            return foreign
    rule = _BY_STATUS_NAME.get((status, name)) or _BY_STATUS_NAME.get((status, None))
    if rule is not None:
        return rule
    if 200 <= status < 300:
        return Rule((status,), None, "ok", reason="sent")
    if 300 <= status < 400:
        # Redirects are not followed: a POST answered by a redirect means the
        # base URL is not Resend's API (http instead of https, a web page, ...).
        return Rule((status,), None, "fatal", "endpoint", reason=f"http_{status}")
    if 400 <= status < 500:
        return Rule((status,), None, "reject", reason="resend_rejected")
    return Rule((status,), None, "retry", reason=f"http_{status}")


# -- answers ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """The classified outcome of one HTTP attempt. `message` never holds secrets."""

    status: int | None
    verdict: Verdict
    email_id: str | None = None
    #: ids of a batch, in input order
    email_ids: list[str] | None = None
    #: permissive batch: (index, message) of emails Resend refused
    batch_errors: list[tuple[int, str]] | None = None
    error_name: str | None = None
    message: str = ""
    #: seconds the server asked us to wait (retry-after, or ratelimit-reset on 429)
    retry_after: float | None = None
    condition: Condition | None = None
    #: stable reason code (dead-letter header, metrics label)
    reason: str = "sent"

    @property
    def outage_signal(self) -> bool:
        """True when this answer says Resend itself is failing (5xx or transport)."""
        return self.verdict == "retry" and (self.status is None or self.status >= 500)

    def error(self) -> ConsumerError | None:
        """The matching error of `consumer.errors` (None for "ok")."""
        text = f"{self.reason}: {self.message}" if self.message else self.reason
        if self.verdict == "ok":
            return None
        if self.verdict == "reject":
            return ResendRejected(text, reason=self.reason)
        if self.verdict == "retry":
            if self.status is None:
                return TransportError(text, reason=self.reason)
            return ResendRetriable(text, reason=self.reason)
        if self.condition == "auth":
            return AuthError(text)
        if self.condition in ("quota_daily", "quota_monthly"):
            return QuotaExceeded(text, reason=self.condition)
        return EndpointError(text)


def parse_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A delay header (`retry-after`, `ratelimit-reset`) in seconds, or None.

    Accepts delta-seconds (also fractional) and, for retry-after, an HTTP date.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite
        return None
    return max(0.0, seconds)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def answer_from_response(
    status: int, headers: Mapping[str, str], raw: bytes, *, endpoint: str
) -> Answer:
    """Classify one HTTP response (status, headers, body bytes). Pure: tested row by row."""
    data: Any = None
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    retry_after = parse_seconds(headers.get(HEADER_RETRY_AFTER))
    if retry_after is None and status == 429:
        retry_after = parse_seconds(headers.get(HEADER_RESET))

    if 200 <= status < 300:
        return _success(status, data, raw, headers, endpoint=endpoint)

    name: str | None = None
    message = ""
    resend_body = isinstance(data, dict)
    if resend_body:
        raw_name = data.get("name")
        name = raw_name if isinstance(raw_name, str) and raw_name else None
        raw_message = data.get("message")
        message = _short(raw_message) if isinstance(raw_message, str) else ""
    else:
        kind = headers.get("Content-Type", "no content type").split(";")[0]
        message = f"HTTP {status} with a non-JSON body ({kind}, {len(raw)} bytes)"
    rule = classify(status, name, resend_body=resend_body)
    return Answer(
        status=status,
        verdict=rule.verdict,
        error_name=name,
        message=message or f"HTTP {status}",
        retry_after=retry_after,
        condition=rule.condition,
        reason=rule.reason or name or f"http_{status}",
    )


def _success(
    status: int, data: Any, raw: bytes, headers: Mapping[str, str], *, endpoint: str
) -> Answer:
    if isinstance(data, dict):
        email_id = data.get("id")
        if isinstance(email_id, str) and email_id:
            return Answer(status=status, verdict="ok", email_id=email_id)
        items = data.get("data")
        if isinstance(items, list) and all(
            isinstance(i, dict) and isinstance(i.get("id"), str) for i in items
        ):
            errors = [
                (int(e.get("index", -1)), _short(str(e.get("message", ""))))
                for e in data.get("errors") or []
                if isinstance(e, dict)
            ]
            return Answer(
                status=status,
                verdict="ok",
                email_ids=[i["id"] for i in items],
                batch_errors=errors or None,
            )
    # A 2xx that is not Resend's JSON (an HTML page, a proxy's "OK") means the
    # base URL does not lead to the API: pause the service rather than count
    # emails as sent that nobody sent.
    kind = headers.get("Content-Type", "no content type").split(";")[0]
    return Answer(
        status=status,
        verdict="fatal",
        condition="endpoint",
        reason="unexpected_success_body",
        message=f"HTTP {status} from {endpoint} without an email id ({kind}, {len(raw)} bytes)",
    )


def transport_answer(exc: BaseException, *, redact: str | None = None) -> Answer:
    """Classify an exception raised while sending (no HTTP answer at all)."""
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        # Raised before any byte leaves: RESEND_BASE_URL itself is malformed.
        return Answer(
            status=None,
            verdict="fatal",
            condition="endpoint",
            reason="invalid_base_url",
            message=f"invalid base URL ({type(exc).__name__})",
        )
    if isinstance(exc, TimeoutError):
        reason = "timeout"
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        reason = "dns_error"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        reason = "connect_error"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        reason = "server_disconnected"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        reason = "payload_error"
    else:
        reason = "transport_error"
    text = redact_secrets(_short(f"{type(exc).__name__}: {exc}"), (redact,) if redact else ())
    return Answer(status=None, verdict="retry", reason=reason, message=text)


# -- the client ------------------------------------------------------------------


class ResendClient:
    """One aiohttp session per process: pooled, keep-alive, explicit timeouts.

    Use as `async with client:` or `await client.start()` / `await client.close()`.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: Secret,
        api_key_file: Path | None = None,
        limiter: RateLimiter | None = None,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        total_timeout: float = 30.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: why the base URL cannot work (never quoting it); every send is then an
        #: `endpoint` answer, a paused service, not an outage or a dead letter
        self._url_problem = base_url_problem(self.base_url)
        self._api_key = api_key
        self._api_key_file = api_key_file
        self._reload_key = False
        self.limiter = limiter
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout, connect=connect_timeout, sock_read=read_timeout
        )
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self.counts: Counter[str] = Counter()
        #: observers for metrics (set by the pipeline): every answer with its
        #: duration in seconds, and every wait for a rate-limit token
        self.on_answer: Callable[[Answer, float], None] | None = None
        self.on_rate_wait: Callable[[float], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, limiter: RateLimiter | None = None) -> Self:
        """Build from `Settings`; a missing API key is a configuration error."""
        if settings.resend_api_key is None:
            raise SettingsError(
                "RESEND_API_KEY (or RESEND_API_KEY_FILE) is not set: the Resend client needs a key"
            )
        return cls(
            base_url=settings.resend_base_url,
            api_key=settings.resend_api_key,
            api_key_file=settings.resend_api_key_file,
            limiter=limiter,
            max_connections=settings.max_in_flight,
            connect_timeout=settings.resend_connect_timeout,
            read_timeout=settings.resend_read_timeout,
            total_timeout=settings.resend_total_timeout,
        )

    def __repr__(self) -> str:
        parts = [without_userinfo(self.base_url), f"in_flight={self._in_flight}"]
        parts += [f"{k}={v}" for k, v in sorted(self.counts.items())]
        return f"<ResendClient {' '.join(parts)}>"

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # Never read proxies or .netrc credentials from the environment implicitly.
            trust_env=False,
            raise_for_status=False,
            auto_decompress=True,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------

    def _key(self) -> str:
        # After an auth failure, re-read the key file once: a rotated Kubernetes
        # secret then heals the service without a restart.
        if self._reload_key and self._api_key_file is not None:
            self._reload_key = False
            try:
                fresh = self._api_key_file.read_text().strip()
            except OSError:
                fresh = ""
            # a rotated file holding a line break inside the key would make a broken header
            if fresh and not any(c.isspace() or not c.isprintable() for c in fresh):
                self._api_key = Secret(fresh)
        return self._api_key.get()

    async def pace(self, priority: int = 1) -> None:
        """Wait for a token of the shared rate limiter (reported to on_rate_wait).

        Lower `priority` numbers are served first (urgent mail before bulk).
        """
        if self.limiter is None:
            return
        waited = time.monotonic()
        await self.limiter.acquire(priority)
        if self.on_rate_wait is not None:
            self.on_rate_wait(time.monotonic() - waited)

    async def send(
        self,
        *,
        endpoint: str,
        body: bytes,
        idempotency_key: str | None,
        headers: Mapping[str, str] | None = None,
        paced: bool = False,
    ) -> Answer:
        """One HTTP attempt with exactly these bytes; HTTP and transport trouble is classified.

        The attempt first waits for a rate-limit token, unless the caller already
        did (`paced=True` after `await pace()`).
        """
        if self._session is None:
            await self.start()
        assert self._session is not None
        if self._url_problem is not None:
            return self._answered(
                Answer(
                    status=None,
                    verdict="fatal",
                    condition="endpoint",
                    reason="invalid_base_url",
                    message=f"RESEND_BASE_URL {self._url_problem}",
                ),
                0.0,
            )
        if not paced:
            await self.pace()
        key = self._key()
        request_headers = {
            HEADER_AUTHORIZATION: f"Bearer {key}",
            HEADER_USER_AGENT: self._user_agent,
            HEADER_CONTENT_TYPE: "application/json",
        }
        if idempotency_key is not None:
            request_headers[HEADER_IDEMPOTENCY_KEY] = idempotency_key
        if headers:
            request_headers.update(headers)
        self._in_flight += 1
        started = time.monotonic()
        try:
            async with self._session.post(
                self.base_url + endpoint,
                data=body,
                headers=request_headers,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
                resp_headers = resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            answer = transport_answer(exc, redact=key)
            if self.limiter is not None:
                self.limiter.observe({}, None)
        else:
            answer = answer_from_response(status, resp_headers, raw, endpoint=endpoint)
            if key in answer.message:
                answer = _redacted(answer, key)
            if self.limiter is not None:
                self.limiter.observe(resp_headers, status, name=answer.error_name)
        finally:
            self._in_flight -= 1
        if answer.condition == "auth":
            self._reload_key = True
        return self._answered(answer, time.monotonic() - started)

    def _answered(self, answer: Answer, seconds: float) -> Answer:
        self.counts[answer.verdict] += 1
        if self.on_answer is not None:
            self.on_answer(answer, seconds)
        return answer


def _redacted(answer: Answer, key: str) -> Answer:
    return replace(answer, message=redact_secrets(answer.message, (key,)))
