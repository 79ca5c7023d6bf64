"""The sandbox's webhooks: signed posts, retried on Resend's schedule (scaled down)."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
from aiohttp import web
from standardwebhooks import Webhook

from consumer.sandbox import Sandbox, SandboxConfig
from tests.conftest import serve
from tests.sandbox.support import send

SECRET = "whsec_" + base64.b64encode(b"a-webhook-secret-of-32-bytes-ok!").decode()


async def test_sandbox_retries_non_2xx_on_the_scaled_schedule(
    http: aiohttp.ClientSession,
) -> None:
    """Answered 503 twice then 200: the same svix-id is posted three times; the ledger shows it."""
    seen: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        seen.append(request.headers["svix-id"])
        Webhook(SECRET).verify(await request.text(), {
            "webhook-" + k[5:]: v for k, v in request.headers.items() if k.startswith("svix-")
        })  # fmt: skip
        return web.Response(status=503 if len(seen) <= 2 else 200)

    app = web.Application()
    app.router.add_post("/hook", flaky)
    runner, url = await serve(app)
    try:
        config = SandboxConfig(
            webhook_url=url + "/hook", webhook_secret=SECRET, webhook_time_scale=0.0001
        )
        async with Sandbox(config=config) as sandbox:
            email = {
                "from": "a@acme.test",
                "to": "delivered@resend.dev",
                "subject": "s",
                "text": "t",
            }
            assert (await send(http, sandbox, email)).status == 200
            async with asyncio.timeout(10):
                while len(sandbox.webhook_posts()) < 2 or sandbox.webhooks_pending:
                    await asyncio.sleep(0.01)
            async with http.get(sandbox.url + "/_sandbox/webhooks") as ledger:
                listed = (await ledger.json())["data"]
    finally:
        await runner.cleanup()
    first, second = listed
    assert (first["type"], first["answers"], first["delivered"]) == (
        "email.sent",
        [503, 503, 200],
        True,
    )
    assert (second["type"], second["answers"]) == ("email.delivered", [200])
    assert seen[:3] == [first["id"]] * 3
