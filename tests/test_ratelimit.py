"""The adaptive shared rate limiter: pacing with an injected clock, adaptation from
Resend's headers, and three replicas settling on one team limit against the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time

import pytest

from consumer.ratelimit import RateLimiter
from consumer.resend import ResendClient
from consumer.retry import RetryPolicy, ServiceGate, deliver
from consumer.sandbox import Sandbox, SandboxConfig
from consumer.settings import Secret


class FakeTime:
    """A clock whose sleep advances it: pacing tests run instantly and exactly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter(t: FakeTime, **kw: float) -> RateLimiter:
    return RateLimiter(clock=t.clock, sleep=t.sleep, **kw)


def headers(
    limit: int = 10, remaining: int = 5, reset: int = 1, retry_after: str | None = None
) -> dict[str, str]:
    out = {
        "ratelimit-limit": str(limit),
        "ratelimit-remaining": str(remaining),
        "ratelimit-reset": str(reset),
    }
    if retry_after is not None:
        out["retry-after"] = retry_after
    return out


async def test_acquire_paces_at_the_rate() -> None:
    """With burst 1, consecutive acquisitions are exactly 1/rate apart."""
    t = FakeTime()
    lim = limiter(t, rate=4.0)
    stamps = []
    for _ in range(5):
        await lim.acquire()
        stamps.append(t.now)
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(stamps)]
    assert gaps == [0.25] * 4


async def test_burst_allows_that_many_at_once() -> None:
    """A burst of 3 lets three requests through at once after idling, then paces."""
    t = FakeTime()
    lim = limiter(t, rate=2.0, burst=3.0)
    t.now += 10  # idle long enough to refill the burst
    stamps = []
    for _ in range(5):
        await lim.acquire()
        stamps.append(t.now)
    assert stamps[0] == stamps[1] == stamps[2]
    assert stamps[3] - stamps[2] == pytest.approx(0.5)
    assert stamps[4] - stamps[3] == pytest.approx(0.5)


async def test_429_halves_once_per_cooldown_and_blocks_for_retry_after() -> None:
    """Several 429s in one burst halve the rate once; retry-after delays the next slot."""
    t = FakeTime()
    lim = limiter(t, rate=8.0)
    for _ in range(4):
        lim.observe(headers(remaining=0, retry_after="2"), 429, name="rate_limit_exceeded")
    assert lim.rate == pytest.approx(4.0)
    assert lim.decreases == 1
    before = t.now
    await lim.acquire()
    assert t.now - before == pytest.approx(2.0)
    t.now += 1.5  # past the cooldown: the next 429 halves again
    lim.observe(headers(remaining=0, retry_after="1"), 429, name="rate_limit_exceeded")
    assert lim.rate == pytest.approx(2.0)


async def test_quota_429_does_not_slow_the_pace() -> None:
    """A quota 429 is the gate's business: the limiter keeps its rate."""
    t = FakeTime()
    lim = limiter(t, rate=8.0)
    lim.observe(headers(remaining=3, retry_after="3600"), 429, name="daily_quota_exceeded")
    assert lim.rate == 8.0
    before = t.now
    await lim.acquire()
    assert t.now == before


def test_rate_never_exceeds_advertised_limit() -> None:
    """ratelimit-limit caps the rate, even when it is below the starting setting."""
    t = FakeTime()
    lim = limiter(t, rate=50.0)
    lim.observe(headers(limit=10, remaining=9), 200)
    assert lim.ceiling == 10
    assert lim.rate == 10
    for _ in range(100):
        t.now += 0.5
        lim.observe(headers(limit=10, remaining=9), 200)
    assert lim.rate == 10


def test_recovers_additively_while_headroom_and_above_starting_rate_if_advertised() -> None:
    """After a slow-down, ample remaining budget adds increase*limit to the rate per second."""
    t = FakeTime()
    lim = limiter(t, rate=10.0, increase=0.1, soft_decrease=0.5)
    lim.observe(headers(limit=20, remaining=0), 200)  # sets the ceiling; an empty budget halves
    assert lim.rate == pytest.approx(5.0)
    for _ in range(10):
        t.now += 0.5
        lim.observe(headers(limit=20, remaining=15), 200)
    # 5 s at 0.1 * 20 per second = +10
    assert lim.rate == pytest.approx(15.0)


