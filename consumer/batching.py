"""Batch plans: which offsets of a partition go out together, decided once, recorded first.

Resend's `POST /emails/batch` takes up to 100 emails under one idempotency key.
A retried batch is safe only if it is the same batch (same members, same bytes,
same key), whoever sends it: after a crash, a restart with other settings, or a
rebalance. So how each offset is sent is decided once and written to the
partition's commit metadata (the committed offset unchanged) before anything of
it is sent; the next owner reads it back and honours it before planning anything
new.

What the metadata says (`Plan`):

- `horizon`: every offset below it may have been sent singly already, unless a
  listed batch names it. An owner raises the horizon past a single send before
  sending it. Offsets at or above the horizon were never sent by anyone.
- `batches`: the batches not yet committed past, each as its member offsets and
  the digest of its members' idempotency keys (the batch key is derived from it).

Hence the rules every owner follows, whatever its BATCH_SIZE:

1. an offset named by a recovered batch is sent in that batch, with its key;
2. any other offset below the recovered horizon is sent singly (it may have been);
3. only offsets at or above it are planned afresh.

The encoding is compact text (`rc1|h<horizon>|<digest>.<first>.<runs>|...`, base 36)
and is kept under `PLAN_BUDGET` characters, below Kafka's default
`offset.metadata.max.bytes` (4096). A batch that would not fit waits until
committed batches make room.

`PartitionPlanner` is the pure state machine of one partition within one
assignment: the dispatcher feeds it admitted items in offset order, it answers
with units (a single send or a batch) once their decision is recorded.
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Generic, TypeVar

#: the first field of a plan this version writes
PLAN_VERSION: Final = "rc1"
#: characters of commit metadata a plan may use (Kafka's default limit is 4096 bytes)
PLAN_BUDGET: Final = 3000
#: emails per request Resend accepts on /emails/batch
MAX_BATCH: Final = 100
#: request fields the batch endpoint refuses: such an email is always sent singly
UNBATCHABLE_FIELDS: Final = frozenset({"attachments", "scheduled_at"})
#: the longest a batch may wait to fill (BATCH_LINGER, a route's batch.linger)
MAX_LINGER: Final = 10.0
#: characters of the digest over the member keys (130 bits of SHA-256)
DIGEST_CHARS: Final = 26
#: starts every batch key; no natural idempotency key can start so (see consumer.keys)
BATCH_KEY_PREFIX: Final = ".:batch/"
#: idempotency keys remembered per partition to catch a duplicate publish
DEDUPE_WINDOW: Final = 20_000


class Priority(IntEnum):
    """Who is served first by the shared rate budget (lower first)."""

    URGENT = 0
    NORMAL = 1
    BULK = 2


PRIORITIES: Final = {p.name.lower(): p for p in Priority}


def batch_digest(keys: Iterable[str]) -> str:
    """The digest of a batch's ordered member keys (keys never hold a newline)."""
    raw = hashlib.sha256("\n".join(keys).encode()).digest()
    return base64.b32encode(raw).decode().lower()[:DIGEST_CHARS]


def batch_key(size: int, digest: str) -> str:
    """The idempotency key of a batch: a readable prefix, its size and the digest."""
    return f"{BATCH_KEY_PREFIX}{size}/{digest}"


