"""`resend-consumer sandbox` runs from the command line, serves, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import orjson

from consumer.cli import build_parser
from consumer.sandbox.cli import config_from
from tests.sandbox.support import send


def test_flags_build_the_config() -> None:
    """Every flag lands in SandboxConfig/Faults; durations like 2s are parsed."""
    args = build_parser().parse_args(
        [
            "sandbox",
            "--port", "0",
            "--api-key", "re_x",
            "--rate-limit", "50",
            "--idempotency-ttl", "2s",
            "--daily-quota", "7",
            "--monthly-quota", "70",
            "--seed", "3",
            "--latency-ms", "5",
            "--latency-uniform-ms", "1,4",
            "--latency-lognormal", "20,0.5",
            "--error-rate", "0.1",
            "--html-error-share", "0.5",
            "--drop-after-accept-rate", "0.01",
            "--hang-rate", "0.02",
            "--storm-429-rate", "0.03",
            "--force-status", "503:service_unavailable",
        ]
    )  # fmt: skip
    cfg = config_from(args)
    assert cfg.api_key == "re_x"
    assert (cfg.rate_limit, cfg.idempotency_ttl, cfg.seed) == (50.0, 2.0, 3)
    assert (cfg.daily_quota, cfg.monthly_quota) == (7, 70)
    f = cfg.faults
    assert (f.latency_ms, f.latency_uniform_ms, f.latency_lognormal) == (5, (1, 4), (20, 0.5))
    assert (f.error_rate, f.html_error_share, f.drop_after_accept_rate) == (0.1, 0.5, 0.01)
    assert (f.hang_rate, f.storm_429_rate) == (0.02, 0.03)
    assert f.forced is not None
    assert (f.forced.status, f.forced.name) == (503, "service_unavailable")


async def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The command prints its URL, answers, forgets keys after the TTL, logs, exits 0 on SIGTERM."""
    log = tmp_path / "sent.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "sandbox", "--port", "0",
        "--api-key", "re_cli", "--idempotency-ttl", "500ms", "--log", str(log),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            reply = await send(http, url, key="cli:1", api_key="re_cli")
            assert reply.status == 200
            sent = reply.json()
            assert (await send(http, url, key="cli:1", api_key="re_cli")).json() == sent
            await asyncio.sleep(0.6)  # past --idempotency-ttl: the key is forgotten
            later = await send(http, url, key="cli:1", api_key="re_cli")
            assert later.json()["id"] != sent["id"]
            other = await send(http, url, api_key="re_other")
            assert other.status == 403
            async with http.get(url + "/_sandbox/stats") as r:
                assert (await r.json())["sends_per_key"] == {"cli:1": 2}
        records = [orjson.loads(x) for x in log.read_bytes().splitlines()]
        assert [r["idempotency_key"] for r in records] == ["cli:1", "cli:1"]
        assert records[0]["id"] == sent["id"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
    assert code == 0
