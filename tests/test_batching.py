"""Batch plans: the metadata codec, recovery rules and the planner, as pure logic.

The property test plays an owner that crashes at any point and a next owner with
other batch settings: every offset the first one sent must be sent by the second
in exactly the same way (same batch key and members, or singly under its own key).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.batching import (
    BATCH_KEY_PREFIX,
    MAX_BATCH,
    PLAN_BUDGET,
    Item,
    PartitionPlanner,
    Plan,
    PlannedBatch,
    Priority,
    Unit,
    batch_digest,
    batch_key,
    recover,
)
from consumer.keys import KEY_PATTERN, MAX_KEY_LENGTH


def item(
    offset: int,
    *,
    lane: object = None,
    batchable: bool = True,
    size: int = 100,
    linger: float = 1.0,
    key: str | None = None,
) -> Item[None]:
    return Item(
        offset=offset,
        idempotency_key=key or f"order:{offset}",
        lane=lane if lane is not None else ("k", offset),
        batchable=batchable,
        batch_size=size,
        linger=linger,
    )


def record(
    planner: PartitionPlanner[None], floor: int | None = None
) -> tuple[str, list[Unit[None]]]:
    text, token, plan = planner.snapshot(floor)
    return text, planner.recorded(token, plan)


# -- codec ------------------------------------------------------------------------


@given(
    st.sets(st.integers(min_value=0, max_value=10**13), min_size=1, max_size=MAX_BATCH),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10**13)),
)
@settings(max_examples=300, deadline=None)
def test_a_plan_survives_its_text(members: set[int], horizon: int | None) -> None:
    """Any member set and horizon decode to exactly what was encoded."""
    batch = PlannedBatch(tuple(sorted(members)), batch_digest(str(m) for m in sorted(members)))
    plan = Plan(horizon, (batch,))
    assert Plan.decode(plan.encode()) == plan


@pytest.mark.parametrize(
    "text",
    [
        "",
        "resend-consumer/0.3.0",
        "rc1",
        "rc1|x",
        "rc1|h1|zz.0.1",
        "rc1|h1|" + "a" * 26 + ".0.0",
        "rc2|h1",
    ],
)
def test_text_that_is_not_a_plan_of_ours_decodes_to_none(text: str) -> None:
    """Metadata written by another version or tool, or damaged, is not taken for a plan."""
    assert Plan.decode(text) is None


def test_a_batch_key_is_a_valid_resend_key_no_natural_key_can_equal() -> None:
    """The key fits Resend's limit and the project's character set, and starts with `.:`."""
    key = batch_key(100, batch_digest(f"k{i}" for i in range(100)))
    assert key.startswith(BATCH_KEY_PREFIX)
    assert len(key) <= MAX_KEY_LENGTH
    assert KEY_PATTERN.match(key)
    assert batch_digest(["a", "b"]) != batch_digest(["b", "a"])


def test_a_full_budget_holds_dozens_of_batches_of_a_hundred() -> None:
    """Contiguous batches of 100 at 13-digit offsets take under 40 characters each."""
    base = 10**12
    batches = tuple(
        PlannedBatch(tuple(range(base + i * 100, base + i * 100 + 100)), batch_digest([str(i)]))
        for i in range(70)
    )
    assert len(Plan(base, batches).encode()) < PLAN_BUDGET


# -- recovery ---------------------------------------------------------------------


def test_recovery_of_a_plan_of_ours_drops_what_was_committed_past() -> None:
    """Batches wholly below the committed offset are done; the horizon never lags it."""
    old = PlannedBatch((3, 4), batch_digest("ab"))
    live = PlannedBatch((8, 9), batch_digest("cd"))
    plan, ours = recover(Plan(5, (old, live)).encode(), committed=7, end=20)
    assert ours
    assert plan == Plan(7, (live,))


def test_metadata_of_another_writer_makes_everything_up_to_the_end_single() -> None:
    """An older version may have sent anything it had read: all of it goes singly."""
    plan, ours = recover("resend-consumer/0.4.0", committed=10, end=50)
    assert not ours
    assert plan == Plan(50, ())
    planner: PartitionPlanner[None] = PartitionPlanner(plan)
    units, dup = planner.admit(item(10), now=0.0)
    assert not dup
    assert [u.batch for u in units] == [None]


def test_nothing_committed_means_nothing_was_sent() -> None:
    """A fresh group plans from the first offset it reads."""
    plan, ours = recover(None, committed=None, end=50)
    assert plan == Plan(None, ())
    assert not ours


# -- the planner ------------------------------------------------------------------


def test_a_batch_closes_when_full_and_goes_only_once_recorded() -> None:
    """Members wait for the commit that records the batch, then go as one unit."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    for offset in range(3):
        units, _ = planner.admit(item(offset, size=3), now=0.0)
        assert units == []
    assert planner.needs_record()
    text, units = record(planner)
    assert [[i.offset for i in u.items] for u in units] == [[0, 1, 2]]
    batch = units[0].batch
    assert batch is not None
    assert Plan.decode(text) == Plan(None, (batch,))
    assert not planner.needs_record()


