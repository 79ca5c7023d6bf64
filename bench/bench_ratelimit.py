"""Replicas sharing one Resend team limit: share of 429s and achieved rate.

Starts an in-process sandbox limited to `--limit` requests per second for one
API key, then runs `--replicas` independent clients (each with its own
RateLimiter, ServiceGate and pool of workers, as separate pods would have)
delivering distinct emails for `--seconds`. Prints one line per run.

    .venv/bin/python bench/bench_ratelimit.py --replicas 3 --limit 10 --seconds 30

Targets (issue 5): 429 share under 2 %, achieved rate at least 90 % of the limit.

`--simulate` runs the same replicas in virtual time instead (an event loop whose
clock jumps to the next timer), against the sandbox's token bucket or a fixed
one-second window, with `--latency-ms` each way plus up to `--jitter-ms`: seconds
of steering in milliseconds of CPU, the same on every run of a seed, so limiter
changes can be compared without the noise of a shared machine.

    .venv/bin/python bench/bench_ratelimit.py --simulate --replicas 3 --limit 5 \
        --seconds 120 --latency-ms 40 --seeds 5 [--server window] [--tune damping=0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import selectors
import time
from typing import Any

from consumer.ratelimit import RateLimiter
from consumer.resend import ResendClient
from consumer.retry import RetryPolicy, ServiceGate, deliver
from consumer.sandbox import Faults, Sandbox, SandboxConfig
from consumer.sandbox.state import TokenBucket
from consumer.settings import Secret

KEY = "re_bench"


async def run(
    replicas: int,
    limit: float,
    seconds: float,
    workers: int,
    latency_ms: float,
    tuning: dict[str, float],
    share: bool = False,
) -> None:
    config = SandboxConfig(api_key=KEY, rate_limit=limit, faults=Faults(latency_ms=latency_ms))
    async with Sandbox(config=config) as sb:
        numbers = itertools.count()
        policy = RetryPolicy(base=0.1, cap=2.0, max_attempts=100, max_elapsed=300.0)
        replicas_ = []
        for _ in range(replicas):
            limiter = RateLimiter(rate=limit, **tuning)
            if share:
                limiter.set_share(1.0 / replicas)  # as the service does from its partitions
            client = ResendClient(base_url=sb.url, api_key=Secret(KEY), limiter=limiter)
            await client.start()
            replicas_.append((client, ServiceGate(), asyncio.Semaphore(workers)))
        stop_at = time.monotonic() + seconds
        # The rate is counted from the sandbox's ledger between the end of the
        # first second (its bucket starts full) and the stop time: the drain of
        # deliveries still queued after the stop would understate it.
        wall_start = time.time()

        async def worker(client: ResendClient, gate: ServiceGate, slots: asyncio.Semaphore) -> None:
            while time.monotonic() < stop_at:
                n = next(numbers)
                body = (
                    b'{"from":"a@example.com","to":"b@example.com","subject":"%d","text":"t"}' % n
                )
                await deliver(
                    client,
                    endpoint="/emails",
                    body=body,
                    idempotency_key=f"bench-{n}",
                    policy=policy,
                    gate=gate,
                    slots=slots,
                )

        started = time.monotonic()
        try:
            await asyncio.gather(
                *(worker(c, g, s) for c, g, s in replicas_ for _ in range(workers))
            )
        finally:
            for c, _, _ in replicas_:
                await c.close()
        elapsed = time.monotonic() - started
        stats = sb.stats()
        ok = stats["statuses"].get("200", 0)
        throttled = stats["statuses"].get("429", 0)
        window = (wall_start + 1.0, wall_start + seconds)
        in_window = [d for d in sb.deliveries() if window[0] <= d.received_at < window[1]]
        steady = len(in_window) / (seconds - 1.0)
        print(
            f"replicas={replicas} limit={limit:g}/s seconds={elapsed:.1f} workers={workers} "
            f"latency={latency_ms:g}ms sent={ok} 429s={throttled} "
            f"share_429={throttled / max(ok + throttled, 1):.2%} "
            f"rate={ok / elapsed:.2f}/s ({ok / elapsed / limit:.0%}) "
            f"steady_rate={steady:.2f}/s ({steady / limit:.0%}) "
            f"final_rates={[round(c.limiter.rate, 2) for c, _, _ in replicas_ if c.limiter]}"
        )


# -- virtual time --------------------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Never waits: a wait for the next timer moves the loop's clock there instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("nothing scheduled: the simulation would wait forever")
        self._loop.now += max(timeout, 0.0)
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (no sockets: only timers and callbacks)."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class BucketServer:
    """The sandbox's rule: a token bucket of one second's worth, its headers."""

    def __init__(self, limit: float, clock: Any) -> None:
        self._bucket = TokenBucket(rate=limit, clock=clock)
        self._limit = str(int(limit))

    def request(self) -> tuple[bool, dict[str, str]]:
        ok = self._bucket.take()
        headers = {
            "ratelimit-limit": self._limit,
            "ratelimit-remaining": str(self._bucket.remaining()) if ok else "0",
            "ratelimit-reset": str(self._bucket.reset_after()),
        }
        if not ok:
            headers["retry-after"] = str(self._bucket.retry_after())
        return ok, headers


class WindowServer:
    """A fixed window: `limit` requests per whole second, remaining counts down in it."""

    def __init__(self, limit: float, clock: Any) -> None:
        self._limit, self._clock = int(limit), clock
        self._window, self._count = -1, 0

    def request(self) -> tuple[bool, dict[str, str]]:
        now = self._clock()
        if math.floor(now) != self._window:
            self._window, self._count = math.floor(now), 0
        ok = self._count < self._limit
        self._count += ok
        reset = str(max(1, math.ceil(self._window + 1 - now)))
        headers = {
            "ratelimit-limit": str(self._limit),
            "ratelimit-remaining": str(self._limit - self._count),
            "ratelimit-reset": reset,
        }
        if not ok:
            headers["retry-after"] = reset
        return ok, headers


async def _simulated(
    *,
    replicas: int,
    limit: float,
    seconds: float,
    workers: int,
    latency: float,
    jitter: float,
    server: str,
    seed: int,
    tuning: dict[str, float],
    warmup: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    srv = (BucketServer if server == "bucket" else WindowServer)(limit, loop.time)
    accepted: list[float] = []
    refused: list[float] = []
    limiters = []
    for _ in range(replicas):
        limiter = RateLimiter(rate=limit, clock=loop.time, **tuning)  # type: ignore[arg-type]
        limiter.set_share(1.0 / replicas)
        limiters.append(limiter)

    async def worker(limiter: RateLimiter) -> None:
        while loop.time() < seconds:
            await limiter.acquire()
            await asyncio.sleep(latency + rng.uniform(0, jitter))
            ok, headers = srv.request()
            (accepted if ok else refused).append(loop.time())
            await asyncio.sleep(latency + rng.uniform(0, jitter))
            limiter.observe(headers, 200 if ok else 429, name=None if ok else "rate_limit_exceeded")
            if not ok:
                await asyncio.sleep(float(headers["retry-after"]))

    await asyncio.gather(*(worker(lim) for lim in limiters for _ in range(workers)))
    ok = sum(1 for t in accepted if warmup <= t < seconds)
    no = sum(1 for t in refused if warmup <= t < seconds)
    return {"rate": ok / (seconds - warmup), "share_429": no / max(ok + no, 1)}


def simulate(**kwargs: Any) -> dict[str, Any]:
    """One seeded run in virtual time: accepted requests/s after `warmup`, 429 share."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(_simulated(**kwargs))
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--limit", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=8, help="concurrent deliveries per replica")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sandbox latency per request")
    parser.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="RateLimiter keyword to try, e.g. --tune increase=0.2 (repeatable)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="give each replica its share (1/replicas), as the service does from its partitions",
    )
    parser.add_argument("--simulate", action="store_true", help="virtual time, no sockets")
    parser.add_argument("--server", choices=("bucket", "window"), default="bucket")
    parser.add_argument("--jitter-ms", type=float, default=20.0, help="--simulate: extra delay")
    parser.add_argument("--seeds", type=int, default=3, help="--simulate: runs, one per seed")
    parser.add_argument("--warmup", type=float, default=10.0, help="--simulate: not counted")
    args = parser.parse_args()
    tuning = {k: float(v) for k, v in (t.split("=", 1) for t in args.tune)}
    if tuning:
        print(f"tuning: {tuning}")
    if args.simulate:
        for seed in range(args.seeds):
            r = simulate(
                replicas=args.replicas,
                limit=args.limit,
                seconds=args.seconds,
                workers=args.workers,
                latency=args.latency_ms / 1000,
                jitter=args.jitter_ms / 1000,
                server=args.server,
                seed=seed,
                tuning=tuning,
                warmup=args.warmup,
            )
            print(
                f"simulated server={args.server} replicas={args.replicas} "
                f"limit={args.limit:g}/s latency={args.latency_ms:g}+{args.jitter_ms:g}ms "
                f"seed={seed} rate={r['rate']:.2f}/s ({r['rate'] / args.limit:.1%}) "
                f"share_429={r['share_429']:.2%}"
            )
        return
    asyncio.run(
        run(
            args.replicas,
            args.limit,
            args.seconds,
            args.workers,
            args.latency_ms,
            tuning,
            args.share,
        )
    )


if __name__ == "__main__":
    main()
