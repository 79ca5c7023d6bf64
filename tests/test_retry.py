"""Backoff math, the service gate, and `deliver` against the sandbox over real sockets
(scripted senders only for pure budget and slot logic)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from consumer.prepare import Prepared
from consumer.resend import Answer, ResendClient
from consumer.retry import (
    DeliveryResult,
    RetryPolicy,
    ServiceGate,
    Ticket,
    deliver,
)
from consumer.sandbox import Faults, Sandbox, SandboxConfig
from consumer.settings import Secret, Settings, StalePolicy

KEY = "re_test"
EMAIL = b'{"from":"a@example.com","to":"b@example.com","subject":"Hi %d","text":"hello"}'

OK = Answer(status=200, verdict="ok", email_id="e-1")
DOWN = Answer(status=503, verdict="retry", reason="service_unavailable")
LOCKED = Answer(status=409, verdict="retry", reason="resource_locked")
LIMITED = Answer(status=429, verdict="retry", reason="rate_limit_exceeded", retry_after=0.0)
AUTH = Answer(status=401, verdict="fatal", condition="auth", reason="invalid_api_key")


def body(n: int) -> bytes:
    return EMAIL % n


def fast_policy(**kw: Any) -> RetryPolicy:
    values: dict[str, Any] = {"base": 0.01, "cap": 0.05, "max_attempts": 3, "max_elapsed": 30.0}
    values.update(kw)
    return RetryPolicy(**values)


# -- backoff -----------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    """Ceilings are base * 2**(n-1) capped, and huge attempt numbers do not overflow."""
    policy = RetryPolicy(base=0.5, cap=4.0)
    assert [policy.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.ceiling(10_000) == 4.0


def test_full_jitter_and_retry_after() -> None:
    """The delay is random() * ceiling, but never below the server's retry-after."""
    policy = RetryPolicy(base=1.0, cap=100.0, random=lambda: 0.25)
    assert policy.delay(3) == 1.0  # 0.25 * 4
    assert policy.delay(3, retry_after=2.5) == 2.5
    assert policy.delay(3, retry_after=0.5) == 1.0
    zero = RetryPolicy(base=1.0, cap=100.0, random=lambda: 0.0)
    assert zero.delay(5) == 0.0


def test_budget_by_attempts_and_elapsed() -> None:
    """Either limit alone exhausts the budget."""
    policy = RetryPolicy(max_attempts=3, max_elapsed=10.0)
    assert not policy.exhausted(2, 9.9)
    assert policy.exhausted(3, 0.0)
    assert policy.exhausted(1, 10.0)


def test_policy_and_gate_from_settings() -> None:
    """Settings carry base, cap, attempts, elapsed and probe intervals."""
    s = Settings(
        retry_base=0.2,
        retry_cap=3.0,
        retry_max_attempts=4,
        retry_max_elapsed=60.0,
        probe_initial=2.0,
        probe_max=20.0,
    )
    p = RetryPolicy.from_settings(s)
    assert (p.base, p.cap, p.max_attempts, p.max_elapsed) == (0.2, 3.0, 4, 60.0)
    g = ServiceGate.from_settings(s)
    assert (g.probe_initial, g.probe_max) == (2.0, 20.0)


# -- the gate --------------------------------------------------------------------------


