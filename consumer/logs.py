"""Structured logging: structlog configured once, for the service and its libraries.

JSON lines (orjson, bytes straight to stdout) in production; a readable console
renderer on a TTY. Two processors run on every line, before rendering, so no
code path can forget them:

- `scrub_secrets` drops the value of any key that names a secret (api_key,
  password, authorization, ...) and rewrites anything shaped like a Resend API
  key (`re_...`) in any string, tracebacks included;
- `mask_recipients` (when `MASK_RECIPIENTS`, the default) shortens every email
  address in any string value to `ja***@example.com`.

Logs of aiokafka and aiohttp go through the same processors and renderer via
`structlog.stdlib.ProcessorFormatter`, at WARNING: aiokafka is chatty at INFO.

Log event names the service emits are declared once in `LogEvent`.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime
from enum import StrEnum
from typing import IO, Any, Final
from uuid import UUID

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from consumer.settings import Settings

__all__ = [
    "REDACTED",
    "LogEvent",
    "configure_logging",
    "log_outcome",
    "mask_email",
    "mask_recipients",
    "scrub_secrets",
]


class LogEvent(StrEnum):
    """The `event` field of every line the service itself writes (grep-able, declared once)."""

    #: the canonical line: one per event outcome
    OUTCOME = "event.outcome"
    PROGRESS = "progress"
    ASSIGNED = "partitions.assigned"
    REVOKED = "partitions.revoked"
    PAUSED = "partitions.paused"
    RESUMED = "partitions.resumed"
    CIRCUIT_OPEN = "circuit.open"
    CIRCUIT_CHANGED = "circuit.changed"
    CIRCUIT_CLOSED = "circuit.closed"
    QUOTA = "quota.exceeded"
    COMMIT_FAILED = "commit.failed"
    COMMITTED = "offsets.committed"
    FETCH_FAILED = "fetch.failed"
    DUPLICATE_RECORD = "fetch.duplicate_record"
    #: a recovered batch plan names records the log no longer holds (compacted away)
    BATCH_MEMBERS_MISSING = "batch.members_missing"
    BROKER_UNREACHABLE = "broker.unreachable"
    BROKER_REACHABLE = "broker.reachable"
    INTERNAL_ERROR = "internal_error"
    DRAIN_TIMEOUT = "drain.timeout"
    LATE_COMPLETION = "completion.after_revoke"
    DLQ_UNAVAILABLE = "dlq.unavailable"
    DLQ_AVAILABLE = "dlq.available"
    #: a partition with work finished nothing for STALL_TIMEOUT and nothing explains it
    PARTITION_STALLED = "partition.stalled"
    PARTITION_RECOVERED = "partition.recovered"
    #: a newer owner fenced this member's committer for the partition
    PARTITION_FENCED = "partition.fenced"
    #: the committer could not fence the previous owners of newly assigned partitions
    ASSIGN_FAILED = "partitions.assign_failed"
    HEALTH_SERVER = "health.listening"
    STARTED = "service.started"
    STOPPING = "service.stopping"
    STOPPED = "service.stopped"


#: what a secret value is replaced with
REDACTED: Final = "[redacted]"

#: keys whose values are never logged, whatever they hold (compared lower-cased)
SECRET_KEYS: Final = frozenset(
    {
        "api_key",
        "apikey",
        "resend_api_key",
        "password",
        "sasl_plain_password",
        "kafka_sasl_password",
        "authorization",
        "secret",
        "token",
    }
)

#: libraries whose stdlib loggers are routed through our renderer
LIBRARY_LOGGERS: Final = ("aiokafka", "kafka", "aiohttp", "asyncio")

# A Resend API key: `re_` then letters, digits and underscores. The word
# boundary keeps words like "are_you" intact while catching keys anywhere.
_RESEND_KEY: Final = re.compile(r"\bre_[A-Za-z0-9_]+")
_KEY_REPLACEMENT: Final = "re_" + REDACTED
# Deliberately loose: masking a false positive costs nothing, missing an address leaks it.
_EMAIL: Final = re.compile(r"([A-Za-z0-9._%+\-]{1,64})@([A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+)")

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Marks the root handler we installed, so a second configure_logging replaces it.
_HANDLER_MARK: Final = "_resend_consumer_handler"


def _mask_match(m: re.Match[str]) -> str:
    return f"{m.group(1)[:2]}***@{m.group(2)}"


def mask_email(address: str) -> str:
    """'jane@example.com' -> 'ja***@example.com'; every address inside a longer string too."""
    # the substring test skips the regex for the vast majority of values
    return _EMAIL.sub(_mask_match, address) if "@" in address else address


@functools.lru_cache(maxsize=4096)
def _is_secret_key(key: object) -> bool:
    # field names repeat on every line: the answer is cached per name
    if not isinstance(key, str):
        return False
    low = key.lower().replace("-", "_")
    return low in SECRET_KEYS or low.endswith(("_password", "_api_key", "_secret", "_token"))


def _scrub(value: Any, text: Callable[[str], str]) -> Any:
    """Apply `text` to every string inside value; drop secrets by key name on the way."""
    if isinstance(value, str):
        return text(value)
    if value is None or isinstance(value, int | float | datetime | date | UUID):
        return value  # rendered by orjson as is; no text that could hold a secret
    if isinstance(value, Mapping):
        return {k: (REDACTED if _is_secret_key(k) else _scrub(v, text)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, text) for v in value]
    # Anything else (exceptions, bytes, objects) would reach the renderer as its
    # repr, unscrubbed: turn it into that text here, where it is scrubbed.
    return text(repr(value))


def _redact_keys(text: str) -> str:
    return _RESEND_KEY.sub(_KEY_REPLACEMENT, text) if "re_" in text else text


def scrub_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: no secret by key name, no Resend-key-shaped string, anywhere in the line."""
    for key, value in list(event_dict.items()):
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(value, _redact_keys)
    return event_dict


