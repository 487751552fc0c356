"""The schedule without a broker: one trigger rule for phases and faults, and the hold's closed loop."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from harness.scenario import Trigger
from harness.schedule import MAX_TARGET, HoldController, backlog_size, is_due, stage_matches


@dataclass
class State:
    counts: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)  # instance -> queues
    names: set = field(default_factory=set)
    tags: dict = field(default_factory=dict)  # live per-scan queue -> its tag
    window: float = 2.0

    def ready(self, queue):
        return self.counts.get(queue)

    def consuming(self, stage, queue):
        return any(stage_matches(stage, i) and queue in qs for i, qs in self.consumers.items())

    def consuming_tag(self, stage, tag):
        return any(self.consuming(stage, queue) for queue, queue_tag in self.tags.items() if queue_tag == tag)

    def happened(self, name):
        return name in self.names


def test_time_and_trigger_must_both_hold():
    when = Trigger(stage="worker", consuming="bottom")
    busy = State(consumers={"worker": {"first", "bottom"}})
    assert not is_due(2.0, when, 1.0, busy)            # too early
    assert not is_due(0.0, when, 5.0, State())         # nobody consumes bottom
    assert is_due(2.0, when, 2.0, busy)
    assert is_due(3.0, None, 3.0, State())


def test_every_condition_of_a_trigger_must_hold():
    when = Trigger(queue="q", ready_at_least=5, stage="worker", consuming="q", after="backlog")
    state = State(counts={"q": 7}, consumers={"worker#2": {"q"}})
    assert not is_due(0, when, 1, state)
    state.names.add("backlog")
    assert is_due(0, when, 1, state)
    state.counts["q"] = 4
    assert not is_due(0, when, 1, state)


def test_consuming_tag_holds_while_the_stage_consumes_a_live_per_scan_queue_of_that_tag():
    when = Trigger(stage="worker", consuming_tag="full")
    state = State(tags={"os2ds_scan_1_a": "full", "os2ds_scan_2_b": "delta"})
    assert not is_due(0, when, 1, state)                          # nobody consumes
    state.consumers["worker#1"] = {"os2ds_conversions", "os2ds_scan_2_b"}
    assert not is_due(0, when, 1, state)                          # a delta queue only
    state.consumers["worker#1"].add("os2ds_scan_1_a")
    assert is_due(0, when, 1, state)
    del state.tags["os2ds_scan_1_a"]                              # deleted by the admin: no longer live
    assert not is_due(0, when, 1, state)


def test_a_trigger_with_for_must_hold_that_long_without_a_break():
    from harness.scenario import Phase
    from harness.schedule import Schedule

    when = Trigger.model_validate({"stage": "worker", "consuming": "bottom", "for": {"windows": 1}})
    schedule = Schedule.of([Phase(client="c", when=when)], [])
    idle, busy = State(), State(consumers={"worker": {"bottom"}})
    assert schedule.due(1.0, busy) == []          # holds from 1.0 ...
    assert schedule.due(2.5, idle) == []          # ... broken at 2.5
    assert schedule.due(3.0, busy) == []          # holds again from 3.0
    assert schedule.due(4.9, busy) == []          # 1.9 s < W = 2 s
    assert [i.label for i in schedule.due(5.0, busy)] == ["workload.0"]


def test_a_replica_counts_for_its_stage_but_not_for_another_instance():
    assert stage_matches("worker", "worker#2") and stage_matches("worker", "worker")
    assert not stage_matches("worker#2", "worker") and not stage_matches("work", "worker")
    assert not stage_matches("worker", None)


def test_a_hold_tops_up_to_its_target_and_waits_for_a_fresh_sample():
    hold = HoldController("q", depth=10, until=100.0)
    assert hold.top_up(0.0, None, 1) == 20                # queue not there yet: fill to 2 x depth
    assert hold.top_up(0.1, 0, 2) == 0                    # one top-up in flight at a time
    hold.confirmed(20, sample_number=2)
    assert hold.top_up(0.2, 0, 2) == 0                    # that sample may predate the publish
    assert hold.top_up(0.3, 18, 3) == 0                   # still near the target
    assert hold.top_up(0.4, 12, 4) == 8                   # fell by more than half the depth
    assert hold.shortfalls == 0


def test_a_hold_pours_nothing_into_a_queue_that_went_away():
    hold = HoldController("q", depth=10, until=100.0)
    assert hold.top_up(0.0, None, sample_number=1) == 20  # before the first publish: not there yet
    hold.confirmed(20, sample_number=1)
    assert hold.top_up(1.0, None, sample_number=2) == 0  # deleted, or its node is down
    assert hold.shortfalls == 0
    assert hold.top_up(2.0, 0, sample_number=3) > 0  # back: topped up again


def test_a_hold_deepens_when_the_engine_outruns_it():
    hold = HoldController("q", depth=10, until=100.0)
    sample = 0
    for _ in range(4):  # a fast engine: every fresh sample finds the queue empty
        sample += 1
        count = hold.top_up(0.0, 0, sample)
        hold.confirmed(count, sample)
        sample += 1
    assert hold.shortfalls == 3 and hold.target == 20 * 2 ** 3
    assert hold.published == 20 + 40 + 80 + 160


def test_a_hold_keeps_a_second_of_the_measured_consumption_queued_above_its_depth():
    hold = HoldController("q", depth=10, until=100.0)
    assert hold.top_up(0.0, 0, 1) == 20
    hold.confirmed(20, sample_number=1)
    # 0.4 s later 12 are left of 20: 8 consumed, 20 msg/s; the target becomes depth + 1 s of that.
    assert hold.top_up(0.4, 12, 2) == 30 - 12
    assert (hold.rate, hold.target, hold.shortfalls) == (20.0, 30, 0)
    hold.confirmed(18, sample_number=2)
    # A sample seen soon after the last one measured is not used: the timing of a look is not the engine's pace.
    assert hold.top_up(0.45, 28, 3) == 0
    assert hold.rate == 20.0
    # 0.5 s after the measurement: 12 + 18 published - 5 left = 25 consumed, 50 msg/s, and below depth.
    assert hold.top_up(0.9, 5, 4) == (10 + 50) * 2 - 5
    assert (hold.rate, hold.shortfalls) == (50.0, 1)


def test_an_aborted_scans_dropped_messages_are_not_taken_for_the_engines_pace():
    hold = HoldController("q", depth=20, until=100.0)
    assert hold.top_up(0.0, 0, 1) == 40
    hold.confirmed(40, sample_number=1)
    assert hold.top_up(1.0, 30, 2) == 0                   # 10 msg/s
    assert hold.rate == 10.0
    hold.work_discarded(30)                               # its scan is aborted: the 30 left are dropped at once
    count = hold.top_up(1.5, 0, 3)
    assert (hold.rate, hold.shortfalls, hold.target) == (10.0, 0, 40)
    assert count == 40
    hold.confirmed(40, sample_number=3)
    assert hold.top_up(2.5, 30, 4) == 0                   # the discount is spent: new work is measured again
    assert hold.rate == 10.0 and hold.summary()["discarded"] == 30


def test_a_hold_ends_on_time_and_caps_its_target():
    hold = HoldController("q", depth=4000, until=1.0)
    assert hold.target == MAX_TARGET
    assert hold.active(0.5) and not hold.active(1.0)
    assert hold.top_up(1.5, 0, 1) == 0


@pytest.mark.parametrize("rate,seconds,replicas,objects", [(100.0, 6.0, 1, 600), (10.0, 6.0, 2, 120),
                                                           (0.1, 1.0, 1, 10), (1e6, 60.0, 1, 50_000)])
def test_a_backlog_lasts_its_time_at_the_measured_pace(rate, seconds, replicas, objects):
    assert backlog_size(rate, seconds, replicas) == objects


def test_one_schedule_holds_phases_and_faults_under_the_same_rule():
    from harness.scenario import Fault, Phase
    from harness.schedule import Schedule

    when = Trigger(stage="worker", consuming="bottom")
    schedule = Schedule.of([Phase(client="c", at=1.0), Phase(client="c", when=when)],
                           [Fault(kind="delete_queue", target="bottom", at=2.0, when=when)])
    idle, busy = State(), State(consumers={"worker": {"bottom"}})
    assert [i.label for i in schedule.due(1.0, idle)] == ["workload.0"]
    assert schedule.waiting("workload") and schedule.waiting("faults")
    assert [i.label for i in schedule.due(1.5, busy)] == ["workload.1"]  # the fault waits for its time too
    assert not schedule.waiting("workload")
    assert schedule.due(5.0, idle) == []                                  # ... and for its trigger
    assert [i.label for i in schedule.due(5.0, busy)] == ["faults.0"] and schedule.pending == []