class Changes:
    """on_change recorder."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    def __call__(self, old: str, new: str, condition: str | None) -> None:
        self.seen.append((old, new, condition))


def closed_ticket() -> Ticket:
    return Ticket(probe=False, epoch=0)


async def test_fatal_opens_once_and_logs_once() -> None:
    """Many fatal answers open the gate once: one on_change call, one log line."""
    changes = Changes()
    gate = ServiceGate(probe_initial=0.05, probe_max=0.1, on_change=changes)
    with capture_logs() as logs:
        for _ in range(10):
            gate.record(closed_ticket(), AUTH)
    assert (gate.state, gate.condition, gate.ready) == ("open", "auth", False)
    assert changes.seen == [("closed", "open", "auth")]
    assert [e["event"] for e in logs] == ["circuit.open"]
    assert "re_" not in repr(gate)


async def test_one_probe_at_a_time_and_success_closes() -> None:
    """While open only one waiter is let through; its success releases everyone."""
    changes = Changes()
    gate = ServiceGate(probe_initial=0.05, probe_max=0.1, on_change=changes)
    gate.record(closed_ticket(), AUTH)
    first = asyncio.create_task(gate.admit())
    second = asyncio.create_task(gate.admit())
    done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    probe_task = done.pop()
    probe = probe_task.result()
    assert probe.probe
    other = second if probe_task is first else first
    await asyncio.sleep(0.2)  # well past the next probe time: still one probe in flight
    assert not other.done()
    with capture_logs() as logs:
        gate.record(probe, OK)
    follower = await asyncio.wait_for(other, 1)
    assert not follower.probe
    assert gate.ready
    assert changes.seen == [("closed", "open", "auth"), ("open", "closed", None)]
    assert [e["event"] for e in logs] == ["circuit.closed"]


async def test_probe_interval_grows_to_the_max() -> None:
    """Failed probes space out: initial, doubled, ... capped at probe_max."""
    gate = ServiceGate(probe_initial=0.02, probe_max=0.08, random=lambda: 1.0)
    gate.record(closed_ticket(), AUTH)
    stamps = [time.monotonic()]
    for _ in range(5):
        ticket = await gate.admit()
        stamps.append(time.monotonic())
        gate.record(ticket, AUTH)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    for gap, expected in zip(gaps, [0.02, 0.04, 0.08, 0.08, 0.08], strict=True):
        assert gap >= expected * 0.9
    assert gaps[-1] < 0.5


async def test_outage_opens_after_a_run_of_failures_only() -> None:
    """Five 5xx/transport answers in a row open "outage"; a success in between resets the run."""
    gate = ServiceGate(probe_initial=0.05, probe_max=0.1)
    for _ in range(4):
        gate.record(closed_ticket(), DOWN)
    gate.record(closed_ticket(), OK)
    for _ in range(4):
        gate.record(closed_ticket(), DOWN)
    assert gate.state == "closed"
    assert gate.failing
    gate.record(closed_ticket(), LOCKED)  # Resend answered sensibly: the run is broken
    assert gate._failures == 0
    for _ in range(4):
        gate.record(closed_ticket(), DOWN)
    assert gate.state == "closed"
    gate.record(closed_ticket(), Answer(status=None, verdict="retry", reason="timeout"))
    assert (gate.state, gate.condition) == ("open", "outage")


async def test_stale_answers_do_not_close_an_open_gate() -> None:
    """An answer to a request sent before the gate opened does not close it."""
    gate = ServiceGate(probe_initial=0.05, probe_max=0.1)
    old = closed_ticket()
    gate.record(closed_ticket(), AUTH)
    gate.record(old, OK)
    assert gate.state == "open"


async def test_quota_reset_time_stretches_probes_up_to_probe_max() -> None:
    """A known retry-after delays the next probe, but never beyond probe_max."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.3, random=lambda: 1.0)
    quota = Answer(status=429, verdict="fatal", condition="quota_daily", retry_after=0.2)
    start = time.monotonic()
    gate.record(closed_ticket(), quota)
    ticket = await gate.admit()
    assert time.monotonic() - start >= 0.18
    far = Answer(status=429, verdict="fatal", condition="quota_daily", retry_after=86_000.0)
    start = time.monotonic()
    gate.record(ticket, far)
    await asyncio.wait_for(gate.admit(), 2)
    assert 0.25 <= time.monotonic() - start < 1.5


async def test_abandoned_probe_frees_the_turn() -> None:
    """A cancelled probe attempt lets the next waiter probe."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)
    gate.record(closed_ticket(), AUTH)
    probe = await gate.admit()
    waiter = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.1)
    assert not waiter.done()
    gate.abandon(probe)
    assert (await asyncio.wait_for(waiter, 1)).probe


async def test_wait_closed() -> None:
    """wait_closed returns at once while closed and after a closing probe otherwise."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)
    await asyncio.wait_for(gate.wait_closed(), 1)
    gate.record(closed_ticket(), AUTH)
    waiter = asyncio.create_task(gate.wait_closed())
    probe = await gate.admit()
    assert not waiter.done()
    gate.record(probe, OK)
    await asyncio.wait_for(waiter, 1)


# -- deliver: budget and slots (scripted answers: pure logic) ---------------------------


