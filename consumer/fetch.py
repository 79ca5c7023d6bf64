"""Fetching that no record can break: `getmany()` minus its poison pills.

aiokafka decodes records lazily while `getmany()` hands them out. A record it
cannot decode (a header *name* that is not UTF-8: the C extension and the pure
Python code both call `.decode("utf-8")` on it; or anything else that raises
while a batch is unpacked) makes the whole call raise, and then:

- the bad partition's position stays where the buffered fetch began, so the
  next call reads the same record and raises again, for ever;
- records of that partition before the bad one were decoded but are dropped
  with the exception (they come again on the next fetch);
- records of *other* partitions that the same call had already drained are
  lost: their positions were advanced, the list holding them is gone.

`RecordFetcher.fetch()` never loses a record and never raises for one:

1. Records are taken one partition per `getmany()` call, so an error names its
   partition and takes nothing else with it. Waiting for data uses
   `getmany(max_records=1)`, which returns as soon as one record was drained, so
   it cannot drop another partition's records either.
2. On an error the partition is read again one record at a time; the call that
   raises then leaves the position at the first record the client cannot read.
3. That record's batch is fetched raw (one FetchRequest, bytes only) and decoded
   here, tolerantly: the bad record comes back as an `Undecodable` with
   whatever could be read of it (key, value, timestamp, the headers whose names
   are text), the records after it in the same batch come back as ordinary
   records (aiokafka would fail on the bad one again before reaching them), and
   the partition is moved past the batch with `seek()`.

Records this module decodes itself carry raw bytes: the consumer must not use
key or value deserializers. One call may return a batch's worth of records more
than `max_records` (the rest of a batch that held a bad record).
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeAlias, cast

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka import codec as codecs
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    UnsupportedCodecError,
    for_code,
)
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.util import calc_crc32c

from consumer.prepare import Rejected

#: the dead-letter reason of a record the Kafka client cannot decode
UNDECODABLE_RECORD: Final = "undecodable_record"

#: KafkaErrors that come from one record's bytes rather than from the cluster
_RECORD_ERRORS: Final = (CorruptRecordException, UnsupportedCodecError)
#: v2 batch header: base offset .. record count (61 bytes)
_BATCH_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
_CRC_START: Final = 21  # the CRC-32C covers attributes .. end of batch
_TIMESTAMP_LOG_APPEND: Final = 0x08
_CONTROL: Final = 0x20
_READ_UNCOMMITTED: Final = 0


class FetchingConsumer(Protocol):
    """What `RecordFetcher` uses of `AIOKafkaConsumer`.

    After a record error it also reads the consumer's `_client` (see `_fetch_raw`);
    a fake that never fails on a record needs none.
    """

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def position(self, partition: TopicPartition) -> int: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A record the client could not decode: what could be read of it, and why.

    Shaped like a `ConsumerRecord` (offset, key, value, headers, timestamp), so the
    pipeline can track and dead-letter it like any rejected record.
    """

    tp: TopicPartition
    offset: int
    detail: str
    reason: str = UNDECODABLE_RECORD
    key: bytes | None = None
    value: bytes | None = None
    #: the headers whose names are text (the others are named in `detail`)
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp: int | None = None

    def rejected(self) -> Rejected:
        """The preparation outcome for this record: dead-letter it with its reason."""
        return Rejected(
            reason=self.reason,
            message=self.detail,
            event_id=None,
            event_type=None,
            idempotency_key=None,
        )


Item: TypeAlias = ConsumerRecord[bytes, bytes] | Undecodable


