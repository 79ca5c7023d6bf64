"""Offset ledger: examples, and property tests against a plain reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from consumer.offsets import OffsetLedger, TopicPartitionKey

TP = TopicPartitionKey("orders", 0)


# -- examples ---------------------------------------------------------------------


def test_out_of_order_completion_commits_contiguous_prefix() -> None:
    """The position is the first unfinished offset until the prefix before it is done."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    for offset in range(10, 15):
        ledger.track(TP, offset)
    assert ledger.position(TP) == 10
    assert ledger.done(TP, 12, gen)
    assert ledger.done(TP, 11, gen)
    assert ledger.position(TP) == 10
    assert ledger.done(TP, 10, gen)
    assert ledger.position(TP) == 13
    assert ledger.done(TP, 13, gen)
    assert ledger.done(TP, 14, gen)
    assert ledger.position(TP) == 15
    assert ledger.to_commit() == {TP: 15}


def test_gaps_in_tracked_offsets_are_jumped() -> None:
    """Offsets never fetched (compaction, transaction markers) do not hold the position."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    for offset in (5, 7, 10):
        ledger.track(TP, offset)
    assert ledger.done(TP, 5, gen)
    assert ledger.position(TP) == 7
    assert ledger.done(TP, 10, gen)
    assert ledger.position(TP) == 7
    assert ledger.done(TP, 7, gen)
    assert ledger.position(TP) == 11


def test_stale_generation_is_ignored_after_reassign() -> None:
    """A completion from an earlier assignment changes nothing in the new one."""
    ledger = OffsetLedger()
    old = ledger.assign(TP)
    ledger.track(TP, 0)
    ledger.revoke(TP)
    assert not ledger.done(TP, 0, old)
    new = ledger.assign(TP)
    assert new != old
    ledger.track(TP, 0)
    assert not ledger.done(TP, 0, old)
    assert ledger.position(TP) == 0
    assert ledger.pending(TP) == 1
    assert ledger.done(TP, 0, new)
    assert ledger.position(TP) == 1


def test_revoke_drops_state_and_pending_counts() -> None:
    """Revoking forgets the partition and its pending offsets."""
    ledger = OffsetLedger()
    ledger.assign(TP)
    other = TopicPartitionKey("orders", 1)
    ledger.assign(other)
    ledger.track_range(TP, 0, 9)
    ledger.track(other, 3)
    assert ledger.total_pending() == 11
    ledger.revoke(TP)
    assert ledger.assigned() == {other}
    assert ledger.pending(TP) == 0
    assert ledger.total_pending() == 1
    assert ledger.position(TP) is None
    assert TP not in ledger.to_commit()


def test_duplicate_and_unknown_done_are_ignored() -> None:
    """Finishing an offset twice, or one never tracked, returns False and counts nothing."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    ledger.track(TP, 4)
    ledger.track(TP, 6)
    assert not ledger.done(TP, 5, gen)
    assert ledger.done(TP, 4, gen)
    assert not ledger.done(TP, 4, gen)
    assert not ledger.done(("missing", 0), 4, gen)
    assert ledger.pending(TP) == 1
    assert ledger.position(TP) == 6


def test_track_must_increase_and_needs_assignment() -> None:
    """Non-increasing offsets and unassigned partitions are programming errors."""
    ledger = OffsetLedger()
    with pytest.raises(KeyError, match="not assigned"):
        ledger.track(TP, 0)
    ledger.assign(TP)
    ledger.track(TP, 5)
    with pytest.raises(ValueError, match="increase"):
        ledger.track(TP, 5)
    with pytest.raises(ValueError, match="increase"):
        ledger.track_range(TP, 3, 8)
    with pytest.raises(ValueError, match="range"):
        ledger.track_range(TP, 9, 8)


def test_commit_positions_never_move_backwards() -> None:
    """to_commit reports only advances, and a lower mark_committed is ignored."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    ledger.track_range(TP, 0, 4)
    ledger.done_range(TP, 0, 2, gen)
    assert ledger.to_commit() == {TP: 3}
    ledger.mark_committed(TP, 3)
    assert ledger.to_commit() == {}
    ledger.mark_committed(TP, 1)
    assert ledger.committed(TP) == 3
    ledger.done(TP, 3, gen)
    assert ledger.to_commit() == {TP: 4}


def test_assign_with_known_committed_position() -> None:
    """A partition assigned at its committed position reports only moves past it."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP, committed=100)
    assert ledger.position(TP) == 100
    assert ledger.to_commit() == {}
    ledger.track(TP, 100)
    ledger.done(TP, 100, gen)
    assert ledger.to_commit() == {TP: 101}


