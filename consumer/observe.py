"""Observing the service: logs, metrics, health, and the periodic progress line.

The facade the rest of the package imports; the parts live in `logs.py`,
`metrics.py` and `health.py`. The `resend-consumer health` probe command is
`consumer.commands.health`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from consumer.events import Outcome
from consumer.health import Health, HealthServer
from consumer.logs import (
    LogEvent,
    configure_logging,
    log_outcome,
    mask_email,
    mask_recipients,
    scrub_secrets,
)
from consumer.metrics import CONTENT_TYPE, METRIC_NAMES, Metrics, MetricsSnapshot

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
    "configure_logging",
    "log_outcome",
    "mask_email",
    "mask_recipients",
    "scrub_secrets",
]


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