class Scripted:
    """Answers from a script (the last one repeats); records when each attempt started."""

    def __init__(self, answers: Sequence[Answer], delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.delay = delay
        self.calls: list[float] = []

    async def send(
        self,
        *,
        endpoint: str,
        body: bytes,
        idempotency_key: str | None,
        headers: Mapping[str, str] | None = None,
        paced: bool = False,
    ) -> Answer:
        self.calls.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def run(
    sender: Any,
    *,
    policy: RetryPolicy | None = None,
    gate: ServiceGate | None = None,
    slots: asyncio.Semaphore | None = None,
    key: str = "k",
    n: int = 0,
    **kw: Any,
) -> DeliveryResult:
    return await deliver(
        sender,
        endpoint="/emails",
        body=body(n),
        idempotency_key=key,
        policy=policy or fast_policy(),
        gate=gate or ServiceGate(probe_initial=0.01, probe_max=0.05),
        slots=slots or asyncio.Semaphore(4),
        **kw,
    )


async def test_non_outage_retries_exhaust_into_a_dead_letter() -> None:
    """A key that stays locked is dead-lettered after max_attempts with its last answer."""
    result = await run(Scripted([LOCKED]), policy=fast_policy(max_attempts=3))
    assert (result.outcome, result.reason, result.attempts) == (
        "dead_lettered",
        "retries_exhausted",
        3,
    )
    assert result.last == LOCKED
    assert result.first_attempt_at <= result.last_attempt_at


async def test_max_elapsed_exhausts_the_budget() -> None:
    """Time spent attempting and backing off counts against max_elapsed."""
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    policy = fast_policy(
        base=10.0, cap=10.0, max_attempts=100, max_elapsed=25.0, random=lambda: 1.0
    )
    result = await run(Scripted([LOCKED]), policy=policy, sleep=fake_sleep, clock=lambda: now[0])
    assert result.outcome == "dead_lettered"
    assert result.attempts == 3  # 10 s + 10 s of backoff, then the third attempt passes 25 s


async def test_rate_limit_answers_do_not_spend_the_budget() -> None:
    """429 rate limit is the limiter's business: many of them still end in "sent"."""
    result = await run(Scripted([LIMITED] * 6 + [OK]), policy=fast_policy(max_attempts=2))
    assert (result.outcome, result.attempts, result.email_id) == ("sent", 7, "e-1")


async def test_a_run_of_5xx_never_dead_letters() -> None:
    """Failures with no success anywhere look like an outage: keep going, never dead-letter."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02, outage_failures=1000)
    result = await run(Scripted([DOWN] * 8 + [OK]), policy=fast_policy(max_attempts=2), gate=gate)
    assert (result.outcome, result.attempts) == ("sent", 9)


async def test_5xx_among_successes_is_dead_lettered() -> None:
    """One email failing while others succeed is that email's problem: dead-letter it."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)

    class Poison(Scripted):
        async def send(self, **kw: Any) -> Answer:
            answer = await super().send(**kw)
            gate.record(Ticket(probe=False, epoch=0), OK)  # another event succeeded meanwhile
            return answer

    result = await run(Poison([DOWN]), policy=fast_policy(max_attempts=3), gate=gate)
    assert (result.outcome, result.reason, result.attempts) == (
        "dead_lettered",
        "retries_exhausted",
        3,
    )


async def test_a_backing_off_retry_holds_no_slot() -> None:
    """With one slot, another delivery completes while the first waits out its backoff."""
    slots = asyncio.Semaphore(1)
    slow = Scripted([DOWN, OK])
    quick = Scripted([OK])
    policy = fast_policy(base=0.5, cap=0.5, random=lambda: 1.0)
    first = asyncio.create_task(run(slow, policy=policy, slots=slots, key="a"))
    await asyncio.sleep(0.05)
    second = await asyncio.wait_for(run(quick, policy=policy, slots=slots, key="b"), 0.3)
    assert second.outcome == "sent"
    assert (await first).outcome == "sent"
    assert quick.calls[0] < slow.calls[1]


async def test_fatal_waits_and_probes_do_not_spend_the_budget() -> None:
    """Auth failures pause the delivery; many failed probes later it still ends "sent"."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)
    result = await run(Scripted([AUTH] * 6 + [OK]), policy=fast_policy(max_attempts=1), gate=gate)
    assert (result.outcome, result.attempts) == ("sent", 7)
    assert gate.ready
    assert gate.probes >= 5


async def test_cancelling_a_probe_frees_the_turn_and_raises() -> None:
    """Cancelling deliver mid-probe raises CancelledError and lets another waiter probe."""
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)
    gate.record(closed_ticket(), AUTH)
    stuck = asyncio.create_task(run(Scripted([OK], delay=30.0), gate=gate, key="a"))
    await asyncio.sleep(0.1)
    assert gate._probe_busy
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    result = await asyncio.wait_for(run(Scripted([OK]), gate=gate, key="b"), 2)
    assert result.outcome == "sent"
    assert gate.ready


# -- deliver against the sandbox ---------------------------------------------------------


@pytest.fixture
async def sb(make_sandbox: Callable[..., Awaitable[Sandbox]]) -> Sandbox:
    """A keyed sandbox with a generous rate limit."""
    return await make_sandbox(config=SandboxConfig(api_key=KEY, rate_limit=1000.0))


@pytest.fixture
async def client(sb: Sandbox) -> AsyncIterator[ResendClient]:
    """A client of sb with a short total timeout (for the hang test)."""
    async with ResendClient(base_url=sb.url, api_key=Secret(KEY), total_timeout=0.5) as c:
        yield c


async def test_accept_then_drop_retry_returns_the_original_id(
    sb: Sandbox, client: ResendClient
) -> None:
    """Resend sent it but the answer was lost: the retry replays the id, one delivery."""
    sb.set_faults(Faults(drop_after_accept_rate=1.0))
    result = await run(client, key="drop:1")
    ledger = sb.deliveries(idempotency_key="drop:1")
    assert result.outcome == "sent"
    assert result.attempts == 2
    assert [d.id for d in ledger] == [result.email_id]


async def test_concurrent_same_key_is_retried_to_success(sb: Sandbox, client: ResendClient) -> None:
    """409 concurrent_idempotent_requests is retried with the same key and ends in the same id."""
    sb.set_faults(Faults(latency_ms=200))
    policy = fast_policy(base=0.3, cap=0.3, max_attempts=5, random=lambda: 1.0)
    a, b = await asyncio.gather(
        run(client, key="conc:1", policy=policy), run(client, key="conc:1", policy=policy)
    )
    assert a.outcome == b.outcome == "sent"
    assert a.email_id == b.email_id
    assert sorted([a.attempts, b.attempts]) == [1, 2]
    assert len(sb.deliveries(idempotency_key="conc:1")) == 1
    assert sb.stats()["outcomes"].get("idempotency_concurrent") == 1


async def test_html_503_is_retried_until_it_clears(sb: Sandbox, client: ResendClient) -> None:
    """HTML error pages are retried with backoff and the email goes out once they stop."""
    sb.set_faults(Faults(error_rate=1.0, html_error_share=1.0))
    task = asyncio.create_task(run(client, key="html:1", policy=fast_policy(max_attempts=3)))
    await asyncio.sleep(0.3)
    sb.set_faults(Faults())
    result = await task
    assert result.outcome == "sent"
    assert result.attempts >= 2
    assert len(sb.deliveries(idempotency_key="html:1")) == 1


async def test_hang_until_timeout_then_sent(sb: Sandbox, client: ResendClient) -> None:
    """A hanging request times out, is retried with the same key, and sends once."""
    sb.set_faults(Faults(hang_rate=1.0))
    task = asyncio.create_task(run(client, key="hang:1", policy=fast_policy(max_attempts=5)))
    await asyncio.sleep(0.7)
    sb.set_faults(Faults())
    result = await task
    assert result.outcome == "sent"
    assert result.attempts >= 2
    assert len(sb.deliveries(idempotency_key="hang:1")) == 1


async def test_rejections_dead_letter_with_their_reason(sb: Sandbox, client: ResendClient) -> None:
    """A 422 dead-letters at once; a changed body under a used key dead-letters as 409."""
    bad = await deliver(
        client,
        endpoint="/emails",
        body=b'{"to":"b@example.com"}',
        idempotency_key="bad:1",
        policy=fast_policy(),
        gate=ServiceGate(),
        slots=asyncio.Semaphore(1),
    )
    assert (bad.outcome, bad.attempts) == ("dead_lettered", 1)
    assert bad.last is not None
    assert bad.last.status == 422
    assert (await run(client, key="idem:1", n=1)).outcome == "sent"
    changed = await run(client, key="idem:1", n=2)
    assert (changed.outcome, changed.reason) == ("dead_lettered", "invalid_idempotent_request")


@pytest.mark.parametrize(
    ("status", "name", "condition"),
    [
        (401, "invalid_api_key", "auth"),
        (403, "restricted_api_key", "auth"),
        (403, "suspended_api_key", "auth"),
        (404, "not_found", "endpoint"),
        (429, "daily_quota_exceeded", "quota_daily"),
        (429, "monthly_quota_exceeded", "quota_monthly"),
    ],
)
async def test_service_wide_condition_pauses_then_resumes(
    sb: Sandbox, client: ResendClient, status: int, name: str, condition: str
) -> None:
    """A service-wide answer pauses all deliveries (few probes), then all are sent once."""
    changes = Changes()
    gate = ServiceGate(probe_initial=0.05, probe_max=0.2, on_change=changes)
    sb.set_faults(Faults(force_status={"status": status, "name": name}))
    tasks = [
        asyncio.create_task(run(client, key=f"pause:{i}", n=i, gate=gate, policy=fast_policy()))
        for i in range(6)
    ]
    await asyncio.sleep(1.0)
    assert (gate.state, gate.condition, gate.ready) == ("open", condition, False)
    assert not any(t.done() for t in tasks)
    forced = sb.stats()["outcomes"].get("forced", 0)
    assert forced <= 6 + 12  # the first wave, then one probe at a time
    sb.set_faults(Faults())
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert {r.outcome for r in results} == {"sent"}
    for i in range(6):
        assert len(sb.deliveries(idempotency_key=f"pause:{i}")) == 1
    assert changes.seen == [("closed", "open", condition), ("open", "closed", None)]


@pytest.mark.slow
async def test_sixty_second_outage_then_recovery(sb: Sandbox, client: ResendClient) -> None:
    """60 s of 503s: nothing dead-letters, probing stays sparse, and all send once after."""
    changes = Changes()
    gate = ServiceGate(probe_initial=0.5, probe_max=5.0, on_change=changes)
    sb.set_faults(Faults(force_status={"status": 503, "name": "service_unavailable"}))
    tasks = [
        asyncio.create_task(
            run(client, key=f"outage:{i}", n=i, gate=gate, policy=fast_policy(max_attempts=3))
        )
        for i in range(8)
    ]
    await asyncio.sleep(60.0)
    assert not any(t.done() for t in tasks)
    assert (gate.state, gate.condition) == ("open", "outage")
    during = sb.stats()["outcomes"].get("forced", 0)
    sb.set_faults(Faults())
    results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert {r.outcome for r in results} == {"sent"}
    for i in range(8):
        assert len(sb.deliveries(idempotency_key=f"outage:{i}")) == 1
    # the first failures of each delivery, then about one probe per probe_max
    assert during < 8 * 3 + 30
    assert changes.seen == [("closed", "open", "outage"), ("open", "closed", None)]
    print(f"\n60 s outage: {during} requests during the outage, {gate.probes} probes")


async def test_waiting_for_a_rate_limit_token_holds_no_slot() -> None:
    """`pace` runs before the slot is taken: a token wait leaves the slot to others."""
    released = asyncio.Event()
    paced: list[bool] = []

    async def pace() -> None:
        await released.wait()

    class Recording(Scripted):
        async def send(self, **kw: Any) -> Answer:
            paced.append(kw.pop("paced", False))
            return await super().send(**kw)

    slots = asyncio.Semaphore(1)
    sender = Recording([OK])
    waiting = asyncio.create_task(run(sender, slots=slots, pace=pace))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert not slots.locked(), "a delivery waiting for a token must not hold the slot"
    other = await run(Scripted([OK]), slots=slots, key="other")  # gets the slot meanwhile
    assert other.outcome == "sent"
    released.set()
    result = await asyncio.wait_for(waiting, 5)
    assert result.outcome == "sent"
    assert paced == [True], "the client is told the token was already taken"


# -- deliver: only attempts and backoffs spend the time budget --------------------------


class FakeTime:
    """A monotonic clock and sleep that only move when told (or when slept on)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_rate_limit_queueing_does_not_spend_the_time_budget() -> None:
    """Hours queued for rate-limit tokens (others sending meanwhile) leave max_elapsed intact."""
    clock = FakeTime()
    gate = ServiceGate(probe_initial=0.01, probe_max=0.05)

    async def pace() -> None:
        # a backlog at the team limit: this delivery waits far longer than max_elapsed
        # while other deliveries are being sent (Resend is up)
        clock.now += 10_000.0
        gate.record(closed_ticket(), OK)

    # the second 503 follows successes elsewhere: only the budget keeps it alive
    sender = Scripted([DOWN, DOWN, OK])
    policy = fast_policy(base=1.0, cap=1.0, max_attempts=10, max_elapsed=60.0)
    result = await run(sender, policy=policy, gate=gate, pace=pace, sleep=clock.sleep, clock=clock)
    assert (result.outcome, result.attempts) == ("sent", 3)


async def test_waiting_for_a_slot_does_not_spend_the_time_budget() -> None:
    """Time spent waiting for an in-flight slot is not an attempt: it does not count either."""
    clock = FakeTime()
    slots = asyncio.Semaphore(1)
    policy = fast_policy(base=1.0, cap=1.0, max_attempts=10, max_elapsed=60.0)
    await slots.acquire()
    task = asyncio.create_task(
        run(Scripted([LOCKED, OK]), policy=policy, slots=slots, sleep=clock.sleep, clock=clock)
    )
    await asyncio.sleep(0.01)
    assert not task.done()
    clock.now += 10_000.0  # the slot stays busy for a long time
    slots.release()
    result = await asyncio.wait_for(task, 5)
    assert (result.outcome, result.attempts) == ("sent", 2)


# -- the gate can be probed by its owner -------------------------------------------------


async def test_probe_due_lets_the_owner_probe_when_nobody_waits() -> None:
    """With every waiter cancelled, probe_due() turns True by itself; try_probe takes the turn."""
    clock = FakeTime()
    gate = ServiceGate(probe_initial=1.0, probe_max=4.0, clock=clock, random=lambda: 1.0)
    assert (gate.probe_due(), gate.probe_in, gate.try_probe()) == (False, None, None)
    gate.record(closed_ticket(), AUTH)
    assert not gate.probe_due()
    assert gate.probe_in == 1.0
    waiter = asyncio.create_task(gate.admit())  # a delivery, then cancelled by a revoke
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.now = 1.0
    assert gate.probe_due()
    assert gate.probe_in == 0.0
    ticket = gate.try_probe()
    assert ticket is not None
    assert ticket.probe
    # the owner holds the turn: nobody else probes, and a waiter is not let through
    assert not gate.probe_due()
    assert gate.try_probe() is None
    late = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.01)
    assert not late.done()
    gate.record(ticket, AUTH)  # still failing: the next probe is due later
    assert (gate.state, gate.probe_due(), gate.probe_in) == ("open", False, 2.0)
    clock.now = 3.0
    assert gate.probe_due()  # due, and the waiter has not taken it yet
    again = gate.try_probe()
    assert again is not None
    gate.abandon(again)  # e.g. the owner's probe was cancelled: the turn is free at once
    assert gate.probe_due()
    probe = await asyncio.wait_for(late, 5)
    assert probe.probe
    gate.record(probe, OK)
    assert (gate.state, gate.probe_due(), gate.probe_in) == ("closed", False, None)