def test_mark_committed_with_stale_generation_is_ignored() -> None:
    """A commit that completes after a reassignment does not touch the new state."""
    ledger = OffsetLedger()
    old = ledger.assign(TP)
    ledger.assign(TP)
    ledger.mark_committed(TP, 50, old)
    assert ledger.committed(TP) is None


def test_batch_range_is_one_unit_with_one_outcome_per_member() -> None:
    """A batch tracked as a range commits only once every member finished."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    ledger.track_range(TP, 0, 99)
    ledger.track_range(TP, 100, 149)
    assert ledger.pending(TP) == 150
    assert ledger.done_range(TP, 100, 149, gen) == 50
    assert ledger.position(TP) == 0
    for offset in range(1, 100):
        assert ledger.done(TP, offset, gen)
    assert ledger.position(TP) == 0
    assert ledger.done(TP, 0, gen)
    assert ledger.position(TP) == 150
    assert ledger.done_range(TP, 0, 99, gen) == 0
    assert ledger.total_pending() == 0


def test_assign_keys_come_back_for_aiokafka_commit() -> None:
    """to_commit and assigned return the TopicPartition objects given to assign."""
    from aiokafka import TopicPartition

    ledger = OffsetLedger()
    gen = ledger.assign(TopicPartition("orders", 0))
    ledger.track(("orders", 0), 1)
    assert ledger.done(TopicPartitionKey("orders", 0), 1, gen)
    commits = ledger.to_commit()
    assert commits == {TP: 2}
    # aiokafka's consumer.commit() rejects keys that are not TopicPartition instances
    assert all(type(key) is TopicPartition for key in commits)
    assert all(type(key) is TopicPartition for key in ledger.assigned())


def test_plain_tuple_keys_come_back_named() -> None:
    """A plain (topic, partition) tuple given to assign comes back as a TopicPartitionKey."""
    ledger = OffsetLedger()
    gen = ledger.assign(("orders", 3))
    ledger.track(("orders", 3), 0)
    ledger.done(("orders", 3), 0, gen)
    [key] = ledger.to_commit()
    assert isinstance(key, TopicPartitionKey)
    assert (key.topic, key.partition) == ("orders", 3)


def test_repr_shows_live_counters() -> None:
    """The repr carries partition, pending and done counts."""
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    ledger.track_range(TP, 0, 2)
    ledger.done(TP, 1, gen)
    assert repr(ledger) == "<OffsetLedger partitions=1 pending=2 done=1 ignored=0>"


# -- properties -------------------------------------------------------------------


@st.composite
def offsets_and_completion_order(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    gaps = draw(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=60))
    start = draw(st.integers(min_value=0, max_value=1_000))
    offsets = []
    current = start
    for gap in gaps:
        offsets.append(current)
        current += gap
    order = draw(st.permutations(offsets))
    return offsets, list(order)


@given(offsets_and_completion_order())
def test_position_is_first_unfinished_or_last_plus_one(case: tuple[list[int], list[int]]) -> None:
    """For any completion order the position matches the definition and never decreases."""
    offsets, order = case
    ledger = OffsetLedger()
    gen = ledger.assign(TP)
    for offset in offsets:
        ledger.track(TP, offset)
    finished: set[int] = set()
    last = ledger.position(TP)
    for offset in order:
        assert ledger.done(TP, offset, gen)
        finished.add(offset)
        unfinished = [o for o in offsets if o not in finished]
        expected = unfinished[0] if unfinished else offsets[-1] + 1
        position = ledger.position(TP)
        assert position == expected
        assert last is not None
        assert position >= last
        last = position
        assert ledger.pending(TP) == len(unfinished)
    assert ledger.total_pending() == 0


class _ModelPartition:
    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.tracked: list[int] = []
        self.done: set[int] = set()
        self.committed: int | None = None

    def position(self) -> int | None:
        unfinished = [o for o in self.tracked if o not in self.done]
        if unfinished:
            computed: int | None = unfinished[0]
        elif self.tracked:
            computed = self.tracked[-1] + 1
        else:
            computed = None
        if computed is None:
            return self.committed
        if self.committed is not None:
            return max(self.committed, computed)
        return computed


PARTITIONS = [TopicPartitionKey("a", 0), TopicPartitionKey("a", 1), TopicPartitionKey("b", 0)]


class LedgerMachine(RuleBasedStateMachine):
    """Random assign/track/done/revoke/commit sequences agree with a naive model."""

    generations = Bundle("generations")

    def __init__(self) -> None:
        super().__init__()
        self.ledger = OffsetLedger()
        self.model: dict[TopicPartitionKey, _ModelPartition] = {}
        self.high_water: dict[TopicPartitionKey, int] = {}
        self.next_offset: dict[TopicPartitionKey, int] = dict.fromkeys(PARTITIONS, 0)

    @rule(target=generations, tp=st.sampled_from(PARTITIONS))
    def assign(self, tp: TopicPartitionKey) -> tuple[TopicPartitionKey, int]:
        gen = self.ledger.assign(tp)
        for model in self.model.values():
            assert gen > model.generation
        self.model[tp] = _ModelPartition(gen)
        self.high_water.pop(tp, None)
        return tp, gen

    @rule(tp=st.sampled_from(PARTITIONS))
    def revoke(self, tp: TopicPartitionKey) -> None:
        self.ledger.revoke(tp)
        self.model.pop(tp, None)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), gap=st.integers(0, 3), size=st.integers(1, 5))
    def track(self, data: st.DataObject, gap: int, size: int) -> None:
        tp = data.draw(st.sampled_from(sorted(self.model)))
        model = self.model[tp]
        first = (model.tracked[-1] + 1 if model.tracked else self.next_offset[tp]) + gap
        last = first + size - 1
        if size == 1:
            self.ledger.track(tp, first)
        else:
            self.ledger.track_range(tp, first, last)
        model.tracked.extend(range(first, last + 1))

    @precondition(lambda self: any(m.tracked for m in self.model.values()))
    @rule(data=st.data())
    def done_current(self, data: st.DataObject) -> None:
        tp = data.draw(st.sampled_from(sorted(tp for tp, m in self.model.items() if m.tracked)))
        model = self.model[tp]
        offset = data.draw(st.sampled_from(model.tracked))
        accepted = self.ledger.done(tp, offset, model.generation)
        assert accepted == (offset not in model.done)
        model.done.add(offset)

    @rule(handle=consumes(generations), data=st.data())
    def done_with_old_token(
        self, handle: tuple[TopicPartitionKey, int], data: st.DataObject
    ) -> None:
        tp, gen = handle
        model = self.model.get(tp)
        if model is not None and model.generation == gen:
            return  # still current: covered by done_current
        # Prefer an offset the current assignment really has pending: the dangerous case.
        pending = [o for o in model.tracked if o not in model.done] if model else []
        offset = data.draw(st.sampled_from(pending) if pending else st.integers(0, 40))
        assert not self.ledger.done(tp, offset, gen)

    @rule()
    def commit(self) -> None:
        for tp, position in self.ledger.to_commit().items():
            model = self.model[tp]
            assert model.committed is None or position > model.committed
            self.ledger.mark_committed(tp, position)
            model.committed = position

    @rule(tp=st.sampled_from(PARTITIONS), position=st.integers(0, 40))
    def late_lower_commit(self, tp: TopicPartitionKey, position: int) -> None:
        self.ledger.mark_committed(tp, position)
        model = self.model.get(tp)
        if model is not None and (model.committed is None or position > model.committed):
            model.committed = position

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.ledger.assigned() == set(self.model)
        total = 0
        for tp, model in self.model.items():
            assert self.ledger.position(tp) == model.position()
            pending = len([o for o in model.tracked if o not in model.done])
            assert self.ledger.pending(tp) == pending
            total += pending
        assert self.ledger.total_pending() == total

    @invariant()
    def positions_never_move_backwards_within_an_assignment(self) -> None:
        for tp in self.model:
            position = self.ledger.position(tp)
            if position is None:
                continue
            assert position >= self.high_water.get(tp, position)
            self.high_water[tp] = position


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ledger_state_machine = LedgerMachine.TestCase
