"""QP-* checkers on hand-written histories (W = 6 s, G = 30 s)."""
from __future__ import annotations

import pytest

from .builder import HB, judge, scenario


def base(stage="worker", prio=("q0", "q1", "q2")):
    """A stage that starts at 0, declares its queues at 0.5 and consumes q0 from 1 s."""
    return HB().stage(0, stage, prio).consume(1, stage, "q0")


def end(hb, t, stage="worker"):
    """Orderly shutdown: teardown phase, consumers cancelled, exit."""
    hb.phase(t, "teardown")
    for q in ("q0", "q1", "q2"):
        if hb._tags.get((stage, q)):
            hb.cancel(t + 0.1, stage, q)
    return hb.exit(t + 0.2, stage).finish(t + 0.3)


# ---------------------------------------------------------------- QP-DECLARE

def test_declare_passes_when_queues_exist():
    hb = end(base().levels(0, 40, {"q0": [(0, None), (0.5, 0)], "q1": [(0, None), (0.5, 0)], "q2": [(0, None), (0.5, 0)]}), 40)
    r = judge(hb, "QP-DECLARE")
    assert r.outcome == "passed", r
    assert r.exercised.startswith("3 ")


def test_declare_fails_when_a_queue_never_appears():
    hb = HB().stage(0, "worker", create_queues=False).queue(0.5, "q0").queue(0.5, "q1").consume(1, "worker", "q0")
    hb.levels(0, 40, {"q2": [(0, None)]})
    end(hb, 40)
    r = judge(hb, "QP-DECLARE")
    assert r.outcome == "failed"
    assert "q2" in r.findings[0].explanation and "did not exist within G = 30 s" in r.findings[0].explanation


def test_declare_not_judged_when_run_shorter_than_grace():
    hb = HB().stage(0, "worker", create_queues=False).levels(0, 10, {"q2": [(0, None)]})
    end(hb, 10)
    assert judge(hb, "QP-DECLARE").outcome == "not_exercised"


def test_declare_not_exercised_without_priority_stage():
    hb = HB().stage(0, "worker", priority=()).consume(1, "worker", "os2ds_conversions")
    assert judge(hb, "QP-DECLARE").outcome == "not_exercised"


# ---------------------------------------------------------------- QP-FIRST-PINNED

def test_first_pinned_passes_with_orderly_shutdown():
    hb = end(base(), 50)
    r = judge(hb, "QP-FIRST-PINNED")
    assert r.outcome == "passed", r.findings


def test_first_pinned_fails_on_cancel_while_running():
    hb = base().cancel(20, "worker", "q0")
    end(hb, 60)
    r = judge(hb, "QP-FIRST-PINNED")
    assert r.outcome == "failed"
    f = r.findings[0]
    assert f.explanation.startswith("Stage worker cancelled its consumer on its first queue q0 at +20.0 s")


def test_first_pinned_cancel_just_before_exit_is_shutdown():
    hb = base().cancel(20, "worker", "q0").exit(20.3, "worker")
    hb.ev(40, "sample", ready={"q0": 0})
    assert judge(hb, "QP-FIRST-PINNED").outcome == "passed"


def test_first_pinned_broker_side_close_and_reconnect_is_legitimate():
    hb = base().cancel(20, "worker", "q0").conn_closed(20.05, "worker").consume(23, "worker", "q0")
    end(hb, 60)
    assert judge(hb, "QP-FIRST-PINNED").outcome == "passed"


def test_first_pinned_deleted_first_queue_is_legitimate():
    hb = base().delete(20, "q0").cancel(20.01, "worker", "q0")
    end(hb, 60)
    assert judge(hb, "QP-FIRST-PINNED").outcome == "passed"


def test_first_pinned_fails_when_consuming_without_q0():
    hb = HB().stage(0, "worker").consume(1, "worker", "q1")
    end(hb, 60)
    r = judge(hb, "QP-FIRST-PINNED")
    assert r.outcome == "failed"
    assert any("held no consumer on its first queue q0" in f.explanation for f in r.findings)


