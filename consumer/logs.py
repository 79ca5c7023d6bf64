"""Structured logging: structlog configured once, for the service and its libraries.

JSON lines (orjson, bytes straight to stdout) in production; a readable console
renderer on a TTY. One processor runs on every line, before rendering, so no
code path can forget it (the rules are `consumer.redact`'s):

- the value of any key that names a secret (api_key, password, authorization,
  ...) is dropped, and credentials in any string (Resend keys `re_...`, Bearer
  tokens, the configured API key and SASL password) are redacted, tracebacks
  included;
- when `MASK_RECIPIENTS` (the default), every email address in any string
  value is shortened to `ja***@example.com`.

Logs of aiokafka and aiohttp go through the same processors and renderer via
`structlog.stdlib.ProcessorFormatter`, at WARNING: aiokafka is chatty at INFO.

Log event names the service emits are declared once in `LogEvent`.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime
from enum import StrEnum
from typing import IO, Any, Final
from uuid import UUID

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from consumer.redact import REDACTED, is_secret_key, mask_addresses, redact_secrets
from consumer.settings import Settings

__all__ = [
    "LogEvent",
    "configure_logging",
    "log_outcome",
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
    STARTED = "service.started"
    STOPPING = "service.stopping"
    STOPPED = "service.stopped"


#: libraries whose stdlib loggers are routed through our renderer
LIBRARY_LOGGERS: Final = ("aiokafka", "kafka", "aiohttp", "asyncio")

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Marks the root handler we installed, so a second configure_logging replaces it.
_HANDLER_MARK: Final = "_resend_consumer_handler"


def _scrub(value: Any, text: Callable[[str], str]) -> Any:
    """Apply `text` to every string inside value; drop secrets by key name on the way."""
    if isinstance(value, str):
        return text(value)
    if value is None or isinstance(value, int | float | datetime | date | UUID):
        return value  # rendered by orjson as is; no text that could hold a secret
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else _scrub(v, text)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, text) for v in value]
    # Anything else (exceptions, bytes, objects) would reach the renderer as its
    # repr, unscrubbed: turn it into that text here, where it is scrubbed.
    return text(repr(value))


class _LineScrubber:
    """Processor: secrets by field name, secrets in any text (the configured values
    too) and, when `mask`, every address, in a single walk over the line."""

    def __init__(self, *, exact: tuple[str, ...], mask: bool) -> None:
        self._exact = exact
        self._mask = mask

    def text(self, text: str) -> str:
        text = redact_secrets(text, self._exact)
        return mask_addresses(text) if self._mask else text

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        for key, value in list(event_dict.items()):
            event_dict[key] = REDACTED if is_secret_key(key) else _scrub(value, self.text)
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

    def __init__(self, renderer: Processor, *, text: Callable[[str], str]) -> None:
        self._renderer = renderer
        self._text = text

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        out = self._renderer(logger, name, event_dict)
        return self._text(out) if isinstance(out, str) else out


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
    scrubber = _LineScrubber(exact=known, mask=settings.mask_recipients)
    scrubbers: list[Processor] = [scrubber]

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
        renderer = _Scrubbed(structlog.dev.ConsoleRenderer(colors=colors), text=scrubber.text)
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