# -- deliver: freshness before every attempt ---------------------------------------------

MAX_AGE = 3600.0
EVENT_TIME = 1_800_000_000.0


def prepared_at(policy: StalePolicy) -> Prepared:
    """A Prepared whose route allows an hour, under `policy`."""
    return Prepared(
        event_id="ev-1",
        event_type="order.confirmed",
        source="test",
        idempotency_key="fresh:1",
        endpoint="/emails",
        body=body(1),
        recipients=("b@example.com",),
        event_time=EVENT_TIME,
        stale=False,
        max_age=MAX_AGE,
        stale_policy=policy,
    )


@pytest.mark.parametrize(
    ("policy", "outcome", "reason", "calls"),
    [
        ("dead-letter", "dead_lettered", "stale_event", 0),
        ("skip", "skipped", "stale_event", 0),
        ("send", "sent", "sent", 1),
    ],
)
async def test_an_event_that_aged_behind_an_open_gate_is_not_sent(
    policy: StalePolicy, outcome: str, reason: str, calls: int
) -> None:
    """Gate open longer than the max age: once it closes the event is refused (unless "send")."""
    wall = FakeTime()
    wall.now = EVENT_TIME + 60
    gate_clock = FakeTime()
    gate = ServiceGate(probe_initial=1.0, probe_max=60.0, clock=gate_clock)
    gate.record(closed_ticket(), AUTH)
    gate_clock.now = 10.0
    probe = await gate.admit()  # another delivery probes; this one waits at the gate
    prepared = prepared_at(policy)
    sender = Scripted([OK])
    task = asyncio.create_task(
        run(
            sender,
            gate=gate,
            check=lambda: prepared.stale_reason(wall.now),
            refused_as=prepared.stale_outcome,
        )
    )
    await asyncio.sleep(0.01)
    assert not task.done()
    wall.now += 2 * MAX_AGE  # the outage outlasts the route's max age
    gate_clock.now += 2 * MAX_AGE
    gate.record(probe, OK)
    result = await asyncio.wait_for(task, 5)
    assert (result.outcome, result.reason) == (outcome, reason)
    assert len(sender.calls) == calls
    assert gate.ready