def _b36(n: int) -> str:
    if n < 0:
        raise ValueError("negative")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """One recorded batch: its member offsets (ascending) and the digest of their keys."""

    members: tuple[int, ...]
    digest: str

    @property
    def key(self) -> str:
        return batch_key(len(self.members), self.digest)

    @property
    def first(self) -> int:
        return self.members[0]

    @property
    def last(self) -> int:
        return self.members[-1]

    def encode(self) -> str:
        runs: list[int] = []
        previous = self.members[0]
        run = 1
        for offset in self.members[1:]:
            if offset == previous + 1:
                run += 1
            else:
                runs += [run, offset - previous - 1]
                run = 1
            previous = offset
        runs.append(run)
        return f"{self.digest}.{_b36(self.first)}.{','.join(_b36(r) for r in runs)}"

    @classmethod
    def decode(cls, text: str) -> PlannedBatch:
        digest, first_text, runs_text = text.split(".")
        if len(digest) != DIGEST_CHARS:
            raise ValueError("digest length")
        offset = int(first_text, 36)
        members: list[int] = []
        for i, part in enumerate(runs_text.split(",")):
            n = int(part, 36)
            if i % 2 == 0:
                if n < 1:
                    raise ValueError("empty run")
                members.extend(range(offset, offset + n))
                offset += n
            else:
                offset += n
        if not 1 <= len(members) <= MAX_BATCH:
            raise ValueError("batch size")
        return cls(tuple(members), digest)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a partition's commit metadata records (see the module docstring)."""

    horizon: int | None = None
    batches: tuple[PlannedBatch, ...] = ()

    def encode(self, floor: int | None = None) -> str:
        """The metadata text, leaving out batches wholly below `floor` (committed past)."""
        kept = [b for b in self.batches if floor is None or b.last >= floor]
        head = f"{PLAN_VERSION}|h{'' if self.horizon is None else _b36(self.horizon)}"
        return "|".join([head, *(b.encode() for b in kept)])

    @classmethod
    def decode(cls, text: str | None) -> Plan | None:
        """The plan in `text`, or None when it is not one (another version wrote it)."""
        if not text or not text.startswith(PLAN_VERSION + "|"):
            return None
        fields = text.split("|")
        try:
            head = fields[1]
            if not head.startswith("h"):
                return None
            horizon = int(head[1:], 36) if len(head) > 1 else None
            batches = tuple(PlannedBatch.decode(f) for f in fields[2:])
        except (ValueError, IndexError):
            return None
        return cls(horizon, batches)


def recover(metadata: str | None, committed: int | None, end: int | None) -> tuple[Plan, bool]:
    """The plan a new owner honours, and whether the metadata was ours.

    Nothing committed: nobody sent anything (every owner records before sending).
    Committed by another writer (an older version, a tool): the previous owner may
    have sent anything up to the end offset singly, so that is the horizon.
    """
    plan = Plan.decode(metadata)
    if plan is not None:
        floor = committed
        batches = tuple(b for b in plan.batches if floor is None or b.last >= floor)
        horizon = plan.horizon
        if committed is not None and (horizon is None or horizon < committed):
            horizon = committed
        return Plan(horizon, batches), True
    if committed is None:
        return Plan(None, ()), False
    return Plan(max(committed, end if end is not None else committed), ()), False


# -- the planner --------------------------------------------------------------------

P = TypeVar("P")


@dataclass(slots=True, eq=False)
class Item(Generic[P]):
    """One admitted, sendable record as the planner sees it."""

    offset: int
    idempotency_key: str
    #: the ordering lane it belongs to (same lane: sent in offset order)
    lane: Hashable
    #: may go in a batch (route allows it, the body is batchable)
    batchable: bool
    #: the largest batch its route allows, and how long to wait to fill one
    batch_size: int = MAX_BATCH
    linger: float = 0.0
    priority: Priority = Priority.NORMAL
    payload: P | None = None


@dataclass(slots=True, eq=False)
class Unit(Generic[P]):
    """What goes out as one request: a single send, or a batch with its recorded key."""

    items: list[Item[P]]
    batch: PlannedBatch | None = None
    #: planned members that are gone from the log (compacted away): sent without them
    missing: tuple[int, ...] = ()

    @property
    def priority(self) -> Priority:
        return min(i.priority for i in self.items)

    @property
    def lanes(self) -> list[Hashable]:
        return list(dict.fromkeys(i.lane for i in self.items))

    @property
    def first(self) -> int:
        return self.items[0].offset


@dataclass(frozen=True, slots=True)
class OpenBatch:
    """What the planner tells of the batch it is filling."""

    members: int
    #: offset of its first member
    first: int
    #: the most members it may take
    size: int
    opened_at: float
    #: its most urgent member's
    priority: Priority
    #: the ordering lanes of its members
    lanes: frozenset[Hashable]


@dataclass(slots=True, eq=False)
class _Open(Generic[P]):
    items: list[Item[P]] = field(default_factory=list)
    lanes: set[Hashable] = field(default_factory=set)
    deadline: float = 0.0
    size: int = MAX_BATCH
    opened_at: float = 0.0
    priority: Priority = Priority.BULK


@dataclass(slots=True, eq=False)
class _Recovered(Generic[P]):
    batch: PlannedBatch
    found: dict[int, Item[P]] = field(default_factory=dict)


