"""One error hierarchy for the service.

    ConsumerError
    ├── RetriableError          try again later, same key, same bytes
    │   ├── TransportError      timeout, reset, DNS: outcome unknown
    │   └── ResendRetriable     5xx, 429 rate limit, 409 concurrent/locked
    ├── PermanentError          this event can never succeed: dead-letter it
    │   ├── InvalidEvent        bad input (reason code from events.Reason)
    │   └── ResendRejected      4xx for this email (validation, from address, ...)
    └── FatalError              service-wide: pause everything, keep offsets, probe
        ├── AuthError           missing/invalid/restricted/suspended API key
        ├── EndpointError       404/405: wrong base URL
        ├── QuotaExceeded       daily or monthly quota
        └── DeadLetterUnavailable   the dead-letter topic cannot be written

Every class says what the pipeline does with it through `retriable`,
`permanent` and `fatal`. Messages never contain secrets: build them from
reason codes, names and statuses, never from request headers.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Base of every error this package raises on purpose."""

    retriable: bool = False
    permanent: bool = False
    fatal: bool = False
    #: stable, machine-readable reason code (dead-letter header, metrics label)
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class RetriableError(ConsumerError):
    """Transient: retry later with the same idempotency key and the same bytes."""

    retriable = True
    reason = "retriable"


class PermanentError(ConsumerError):
    """This event cannot succeed as it is: dead-letter it with its reason."""

    permanent = True
    reason = "permanent"


class FatalError(ConsumerError):
    """Service-wide condition: stop sending, keep offsets, report not-ready, probe."""

    fatal = True
    reason = "fatal"


class InvalidEvent(PermanentError):
    """A record that is not a valid event; `reason` is one of `events.Reason`."""

    reason = "invalid_event"


class DeadLetterUnavailable(FatalError):
    """The dead-letter topic could not be written: pause rather than skip."""

    reason = "dlq_unavailable"
