"""One error hierarchy for the service.

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
    │   ├── ResendUnavailable   Resend down for long (a run of 5xx/transport failures)
    │   ├── DeadLetterUnavailable   the dead-letter topic cannot be written
    │   └── KafkaUnavailable        Kafka unreachable or refusing us at start-up
    └── PartitionFenced         none of the three: a newer owner has the partition;
                                drop its work, commit nothing more for it

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


class ResendUnavailable(FatalError):
    """Resend failed for a run of attempts across the process: pause and probe."""

    reason = "outage"


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