class PartitionPlanner(Generic[P]):
    """Decides, once, how each admitted offset of one partition is sent.

    `admit(item, now)` returns units ready to go now (their decision was already
    recorded: recovered batches, singles below the recovered horizon) and whether
    the item duplicates an email that went out in a batch. Other decisions
    wait for `snapshot()` to be committed: `recorded(token)` then returns them.
    `due(now)` closes batches whose linger ran out; `committed(position)` lets go
    of batches Kafka has committed past.
    """

    def __init__(self, recovered: Plan, *, budget: int = PLAN_BUDGET) -> None:
        self._budget = budget
        #: below it, a previous owner may have sent singly (read from the metadata)
        self._recovered_horizon = recovered.horizon
        #: what the last successful commit of this owner (or the previous one) recorded
        self._durable = recovered
        #: recorded batches not committed past yet (recovered ones included)
        self._listed: list[PlannedBatch] = list(recovered.batches)
        self._pending: dict[int, _Recovered[P]] = {}
        for b in recovered.batches:
            assembly = _Recovered[P](b)
            for offset in b.members:
                self._pending[offset] = assembly
        self._open: _Open[P] | None = None
        #: decided, waiting for the commit that records them
        self._unrecorded: list[Unit[P]] = []
        #: batches among them (listed once recorded)
        self._batched_keys: OrderedDict[str, bool] = OrderedDict()  # key -> in a batch

    # -- inputs -------------------------------------------------------------------

    def admit(self, item: Item[P], now: float) -> tuple[list[Unit[P]], bool]:
        """Take the next admitted item; returns (units ready now, is a duplicate).

        A duplicate (an earlier copy of the same idempotency key went out in a
        batch) is not sent: a batch member has no key of its own at Resend.
        """
        ready = self._resolve_before(item.offset)
        assembly = self._pending.pop(item.offset, None)
        if assembly is not None:
            assembly.found[item.offset] = item
            self._remember(item.idempotency_key, True)
            if all(o in assembly.found or o < item.offset for o in assembly.batch.members):
                ready.append(self._assembled(assembly))
            return ready, False
        seen = self._batched_keys.get(item.idempotency_key)
        if seen:
            return ready, True
        if self._recovered_horizon is not None and item.offset < self._recovered_horizon:
            # a previous owner may have sent it singly: so must we (same key)
            self._remember(item.idempotency_key, False)
            ready.append(Unit([item]))
            return ready, False
        if not item.batchable or seen is False:
            self._decide_single(item)
        else:
            self._join(item, now)
        return ready, False

    def due(self, now: float) -> bool:
        """Close the open batch if its linger is over; True if something was decided."""
        if self._open is not None and self._open.deadline <= now:
            self._close()
            return True
        return False

    def deadline(self) -> float | None:
        return self._open.deadline if self._open is not None else None

    def open_batch(self) -> OpenBatch | None:
        """The batch being filled, if any."""
        opened = self._open
        if opened is None:
            return None
        return OpenBatch(
            members=len(opened.items),
            first=opened.items[0].offset,
            size=opened.size,
            opened_at=opened.opened_at,
            priority=opened.priority,
            lanes=frozenset(opened.lanes),
        )

    def flush(self) -> None:
        """Close the open batch now (a revoke drain, a shutdown, an urgent member)."""
        if self._open is not None:
            self._close()

    def passed(self, position: int) -> list[Unit[P]]:
        """The consumer read up to `position`: recovered batches missing members resolve."""
        return self._resolve_before(position)

    # -- recording ----------------------------------------------------------------

    def assembling(self) -> bool:
        """A recovered batch still waits for members: its partition must keep fetching."""
        return bool(self._pending)

    def needs_record(self) -> bool:
        return bool(self._unrecorded)

    def snapshot(self, floor: int | None) -> tuple[str, int, Plan]:
        """The metadata to commit: the recorded plan plus as many new decisions as fit.

        Returns (text, token, plan); pass the token to `recorded` once it is durable.
        """
        listed = [b for b in self._listed if floor is None or b.last >= floor]
        horizon = self._durable.horizon
        taken = 0
        text = Plan(horizon, tuple(listed)).encode()
        while taken < len(self._unrecorded):
            unit = self._unrecorded[taken]
            new_listed = [*listed, unit.batch] if unit.batch is not None else listed
            last = unit.items[-1].offset
            new_horizon = horizon if unit.batch is not None else _max(horizon, last + 1)
            candidate = Plan(new_horizon, tuple(new_listed)).encode()
            if len(candidate) > self._budget:
                if unit.batch is not None and any(b.last > unit.batch.first for b in listed):
                    # Room comes only from commits passing listed batches, and they cannot
                    # pass this one: waiting would never end. Its members go singly
                    # (a single costs no room, only a higher horizon).
                    self._unrecorded[taken : taken + 1] = [Unit([i]) for i in unit.items]
                    for item in unit.items:
                        self._batched_keys[item.idempotency_key] = False
                    continue
                break
            listed, horizon, text = new_listed, new_horizon, candidate
            taken += 1
        return text, taken, Plan(horizon, tuple(listed))

    def recorded(self, token: int, plan: Plan) -> list[Unit[P]]:
        """`snapshot`'s plan is committed: the units it covers may go now."""
        units, self._unrecorded = self._unrecorded[:token], self._unrecorded[token:]
        self._durable = plan
        for unit in units:
            if unit.batch is not None:
                self._listed.append(unit.batch)
        return units

    def safe_position(self, position: int) -> int:
        """The highest commit position at or below `position` that splits no batch.

        A batch is re-sent whole by the next owner (same members, same bytes), so it
        must be able to read every member: the position never lands inside one.
        """
        moved = True
        while moved:
            moved = False
            for b in self._listed:
                if b.first < position <= b.last:
                    position, moved = b.first, True
        for u in self._unrecorded:
            if u.batch is not None and u.batch.first < position <= u.batch.last:
                position = u.batch.first
        return position

    def committed(self, position: int) -> None:
        self._listed = [b for b in self._listed if b.last >= position]

    def metadata(self, floor: int | None) -> str:
        """The plan already recorded, for a commit that records nothing new."""
        listed = tuple(b for b in self._listed if floor is None or b.last >= floor)
        return Plan(self._durable.horizon, listed).encode()

    # -- internals ----------------------------------------------------------------

    def _remember(self, key: str, batched: bool) -> None:
        keys = self._batched_keys
        keys[key] = batched
        keys.move_to_end(key)
        if len(keys) > DEDUPE_WINDOW:
            keys.popitem(last=False)

    def _decide_single(self, item: Item[P]) -> None:
        opened = self._open
        if opened is not None and item.lane in opened.lanes:
            self._close()  # same lane: the batch's members go first, in offset order
        self._remember(item.idempotency_key, False)
        self._unrecorded.append(Unit([item]))

    def _join(self, item: Item[P], now: float) -> None:
        opened = self._open
        if opened is None:
            opened = self._open = _Open[P](
                deadline=now + item.linger, size=item.batch_size, opened_at=now
            )
        else:
            opened.deadline = min(opened.deadline, now + item.linger)
            opened.size = min(opened.size, item.batch_size)
        opened.items.append(item)
        opened.lanes.add(item.lane)
        opened.priority = min(opened.priority, item.priority)
        self._remember(item.idempotency_key, True)
        if len(opened.items) >= opened.size:
            self._close()

    def _close(self) -> None:
        opened = self._open
        assert opened is not None
        self._open = None
        items = opened.items
        if len(items) == 1:
            # alone: sent singly under its own key (which Resend dedupes)
            item = items[0]
            self._remember(item.idempotency_key, False)
            self._unrecorded.append(Unit([item]))
            return
        members = tuple(i.offset for i in items)
        digest = batch_digest(i.idempotency_key for i in items)
        self._unrecorded.append(Unit(items, PlannedBatch(members, digest)))

    def _assembled(self, assembly: _Recovered[P]) -> Unit[P]:
        b = assembly.batch
        for offset in b.members:
            self._pending.pop(offset, None)
        items = [assembly.found[o] for o in b.members if o in assembly.found]
        missing = tuple(o for o in b.members if o not in assembly.found)
        return Unit(items, b, missing)

    def _resolve_before(self, offset: int) -> list[Unit[P]]:
        """Recovered batches whose members below `offset` never came are complete."""
        if not self._pending:
            return []
        ready: list[Unit[P]] = []
        for assembly in list(dict.fromkeys(self._pending.values())):
            if all(o in assembly.found or o < offset for o in assembly.batch.members):
                unit = self._assembled(assembly)
                if unit.items:
                    ready.append(unit)
        return ready


def _max(a: int | None, b: int) -> int:
    return b if a is None else max(a, b)
