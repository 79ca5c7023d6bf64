"""The sandbox's delivery webhooks: signed posts for every accepted email, as Resend sends them.

Each accepted email gets `email.sent`, then its fate: `email.bounced` when a
recipient is `bounced@resend.dev`, `email.complained` for
`complained@resend.dev`, `email.delivered` otherwise. The events of one email
are posted in that order; a non-2xx answer (or no answer) is retried on
Resend's schedule, `RETRY_SCHEDULE` times `time_scale`, with the same
`svix-id` and a fresh timestamp and signature. `posts()` is the ledger: every
webhook, its attempts and their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import orjson
from standardwebhooks import Webhook

from consumer.sandbox.state import Delivery

__all__ = ["RETRY_SCHEDULE", "WebhookPost", "WebhookSender"]

#: Resend's (Svix's) delays before each attempt, in seconds: at once, 5 s, 5 min, ... 10 h
RETRY_SCHEDULE: Final = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
BOUNCED: Final = "bounced@resend.dev"
COMPLAINED: Final = "complained@resend.dev"
DELIVERED: Final = "delivered@resend.dev"
#: emails whose webhooks are posted at once
_WORKERS: Final = 8
_TIMEOUT: Final = 15.0


@dataclass(slots=True)
class WebhookPost:
    """One webhook and every attempt to post it: `answers` holds statuses, None for no answer."""

    id: str
    type: str
    email_id: str
    answers: list[int | None] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return bool(self.answers) and self.answers[-1] is not None and self.answers[-1] < 300

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "email_id": self.email_id,
            "answers": self.answers,
            "delivered": self.delivered,
        }


def fate(delivery: Delivery) -> str:
    """What Resend reports after `email.sent` for this email's recipients."""
    to = delivery.body.get("to")
    recipients = [to] if isinstance(to, str) else to if isinstance(to, list) else []
    lowered = {r.strip().lower() for r in recipients if isinstance(r, str)}
    if BOUNCED in lowered or any(r.endswith(f"<{BOUNCED}>") for r in lowered):
        return "email.bounced"
    if COMPLAINED in lowered or any(r.endswith(f"<{COMPLAINED}>") for r in lowered):
        return "email.complained"
    return "email.delivered"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload(kind: str, delivery: Delivery) -> dict[str, Any]:
    """The webhook body Resend posts for one event of one email."""
    body = delivery.body
    to = body.get("to")
    data: dict[str, Any] = {
        "email_id": delivery.id,
        "created_at": datetime.fromtimestamp(delivery.received_at, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "from": body.get("from"),
        "to": [to] if isinstance(to, str) else to,
        "subject": body.get("subject"),
        "tags": body.get("tags") or [],
    }
    if kind == "email.bounced":
        data["bounce"] = {
            "message": "The recipient's mail server permanently rejected the email.",
            "subType": "General",
            "type": "Permanent",
        }
    return {"type": kind, "created_at": _now(), "data": data}


class WebhookSender:
    """Posts signed webhooks for accepted emails. `start()`, `enqueue()`, `stop()`."""

    def __init__(self, *, url: str, secret: str, time_scale: float = 1.0) -> None:
        self.url = url
        self.time_scale = time_scale
        self._hook = Webhook(secret)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._posts: list[WebhookPost] = []
        self._busy = 0

    def __repr__(self) -> str:
        done = sum(p.delivered for p in self._posts)
        return f"<WebhookSender posts={len(self._posts)} delivered={done} queued={self.pending}>"

    @property
    def pending(self) -> int:
        """Emails whose webhooks are not all posted yet (queued or being retried)."""
        return self._queue.qsize() + self._busy

    def posts(self) -> list[WebhookPost]:
        return list(self._posts)

    def clear(self) -> None:
        self._posts.clear()

    def enqueue(self, deliveries: Iterable[Delivery]) -> None:
        for d in deliveries:
            self._queue.put_nowait(d)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._workers = [asyncio.create_task(self._work()) for _ in range(_WORKERS)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._busy += 1
            try:
                for kind in ("email.sent", fate(delivery)):
                    await self._post(kind, delivery)
            finally:
                self._busy -= 1

    async def _post(self, kind: str, delivery: Delivery) -> None:
        assert self._session is not None
        post = WebhookPost(id=f"msg_{uuid.uuid4().hex}", type=kind, email_id=delivery.id)
        self._posts.append(post)
        body = orjson.dumps(payload(kind, delivery)).decode()
        for delay in RETRY_SCHEDULE:
            await asyncio.sleep(delay * self.time_scale)
            now = datetime.now(UTC)
            headers = {
                "svix-id": post.id,
                "svix-timestamp": str(int(now.timestamp())),
                "svix-signature": self._hook.sign(post.id, now, body),
                "content-type": "application/json",
            }
            try:
                async with self._session.post(self.url, data=body, headers=headers) as answer:
                    await answer.read()
                    post.answers.append(answer.status)
                    if answer.status < 300:
                        return
            except (aiohttp.ClientError, TimeoutError):
                post.answers.append(None)