class _LineScrubber:
    """Processor: `scrub_secrets`, the configured secret values, and (optionally)
    `mask_recipients`, in a single walk over the line."""

    def __init__(self, *, exact: tuple[str, ...], mask: bool) -> None:
        self._exact = exact
        self._mask = mask

    def _text(self, text: str) -> str:
        text = _redact_keys(text)
        for secret in self._exact:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return mask_email(text) if self._mask else text

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in list(event_dict.items()):
            event_dict[key] = REDACTED if _is_secret_key(key) else _scrub(value, self._text)
        return event_dict


def mask_recipients(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Processor: every email address in every string value is masked."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub(value, mask_email)
    return event_dict


def _uses_json(settings: Settings, stream: IO[Any]) -> bool:
    if settings.log_format == "json":
        return True
    if settings.log_format == "console":
        return False
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def _is_binary(stream: Any) -> bool:
    return isinstance(stream, io.RawIOBase | io.BufferedIOBase) or (
        not isinstance(stream, io.TextIOBase) and "b" in getattr(stream, "mode", "")
    )


def _orjson_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def _orjson_bytes(obj: Any, **_: Any) -> bytes:
    # default=repr: an odd object in a log line must never break the line
    return orjson.dumps(obj, default=repr)


class _Scrubbed:
    """Wrap a renderer so its output is scrubbed once more (console tracebacks)."""

    def __init__(self, renderer: Processor, *, mask: bool) -> None:
        self._renderer = renderer
        self._mask = mask

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        out = self._renderer(logger, name, event_dict)
        if isinstance(out, str):
            out = _redact_keys(out)
            if self._mask:
                out = mask_email(out)
        return out


class _RetriedIsNotAnError(logging.Filter):
    """aiokafka logs conditions it retries by itself at ERROR (a fresh broker's
    `GroupCoordinatorNotAvailableError` on every start, a coordinator moving):
    those become warnings. Health tells whether they last."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith("aiokafka"):
            args = record.args if isinstance(record.args, tuple) else ()
            if any(
                isinstance(a, Exception) and getattr(a, "retriable", False) is True for a in args
            ):
                record.levelno = logging.WARNING
                record.levelname = "WARNING"
        return True


class _BinaryStreamHandler(logging.Handler):
    """stdlib handler writing to the same binary stream as structlog, line by line."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace") + b"\n"
            self._stream.write(line)
            self._stream.flush()
        except Exception:  # logging must never take the service down
            self.handleError(record)


