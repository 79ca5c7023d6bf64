"""Batching benchmarks: emails/s under a team rate limit, urgent latency, the SDK's CPU per email.

Separate processes over real sockets: the Kafka broker in KAFKA_BOOTSTRAP_SERVERS,
the sandbox (`python -m consumer sandbox`, limited to `--limit` requests/s for its
one API key) and one or more services (`python -m consumer run`, one consumer group,
RATE_LIMIT set to the limit). Figures come from the sandbox (`/_sandbox/stats`, the
ledger at `/_sandbox/deliveries`) and from /proc for the services' CPU time.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python bench/bench_batch.py \
        throughput --batch-size 100 --replicas 1 --limit 5 --events 20000 --seconds 30
    ... throughput --batch-size 1 --replicas 1 --limit 5 --events 400 --seconds 30
    ... throughput --batch-size 100 --replicas 3 --limit 5 --events 20000 --seconds 30
    ... urgent --bulk 50000 --seconds 30 --limit 5
    ... urgent --bulk 50000 --seconds 30 --limit 5 --same-topic
    ... sdk --emails 2000 [--service-events 100000]

throughput: emails and requests per second, and the 429 share, from `--warmup` seconds
after the first accepted email until `--seconds` or all delivered; the services' CPU
per email over that window (records prepared before it are not counted: with no rate
limit give it enough events). urgent: one password_reset.requested a second on its own
topic (or on the bulk one with --same-topic) while a backlog of order.confirmed drains;
latency publish -> acceptance in the sandbox ledger. sdk: the official `resend` SDK's
`Batch.send` of 100 rendered order emails in a loop (no rate limit), CPU of this
process per email; then the service's CPU per email with no rate limit, for comparison.
`--sizes` (throughput) adds how far the accepted requests of the window fall short of
100 emails (from the sandbox's ledger). `--logs DIR` keeps the processes' output.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumer.prepare import Prepared, Preparer  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from tests.pipeline_support import order_event  # noqa: E402

API_KEY = "re_bench_key"
MAX_BATCH = 100
ROUTES = ROOT / "schemas" / "routes.yaml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
URGENT_TO = re.compile(r"urgent-(\d+)@")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return orjson.loads(resp.read())


def reset_event(i: int) -> bytes:
    """An urgent `password_reset.requested` CloudEvent (a current `time`) to urgent-{i}@."""
    data = {"user_id": f"usr-{i}", "request_id": f"prr-{uuid.uuid4().hex[:12]}"}
    data |= {"email": f"urgent-{i}@example.com", "expires_in_minutes": 60}
    data |= {"reset_url": f"https://acme.example/reset?token=t{i}"}
    event = {"specversion": "1.0", "id": f"reset-{uuid.uuid4().hex}", "data": data}
    event |= {"type": "password_reset.requested", "source": "https://auth.acme.example"}
    event |= {"time": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
    return orjson.dumps(event | {"datacontenttype": "application/json"})


async def produce(bootstrap: str, topics: list[str], partitions: int, n: int) -> float:
    """Create `topics`, put `n` order.confirmed events `ord-0..n-1` in the first one."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    await producer.start()
    t0 = time.perf_counter()
    template = order_event(0)
    try:
        pending = []
        for i in range(n):
            value = template.replace(b"ord-0", b"ord-%d" % i).replace(b"evt-0", b"evt-%d" % i)
            pending.append(await producer.send(topics[0], value, key=b"ord-%d" % i))
            if len(pending) >= 20_000 or i == n - 1:
                await asyncio.gather(*pending)
                pending.clear()
    finally:
        await producer.stop()
    return time.perf_counter() - t0


@dataclass
class Sample:
    """The sandbox's counters and the services' CPU seconds at one moment."""

    t: float
    emails: int = 0
    requests: int = 0
    cpu: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)


