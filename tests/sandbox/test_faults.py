"""Sandbox rate limits, quotas and injected faults, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from consumer.sandbox import Faults, ForcedStatus, Sandbox, SandboxConfig
from tests.sandbox.support import send

RATE_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")


class ManualClock:
    """A monotonic clock that only moves when told, so bucket tests do not race real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clocked() -> AsyncIterator[tuple[Sandbox, ManualClock]]:
    clock = ManualClock()
    async with Sandbox(config=SandboxConfig(rate_limit=5), clock=clock) as sb:
        yield sb, clock


async def test_rate_limit_headers_and_429(
    clocked: tuple[Sandbox, ManualClock], http: aiohttp.ClientSession
) -> None:
    """A burst beyond N/s gets 429 with retry-after; every answer has the ratelimit headers."""
    sb, _ = clocked
    answers = [await send(http, sb) for _ in range(7)]
    assert [status for status, _, _ in answers] == [200] * 5 + [429] * 2
    for _, _, headers in answers:
        assert all(h in headers for h in RATE_HEADERS)
        assert headers["ratelimit-limit"] == "5"
        assert headers["ratelimit-policy"] == "5;w=1"
    assert [int(h["ratelimit-remaining"]) for _, _, h in answers] == [4, 3, 2, 1, 0, 0, 0]
    _, text, headers = answers[-1]
    assert '"rate_limit_exceeded"' in text
    assert headers["retry-after"] == "1"
    assert len(sb.deliveries()) == 5


async def test_bucket_is_per_api_key_and_refills(
    clocked: tuple[Sandbox, ManualClock], http: aiohttp.ClientSession
) -> None:
    """Another API key has its own bucket; 0.2 s later (rate 5/s) one more request may pass."""
    sb, clock = clocked
    assert [(await send(http, sb))[0] for _ in range(6)] == [200] * 5 + [429]
    assert (await send(http, sb, api_key="re_other")).status == 200
    clock.now += 0.2
    assert [(await send(http, sb))[0] for _ in range(2)] == [200, 429]
    clock.now += 1.0
    assert [(await send(http, sb))[0] for _ in range(6)] == [200] * 5 + [429]