def test_linger_closes_a_partial_batch_and_a_lone_member_goes_singly() -> None:
    """A batch of one is a single send under the event's own key."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    planner.admit(item(0, linger=0.5), now=0.0)
    assert not planner.due(0.4)
    assert planner.due(0.5)
    text, units = record(planner)
    assert units[0].batch is None
    assert Plan.decode(text) == Plan(1, ())


def test_a_single_in_the_lane_of_the_open_batch_closes_it_first() -> None:
    """Same key lane: the batch holding the earlier member goes before the single."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    planner.admit(item(0, lane="a"), now=0.0)
    planner.admit(item(1, lane="b"), now=0.0)
    planner.admit(item(2, lane="a", batchable=False), now=0.0)
    _, units = record(planner)
    assert [([i.offset for i in u.items], u.batch is not None) for u in units] == [
        ([0, 1], True),
        ([2], False),
    ]


def test_a_single_in_another_lane_does_not_wait_for_the_open_batch() -> None:
    """The horizon may pass open members: a crash now sends them singly, never both ways."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    planner.admit(item(0, lane="a"), now=0.0)
    planner.admit(item(1, lane="b", batchable=False), now=0.0)
    text, units = record(planner)
    assert [u.items[0].offset for u in units] == [1]
    assert Plan.decode(text) == Plan(2, ())
    planner.admit(item(2, lane="c"), now=0.0)
    planner.flush()
    text, units = record(planner)
    plan = Plan.decode(text)
    assert plan is not None
    assert [b.members for b in plan.batches] == [(0, 2)]


def test_a_duplicate_of_a_batched_email_is_not_sent_again() -> None:
    """A batch member has no key of its own at Resend: the second copy is caught here."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    planner.admit(item(0, key="order:7"), now=0.0)
    _, dup = planner.admit(item(1, key="order:7"), now=0.0)
    assert dup