class Rig:
    """The sandbox and services of one run, their output in `tmp`; `close()` ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []  # the sandbox first

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{args[0]}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            cmd = [sys.executable, "-m", "consumer", *args]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def sandbox(self, limit: float) -> str:
        port = free_port()
        args = ["sandbox", "--port", str(port), "--api-key", API_KEY, "--rate-limit", str(limit)]
        proc = self._spawn(args, dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                get_json(f"{url}/_sandbox/health")
                return url
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise SystemExit(f"sandbox did not start:\n{self.procs[-1][1].read_text()[-2000:]}")

    def service(self, bootstrap: str, topics: str, url: str, group: str, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "RESEND_"))}
        full |= {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPICS": topics}
        full |= {"KAFKA_GROUP_ID": group, "RESEND_BASE_URL": url, "RESEND_API_KEY": API_KEY}
        full |= {"ROUTES_FILE": str(ROUTES), "HEALTH_PORT": "0", "PYTHONUNBUFFERED": "1"}
        self._spawn(["run"], full | {"LOG_LEVEL": "info", "LOG_FORMAT": "json"} | env)

    @property
    def services(self) -> list[tuple[subprocess.Popen[bytes], Path]]:
        return self.procs[1:]

    def check(self) -> None:
        for proc, log in self.services:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"service {proc.pid} exited with {proc.returncode}:\n{tail}")

    def sample(self, url: str) -> Sample:
        st = get_json(f"{url}/_sandbox/stats")
        cpu = sum(cpu_seconds(p.pid) for p, _ in self.services)
        t = time.monotonic()
        return Sample(t, st["deliveries"], st["requests"], cpu, st["outcomes"], st["statuses"])

    def assignments(self) -> list[int]:
        """`partitions.assigned` log lines per service (above 1: a rebalance moved partitions)."""
        return [log.read_text().count("partitions.assigned") for _, log in self.services]

    def close(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}


def params(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "logs"} | extra


def throughput(bootstrap: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    topic = f"bench-batch-{uuid.uuid4().hex[:8]}"
    produced_in = asyncio.run(produce(bootstrap, [topic], args.partitions, args.events))
    rig = Rig(tmp)
    try:
        url = rig.sandbox(args.limit)
        group = f"bench-{uuid.uuid4().hex[:8]}"
        env = {"BATCH_SIZE": str(args.batch_size), "BATCH_LINGER": f"{args.linger}s"}
        zero = Sample(time.monotonic())
        for _ in range(args.replicas):
            rig.service(bootstrap, topic, url, group, RATE_LIMIT=str(args.limit), **env)
        first: float | None = None
        start: Sample | None = None
        start_wall = time.time()
        while True:
            time.sleep(1.0)
            rig.check()
            end = rig.sample(url)
            if first is None and end.emails:
                first = end.t
            if start is None and first is not None and end.t - first >= args.warmup:
                start, start_wall = end, time.time()
            if end.emails >= args.events or end.t - zero.t >= args.seconds:
                break
        if start is None or start.t >= end.t:
            start = zero  # everything happened within the warm-up: the whole run
        window = end.t - start.t
        emails, requests = end.emails - start.emails, end.requests - start.requests
        outcomes = diff(start.outcomes, end.outcomes)
        throttled = end.statuses.get("429", 0) - start.statuses.get("429", 0)
        sizes = batch_sizes(url, start_wall) if getattr(args, "sizes", False) else {}
        return params(args) | {
            "produced_in_s": round(produced_in, 2),
            "first_email_after_s": round(first - zero.t, 2) if first is not None else None,
            "elapsed_s": round(end.t - zero.t, 2),
            "window_s": round(window, 2),
            "delivered": end.emails,
            "emails_per_s": round(emails / window, 2),
            "requests_per_s": round(requests / window, 2),
            "emails_per_accepted_request": round(emails / max(outcomes.get("sent", 0), 1), 1),
            "share_429": round(throttled / max(requests, 1), 4),
            "outcomes_window": outcomes,
            "outcomes": end.outcomes,
            "service_cpu_s": round(end.cpu, 2),
            "cpu_us_per_email": round((end.cpu - start.cpu) / max(emails, 1) * 1e6, 1),
            "cpu_us_per_email_whole_run": round(end.cpu / max(end.emails, 1) * 1e6, 1),
            "assignments_logged": rig.assignments(),
            **sizes,
        }
    finally:
        rig.close()


def batch_sizes(url: str, since: float) -> dict[str, Any]:
    """How far accepted requests since `since` (wall clock) fall short of full batches."""
    found = get_json(f"{url}/_sandbox/deliveries?since={since}")["data"]
    requests: dict[str, int] = {}
    for d in found:
        rid = d["request_id"] or d["id"]
        requests[rid] = requests.get(rid, 0) + 1
    sizes = sorted(requests.values())
    partial = [n for n in sizes if n < MAX_BATCH]
    return {
        "requests_counted": len(sizes),
        "partial_requests": len(partial),
        "partial_sizes": " ".join(map(str, partial)),
        "emails_short_per_request": round(sum(MAX_BATCH - n for n in sizes) / len(sizes), 2)
        if sizes
        else None,
    }


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile, None when there are no values."""
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3) if ordered else None


