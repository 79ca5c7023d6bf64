"""Observing the service: logs, metrics, health, and the periodic progress line.

The facade the rest of the package imports; the parts live in `logs.py`,
`metrics.py` and `health.py`. Also the `resend-consumer health` command for
exec probes (Docker HEALTHCHECK, Kubernetes exec probes where HTTP probes are
not possible).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Final

import structlog

from consumer.events import Outcome
from consumer.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from consumer.health import HEALTHZ, READYZ, Health, HealthServer
from consumer.logs import (
    LogEvent,
    configure_logging,
    log_outcome,
    mask_email,
    mask_recipients,
    scrub_secrets,
)
from consumer.metrics import CONTENT_TYPE, METRIC_NAMES, Metrics, MetricsSnapshot
from consumer.settings import Settings

__all__ = [
    "CONTENT_TYPE",
    "METRIC_NAMES",
    "Health",
    "HealthServer",
    "LogEvent",
    "Metrics",
    "MetricsSnapshot",
    "Outcome",
    "ProgressReporter",
    "add_arguments",
    "configure_logging",
    "health_command",
    "log_outcome",
    "mask_email",
    "mask_recipients",
    "probe_url",
    "scrub_secrets",
]

_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


class ProgressReporter:
    """Writes the periodic progress line from two metrics snapshots.

    `tick()` logs one line (rates since the previous tick); `run(stop)` ticks
    every `interval` seconds until stop is set. The pipeline starts it as a task.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        interval: float,
        logger: Any | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.interval = interval
        self._log = logger if logger is not None else structlog.get_logger("consumer.progress")
        self._clock = clock
        self._last = metrics.snapshot()
        self._last_at = clock()

    def tick(self) -> dict[str, float]:
        now, snap = self._clock(), self.metrics.snapshot()
        elapsed = max(now - self._last_at, 1e-9)
        fields = {
            "events_per_s": round((snap.events - self._last.events) / elapsed, 2),
            "events": snap.events,
            "in_flight": snap.in_flight,
            "lag": snap.lag,
            "paused_partitions": snap.paused_partitions,
            "retries": snap.retries - self._last.retries,
            "dead_letters": snap.dead_letters - self._last.dead_letters,
        }
        self._last, self._last_at = snap, now
        self._log.info(LogEvent.PROGRESS.value, **fields)
        return fields

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                self.tick()


# -- `resend-consumer health` ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        choices=("live", "ready"),
        default="ready",
        help="which probe: live (/healthz) or ready (/readyz, default)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="full URL to probe (default: http://127.0.0.1:HEALTH_PORT/readyz or /healthz)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds before the probe fails (default 3)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing, only exit code")


def probe_url(settings: Settings, check: str) -> str:
    """Where the running service on this host answers the given probe."""
    host = settings.health_host
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    path = HEALTHZ if check == "live" else READYZ
    return f"http://{host}:{settings.health_port}{path}"


def health_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the probe answers 200, 1 otherwise (refused, timeout, 503)."""
    check = getattr(args, "check", "ready") or "ready"
    url = getattr(args, "url", None) or probe_url(settings, check)
    timeout = float(getattr(args, "timeout", 3.0) or 3.0)
    quiet = bool(getattr(args, "quiet", False))
    if not url.startswith(("http://", "https://")):
        print(f"resend-consumer health: not an http(s) URL: {url}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - scheme checked
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        if not quiet:
            reason = getattr(exc, "reason", exc)
            print(f"resend-consumer health: {url}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    if not quiet:
        print(f"{status} {body.decode('utf-8', 'replace').strip()}")
    return EXIT_OK if status == 200 else EXIT_FAILURE
