"""The pure priority decision, clause by clause (no broker)."""
import random

import pytest

from reference_engine.priority import Decision, decide

Q = ["q0", "q1", "q2", "q3"]


def apply(consuming: set, d: Decision) -> set:
    after = set(consuming)
    for q in d.cancel:
        after.discard(q)
    for q in d.start:
        after.add(q)
    return after


def ready(**counts):
    return {q: counts.get(q, 0) for q in Q}


# -- QP-FIRST-PINNED ------------------------------------------------------------
@pytest.mark.clauses("QP-FIRST-PINNED")
def test_first_queue_started_at_first_check():
    d = decide(Q, set(), ready())
    assert d.start == ("q0",) and d.cancel == ()


@pytest.mark.clauses("QP-FIRST-PINNED")
@pytest.mark.parametrize("counts", [ready(), ready(q0=5), ready(q1=3), ready(q0=1, q3=9), ready(q2=1)])
@pytest.mark.parametrize("consuming", [{"q0"}, {"q0", "q1"}, {"q0", "q3"}])
def test_first_queue_never_cancelled(counts, consuming):
    d = decide(Q, consuming, counts)
    assert "q0" not in d.cancel and "q0" not in d.start


@pytest.mark.clauses("QP-FIRST-PINNED")
def test_missing_first_queue_is_not_started_until_it_exists():
    assert decide(Q, set(), {**ready(), "q0": None}).start == ()
    assert decide(Q, set(), ready()).start == ("q0",)


# -- QP-ONE-LOWER / QP-PRECEDENCE ----------------------------------------------------
@pytest.mark.clauses("QP-PRECEDENCE")
def test_lower_queue_only_when_everything_above_is_empty():
    assert decide(Q, {"q0"}, ready(q0=1, q1=5)).start == ()
    assert decide(Q, {"q0"}, ready(q1=5, q2=5)).start == ("q1",)
    assert decide(Q, {"q0"}, ready(q2=5, q3=5)).start == ("q2",)


@pytest.mark.clauses("QP-PRECEDENCE")
def test_start_up_with_everything_full_consumes_only_the_first():
    d = decide(Q, set(), ready(q0=3, q1=3, q2=3, q3=3))
    assert d.start == ("q0",)


@pytest.mark.clauses("QP-ONE-LOWER", "QP-PRECEDENCE", "QP-FIRST-PINNED")
def test_random_walk_keeps_every_invariant():
    rng = random.Random(7)
    consuming: set = set()
    for _ in range(5000):
        counts = {q: rng.choice([0, 0, 0, 1, 4]) for q in Q}
        if rng.random() < 0.05:
            counts[rng.choice(Q[1:])] = None
        d = decide(Q, consuming, counts)
        assert "q0" not in d.cancel
        after = apply(consuming, d)
        lower = [q for q in after if q != "q0"]
        assert len(lower) <= 1, (consuming, counts, d)
        assert "q0" in after
        if d.start and d.start[-1] != "q0":
            started = d.start[-1]
            above = Q[:Q.index(started)]
            assert all(not counts[q] for q in above), (counts, d)
        # a consumer on a missing queue never survives a check
        assert all(counts.get(q) is not None for q in after)
        consuming = after


# -- QP-CANCEL-WINDOW -----------------------------------------------------------------
@pytest.mark.clauses("QP-CANCEL-WINDOW")
def test_message_in_first_queue_cancels_the_lower_consumer():
    d = decide(Q, {"q0", "q2"}, ready(q0=1, q2=10))
    assert d.cancel == ("q2",) and d.start == ()


@pytest.mark.clauses("QP-CANCEL-WINDOW")
def test_message_in_higher_lower_queue_switches_up():
    d = decide(Q, {"q0", "q3"}, ready(q1=1, q3=10))
    assert d.cancel == ("q3",) and d.start == ("q1",)


