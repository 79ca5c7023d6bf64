"""Liveness, readiness and the small HTTP server that exposes them with /metrics.

- `/healthz` (liveness): the fetch loop made progress within the liveness
  window, and no partition is stalled (work that finished nothing for
  STALL_TIMEOUT while nothing explained it). A wedged loop or a stall is what
  a restart fixes: idempotency keys make the re-sends replays.
- `/readyz` (readiness): partitions assigned, broker reachable, no open
  circuit, not stopping. A service-wide condition (bad key, quota) makes the
  pod not ready, never restarts it: restarting cannot fix a quota.
- `/metrics`: Prometheus text.

The server faces whatever can reach its port, so it bounds what a client can
hold: a connection must deliver a complete request within `HEADER_TIMEOUT`
(aiohttp's keep-alive timer, which starts at accept and is not reset by
partial headers), idle keep-alive connections close after the same time, and
at most `MAX_CONNECTIONS` are open at once; beyond that a new connection gets
an immediate 503 and is closed, so thousands of half-open sockets cost no more
than `MAX_CONNECTIONS` handlers and the probes answer again within seconds.

`Health` is plain state with setters the pipeline calls; it never steers.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from consumer.errors import SettingsError
from consumer.metrics import CONTENT_TYPE

__all__ = ["HEALTHZ", "METRICS", "READYZ", "Exposition", "Health", "HealthServer", "Probes"]

#: seconds a connection may take to send a complete request (and stay idle between requests)
HEADER_TIMEOUT: Final = 5.0
#: connections open at once; a probe and a scraper need a handful
MAX_CONNECTIONS: Final = 128
#: the answer to a connection over the bound, written before closing it
_BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

HEALTHZ: Final = "/healthz"
READYZ: Final = "/readyz"
METRICS: Final = "/metrics"


class Health:
    """What the probes report. Setters are cheap; call them from the hot loop."""

    def __init__(
        self,
        *,
        liveness_window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.liveness_window = liveness_window
        self._clock = clock
        # Start counts as progress: connecting to Kafka may take a while, and
        # the window is the grace before the first poll must have happened.
        self._last_poll = clock()
        self._polls = 0
        self._assigned = 0
        self._broker_ok = False
        self._open: set[str] = set()
        self._stopping = False
        self._stalled = 0

    def mark_poll(self) -> None:
        """The fetch loop went round once (with or without records)."""
        self._last_poll = self._clock()
        self._polls += 1

    def set_assigned(self, n: int) -> None:
        self._assigned = n

    def set_broker_ok(self, ok: bool) -> None:
        self._broker_ok = ok

    def set_circuit(self, open: bool, condition: str | None = None) -> None:
        """Open or close one condition's circuit; `(False, None)` closes them all."""
        if open:
            self._open.add(condition or "unknown")
        elif condition is None:
            self._open.clear()
        else:
            self._open.discard(condition)

    def set_stalled(self, n: int) -> None:
        """How many partitions the pipeline's watchdog found stalled."""
        self._stalled = n

    def set_stopping(self) -> None:
        """Shutdown began: report not ready so no rollout waits on this pod."""
        self._stopping = True

    def live(self) -> tuple[bool, dict[str, Any]]:
        since = self._clock() - self._last_poll
        ok = since <= self.liveness_window and self._stalled == 0
        return ok, {
            "live": ok,
            "seconds_since_poll": round(since, 3),
            "liveness_window": self.liveness_window,
            "polls": self._polls,
            "stalled_partitions": self._stalled,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reasons: list[str] = []
        if self._stopping:
            reasons.append("stopping")
        if not self._broker_ok:
            reasons.append("broker_unreachable")
        if self._assigned <= 0:
            reasons.append("no_partitions_assigned")
        reasons.extend(f"circuit_open:{c}" for c in sorted(self._open))
        ok = not reasons
        return ok, {
            "ready": ok,
            "reasons": reasons,
            "assigned_partitions": self._assigned,
            "broker_ok": self._broker_ok,
            "open_circuits": sorted(self._open),
        }

    def __repr__(self) -> str:
        live, _ = self.live()
        ready, info = self.ready()
        return f"<Health live={live} ready={ready} reasons={info['reasons']}>"


class Probes(Protocol):
    """What the server asks: `Health`, or another command's own (the webhook receiver's)."""

    def live(self) -> tuple[bool, dict[str, Any]]: ...

    def ready(self) -> tuple[bool, dict[str, Any]]: ...


class Exposition(Protocol):
    """Anything rendering Prometheus text: `Metrics`, or another command's registry."""

    def render(self) -> bytes: ...


class HealthServer:
    """aiohttp server for /healthz, /readyz and /metrics. `start()` then `stop()`.

    `routes` adds a command's own endpoints beside the probes (the webhook
    receiver's POST); `client_max_size` bounds their bodies; `settings` names
    the host and port variables a bind error blames.
    """

    def __init__(
        self,
        *,
        health: Probes,
        metrics: Exposition,
        host: str = "127.0.0.1",
        port: int = 8080,
        header_timeout: float = HEADER_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        routes: Sequence[web.RouteDef] = (),
        client_max_size: int = 1024**2,
        settings: tuple[str, str] = ("HEALTH_HOST", "HEALTH_PORT"),
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.routes = tuple(routes)
        self.client_max_size = client_max_size
        self.settings = settings
        self.host = host
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._requested_port = port
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        #: connections turned away at the bound (for tests and the repr)
        self.refused = 0

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError("HealthServer is not started")
        return self._port

    @property
    def open_connections(self) -> int:
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    async def start(self) -> None:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_routes(self.routes)
        app.router.add_get(HEALTHZ, self._healthz)
        app.router.add_get(READYZ, self._readyz)
        app.router.add_get(METRICS, self._metrics)
        # No access log: probes every few seconds would drown the event lines.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=self.header_timeout,
        )
        await runner.setup()
        server = runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            if len(server.connections) >= self.max_connections:
                self.refused += 1
                return _Busy()
            return server()

        try:
            listener = await asyncio.get_running_loop().create_server(
                protocol, self.host, self._requested_port, reuse_address=True
            )
        except OSError as exc:
            await runner.cleanup()
            raise _bind_error(exc, self.host, self._requested_port, self.settings) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._listener = runner, listener
        self._port = int(listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if listener is not None:
            await listener.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _healthz(self, _: web.Request) -> web.Response:
        return _json(*self.health.live())

    async def _readyz(self, _: web.Request) -> web.Response:
        return _json(*self.health.ready())

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "stopped"
        return f"<HealthServer {where} connections={self.open_connections} refused={self.refused}>"


class _Busy(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: answered 503 at once and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


def _bind_error(
    exc: OSError, host: str, port: int, names: tuple[str, str] = ("HEALTH_HOST", "HEALTH_PORT")
) -> SettingsError:
    """A start-up bind failure as a configuration error naming the setting at fault."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    host_env, port_env = names
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return SettingsError(f"{host_env}={host!r}: cannot bind the health server ({reason})")
    return SettingsError(
        f"{port_env}={port} ({host_env}={host!r}): cannot bind the health server ({reason})"
    )


def _json(ok: bool, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=200 if ok else 503,
        body=orjson.dumps(body),
        content_type="application/json",
    )
