"""One immutable settings object, built at the edge from the environment and flags.

Nothing below `cli.py` reads `os.environ`: the `Settings` built here is passed
down. Each setting is declared once, as a `Settings` field whose `_setting(...)`
carries its default, parser and one-line meaning; its environment variable is
the field name in capitals. `FIELDS` is derived from those declarations (the
CLI flags and README's configuration table, printed by `resend-consumer config`,
come from it), and a choice's allowed values are its `Literal`'s. Secrets are
`Secret` values whose repr and str never show the secret.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from consumer.errors import SettingsError
from consumer.redact import REDACTED, without_userinfo

Ordering = Literal["key", "partition", "none"]
StalePolicy = Literal["dead-letter", "skip", "send"]
AutoOffsetReset = Literal["earliest", "latest"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
FeedbackMode = Literal["structured", "binary"]


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'500ms', '2s', '1.5m', '23h', '3' (seconds) -> seconds as float."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 2s, 5m, 23h)")
    # a few hundred digits overflow to infinity: as unusable as "inf" itself
    return _finite(float(m.group(1)) * _UNIT[m.group(2)], text)


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text!r}")
    return value


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _choice(choices: Any) -> Callable[[str], str]:
    """A parser accepting exactly the values of a `Literal` alias, in its order."""
    allowed: tuple[str, ...] = typing.get_args(choices)

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def _optional_str(text: str) -> str | None:
    return text or None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise ValueError(f"must be from 1 to 100 (Resend's batch limit), got {value}")
    return value


def _linger(text: str) -> float:
    value = parse_duration(text)
    if not 0 <= value <= 10:
        raise ValueError(f"must be from 0 to 10s, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite(float(text), text)
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _ratio(text: str) -> float:
    value = _finite(float(text), text)
    if not 0 < value < 1:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return value


def _port(text: str) -> int:
    """A TCP port, 1-65535; 0 where the setting documents 0 as off."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port from 1 to 65535 (0: off), got {value}")
    return value


_HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]+\Z")


def _is_host(text: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 address (bracketed or not)."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if ":" not in inner:
        return bool(_HOST_NAME.match(inner))
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        return False
    return True


def _host(text: str) -> str:
    """A host name or IP address to bind, without scheme, port or path."""
    if not _is_host(text):
        raise ValueError("must be a host name or an IP address (no scheme, port or path)")
    return text


def _bootstrap(text: str) -> str:
    """Comma-separated host[:port] entries, each port 1-65535."""
    entries = [part.strip() for part in text.split(",")]
    if not all(entries):
        raise ValueError("an empty entry between commas")
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or (":" in host and not host.startswith("[")):
            host, port = entry, ""  # a bare host or a bare IPv6 address
        if not _is_host(host):
            raise ValueError(f"{entry!r} is not host:port")
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{entry!r}: the port must be from 1 to 65535")
    return text


def base_url_problem(url: str) -> str | None:
    """Why a Resend base URL cannot work (never quoting it), or None when it is usable.

    http(s) only, a host, no credentials (`user:pass@`), a valid port, no query
    or fragment (the endpoint path is appended to it), no whitespace.
    """
    if not url or any(c.isspace() or not c.isprintable() for c in url):
        return "must be an http(s) URL without whitespace or control characters"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http"):
        return "must start with https:// (http:// only for a local sandbox)"
    if "@" in parts.netloc:
        return "credentials in the URL are refused: the API key goes in RESEND_API_KEY"
    if not parts.hostname or not _is_host(parts.hostname):
        return "has no valid host"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "has an invalid port (1-65535)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "may not carry a query or a fragment"
    return None


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(text: str) -> str:
    problem = base_url_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return value


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}\Z")


def _topic(text: str) -> str:
    if not _TOPIC.match(text) or text in (".", ".."):
        raise ValueError("a Kafka topic name is 1-249 of [A-Za-z0-9._-]")
    return text


def _secret(text: str) -> Secret:
    return Secret(text)


_WHSEC = re.compile(r"^whsec_[A-Za-z0-9+/]{4,}={0,2}\Z")


def _webhook_secrets(text: str) -> tuple[Secret, ...]:
    """One or more `whsec_<base64>` secrets, space- or comma-separated (rotation).

    The message never quotes a secret, only its position.
    """
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    if not parts:
        raise ValueError("no secret given")
    for i, part in enumerate(parts, 1):
        if not _WHSEC.match(part):
            raise ValueError(
                f"secret {i} of {len(parts)} is not of the form whsec_<base64> "
                "(the signing secret Resend shows for the webhook)"
            )
    return tuple(Secret(p) for p in dict.fromkeys(parts))


