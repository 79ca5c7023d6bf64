"""The sandbox's memory: delivery ledger, idempotency keys, rate buckets, quotas.

Pure logic with an injectable clock, no I/O except the optional JSON-lines
log, so the server module stays about HTTP.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO, Any

import orjson

_FOUR_DAYS = timedelta(days=4)


class Answered(StrEnum):
    """How the sandbox answered one API request (its stats keys; not an event's `Outcome`)."""

    SENT = "sent"
    REPLAYED = "replayed"
    INVALID = "invalid"
    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota_exceeded"
    CONFLICT = "idempotency_conflict"
    CONCURRENT = "idempotency_concurrent"
    FAULT_ERROR = "fault_error"
    FAULT_DROPPED = "fault_dropped"
    FAULT_HANG = "fault_hang"
    FAULT_429 = "fault_429"
    FORCED = "forced"
    NOT_FOUND = "not_found"
    FETCHED = "fetched"


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivery:
    """One accepted email, as the sandbox would have sent it."""

    id: str
    idempotency_key: str | None
    #: "/emails" or "/emails/batch"
    endpoint: str
    body: dict[str, Any]
    #: seconds since the epoch
    received_at: float
    #: position within its batch, None for single sends
    batch_index: int | None = None
    #: the accepted request it came in (all members of one batch share it)
    request_id: str | None = None

    def created_at(self) -> str:
        """Resend's timestamp format, e.g. `2023-04-03 22:13:42.674981+00`."""
        return datetime.fromtimestamp(self.received_at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "idempotency_key": self.idempotency_key,
            "endpoint": self.endpoint,
            "batch_index": self.batch_index,
            "request_id": self.request_id,
            "received_at": self.received_at,
            "created_at": self.created_at(),
            "body": self.body,
        }


def fingerprint(raw: bytes) -> bytes:
    """Idempotent replays must repeat the body byte for byte (see CONTRACT.md)."""
    return hashlib.blake2b(raw, digest_size=16).digest()


@dataclass(slots=True)
class _Completed:
    fingerprint: bytes
    status: int
    body: bytes
    expires: float


IdemScope = tuple[str, str, str]  # (api key, endpoint, idempotency key)


class IdempotencyStore:
    """Keys per API key and endpoint: in flight, or completed with their answer."""

    def __init__(self, *, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._inflight: dict[IdemScope, bytes] = {}
        # insertion order == expiry order because the TTL is fixed
        self._done: OrderedDict[IdemScope, _Completed] = OrderedDict()

    def __len__(self) -> int:
        return len(self._done)

    def completed(self, scope: IdemScope) -> _Completed | None:
        """The remembered answer of a key still within its TTL."""
        self._expire()
        return self._done.get(scope)

    def in_flight(self, scope: IdemScope) -> bool:
        return scope in self._inflight

    def in_flight_count(self) -> int:
        return len(self._inflight)

    def begin(self, scope: IdemScope, fp: bytes) -> None:
        self._inflight[scope] = fp

    def finish(self, scope: IdemScope) -> None:
        """The request ended without an answer worth remembering (failure, fault)."""
        self._inflight.pop(scope, None)

    def complete(self, scope: IdemScope, fp: bytes, status: int, body: bytes) -> None:
        self._inflight.pop(scope, None)
        self._done.pop(scope, None)
        self._done[scope] = _Completed(fp, status, body, self._clock() + self._ttl)

    def clear(self) -> None:
        self._inflight.clear()
        self._done.clear()

    def _expire(self) -> None:
        now = self._clock()
        while self._done:
            scope, entry = next(iter(self._done.items()))
            if entry.expires > now:
                break
            del self._done[scope]


class TokenBucket:
    """`rate` tokens per second, holding at most one second's worth."""

    __slots__ = ("_clock", "_stamp", "capacity", "rate", "tokens")

    def __init__(self, *, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def drain(self) -> None:
        """A storm: the bucket is empty, as if a burst had used it."""
        self._refill()
        self.tokens = min(self.tokens, 0.0)

    def remaining(self) -> int:
        return max(0, math.floor(self.tokens))

    def retry_after(self) -> int:
        """Whole seconds until one token is back (at least 1, as Resend sends)."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))

    def reset_after(self) -> int:
        """Whole seconds until the bucket is full again."""
        return max(1, math.ceil((self.capacity - self.tokens) / self.rate))


class Quotas:
    """Emails per API key per UTC day and month."""

    def __init__(
        self,
        *,
        daily: int | None,
        monthly: int | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.daily = daily
        self.monthly = monthly
        self._wall = wall
        self._day: Counter[tuple[str, str]] = Counter()
        self._month: Counter[tuple[str, str]] = Counter()

    def _periods(self) -> tuple[str, str, datetime]:
        now = datetime.fromtimestamp(self._wall(), UTC)
        return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m"), now

    @property
    def enabled(self) -> bool:
        return self.daily is not None or self.monthly is not None

    def used(self, key: str) -> tuple[int, int]:
        if not self.enabled:
            return 0, 0
        day, month, _ = self._periods()
        return self._day[(key, day)], self._month[(key, month)]

    def check(self, key: str, n: int) -> tuple[str, int] | None:
        """None if `n` more emails fit; else (error name, seconds until the reset)."""
        if not self.enabled:
            return None
        day, month, now = self._periods()
        if self.daily is not None and self._day[(key, day)] + n > self.daily:
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            left = 86400 - (now - midnight).total_seconds()
            return "daily_quota_exceeded", max(1, math.ceil(left))
        if self.monthly is not None and self._month[(key, month)] + n > self.monthly:
            first_next = (now.replace(day=28) + _FOUR_DAYS).replace(
                day=1, hour=0, minute=0, second=0, microsecond=0
            )
            return "monthly_quota_exceeded", max(1, math.ceil((first_next - now).total_seconds()))
        return None

    def add(self, key: str, n: int) -> None:
        if not self.enabled:
            return
        day, month, _ = self._periods()
        self._day[(key, day)] += n
        self._month[(key, month)] += n

    def clear(self) -> None:
        self._day.clear()
        self._month.clear()


@dataclass(kw_only=True, slots=True)
class Ledger:
    """Every accepted email, counts by outcome, and the optional JSON-lines log."""

    max_deliveries: int
    log: IO[bytes] | None = None
    by_id: OrderedDict[str, Delivery] = field(default_factory=OrderedDict)
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    #: Resend error names answered (`invalid_idempotent_request`, `rate_limit_exceeded`, ...)
    error_names: Counter[str] = field(default_factory=Counter)
    #: accepted requests per idempotency key: above 1 means a key was sent twice
    sends_per_key: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    delivered: int = 0
    sends_without_key: int = 0

    def count(self, outcome: Answered, status: int | None, error: str | None = None) -> None:
        """One answered request; `status=None` when no answer was sent."""
        self.requests += 1
        if error is not None:
            self.error_names[error] += 1
        self.outcomes[outcome] += 1
        if status is not None:
            self.statuses[status] += 1

    def record(self, deliveries: Iterable[Delivery], key: str | None) -> None:
        """One accepted request (one email or one batch)."""
        if key is None:
            self.sends_without_key += 1
        else:
            self.sends_per_key[key] += 1
        for d in deliveries:
            self.delivered += 1
            self.by_id[d.id] = d
            if len(self.by_id) > self.max_deliveries:
                self.by_id.popitem(last=False)
            if self.log is not None:
                self.log.write(orjson.dumps(d.to_dict(), option=orjson.OPT_APPEND_NEWLINE))
        if self.log is not None:
            self.log.flush()

    def find(
        self,
        *,
        idempotency_key: str | None = None,
        endpoint: str | None = None,
        to: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        out: list[Delivery] = []
        for d in self.by_id.values():
            if idempotency_key is not None and d.idempotency_key != idempotency_key:
                continue
            if endpoint is not None and d.endpoint != endpoint:
                continue
            if since is not None and d.received_at < since:
                continue
            if to is not None and not _mentions(d.body.get("to"), to):
                continue
            out.append(d)
        if limit is not None:
            out = out[-limit:] if limit > 0 else []
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "outcomes": {str(k): v for k, v in self.outcomes.items()},
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.error_names),
            "deliveries": self.delivered,
            "sends_per_key": dict(self.sends_per_key),
            "sends_without_key": self.sends_without_key,
            "duplicate_keys": sorted(k for k, n in self.sends_per_key.items() if n > 1),
        }

    def clear(self) -> None:
        self.by_id.clear()
        self.outcomes.clear()
        self.statuses.clear()
        self.error_names.clear()
        self.sends_per_key.clear()
        self.requests = self.delivered = self.sends_without_key = 0


def _mentions(value: Any, needle: str) -> bool:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return any(isinstance(x, str) and needle.lower() in x.lower() for x in items)
