"""Replicas sharing one Resend team limit: share of 429s and achieved rate.

Starts an in-process sandbox limited to `--limit` requests per second for one
API key, then runs `--replicas` independent clients (each with its own
RateLimiter, ServiceGate and pool of workers, as separate pods would have)
delivering distinct emails for `--seconds`. Prints one line per run.

    .venv/bin/python bench/bench_ratelimit.py --replicas 3 --limit 10 --seconds 30

Targets (issue 5): 429 share under 2 %, achieved rate at least 90 % of the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

from consumer.ratelimit import RateLimiter
from consumer.resend import ResendClient
from consumer.retry import RetryPolicy, ServiceGate, deliver
from consumer.sandbox import Faults, Sandbox, SandboxConfig
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
    args = parser.parse_args()
    tuning = {k: float(v) for k, v in (t.split("=", 1) for t in args.tune)}
    if tuning:
        print(f"tuning: {tuning}")
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