@dataclass(slots=True)
class Fetched:
    """What one `RecordFetcher.fetch()` call got, per partition in offset order."""

    items: dict[TopicPartition, list[Item]] = field(default_factory=dict)
    #: the position each partition must still have for its items to be handed out
    _next: dict[TopicPartition, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(map(len, self.items.values()))

    @property
    def records(self) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The decodable records, by partition."""
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp, items in self.items.items():
            good = [i for i in items if not isinstance(i, Undecodable)]
            if good:
                out[tp] = good
        return out

    @property
    def undecodable(self) -> list[Undecodable]:
        return [i for items in self.items.values() for i in items if isinstance(i, Undecodable)]

    def in_offset_order(self) -> dict[TopicPartition, list[Item]]:
        """Records and undecodable ones together, per partition, in offset order."""
        return {tp: list(items) for tp, items in self.items.items()}

    def _add(self, tp: TopicPartition, items: Sequence[Item], after: int | None = None) -> None:
        """Append what one take got; `after` is the position it left (default: last + 1)."""
        if not items:
            if after is not None and tp in self._next:
                self._next[tp] = after  # stepped over a batch with nothing to hand out
            return
        have = self.items.setdefault(tp, [])
        if have and items[0].offset < self._next[tp]:
            # sought back between two takes (a rebalance ran while this call waited):
            # what came before is read again from the new position
            have.clear()
        have.extend(items)
        self._next[tp] = items[-1].offset + 1 if after is None else after


async def _settle(consumer: FetchingConsumer, out: Fetched) -> None:
    """Hand out only what the consumer's positions still stand behind.

    A rebalance can run while this call waits between two `getmany()` calls; the
    new owner's seek (or a revoke) makes what was taken before it stale.
    """
    assigned = consumer.assignment()
    for tp in list(out.items):
        # A position behind what was taken means a seek back (a rebalance); one ahead
        # is aiokafka stepping over a transaction marker after the last record taken,
        # and those records are still the next ones: dropping them would skip them.
        if tp not in assigned or await consumer.position(tp) < out._next[tp]:
            del out.items[tp]


class RecordFetcher:
    """`consumer.getmany()` that no record can make raise; one per consumer.

        fetcher = RecordFetcher(consumer)
        fetched = await fetcher.fetch(timeout_ms=500, max_records=room)

    Cluster errors (`KafkaError`: broker down, authorization, a stopped consumer)
    still raise, as `getmany()` raises them; one met after some records were
    taken is raised by the next call instead, so those records are not lost.
    """

    __slots__ = ("_consumer", "_error", "undecodable")

    def __init__(self, consumer: FetchingConsumer) -> None:
        self._consumer = consumer
        self._error: KafkaError | None = None
        #: undecodable records handed out so far
        self.undecodable = 0

    def __repr__(self) -> str:
        return f"<RecordFetcher undecodable={self.undecodable} error={self._error!r}>"

    async def fetch(self, *, timeout_ms: int, max_records: int) -> Fetched:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        out = Fetched()
        try:
            await _fetch_into(self._consumer, out, timeout_ms, max_records)
        except KafkaError as exc:
            if not len(out):
                raise
            self._error = exc
        await _settle(self._consumer, out)
        self.undecodable += len(out.undecodable)
        return out


async def _fetch_into(
    consumer: FetchingConsumer, out: Fetched, timeout_ms: int, max_records: int
) -> None:
    await _drain(consumer, out, max_records, timeout_ms)
    if len(out):
        return
    try:
        first = await consumer.getmany(timeout_ms=timeout_ms, max_records=1)
    except Exception as exc:
        if not _is_record_error(exc):
            raise
        first = None
    if first is None:
        # Some partition's buffered fetch failed and is fetched again; only a call
        # for that partition alone can say which one it was.
        parts = sorted(consumer.assignment())
        results = await asyncio.gather(
            *(_take(consumer, tp, 1, timeout_ms, out) for tp in parts), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return
    for tp, records in first.items():
        out._add(tp, records)
    await _drain(consumer, out, max_records - len(out), timeout_ms)


async def _drain(consumer: FetchingConsumer, out: Fetched, budget: int, timeout_ms: int) -> None:
    """Take what is buffered, partition by partition, up to `budget` records.

    The order is shuffled, as aiokafka shuffles its fetch requests, so a small
    budget (back-pressure) does not always favour the same partitions.
    """
    parts = list(consumer.assignment())
    random.shuffle(parts)  # fairness, not secrecy
    for tp in parts:
        room = budget - len(out)
        if room <= 0:
            return
        await _take(consumer, tp, room, 0, out, isolate_ms=timeout_ms)


async def _take(
    consumer: FetchingConsumer,
    tp: TopicPartition,
    limit: int,
    timeout_ms: int,
    out: Fetched,
    *,
    isolate_ms: int | None = None,
) -> None:
    try:
        got = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=limit)
    except Exception as exc:
        if not _is_record_error(exc):
            raise
        await _isolate(consumer, tp, limit, isolate_ms or timeout_ms or 500, out)
        return
    out._add(tp, got.get(tp, ()))


async def _isolate(
    consumer: FetchingConsumer, tp: TopicPartition, limit: int, timeout_ms: int, out: Fetched
) -> None:
    """Read `tp` one record at a time until the bad one raises, then step past its batch.

    The failed call left the buffered fetch dead; the first call below drops it
    and waits for the partition to be fetched again. Each later call hands out one
    record and moves the position to the next, so the call that raises does so
    with the position at the first record the client cannot decode.
    """
    taken = 0
    while taken < limit:
        try:
            got = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        except Exception as exc:
            if not _is_record_error(exc):
                raise
            await _step_past(consumer, tp, exc, out)
            return
        records = got.get(tp)
        if not records:
            return  # not fetched again in time: the next call resumes from the position
        out._add(tp, records)
        taken += 1


async def _step_past(
    consumer: FetchingConsumer, tp: TopicPartition, exc: Exception, out: Fetched
) -> None:
    """Decode the batch at `tp`'s position here and seek past it."""
    if tp not in consumer.assignment():
        return  # revoked meanwhile: the next owner meets the record itself
    position = await consumer.position(tp)
    error = type(exc).__name__
    try:
        data = await _fetch_raw(consumer, tp, position)
    except KafkaError:
        return  # the cluster is unwell: the next call tries again from the same position
    decoded = _decode_first_batch(tp, data, position, error)
    if decoded is None:
        # Nothing there we can read (a legacy message set, a truncated answer):
        # give up on this one offset, never on the partition.
        items: list[Item] = [
            Undecodable(tp=tp, offset=position, detail=f"{error}; its batch could not be read")
        ]
        next_offset = position + 1
    else:
        items, next_offset = decoded
    if tp not in consumer.assignment() or await consumer.position(tp) != position:
        return  # revoked or moved while we read: what we decoded is no longer ours to hand out
    out._add(tp, items, next_offset)
    consumer.seek(tp, next_offset)


async def _fetch_raw(consumer: FetchingConsumer, tp: TopicPartition, offset: int) -> bytes:
    """The raw record bytes of `tp` from the batch holding `offset` (at least that batch).

    aiokafka has no public call for undecoded bytes, so this goes through the
    consumer's own client (`_client`), which knows the leader and the connection
    settings. A 1-byte limit still returns the whole first batch (KIP-74).
    Read-uncommitted on purpose: the batch was already handed to the consumer, and
    the partition's transactional filtering was done on it then.
    """
    client: Any = getattr(consumer, "_client")  # noqa: B009 - private, on purpose
    leader = client.cluster.leader_for_partition(tp)
    if leader is None or leader < 0:
        raise IllegalStateError(f"no leader known for {tp}")
    request = FetchRequest(0, 1, 1, _READ_UNCOMMITTED, [(tp.topic, [(tp.partition, offset, 1)])])
    response = await client.send(leader, request)
    for topic, partitions in response.topics:
        for partition, error_code, _highwater, *part_data in partitions:
            if topic == tp.topic and partition == tp.partition:
                error = for_code(error_code)
                if error.errno != 0:
                    raise error(f"raw fetch of {tp}@{offset}")
                return bytes(part_data[-1] or b"")
    return b""


# -- a tolerant v2 record batch decoder -------------------------------------------------


def _decode_first_batch(
    tp: TopicPartition, data: bytes, position: int, error: str
) -> tuple[list[Item], int] | None:
    """The records at or after `position` of the first batch that reaches it.

    Returns the items (records and undecodable ones, in offset order) and the
    offset after the batch, or None when no v2 batch could be found.
    """
    pos = 0
    while pos + _BATCH_HEADER.size <= len(data):
        (base, length, _epoch, magic, crc, attrs, last_delta, first_ts, max_ts, *_rest, count) = (
            _BATCH_HEADER.unpack_from(data, pos)
        )
        end = pos + 12 + length
        if magic != 2 or end > len(data):
            return None
        next_offset = base + last_delta + 1
        if next_offset <= position:
            pos = end
            continue
        start = max(base, position)
        if attrs & _CONTROL:
            return [], next_offset  # a transaction marker: nothing to hand out
        if calc_crc32c(data[pos + _CRC_START : end]) != crc:
            return _whole_batch(tp, start, next_offset, f"{error}; batch CRC mismatch"), next_offset
        try:
            body = _uncompress(attrs & 0x07, data[pos + _BATCH_HEADER.size : end])
        except Exception as exc:
            detail = f"{error}; batch does not decompress ({type(exc).__name__})"
            return _whole_batch(tp, start, next_offset, detail), next_offset
        items, broken_at = _records(tp, body, count, base, attrs, first_ts, max_ts, error)
        items = [item for item in items if item.offset >= start]
        if broken_at is not None:
            # past a record whose framing is broken nothing can be found again
            detail = f"{error}; record framing broken"
            items += _whole_batch(tp, max(broken_at, start), next_offset, detail)
        return items, next_offset
    return None


def _uncompress(codec: int, payload: bytes) -> bytes:
    if codec == 0:
        return payload
    if codec == 1:
        return cast(bytes, codecs.gzip_decode(payload))
    if codec == 2:
        return cast(bytes, codecs.snappy_decode(payload))
    if codec == 3:
        return cast(bytes, codecs.lz4_decode(payload))
    if codec == 4:
        return cast(bytes, codecs.zstd_decode(payload))
    raise UnsupportedCodecError(f"codec {codec}")


def _whole_batch(tp: TopicPartition, start: int, stop: int, detail: str) -> list[Item]:
    """One undecodable entry per offset of a batch none of whose records can be read."""
    return [Undecodable(tp=tp, offset=o, detail=detail) for o in range(start, stop)]


def _records(
    tp: TopicPartition,
    body: bytes,
    count: int,
    base: int,
    attrs: int,
    first_ts: int,
    max_ts: int,
    error: str,
) -> tuple[list[Item], int | None]:
    """The batch's records, and the offset where the framing broke (None if it did not)."""
    items: list[Item] = []
    pos = 0
    log_append = bool(attrs & _TIMESTAMP_LOG_APPEND)
    for _ in range(count):
        try:
            item, pos = _record(tp, body, pos, base, log_append, first_ts, max_ts, error)
        except (IndexError, ValueError):
            return items, (items[-1].offset + 1 if items else base)
        items.append(item)
    return items, None


def _record(
    tp: TopicPartition,
    buf: bytes,
    pos: int,
    base: int,
    log_append: bool,
    first_ts: int,
    max_ts: int,
    error: str,
) -> tuple[Item, int]:
    length, pos = _varint(buf, pos)
    end = pos + length
    if length < 0 or end > len(buf):
        raise ValueError("record length")
    _attrs, pos = _varint(buf, pos)
    ts_delta, pos = _varint(buf, pos)
    offset_delta, pos = _varint(buf, pos)
    key, pos = _bytes(buf, pos)
    value, pos = _bytes(buf, pos)
    count, pos = _varint(buf, pos)
    if count < 0:
        raise ValueError("header count")
    headers: list[tuple[str, bytes | None]] = []
    bad: list[str] = []
    for index in range(count):
        raw_name, pos = _bytes(buf, pos)
        header_value, pos = _bytes(buf, pos)
        if raw_name is None:
            raise ValueError("null header name")
        try:
            headers.append((raw_name.decode("utf-8"), header_value))
        except UnicodeDecodeError:
            bad.append(f"#{index} ({len(raw_name)} bytes)")
    if pos != end:
        raise ValueError("record size")
    offset = base + offset_delta
    timestamp = max_ts if log_append else first_ts + ts_delta
    if not bad:
        record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            timestamp=timestamp,
            timestamp_type=1 if log_append else 0,
            key=key,
            value=value,
            checksum=None,
            serialized_key_size=-1 if key is None else len(key),
            serialized_value_size=-1 if value is None else len(value),
            headers=tuple(headers),
        )
        return record, pos
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (
        Undecodable(
            tp=tp,
            offset=offset,
            detail=f"{error}: header name {names} not UTF-8 (left out)",
            key=key,
            value=value,
            headers=tuple(headers),
            timestamp=timestamp,
        ),
        pos,
    )


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint; IndexError past the end, ValueError when longer than 10 bytes."""
    shift = result = 0
    for _ in range(10):
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
    raise ValueError("varint too long")


def _bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = _varint(buf, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buf):
        raise IndexError("bytes past the end")
    return buf[pos : pos + size], pos + size


def _is_record_error(exc: BaseException) -> bool:
    """An exception from unpacking one record, not from the cluster or the client's state."""
    return isinstance(exc, _RECORD_ERRORS) or (
        isinstance(exc, Exception) and not isinstance(exc, KafkaError)
    )
