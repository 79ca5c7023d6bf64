"""Backoff policy, the service gate, and `deliver`: one event's send with retries.

* `RetryPolicy`: exponential backoff with full jitter (delay drawn uniformly from
  0 to min(cap, base * 2**(attempt-1))), never shorter than the server's
  `retry-after`, within a budget of attempts and elapsed time.
* `ServiceGate`: the process-wide circuit for service-wide conditions (bad API
  key, wrong base URL, quota, Resend down). "closed" means sending; "open" means
  waiting, and exactly one delivery at a time is let through as a probe, at an
  interval that doubles (with jitter) up to `probe_max`. The first success
  closes it and everyone resumes. Each change of state is logged once.
* `deliver`: holds an in-flight slot only during an HTTP attempt, waits on the
  gate while it is open, and ends in `Outcome.SENT` or `DEAD_LETTERED` (or `SKIPPED`, when
  its `check` refuses a send the caller's policy drops). Service-wide trouble
  never dead-letters: waits on the gate and probe attempts do not spend the
  retry budget, and neither do 429 rate-limit answers (the limiter's job).
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

import structlog

from consumer.events import Outcome, Refusal
from consumer.logs import LogEvent
from consumer.resend import Answer, Condition

if TYPE_CHECKING:
    from consumer.settings import Settings

log = structlog.get_logger("consumer.retry")

GateState = Literal["closed", "open"]
GateCondition = Condition | Literal["outage"]
REASON_SENT: Final = "sent"
REASON_EXHAUSTED: Final = "retries_exhausted"


# -- backoff -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a budget of attempts and time."""

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int = 10
    max_elapsed: float = 900.0
    #: uniform in [0, 1); injectable so tests can pin the jitter
    random: Callable[[], float] = _random.random

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            base=settings.retry_base,
            cap=settings.retry_cap,
            max_attempts=settings.retry_max_attempts,
            max_elapsed=settings.retry_max_elapsed,
        )

    def ceiling(self, attempt: int) -> float:
        """The largest backoff after failed attempt number `attempt` (1-based)."""
        # Cap the exponent first so a long outage cannot overflow a float.
        return min(self.cap, self.base * 2.0 ** min(max(attempt - 1, 0), 62))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt`; at least `retry_after`."""
        jittered = self.random() * self.ceiling(attempt)
        if retry_after is not None:
            return max(jittered, retry_after)
        return jittered

    def exhausted(self, attempts: int, elapsed: float) -> bool:
        """True once `attempts` budgeted attempts or `elapsed` seconds are spent."""
        return attempts >= self.max_attempts or elapsed >= self.max_elapsed


# -- the service gate --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ticket:
    """Permission for one attempt; `probe` attempts are the gate's, not the event's."""

    probe: bool
    epoch: int


class OnChange(Protocol):
    def __call__(self, old: GateState, new: GateState, condition: GateCondition | None) -> None: ...


class ServiceGate:
    """Process-wide circuit: closed (sending) or open (service-wide condition, probing)."""

    def __init__(
        self,
        *,
        probe_initial: float = 1.0,
        probe_max: float = 60.0,
        on_change: OnChange | None = None,
        outage_failures: int = 5,
        outage_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """Opens for "outage" after `outage_failures` consecutive 5xx/transport failures
        with no success between them, or failures spanning `outage_seconds`.
        """
        self.probe_initial = probe_initial
        self.probe_max = max(probe_max, probe_initial)
        self._on_change = on_change
        self.outage_failures = outage_failures
        self.outage_seconds = outage_seconds
        self._clock = clock
        self._random = random
        self._state: GateState = "closed"
        self._condition: GateCondition | None = None
        self._epoch = 0
        self._changed = asyncio.Event()
        self._probe_busy = False
        self._interval = probe_initial
        self._next_probe = 0.0
        self._opened_at = 0.0
        self._failures = 0
        self._failing_since = 0.0
        self._healthy = 0
        self.probes = 0
        self.opened = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, on_change: OnChange | None = None) -> ServiceGate:
        return cls(
            probe_initial=settings.probe_initial,
            probe_max=settings.probe_max,
            on_change=on_change,
        )

    def __repr__(self) -> str:
        return (
            f"<ServiceGate state={self._state} condition={self._condition} "
            f"failures={self._failures} opened={self.opened} probes={self.probes}>"
        )

    @property
    def state(self) -> GateState:
        return self._state

    @property
    def condition(self) -> GateCondition | None:
        """Why the gate is open (None while closed)."""
        return self._condition

    @property
    def ready(self) -> bool:
        """Readiness for /readyz: False while a service-wide condition holds."""
        return self._state == "closed"

    @property
    def failing(self) -> bool:
        """True while the latest process-wide answers are 5xx/transport failures."""
        return self._failures > 0

    @property
    def healthy(self) -> int:
        """How many answers so far showed Resend up (grows; compare two readings)."""
        return self._healthy

    async def wait_closed(self) -> None:
        """Return once the gate is closed (at once if it is)."""
        while self._state == "open":
            await self._changed.wait()

    def probe_due(self) -> bool:
        """True while open, a probe is due, and no delivery holds the probe turn.

        Lets the owner of the gate probe by itself when no delivery waits (all
        cancelled by a revoke, every partition paused): take the turn with
        `try_probe()`, then `record` the answer or `abandon` the ticket.
        """
        return self._state == "open" and not self._probe_busy and self._clock() >= self._next_probe

    @property
    def probe_in(self) -> float | None:
        """Seconds until the next probe is due (0 if due now), None while closed."""
        if self._state == "closed":
            return None
        return max(0.0, self._next_probe - self._clock())

    def try_probe(self) -> Ticket | None:
        """Take the probe turn at once if `probe_due()`, else None; never waits."""
        if not self.probe_due():
            return None
        self._probe_busy = True
        self.probes += 1
        return Ticket(probe=True, epoch=self._epoch)

    async def admit(self) -> Ticket:
        """Wait for permission to attempt: at once while closed, else a probe turn."""
        while True:
            if self._state == "closed":
                return Ticket(probe=False, epoch=self._epoch)
            timeout: float | None = None
            if not self._probe_busy:
                ticket = self.try_probe()
                if ticket is not None:
                    return ticket
                timeout = self._next_probe - self._clock()
            changed = self._changed
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                pass

    def abandon(self, ticket: Ticket) -> None:
        """The attempt of `ticket` ended without an answer (cancelled, or never sent):
        free the probe turn, so the next waiter probes at once.
        """
        if ticket.probe and ticket.epoch == self._epoch and self._probe_busy:
            self._probe_busy = False
            self._notify()

    def record(self, ticket: Ticket, answer: Answer) -> None:
        """Learn from the answer to the attempt `ticket` allowed."""
        now = self._clock()
        if self._state == "open":
            if not (ticket.probe and ticket.epoch == self._epoch):
                # Answers to requests sent before the gate opened say nothing new.
                return
            self._probe_busy = False
            if answer.verdict == "fatal":
                self._schedule_probe(now, answer.retry_after)
                self._set("open", answer.condition)
            elif answer.outage_signal:
                self._schedule_probe(now, answer.retry_after)
                self._notify()
            else:
                # Any other answer means Resend is reachable and accepts our key.
                self._failures = 0
                self._healthy += 1
                self._set("closed", None)
            return
        if answer.verdict == "fatal":
            self._open(now, answer.condition, answer.retry_after)
        elif answer.outage_signal:
            if self._failures == 0:
                self._failing_since = now
            self._failures += 1
            long_run = self._failures >= 2 and now - self._failing_since >= self.outage_seconds
            if self._failures >= self.outage_failures or long_run:
                self._open(now, "outage", answer.retry_after)
        else:
            self._failures = 0
            self._healthy += 1

    # -- internals ---------------------------------------------------------------

    def _open(self, now: float, condition: GateCondition | None, retry_after: float | None) -> None:
        self._epoch += 1
        self._probe_busy = False
        self._opened_at = now
        self._interval = self.probe_initial
        self._next_probe = now
        self._schedule_probe(now, retry_after)
        self.opened += 1
        self._set("open", condition)

    def _schedule_probe(self, now: float, retry_after: float | None) -> None:
        # Jitter in [interval/2, interval) so replicas do not probe in lockstep.
        wait = self._interval * (0.5 + 0.5 * self._random())
        if retry_after is not None:
            # Wait for a reset we know of (daily quota), but probe at least every probe_max.
            wait = min(max(wait, retry_after), self.probe_max)
        self._next_probe = now + wait
        self._interval = min(self._interval * 2.0, self.probe_max)

    def _set(self, state: GateState, condition: GateCondition | None) -> None:
        old, old_condition = self._state, self._condition
        self._state, self._condition = state, condition
        if (old, old_condition) != (state, condition):
            if state == "open":
                log.warning(
                    LogEvent.CIRCUIT_OPEN if old == "closed" else LogEvent.CIRCUIT_CHANGED,
                    condition=condition,
                    previous=old_condition,
                    next_probe_in=round(max(0.0, self._next_probe - self._clock()), 3),
                )
            else:
                log.info(
                    LogEvent.CIRCUIT_CLOSED,
                    previous=old_condition,
                    paused_for=round(self._clock() - self._opened_at, 3),
                    probes=self.probes,
                )
            if self._on_change is not None:
                self._on_change(old, state, condition)
        self._notify()

    def _notify(self) -> None:
        # Wake every waiter once; later waiters wait on a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


# -- delivering one event ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryResult:
    """How one event's delivery ended. Times are epoch seconds."""

    outcome: Outcome
    email_id: str | None
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    last: Answer | None
    reason: str
    #: ids of a batch, in input order
    email_ids: list[str] | None = None
    #: seconds spent in HTTP attempts (Resend's answer time), without any wait
    answer_time: float = 0.0


class Sender(Protocol):
    async def send(
        self,
        *,
        endpoint: str,
        body: bytes,
        idempotency_key: str | None,
        headers: Mapping[str, str] | None = None,
        paced: bool = False,
    ) -> Answer: ...


async def deliver(
    client: Sender,
    *,
    endpoint: str,
    body: bytes,
    idempotency_key: str | None,
    policy: RetryPolicy,
    gate: ServiceGate,
    slots: asyncio.Semaphore,
    headers: Mapping[str, str] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_attempt: Callable[[bool], None] | None = None,
    pace: Callable[[], Awaitable[None]] | None = None,
    check: Callable[[], str | None] | None = None,
    refused_as: Refusal = Outcome.DEAD_LETTERED,
    on_answer: Callable[[Answer], None] | None = None,
) -> DeliveryResult:
    """Send one prepared request until it is sent or must be dead-lettered.

    Service-wide conditions make it wait (until the gate closes or the task is
    cancelled), never dead-letter. Cancelling it is safe at any await.
    `on_attempt(True)` / `on_attempt(False)` bracket each HTTP attempt, so a
    revoke can tell a request on the wire from one waiting for a slot or a backoff.
    `pace` (the client's rate-limit wait) is awaited before a slot is taken, so a
    delivery waiting for a rate-limit token holds no in-flight slot either. Only
    the attempts and the backoffs between them spend `policy.max_elapsed`.

    `check()` is asked before each attempt whether the request may still be sent
    (an event's freshness: gate pauses and 429 waits are unbounded). It runs once
    the gate ticket is held, before the rate-limit wait (a refused event spends no
    token) and again with the slot held, the last moment before the request goes
    out. A reason string ends the delivery at once, nothing sent, in outcome
    `refused_as` with that reason; the gate's probe turn, if held, is handed on.

    `on_answer(answer)` sees each attempt's answer before `on_attempt(False)`
    (a tracing span records the status, then ends).
    """
    attempts = 0  # every HTTP attempt
    budgeted = 0  # attempts that spend the retry budget
    spent = 0.0  # seconds that spend the budget (gate waits excluded)
    first_at = last_at = 0.0
    answering = 0.0  # seconds inside client.send
    # gate.healthy when this delivery's current run of 5xx/transport failures began
    healthy_mark: int | None = None
    last: Answer | None = None
    while True:
        ticket = await gate.admit()
        try:
            refused = check() if check is not None else None
            if refused is not None:
                gate.abandon(ticket)
                return _refused(refused_as, refused, last, attempts, first_at, last_at, answering)
            if pace is not None:
                await pace()
            async with slots:
                refused = check() if check is not None else None
                if refused is not None:
                    gate.abandon(ticket)
                    return _refused(
                        refused_as, refused, last, attempts, first_at, last_at, answering
                    )
                if on_attempt is not None:
                    on_attempt(True)
                # Only the attempt itself (and the backoff after it) spends the time
                # budget: waits for the gate, a rate-limit token or a slot do not.
                started = clock()
                try:
                    last_at = time.time()
                    first_at = first_at or last_at
                    attempts += 1
                    if pace is not None:
                        answer = await client.send(
                            endpoint=endpoint,
                            body=body,
                            idempotency_key=idempotency_key,
                            headers=headers,
                            paced=True,
                        )
                    else:
                        answer = await client.send(
                            endpoint=endpoint,
                            body=body,
                            idempotency_key=idempotency_key,
                            headers=headers,
                        )
                    if on_answer is not None:
                        on_answer(answer)
                finally:
                    answering += clock() - started
                    if on_attempt is not None:
                        on_attempt(False)
        except BaseException:
            gate.abandon(ticket)
            raise
        gate.record(ticket, answer)
        last = answer
        if answer.verdict == "ok":
            return DeliveryResult(
                outcome=Outcome.SENT,
                email_id=answer.email_id,
                email_ids=answer.email_ids,
                attempts=attempts,
                first_attempt_at=first_at,
                last_attempt_at=last_at,
                last=answer,
                reason=REASON_SENT,
                answer_time=answering,
            )
        if answer.verdict == "reject":
            return _dead(answer, answer.reason, attempts, first_at, last_at, answering)
        if answer.verdict == "fatal" or gate.state == "open":
            # The gate holds everyone now; waiting there replaces backing off.
            continue
        counts = not ticket.probe and answer.reason != "rate_limit_exceeded"
        if counts:
            budgeted += 1
            spent += clock() - started
        if not answer.outage_signal:
            healthy_mark = None
        elif healthy_mark is None:
            healthy_mark = gate.healthy
        delay = policy.delay(max(budgeted, 1), answer.retry_after)
        # A run of 5xx/transport failures with no success anywhere in the process
        # since it began looks like Resend being down, not like this email's fault:
        # keep retrying until the gate decides, rather than dead-letter an outage.
        outage_suspect = healthy_mark is not None and gate.healthy == healthy_mark
        # A wait that would end past max_elapsed is not worth starting.
        if counts and policy.exhausted(budgeted, spent + delay) and not outage_suspect:
            return _dead(answer, REASON_EXHAUSTED, attempts, first_at, last_at, answering)
        if counts:
            spent += delay
        await sleep(delay)


def _refused(
    outcome: Refusal,
    reason: str,
    answer: Answer | None,
    attempts: int,
    first: float,
    last: float,
    answering: float,
) -> DeliveryResult:
    return DeliveryResult(
        outcome=outcome,
        email_id=None,
        attempts=attempts,
        first_attempt_at=first,
        last_attempt_at=last,
        last=answer,
        reason=reason,
        answer_time=answering,
    )


def _dead(
    answer: Answer, reason: str, attempts: int, first: float, last: float, answering: float
) -> DeliveryResult:
    return _refused(Outcome.DEAD_LETTERED, reason, answer, attempts, first, last, answering)
