"""Per-partition offset ledger: which offsets may be committed (pure logic, no I/O).

Events of one partition finish out of order (lanes per key, retries, dead
letters), but Kafka stores one position per partition: the next offset to
consume. The ledger turns out-of-order completions into that position:

    tracked   5 6 7   9 10        (8 was never fetched: compaction, txn marker)
    done      5   7   9
    position  6                   first tracked offset not yet done
    ... done 6 -> position 8 -> jumps the gap 8 -> position 10
    ... done 10 -> nothing pending -> position 11 (last tracked + 1)

Rules the pipeline relies on:

- `assign(tp)` starts a new *generation* for the partition and forgets its old
  state; `done()` calls that carry an older generation (a send that finished
  after its partition was revoked and reassigned) are ignored and return False.
- Positions only move forward: `to_commit()` reports a partition only when its
  position passed the last `mark_committed()` one, and a lower
  `mark_committed()` is ignored.
- A contiguous run of offsets (a batch: one request, one outcome per member)
  can be tracked with `track_range()` and finished with `done_range()`; it is
  stored as one span, so a batch costs O(1) memory beyond its pending members.

Cost: `track` and `done` are O(1) amortized. State per partition is a deque of
spans of contiguous tracked offsets (one span while nothing is skipped) and the
set of unfinished offsets, whose size back-pressure bounds.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, cast


class TopicPartitionKey(NamedTuple):
    """A partition of a topic; equal to and hashed like the plain tuple (topic, partition).

    The ledger hands back the very key objects given to `assign()` (aiokafka's
    `TopicPartition` in the pipeline, which `consumer.commit()` insists on); a plain
    tuple given to `assign()` comes back as a `TopicPartitionKey`.
    """

    topic: str
    partition: int


class _Partition:
    """Ledger state of one assigned partition within one generation."""

    __slots__ = ("committed", "generation", "last_tracked", "pending", "spans")

    def __init__(self, generation: int, committed: int | None) -> None:
        self.generation = generation
        #: [first, last] runs of contiguous tracked offsets, oldest first. The head span's
        #: first member is always unfinished (finished heads are popped at once).
        self.spans: deque[list[int]] = deque()
        #: tracked offsets not finished yet
        self.pending: set[int] = set()
        self.last_tracked: int | None = None
        self.committed = committed

    def position(self) -> int | None:
        if self.spans:
            computed: int | None = self.spans[0][0]
        elif self.last_tracked is not None:
            computed = self.last_tracked + 1
        else:
            computed = None
        if computed is None:
            return self.committed
        if self.committed is not None and self.committed > computed:
            # Never report a position behind what Kafka already holds.
            return self.committed
        return computed

    def add(self, first: int, last: int) -> None:
        if self.last_tracked is not None and first <= self.last_tracked:
            raise ValueError(
                f"offsets must increase per partition: {first} after {self.last_tracked}"
            )
        if self.spans and self.spans[-1][1] + 1 == first:
            self.spans[-1][1] = last
        else:
            self.spans.append([first, last])
        self.pending.update(range(first, last + 1))
        self.last_tracked = last

    def finish(self, offset: int) -> bool:
        if offset not in self.pending:
            return False
        self.pending.discard(offset)
        self._advance()
        return True

    def _advance(self) -> None:
        spans, pending = self.spans, self.pending
        # Each offset is stepped over once in its life: O(1) amortized per offset.
        while spans:
            head = spans[0]
            while head[0] <= head[1] and head[0] not in pending:
                head[0] += 1
            if head[0] <= head[1]:
                return
            spans.popleft()


class OffsetLedger:
    """Committable positions of every assigned partition.

    Not thread-safe; the pipeline calls it from its one event loop.
    """

    __slots__ = ("_done", "_generation", "_ignored", "_parts", "_pending")

    def __init__(self) -> None:
        # Keys are the objects given to assign(); lookups take any equal tuple
        # without building a new key on the hot path.
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._generation = 0
        self._pending = 0
        self._done = 0
        self._ignored = 0

    def __repr__(self) -> str:
        return (
            f"<OffsetLedger partitions={len(self._parts)} pending={self._pending} "
            f"done={self._done} ignored={self._ignored}>"
        )

    # -- assignment -------------------------------------------------------------

    def assign(self, tp: tuple[str, int], *, committed: int | None = None) -> int:
        """Start tracking `tp` afresh; returns the generation token for its `done()` calls.

        `committed`, when known, is the position Kafka already holds: `to_commit()`
        reports `tp` only once it moves past it.
        """
        # Keep the caller's named tuple (aiokafka's TopicPartition) so to_commit() keys
        # can go straight into consumer.commit(); name a plain tuple's fields.
        key = TopicPartitionKey(*tp) if type(tp) is tuple else tp
        self.revoke(key)
        self._generation += 1
        self._parts[key] = _Partition(self._generation, committed)
        return self._generation

    def revoke(self, tp: tuple[str, int]) -> None:
        """Forget `tp`; later completions of its events are ignored."""
        part = self._parts.pop(tp, None)
        if part is not None:
            self._pending -= len(part.pending)

    def assigned(self) -> set[TopicPartitionKey]:
        """Assigned partitions, as the key objects given to `assign()`."""
        return cast("set[TopicPartitionKey]", set(self._parts))

    def generation(self, tp: tuple[str, int]) -> int | None:
        """The current generation of `tp`, or None when it is not assigned."""
        part = self._parts.get(tp)
        return None if part is None else part.generation

    # -- events -----------------------------------------------------------------

    def track(self, tp: tuple[str, int], offset: int) -> None:
        """Record a fetched offset. Offsets must increase per partition; gaps are fine.

        Raises KeyError if `tp` is not assigned (records of a revoked partition must
        be dropped before they get here) and ValueError if `offset` does not increase.
        """
        self.track_range(tp, offset, offset)

    def track_range(self, tp: tuple[str, int], first: int, last: int) -> None:
        """Record the contiguous offsets first..last (inclusive) as fetched, e.g. one batch."""
        if first < 0 or last < first:
            raise ValueError(f"not an offset range: {first}..{last}")
        part = self._part(tp)
        part.add(first, last)
        self._pending += last - first + 1

    def done(self, tp: tuple[str, int], offset: int, generation: int) -> bool:
        """Mark `offset` finished. False (and nothing changes) when the generation is
        stale, `tp` is not assigned, or the offset is not pending (unknown or already done).
        """
        part = self._parts.get(tp)
        if part is None or part.generation != generation or not part.finish(offset):
            self._ignored += 1
            return False
        self._pending -= 1
        self._done += 1
        return True

    def done_range(self, tp: tuple[str, int], first: int, last: int, generation: int) -> int:
        """Mark first..last finished (one outcome per member); returns how many were pending."""
        part = self._parts.get(tp)
        if part is None or part.generation != generation:
            self._ignored += last - first + 1
            return 0
        finished = 0
        for offset in range(first, last + 1):
            if offset in part.pending:
                part.pending.discard(offset)
                finished += 1
        # One advance for the whole run rather than one per member.
        part._advance()
        self._pending -= finished
        self._done += finished
        self._ignored += (last - first + 1) - finished
        return finished

    # -- back-pressure ----------------------------------------------------------

    def pending(self, tp: tuple[str, int]) -> int:
        """Tracked-but-unfinished offsets of `tp` (0 when not assigned)."""
        part = self._parts.get(tp)
        return 0 if part is None else len(part.pending)

    def total_pending(self) -> int:
        return self._pending

    # -- commits ----------------------------------------------------------------

    def position(self, tp: tuple[str, int]) -> int | None:
        """Next offset to consume that may be committed now; None if nothing is known."""
        part = self._parts.get(tp)
        return None if part is None else part.position()

    def to_commit(self) -> dict[TopicPartitionKey, int]:
        """Positions that moved past the last committed one, keyed by the `assign()` keys."""
        out: dict[TopicPartitionKey, int] = {}
        for key, part in self._parts.items():
            pos = part.position()
            if pos is not None and (part.committed is None or pos > part.committed):
                out[cast(TopicPartitionKey, key)] = pos
        return out

    def mark_committed(
        self, tp: tuple[str, int], position: int, generation: int | None = None
    ) -> None:
        """Record a successful commit. Lower positions, unassigned partitions and (when
        given) stale generations are ignored.
        """
        part = self._parts.get(tp)
        if part is None or (generation is not None and part.generation != generation):
            return
        if part.committed is None or position > part.committed:
            part.committed = position

    def committed(self, tp: tuple[str, int]) -> int | None:
        """The last position recorded by `mark_committed` (or `assign`) for `tp`."""
        part = self._parts.get(tp)
        return None if part is None else part.committed

    def _part(self, tp: tuple[str, int]) -> _Partition:
        part = self._parts.get(tp)
        if part is None:
            raise KeyError(f"partition {tp[0]}[{tp[1]}] is not assigned")
        return part
