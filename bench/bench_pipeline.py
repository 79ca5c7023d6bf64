"""Pipeline benchmarks: throughput, CPU per event, and peak memory under a large backlog.

Runs everything as separate processes over real sockets: a Kafka broker (the
one in KAFKA_BOOTSTRAP_SERVERS, or a fresh local one), the sandbox
(`python -m consumer sandbox`) and the service (`python -m consumer run`).
Peak RSS and CPU time are read from /proc for the service process alone.

    .venv/bin/python bench/bench_pipeline.py throughput --events 20000
    .venv/bin/python bench/bench_pipeline.py backlog --events 1000000 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pipeline_support import order_event  # noqa: E402

API_KEY = "re_bench_key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stats(pid: int) -> tuple[int, float]:
    """(peak RSS in KiB, CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return hwm, cpu


def sandbox_count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_sandbox/stats", timeout=5) as resp:
        stats = orjson.loads(resp.read())
    return int(stats.get("deliveries", stats.get("delivered", 0)))


async def produce(bootstrap: str, topic: str, n: int, partitions: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        max_batch_size=512 * 1024,
        compression_type="lz4",
        acks=1,
    )
    await producer.start()
    t0 = time.perf_counter()
    template = order_event(0)
    try:
        pending = []
        for i in range(n):
            value = template.replace(b"ord-0", f"ord-{i}".encode()).replace(
                b"evt-0", f"evt-{i}".encode()
            )
            pending.append(await producer.send(topic, value, key=f"ord-{i}".encode()))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


def start_broker(tmp: Path) -> tuple[str, Path | None]:
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        return given, None
    run_dir = tmp / "kafka"
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy/kafka/broker.py"), "start", "--dir", str(run_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1], run_dir


def start_sandbox(port: int, latency_ms: float) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "consumer",
        "sandbox",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--rate-limit",
        "1000000",
    ]
    if latency_ms:
        args += ["--latency-ms", str(latency_ms)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            sandbox_count(f"http://127.0.0.1:{port}")
            return proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("sandbox did not start")


def start_service(
    bootstrap: str, topic: str, url: str, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_TOPICS": topic,
            "KAFKA_GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "RESEND_BASE_URL": url,
            "RESEND_API_KEY": API_KEY,
            "ROUTES_FILE": str(ROOT / "schemas/routes.yaml"),
            "RATE_LIMIT": "1000000",
            "HEALTH_PORT": "0",
            "LOG_LEVEL": "info",
            "LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", "run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["throughput", "backlog"])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=60.0, help="backlog: how long to watch")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sandbox latency")
    parser.add_argument("--max-in-flight", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bootstrap, broker_dir = start_broker(Path(tmp))
        sandbox = service = None
        try:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            took = asyncio.run(produce(bootstrap, topic, args.events, args.partitions))
            print(f"produced {args.events} events in {took:.1f}s")
            port = free_port()
            latency = args.latency_ms or (50.0 if args.mode == "backlog" else 0.0)
            sandbox = start_sandbox(port, latency)
            url = f"http://127.0.0.1:{port}"
            t0 = time.perf_counter()
            service = start_service(
                bootstrap, topic, url, {"MAX_IN_FLIGHT": str(args.max_in_flight)}
            )
            peak = 0
            cpu = 0.0
            done = 0
            while True:
                time.sleep(0.5)
                if service.poll() is not None:
                    raise SystemExit(f"service exited with {service.returncode}")
                peak, cpu = proc_stats(service.pid)
                done = sandbox_count(url)
                elapsed = time.perf_counter() - t0
                if args.mode == "throughput" and done >= args.events:
                    break
                if args.mode == "backlog" and elapsed >= args.seconds:
                    break
            elapsed = time.perf_counter() - t0
            print(
                orjson.dumps(
                    {
                        "mode": args.mode,
                        "events_produced": args.events,
                        "delivered": done,
                        "seconds": round(elapsed, 2),
                        "events_per_s": round(done / elapsed, 1),
                        "service_cpu_s": round(cpu, 2),
                        "cpu_us_per_event": round(cpu / max(done, 1) * 1e6, 1),
                        "service_peak_rss_mib": round(peak / 1024, 1),
                        "sandbox_latency_ms": latency,
                        "max_in_flight": args.max_in_flight,
                    },
                    option=orjson.OPT_INDENT_2,
                ).decode()
            )
        finally:
            for proc in (service, sandbox):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            if broker_dir is not None:
                subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "deploy/kafka/broker.py"),
                        "stop",
                        "--dir",
                        str(broker_dir),
                    ],
                    check=False,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
