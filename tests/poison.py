"""Poison records, written to a real broker exactly as other producers write them.

aiokafka's own producer cannot write most of these (it encodes header names from
`str`, asserts a key or a value, compresses whole batches of its own making), so
this helper builds the v2 record batch bytes itself and sends them with a plain
ProduceRequest: the same bytes a librdkafka (or Java) producer with idempotence
off puts on the wire. The broker checks the batch (CRC, record framing, sizes)
and stores it as it is; header names are opaque bytes to it.

    batch = encode_batch([Raw(value=b"..."), Raw(headers=[(b"\\xff", b"x")])])
    await produce_batch(bootstrap, topic, partition, batch)

`POISON_KINDS` names every kind the issue lists; `poison_records(kind)` builds it.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, LeaderNotAvailableError, for_code
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.util import calc_crc32c

#: attributes bits of a v2 batch (codec in bits 0-2)
CODEC_NONE: Final = 0
CODEC_GZIP: Final = 1
#: Kafka's default message.max.bytes (and a topic's max.message.bytes): 1 MiB + 12
BROKER_LIMIT: Final = 1_048_588

POISON_KINDS: Final = (
    "bad_header_name",  # a header name that is not UTF-8
    "null_key_value",  # neither key nor value
    "near_limit",  # a keyless value just under 1 MiB
    "gzip_bomb",  # ~150 KB of gzip on the wire, ~150 MB once decompressed
    "many_headers",  # 10,000 headers
    "deep_json",  # 20,000 nested arrays
)
BOMB_BYTES: Final = 150 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Raw:
    """One record as bytes on the wire: header names are bytes, not text."""

    key: bytes | None = None
    value: bytes | None = None
    headers: Sequence[tuple[bytes, bytes | None]] = ()
    #: a value of this many repeated `fill` bytes, streamed (never built in memory)
    value_size: int | None = None
    fill: bytes = b"A"
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))


def varint(n: int) -> bytes:
    """Kafka's zigzag varint (also used for varlongs)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _nullable(data: bytes | None) -> bytes:
    return varint(-1) if data is None else varint(len(data)) + data


def _record_chunks(raw: Raw, offset_delta: int, base_ts: int) -> Iterator[bytes]:
    """The record's bytes, in chunks: a huge streamed value is never one object."""
    head = b"\x00" + varint(raw.timestamp_ms - base_ts) + varint(offset_delta) + _nullable(raw.key)
    tail = bytearray(varint(len(raw.headers)))
    for name, value in raw.headers:
        tail += varint(len(name)) + name + _nullable(value)
    if raw.value_size is None:
        body = [_nullable(raw.value)]
        size = len(body[0])
    else:
        body = []
        size = len(varint(raw.value_size)) + raw.value_size
    length = len(head) + size + len(tail)
    yield varint(length) + head
    if raw.value_size is None:
        yield from body
    else:
        yield varint(raw.value_size)
        chunk = raw.fill * (1 << 20)
        left = raw.value_size
        while left:
            piece = chunk[: min(left, len(chunk))]
            left -= len(piece)
            yield piece
    yield bytes(tail)


def encode_batch(records: Sequence[Raw], *, codec: int = CODEC_NONE) -> bytes:
    """A magic-2 record batch (base offset 0, no producer id) holding `records`."""
    assert records
    base_ts = min(r.timestamp_ms for r in records)
    max_ts = max(r.timestamp_ms for r in records)
    if codec == CODEC_GZIP:
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member, as librdkafka
        parts = [
            gz.compress(chunk)
            for i, r in enumerate(records)
            for chunk in _record_chunks(r, i, base_ts)
        ]
        parts.append(gz.flush())
    else:
        assert codec == CODEC_NONE
        parts = [chunk for i, r in enumerate(records) for chunk in _record_chunks(r, i, base_ts)]
    body = b"".join(parts)
    # attributes .. records: the part the CRC-32C covers
    after_crc = (
        struct.pack(">hiqqqhii", codec, len(records) - 1, base_ts, max_ts, -1, -1, -1, len(records))
        + body
    )
    crc = calc_crc32c(after_crc)
    after_length = struct.pack(">ibI", -1, 2, crc) + after_crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


async def produce_batch(bootstrap: str, topic: str, partition: int, batch: bytes) -> None:
    """Append one batch to a partition with acks=all; raise the broker's error if refused.

    Retriable refusals (a topic created a moment ago has no leader yet) are retried.
    """
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    tp = TopicPartition(topic, partition)
    try:
        for attempt in range(50):
            await client._wait_on_metadata(topic)
            leader = client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                error: type[KafkaError] = LeaderNotAvailableError
            else:
                request = ProduceRequest(
                    transactional_id=None,
                    required_acks=-1,
                    timeout=30_000,
                    topics=[(topic, [(partition, batch)])],
                )
                response = await client.send(leader, request)
                error = for_code(response.topics[0][1][0][1])
                if error.errno == 0:
                    return
            if not error.retriable or attempt == 49:
                raise error(f"{topic}[{partition}] refused the batch")
            await client.force_metadata_update()
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def poison_records(kind: str) -> list[Raw]:
    """The records of one poison kind (one record each; `gzip_bomb` needs `CODEC_GZIP`)."""
    if kind == "bad_header_name":
        # Latin-1 "é" then a lone continuation byte: what a C producer passing raw bytes writes
        return [
            Raw(key=b"bad-header", value=b'{"x":1}', headers=[(b"ok", b"1"), (b"\xe9\x80", b"v")])
        ]
    if kind == "null_key_value":
        return [Raw(key=None, value=None)]
    if kind == "near_limit":
        # one record in a batch: 61 bytes of batch header + ~10 of record framing
        return [Raw(key=None, value_size=1_048_576 - 200, fill=b"x")]
    if kind == "gzip_bomb":
        return [Raw(key=b"bomb", value_size=BOMB_BYTES, fill=b"\x00")]
    if kind == "many_headers":
        headers = [(f"h{i:05d}".encode(), b"v") for i in range(10_000)]
        return [Raw(key=b"headers", value=b'{"x":1}', headers=headers)]
    if kind == "deep_json":
        return [Raw(key=b"deep", value=b"[" * 20_000 + b"]" * 20_000)]
    raise ValueError(kind)


def codec_for(kind: str) -> int:
    return CODEC_GZIP if kind == "gzip_bomb" else CODEC_NONE