async def test_the_age_is_checked_again_after_a_backoff() -> None:
    """A 429 wait that outlasts the max age ends the delivery before the next attempt."""
    wall = FakeTime()
    wall.now = EVENT_TIME + 60
    prepared = prepared_at("dead-letter")
    long_limit = Answer(status=429, verdict="retry", reason="rate_limit_exceeded", retry_after=7200)

    async def sleep(seconds: float) -> None:
        wall.now += seconds

    sender = Scripted([long_limit, OK])
    result = await run(sender, sleep=sleep, check=lambda: prepared.stale_reason(wall.now))
    assert (result.outcome, result.reason, result.attempts) == ("dead_lettered", "stale_event", 1)
    assert result.last == long_limit
    assert len(sender.calls) == 1


async def test_a_refused_event_spends_no_rate_limit_token() -> None:
    """An event already stale when admitted by the gate does not wait for (or take) a token."""
    paced: list[float] = []

    async def pace() -> None:
        paced.append(time.monotonic())

    prepared = prepared_at("dead-letter")
    sender = Scripted([OK])
    later = EVENT_TIME + 2 * MAX_AGE
    result = await run(sender, pace=pace, check=lambda: prepared.stale_reason(later))
    assert (result.outcome, result.reason, result.attempts, result.last) == (
        "dead_lettered",
        "stale_event",
        0,
        None,
    )
    assert (paced, sender.calls) == ([], [])


