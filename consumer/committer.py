"""Dead letters and the source offset in one Kafka transaction, per source partition.

`PartitionCommitter.commit(tp, position, metadata, letters)` writes the dead
letters of `tp` and moves the group's committed offset of `tp` to `position` in
one transaction: a read_committed reader sees both or neither, so a crash
between the two can no longer write a dead letter twice.

Why one transactional producer per source partition: aiokafka (0.14) sends
TxnOffsetCommit v0, which carries the group id but not the member id or the
generation (`producer/sender.py` `TxnOffsetCommitHandler`,
`protocol/transaction.py` `TxnOffsetCommitRequest_v0`), so the group
coordinator cannot refuse a commit from a member that lost the partition
(KIP-447 fencing). What fences a zombie is the transactional id: it is
`{prefix}{group_id}.{topic}.{partition}`, and whoever is assigned the partition
initialises it, which bumps the producer epoch, aborts the zombie's open
transaction, and makes every later request of the zombie fail with
ProducerFenced.

The order that makes this safe, and what `assign` returns for it: aiokafka
reads the committed offset of a new assignment concurrently with the rebalance
listener (`consumer/group_coordinator.py` `_on_join_complete` starts the commit
refresh task before it awaits `on_partitions_assigned`; the fetcher's
`_update_fetch_positions` asks for the committed offset as soon as
`assign_from_subscribed` has set the assignment). That read can happen before
the fence, and it can also be stale after an ordinary hand-over: a committed
transaction's offset becomes visible to OffsetFetch only once its markers are
written, after `commit_transaction` returned. Initialising the transactional id
waits for the previous transaction of that id to be completed, so the committed
offset read *after* `assign` is final. `assign` returns it; the caller seeks
each partition there before it processes anything.

Failures never leave a transaction open: the transaction is aborted (or, when
that is impossible, the producer is dropped and its id initialised again before
the next commit, which aborts whatever it left). A fence marks the partition
fenced: nothing more is committed for it until it is assigned again; a newer
owner holds it, and initialising the id again would fence that owner in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from aiokafka.errors import KafkaError

from consumer.deadletter import DeadLetter, DeadLetterWriter, TopicLimits, build_record, unavailable
from consumer.errors import CommitFailed, DeadLetterUnavailable, PartitionFenced
from consumer.redact import redact_secrets

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from consumer.settings import Secret

DEFAULT_PREFIX: Final = "resend-consumer."
#: the producer's default batch size; lowered to a topic's limit when that is smaller
MAX_BATCH_BYTES: Final = 16_384

#: backoff of the transactional producers' retries (aiokafka's default is 100 ms)
RETRY_BACKOFF_MS: Final = 20

State = Literal["ready", "broken", "fenced"]


@dataclass(slots=True)
class _Slot:
    """One assigned source partition: its producer and what is known of its offset."""

    producer: AIOKafkaProducer | None = None
    #: ready: producer initialised; broken: initialise again before the next commit;
    #: fenced: a newer owner initialised the id; commit nothing until assigned again
    state: State = "broken"
    #: the group's committed offset, as read after the fence or last committed by us
    committed: int | None = None
    #: the metadata committed with it (a batch plan, see consumer.batching)
    metadata: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PartitionCommitter:
    """Commits dead letters and offsets atomically, one transactional producer per partition."""

    def __init__(
        self,
        *,
        client: Mapping[str, Any],
        group_id: str,
        topic_for: Callable[[str], str],
        prefix: str = DEFAULT_PREFIX,
        secrets: Iterable[Secret | None] = (),
        timeout: float = 30.0,
        init_timeout: float = 30.0,
        transaction_timeout: float = 60.0,
        max_request_size: int = 1_048_576,
        clock: Callable[[], float] = time.time,
        limits: TopicLimits | None = None,
    ) -> None:
        self._client = dict(client)
        self._group_id = group_id
        self._topic_for = topic_for
        self._prefix = prefix
        self._secrets = tuple(s.get() for s in secrets if s)
        self._timeout = timeout
        self._init_timeout = init_timeout
        self._transaction_timeout = transaction_timeout
        self._max_request_size = max_request_size
        self._clock = clock
        self._limits = limits or TopicLimits(
            client=self._client, max_request_size=max_request_size, timeout=init_timeout
        )
        self._slots: dict[TopicPartition, _Slot] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        from aiokafka.errors import KafkaError

        # What a broken or unreachable Kafka raises; anything else is a bug and propagates.
        self._failures: tuple[type[BaseException], ...] = (KafkaError, TimeoutError, OSError)
        self.commits = 0
        self.letters = 0
        self.aborted = 0
        self.fenced = 0

    def __repr__(self) -> str:
        return (
            f"<PartitionCommitter partitions={len(self._slots)} commits={self.commits} "
            f"letters={self.letters} aborted={self.aborted} fenced={self.fenced}>"
        )

    def transactional_id(self, tp: TopicPartition) -> str:
        """The transactional id that only the owner of `tp` initialises."""
        return f"{self._prefix}{self._group_id}.{tp.topic}.{tp.partition}"

    def state(self, tp: TopicPartition) -> State | None:
        """ready, broken or fenced; None when `tp` is not assigned here."""
        slot = self._slots.get(tp)
        return None if slot is None else slot.state

    # -- lifecycle ------------------------------------------------------------------

    async def assign(
        self, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        """Fence every earlier owner of `tps`, then read their committed offsets.

        Returns each partition's committed offset and metadata (None: nothing
        committed); seek there before processing, since the consumer's own read may
        predate the fence. Producers are initialised concurrently. Raises
        CommitFailed when a producer or the offsets cannot be had within
        `init_timeout`; the partitions that failed stay broken, and assigning them
        again retries.
        """
        wanted = sorted(set(tps))
        for tp in wanted:
            self._slots.setdefault(tp, _Slot())

        async def one(tp: TopicPartition) -> None:
            slot = self._slots[tp]
            async with slot.lock:
                await self._open(tp, slot)

        results = await asyncio.gather(*(one(tp) for tp in wanted), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for result in failed:
            if not isinstance(result, CommitFailed):
                raise result
        if failed:
            raise failed[0]
        offsets = await self._read_committed(wanted)
        for tp in wanted:
            found = offsets.get(tp)
            slot = self._slots[tp]
            slot.committed = None if found is None else found.offset
            slot.metadata = None if found is None else found.metadata
        return {tp: offsets.get(tp) for tp in wanted}

    async def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Close the producers of `tps`; commit what must be committed before this."""
        slots = [self._slots.pop(tp) for tp in set(tps) if tp in self._slots]

        async def close(slot: _Slot) -> None:
            async with slot.lock:  # a commit under way finishes (or aborts) first
                await self._close(slot)

        await asyncio.gather(*(close(slot) for slot in slots))

    async def stop(self) -> None:
        """Close every producer (nothing is committed here) and finish cleanups."""
        await self.revoke(list(self._slots))
        while self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)

    # -- commit ---------------------------------------------------------------------

    async def commit(
        self,
        tp: TopicPartition,
        position: int,
        metadata: str,
        letters: Sequence[DeadLetter],
    ) -> None:
        """Write `letters` and commit `tp` at `position` with `metadata`, atomically.

        `letters` are the dead letters of offsets below `position` not yet
        committed. A position at or below the committed one writes no letters (the
        transaction that moved the offset there wrote them) and is a no-op unless
        `metadata` differs from what was committed: then it is committed with the
        offset unchanged (a batch plan must be recorded before it is sent). Raises
        DeadLetterUnavailable (a letter could not be written), CommitFailed (the
        transaction did not commit: nothing is visible, commit the same again), or
        PartitionFenced (a newer owner has `tp`: drop its work). In every case the
        transaction is aborted or left to be aborted before the next one begins.
        """
        slot = self._slots.get(tp)
        if slot is None:
            raise ValueError(f"{tp.topic}[{tp.partition}] is not assigned to this committer")
        async with slot.lock:
            if slot.state == "fenced":
                raise PartitionFenced(f"{self._where(tp)}: fenced by a newer owner")
            if slot.state == "broken":
                # The last transaction may or may not have committed; initialising the
                # id again settles it, and the committed offset says which way.
                await self._open(tp, slot)
                found = (await self._read_committed([tp])).get(tp)
                slot.committed = None if found is None else found.offset
                slot.metadata = None if found is None else found.metadata
            if slot.committed is not None and position <= slot.committed:
                if metadata == slot.metadata:
                    return
                # New metadata at an unchanged offset: a batch plan is recorded before
                # anything of it is sent, so it must land. (Below the committed offset
                # only after a lost answer: record it there, offsets never go back.)
                position = slot.committed
            if slot.committed is not None:
                # a transaction that landed although it reported failure (a lost answer,
                # a cancel) wrote every letter below the offset it committed
                letters = [letter for letter in letters if letter.offset >= slot.committed]
            await self._transaction(tp, slot, position, metadata, letters)

    async def _transaction(
        self,
        tp: TopicPartition,
        slot: _Slot,
        position: int,
        metadata: str,
        letters: Sequence[DeadLetter],
    ) -> None:
        producer = slot.producer
        assert producer is not None
        if producer._txn_manager.is_fatal_error():
            # Its sender died between two commits (fenced, or a broken sequence):
            # aiokafka would refuse to begin; the next commit initialises the id again.
            await self._abandon(slot)
            raise CommitFailed(f"{self._where(tp)}: transactional producer failed; reinitialising")
        phase: Literal["letters", "commit"] = "letters"
        letter: DeadLetter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                await producer.begin_transaction()
                acks = []
                for letter in letters:
                    topic = self._topic_for(letter.source_topic)
                    limit = await self._limits.get(topic)
                    record = build_record(
                        letter, limit=limit, dead_lettered_at=self._clock(), secrets=self._secrets
                    )
                    ack = await producer.send(
                        topic, key=record.key, value=record.value, headers=record.headers
                    )
                    acks.append((letter, ack))
                # aiokafka commits a transaction even when one of its records failed
                # (a failed batch fails only its own futures), so every ack is awaited
                # before the offsets join the transaction.
                for letter, ack in acks:  # noqa: B007 - `letter` names the failed one
                    await ack
                phase = "commit"
                await producer.send_offsets_to_transaction(
                    {tp: (position, metadata)}, self._group_id
                )
                await producer.commit_transaction()
        except asyncio.CancelledError:
            self._abandon_later(slot)
            raise
        except self._failures as exc:
            await self._abandon(slot)
            raise self._error(tp, phase, letter, exc) from None
        slot.committed = position
        slot.metadata = metadata
        self.commits += 1
        self.letters += len(letters)

    def _error(
        self, tp: TopicPartition, phase: str, letter: DeadLetter | None, exc: BaseException
    ) -> Exception:
        from aiokafka.errors import ProducerFenced

        slot = self._slots.get(tp)
        if isinstance(exc, ProducerFenced):
            self.fenced += 1
            if slot is not None:
                slot.state = "fenced"
            return PartitionFenced(f"{self._where(tp)}: fenced by a newer owner, nothing committed")
        if phase == "letters" and letter is not None:
            topic = self._topic_for(letter.source_topic)
            error: DeadLetterUnavailable = unavailable(
                topic, letter, exc, self._timeout, self._secrets
            )
            return error
        if isinstance(exc, TimeoutError):
            detail = f"TimeoutError: no answer within {self._timeout:g}s"
        else:
            text = redact_secrets(str(exc), self._secrets)
            detail = type(exc).__name__ + (f": {text}" if text else "")
        return CommitFailed(f"{self._where(tp)}: transaction not committed: {detail}")

    # -- producers ------------------------------------------------------------------

    async def _open(self, tp: TopicPartition, slot: _Slot) -> None:
        """(Re)initialise the transactional id of `tp`: fences every earlier holder."""
        from aiokafka import AIOKafkaProducer

        await self._close(slot)
        limit = await self._limits.get(self._topic_for(tp.topic))
        producer = AIOKafkaProducer(
            **self._client,
            transactional_id=self.transactional_id(tp),
            transaction_timeout_ms=int(self._transaction_timeout * 1000),
            max_request_size=self._max_request_size,
            # A batch of several small letters must fit the topic as well.
            max_batch_size=max(1, min(MAX_BATCH_BYTES, limit)),
            acks="all",
            # A transaction begun right after the previous one can meet its markers
            # still being written (CONCURRENT_TRANSACTIONS); aiokafka then waits one
            # backoff, 100 ms by default, before adding the offsets.
            retry_backoff_ms=RETRY_BACKOFF_MS,
        )
        try:
            await asyncio.wait_for(producer.start(), self._init_timeout)
        except BaseException as exc:
            await _close_producer(producer, self._timeout)
            slot.state = "broken"
            if isinstance(exc, self._failures):
                name = "TimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
                raise CommitFailed(
                    f"{self._where(tp)}: transactional producer not initialised: {name}"
                ) from None
            raise
        slot.producer, slot.state = producer, "ready"

    async def _read_committed(
        self, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            **self._client, request_timeout_ms=int(self._init_timeout * 1000)
        )
        try:
            async with asyncio.timeout(self._init_timeout):
                await admin.start()
                found = await self._list_offsets(admin, tps)
        except self._failures as exc:
            name = "TimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
            for tp in tps:
                if tp in self._slots:
                    self._slots[tp].state = "broken"
            raise CommitFailed(f"committed offsets of group not read: {name}") from None
        finally:
            await admin.close()
        return {tp: meta for tp, meta in found.items() if meta.offset >= 0}

    async def _list_offsets(self, admin: Any, tps: Sequence[TopicPartition]) -> Any:
        """The group's offsets; a coordinator still loading (a fresh group, a moved
        coordinator) answers with a retriable error for a moment: ask again."""
        from aiokafka.errors import KafkaError

        while True:
            try:
                return await admin.list_consumer_group_offsets(self._group_id, partitions=list(tps))
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                await asyncio.sleep(0.1)

    async def _abandon(self, slot: _Slot) -> None:
        """End a failed transaction: abort it when the producer still can, then drop it.

        The producer is dropped even after a clean abort: after a failed batch its
        sequence numbers no longer match the broker's, and a fresh epoch resets them.
        An abort that cannot be sent is done by the next initialisation of the id
        (or by the broker after `transaction_timeout`).
        """
        from aiokafka.producer.transaction_manager import TransactionState

        producer, slot.producer = slot.producer, None
        if slot.state != "fenced":
            slot.state = "broken"
        self.aborted += 1
        if producer is None:
            return
        txn = producer._txn_manager  # aiokafka exposes no transaction state
        if txn.state in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
            with contextlib.suppress(*self._failures):
                await asyncio.wait_for(producer.abort_transaction(), self._timeout)
        _take_failures(producer)
        await _close_producer(producer, self._timeout)

    def _abandon_later(self, slot: _Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._abandon(slot))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _close(self, slot: _Slot) -> None:
        producer, slot.producer = slot.producer, None
        if producer is not None:
            await _close_producer(producer, self._timeout)

    def _where(self, tp: TopicPartition) -> str:
        return f"{tp.topic}[{tp.partition}]"


