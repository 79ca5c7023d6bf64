"""The sandbox server: lifecycle, routing and the `/_sandbox` control API.

The Resend endpoints themselves (and the order of their checks) live in
`api.py`; this module serves them next to the control routes a test, a
benchmark or a person uses to inspect and steer the sandbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Final

import orjson
from aiohttp import web

from consumer.sandbox.api import BATCH, EMAILS, JSON_TYPE, EmailApi
from consumer.sandbox.config import Faults, SandboxConfig
from consumer.sandbox.state import Delivery
from consumer.sandbox.validation import ApiError
from consumer.sandbox.webhooks import WebhookPost, WebhookSender

#: paths that exist, for telling 405 (wrong method) from 404 (wrong base URL)
_KNOWN_PATHS: Final = frozenset(
    {
        EMAILS,
        BATCH,
        "/_sandbox/deliveries",
        "/_sandbox/stats",
        "/_sandbox/reset",
        "/_sandbox/faults",
        "/_sandbox/health",
        "/_sandbox/webhooks",
    }
)
#: seconds in-flight requests get to finish on stop before they are cancelled
_SHUTDOWN_GRACE: Final = 0.5


class Sandbox:
    """A local Resend-compatible email API on a real socket.

    `start()`/`stop()` or `async with`; inspect with `deliveries()` and
    `stats()`, steer with `set_faults()` and `reset()` (or the same over HTTP
    under `/_sandbox/`).
    """

    def __init__(
        self,
        *,
        config: SandboxConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or SandboxConfig()
        self._stopping = asyncio.Event()
        self._api = EmailApi(config=self.config, stopping=self._stopping, clock=clock, wall=wall)
        self._log: IO[bytes] | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._webhooks: WebhookSender | None = None
        if self.config.webhook_url is not None and self.config.webhook_secret is not None:
            self._webhooks = WebhookSender(
                url=self.config.webhook_url,
                secret=self.config.webhook_secret,
                time_scale=self.config.webhook_time_scale,
            )
            self._api.on_accept = self._webhooks.enqueue

    # -- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("sandbox already started")
        if self.config.log_path is not None:
            self._log = self._open_log()
            self._api.ledger.log = self._log
        api = self._api
        app = web.Application(client_max_size=50 * 1024 * 1024)
        app.router.add_post(EMAILS, api.post_email)
        app.router.add_post(BATCH, api.post_batch)
        app.router.add_get("/emails/{email_id}", api.get_email)
        app.router.add_get("/_sandbox/deliveries", self._ctl_deliveries)
        app.router.add_get("/_sandbox/stats", self._ctl_stats)
        app.router.add_post("/_sandbox/reset", self._ctl_reset)
        app.router.add_get("/_sandbox/faults", self._ctl_faults)
        app.router.add_post("/_sandbox/faults", self._ctl_faults)
        app.router.add_get("/_sandbox/health", self._ctl_health)
        app.router.add_get("/_sandbox/webhooks", self._ctl_webhooks)
        app.router.add_route("*", "/{tail:.*}", self._fallback)
        self._stopping.clear()
        # access_log=None: no per-request logging on the hot path
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE
        )
        await runner.setup()
        if self._webhooks is not None:
            await self._webhooks.start()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])

    def _open_log(self) -> IO[bytes]:
        assert self.config.log_path is not None
        return self.config.log_path.open("ab")

    async def stop(self) -> None:
        self._stopping.set()  # hanging requests give up
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._webhooks is not None:
            await self._webhooks.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
            self._api.ledger.log = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("sandbox not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "stopped"
        ledger = self._api.ledger
        return (
            f"<Sandbox {where} requests={ledger.requests} "
            f"deliveries={ledger.delivered} keys={len(self._api.idem)}>"
        )

    # -- control (also over HTTP under /_sandbox) -------------------------------

    @property
    def faults(self) -> Faults:
        return self._api.faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults; requests already past their draw keep the old ones."""
        self._api.faults = faults

    def deliveries(
        self,
        idempotency_key: str | None = None,
        *,
        endpoint: str | None = None,
        to: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        """Accepted emails, oldest first, optionally filtered (`limit` keeps the newest)."""
        return self._api.ledger.find(
            idempotency_key=idempotency_key, endpoint=endpoint, to=to, since=since, limit=limit
        )

    def stats(self) -> dict[str, Any]:
        """Counts by outcome and status, sends per idempotency key, current faults."""
        out = self._api.ledger.stats()
        out["idempotency_keys"] = len(self._api.idem)
        #: keys whose first request is still being processed (409 concurrent window)
        out["keys_in_flight"] = self._api.idem.in_flight_count()
        out["faults"] = self._api.faults.to_dict()
        return out

    def reset(self) -> None:
        """Forget everything: deliveries, keys, buckets, quotas, stats; faults back to config."""
        self._api.reset()
        if self._webhooks is not None:
            self._webhooks.clear()

    def webhook_posts(self) -> list[WebhookPost]:
        """Every webhook posted (or being retried), oldest first, with its answers."""
        return self._webhooks.posts() if self._webhooks is not None else []

    @property
    def webhooks_pending(self) -> int:
        """Accepted emails whose webhooks are not all answered 2xx or given up yet."""
        return self._webhooks.pending if self._webhooks is not None else 0

    # -- HTTP ----------------------------------------------------------------------

    async def _fallback(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path in _KNOWN_PATHS or path.startswith("/emails/"):
            err = ApiError(
                405, "method_not_allowed", "Method is not allowed for the requested path."
            )
        else:
            err = ApiError(404, "not_found", "The requested endpoint does not exist.")
        return web.Response(
            status=err.status, body=err.body(), headers=self._api.rate_headers(None)
        )

    # -- /_sandbox ------------------------------------------------------------------

    async def _ctl_deliveries(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        try:
            since = float(q["since"]) if "since" in q else None
            limit = int(q["limit"]) if "limit" in q else None
        except ValueError:
            return _json({"error": "since must be a number and limit an integer"}, status=400)
        found = self.deliveries(
            q.get("idempotency_key"),
            endpoint=q.get("endpoint"),
            to=q.get("to"),
            since=since,
            limit=limit,
        )
        return _json({"count": len(found), "data": [d.to_dict() for d in found]})

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.stats())

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json({"reset": True})

    async def _ctl_faults(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            try:
                data = orjson.loads(await request.read())
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of fault fields")
                self.set_faults(Faults.from_dict(data))
            except (orjson.JSONDecodeError, ValueError) as exc:
                return _json({"error": str(exc)}, status=400)
        return _json(self._api.faults.to_dict())

    async def _ctl_webhooks(self, request: web.Request) -> web.StreamResponse:
        posts = self.webhook_posts()
        return _json(
            {
                "count": len(posts),
                "pending": self.webhooks_pending,
                "data": [p.to_dict() for p in posts],
            }
        )

    async def _ctl_health(self, request: web.Request) -> web.StreamResponse:
        return _json({"ok": True})


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON_TYPE)