def test_low_remaining_decays_smoothly() -> None:
    """A low team budget decays the rate by e^-1 per second of observations."""
    t = FakeTime()
    lim = limiter(t, rate=10.0)
    lim.observe(headers(remaining=2), 200)
    for _ in range(4):
        t.now += 0.25
        lim.observe(headers(remaining=2), 200)
    assert lim.rate == pytest.approx(10.0 * 2.718281828**-1, rel=1e-6)


def test_min_rate_floor_and_junk_headers_ignored() -> None:
    """Repeated halving stops at min_rate; unparsable headers and no-answer change nothing."""
    t = FakeTime()
    lim = limiter(t, rate=4.0, min_rate=1.0)
    for _ in range(10):
        t.now += 2
        lim.observe(headers(remaining=0), 429)
    assert lim.rate == 1.0
    lim.observe({"ratelimit-limit": "lots", "ratelimit-remaining": "-3"}, 200)
    lim.observe({}, None)
    assert lim.ceiling == 10.0
    assert lim.rate == 1.0
    assert "rate=1.00" in repr(lim)


async def test_waiting_acquire_sees_a_new_block() -> None:
    """A waiter already sleeping for its slot re-checks and honours a 429 that arrived meanwhile."""
    t = FakeTime()
    lim = limiter(t, rate=1.0)
    await lim.acquire()  # next slot at +1 s

    async def sleep_then_block(seconds: float) -> None:
        t.sleeps.append(seconds)
        if len(t.sleeps) == 1:
            lim.observe(headers(remaining=0, retry_after="5"), 429)
        t.now += seconds
        await asyncio.sleep(0)

    lim._sleep = sleep_then_block
    start = t.now
    await lim.acquire()
    assert t.now - start == pytest.approx(5.0)


def test_bad_arguments_are_refused() -> None:
    """A non-positive rate or a burst below one is a programming error."""
    with pytest.raises(ValueError):
        RateLimiter(rate=0)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0.5)


# -- three replicas sharing one team limit -------------------------------------------


async def run_replicas(
    sb: Sandbox, *, replicas: int = 3, workers: int = 8, seconds: float = 12.0
) -> dict[str, float]:
    """Replicas (own client, limiter, gate) deliver distinct emails for `seconds`."""
    body_n = itertools.count()
    stop_at = time.monotonic() + seconds
    policy = RetryPolicy(base=0.1, cap=2.0, max_attempts=50, max_elapsed=60.0)
    clients = []
    for _ in range(replicas):
        lim = RateLimiter(rate=10.0)
        client = ResendClient(base_url=sb.url, api_key=Secret("re_test"), limiter=lim)
        await client.start()
        clients.append((client, ServiceGate(probe_initial=0.2, probe_max=1.0)))

    async def worker(client: ResendClient, gate: ServiceGate, slots: asyncio.Semaphore) -> None:
        while time.monotonic() < stop_at:
            n = next(body_n)
            body = b'{"from":"a@example.com","to":"b@example.com","subject":"s%d","text":"t"}' % n
            await deliver(
                client,
                endpoint="/emails",
                body=body,
                idempotency_key=f"settle-{n}",
                policy=policy,
                gate=gate,
                slots=slots,
            )

    started = time.monotonic()
    wall_start = time.time()
    try:
        await asyncio.gather(
            *(
                worker(c, g, s)
                for c, g in clients
                for s in [asyncio.Semaphore(workers)]
                for _ in range(workers)
            )
        )
    finally:
        for c, _ in clients:
            await c.close()
    elapsed = time.monotonic() - started
    stats = sb.stats()
    ok = stats["statuses"].get("200", 0)
    throttled = stats["statuses"].get("429", 0)
    return {
        "ok": ok,
        "throttled": throttled,
        "share_429": throttled / max(ok + throttled, 1),
        "elapsed": round(elapsed, 2),
        "rate": ok / elapsed,
        # sends between the end of the first second (the sandbox's bucket starts
        # full) and the stop time (queued deliveries drain after it)
        "steady_rate": sum(
            1 for d in sb.deliveries() if wall_start + 1.0 <= d.received_at < wall_start + seconds
        )
        / (seconds - 1.0),
        "duplicates": len(stats["duplicate_keys"]),
    }