def test_first_pinned_not_exercised_without_priority():
    assert judge(HB().stage(0, "w", priority=()), "QP-FIRST-PINNED").outcome == "not_exercised"


# ---------------------------------------------------------------- QP-ONE-LOWER

def test_one_lower_passes_on_clean_switch():
    hb = base().consume(5, "worker", "q1").cancel(15, "worker", "q1").consume(15, "worker", "q2")
    end(hb, 40)
    r = judge(hb, "QP-ONE-LOWER")
    assert r.outcome == "passed" and r.exercised == "2 lower-queue consumers observed"


def test_one_lower_tolerates_receipt_order_noise():
    hb = base().consume(5, "worker", "q1").consume(15, "worker", "q2").cancel(15.05, "worker", "q1")
    end(hb, 40)
    assert judge(hb, "QP-ONE-LOWER").outcome == "passed"


def test_one_lower_fails_on_two_lower_consumers():
    hb = base().consume(5, "worker", "q1").consume(5, "worker", "q2").cancel(12, "worker", "q2")
    end(hb, 40)
    r = judge(hb, "QP-ONE-LOWER")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == "Stage worker held consumers on 2 lower queues (q1, q2) at once for 7.0 s from +5.0 s."


def test_one_lower_not_exercised_with_one_lower_queue():
    hb = base(prio=("q0", "q1")).consume(5, "worker", "q1")
    end(hb, 40)
    assert judge(hb, "QP-ONE-LOWER").outcome == "not_exercised"


# ---------------------------------------------------------------- QP-PRECEDENCE / QP-CANCEL-WINDOW

def switch_history(cancel_at):
    """q1 consumed from 2 s; q0 fills at 10 s and stays non-empty until 30 s; q1 cancelled at cancel_at."""
    hb = base().consume(2, "worker", "q1")
    hb.levels(0, 40, {"q0": [(0, 0), (10, 50), (30, 0)], "q1": [(0, 100)], "q2": [(0, 0)]})
    if cancel_at is not None:
        hb.cancel(cancel_at, "worker", "q1")
    return end(hb, 40)


def test_precedence_passes_when_cancelled_within_window():
    r = judge(switch_history(13.0), "QP-PRECEDENCE")
    assert r.outcome == "passed" and r.exercised.startswith("1 ")


def test_precedence_no_false_alarm_just_inside_window():
    # the message arrives above at the same instant; the cancel comes 5.9 s later (< W = 6 s)
    assert judge(switch_history(15.9), "QP-PRECEDENCE").outcome == "passed"


def test_precedence_fails_when_lower_kept():
    r = judge(switch_history(None), "QP-PRECEDENCE")
    assert r.outcome == "failed"
    f = r.findings[0]
    assert f.stage == "worker" and f.queues == ["q1", "q0"]
    assert f.explanation == ("Stage worker kept consuming lower queue q1 for 19.9 s (+10.0..+29.9 s) while "
                             "higher queue q0 had ready messages throughout (W = 6 s).")


def test_precedence_fails_when_starting_on_everything():
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").consume(1, "worker", "q1").consume(1, "worker", "q2")
    hb.levels(0, 30, {"q0": [(0, 200)], "q1": [(0, 10)], "q2": [(0, 10)]})
    end(hb, 30)
    r = judge(hb, "QP-PRECEDENCE")
    assert r.outcome == "failed" and {f.queues[0] for f in r.findings} == {"q1", "q2"}


def test_precedence_not_exercised_without_higher_work():
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 5)]})
    end(hb, 40)
    assert judge(hb, "QP-PRECEDENCE").outcome == "not_exercised"


