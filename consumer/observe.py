"""The periodic progress line, and the `resend-consumer health` command.

The progress line is written from two metrics snapshots. Logs, metrics and the
health server live in `logs.py`, `metrics.py` and `health.py`: import them from
there. The `resend-consumer health` probe command is `consumer.commands.health`.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from consumer.logs import LogEvent
from consumer.metrics import Metrics

__all__ = ["ProgressReporter"]


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