def _without_userinfo_repr(raw: str) -> str:
    return repr(without_userinfo(raw))


@dataclass(frozen=True, slots=True)
class Field:
    """One setting: its environment variable, parser and one-line meaning."""

    name: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    #: how a refused value is shown in the error (default: repr; secrets: never)
    shown: Callable[[str], str] | None = None


_T = typing.TypeVar("_T")
_SPEC: Final = "setting"


def _setting(
    default: _T,
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
    shown: Callable[[str], str] | None = None,
) -> _T:
    """Declare a `Settings` field: default, parser of the variable's text, one-line meaning.

    A secret is left out of the repr and never quoted in an error.
    """
    spec = {"parse": parse, "help": help, "secret": secret, "shown": shown}
    return field(default=default, repr=not secret, metadata={_SPEC: spec})


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Every knob of the service. Build with `Settings.from_env()`; never mutate."""

    # Kafka
    kafka_bootstrap_servers: str = _setting(
        "127.0.0.1:9092", _bootstrap, "Kafka bootstrap servers, comma-separated host:port"
    )
    kafka_topics: tuple[str, ...] = _setting(
        ("domain-events",), _csv, "topics to consume, comma-separated"
    )
    kafka_topic_pattern: str | None = _setting(
        None, _optional_str, "regular expression of topics to consume (instead of KAFKA_TOPICS)"
    )
    kafka_group_id: str = _setting("resend-consumer", str, "consumer group id")
    kafka_client_id: str = _setting("resend-consumer", str, "client id shown in broker logs")
    kafka_group_instance_id: str | None = _setting(
        None,
        _optional_str,
        "static membership id (e.g. the pod name): restarts within the session "
        "timeout do not rebalance",
    )
    kafka_session_timeout: float = _setting(30.0, _positive_duration, "group session timeout")
    kafka_heartbeat_interval: float = _setting(3.0, _positive_duration, "group heartbeat interval")
    kafka_rebalance_timeout: float = _setting(
        60.0,
        _positive_duration,
        "how long the group waits for members to rejoin; above DRAIN_TIMEOUT",
    )
    kafka_max_poll_interval: float = _setting(
        300.0, _positive_duration, "max time between polls before the member is dropped"
    )
    kafka_auto_offset_reset: AutoOffsetReset = _setting(
        "earliest", _choice(AutoOffsetReset), "where a group with no committed offset starts"
    )
    kafka_security_protocol: SecurityProtocol = _setting(
        "PLAINTEXT", _choice(SecurityProtocol), "Kafka security protocol"
    )
    kafka_sasl_mechanism: SaslMechanism | None = _setting(
        None, _choice(SaslMechanism), "SASL mechanism"
    )
    kafka_sasl_username: str | None = _setting(None, _optional_str, "SASL username")
    kafka_sasl_password: Secret | None = _setting(
        None, _secret, "SASL password (secret)", secret=True
    )
    kafka_ssl_cafile: Path | None = _setting(None, Path, "CA bundle for SSL / SASL_SSL")
    kafka_ssl_certfile: Path | None = _setting(None, Path, "client certificate (mutual TLS)")
    kafka_ssl_keyfile: Path | None = _setting(None, Path, "client key (mutual TLS)")
    dlq_topic: str | None = _setting(
        None, _optional_str, "dead-letter topic (default: <source topic>.dlq)"
    )
    kafka_transactions: bool = _setting(
        True, _bool, "dead letters and offsets in one transaction (exactly-once dead letters)"
    )
    # Resend
    resend_api_key: Secret | None = _setting(None, _secret, "Resend API key (secret)", secret=True)
    resend_api_key_file: Path | None = _setting(
        None, Path, "file holding the API key (Kubernetes secret mount)"
    )
    resend_base_url: str = _setting(
        "https://api.resend.com",
        _base_url,
        "Resend API base URL (https; http only to loopback unless RESEND_ALLOW_HTTP)",
        shown=_without_userinfo_repr,
    )
    resend_allow_http: bool = _setting(
        False,
        _bool,
        "allow an http:// RESEND_BASE_URL off this host (a sandbox container): "
        "the key travels in clear",
    )
    resend_connect_timeout: float = _setting(5.0, _positive_duration, "HTTP connect timeout")
    resend_read_timeout: float = _setting(
        15.0, _positive_duration, "HTTP read timeout (between bytes)"
    )
    resend_total_timeout: float = _setting(
        30.0, _positive_duration, "HTTP total timeout per attempt"
    )
    rate_limit: float = _setting(
        10.0,
        _positive_float,
        "starting requests per second for this process; adapted from Resend's headers",
    )
    retry_base: float = _setting(0.5, _positive_duration, "first backoff step")
    retry_cap: float = _setting(30.0, _positive_duration, "largest backoff step")
    retry_max_attempts: int = _setting(
        10, _positive_int, "attempts before a retriable failure is dead-lettered"
    )
    retry_max_elapsed: float = _setting(
        900.0, _positive_duration, "time before a retriable failure is dead-lettered"
    )
    probe_initial: float = _setting(
        1.0, _positive_duration, "first probe interval while a service-wide condition holds"
    )
    probe_max: float = _setting(60.0, _positive_duration, "largest probe interval")
    # Events and routes
    routes_file: Path = _setting(Path("schemas/routes.yaml"), Path, "routes file (YAML)")
    max_event_bytes: int = _setting(
        1_048_576, _positive_int, "records larger than this are dead-lettered (oversized)"
    )
    max_event_age: float = _setting(
        23 * 3600.0,
        _positive_duration,
        "events older than this follow STALE_POLICY (Resend keeps keys 24h)",
    )
    stale_policy: StalePolicy = _setting(
        "dead-letter", _choice(StalePolicy), "what happens to events older than MAX_EVENT_AGE"
    )
    # Pipeline
    max_in_flight: int = _setting(64, _positive_int, "sends in flight, process-wide")
    ordering: Ordering = _setting(
        "key",
        _choice(Ordering),
        "ordering of sends: per Kafka/idempotency key, per partition, or none",
    )
    batch_size: int = _setting(
        100,
        _batch_size,
        "emails per request to /emails/batch, 1 to 100 (1: batching off); routes may override",
    )
    batch_linger: float = _setting(
        0.2,
        _linger,
        "how long a batch waits to fill (urgent routes never wait); routes may override",
    )
    max_pending: int = _setting(
        10_000, _positive_int, "fetched-but-unfinished records, in total, before partitions pause"
    )
    max_pending_per_partition: int = _setting(
        2_000, _positive_int, "fetched-but-unfinished records per partition before it pauses"
    )
    max_pending_bytes: int = _setting(
        256 * 1_048_576,
        _positive_int,
        "bytes of fetched records, rendered bodies and unwritten dead letters before pausing",
    )
    resume_ratio: float = _setting(
        0.5, _ratio, "a paused partition resumes below this share of its bound"
    )
    commit_interval: float = _setting(1.0, _positive_duration, "offset commit interval")
    drain_timeout: float = _setting(
        20.0,
        _positive_duration,
        "on revoke, how long in-flight sends may finish; below KAFKA_REBALANCE_TIMEOUT",
    )
    shutdown_timeout: float = _setting(
        25.0,
        _positive_duration,
        "on SIGTERM, how long in-flight sends may finish; below the pod grace period",
    )
    stall_timeout: float = _setting(
        300.0,
        _positive_duration,
        "a partition with work that finishes nothing this long, unexplained, fails /healthz",
    )
    # Delivery feedback (`resend-consumer webhooks`)
    webhook_host: str = _setting(
        "0.0.0.0",  # noqa: S104 - Resend posts from the internet
        _host,
        "address the webhook receiver binds (`webhooks`; also serves its health and metrics)",
    )
    webhook_port: int = _setting(8081, _port, "port of the webhook receiver (`webhooks`)")
    resend_webhook_secret: tuple[Secret, ...] = _setting(
        (),
        _webhook_secrets,
        "webhook signing secrets whsec_..., space- or comma-separated for rotation (secret)",
        secret=True,
    )
    resend_webhook_secret_file: Path | None = _setting(
        None, Path, "file holding the webhook signing secrets (Kubernetes secret mount)"
    )
    feedback_topic: str = _setting(
        "resend-feedback",
        _topic,
        "topic the webhook receiver writes delivery feedback CloudEvents to",
    )
    feedback_mode: FeedbackMode = _setting(
        "structured",
        _choice(FeedbackMode),
        "CloudEvents mode of feedback records: structured (JSON envelope) or binary (ce_ headers)",
    )
    webhook_max_bytes: int = _setting(
        262_144, _positive_int, "larger webhook bodies are refused with 400"
    )
    webhook_dedup_window: int = _setting(
        100_000, _positive_int, "recent svix-ids remembered to produce a repeated webhook once"
    )
    webhook_produce_timeout: float = _setting(
        10.0,
        _positive_duration,
        "how long a webhook waits for Kafka's ack before it is answered 503",
    )
    # Operations
    health_port: int = _setting(8080, _port, "port of /healthz, /readyz and /metrics (0: off)")
    health_host: str = _setting("0.0.0.0", _host, "address the health server binds")  # noqa: S104 - probes come from the kubelet
    log_level: LogLevel = _setting("info", _choice(LogLevel), "log level")
    log_format: LogFormat = _setting(
        "auto", _choice(LogFormat), "json, console, or auto (console on a TTY)"
    )
    mask_recipients: bool = _setting(True, _bool, "mask email addresses in logs")
    progress_interval: float = _setting(
        10.0, _positive_duration, "interval of the progress log line"
    )

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.drain_timeout >= self.kafka_rebalance_timeout:
            raise SettingsError(
                "DRAIN_TIMEOUT must stay below KAFKA_REBALANCE_TIMEOUT "
                f"({self.drain_timeout}s >= {self.kafka_rebalance_timeout}s): a revoke drain "
                "must finish before the group gives up on this member"
            )
        if not 0 < self.resume_ratio < 1:
            raise SettingsError("RESUME_RATIO must be between 0 and 1")
        if self.max_pending_per_partition > self.max_pending:
            raise SettingsError("MAX_PENDING_PER_PARTITION must not exceed MAX_PENDING")
        if self.max_pending_bytes < 2 * self.max_event_bytes:
            raise SettingsError(
                "MAX_PENDING_BYTES must be at least twice MAX_EVENT_BYTES "
                f"({self.max_pending_bytes} < 2 x {self.max_event_bytes}): one record "
                "and its rendered body must fit"
            )
        quiet = self.retry_cap + self.resend_total_timeout
        if self.stall_timeout <= quiet:
            raise SettingsError(
                f"STALL_TIMEOUT must exceed RETRY_CAP + RESEND_TOTAL_TIMEOUT ({quiet:g}s): "
                "a healthy partition may wait that long between two outcomes"
            )
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise SettingsError(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if not self.kafka_topics and not self.kafka_topic_pattern:
            raise SettingsError("set KAFKA_TOPICS or KAFKA_TOPIC_PATTERN")
        self._check_kafka_security()
        self._check_resend()

    def _check_resend(self) -> None:
        """The base URL is usable and safe for the key; the key has no stray whitespace.

        Messages never quote the key, and show the URL only without credentials.
        """
        problem = base_url_problem(self.resend_base_url)
        if problem is not None:
            shown = without_userinfo(self.resend_base_url)
            raise SettingsError(f"RESEND_BASE_URL={shown!r}: {problem}")
        host = urllib.parse.urlsplit(self.resend_base_url).hostname or ""
        if (
            self.resend_base_url.startswith("http:")
            and not is_loopback(host)
            and not self.resend_allow_http
        ):
            raise SettingsError(
                f"RESEND_BASE_URL={self.resend_base_url!r}: http:// would send the API key "
                "in clear; use https://, or set RESEND_ALLOW_HTTP=true for a sandbox on "
                "another host (a container network)"
            )
        key = self.resend_api_key.get() if self.resend_api_key is not None else ""
        if key and (key != key.strip() or any(c.isspace() or not c.isprintable() for c in key)):
            raise SettingsError(
                "RESEND_API_KEY (or the RESEND_API_KEY_FILE contents): the API key holds "
                "whitespace or a line break (a copy-paste slip?); the key itself is not shown"
            )

    def _check_numbers(self) -> None:
        """NaN and infinities are refused however the object is built (flags, code, env).

        `RATE_LIMIT=nan` used to load: every comparison with NaN is false, so
        the limiter never granted a token and nothing was ever sent.
        """
        for f in FIELDS:
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{f.env}={value}: must be a finite number")
        if not 0 <= self.webhook_port <= 65535:
            raise SettingsError(f"WEBHOOK_PORT={self.webhook_port}: must be a port from 1 to 65535")
        if not 0 <= self.health_port <= 65535:
            raise SettingsError(
                f"HEALTH_PORT={self.health_port}: must be a port from 1 to 65535 (0: off)"
            )

    def _check_kafka_security(self) -> None:
        """Refuse security settings the chosen protocol would silently ignore.

        The classic mistake is setting SASL credentials for Confluent Cloud or
        MSK and forgetting KAFKA_SECURITY_PROTOCOL: the client would then talk
        plaintext to a TLS port and fail with nothing but a connection error.
        """
        protocol = self.kafka_security_protocol
        unused = []
        if not protocol.startswith("SASL"):
            unused += [
                env
                for env, value in (
                    ("KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                )
                if value
            ]
        if protocol not in ("SSL", "SASL_SSL"):
            unused += [
                env
                for env, value in (
                    ("KAFKA_SSL_CAFILE", self.kafka_ssl_cafile),
                    ("KAFKA_SSL_CERTFILE", self.kafka_ssl_certfile),
                    ("KAFKA_SSL_KEYFILE", self.kafka_ssl_keyfile),
                )
                if value
            ]
        if unused:
            raise SettingsError(
                f"{', '.join(unused)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                "them; Confluent Cloud and MSK (SASL/SCRAM) need SASL_SSL"
            )
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise SettingsError("KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE (mutual TLS)")

    # -- building ---------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Read every setting's variable from environ (default os.environ); overrides win.

        Overrides are already-typed values (from CLI flags); None means "not given".
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in FIELDS:
            raw = env.get(f.env)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.parse(raw)
            except (ValueError, TypeError) as exc:
                if f.secret:
                    shown = REDACTED
                elif f.shown is not None:
                    shown = f.shown(raw)
                else:
                    shown = repr(raw)
                raise SettingsError(f"{f.env}={shown}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        key_file = values.get("resend_api_key_file")
        if key_file is not None and values.get("resend_api_key") is None:
            try:
                values["resend_api_key"] = Secret(Path(key_file).read_text().strip())
            except OSError as exc:
                raise SettingsError(
                    f"RESEND_API_KEY_FILE={key_file}: cannot read ({exc.strerror})"
                ) from None
        secret_file = values.get("resend_webhook_secret_file")
        if secret_file is not None and not values.get("resend_webhook_secret"):
            try:
                text = Path(secret_file).read_text()
            except OSError as exc:
                raise SettingsError(
                    f"RESEND_WEBHOOK_SECRET_FILE={secret_file}: cannot read ({exc.strerror})"
                ) from None
            try:
                values["resend_webhook_secret"] = _webhook_secrets(text)
            except ValueError as exc:
                raise SettingsError(f"RESEND_WEBHOOK_SECRET_FILE={secret_file}: {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def dlq_topic_for(self, source_topic: str) -> str:
        return self.dlq_topic or f"{source_topic}.dlq"

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Connection and security keyword arguments shared by aiokafka clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "client_id": self.kafka_client_id,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self._kafka_ssl_context()
        if self.kafka_security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            assert self.kafka_sasl_password is not None  # checked in __post_init__
            kwargs["sasl_plain_password"] = self.kafka_sasl_password.get()
        return kwargs

    def _kafka_ssl_context(self) -> ssl.SSLContext:
        """Verifying TLS context: the broker's chain and its host name or IP SAN are checked.

        Without KAFKA_SSL_CAFILE the system's CAs are used (Confluent Cloud, MSK).
        A missing or unreadable file is a SettingsError naming the variable.
        """
        env, hint = "KAFKA_SSL_CAFILE", "PEM certificates expected"
        try:
            context = ssl.create_default_context(cafile=self.kafka_ssl_cafile)
            if self.kafka_ssl_certfile is not None:
                env, hint = "KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE", "PEM, key not encrypted"
                # an empty password instead of None: OpenSSL would otherwise prompt on
                # the terminal for an encrypted key and the service would hang there
                context.load_cert_chain(
                    self.kafka_ssl_certfile, self.kafka_ssl_keyfile, password=lambda: b""
                )
        except OSError as exc:  # ssl.SSLError included; its strerror is None
            reason = exc.strerror or f"{exc}; {hint}"
            raise SettingsError(f"{env}: cannot load ({reason})") from None
        return context


#: every setting in declaration order; the variable is the field name in capitals
FIELDS: Final[tuple[Field, ...]] = tuple(
    Field(f.name, f.name.upper(), **f.metadata[_SPEC]) for f in dataclasses.fields(Settings)
)


def defaults_table() -> list[tuple[str, str, str]]:
    """(ENV, default shown, meaning) for every setting, in declaration order."""
    defaults = Settings()
    rows = []
    for f in FIELDS:
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            shown = ",".join(value)
        elif value is None:
            shown = ""
        else:
            shown = str(value)
        rows.append((f.env, shown, f.help))
    return rows