def test_precedence_ignores_paused_stage():
    hb = base().consume(2, "worker", "q1")
    hb.levels(0, 40, {"q0": [(0, 0), (10, 50), (30, 0)], "q1": [(0, 100)]})
    hb.fault(9, "pause_stage", "worker").fault(25, "resume_stage", "worker").cancel(27, "worker", "q1")
    end(hb, 40)
    assert judge(hb, "QP-PRECEDENCE").outcome != "failed"


def test_cancel_window_reports_latency():
    r = judge(switch_history(13.0), "QP-CANCEL-WINDOW")
    assert r.outcome == "passed"
    assert r.exercised == "1 switches observed"
    assert r.metrics["latency_s"] == {"count": 1, "min": 3.0, "median": 3.0, "max": 3.0}


def test_cancel_window_fails_on_late_cancel():
    r = judge(switch_history(18.5), "QP-CANCEL-WINDOW")
    assert r.outcome == "failed"
    assert "only 8.5 s after higher queue q0 filled at +10.0 s" in r.findings[0].explanation
    assert r.metrics["latency_s"]["max"] == 8.5


def test_cancel_window_fails_when_never_cancelled():
    r = judge(switch_history(None), "QP-CANCEL-WINDOW")
    assert r.outcome == "failed"
    assert "did not cancel lower queue q1 within W = 6 s" in r.findings[0].explanation


def test_cancel_window_short_burst_needs_no_switch():
    # q0 non-empty for 2 s only: drained by the pinned consumer; no switch needed, nothing judged
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0), (10, 3), (12, 0)], "q1": [(0, 100)]})
    end(hb, 40)
    r = judge(hb, "QP-CANCEL-WINDOW")
    assert r.outcome == "not_exercised" and r.exercised == "0 switches observed"


def test_cancel_window_connection_close_is_not_a_switch():
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0), (10, 50), (30, 0)], "q1": [(0, 100)]})
    hb.cancel(12, "worker", "q1").cancel(12, "worker", "q0").conn_closed(12.01, "worker")
    hb.consume(14, "worker", "q0")
    end(hb, 40)
    r = judge(hb, "QP-CANCEL-WINDOW")
    assert r.outcome == "not_exercised"


# ---------------------------------------------------------------- QP-PROGRESS

def test_progress_passes_when_lower_work_taken_up():
    hb = base().levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 0), (5, 30), (25, 0)], "q2": [(0, 0)]})
    hb.consume(8, "worker", "q1").cancel(26, "worker", "q1")
    end(hb, 40)
    r = judge(hb, "QP-PROGRESS")
    assert r.outcome == "passed" and r.exercised.startswith("1 ")


def test_progress_fails_when_idle():
    hb = base().levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 0), (5, 30)], "q2": [(0, 0)]})
    end(hb, 40)
    r = judge(hb, "QP-PROGRESS")
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("Stage worker left q1 with ready messages for 35.0 s (+5.0..+40.0 s)")
    assert "it was consuming q0" in r.findings[0].explanation


def test_progress_fails_when_stuck_on_lower():
    hb = base().consume(2, "worker", "q2")
    hb.levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 0), (10, 30)], "q2": [(0, 100)]})
    end(hb, 40)
    r = judge(hb, "QP-PROGRESS")
    assert r.outcome == "failed" and r.findings[0].queues == ["q1"]
    assert "it was consuming q0, q2" in r.findings[0].explanation


def test_progress_not_judged_while_higher_busy():
    hb = base().levels(0, 40, {"q0": [(0, 50)], "q1": [(0, 30)], "q2": [(0, 0)]})
    end(hb, 40)
    r = judge(hb, "QP-PROGRESS")
    assert r.outcome == "passed"  # q0 has work and is consumed; q1 must wait


def test_progress_not_exercised_without_work():
    hb = base().levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 0)], "q2": [(0, 0)]})
    end(hb, 40)
    assert judge(hb, "QP-PROGRESS").outcome == "not_exercised"