def test_a_duplicate_of_a_single_goes_singly_under_the_same_key() -> None:
    """Resend dedupes singles by key, so the copy is sent singly, never in a batch."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan())
    planner.admit(item(0, key="order:7", batchable=False), now=0.0)
    units, dup = planner.admit(item(1, key="order:7"), now=0.0)
    assert not dup
    planner.flush()
    _, units = record(planner)
    assert [u.batch for u in units] == [None, None]


def test_the_budget_holds_a_batch_back_until_commits_make_room() -> None:
    """A plan never outgrows the metadata budget; committed batches free their room."""
    planner: PartitionPlanner[None] = PartitionPlanner(Plan(), budget=90)
    for offset in range(6):
        planner.admit(item(offset, size=2), now=0.0)
    text, units = record(planner)
    assert len(text) <= 90
    assert len(units) == 2
    _, units = record(planner)
    assert units == []
    planner.committed(4)
    text, units = record(planner, floor=4)
    assert [u.first for u in units] == [4]
    plan = Plan.decode(text)
    assert plan is not None
    assert [b.members for b in plan.batches] == [(4, 5)]


def test_a_recovered_batch_missing_a_compacted_member_goes_without_it() -> None:
    """Members compacted away are skipped once the consumer reads past them."""
    batch = PlannedBatch((3, 4, 5), batch_digest(["a", "b", "c"]))
    planner: PartitionPlanner[None] = PartitionPlanner(Plan(6, (batch,)))
    assert planner.admit(item(3), now=0.0)[0] == []
    units, _ = planner.admit(item(6), now=0.0)  # 4 and 5 are gone
    assert [(u.batch, u.missing, [i.offset for i in u.items]) for u in units[:1]] == [
        (batch, (4, 5), [3])
    ]


def test_urgent_priority_orders_units() -> None:
    """A unit's priority is its most urgent member's."""
    a, b = item(0), item(1)
    b.priority = Priority.URGENT
    assert Unit([a, b]).priority is Priority.URGENT


# -- crash safety -----------------------------------------------------------------


def _owner(
    rng: random.Random,
    plan: Plan,
    keys: list[str],
    lanes: list[str],
    batchable: list[bool],
    start: int,
    *,
    size: int,
    linger: float,
    crash_at: int | None,
) -> tuple[dict[int, str], str, int]:
    """Play one owner from `start`; returns {offset: how it went}, the metadata, the committed."""
    planner: PartitionPlanner[None] = PartitionPlanner(plan)
    sent: dict[int, str] = {}
    committed = start
    metadata = plan.encode()
    now = 0.0

    def send(units: list[Unit[None]]) -> None:
        for u in units:
            way = u.batch.key if u.batch is not None else "single:" + u.items[0].idempotency_key
            for i in u.items:
                assert i.offset not in sent, "an offset sent twice by one owner"
                sent[i.offset] = way

    for steps, offset in enumerate(range(start, len(keys)), start=1):
        if crash_at is not None and steps > crash_at:
            return sent, metadata, committed
        units, dup = planner.admit(
            Item(offset, keys[offset], lanes[offset], batchable[offset], size, linger), now
        )
        assert not dup
        send(units)
        now += rng.choice((0.0, 0.1, 0.3))
        planner.due(now)
        if rng.random() < 0.4:
            text, token, new = planner.snapshot(committed)
            metadata = text
            send(planner.recorded(token, new))
            while committed in sent:  # a commit covers what was sent (acknowledged)
                committed += 1
            planner.committed(committed)
            metadata = planner.metadata(committed)
    planner.flush()
    for _ in range(200):
        planner.due(now + 10**6)
        passed = planner.passed(len(keys))
        send(passed)
        if not planner.needs_record():
            break
        text, token, new = planner.snapshot(committed)
        send(planner.recorded(token, new))
        metadata = planner.metadata(committed)
    return sent, metadata, committed


@pytest.mark.parametrize("seed", range(300))
def test_a_crash_and_a_restart_with_other_settings_send_each_offset_one_way(seed: int) -> None:
    """Whatever the first owner sent, the next owner sends the same way: no email twice."""
    rng = random.Random(seed)
    n = rng.randint(5, 400)
    keys = [f"order:{i}" for i in range(n)]
    lanes = [rng.choice("abcdefgh") for _ in range(n)]
    batchable = [rng.random() < 0.85 for _ in range(n)]
    first, metadata, committed = _owner(
        rng,
        Plan(),
        keys,
        lanes,
        batchable,
        0,
        size=rng.choice((1, 2, 10, 100)),
        linger=rng.choice((0.0, 0.2, 1.0)),
        crash_at=rng.randint(0, n),
    )
    plan, ours = recover(metadata, committed, end=n)
    assert ours or not first
    second, _, _ = _owner(
        rng,
        plan,
        keys,
        lanes,
        batchable,
        committed,
        size=rng.choice((1, 3, 50, 100)),
        linger=rng.choice((0.0, 0.5)),
        crash_at=None,
    )
    assert set(range(committed, n)) <= set(second), "an offset was never sent"
    for offset, way in first.items():
        if offset >= committed:
            assert second[offset] == way, f"offset {offset}: {way} then {second[offset]}"