def _take_failures(producer: AIOKafkaProducer) -> None:
    """Retrieve the exceptions a fatal error leaves in aiokafka's internal futures.

    When its sender dies (fenced), aiokafka fails the transaction's future and each
    pending batch's drain waiter, which nothing awaits; left alone, asyncio reports
    each one as "never retrieved" when it is collected.
    """
    futures = [producer._txn_manager.wait_for_transaction_end()]
    accumulator = producer._message_accumulator
    for batch in [b for q in accumulator._batches.values() for b in q]:
        futures.append(batch._drain_waiter)
    for batch in accumulator._pending_batches:
        futures.append(batch._drain_waiter)
    for future in futures:
        if future is not None and future.done() and not future.cancelled():
            future.exception()


async def _close_producer(producer: AIOKafkaProducer, limit: float) -> None:
    """Stop `producer`; when its flush cannot finish (broker away), close it hard."""
    try:
        await asyncio.wait_for(producer.stop(), limit)
    except Exception:
        # stop() waits for pending batches, which a transactional producer retries
        # for ever; what they carried belongs to a transaction nobody will commit.
        with contextlib.suppress(Exception):
            await producer._sender.close()
        with contextlib.suppress(Exception):
            await producer.client.close()


# -- the seam the engine commits through, and its plain implementation -------------