def test_progress_not_judged_before_start_or_after_teardown():
    hb = HB().stage(0, "worker").levels(0, 60, {"q0": [(0, 0)], "q1": [(0, 30)], "q2": [(0, 0)]})
    hb.consume(1, "worker", "q0").consume(4, "worker", "q1").phase(20, "teardown").cancel(20.1, "worker", "q1")
    assert judge(hb, "QP-PROGRESS").outcome == "passed"


# ---------------------------------------------------------------- QP-DRAIN-ORDER

def drain(order):
    hb = HB().stage(0, "worker").consume(1, "worker", "q0")
    for k, (t, q) in enumerate(order):
        hb.deliver(t, q, "worker")
    return end(hb, 60)


def test_drain_order_passes():
    order = [(1.5, "q1")] + [(8 + k, "q0") for k in range(5)] + [(14 + k, "q1") for k in range(5)] + [(20 + k, "q2") for k in range(5)]
    r = judge(drain(order), "QP-DRAIN-ORDER", scenario(drain=True))
    assert r.outcome == "passed" and r.exercised == "2 queue boundaries crossed"


def test_drain_order_fails():
    order = [(8 + k, "q0") for k in range(3)] + [(12, "q1"), (13, "q0"), (14, "q2")]
    r = judge(drain(order), "QP-DRAIN-ORDER", scenario(drain=True))
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker received a message from q0 at +13.0 s after it had already "
                                         "started on lower queue q1: q0 was not drained first.")


def drain_with_levels(deliveries, publishes, levels):
    hb = HB().stage(0, "worker")
    for k in range(publishes["q1"]):
        hb.publish(0.1, "q1", stage="harness")
    for k in range(publishes["q2"]):
        hb.publish(0.2, "q2", stage="harness")
    hb.consume(1, "worker", "q0").levels(0, 30, levels)
    for t, q, redelivered in deliveries:
        hb.deliver(t, q, "worker", redelivered=redelivered)
    return end(hb, 30)


def test_drain_order_fails_when_a_lower_queue_is_served_before_a_higher_one_was_received():
    deliveries = [(8, "q1", False), (9, "q1", False), (10, "q2", False), (11, "q1", False)]
    levels = {"q0": [(0, 0)], "q1": [(0, 3), (8.01, 2), (9.01, 1), (11.01, 0)], "q2": [(0, 2), (10.01, 1)]}
    r = judge(drain_with_levels(deliveries, {"q1": 3, "q2": 2}, levels), "QP-DRAIN-ORDER", scenario(drain=True))
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker received its first message from q2 at +10.0 s while higher "
                                         "queue q1 still had ready messages that no stage had received yet (q1: 1).")


def test_drain_order_passes_when_the_only_ready_message_above_is_one_the_stage_gave_back():
    # q1's last message was in flight when the stage moved down; its cancel put it back (pika nacks the
    # deliveries it had not dispatched). Every message of q1 had been received: q1 was drained.
    deliveries = [(8, "q1", False), (9, "q1", False), (9.5, "q2", False), (10, "q1", True), (11, "q2", False)]
    levels = {"q0": [(0, 0)], "q1": [(0, 2), (8.01, 1), (9.01, 0), (9.2, 1), (10.01, 0)], "q2": [(0, 2)]}
    r = judge(drain_with_levels(deliveries, {"q1": 2, "q2": 2}, levels), "QP-DRAIN-ORDER", scenario(drain=True))
    assert r.outcome == "passed" and r.exercised == "2 queue boundaries crossed"


def test_drain_order_not_exercised_outside_drain_scenarios():
    order = [(8, "q1"), (9, "q0")]
    assert judge(drain(order), "QP-DRAIN-ORDER").outcome == "not_exercised"


def test_drain_order_skips_stage_fed_after_start():
    order = [(8 + k, "q0") for k in range(3)] + [(12, "q1"), (13, "q0")]
    hb = drain(order).publish(12.5, "q0", stage="harness")
    r = judge(hb, "QP-DRAIN-ORDER", scenario(drain=True))
    assert r.outcome == "not_exercised" and "skipped" in r.exercised