async def urgent(bootstrap: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    bulk = f"bench-bulk-{uuid.uuid4().hex[:8]}"
    topic = bulk if args.same_topic else f"bench-urgent-{uuid.uuid4().hex[:8]}"
    names = list(dict.fromkeys([bulk, topic]))  # one topic with --same-topic
    await produce(bootstrap, names, args.partitions, args.bulk)
    rig = Rig(tmp)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    try:
        url = await asyncio.to_thread(rig.sandbox, args.limit)
        topics, group = ",".join(names), f"bench-{uuid.uuid4().hex[:8]}"
        env = {"BATCH_SIZE": "100", "BATCH_LINGER": f"{args.linger}s"}
        rig.service(bootstrap, topics, url, group, RATE_LIMIT=str(args.limit), **env)
        started = time.monotonic()
        while (await asyncio.to_thread(rig.sample, url)).emails == 0:
            rig.check()
            if time.monotonic() - started > 120:
                raise SystemExit("no email accepted within 120 s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.warmup)
        before = await asyncio.to_thread(rig.sample, url)
        wall0 = time.time()
        published: dict[int, float] = {}
        for i in range(int(args.seconds)):
            rig.check()
            published[i] = time.time()
            await producer.send_and_wait(topic, reset_event(i), key=b"usr-%d" % i)
            await asyncio.sleep(max(0.0, wall0 + i + 1 - time.time()))
        after = await asyncio.to_thread(rig.sample, url)
        wall1 = time.time()
        query = urllib.parse.urlencode({"to": "urgent-", "since": wall0 - 1})
        accepted: dict[int, dict[str, Any]] = {}
        grace_end = time.monotonic() + args.grace
        while len(accepted) < len(published) and time.monotonic() < grace_end:
            found = await asyncio.to_thread(get_json, f"{url}/_sandbox/deliveries?{query}")
            for d in found["data"]:
                to = d["body"]["to"]
                if m := URGENT_TO.search(to if isinstance(to, str) else " ".join(to)):
                    accepted.setdefault(int(m.group(1)), d)
            if len(accepted) < len(published):
                await asyncio.sleep(1.0)
        lat = [accepted[i]["received_at"] - t for i, t in published.items() if i in accepted]
        in_window = sum(1 for d in accepted.values() if d["received_at"] < wall1)
        window = after.t - before.t
        return params(args, batch_size=100) | {
            "published_urgent": len(published),
            "accepted_urgent": len(accepted),
            "missing_urgent": len(set(published) - set(accepted)),
            "latency_p50_s": quantile(lat, 0.5),
            "latency_p99_s": quantile(lat, 0.99),
            "latency_max_s": quantile(lat, 1.0),
            "latencies_s_in_publish_order": " ".join(f"{x:.2f}" for x in lat),
            "urgent_via_batch": sum(1 for d in accepted.values() if d["endpoint"] != "/emails"),
            "window_s": round(window, 2),
            "bulk_emails_per_s": round((after.emails - before.emails - in_window) / window, 2),
            "requests_per_s": round((after.requests - before.requests) / window, 2),
            "outcomes_window": diff(before.outcomes, after.outcomes),
            "service_cpu_s": round(after.cpu, 2),
            "assignments_logged": rig.assignments(),
        }
    finally:
        await producer.stop()
        rig.close()


def sdk(bootstrap: str | None, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import resend

    preparer = Preparer.from_settings(Settings(routes_file=ROUTES))
    events = [order_event(i) for i in range(args.emails)]
    cpu0 = time.process_time()
    prepared = [
        preparer.prepare(e, [], topic="t", partition=0, offset=0, timestamp_ms=None) for e in events
    ]
    render_cpu = time.process_time() - cpu0
    batch = [orjson.loads(p.body) for p in prepared[:100] if isinstance(p, Prepared)]
    assert len(batch) == 100, prepared[0]
    calls = math.ceil(args.emails / 100)
    rig = Rig(tmp)
    try:
        resend.api_key, resend.api_url = API_KEY, rig.sandbox(1_000_000)
        resend.Batch.send(batch)  # warm-up: connection, imports
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            resend.Batch.send(batch)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        accepted = int(get_json(f"{resend.api_url}/_sandbox/stats")["deliveries"]) - len(batch)
    finally:
        rig.close()
    out = params(args) | {
        "resend_sdk": resend.__version__,
        "emails": calls * 100,
        "accepted": accepted,
        "requests": calls,
        "elapsed_s": round(wall, 3),
        "emails_per_s": round(calls * 100 / wall, 1),
        "sdk_cpu_s": round(cpu, 3),
        "sdk_cpu_us_per_email": round(cpu / (calls * 100) * 1e6, 1),
        "email_body_bytes": len(orjson.dumps(batch[0])),
        # the service's own rendering (Preparer.prepare), in this process, for scale
        "render_cpu_us_per_email": round(render_cpu / len(events) * 1e6, 1),
    }
    if args.service_events and bootstrap:
        ns = argparse.Namespace(mode="throughput", batch_size=100, replicas=1, limit=1e6)
        ns.events, ns.seconds, ns.logs = args.service_events, 180.0, args.logs
        ns.partitions, ns.warmup, ns.linger = args.partitions, args.warmup, args.linger
        service = throughput(bootstrap, tmp, ns)
        out["service_cpu_us_per_email"] = service["cpu_us_per_email"]
        out["service_run"] = service
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("throughput", help="emails/s, requests/s, 429 share, CPU per email")
    tp.add_argument("--batch-size", type=int, default=100)
    tp.add_argument("--replicas", type=int, default=1)
    tp.add_argument("--limit", type=float, default=5.0, help="sandbox requests/s per API key")
    tp.add_argument("--events", type=int, default=20_000)
    tp.add_argument("--seconds", type=float, default=60.0, help="stop after this, from start")
    tp.add_argument("--sizes", action="store_true", help="why requests fall short of 100 emails")
    ur = sub.add_parser("urgent", help="latency of urgent mail behind a bulk backlog")
    ur.add_argument("--bulk", type=int, default=50_000)
    ur.add_argument("--seconds", type=float, default=30.0, help="one urgent event a second")
    ur.add_argument("--limit", type=float, default=5.0)
    ur.add_argument("--same-topic", action="store_true", help="urgent events in the bulk topic")
    ur.add_argument("--grace", type=float, default=30.0, help="wait for late urgent emails")
    sd = sub.add_parser("sdk", help="CPU per email of resend.Batch.send, and of the service")
    sd.add_argument("--emails", type=int, default=2000)
    sd.add_argument("--service-events", type=int, default=100_000, help="0: skip the service")
    for p in (tp, ur, sd):
        p.add_argument("--partitions", type=int, default=6)
        p.add_argument("--warmup", type=float, default=3.0, help="seconds after the first email")
        p.add_argument("--linger", type=float, default=0.2, help="BATCH_LINGER, seconds")
        p.add_argument("--logs", type=Path, default=None, help="keep process logs in this dir")
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp_dir:
        tmp = Path(args.logs or tmp_dir)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.mode == "sdk":
            result = sdk(bootstrap, tmp, args)
        elif bootstrap is None:
            raise SystemExit("set KAFKA_BOOTSTRAP_SERVERS to a running broker")
        elif args.mode == "throughput":
            result = throughput(bootstrap, tmp, args)
        else:
            result = asyncio.run(urgent(bootstrap, tmp, args))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
