"""Load generator for the sandbox: how many `POST /emails` per second does it sustain?

Runs in its own process so it does not share a core with the server. The
client is a bare asyncio protocol with keep-alive connections (an aiohttp
client would itself be the bottleneck on one core).

    # sandbox on core 0, this script on core 1 (spawned and pinned for you):
    .venv/bin/python bench/sandbox_load.py --spawn --connections 32 --duration 10

    # or against a sandbox you started yourself:
    taskset -c 0 .venv/bin/python -m consumer sandbox --port 8025 --rate-limit 1e9
    taskset -c 1 .venv/bin/python bench/sandbox_load.py --url http://127.0.0.1:8025

Prints requests per second, status counts and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import orjson


def build_body(size: int) -> bytes:
    """A realistic email whose JSON body is about `size` bytes."""
    email = {
        "from": "Acme <orders@acme.test>",
        "to": ["buyer@example.com"],
        "subject": "Your order #12345 has shipped",
        "html": "",
        "tags": [{"name": "category", "value": "order_shipped"}],
    }
    pad = size - len(orjson.dumps(email))
    email["html"] = "<p>" + "x" * max(0, pad - 7) + "</p>"
    return orjson.dumps(email)


class Conn(asyncio.Protocol):
    """One keep-alive connection sending requests back to back."""

    def __init__(self, bench: Bench, index: int) -> None:
        self.bench = bench
        self.index = index
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.seq = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.bench.stopping:
            self.transport.close()
            return
        self.seq += 1
        self.sent_at = time.perf_counter()
        self.transport.write(self.bench.request(self.index, self.seq))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            status = int(head[9:12])
            self.buf = self.buf[total:]
            self.bench.done(status, time.perf_counter() - self.sent_at)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        parts = urlsplit(args.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.body = build_body(args.body_size)
        self.keys = args.idempotency_keys
        self.head = (
            f"POST /emails HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Authorization: Bearer re_bench\r\nUser-Agent: sandbox-load/1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
        ).encode()
        self.fixed = self.head + b"\r\n" + self.body
        self.stopping = False
        self.counting = False
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []

    def request(self, conn: int, seq: int) -> bytes:
        if not self.keys:
            return self.fixed
        return self.head + f"Idempotency-Key: bench:{conn}:{seq}\r\n\r\n".encode() + self.body

    def done(self, status: int, latency: float) -> None:
        if self.counting:
            self.statuses[status] += 1
            self.latencies.append(latency)


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU time of a process (Linux /proc), 0.0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, server_pid: int | None = None) -> None:
    bench = Bench(args)
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    for i in range(args.connections):
        _, proto = await loop.create_connection(lambda i=i: Conn(bench, i), bench.host, bench.port)
        conns.append(proto)
    await asyncio.sleep(args.warmup)
    cpu_before = cpu_seconds(server_pid)
    bench.counting = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    bench.counting = False
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server_pid) - cpu_before
    bench.stopping = True
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), timeout=10)

    total = sum(bench.statuses.values())
    lat = sorted(bench.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    print(
        f"POST /emails body={len(bench.body)}B connections={args.connections} "
        f"idempotency_keys={'yes' if bench.keys else 'no'} duration={elapsed:.1f}s"
    )
    print(f"requests={total} req/s={total / elapsed:,.0f} statuses={dict(bench.statuses)}")
    print(f"latency ms p50={pct(0.5):.2f} p99={pct(0.99):.2f} max={pct(1.0):.2f}")
    if cpu > 0:
        # Other processes may share the server's core; requests per CPU-second of
        # the server is what it would sustain with the core to itself.
        print(
            f"server cpu={cpu:.2f}s ({cpu / elapsed:.0%} of one core) "
            f"req per server cpu-second={total / cpu:,.0f}"
        )


def spawn_sandbox(core: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        "taskset", "-c", str(core), sys.executable, "-m", "consumer", "sandbox",
        "--port", "0", "--rate-limit", "1e12",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("sandbox did not start")
    return proc, line.strip().rsplit(" ", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8025")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument(
        "--idempotency-keys", action="store_true", help="send a unique Idempotency-Key each time"
    )
    parser.add_argument(
        "--spawn", action="store_true", help="start the sandbox on core 0, pin this to core 1"
    )
    parser.add_argument(
        "--server-pid", type=int, default=None, help="pid of the sandbox, to report its CPU time"
    )
    args = parser.parse_args()
    proc = None
    if args.spawn:
        proc, args.url = spawn_sandbox(core=0)
        os.sched_setaffinity(0, {1})
    try:
        asyncio.run(run(args, proc.pid if proc is not None else args.server_pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
