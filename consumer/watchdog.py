"""Watching: broker reachability, lag, the idle gate's probe, and stalls (invariant 8).

A partition with work (pending records, unwritten dead letters or lag) that
finishes nothing for `STALL_TIMEOUT` while nothing explains it (a service-wide
condition, a delivery of it under way, an unreachable broker) is a stall; it is
logged once with what it waits for, counted, and fails liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer.logs import LogEvent
from consumer.observe import ProgressReporter
from consumer.resend import ENDPOINT_EMAILS

if TYPE_CHECKING:
    from consumer.dispatch import Dispatcher
    from consumer.health import Health
    from consumer.metrics import Metrics
    from consumer.retry import ServiceGate
    from consumer.state import Engine, PartitionState

__all__ = ["BROKER_CHECK_INTERVAL", "PROBE_ENDPOINT", "Watchdog"]

log = structlog.get_logger("consumer.watchdog")

#: seconds between two broker reachability checks (and their timeout)
BROKER_CHECK_INTERVAL: Final = 5.0
#: where an idle gate's probe goes (an empty body: refused, nothing is sent)
PROBE_ENDPOINT: Final = ENDPOINT_EMAILS


class Watchdog:
    """The background checks that keep health true."""

    def __init__(
        self,
        *,
        engine: Engine,
        dispatcher: Dispatcher,
        consumer: Any,
        client: Any,
        gate: ServiceGate,
        metrics: Metrics,
        health: Health,
        make_ready: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._dispatcher = dispatcher
        self._consumer = consumer
        self._client = client
        self._gate = gate
        self._metrics = metrics
        self._health = health
        #: fences and seeks what is assigned but not ready (the driver's, see `Engine.unready`)
        self._make_ready = make_ready
        self._clock = clock
        self._unready_reported = False

    async def watch_broker(self, stop: asyncio.Event) -> None:
        """Readiness needs a reachable broker; aiokafka hides fetch errors, so ask it.

        A metadata request every BROKER_CHECK_INTERVAL seconds; a change is logged once.
        """
        engine = self._engine
        while not stop.is_set():
            await asyncio.sleep(BROKER_CHECK_INTERVAL)
            try:
                await asyncio.wait_for(self._consumer.topics(), BROKER_CHECK_INTERVAL)
                ok = True
            except (KafkaError, TimeoutError, OSError):
                ok = False
            self._health.set_broker_ok(ok)
            if ok != engine.broker_ok:
                engine.broker_ok = ok
                event = LogEvent.BROKER_REACHABLE if ok else LogEvent.BROKER_UNREACHABLE
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    event,
                    bootstrap=engine.settings.kafka_bootstrap_servers,
                )

    async def report_progress(self, stop: asyncio.Event) -> None:
        interval = self._engine.settings.progress_interval
        reporter = ProgressReporter(metrics=self._metrics, interval=interval)
        while not stop.is_set():
            await asyncio.sleep(interval)
            reporter.tick()

    async def run(self, stop: asyncio.Event) -> None:
        """Lag of every assigned partition, and the stall check (invariant 8)."""
        interval = min(5.0, self._engine.settings.stall_timeout / 4)
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                await self.probe_idle_gate()
                if self._engine.unready:
                    await self._make_ready()
                with contextlib.suppress(KafkaError, TimeoutError, OSError, AssertionError):
                    await asyncio.wait_for(self.update_lag(), BROKER_CHECK_INTERVAL)
                self.check_stalls()
            except Exception as exc:  # the watchdog must outlive its own bugs
                log.error(
                    LogEvent.INTERNAL_ERROR,
                    stage="watchdog",
                    error=type(exc).__name__,
                    exc_info=exc,
                )

    async def probe_idle_gate(self) -> None:
        """Probe an open gate that no delivery waits at (all were cancelled by a revoke,
        or refused as stale), so the service turns ready again by itself while idle.

        The probe is a request Resend refuses without sending anything: an empty body
        and no idempotency key. A validation answer shows Resend reachable and the key
        accepted, which closes the gate; 401, 5xx or a quota answer keep it open.
        """
        if self._engine.delivering > 0:
            return  # a waiting delivery takes the probe turn itself
        ticket = self._gate.try_probe()
        if ticket is None:
            return
        try:
            answer = await self._client.send(
                endpoint=PROBE_ENDPOINT, body=b"{}", idempotency_key=None
            )
        except BaseException:
            self._gate.abandon(ticket)
            raise
        self._gate.record(ticket, answer)

    async def update_lag(self) -> int:
        """End offset minus committed offset, for every assigned partition.

        A partition without a commit counts from its first tracked offset, or else
        from the log's beginning: held before its first fetch, it still shows its lag.
        """
        consumer = self._consumer
        engine = self._engine
        ledger = engine.ledger
        no_end, no_base = [], []
        for tp in engine.parts:
            if consumer.highwater(tp) is None:
                no_end.append(tp)
            if ledger.committed(tp) is None and ledger.position(tp) is None:
                no_base.append(tp)
        ends = await consumer.end_offsets(no_end) if no_end else {}
        starts = await consumer.beginning_offsets(no_base) if no_base else {}
        positions = {}
        for tp in list(engine.parts):
            positions[tp] = await consumer.position(tp)
        total = 0
        for tp, part in engine.parts.items():
            high = consumer.highwater(tp)
            if high is None:
                high = ends.get(tp)
            fetched_to = positions.get(tp)
            if high is not None and fetched_to is not None:
                # records not fetched yet: the watchdog's notion of work (a log ending in
                # a transaction marker keeps committed-based lag at 1, and is done)
                part.behind = max(high - fetched_to, 0)
            base = ledger.committed(tp)
            if base is None:
                base = ledger.position(tp)
            if base is None:
                base = starts.get(tp)
            if high is None or base is None:
                continue
            part.lag = max(high - base, 0)
            total += part.lag
            self._metrics.lag.labels(topic=tp.topic, partition=tp.partition).set(part.lag)
        return total

    def explain(self, tp: TopicPartition) -> str | None:
        """Why `tp` may rightly finish nothing now; None when nothing explains it."""
        engine = self._engine
        if self._gate.state != "closed":
            return f"circuit_open:{self._gate.condition}"
        if engine.dlq_down:
            return "dlq_unavailable"
        if not engine.broker_ok:
            return "broker_unreachable"
        if self._dispatcher.delivering(tp):
            return "delivering"
        part = engine.parts.get(tp)
        opened = part.planner.open_batch() if part is not None else None
        if part is not None and opened is not None and len(part.works) <= opened.members:
            # all it holds is the batch being filled: it closes at its linger (at most
            # MAX_LINGER), or later while what goes first waits (at most HOLD_LIMIT);
            # with other work unfinished, that work must move instead
            return "batch_open"
        return None

    def check_stalls(self) -> int:
        """Flag partitions with work that nothing explains for STALL_TIMEOUT; returns how many."""
        engine = self._engine
        ledger = engine.ledger
        now = self._clock()
        limit = engine.settings.stall_timeout
        stalled = 0
        for tp, part in engine.parts.items():
            has_work = bool(part.works or part.letters or part.behind > 0)
            if not has_work or self.explain(tp) is not None:
                part.progress_at = now
            if has_work and now - part.progress_at >= limit:
                stalled += 1
                if not part.stalled:
                    part.stalled = True
                    log.error(
                        LogEvent.PARTITION_STALLED,
                        topic=tp.topic,
                        partition=tp.partition,
                        position=ledger.position(tp),
                        committed=ledger.committed(tp),
                        pending=len(part.works),
                        unwritten_dead_letters=len(part.letters),
                        lag=part.lag,
                        paused=tp in engine.paused,
                        not_fetched=part.behind,
                        waiting_for=self._waiting_for(tp, part),
                        stalled_for_s=round(now - part.progress_at, 1),
                    )
            elif part.stalled:
                part.stalled = False
                log.info(LogEvent.PARTITION_RECOVERED, topic=tp.topic, partition=tp.partition)
        unready = engine.unready
        since = engine.unready_since
        if unready and since is not None and now - since >= limit:
            # assigned, but the committer could not fence them all this time
            if not self._unready_reported:
                self._unready_reported = True
                log.error(
                    LogEvent.PARTITION_STALLED,
                    partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in unready),
                    waiting_for="the committer to fence the previous owner (Kafka unreachable?)",
                    stalled_for_s=round(now - since, 1),
                )
            stalled += len(unready)
        else:
            self._unready_reported = False
        engine.stalled = stalled
        self._health.set_stalled(stalled)
        self._metrics.stalled_partitions.set(stalled)
        return stalled

    def _waiting_for(self, tp: TopicPartition, part: PartitionState) -> str:
        position = self._engine.ledger.position(tp)
        head = part.works.get(position) if position is not None else None
        if head is not None:
            return self._dispatcher.where(tp, head)
        if part.letters:
            return "dead letters wait for a commit"
        if tp in self._engine.paused:
            return "paused with lag and nothing in flight"
        return "no record fetched although the partition has lag"
