"""Sandbox delivery ledger: /_sandbox endpoints, filters, stats, reset, JSON-lines log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from consumer.sandbox import Faults, Sandbox, SandboxConfig
from tests.sandbox.support import send


def email(to: str, subject: str = "hi") -> dict[str, Any]:
    return {"from": "a@acme.test", "to": to, "subject": subject}


async def test_deliveries_endpoint_filters(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GET /_sandbox/deliveries filters by key, endpoint, recipient, time and limit."""
    before = time.time()
    await send(http, sandbox, email("ann@example.com"), key="k1")
    await send(http, sandbox, email("bob@example.com"), key="k2")
    await send(
        http,
        sandbox,
        [email("cy@example.com"), email("di@example.com")],
        key="b1",
        path="/emails/batch",
    )

    async def query(params: dict[str, str]) -> dict[str, Any]:
        async with http.get(sandbox.url + "/_sandbox/deliveries", params=params) as r:
            assert r.status == 200
            result: dict[str, Any] = await r.json()
            return result

    everything = await query({})
    assert everything["count"] == 4
    assert [d["body"]["to"] for d in everything["data"]][:2] == [
        "ann@example.com",
        "bob@example.com",
    ]
    first = everything["data"][0]
    assert set(first) >= {"id", "idempotency_key", "endpoint", "body", "received_at", "created_at"}
    assert first["received_at"] >= before
    assert (await query({"idempotency_key": "k2"}))["data"][0]["body"]["to"] == "bob@example.com"
    assert (await query({"endpoint": "/emails/batch"}))["count"] == 2
    assert (await query({"to": "DI@example"}))["count"] == 1
    assert (await query({"limit": "1"}))["data"][0]["body"]["to"] == "di@example.com"
    assert (await query({"since": str(time.time() + 60)}))["count"] == 0
    async with http.get(sandbox.url + "/_sandbox/deliveries", params={"limit": "x"}) as r:
        assert r.status == 400
    assert [d.body["to"] for d in sandbox.deliveries("b1")] == ["cy@example.com", "di@example.com"]


async def test_stats_count_outcomes_and_sends_per_key(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """GET /_sandbox/stats equals sb.stats(): outcomes, statuses, sends per key."""
    await send(http, sandbox, email("a@example.com"), key="k")
    await send(http, sandbox, email("a@example.com"), key="k")
    await send(http, sandbox, email("broken"), key="bad")
    await send(http, sandbox, email("b@example.com"))
    async with http.get(sandbox.url + "/_sandbox/stats") as r:
        over_http = await r.json()
    assert over_http == orjson.loads(orjson.dumps(sandbox.stats()))
    assert over_http["requests"] == 4
    assert over_http["outcomes"] == {"sent": 2, "replayed": 1, "invalid": 1}
    assert over_http["statuses"] == {"200": 3, "422": 1}
    assert over_http["errors"] == {"validation_error": 1}
    assert over_http["deliveries"] == 2
    assert over_http["sends_per_key"] == {"k": 1}
    assert over_http["sends_without_key"] == 1
    assert over_http["duplicate_keys"] == []


async def test_reset_forgets_everything(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """POST /_sandbox/reset clears deliveries, keys, stats and buckets; faults go back to config."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=1))
    assert (await send(http, sb, email("a@example.com"), key="k")).status == 200
    assert (await send(http, sb, email("b@example.com"), key="k")).status == 429
    sb.set_faults(Faults(error_rate=1.0))
    async with http.post(sb.url + "/_sandbox/reset") as r:
        assert r.status == 200
    assert sb.deliveries() == []
    assert sb.stats()["requests"] == 0
    assert sb.faults == Faults()
    # the key is forgotten too: another body with it is a fresh send, not a 409
    assert (await send(http, sb, email("b@example.com"), key="k")).status == 200


async def test_log_file_appends_json_lines(
    make_sandbox: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """--log writes one JSON line per accepted email, flushed at once, never the API key."""
    log = tmp_path / "sent.jsonl"
    log.write_bytes(b'{"earlier": true}\n')
    sb = await make_sandbox(config=SandboxConfig(log_path=log))
    secret = "re_secret_value"
    await send(http, sb, email("a@example.com"), key="k1", api_key=secret)
    await send(http, sb, email("broken"), key="k2", api_key=secret)
    batch = [email("b@example.com"), email("c@example.com")]
    await send(http, sb, batch, key="k3", path="/emails/batch", api_key=secret)
    lines = log.read_bytes().splitlines()
    assert orjson.loads(lines[0]) == {"earlier": True}
    records = [orjson.loads(line) for line in lines[1:]]
    assert [r["idempotency_key"] for r in records] == ["k1", "k3", "k3"]
    assert [r["body"]["to"] for r in records] == ["a@example.com", "b@example.com", "c@example.com"]
    assert b"re_secret_value" not in log.read_bytes()


async def test_repr_and_health(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """repr shows live counters and never the API key; /_sandbox/health answers."""
    await send(http, sandbox, email("a@example.com"))
    text = repr(sandbox)
    assert "deliveries=1" in text
    assert sandbox.url in text
    assert "secret" not in repr(SandboxConfig(api_key="re_secret_value"))
    async with http.get(sandbox.url + "/_sandbox/health") as r:
        assert (await r.json()) == {"ok": True}


async def test_ledger_is_bounded(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """Beyond max_deliveries the oldest emails are forgotten; counts keep the full total."""
    sb = await make_sandbox(config=SandboxConfig(rate_limit=100, max_deliveries=3))
    for i in range(5):
        await send(http, sb, email(f"u{i}@example.com"))
    assert [d.body["to"] for d in sb.deliveries()] == [f"u{i}@example.com" for i in (2, 3, 4)]
    assert sb.stats()["deliveries"] == 5
