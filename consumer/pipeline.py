"""The Kafka driver: intake, rebalance, shutdown; the stages do the rest.

One fetch loop keeps calling `getmany()` whatever Resend does, so the member
never leaves the group for being slow (invariant 5). Each fetched record is
tracked in the offset ledger at once, prepared (decode, route, key, render)
inline, and handed on; the stages, each a module of its own, take it from there:

    Kafka -> Pipeline._intake -> _admit -> Preparer.prepare          (consumer.prepare)
          -> Planning.plan -> Dispatcher.submit -> lane -> deliver()  (consumer.dispatch)
          -> Outcomes.finish: ledger, metric, canonical line          (consumer.outcome)
          <- Commits.commit(position, plan, dead letters)             (consumer.commit)
    BackPressure pauses partitions over their bounds               (consumer.backpressure)
    Watchdog checks lag, the broker, the idle gate and stalls        (consumer.watchdog)

The stages share one `Engine` (`consumer.state`): the partitions owned in this
generation and the ledger. The driver takes its Kafka consumer and committer
from outside (`consumer.service` builds the real ones; the simulation tests in
`tests/sim.py` pass fakes and run the whole engine in virtual time).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumer.backpressure import BackPressure
from consumer.commit import Commits
from consumer.committer import Committer
from consumer.dispatch import Dispatcher, Planning
from consumer.fetch import RecordFetcher, Undecodable
from consumer.health import Health
from consumer.logs import LogEvent
from consumer.metrics import Metrics
from consumer.offsets import OffsetLedger
from consumer.outcome import Outcomes
from consumer.prepare import Payload, Prepared, Preparer, Skipped
from consumer.rebalance import Rebalance
from consumer.retry import RetryPolicy, ServiceGate
from consumer.settings import Settings
from consumer.state import Engine, PartitionState, Work
from consumer.tracing import NO_TRACER, Tracer
from consumer.watchdog import Watchdog

__all__ = ["ADMIT_SLICE", "Consumer", "Pipeline"]

log = structlog.get_logger("consumer.pipeline")

#: records admitted between two yields to the event loop
ADMIT_SLICE: Final = 256


class Consumer(Protocol):
    """What the driver uses of `AIOKafkaConsumer` (the simulation's fake has the same)."""

    def subscribe(self, topics: Sequence[str] = (), pattern: str | None = None, **kw: Any) -> None:
        """Subscribe with a rebalance listener (keyword `listener`)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def position(self, partition: TopicPartition) -> int: ...
    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool: ...
    async def topics(self) -> set[str]: ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._pipeline.on_assigned(set(assigned))


class Pipeline:
    """Consumes events and turns each into exactly one acknowledged email (in effect)."""

    def __init__(
        self,
        *,
        settings: Settings,
        preparer: Preparer,
        client: Any,
        gate: ServiceGate,
        policy: RetryPolicy,
        metrics: Metrics,
        health: Health,
        consumer: Consumer,
        committer: Committer,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.settings = settings
        self.preparer = preparer
        self.client = client
        self.gate = gate
        self.metrics = metrics
        self.health = health
        self.tracer = tracer
        self._consumer = consumer
        # the event loop's clock by default (what asyncio's sleeps and timeouts use)
        self._clock = clock = clock or time.monotonic
        #: epoch seconds, for event ages (the simulation moves it with virtual time)
        self._wall = wall_clock
        self.engine = engine = Engine(settings)
        self.outcomes = Outcomes(
            engine=engine, table=preparer.table, metrics=metrics, tracer=tracer, clock=clock
        )
        self.dispatch = Dispatcher(
            engine=engine,
            outcomes=self.outcomes,
            client=client,
            gate=gate,
            policy=policy,
            metrics=metrics,
            clock=clock,
            wall_clock=wall_clock,
        )
        self.planning = Planning(
            engine=engine, dispatcher=self.dispatch, outcomes=self.outcomes, clock=clock
        )
        self.commits = Commits(
            engine=engine,
            committer=committer,
            planning=self.planning,
            metrics=metrics,
            health=health,
            tracer=tracer,
            on_fenced=lambda tp: self.rebalance.fenced(tp),
        )
        self.backpressure = BackPressure(
            engine=engine, consumer=consumer, gate=gate, metrics=metrics
        )
        self.watchdog = Watchdog(
            engine=engine,
            dispatcher=self.dispatch,
            consumer=consumer,
            client=client,
            gate=gate,
            metrics=metrics,
            health=health,
            make_ready=lambda: self.rebalance.make_ready(),
            clock=clock,
        )
        self.rebalance = Rebalance(
            engine=engine,
            consumer=consumer,
            client=client,
            dispatch=self.dispatch,
            commits=self.commits,
            backpressure=self.backpressure,
            metrics=metrics,
            health=health,
            clock=clock,
        )

    # -- what the outside reads -------------------------------------------------------

    @property
    def ledger(self) -> OffsetLedger:
        return self.engine.ledger

    @property
    def done(self) -> int:
        return self.engine.done

    @property
    def dead_lettered(self) -> int:
        return self.engine.dead_lettered

    @property
    def skipped(self) -> int:
        return self.engine.skipped

    @property
    def in_flight(self) -> int:
        return self.engine.in_flight

    @property
    def stalled(self) -> int:
        return self.engine.stalled

    @property
    def pending_bytes(self) -> int:
        return self.engine.pending_bytes

    def explain(self, tp: TopicPartition) -> str | None:
        """Why `tp` may rightly finish nothing now; None when nothing explains it."""
        return self.watchdog.explain(tp)

    def check_stalls(self) -> int:
        """Flag partitions with work that nothing explains for STALL_TIMEOUT."""
        return self.watchdog.check_stalls()

    def oldest_events(self) -> Iterator[tuple[str, int, float]]:
        """Per partition with unfinished work, the oldest event time (read at scrape time)."""
        return self.engine.oldest_events()

    def __repr__(self) -> str:
        e = self.engine
        return (
            f"<Pipeline in_flight={e.in_flight} pending={e.ledger.total_pending()} "
            f"done={e.done} dlq={e.dead_lettered} skipped={e.skipped} "
            f"paused={len(e.paused)} stalled={e.stalled} gate={self.gate.state}>"
        )

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until stop is set, then drain, commit and close everything.

        The consumer and the committer are started here and stopped at the end;
        `subscribe` and `start` errors propagate (the caller words them).
        """
        consumer = self._consumer
        try:
            listener = _Listener(self)
            if self.settings.kafka_topic_pattern:
                consumer.subscribe(pattern=self.settings.kafka_topic_pattern, listener=listener)
            else:
                consumer.subscribe(topics=list(self.settings.kafka_topics), listener=listener)
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await self.commits.committer.stop()
            raise
        self.health.set_broker_ok(True)
        background = (
            asyncio.create_task(self.commits.loop(stop), name="committer"),
            asyncio.create_task(self.planning.loop(stop, self.commits.record), name="planner"),
            asyncio.create_task(self.watchdog.report_progress(stop), name="progress"),
            asyncio.create_task(self.watchdog.watch_broker(stop), name="broker-watch"),
            asyncio.create_task(self.watchdog.run(stop), name="watchdog"),
        )
        try:
            await self._intake(stop)
        finally:
            # a commit under way finishes first: cancelled in its transaction, its outcome
            # would be unknown (and its letters written again by the final commit)
            async with self.commits.lock:
                for task in background:
                    task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop fetching, drain in-flight work, commit, then close clients.

        `consumer.stop()` does not call the rebalance listener, so the drain and
        the final commit happen here, before it.
        """
        engine = self.engine
        self.health.set_stopping()
        assigned = set(engine.parts)
        self.backpressure.pause(assigned)
        log.info(
            LogEvent.STOPPING, in_flight=engine.in_flight, pending=engine.ledger.total_pending()
        )
        try:
            await self.dispatch.drain(assigned, self.settings.shutdown_timeout)
            await self.commits.commit(reason="shutdown")
        finally:
            self.rebalance.forget(assigned)
            await self._consumer.stop()
            await self.commits.committer.stop()
        log.info(LogEvent.STOPPED, done=engine.done, dead_lettered=engine.dead_lettered)

    # -- intake ---------------------------------------------------------------------

    async def _intake(self, stop: asyncio.Event) -> None:
        engine = self.engine
        fetcher = RecordFetcher(self._consumer)
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self.health.mark_poll()
                room = self.settings.max_pending - engine.ledger.total_pending()
                # Records are admitted only into the partition state they were fetched
                # for: one reassigned during the fetch was sought back, and reads them again.
                before = dict(engine.parts)
                fetch = asyncio.ensure_future(
                    fetcher.fetch(timeout_ms=500, max_records=max(room, 1))
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, KafkaError):
                        await fetch
                    break
                try:
                    batch = fetch.result().in_offset_order()
                except KafkaError as exc:
                    # the client reconnects by itself; keep polling, report not-ready meanwhile
                    self.health.set_broker_ok(False)
                    log.warning(LogEvent.FETCH_FAILED, error=type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                admitted = 0
                for tp, records in batch.items():
                    found = engine.parts.get(tp)
                    if found is None or not engine.owns(tp, found):
                        continue  # fetched just before a revoke: the new owner reads it again
                    part: PartitionState = found
                    if before.get(tp) is not part:
                        # assigned while this fetch ran: some records may predate the seek
                        # to the committed offset; nothing is admitted to the new state yet,
                        # so seek there again and read them from it
                        await self.rebalance.seek_start(tp, part)
                        continue
                    for record in records:
                        if not engine.owns(tp, part):
                            break  # revoked (or reassigned) while this batch was admitted
                        self._admit(tp, part, record)
                        admitted += 1
                        if admitted % ADMIT_SLICE == 0:
                            # preparing costs ~100 us a record: let sends and heartbeats run
                            await asyncio.sleep(0)
                self.backpressure.apply()
        finally:
            stopping.cancel()

    def _admit(self, tp: TopicPartition, part: PartitionState, record: Any) -> None:
        """Track a fetched record, prepare it and hand it on; never raises for bad input.

        A record the client could not decode (`Undecodable`) becomes a dead letter of
        what could be read of it; every other record is prepared.
        """
        engine = self.engine
        offset = record.offset
        try:
            engine.ledger.track(tp, offset)
        except ValueError:
            # an offset at or below one already tracked in this assignment: the
            # client handed a record out twice; its first copy is on its way already
            if not isinstance(record, Undecodable):
                log.warning(LogEvent.DUPLICATE_RECORD, topic=tp.topic, offset=offset)
            return
        now = self._clock()
        started = self.tracer.clock()
        if isinstance(record, Undecodable):
            headers = tuple((name, value or b"") for name, value in record.headers)
            payload: Payload = record.rejected()
        else:
            headers = tuple(record.headers or ())
            payload = self.preparer.prepare(
                record.value,
                headers,
                topic=tp.topic,
                partition=tp.partition,
                offset=offset,
                timestamp_ms=record.timestamp,
                now=self._wall(),
            )
        work = Work(
            tp=tp,
            offset=offset,
            generation=part.generation,
            key=record.key,
            value=record.value,
            headers=headers,
            timestamp_ms=record.timestamp,
            fetched_at=now,
            payload=payload,
            size=len(record.value or b"")
            + (len(payload.body) if isinstance(payload, Prepared) else 0),
        )
        work.trace = self.tracer.start_event(
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            key=record.key,
            headers=headers,
            value=record.value,
            prepared=payload,
            started=started,
        )
        part.progress_at = now
        part.works[offset] = work
        engine.pending_bytes += work.size
        if isinstance(payload, Prepared):
            self.planning.plan(tp, part, work)
            return
        self.planning.passed(tp, part, offset)
        if isinstance(payload, Skipped):
            self.outcomes.skipped(work, payload.reason)
        else:
            self.dispatch.submit(tp, ("offset", offset), work)

    # -- the rebalance listener (consumer.rebalance does the work) --------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Fence the previous owners, then start each partition at its committed offset."""
        await self.rebalance.assigned(assigned)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Start no new sends for `revoked`, drain what is in flight, commit, let go."""
        await self.rebalance.revoked(revoked)