@pytest.mark.slow
async def test_three_replicas_settle_near_the_team_limit(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    """Three replicas on one 10/s team: few 429s and at least 80% of the limit achieved."""
    sb = await make_sandbox(config=SandboxConfig(api_key="re_test", rate_limit=10.0))
    result = await run_replicas(sb, seconds=12.0)
    print(f"\nthree replicas vs 10 req/s: {result}")
    assert result["duplicates"] == 0
    assert result["share_429"] < 0.05
    assert result["steady_rate"] >= 8.0


async def test_urgent_waiters_are_served_before_bulk_ones() -> None:
    """Queued bulk requests do not hold back an urgent one: it takes the next slot."""
    t = FakeTime()
    slot = asyncio.Event()

    async def sleep(seconds: float) -> None:
        t.now += seconds
        await slot.wait()  # time passes only when the test says so

    lim = RateLimiter(rate=1.0, clock=t.clock, sleep=sleep)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await lim.acquire(priority)
        order.append(name)

    await lim.acquire()  # the next slot is a second away: everyone below queues
    bulk = [asyncio.create_task(take(f"bulk{i}", 2)) for i in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    urgent = asyncio.create_task(take("urgent", 0))
    for _ in range(3):
        await asyncio.sleep(0)
    slot.set()
    await asyncio.gather(*bulk, urgent)
    # bulk0 already held the lock, sleeping for its slot; urgent goes right after it
    assert order == ["bulk0", "urgent", "bulk1", "bulk2"]


async def test_a_cancelled_waiter_does_not_keep_the_lock() -> None:
    """Cancelling a queued acquire (a revoke) hands the slot on, nothing hangs."""
    t = FakeTime()
    lim = limiter(t, rate=1.0)
    await lim.acquire()
    first = asyncio.create_task(lim.acquire(2))
    second = asyncio.create_task(lim.acquire(2))
    await asyncio.sleep(0)
    second.cancel()
    await first
    with contextlib.suppress(asyncio.CancelledError):
        await second
    await asyncio.wait_for(lim.acquire(1), 5)
    assert lim.acquired == 3


def test_a_replicas_share_caps_its_start_and_scales_its_speed_up() -> None:
    """With a third of the group's partitions a replica starts at a third of the limit and
    gains a third as fast, so three replicas together probe like one (at a 5 req/s team
    limit, three full-speed probers lost 2-4 % of requests to 429s; with shares none)."""
    t = FakeTime()
    lim = limiter(t, rate=5.0, increase=0.1)
    lim.observe(headers(limit=5, remaining=4), 200)
    lim.set_share(1 / 3)
    assert lim.share == pytest.approx(1 / 3)
    assert lim.rate == pytest.approx(5 / 3)
    t.now += 1.0
    lim.observe(headers(limit=5, remaining=4), 200)
    assert lim.rate == pytest.approx(5 / 3 + 0.1 * 5 / 3)  # not + 0.1 * 5
    # the share caps where it starts, never where it may go: alone, it reaches the limit
    for _ in range(200):
        t.now += 1.0
        lim.observe(headers(limit=5, remaining=4), 200)
    assert lim.rate == 5.0
    lim.set_share(5.0)  # clamped to the whole
    assert lim.share == 1.0
    assert lim.rate == 5.0


def test_a_replicas_share_scales_its_back_off_on_an_empty_budget() -> None:
    """Every replica sees the team's budget run dry at once: each cuts by its share of
    the soft decrease (three at a third cut about as much in all as one process), and
    the smooth decay while the budget runs low slows by the share too."""
    t = FakeTime()
    lim = limiter(t, rate=5.0, soft_decrease=0.75)
    lim.observe(headers(limit=6, remaining=5), 200)
    lim.set_share(1 / 3)
    assert lim.rate == pytest.approx(2.0)
    t.now += 2.0
    lim.observe(headers(limit=6, remaining=0), 200)
    assert lim.rate == pytest.approx(2.0 * (1 - 0.25 / 3))
    before = lim.rate
    t.now += 1.0
    lim.observe(headers(limit=6, remaining=1), 200)  # 1/6 < low: smooth decay
    assert lim.rate == pytest.approx(before * math.exp(-1 / 3))
    # alone (share 1) the same answers cut by the whole factor
    solo = limiter(FakeTime(), rate=5.0, soft_decrease=0.75)
    solo.observe(headers(limit=6, remaining=0), 200)
    assert solo.rate == pytest.approx(5.0 * 0.75)


def test_a_falling_budget_slows_the_rate_by_its_fall_and_a_rising_one_speeds_it_up() -> None:
    """Between low and high, the budget's movement steers: each request less in
    `ratelimit-remaining` since the previous answer takes `damping` requests/s off the
    rate (whatever the time between), each request more gives it back."""
    t = FakeTime()
    lim = limiter(t, rate=8.0, damping=1.0)
    lim.observe(headers(limit=10, remaining=4), 200)  # 0.4: between low and high
    assert lim.rate == 8.0
    t.now += 0.1
    lim.observe(headers(limit=10, remaining=3), 200)
    assert lim.rate == pytest.approx(7.0)
    t.now += 2.0
    lim.observe(headers(limit=10, remaining=3), 200)  # steady budget: no change
    assert lim.rate == pytest.approx(7.0)
    t.now += 0.1
    lim.observe(headers(limit=10, remaining=5), 200)  # rising: +2, then high: + increase*dt
    assert lim.rate == pytest.approx(7.0 + 2.0 + 0.1 * 10 * 0.1)


def test_damping_scales_with_the_share_and_ignores_an_ample_budget() -> None:
    """Every replica sees the same movement: each moves by its share of it. Above
    `damping_band` of the limit the budget is ample and its wobble is not counted."""
    t = FakeTime()
    lim = limiter(t, rate=9.0, increase=0.0, damping=1.5, damping_band=0.6)
    lim.observe(headers(limit=10, remaining=9), 200)
    lim.set_share(1 / 3)
    lim.observe(headers(limit=10, remaining=9), 200)
    start = lim.rate  # the share caps it: 10/3
    for remaining in (8, 7, 9, 6):  # all at or above 6 = 0.6 x 10: ample
        t.now += 0.2
        lim.observe(headers(limit=10, remaining=remaining), 200)
    assert lim.rate == pytest.approx(start)
    t.now += 0.2
    lim.observe(headers(limit=10, remaining=4), 200)  # from the band's edge (6) to 4
    assert lim.rate == pytest.approx(start - 1.5 * (1 / 3) * 2)


def test_a_cut_restarts_the_damping_reference() -> None:
    """An empty budget (or a 429) cuts the rate; the budget refilling after it is the
    cut working, not a reason to speed up again."""
    t = FakeTime()
    lim = limiter(t, rate=8.0, soft_decrease=0.5)
    lim.observe(headers(limit=10, remaining=4), 200)
    t.now += 0.1
    lim.observe(headers(limit=10, remaining=0), 200)
    assert lim.rate == pytest.approx(4.0)
    t.now += 0.1
    lim.observe(headers(limit=10, remaining=4), 200)  # no +4
    assert lim.rate == pytest.approx(4.0)
    t.now += 1.5  # past the cooldown of the first cut
    lim.observe(headers(limit=10, remaining=0, retry_after="1"), 429, name="rate_limit_exceeded")
    t.now += 2.0
    lim.observe(headers(limit=10, remaining=4), 200)
    assert lim.rate == pytest.approx(2.0)  # halved by the 429, no +4 after it
    t.now += 0.1
    lim.observe(headers(limit=10, remaining=3), 200)  # the reference is back: -1
    assert lim.rate == pytest.approx(1.0)


async def test_waiting_counts_the_requests_a_new_one_would_queue_behind() -> None:
    """`waiting(p)`: the holder plus live waiters of priority p or more urgent; one
    handed the lock counts once (as the holder), a cancelled waiter not at all."""
    limiter = RateLimiter(rate=20.0)
    assert limiter.waiting(1) == 0
    tasks = [asyncio.create_task(limiter.acquire(priority)) for priority in (1, 1, 0, 2, 2)]
    for _ in range(3):
        await asyncio.sleep(0)
    # the first took its slot at once; the second holds the lock, sleeping for its slot
    assert tasks[0].done()
    assert limiter.waiting(0) == 2  # the holder and the urgent waiter
    assert limiter.waiting(1) == 2
    assert limiter.waiting(2) == 4
    await tasks[1]  # its slot came: the lock passes to the urgent one
    assert limiter.waiting(0) == 1  # now the holder, counted once
    assert limiter.waiting(2) == 3
    tasks[3].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[3]
    assert limiter.waiting(2) == 2
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limiter.waiting(2) == 0