async def test_daily_quota(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """Past the daily quota: 429 daily_quota_exceeded, x-resend-daily-quota counts emails sent."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=100, daily_quota=2))
    first = await send(http, sb)
    assert first[2]["x-resend-daily-quota"] == "1"
    assert (await send(http, sb))[0] == 200
    status, text, headers = await send(http, sb)
    assert status == 429
    assert '"daily_quota_exceeded"' in text
    assert headers["x-resend-daily-quota"] == "2"
    assert 1 <= int(headers["retry-after"]) <= 86400
    assert len(sb.deliveries()) == 2


async def test_monthly_quota(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """Past the monthly quota: 429 monthly_quota_exceeded."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=100, monthly_quota=1))
    assert (await send(http, sb))[0] == 200
    status, text, headers = await send(http, sb)
    assert status == 429
    assert '"monthly_quota_exceeded"' in text
    assert headers["x-resend-monthly-quota"] == "1"


async def test_fixed_latency_delays_answer(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """With latency_ms set, a client timeout shorter than it fails and a longer one succeeds."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(latency_ms=400)))
    with pytest.raises(TimeoutError):
        await send(http, sb, timeout=aiohttp.ClientTimeout(total=0.1))
    status, _, _ = await send(http, sb, timeout=aiohttp.ClientTimeout(total=5))
    assert status == 200


def test_latency_distributions_are_seeded_and_bounded() -> None:
    """Uniform stays in its bounds, log-normal has the asked median, same seed same draws."""
    import random

    uniform = Faults(latency_uniform_ms=(5, 10))
    draws = [uniform.sample_latency(random.Random(i)) for i in range(200)]
    assert all(0.005 <= d <= 0.010 for d in draws)
    lognormal = Faults(latency_lognormal=(20, 0.5))
    rng = random.Random(7)
    samples = sorted(lognormal.sample_latency(rng) for _ in range(2001))
    assert 0.017 < samples[1000] < 0.023
    again = random.Random(7)
    assert lognormal.sample_latency(again) == Faults(latency_lognormal=(20, 0.5)).sample_latency(
        random.Random(7)
    )


async def test_error_rate_and_html_bodies(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """error_rate=1 answers only 500/503, html_error_share=1 makes them HTML, nothing is sent."""
    faults = Faults(error_rate=1.0, html_error_share=1.0)
    sb = await make_sandbox(config=SandboxConfig(rate_limit=100, faults=faults))
    answers = [await send(http, sb) for _ in range(10)]
    assert {s for s, _, _ in answers} <= {500, 503}
    assert all(h["Content-Type"].startswith("text/html") for _, _, h in answers)
    assert all("<html>" in text for _, text, _ in answers)
    sb.set_faults(Faults(error_rate=1.0))
    status, _text, headers = await send(http, sb)
    assert headers["Content-Type"].startswith("application/json")
    assert status in (500, 503)
    assert sb.deliveries() == []


async def test_error_share_is_roughly_the_rate(
    make_sandbox: Any, http: aiohttp.ClientSession
) -> None:
    """error_rate=0.3 fails about 30 % of 200 requests (seeded, so the count is stable)."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=1000, faults=Faults(error_rate=0.3)))
    statuses = [(await send(http, sb))[0] for _ in range(200)]
    failures = sum(1 for s in statuses if s >= 500)
    assert 40 <= failures <= 80
    assert len(sb.deliveries()) == 200 - failures


async def test_same_seed_same_fault_sequence(
    make_sandbox: Any, http: aiohttp.ClientSession
) -> None:
    """Two sandboxes with one seed fail the same requests and hand out the same ids."""
    runs = []
    for _ in range(2):
        faults = Faults(error_rate=0.5)
        sb = await make_sandbox(config=SandboxConfig(rate_limit=1000, seed=42, faults=faults))
        runs.append(
            [(s, t if s == 200 else "") for s, t, _ in [await send(http, sb) for _ in range(30)]]
        )
    assert runs[0] == runs[1]


async def test_hang_until_client_gives_up(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """hang_rate=1: no answer before the client times out; nothing is sent; stats count it."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(hang_rate=1.0)))
    with pytest.raises(TimeoutError):
        await send(http, sb, key="hang:1", timeout=aiohttp.ClientTimeout(total=0.3))
    assert sb.deliveries() == []
    assert sb.stats()["outcomes"]["fault_hang"] == 1
    async with asyncio.timeout(10):  # the sandbox notices the client left and frees the key
        while sb.stats()["keys_in_flight"]:
            await asyncio.sleep(0.01)
    sb.set_faults(Faults())
    assert (await send(http, sb, key="hang:1"))[0] == 200


async def test_stop_releases_hanging_requests(make_sandbox: Any) -> None:
    """Stopping the sandbox while a request hangs ends promptly and closes the connection."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(hang_rate=1.0)))
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(send(http, sb))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(sb.stop(), timeout=5)
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_storm_429(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """storm_429_rate=1 answers 429 rate_limit_exceeded with retry-after despite a full bucket."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=1000, faults=Faults(storm_429_rate=1)))
    status, text, headers = await send(http, sb)
    assert status == 429
    assert '"rate_limit_exceeded"' in text
    assert headers["ratelimit-remaining"] == "0"
    assert int(headers["retry-after"]) >= 1
    assert sb.stats()["outcomes"]["fault_429"] == 1


async def test_force_status_applies_to_every_request(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """force_status answers every /emails request (even unauthenticated) until cleared."""
    sandbox.set_faults(Faults(force_status={"status": 503, "name": "service_unavailable"}))
    assert isinstance(sandbox.faults.force_status, ForcedStatus)
    for _ in range(3):
        status, text, _ = await send(http, sandbox)
        assert status == 503
        assert '"service_unavailable"' in text
    sandbox.set_faults(Faults(force_status=ForcedStatus(status=403, name="invalid_api_key")))
    assert (await send(http, sandbox))[0] == 403
    sandbox.set_faults(Faults())
    assert (await send(http, sandbox))[0] == 200
    assert len(sandbox.deliveries()) == 1


async def test_faults_over_http(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """POST /_sandbox/faults replaces the faults at run time; bad input is a 400."""
    body = {"force_status": {"status": 429, "name": "daily_quota_exceeded", "retry_after": 60}}
    async with http.post(sandbox.url + "/_sandbox/faults", json=body) as r:
        assert r.status == 200
        assert (await r.json())["force_status"]["status"] == 429
    status, text, headers = await send(http, sandbox)
    assert (status, headers["retry-after"]) == (429, "60")
    assert '"daily_quota_exceeded"' in text
    async with http.post(sandbox.url + "/_sandbox/faults", json={"error_rate": 2}) as r:
        assert r.status == 400
    async with http.post(sandbox.url + "/_sandbox/faults", json={"nope": 1}) as r:
        assert r.status == 400
    async with http.post(sandbox.url + "/_sandbox/faults", json={}) as r:
        assert (await r.json())["force_status"] is None
    assert (await send(http, sandbox))[0] == 200


def test_faults_reject_out_of_range_values() -> None:
    """Rates outside [0, 1], negative latency and reversed ranges are refused at construction."""
    with pytest.raises(ValueError):
        Faults(error_rate=1.5)
    with pytest.raises(ValueError):
        Faults(latency_ms=-1)
    with pytest.raises(ValueError):
        Faults(latency_uniform_ms=(10, 5))
    with pytest.raises(ValueError):
        Faults(force_status={"status": 200, "name": "ok"})
    assert Faults.from_dict(Faults(latency_uniform_ms=(1, 2)).to_dict()) == Faults(
        latency_uniform_ms=(1, 2)
    )
