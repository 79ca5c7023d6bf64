"""The engine: intake, dispatch, deliver, dead-letter, commit, rebalance, drain.

One fetch loop keeps calling `getmany()` whatever Resend does, so the member
never leaves the group for being slow (invariant 5). Each fetched record is
tracked in the offset ledger at once, prepared (decode, route, key, render)
inline, and handed to an ordering lane; lanes run deliveries concurrently,
bounded by a global in-flight semaphore held only during HTTP attempts.

An offset becomes committable only when its record's outcome is final: Resend
acknowledged it, the dead-letter write was acknowledged by Kafka, or a policy
skipped it (invariant 1). The committer commits the ledger's contiguous done
prefix on a timer, on revoke and on shutdown.

Back-pressure pauses partitions (never stops polling) once fetched-but-
unfinished records reach their bound, and resumes them below a low-water mark
(invariant 4). Service-wide conditions pause every partition and keep offsets
(invariant 3).

    Kafka -> _intake -> _admit -> Lane -> _process -> deliver() -> outcome
                                                   \\-> DeadLetterWriter
          <- _commit <- OffsetLedger.done() <--------------------------/
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumer import __version__
from consumer.deadletter import DeadLetter, DeadLetterWriter
from consumer.errors import DeadLetterUnavailable, KafkaUnavailable
from consumer.logs import LogEvent
from consumer.observe import (
    Health,
    HealthServer,
    Metrics,
    ProgressReporter,
    configure_logging,
    log_outcome,
)
from consumer.offsets import OffsetLedger
from consumer.prepare import Prepared, Preparer, Rejected, Skipped
from consumer.ratelimit import RateLimiter
from consumer.resend import RULES, Answer, ResendClient
from consumer.retry import (
    DeliveryResult,
    GateCondition,
    GateState,
    OnChange,
    RetryPolicy,
    ServiceGate,
    deliver,
)
from consumer.settings import Settings, SettingsError

log = structlog.get_logger("consumer.pipeline")

#: outcome labels of the canonical per-event log line and the events metric
SENT: Final = "sent"
DEAD_LETTERED: Final = "dead_lettered"
SKIPPED: Final = "skipped"

#: commit metadata, readable back through the admin client
COMMIT_METADATA: Final = f"resend-consumer/{__version__}"

TP = TopicPartition
#: seconds between two broker reachability checks (and their timeout)
BROKER_CHECK_INTERVAL: Final = 5.0
#: records admitted between two yields to the event loop
ADMIT_SLICE: Final = 256
KNOWN_ERROR_NAMES: Final = frozenset(rule.name for rule in RULES if rule.name is not None)


@dataclass(slots=True)
class Work:
    """One fetched record on its way to a final outcome."""

    tp: TopicPartition
    offset: int
    generation: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp_ms: int | None
    fetched_at: float
    prepared: Prepared | None = None
    rejected: Rejected | None = None
    #: an HTTP attempt or a dead-letter write is under way: a drain waits for it
    busy: bool = False


@dataclass(slots=True)
class Lane:
    """Work that must go one at a time, in offset order."""

    queue: deque[Work] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    current: Work | None = None


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
        client: ResendClient,
        gate: ServiceGate,
        policy: RetryPolicy,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self.settings = settings
        self.preparer = preparer
        self.client = client
        self.gate = gate
        self.policy = policy
        self.metrics = metrics
        self.health = health
        self.ledger = OffsetLedger()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._lanes: dict[tuple[TopicPartition, object], Lane] = {}
        self._key_locks: dict[str, list[Any]] = {}  # key -> [lock, users]
        self._generations: dict[TopicPartition, int] = {}
        self._revoking: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._commit_lock = asyncio.Lock()
        self._dlq_down = False
        # a commit must fit in what is left of the rebalance timeout after a drain
        self._commit_timeout = max(
            1.0, min(10.0, (settings.kafka_rebalance_timeout - settings.drain_timeout) / 2)
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._dlq: DeadLetterWriter | None = None
        # A concrete logger, bound once: the module's lazy proxy rebuilds one per call,
        # which is a measurable share of the per-event cost of the outcome line.
        self._log = log.bind()
        self._event_counters: dict[tuple[str, str], Any] = {}
        # live counters for repr and the progress line
        self.done = 0
        self.dead_lettered = 0
        self.skipped = 0
        self.in_flight = 0
        self.retries = 0

    def __repr__(self) -> str:
        return (
            f"<Pipeline in_flight={self.in_flight} pending={self.ledger.total_pending()} "
            f"done={self.done} dlq={self.dead_lettered} skipped={self.skipped} "
            f"paused={len(self._paused)} gate={self.gate.state}>"
        )

    # -- lifecycle ------------------------------------------------------------------

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            group_id=s.kafka_group_id,
            group_instance_id=s.kafka_group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=s.kafka_auto_offset_reset,
            session_timeout_ms=int(s.kafka_session_timeout * 1000),
            heartbeat_interval_ms=int(s.kafka_heartbeat_interval * 1000),
            rebalance_timeout_ms=int(s.kafka_rebalance_timeout * 1000),
            max_poll_interval_ms=int(s.kafka_max_poll_interval * 1000),
            # a transactional producer's aborted events must never become emails
            isolation_level="read_committed",
            **s.kafka_client_kwargs(),
        )

    def _make_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=15_000,
            # a dead letter is the original record plus a few hundred bytes of headers
            max_request_size=max(1_048_576, self.settings.max_event_bytes + 65_536),
            **self.settings.kafka_client_kwargs(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until stop is set, then drain, commit and close everything."""
        self._producer = self._make_producer()
        consumer = self._consumer = self._make_consumer()
        try:
            await self._producer.start()
            listener = _Listener(self)
            if self.settings.kafka_topic_pattern:
                consumer.subscribe(pattern=self.settings.kafka_topic_pattern, listener=listener)
            else:
                consumer.subscribe(topics=list(self.settings.kafka_topics), listener=listener)
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            await self._producer.stop()
            s = self.settings
            how: str = s.kafka_security_protocol
            if s.kafka_sasl_mechanism:
                how += f" {s.kafka_sasl_mechanism} as {s.kafka_sasl_username}"
            raise KafkaUnavailable(
                f"cannot start the Kafka clients for {s.kafka_bootstrap_servers} ({how}): "
                f"{type(exc).__name__}; check the address, TLS files and SASL credentials"
            ) from None
        self._dlq = DeadLetterWriter(
            producer=self._producer,
            topic_for=self.settings.dlq_topic_for,
            timeout=30.0,
            secrets=(self.settings.resend_api_key, self.settings.kafka_sasl_password),
        )
        self.health.set_broker_ok(True)
        committer = asyncio.create_task(self._commit_loop(stop), name="committer")
        progress = asyncio.create_task(self._progress_loop(stop), name="progress")
        watcher = asyncio.create_task(self._watch_broker(consumer, stop), name="broker-watch")
        try:
            await self._intake(consumer, stop)
        finally:
            background = (committer, progress, watcher)
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._shutdown(consumer)

    async def _shutdown(self, consumer: AIOKafkaConsumer) -> None:
        """Stop fetching, drain in-flight work, commit, then close clients.

        `consumer.stop()` does not call the rebalance listener, so the drain and
        the final commit happen here, before it.
        """
        self.health.set_stopping()
        assigned = set(consumer.assignment())
        with contextlib.suppress(KafkaError, AssertionError):
            consumer.pause(*assigned)
        log.info(LogEvent.STOPPING, in_flight=self.in_flight, pending=self.ledger.total_pending())
        await self._drain(assigned, self.settings.shutdown_timeout)
        await self._commit(reason="shutdown")
        for tp in assigned:
            self.ledger.revoke(tp)
        await consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        log.info(LogEvent.STOPPED, done=self.done, dead_lettered=self.dead_lettered)

    # -- intake ---------------------------------------------------------------------

    async def _intake(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self.health.mark_poll()
                room = self.settings.max_pending - self.ledger.total_pending()
                fetch = asyncio.ensure_future(
                    consumer.getmany(timeout_ms=500, max_records=max(room, 1))
                )
                await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError, KafkaError):
                        await fetch
                    break
                try:
                    batch = fetch.result()
                except KafkaError as exc:
                    # the client reconnects by itself; keep polling, report not-ready meanwhile
                    self.health.set_broker_ok(False)
                    log.warning(LogEvent.FETCH_FAILED, error=type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                admitted = 0
                for tp, records in batch.items():
                    generation = self._generations.get(tp)
                    if generation is None or tp in self._revoking:
                        continue  # fetched just before a revoke: the new owner reads it again
                    for record in records:
                        if tp in self._revoking or self._generations.get(tp) != generation:
                            break  # revoked (or reassigned) while this batch was admitted
                        self._admit(tp, generation, record)
                        admitted += 1
                        if admitted % ADMIT_SLICE == 0:
                            # preparing costs ~100 us a record: let sends and heartbeats run
                            await asyncio.sleep(0)
                self._apply_backpressure(consumer)
        finally:
            stopping.cancel()

    def _admit(self, tp: TopicPartition, generation: int, record: Any) -> None:
        """Track a fetched record and route it to its lane; never raises for bad input."""
        try:
            self.ledger.track(tp, record.offset)
        except ValueError:
            # an offset at or below one already tracked in this assignment: the
            # client handed a record out twice; its first copy is on its way already
            log.warning(LogEvent.DUPLICATE_RECORD, topic=tp.topic, offset=record.offset)
            return
        work = Work(
            tp=tp,
            offset=record.offset,
            generation=generation,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp,
            fetched_at=time.monotonic(),
        )
        result = self.preparer.prepare(
            record.value,
            work.headers,
            topic=tp.topic,
            partition=tp.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
        )
        if isinstance(result, Skipped):
            self.ledger.done(tp, record.offset, generation)
            self.skipped += 1
            self._count_event(result.event_type, SKIPPED)
            log_outcome(
                self._log,
                outcome=SKIPPED,
                reason=result.reason,
                event_id=result.event_id,
                event_type=result.event_type,
                source=None,
                topic=tp.topic,
                partition=tp.partition,
                offset=record.offset,
                idempotency_key=None,
                attempts=0,
                latency=0.0,
            )
            return
        if isinstance(result, Rejected):
            work.rejected = result
            lane_key: object = ("offset", record.offset)
        else:
            work.prepared = result
            lane_key = self._lane_key(work, result)
        self._enqueue(tp, lane_key, work)

    def _count_event(self, event_type: str | None, outcome: str) -> None:
        key = (self._type_label(event_type), outcome)
        child = self._event_counters.get(key)
        if child is None:  # label lookups cost more than the increment: keep the children
            child = self._event_counters[key] = self.metrics.events.labels(
                type=key[0], outcome=outcome
            )
        child.inc()

    def _type_label(self, event_type: str | None) -> str:
        # event types come from producers: only routed ones become metric labels
        if event_type is not None and event_type in self.preparer.table.routes:
            return event_type
        return "unknown"

    def _lane_key(self, work: Work, prepared: Prepared) -> object:
        mode = self.settings.ordering
        if mode == "partition":
            return "partition"
        if mode == "none":
            return ("offset", work.offset)
        # "key": one lane per Kafka key; unkeyed records fall back to the idempotency key
        return ("k", work.key) if work.key is not None else ("i", prepared.idempotency_key)

    def _enqueue(self, tp: TopicPartition, lane_key: object, work: Work) -> None:
        lane = self._lanes.get((tp, lane_key))
        if lane is None:
            lane = self._lanes[(tp, lane_key)] = Lane()
        lane.queue.append(work)
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(tp, lane_key, lane))

    async def _run_lane(self, tp: TopicPartition, lane_key: object, lane: Lane) -> None:
        try:
            while lane.queue:
                work = lane.queue.popleft()
                if work.tp in self._revoking or self._generations.get(work.tp) != work.generation:
                    continue  # revoked: no new sends; the next owner picks it up
                lane.current = work
                try:
                    await self._process(work)
                except Exception as exc:  # a bug must not silently stall the partition
                    await self._on_bug(work, exc)
                finally:
                    lane.current = None
        finally:
            lane.task = None
            if self._lanes.get((tp, lane_key)) is lane and not lane.queue:
                del self._lanes[(tp, lane_key)]

    # -- processing -----------------------------------------------------------------

    async def _process(self, work: Work) -> None:
        if work.rejected is not None:
            await self._dead_letter(
                work, reason=work.rejected.reason, message=work.rejected.message
            )
            return
        prepared = work.prepared
        assert prepared is not None
        # records with different Kafka keys may still share an idempotency key (a
        # duplicate publish): those go one at a time too, or Resend answers 409
        key = prepared.idempotency_key
        entry = self._key_locks.get(key)
        if entry is None:
            entry = self._key_locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                result = await deliver(
                    self.client,
                    endpoint=prepared.endpoint,
                    body=prepared.body,
                    idempotency_key=key,
                    policy=self.policy,
                    gate=self.gate,
                    slots=self._slots,
                    on_attempt=lambda busy: self._on_attempt(work, busy),
                    pace=self.client.pace,
                )
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._key_locks[key]
        if result.attempts > 1:
            self.retries += result.attempts - 1
        if result.outcome == "sent":
            self._finish(work, SENT, result=result)
        else:
            last = result.last
            await self._dead_letter(
                work,
                reason=result.reason,
                message=last.message if last is not None else result.reason,
                result=result,
            )

    async def _on_bug(self, work: Work, exc: Exception) -> None:
        """An unexpected exception while processing: log it, then dead-letter the record.

        If even that fails the offset stays pending: the partition's commit holds
        right before it (visible as lag) and the record is read again after a restart.
        """
        log.exception(
            LogEvent.INTERNAL_ERROR,
            error=type(exc).__name__,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
        )
        try:
            await self._dead_letter(
                work, reason="internal_error", message=f"{type(exc).__name__} while processing"
            )
        except Exception as again:
            log.exception(LogEvent.INTERNAL_ERROR, error=type(again).__name__, stage="dead_letter")

    def _on_attempt(self, work: Work, busy: bool) -> None:
        """An attempt starts (True) or ends (False): `in_flight` counts attempts on the wire."""
        work.busy = busy
        self.in_flight += 1 if busy else -1
        self.metrics.in_flight.set(self.in_flight)

    async def _dead_letter(
        self,
        work: Work,
        *,
        reason: str,
        message: str,
        result: DeliveryResult | None = None,
    ) -> None:
        """Write the record to the dead-letter topic; retry until Kafka acknowledges it."""
        assert self._dlq is not None
        prepared, rejected = work.prepared, work.rejected
        last = result.last if result is not None else None
        letter = DeadLetter(
            source_topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            key=work.key,
            value=work.value,
            headers=work.headers,
            reason=reason,
            error_name=last.error_name if last is not None else None,
            http_status=last.status if last is not None else None,
            message=message,
            attempts=result.attempts if result is not None else 0,
            first_attempt_at=result.first_attempt_at if result is not None else None,
            last_attempt_at=result.last_attempt_at if result is not None else None,
            idempotency_key=(
                prepared.idempotency_key
                if prepared is not None
                else rejected.idempotency_key
                if rejected is not None
                else None
            ),
            event_type=(
                prepared.event_type
                if prepared is not None
                else rejected.event_type
                if rejected is not None
                else None
            ),
        )
        delay = 0.5
        while True:
            if work.tp in self._revoking or self._generations.get(work.tp) != work.generation:
                return  # let the next owner dead-letter it; nothing was committed
            work.busy = True
            try:
                await self._dlq.write(letter)
                break
            except DeadLetterUnavailable as exc:
                if not self._dlq_down:
                    self._dlq_down = True
                    self.health.set_circuit(True, "dlq_unavailable")
                    log.error(LogEvent.DLQ_UNAVAILABLE, error=str(exc), topic=work.tp.topic)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.probe_max)
            finally:
                work.busy = False
        if self._dlq_down:
            self._dlq_down = False
            self.health.set_circuit(False, "dlq_unavailable")
            log.info(LogEvent.DLQ_AVAILABLE)
        self.dead_lettered += 1
        self.metrics.dead_letters.labels(reason=reason).inc()
        self._finish(work, DEAD_LETTERED, result=result, reason=reason)

    def _finish(
        self,
        work: Work,
        outcome: str,
        *,
        result: DeliveryResult | None = None,
        reason: str | None = None,
    ) -> None:
        accepted = self.ledger.done(work.tp, work.offset, work.generation)
        if outcome == SENT:
            self.done += 1
        prepared = work.prepared
        event_type = (
            prepared.event_type
            if prepared is not None
            else (work.rejected.event_type if work.rejected else None)
        )
        self._count_event(event_type, outcome)
        log_outcome(
            self._log,
            outcome=outcome,
            reason=reason or (result.reason if result is not None else None),
            event_id=(
                prepared.event_id
                if prepared
                else (work.rejected.event_id if work.rejected else None)
            ),
            event_type=event_type,
            source=prepared.source if prepared else None,
            topic=work.tp.topic,
            partition=work.tp.partition,
            offset=work.offset,
            idempotency_key=(
                prepared.idempotency_key
                if prepared
                else (work.rejected.idempotency_key if work.rejected else None)
            ),
            attempts=result.attempts if result else 0,
            latency=time.monotonic() - work.fetched_at,
            email_id=result.email_id if result else None,
        )
        if not accepted:
            log.debug(LogEvent.LATE_COMPLETION, topic=work.tp.topic, offset=work.offset)

    # -- back-pressure --------------------------------------------------------------

    def _apply_backpressure(self, consumer: AIOKafkaConsumer) -> None:
        s = self.settings
        total = self.ledger.total_pending()
        hold_all = self.gate.state != "closed" or self._dlq_down
        total_over = total >= s.max_pending
        total_low = total < s.max_pending * s.resume_ratio
        to_pause: list[TopicPartition] = []
        to_resume: list[TopicPartition] = []
        for tp in self._generations:
            pending = self.ledger.pending(tp)
            if tp in self._paused:
                below = pending < s.max_pending_per_partition * s.resume_ratio
                if below and total_low and not hold_all:
                    to_resume.append(tp)
            elif hold_all or total_over or pending >= s.max_pending_per_partition:
                to_pause.append(tp)
        if to_pause:
            consumer.pause(*to_pause)
            self._paused.update(to_pause)
            log.info(
                LogEvent.PAUSED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_pause],
                pending=total,
                reason="service_condition" if hold_all else "backlog",
            )
        if to_resume:
            consumer.resume(*to_resume)
            self._paused.difference_update(to_resume)
            log.info(
                LogEvent.RESUMED,
                partitions=[f"{tp.topic}-{tp.partition}" for tp in to_resume],
                pending=total,
            )
        self.metrics.paused_partitions.set(len(self._paused))

    # -- commit ---------------------------------------------------------------------

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.settings.commit_interval)
            await self._commit(reason="interval")

    async def _commit(self, *, reason: str, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        async with self._commit_lock:
            positions = self.ledger.to_commit()
            if only is not None:
                positions = {tp: pos for tp, pos in positions.items() if tp in only}
            if not positions:
                return
            try:
                # aiokafka retries a commit for as long as the coordinator is away; a
                # revoke or a shutdown must not wait that long behind the commit lock
                await asyncio.wait_for(
                    consumer.commit({tp: (pos, COMMIT_METADATA) for tp, pos in positions.items()}),
                    self._commit_timeout,
                )
            except (KafkaError, TimeoutError) as exc:
                # a rebalance or a coordinator move: keep the positions, try again later
                log.warning(LogEvent.COMMIT_FAILED, reason=reason, error=type(exc).__name__)
                return
            for tp, pos in positions.items():
                self.ledger.mark_committed(tp, pos)
                self.metrics.committed_offset.labels(topic=tp.topic, partition=tp.partition).set(
                    pos
                )
            log.debug(LogEvent.COMMITTED, reason=reason, partitions=len(positions))

    # -- rebalance ------------------------------------------------------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._generations[tp] = self.ledger.assign(tp)
            self._revoking.discard(tp)
            self._paused.discard(tp)
        self.health.set_assigned(len(self._generations))
        self.metrics.assigned_partitions.set(len(self._generations))
        log.info(
            LogEvent.ASSIGNED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Start no new sends for `revoked`, drain what is in flight, commit, let go."""
        if not revoked:
            return
        self._revoking.update(revoked)
        started = time.monotonic()
        await self._drain(revoked, self.settings.drain_timeout)
        await self._commit(reason="revoke", only=revoked)
        for tp in revoked:
            self.ledger.revoke(tp)
            self._generations.pop(tp, None)
            self._paused.discard(tp)
            self.metrics.forget_partition(tp.topic, tp.partition)
        self.health.set_assigned(len(self._generations))
        self.metrics.assigned_partitions.set(len(self._generations))
        log.info(
            LogEvent.REVOKED,
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked),
            drained_in_ms=round((time.monotonic() - started) * 1000),
        )

    async def _drain(self, tps: set[TopicPartition], limit: float) -> None:
        """Let in-flight work of `tps` finish for up to `limit` seconds, then cancel the rest.

        Queued work that has not started is dropped (its offsets stay uncommitted,
        so the next owner, or the next run, sends it with the same key).
        """
        self._revoking.update(tps)
        lanes = [lane for (tp, _), lane in list(self._lanes.items()) if tp in tps]
        for lane in lanes:
            lane.queue.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        cancelled: list[asyncio.Task[None]] = []
        while True:
            waiting = []
            for lane in lanes:
                task = lane.task
                if task is None or task.done() or task in cancelled:
                    continue
                if lane.current is not None and lane.current.busy:
                    waiting.append(task)  # a request on the wire: let it finish
                else:
                    # waiting for a slot, a backoff or the gate: nothing is lost by stopping
                    task.cancel()
                    cancelled.append(task)
            remaining = deadline - loop.time()
            if not waiting or remaining <= 0:
                break
            await asyncio.wait(waiting, timeout=min(remaining, 0.05))
        for task in waiting:
            task.cancel()
            cancelled.append(task)
        if waiting:
            log.warning(LogEvent.DRAIN_TIMEOUT, cancelled=len(waiting), timeout_s=limit)
        if cancelled:
            await asyncio.wait(cancelled, timeout=5)

    async def _watch_broker(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Readiness needs a reachable broker; aiokafka hides fetch errors, so ask it.

        A metadata request every BROKER_CHECK_INTERVAL seconds; a change is logged once.
        """
        reachable = True
        while not stop.is_set():
            await asyncio.sleep(BROKER_CHECK_INTERVAL)
            try:
                await asyncio.wait_for(consumer.topics(), BROKER_CHECK_INTERVAL)
                ok = True
            except (KafkaError, TimeoutError, OSError):
                ok = False
            self.health.set_broker_ok(ok)
            if ok != reachable:
                reachable = ok
                event = LogEvent.BROKER_REACHABLE if ok else LogEvent.BROKER_UNREACHABLE
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    event,
                    bootstrap=self.settings.kafka_bootstrap_servers,
                )

    # -- progress -------------------------------------------------------------------

    async def _progress_loop(self, stop: asyncio.Event) -> None:
        reporter = ProgressReporter(metrics=self.metrics, interval=self.settings.progress_interval)
        while not stop.is_set():
            await asyncio.sleep(self.settings.progress_interval)
            self._update_lag()
            reporter.tick()

    def _update_lag(self) -> int:
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in list(self._generations):
            try:
                high = consumer.highwater(tp)
            except (KafkaError, AssertionError):
                continue
            position = self.ledger.position(tp)
            if high is None or position is None:
                continue
            lag = max(high - position, 0)
            total += lag
            self.metrics.lag.labels(topic=tp.topic, partition=tp.partition).set(lag)
        return total


GATE_CONDITIONS: Final = ("auth", "endpoint", "quota_daily", "quota_monthly", "outage")


def gate_observer(health: Health, metrics: Metrics) -> OnChange:
    """The service gate's on_change: readiness and the circuit metric follow its state.

    Only the gate's own condition is closed again: a dead-letter outage reported
    beside it stays open until the dead-letter topic is writable.
    """
    current: list[str | None] = [None]

    def on_change(old: GateState, new: GateState, condition: GateCondition | None) -> None:
        previous = current[0]
        if previous is not None and (new == "closed" or previous != condition):
            health.set_circuit(False, previous)
        current[0] = condition if new != "closed" else None
        if new != "closed":
            health.set_circuit(True, condition)
        for name in GATE_CONDITIONS:
            metrics.circuit_open.labels(condition=name).set(
                1 if new != "closed" and condition == name else 0
            )

    return on_change


def observe_client(client: ResendClient, metrics: Metrics, limiter: RateLimiter) -> None:
    """Feed the client's answers and rate-limit waits into the metrics."""

    sends: dict[str, Any] = {}

    def on_answer(answer: Answer, seconds: float) -> None:
        status = str(answer.status) if answer.status is not None else "transport"
        child = sends.get(status)
        if child is None:
            child = sends[status] = metrics.sends.labels(status=status)
        child.inc()
        metrics.send_latency.observe(seconds)
        if answer.verdict == "retry":
            # only names of the contract's table become labels: servers may invent others
            name = answer.error_name
            metrics.retries.labels(reason=name if name in KNOWN_ERROR_NAMES else status).inc()
        metrics.ratelimit_rate.set(limiter.rate)

    def on_rate_wait(seconds: float) -> None:
        metrics.ratelimit_wait.observe(seconds)

    client.on_answer = on_answer
    client.on_rate_wait = on_rate_wait


async def run_service(settings: Settings, stop: asyncio.Event) -> int:
    """`resend-consumer run`: build every part from settings, run until stop, drain, exit 0."""
    configure_logging(settings)
    if settings.resend_api_key is None:
        raise SettingsError(
            "RESEND_API_KEY (or RESEND_API_KEY_FILE) is not set; for a local run without a "
            "Resend account use `resend-consumer quickstart` or point RESEND_BASE_URL at "
            "`resend-consumer sandbox` with any key"
        )
    preparer = Preparer.from_settings(settings)
    metrics = Metrics()
    health = Health(liveness_window=max(60.0, settings.kafka_max_poll_interval / 2))

    gate = ServiceGate(
        probe_initial=settings.probe_initial,
        probe_max=settings.probe_max,
        on_change=gate_observer(health, metrics),
    )
    limiter = RateLimiter(rate=settings.rate_limit)
    policy = RetryPolicy.from_settings(settings)
    server = None
    if settings.health_port:
        server = HealthServer(
            health=health, metrics=metrics, host=settings.health_host, port=settings.health_port
        )
        await server.start()
    try:
        async with ResendClient.from_settings(settings, limiter=limiter) as client:
            observe_client(client, metrics, limiter)
            pipeline = Pipeline(
                settings=settings,
                preparer=preparer,
                client=client,
                gate=gate,
                policy=policy,
                metrics=metrics,
                health=health,
            )
            # Everything loaded so far (routes, compiled templates and validators,
            # clients) lives as long as the process: move it out of the cyclic
            # collector's scans, which otherwise cost about a tenth of each event.
            gc.collect()
            gc.freeze()
            log.info(
                LogEvent.STARTED,
                version=__version__,
                topics=list(settings.kafka_topics),
                group=settings.kafka_group_id,
                resend=settings.resend_base_url,
            )
            await pipeline.run(stop)
    finally:
        if server is not None:
            await server.stop()
    return 0