def test_progress_fails_when_sitting_on_empty_higher_lower_queue():
    # the stage stays on q1 after it emptied while q2 has work (it never moves down)
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 20), (8, 0)], "q2": [(0, 100)]})
    end(hb, 40)
    r = judge(hb, "QP-PROGRESS")
    assert r.outcome == "failed" and r.findings[0].queues == ["q2"]
    assert "although every queue above it (q0, q1) was empty; it was consuming q0, q1." in r.findings[0].explanation


def test_progress_trickle_into_higher_lower_queue_is_served_work():
    # q1 looks empty to the sampler, but the stage keeps receiving q1 messages every 2 s
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0)], "q1": [(0, 0)], "q2": [(0, 100)]})
    for k in range(19):
        hb.deliver(3 + 2 * k, "q1", "worker")
    end(hb, 40)
    assert judge(hb, "QP-PROGRESS").outcome == "passed"


def test_unattributed_consumers_make_a_stage_unjudged_not_guilty():
    # the observer could not tell whose consumers these are: no FIRST-PINNED/PROGRESS alarm for "worker"
    hb = HB().stage(0, "worker").levels(0, 60, {"q0": [(0, 0)], "q1": [(0, 30)], "q2": [(0, 0)]})
    hb.ev(1, "consumer_created", stage=None, queue="q0", tag="x", chan="c", prefetch=1)
    end(hb, 60)
    for clause in ("QP-FIRST-PINNED", "QP-PROGRESS"):
        r = judge(hb, clause)
        assert r.outcome == "not_exercised" and "worker not judged" in r.exercised



def test_cancel_window_counts_a_switch_made_before_the_first_sample_shows_the_work():
    # Work is published into q0 at 10.02; the stage cancels q1 at 10.05, before the sample at
    # 10.1 shows q0 non-empty. The work dates from its publish, so this is a switch of 0.03 s.
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0), (10.1, 50), (30, 0)], "q1": [(0, 100)]})
    hb.publish(10.02, "q0", stage="harness")
    hb.cancel(10.05, "worker", "q1")
    end(hb, 40)
    r = judge(hb, "QP-CANCEL-WINDOW")
    assert r.outcome == "passed" and r.exercised == "1 switches observed"
    assert r.metrics["latency_s"]["max"] == 0.03


def test_a_publish_stamped_after_the_sample_does_not_move_the_work():
    # A late firehose stamp (after the sample that already showed the work) changes nothing.
    hb = base().consume(2, "worker", "q1").levels(0, 40, {"q0": [(0, 0), (10.0, 50), (30, 0)], "q1": [(0, 100)]})
    hb.publish(10.5, "q0", stage="harness")
    hb.cancel(13.0, "worker", "q1")
    end(hb, 40)
    assert judge(hb, "QP-CANCEL-WINDOW").metrics["latency_s"]["max"] == 3.0


def test_a_gap_in_the_samples_does_not_date_work_from_an_old_publish():
    # The sampler is away from 9 to 30 s. A message published into q0 at 9.05 was consumed at once;
    # q0 really filled at 29.5. The run seen at 30 dates from 29.5 (not 9.05): a 0.8 s switch.
    hb = base().consume(2, "worker", "q1")
    hb.levels(0, 9, {"q0": [(0, 0)], "q1": [(0, 100)]})
    hb.levels(30, 40, {"q0": [(30, 50), (35, 0)], "q1": [(30, 100)]})
    hb.publish(9.05, "q0", stage="harness")
    hb.publish(29.5, "q0", stage="harness")
    hb.cancel(30.3, "worker", "q1")
    end(hb, 40)
    r = judge(hb, "QP-CANCEL-WINDOW")
    assert r.outcome == "passed", r.findings
    assert r.metrics["latency_s"]["max"] == pytest.approx(0.8)
