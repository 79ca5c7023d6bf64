"""The periodic progress line, and the `resend-consumer health` command.

The progress line is written from two metrics snapshots. The `health` command
is for exec probes (Docker HEALTHCHECK, Kubernetes exec probes where HTTP probes
are not possible). Logs, metrics and the health server live in `logs.py`,
`metrics.py` and `health.py`: import them from there.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Final

import structlog

from consumer.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from consumer.health import HEALTHZ, READYZ
from consumer.logs import LogEvent
from consumer.metrics import Metrics
from consumer.settings import Settings

__all__ = ["ProgressReporter", "add_arguments", "health_command", "probe_url"]

_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


class ProgressReporter:
    """Writes the periodic progress line from two metrics snapshots.

    `tick()` logs one line (rates since the previous tick); the pipeline calls it
    every `interval` seconds.
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