async def test_a_probe_refused_by_its_check_hands_the_turn_on() -> None:
    """A probe gone stale while waiting for its token frees the turn: the next waiter probes."""
    wall = FakeTime()
    wall.now = EVENT_TIME + 60
    gate = ServiceGate(probe_initial=0.01, probe_max=0.02)
    gate.record(closed_ticket(), AUTH)
    token = asyncio.Event()

    async def pace() -> None:
        await token.wait()

    prepared = prepared_at("dead-letter")
    stale_sender = Scripted([OK])
    first = asyncio.create_task(
        run(stale_sender, gate=gate, pace=pace, check=lambda: prepared.stale_reason(wall.now))
    )
    await asyncio.sleep(0.1)  # `first` took the probe turn and waits for its token
    assert gate._probe_busy
    fresh_sender = Scripted([OK])
    second = asyncio.create_task(run(fresh_sender, gate=gate, key="other"))
    await asyncio.sleep(0.1)
    assert not second.done()  # one probe at a time
    wall.now += 2 * MAX_AGE
    token.set()
    refused = await asyncio.wait_for(first, 5)
    sent = await asyncio.wait_for(second, 5)
    assert (refused.outcome, refused.reason, stale_sender.calls) == (
        "dead_lettered",
        "stale_event",
        [],
    )
    assert (sent.outcome, len(fresh_sender.calls)) == ("sent", 1)
    assert gate.ready
    assert gate.probes == 2
