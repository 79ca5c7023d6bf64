"""Talking to the sandbox over a real socket: the test key, two emails, one `send`."""

from __future__ import annotations

from typing import Any, NamedTuple

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from consumer.sandbox import Sandbox

API_KEY = "re_test_123"
USER_AGENT = "sandbox-tests/1"
AUTH = {"Authorization": f"Bearer {API_KEY}", "User-Agent": USER_AGENT}

# the smallest valid email, and one as an order confirmation would be
PLAIN: dict[str, Any] = {"from": "a@acme.test", "to": "b@example.com", "subject": "hi"}
EMAIL: dict[str, Any] = {
    "from": "Acme <orders@acme.test>",
    "to": ["buyer@example.com"],
    "subject": "Your order",
    "html": "<p>Thanks</p>",
}


class Reply(NamedTuple):
    """The sandbox's answer: status, body text and headers."""

    status: int
    text: str
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return orjson.loads(self.text)

    @property
    def answer(self) -> tuple[int, Any]:
        """(status, JSON body): what two answers share when one replays the other."""
        return self.status, self.json()


async def send(
    http: aiohttp.ClientSession,
    sb: Sandbox | str,
    body: Any = PLAIN,
    *,
    key: str | None = None,
    path: str = "/emails",
    api_key: str = API_KEY,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Reply:
    """POST `body` to `sb`, a Sandbox or its URL, with the test key (bytes as they are,
    anything else as JSON).

    `key` adds an Idempotency-Key; `headers` replaces the default ones (Authorization
    and User-Agent) entirely; `kw` goes to aiohttp (a `timeout`, say).
    """
    sent = dict(headers) if headers is not None else {**AUTH, "Authorization": f"Bearer {api_key}"}
    if key is not None:
        sent["Idempotency-Key"] = key
    if isinstance(body, bytes):
        sent.setdefault("Content-Type", "application/json")
        kw["data"] = body
    else:
        kw["json"] = body
    url = sb if isinstance(sb, str) else sb.url
    async with http.post(url + path, headers=sent, **kw) as r:
        return Reply(r.status, await r.text(), r.headers)