class Committer(Protocol):
    """Commits a partition's position together with the dead letters it covers.

    `assign` fences earlier owners of the partitions and returns their committed
    offsets read after the fence (`OffsetAndMetadata`, or None when nothing is
    committed). `commit` returns only once letters and position are durable, or
    raises: `DeadLetterUnavailable` when a letter could not be written,
    `CommitFailed` when nothing happened (commit the same again), `PartitionFenced`
    when a newer owner has the partition. Nothing of a failed call becomes visible.
    """

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> Mapping[TopicPartition, OffsetAndMetadata | None]: ...
    async def commit(
        self, tp: TopicPartition, position: int, metadata: str, letters: Sequence[DeadLetter]
    ) -> None: ...
    async def revoke(self, partitions: Iterable[TopicPartition]) -> None: ...
    async def stop(self) -> None: ...


class ConsumerCommitter:
    """Dead letters through an idempotent producer, then the consumer's own offset commit.

    For brokers where transactions are not allowed (KAFKA_TRANSACTIONS=false): at
    least once for dead letters, since a crash between the two writes a letter again.
    """

    def __init__(self, *, consumer: Any, writer: DeadLetterWriter, timeout: float) -> None:
        self._consumer = consumer
        self._writer = writer
        self._timeout = timeout

    async def assign(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        tps = sorted(partitions)
        try:
            # offsets with their metadata (the batch plan): `committed()` drops it
            found = await asyncio.wait_for(
                self._consumer._coordinator.fetch_committed_offsets(tps), self._timeout
            )
        except (KafkaError, TimeoutError) as exc:
            raise CommitFailed(f"committed offsets not read: {type(exc).__name__}") from None
        out: dict[TopicPartition, OffsetAndMetadata | None] = {}
        for tp in tps:
            meta = found.get(tp)
            out[tp] = meta if meta is not None and meta.offset >= 0 else None
        return out

    async def commit(
        self, tp: TopicPartition, position: int, metadata: str, letters: Sequence[DeadLetter]
    ) -> None:
        for letter in letters:
            await self._writer.write(letter)
        try:
            # aiokafka retries a commit for as long as the coordinator is away; a
            # revoke or a shutdown must not wait that long behind the commit lock
            await asyncio.wait_for(self._consumer.commit({tp: (position, metadata)}), self._timeout)
        except (KafkaError, TimeoutError) as exc:
            where = f"{tp.topic}[{tp.partition}]"
            raise CommitFailed(f"commit of {where}: {type(exc).__name__}") from None

    async def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        return None

    async def stop(self) -> None:
        return None
