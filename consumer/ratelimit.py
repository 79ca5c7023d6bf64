"""One adaptive token bucket per process, shared by every send.

Resend limits requests per team, across all API keys and all replicas, and says
where the team stands in every answer (`ratelimit-limit`, `ratelimit-remaining`,
`ratelimit-reset`). Replicas cannot talk to each other, so each one steers by
those headers alone:

* pacing is a GCRA token bucket with a small burst, so replicas do not fire
  together;
* the rate never exceeds the advertised `ratelimit-limit` (or, before any
  header, the starting rate);
* the team's remaining budget is a shared gauge: while it stays comfortably
  high (`high`, half the limit) each replica speeds up additively, when it
  runs low (`low`, 30 %) each slows down smoothly, when it reaches zero each
  cuts its rate by a quarter, and on a 429 each halves its rate and waits as
  told by `retry-after` (cuts at most once per cooldown);
* the budget's movement damps that loop: each answer moves the rate by
  `damping` x the change in `ratelimit-remaining` since the previous answer
  (below `damping_band` of the limit; a cut restarts the reference). The budget
  is the integral of the team's excess over the limit, so a falling budget says
  "too fast" a second or two before it runs low, and a rising one "too slow"
  before the bucket fills and its refill goes to waste.

Together this is AIMD on a shared signal with a damping term, which settles on
fair shares that add up to just under the team limit. Without the damping the
loop overshoots both ways (three replicas at 5 requests/s, `bench_ratelimit.py
--simulate`: 92-95 % of the limit, 0.2-0.8 % answered 429; with it 97-98 %,
none). All adjustments but the damping scale with elapsed time, not with the
number of answers, so a busy replica does not react faster than an idle one; the
damping adds up to the budget's net change, however many answers report it.

Limits: at a 2 requests/s limit `ratelimit-remaining` is only ever 0 or 1, so
there is no movement to damp by; and a server counting fixed one-second windows
(its budget falls to 0 and jumps back every second) is steered worse than a
token bucket like the sandbox's: about 80 % of the limit in the simulation,
with or without the damping. Resend documents only "requests left within the
current window" and "seconds until the limits are reset".

Each adjustment is scaled by the replica's share (`set_share`): every replica
sees the same team budget, so together they react as one process would.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

HEADER_LIMIT: Final = "ratelimit-limit"
HEADER_REMAINING: Final = "ratelimit-remaining"
HEADER_RESET: Final = "ratelimit-reset"
HEADER_RETRY_AFTER: Final = "retry-after"

#: 429 names that are about quota, not pace: the service gate handles those
QUOTA_NAMES: Final = frozenset({"daily_quota_exceeded", "monthly_quota_exceeded"})


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


class RateLimiter:
    """Adaptive shared limiter: `await acquire()` before a request, `observe()` after."""

    def __init__(
        self,
        *,
        rate: float,
        burst: float = 1.0,
        min_rate: float = 0.2,
        decrease: float = 0.5,
        soft_decrease: float = 0.75,
        increase: float = 0.1,
        low: float = 0.3,
        high: float = 0.5,
        cooldown: float = 1.0,
        damping: float = 1.0,
        damping_band: float = 0.6,
        max_block: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`increase` is a share of the ceiling gained per second while there is headroom;
        `low`/`high` are shares of the team's limit left in `ratelimit-remaining`;
        `damping` is requests/s per request of change in it, counted below
        `damping_band` x the limit (above, the budget is ample and its wobble is noise).
        """
        if rate <= 0 or burst < 1 or min_rate <= 0:
            raise ValueError("rate and min_rate must be positive and burst at least 1")
        self._rate = float(rate)
        self._ceiling = float(rate)
        self.burst = float(burst)
        self.min_rate = min(float(min_rate), self._rate)
        self._decrease = decrease
        self._soft_decrease = soft_decrease
        self._increase = increase
        self._low = low
        self._high = high
        self._cooldown = cooldown
        self._damping = damping
        self._damping_band = damping_band
        #: `ratelimit-remaining` of the previous answer, within the band (None: restart)
        self._last_level: float | None = None
        self._max_block = max_block
        self._clock = clock
        self._sleep = sleep
        self._lock = _PriorityLock()
        # GCRA: theoretical arrival time of the next request
        self._tat = clock()
        self._blocked_until = 0.0
        self._last_decrease = -math.inf
        self._last_adjust: float | None = None
        #: this process's share of the team's senders (see `set_share`)
        self._share = 1.0
        self.acquired = 0
        self.throttled = 0
        self.decreases = 0

    def __repr__(self) -> str:
        return (
            f"<RateLimiter rate={self._rate:.2f} ceiling={self._ceiling:.2f} "
            f"acquired={self.acquired} throttled={self.throttled} decreases={self.decreases}>"
        )

    @property
    def rate(self) -> float:
        """Requests per second this process allows itself now."""
        return self._rate

    @property
    def ceiling(self) -> float:
        """The advertised team limit (or the starting rate before any header)."""
        return self._ceiling

    async def acquire(self, priority: int = 1) -> None:
        """Wait for this process's next request slot.

        Waiters are served by `priority` (lower first: urgent mail before bulk),
        FIFO within one priority. The waiter at the front sleeps until its slot, so
        an urgent request arriving meanwhile waits for at most that one slot.
        """
        await self._lock.acquire(priority)
        try:
            while True:
                now = self._clock()
                interval = 1.0 / self._rate
                ready = max(self._tat - (self.burst - 1.0) * interval, self._blocked_until)
                if ready <= now:
                    break
                # Re-check after waking: a 429 or a rate change may have moved the slot.
                await self._sleep(ready - now)
            self._tat = max(self._tat, now) + interval
            self.acquired += 1
        finally:
            self._lock.release()

    def waiting(self, priority: int = 1) -> int:
        """Requests of this process a new one of `priority` would wait behind."""
        return self._lock.waiting(priority)

    @property
    def share(self) -> float:
        return self._share

    def set_share(self, share: float) -> None:
        """This process's share of the work (its partitions over the group's, say).

        Every replica probes the team's limit on its own: each speeds up by
        `increase` x its share of the ceiling, so N replicas together speed up as one
        process would, instead of N times as fast (which overshoots into 429s at a
        small limit). A replica that just joined starts at its share, not at the
        whole limit; one whose share grew ramps up from where it is.
        """
        self._share = min(1.0, max(0.01, float(share)))
        self._rate = min(self._rate, max(self.min_rate, self._ceiling * self._share))

    def observe(
        self, headers: Mapping[str, str], status: int | None, *, name: str | None = None
    ) -> None:
        """Adapt from one answer's headers (status None: no answer, nothing learnt)."""
        if status is None:
            return
        now = self._clock()
        limit = _number(headers, HEADER_LIMIT)
        if limit is not None and limit > 0:
            self._ceiling = limit
            self.min_rate = min(self.min_rate, limit)
        remaining = _number(headers, HEADER_REMAINING)
        dt = 0.0 if self._last_adjust is None else min(now - self._last_adjust, 1.0)
        self._last_adjust = now

        if status == 429 and name not in QUOTA_NAMES:
            self.throttled += 1
            self._slow_down(now, self._decrease)
            wait = _number(headers, HEADER_RETRY_AFTER)
            if wait is None:
                wait = _number(headers, HEADER_RESET)
            if wait is not None:
                self._block(now, wait)
            self._last_level = None  # the cut answered this fall
        elif remaining is not None and self._ceiling > 0:
            share = remaining / self._ceiling
            # Every replica sees the same low budget: each backs off by its share, so
            # that together they back off as one process would
            if remaining < 1:
                # The next request may be refused: back off before a 429 says so.
                self._slow_down(now, 1.0 - (1.0 - self._soft_decrease) * self._share)
                self._last_level = None  # the cut answered this fall
                self._rate = min(max(self._rate, self.min_rate), self._ceiling)
                return
            level = min(remaining, self._damping_band * self._ceiling)
            if self._last_level is not None:
                # The budget's movement since the previous answer: the team's excess
                # (or shortfall) over the limit, before the budget runs low (or fills).
                self._rate += self._damping * self._share * (level - self._last_level)
            self._last_level = level
            if share < self._low:
                # Smooth exponential decay while the team's budget runs low.
                self._rate *= math.exp(-dt * self._share)
            elif share >= self._high:
                self._rate += self._increase * self._ceiling * self._share * dt
        elif 200 <= status < 300:
            # No rate headers (a proxy strips them): recover slowly towards the ceiling.
            self._rate += self._increase * self._ceiling * self._share * dt
        self._rate = min(max(self._rate, self.min_rate), self._ceiling)

    def _slow_down(self, now: float, factor: float) -> None:
        # Answers to requests already in flight all report the same congestion:
        # halve once per cooldown, not once per answer.
        if now - self._last_decrease >= self._cooldown:
            self._last_decrease = now
            self._rate = max(self.min_rate, self._rate * factor)
            self.decreases += 1

    def _block(self, now: float, seconds: float) -> None:
        self._blocked_until = max(self._blocked_until, now + min(seconds, self._max_block))


class _PriorityLock:
    """A lock handed to the most urgent waiter (lowest priority number), FIFO within one."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        #: live waiters per priority
        self._counts: dict[int, int] = {}

    def waiting(self, priority: int) -> int:
        """Waiters served before a new one of `priority`, and the holder."""
        ahead = sum(n for p, n in self._counts.items() if p <= priority)
        return ahead + (1 if self._locked else 0)

    async def acquire(self, priority: int) -> None:
        if not self._locked:  # released with nobody live waiting: free
            self._locked = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), future))
        self._counts[priority] = self._counts.get(priority, 0) + 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed over as we were cancelled: pass it on
            else:
                self._counts[priority] -= 1  # never handed over: waits no more
            raise

    def release(self) -> None:
        while self._waiters:
            priority, _, future = heapq.heappop(self._waiters)
            if not future.done():
                self._counts[priority] -= 1  # the holder now, no longer a waiter
                future.set_result(None)  # the lock passes straight to it
                return
        self._locked = False