def configure_logging(settings: Settings, *, stream: IO[Any] | None = None) -> None:
    """Configure structlog and the stdlib root logger from settings. Safe to call again.

    `stream` defaults to stdout; a binary stream (or stdout's buffer) gets
    orjson bytes directly, a text stream gets text.
    """
    # Any: the stream is text or binary, decided at run time below
    out: Any = sys.stdout if stream is None else stream
    as_json = _uses_json(settings, out)
    level = _LEVELS[settings.log_level]
    binary = _is_binary(out)
    if as_json and not binary and out is sys.stdout and hasattr(out, "buffer"):
        # orjson makes bytes: skip the text layer (structlog's performance guide)
        out.flush()
        out, binary = out.buffer, True

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    known = tuple(
        secret.get()
        for secret in (settings.resend_api_key, settings.kafka_sasl_password)
        if secret is not None and len(secret.get()) >= 4
    )
    # One walk over each line does all three jobs (secret key names, secret values
    # and key-shaped strings, addresses): the line is walked once, not three times.
    scrubbers: list[Processor] = [
        _LineScrubber(exact=known, mask=settings.mask_recipients),
    ]

    if as_json:
        # exceptions become strings before the scrubbers see them
        before: list[Processor] = [structlog.processors.format_exc_info]
        renderer: Processor = structlog.processors.JSONRenderer(
            serializer=_orjson_bytes if binary else _orjson_str
        )
        std_renderer: Processor = structlog.processors.JSONRenderer(serializer=_orjson_str)
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        before = []
        renderer = _Scrubbed(
            structlog.dev.ConsoleRenderer(colors=colors), mask=settings.mask_recipients
        )
        std_renderer = renderer

    factory: Any = (
        structlog.BytesLoggerFactory(file=out) if binary else structlog.PrintLoggerFactory(file=out)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            *before,
            *scrubbers,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        # Not cached: configure_logging may run again (tests, CLI commands) and
        # loggers bound at import time must follow. It costs a few microseconds a
        # line, nothing next to one HTTP request per event.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *before],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *scrubbers,
            std_renderer,
        ],
    )
    handler: logging.Handler = _BinaryStreamHandler(out) if binary else logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_RetriedIsNotAnError())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # Libraries speak at WARNING and above (aiokafka logs every rebalance step at INFO).
    root.setLevel(max(level, logging.WARNING))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_outcome(
    logger: Any,
    *,
    outcome: str,
    event_id: str | None,
    event_type: str | None,
    source: str | None,
    topic: str,
    partition: int,
    offset: int,
    idempotency_key: str | None,
    attempts: int,
    latency: float,
    email_id: str | None = None,
    reason: str | None = None,
    message: str | None = None,
    answer_time: float | None = None,
    trace_id: str | None = None,
) -> None:
    """Write the canonical line of one event's outcome (field names fixed here, once).

    Dead letters log at WARNING, everything else at INFO, a dead letter with the
    message `render` would print beside its reason (addresses in it are masked
    like every string of the line). `latency` is seconds from fetch to outcome,
    logged in milliseconds as `latency_ms`; when requests were made, it is split
    into `resend_ms` (inside HTTP attempts: Resend's answer time) and `wait_ms`
    (the rest: the lane's queue, the rate-limit pacing, backoffs, the gate).
    `trace_id` (32 hex digits, from `consumer.tracing`) is there only while
    tracing is on.
    """
    fields = {
        "outcome": outcome,
        "event_id": event_id,
        "event_type": event_type,
        "source": source,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "idempotency_key": idempotency_key,
        "attempts": attempts,
        "latency_ms": round(latency * 1000.0, 1),
        "resend_ms": None if answer_time is None else round(answer_time * 1000.0, 1),
        "wait_ms": None if answer_time is None else round((latency - answer_time) * 1000.0, 1),
        "email_id": email_id,
        "reason": reason,
        "message": message,
        "trace_id": trace_id,
    }
    method = logger.warning if outcome == "dead_lettered" else logger.info
    method(LogEvent.OUTCOME.value, **{k: v for k, v in fields.items() if v is not None})
