"""Sandbox configuration: the fixed part (`SandboxConfig`) and the faults (`Faults`).

Both are immutable. Faults can be replaced while the sandbox runs (through
`Sandbox.set_faults` or `POST /_sandbox/faults`), so they also round-trip
through plain JSON (`Faults.from_dict` / `Faults.to_dict`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from consumer.sandbox.validation import ApiError

#: error names the sandbox answers with, declared once
SERVICE_UNAVAILABLE: Final = "service_unavailable"
APPLICATION_ERROR: Final = "application_error"


@dataclass(frozen=True, kw_only=True, slots=True)
class ForcedStatus:
    """An answer given to every `/emails` request while set (outages, auth or quota trouble)."""

    status: int
    name: str
    message: str = "Forced by the sandbox."
    #: seconds, sent as `retry-after` when set
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"force_status.status must be 4xx or 5xx, got {self.status}")
        if not self.name:
            raise ValueError("force_status.name must not be empty")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ForcedStatus:
        unknown = set(data) - {"status", "name", "message", "retry_after"}
        if unknown:
            raise ValueError(f"unknown force_status fields: {', '.join(sorted(unknown))}")
        try:
            return cls(
                status=int(data["status"]),
                name=str(data["name"]),
                message=str(data.get("message", "Forced by the sandbox.")),
                retry_after=(
                    None if data.get("retry_after") is None else float(data["retry_after"])
                ),
            )
        except KeyError as exc:
            raise ValueError(f"force_status needs {exc.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "name": self.name,
            "message": self.message,
            "retry_after": self.retry_after,
        }


_RATES: Final = (
    "error_rate",
    "html_error_share",
    "drop_after_accept_rate",
    "hang_rate",
    "storm_429_rate",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Faults:
    """Injected misbehaviour; every field defaults to off.

    Rates are shares in [0, 1], drawn from the sandbox's seeded generator, so a
    run with the same seed and the same request order misbehaves the same way.
    Latency sources add up when several are set.
    """

    latency_ms: float = 0.0
    #: (lo, hi) milliseconds, uniform
    latency_uniform_ms: tuple[float, float] | None = None
    #: (median_ms, sigma) of a log-normal distribution: mostly fast, a long tail
    latency_lognormal: tuple[float, float] | None = None
    #: share of requests answered 500 or 503 without sending
    error_rate: float = 0.0
    #: share of those errors whose body is an HTML page, as a proxy would send
    html_error_share: float = 0.0
    #: share of requests recorded as sent, then dropped without an answer
    drop_after_accept_rate: float = 0.0
    #: share of requests never answered until the client gives up
    hang_rate: float = 0.0
    #: share of requests answered 429 rate_limit_exceeded whatever the bucket says
    storm_429_rate: float = 0.0
    #: answer every `/emails` request with this while set; a mapping is converted
    force_status: ForcedStatus | Mapping[str, Any] | None = None
    #: recipients refused with 422 validation_error, one email at a time (a batch in
    #: permissive mode lists them in `errors` and sends the rest)
    refuse_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "refuse_to", tuple(str(a).lower() for a in self.refuse_to))
        for name in _RATES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must not be negative, got {self.latency_ms}")
        if self.latency_uniform_ms is not None:
            lo, hi = self.latency_uniform_ms
            if not 0 <= lo <= hi:
                raise ValueError("latency_uniform_ms must be (lo, hi) with 0 <= lo <= hi")
            object.__setattr__(self, "latency_uniform_ms", (float(lo), float(hi)))
        if self.latency_lognormal is not None:
            median, sigma = self.latency_lognormal
            if median <= 0 or sigma < 0:
                raise ValueError("latency_lognormal must be (median_ms > 0, sigma >= 0)")
            object.__setattr__(self, "latency_lognormal", (float(median), float(sigma)))
        if isinstance(self.force_status, Mapping):
            object.__setattr__(self, "force_status", ForcedStatus.from_dict(self.force_status))

    @property
    def forced(self) -> ForcedStatus | None:
        """The forced answer, always as a `ForcedStatus` (mappings are converted on init)."""
        fs = self.force_status
        return fs if isinstance(fs, ForcedStatus) else None

    def sample_latency(self, rng: random.Random) -> float:
        """Seconds to wait before answering one request."""
        ms = self.latency_ms
        if self.latency_uniform_ms is not None:
            ms += rng.uniform(*self.latency_uniform_ms)
        if self.latency_lognormal is not None:
            median, sigma = self.latency_lognormal
            ms += rng.lognormvariate(math.log(median), sigma)
        return ms / 1000.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON (`POST /_sandbox/faults`); raises ValueError on bad input."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        try:
            for name, value in data.items():
                if value is None:
                    if name == "refuse_to":
                        kwargs[name] = ()
                        continue
                    kwargs[name] = None if name not in _RATES and name != "latency_ms" else 0.0
                elif name in ("latency_uniform_ms", "latency_lognormal"):
                    a, b = value
                    kwargs[name] = (float(a), float(b))
                elif name == "refuse_to":
                    if isinstance(value, str) or not all(isinstance(a, str) for a in value):
                        raise ValueError("refuse_to must be a list of addresses")
                    kwargs[name] = tuple(value)
                elif name == "force_status":
                    if not isinstance(value, Mapping):
                        raise ValueError("force_status must be an object or null")
                    kwargs[name] = ForcedStatus.from_dict(value)
                else:
                    kwargs[name] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad fault value: {exc}") from None
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        forced = self.forced
        return {
            "latency_ms": self.latency_ms,
            "latency_uniform_ms": (
                list(self.latency_uniform_ms) if self.latency_uniform_ms else None
            ),
            "latency_lognormal": list(self.latency_lognormal) if self.latency_lognormal else None,
            "error_rate": self.error_rate,
            "html_error_share": self.html_error_share,
            "drop_after_accept_rate": self.drop_after_accept_rate,
            "hang_rate": self.hang_rate,
            "storm_429_rate": self.storm_429_rate,
            "force_status": forced.to_dict() if forced else None,
            "refuse_to": list(self.refuse_to),
        }

    def refuses(self, email: Any) -> ApiError | None:
        """The 422 for an email to a refused recipient, None otherwise."""
        if not self.refuse_to or not isinstance(email, Mapping):
            return None
        to = email.get("to")
        for address in [to] if isinstance(to, str) else to if isinstance(to, list) else []:
            if isinstance(address, str) and any(r in address.lower() for r in self.refuse_to):
                return ApiError(
                    422,
                    "validation_error",
                    "Invalid `to` field. The recipient is not allowed (sandbox refuse_to).",
                )
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxConfig:
    """What a sandbox is started with. `api_key=None` accepts any bearer token."""

    api_key: str | None = field(default=None, repr=False)
    #: requests per second per API key (token bucket, burst of one second's worth)
    rate_limit: float = 10.0
    #: seconds an idempotency key is remembered (Resend: 24 h)
    idempotency_ttl: float = 86400.0
    #: emails per UTC day per API key; None = unlimited
    daily_quota: int | None = None
    #: emails per UTC month per API key; None = unlimited
    monthly_quota: int | None = None
    seed: int = 0
    #: append-only JSON-lines file of accepted emails
    log_path: Path | None = None
    faults: Faults = field(default_factory=Faults)
    #: oldest deliveries are forgotten beyond this many (memory bound for long runs)
    max_deliveries: int = 1_000_000
    #: where signed delivery webhooks are posted (None: no webhooks)
    webhook_url: str | None = None
    #: the `whsec_...` secret they are signed with
    webhook_secret: str | None = field(default=None, repr=False)
    #: Resend's retry delays are multiplied by this (0.001: 5 min becomes 0.3 s)
    webhook_time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.rate_limit <= 0:
            raise ValueError(f"rate_limit must be positive, got {self.rate_limit}")
        if self.idempotency_ttl <= 0:
            raise ValueError(f"idempotency_ttl must be positive, got {self.idempotency_ttl}")
        for name in ("daily_quota", "monthly_quota"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.max_deliveries <= 0:
            raise ValueError("max_deliveries must be positive")
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("webhook_url and webhook_secret go together")
        if self.webhook_secret is not None and not self.webhook_secret.startswith("whsec_"):
            raise ValueError("webhook_secret must be of the form whsec_<base64>")
        if not 0 <= self.webhook_time_scale <= 1000:
            raise ValueError("webhook_time_scale must be within [0, 1000]")