@pytest.mark.clauses("QP-CANCEL-WINDOW")
def test_message_below_the_current_lower_queue_changes_nothing():
    d = decide(Q, {"q0", "q1"}, ready(q1=2, q3=10))
    assert not d.is_switch and d.target == "q1"


# -- QP-PROGRESS ----------------------------------------------------------------------
@pytest.mark.clauses("QP-PROGRESS")
def test_moves_down_when_current_lower_queue_empties():
    d = decide(Q, {"q0", "q1"}, ready(q3=4))
    assert d.cancel == ("q1",) and d.start == ("q3",)


@pytest.mark.clauses("QP-PROGRESS")
def test_idle_stage_picks_up_lower_work():
    assert decide(Q, {"q0"}, ready(q2=1)).start == ("q2",)


@pytest.mark.clauses("QP-PROGRESS")
def test_keeps_lower_consumer_when_nothing_is_ready():
    d = decide(Q, {"q0", "q2"}, ready())
    assert not d.is_switch and d.target == "q2"


# -- QP-DRAIN-ORDER --------------------------------------------------------------------
@pytest.mark.clauses("QP-DRAIN-ORDER")
@pytest.mark.parametrize("prefetch", [1, 2])
def test_simulated_drain_is_in_priority_order(prefetch):
    backlog = {"q0": 5, "q1": 7, "q2": 3, "q3": 6}
    consuming: set = set()
    delivered: list[str] = []
    for _ in range(200):
        consuming = apply(consuming, decide(Q, consuming, dict(backlog)))
        # between checks the stage handles a few messages from what it consumes, highest first
        for _ in range(prefetch):
            for q in Q:
                if q in consuming and backlog[q]:
                    backlog[q] -= 1
                    delivered.append(q)
                    break
    assert delivered == sorted(delivered, key=Q.index)
    assert len(delivered) == 21


# -- FT-QUEUE-GONE ----------------------------------------------------------------------
@pytest.mark.clauses("FT-QUEUE-GONE")
def test_deleted_lower_queue_counts_as_empty_and_is_left():
    d = decide(Q, {"q0", "q1"}, {**ready(q2=3), "q1": None})
    assert d.cancel == ("q1",) and d.start == ("q2",)
    d = decide(Q, {"q0"}, {**ready(), "q1": None})
    assert not d.is_switch


def test_feature_off_single_queue():
    assert decide(["os2ds_conversions"], set(), {"os2ds_conversions": 4}).start == ("os2ds_conversions",)
    assert not decide(["os2ds_conversions"], {"os2ds_conversions"}, {"os2ds_conversions": 4}).is_switch
    assert decide([], set(), {}) == Decision()


# -- faults change the decision ---------------------------------------------------------
def test_fault_two_lower_keeps_the_emptied_consumer():
    d = decide(Q, {"q0", "q1"}, ready(q3=4), {"two_lower"})
    assert d.cancel == () and d.start == ("q3",)
    # moving up still cancels
    d = decide(Q, {"q0", "q1", "q3"}, ready(q0=1), {"two_lower"})
    assert set(d.cancel) == {"q1", "q3"}


def test_fault_cancel_first_restarts_first_on_switch():
    d = decide(Q, {"q0"}, ready(q1=2), {"cancel_first"})
    assert d.cancel == ("q0",) and d.start == ("q0", "q1")
    assert not decide(Q, {"q0", "q1"}, ready(q1=2), {"cancel_first"}).is_switch


def test_fault_no_move_down_stays():
    d = decide(Q, {"q0", "q1"}, ready(q3=4), {"no_move_down"})
    assert not d.is_switch
    d = decide(Q, {"q0", "q2"}, ready(q1=4), {"no_move_down"})
    assert d.cancel == ("q2",) and d.start == ("q1",)


def test_fault_reverse_priority_prefers_the_last():
    d = decide(Q, {"q0"}, ready(q1=2, q3=2), {"reverse_priority"})
    assert d.start == ("q3",)
