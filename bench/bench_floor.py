"""The floor under the pipeline: bare aiohttp POSTs to the sandbox, nothing else.

What one send costs the client when there is no Kafka, no preparation, no
retries and no logging; compare with `bench_pipeline.py throughput`.

    .venv/bin/python bench/bench_floor.py --requests 20000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pipeline import API_KEY, free_port, start_sandbox  # noqa: E402

BODY = (
    b'{"from":"Acme <orders@acme.example>","to":["jane@example.com"],"subject":"Order A-1",'
    b'"html":"' + b"x" * 900 + b'"}'
)


async def load(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, client CPU microseconds per request)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            headers = {
                "Authorization": f"Bearer {API_KEY}",
                "User-Agent": "bench-floor",
                "Content-Type": "application/json",
                "Idempotency-Key": f"floor-{i}",
            }
            async with slots, session.post(url, data=BODY, headers=headers) as resp:
                await resp.read()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
    return requests / wall, cpu / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    sandbox = start_sandbox(port, 0.0)
    try:
        rate, cpu = asyncio.run(
            load(f"http://127.0.0.1:{port}/emails", args.requests, args.concurrency)
        )
    finally:
        sandbox.terminate()
        sandbox.wait(30)
    print(f"raw aiohttp floor: {rate:,.0f} req/s, client CPU {cpu:.0f} us per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
