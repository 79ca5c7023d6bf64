"""One error hierarchy for the service: every class raised on purpose is here.

    ConsumerError
    ├── RetriableError          try again later, same key, same bytes
    │   ├── TransportError      timeout, reset, DNS: outcome unknown
    │   ├── ResendRetriable     5xx, 429 rate limit, 409 concurrent/locked
    │   └── CommitFailed        an offset commit (or its transaction) did not happen: again
    ├── PermanentError          this event can never succeed: dead-letter it
    │   ├── InvalidEvent        bad input (reason code from events.Reason)
    │   └── ResendRejected      4xx for this email (validation, from address, ...)
    ├── FatalError              service-wide: pause everything, keep offsets, probe
    │   ├── AuthError           missing/invalid/restricted/suspended API key
    │   ├── EndpointError       404/405: wrong base URL
    │   ├── QuotaExceeded       daily or monthly quota
    │   ├── DeadLetterUnavailable   the dead-letter topic cannot be written
    │   └── KafkaUnavailable        Kafka unreachable or refusing us at start-up
    ├── PartitionFenced         none of the three: a newer owner has the partition;
    │                           drop its work, commit nothing more for it
    ├── SettingsError           a setting is missing or malformed (exit 2)
    │   ├── RoutesError         the routes file, a schema or a template is unusable
    │   │   └── TemplateReferenceError   a dynamic, missing or outside include/import
    │   ├── KeyTemplateError    a key template that cannot give valid, distinct keys
    │   └── TracingUnavailable  OTEL_* asks for tracing, the `otel` extra is missing
    └── BadInput                input given to a command cannot become an event (exit 3)

What the pipeline does with an error follows from its branch (`isinstance`);
what a Resend answer means is decided once, by `resend.Answer.verdict`, and
`Answer.error()` gives the class here. A command that fails with any of them
ends through `cli.main`, which catches `ConsumerError` alone: `exit_code` and
`describe()` say how. The settings, routes, key and input errors are also
`ValueError`s (they were before they joined the tree, and parsing code catches
them as such). Messages never contain secrets: build them from reason codes,
names and statuses, never from request headers.

Not here: `feedback.Refused` (the webhook receiver's 4xx answer, caught where it
is raised), `templates.TemplateOutside` (jinja's own TemplateNotFound protocol)
and `fetch.Undecodable` (a record, not an exception).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from consumer.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_USAGE

#: at most this many bad input lines are listed; the count says how many more
MAX_REPORTED: Final = 20


class ConsumerError(Exception):
    """Base of every error this package raises on purpose."""

    #: stable, machine-readable reason code (dead-letter header, metrics label)
    reason: str = "error"
    #: how a command that ends with this error exits (`consumer.exitcodes`)
    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def describe(self) -> str:
        """The one line a command prints for this error (after `resend-consumer: `)."""
        return f"{self} [{self.reason}]"


class RetriableError(ConsumerError):
    """Transient: retry later with the same idempotency key and the same bytes."""

    reason = "retriable"


class PermanentError(ConsumerError):
    """This event cannot succeed as it is: dead-letter it with its reason."""

    reason = "permanent"


class FatalError(ConsumerError):
    """Service-wide condition: stop sending, keep offsets, report not-ready, probe."""

    reason = "fatal"


class InvalidEvent(PermanentError):
    """A record that is not a valid event; `reason` is one of `events.Reason`."""

    reason = "invalid_event"


class TransportError(RetriableError):
    """Timeout, connection reset, DNS: the outcome is unknown, so retry the same bytes."""

    reason = "transport_error"


class ResendRetriable(RetriableError):
    """Resend answered 5xx, 429 rate limit or 409 concurrent/locked: retry later."""

    reason = "resend_retriable"


class CommitFailed(RetriableError):
    """An offset commit (or the transaction carrying it) was refused, aborted or timed out.

    Nothing of it is visible: the positions and dead letters are kept and the same
    commit is tried again later.
    """

    reason = "commit_failed"


class ResendRejected(PermanentError):
    """Resend refused this one email (4xx): dead-letter it; `reason` names the error."""

    reason = "resend_rejected"


class AuthError(FatalError):
    """Missing, invalid, restricted or suspended API key: nothing can be sent."""

    reason = "auth"


class EndpointError(FatalError):
    """404/405/3xx or a non-API answer: RESEND_BASE_URL points at the wrong place."""

    reason = "endpoint"


class QuotaExceeded(FatalError):
    """Daily or monthly quota used up: wait for the reset, keep offsets."""

    reason = "quota"


class PartitionFenced(ConsumerError):
    """A newer owner of the partition fenced our producer: its work here is over.

    Neither retriable (this process can no longer commit for the partition), nor
    permanent (the events are fine), nor fatal (other partitions go on): drop the
    partition's pending work and wait for the rebalance that takes it away.
    """

    reason = "partition_fenced"


class DeadLetterUnavailable(FatalError):
    """The dead-letter topic could not be written: pause rather than skip."""

    reason = "dlq_unavailable"


class KafkaUnavailable(FatalError):
    """Kafka could not be reached or refused us at start-up (address, TLS, SASL)."""

    reason = "kafka_unavailable"


# -- configuration and input: a command cannot run as asked ---------------------------


class SettingsError(ConsumerError, ValueError):
    """A setting is missing or malformed; the message names the variable."""

    reason = "settings"
    exit_code = EXIT_USAGE

    def describe(self) -> str:
        return f"configuration error: {self}"


class RoutesError(SettingsError):
    """The routes file, a schema or a template is unusable; names file, route and field."""

    reason = "routes"


class TemplateReferenceError(RoutesError):
    """An include/import/extends that is not a literal name inside the templates folder."""

    reason = "template_reference"


class KeyTemplateError(SettingsError):
    """A key template that cannot give valid, distinct keys; the message says why."""

    reason = "key_template"


class TracingUnavailable(SettingsError):
    """OTEL_* asks for tracing but the `otel` extra is not installed. Fatal at start-up."""

    reason = "tracing_unavailable"


class BadInput(ConsumerError, ValueError):
    """Input that cannot become an event; `problems` are (line number, message)."""

    reason = "bad_input"
    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Sequence[tuple[int, str]]) -> None:
        self.problems = list(problems)
        shown = [f"line {n}: {msg}" for n, msg in self.problems[:MAX_REPORTED]]
        if len(self.problems) > MAX_REPORTED:
            shown.append(f"... and {len(self.problems) - MAX_REPORTED} more")
        super().__init__("\n".join(shown))
