"""Sandbox idempotency over real sockets: replay, conflict, concurrency, scope, TTL."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.sandbox import Faults, Sandbox, SandboxConfig
from tests.sandbox.support import PLAIN, send

RAW = orjson.dumps(PLAIN)


async def wait_for_in_flight(sb: Sandbox, n: int) -> None:
    async with asyncio.timeout(10):
        while sb.stats()["keys_in_flight"] != n:
            await asyncio.sleep(0.01)


async def test_replay_returns_same_id_and_sends_once(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Same key and body twice: same 200 answer and id, one delivery, one send for the key."""
    first = (await send(http, sandbox, RAW, key="order:1")).answer
    second = (await send(http, sandbox, RAW, key="order:1")).answer
    assert first[0] == second[0] == 200
    assert first[1]["id"] == second[1]["id"]
    assert len(sandbox.deliveries(idempotency_key="order:1")) == 1
    stats = sandbox.stats()
    assert stats["sends_per_key"] == {"order:1": 1}
    assert stats["outcomes"]["replayed"] == 1


async def test_different_body_same_key_is_409(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Same key, body differing by one byte: 409 invalid_idempotent_request, nothing sent."""
    await send(http, sandbox, RAW, key="order:2")
    status, body = (
        await send(http, sandbox, orjson.dumps({**PLAIN, "subject": "hi!"}), key="order:2")
    ).answer
    assert (status, body["name"]) == (409, "invalid_idempotent_request")
    assert len(sandbox.deliveries()) == 1


async def test_concurrent_same_key_is_409_then_replays(
    make_sandbox: Any, http: aiohttp.ClientSession
) -> None:
    """A second request while the first is in its latency window gets 409 concurrent."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(latency_ms=1000)))
    first = asyncio.create_task(send(http, sb, RAW, key="order:3"))
    await wait_for_in_flight(sb, 1)
    sb.set_faults(Faults())
    status, body = (await send(http, sb, RAW, key="order:3")).answer
    assert (status, body["name"]) == (409, "concurrent_idempotent_requests")
    original = (await first).answer
    assert original[0] == 200
    assert (await send(http, sb, RAW, key="order:3")).answer == original
    assert len(sb.deliveries()) == 1


async def test_keys_are_scoped_per_endpoint_and_api_key(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """The same key on /emails and /emails/batch, or under another API key, are distinct sends."""
    single = (await send(http, sandbox, RAW, key="k")).answer
    batch = (await send(http, sandbox, orjson.dumps([PLAIN]), key="k", path="/emails/batch")).answer
    other = (await send(http, sandbox, RAW, key="k", api_key="re_other")).answer
    assert single[0] == batch[0] == other[0] == 200
    assert batch[1]["data"][0]["id"] != single[1]["id"] != other[1]["id"]
    assert len(sandbox.deliveries(idempotency_key="k")) == 3


async def test_batch_replay_returns_same_ids(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """One key covers a whole batch: the replay returns the same ids and sends nothing."""
    raw = orjson.dumps([PLAIN, {**PLAIN, "subject": "two"}])
    first = (await send(http, sandbox, raw, key="batch:1", path="/emails/batch")).answer
    again = (await send(http, sandbox, raw, key="batch:1", path="/emails/batch")).answer
    assert first == again
    assert len(sandbox.deliveries()) == 2
    assert sandbox.stats()["sends_per_key"]["batch:1"] == 1


@pytest.mark.parametrize("key", ["", "x" * 257])
async def test_key_length_bounds(sandbox: Sandbox, http: aiohttp.ClientSession, key: str) -> None:
    """Keys outside 1..256 characters get 400 invalid_idempotency_key."""
    status, body = (await send(http, sandbox, RAW, key=key)).answer
    assert (status, body["name"]) == (400, "invalid_idempotency_key")
    assert (await send(http, sandbox, RAW, key="x" * 256)).status == 200


async def test_key_expires_after_ttl(http: aiohttp.ClientSession) -> None:
    """After the TTL the same key and body send again with a new id (Resend forgets after 24 h)."""
    now = [1000.0]
    config = SandboxConfig(idempotency_ttl=2.0)
    async with Sandbox(config=config, clock=lambda: now[0]) as sb:
        first = (await send(http, sb, RAW, key="ttl")).answer
        now[0] += 1.9
        assert (await send(http, sb, RAW, key="ttl")).answer == first
        now[0] += 0.2
        later = (await send(http, sb, RAW, key="ttl")).answer
        assert later[0] == 200
        assert later[1]["id"] != first[1]["id"]
        assert sb.stats()["duplicate_keys"] == ["ttl"]


async def test_failed_requests_do_not_keep_the_key(
    make_sandbox: Any, http: aiohttp.ClientSession
) -> None:
    """After a 5xx or a 422 the same key can still send (failures are not remembered)."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(error_rate=1.0)))
    assert (await send(http, sb, RAW, key="retry:1")).status in (500, 503)
    sb.set_faults(Faults())
    bad = orjson.dumps({**PLAIN, "to": "nope"})
    assert (await send(http, sb, bad, key="retry:1")).status == 422
    status, _ = (await send(http, sb, RAW, key="retry:1")).answer
    assert status == 200
    assert len(sb.deliveries()) == 1


async def test_dropped_answer_keeps_the_key(make_sandbox: Any, http: aiohttp.ClientSession) -> None:
    """Accepted then dropped: the client sees a failure, the retry replays the recorded id."""
    sb = await make_sandbox(config=SandboxConfig(faults=Faults(drop_after_accept_rate=1.0)))
    with pytest.raises(aiohttp.ClientConnectionError):
        await send(http, sb, RAW, key="drop:1")
    [recorded] = sb.deliveries()
    sb.set_faults(Faults())
    status, body = (await send(http, sb, RAW, key="drop:1")).answer
    assert status == 200
    assert body["id"] == recorded.id
    assert len(sb.deliveries()) == 1
