"""PS-* checkers on hand-written histories of per-scan queues (W = 6 s, G = 30 s)."""
from __future__ import annotations

import pytest

from harness.checkers import check_all, registry
from harness.checkers.ps import NOT_CONSUMED

from .builder import HB, WINDOWS, judge

Q7 = "osds_conversions.7_20260505T120000"
Q8 = "osds_conversions.8_20260505T120500"
PS_CLAUSES = [c.id for c in registry.all_clauses() if c.family == "PS"]


def base(tags=("delta", "full"), explorer=False):
    """worker (CONVERSION_PRIORITY ``tags``) connected at 1 s and said hello with nothing to announce;
    Q7 (delta) and Q8 (full) declared and announced at 10 s."""
    hb = HB().ps_stage(0, "worker", tags).hello(1.2, "worker")
    if explorer:
        hb.ps_stage(0, "explorer", kind="explorer")
    return hb.announce(10, Q7, "delta").announce(10, Q8, "full")


def end(hb, t):
    return hb.phase(t, "teardown").finish(t + 0.5)


def test_every_ps_clause_is_not_exercised_when_the_engine_never_consumes_a_per_scan_queue():
    # a 3.26 engine: queues announced, no worker_hello, it consumes its static queue only
    hb = HB().ps_stage(0, "worker", ("delta",)).ps_stage(0, "explorer", kind="explorer")
    hb.announce(10, Q7, "delta").announce(10, Q8, "full")
    hb.consume(2, "worker", "os2ds_conversions").levels(0, 60, {Q7: [(10, 50)], Q8: [(10, 50)]})
    hb.ps_delete(40, Q7)
    results = check_all(end(hb, 60).history(), None, WINDOWS, clauses=PS_CLAUSES)
    assert [(r.clause, r.outcome, r.exercised) for r in results] == [
        (c, "not_exercised", NOT_CONSUMED) for c in PS_CLAUSES]


def test_every_ps_clause_is_not_exercised_without_announcements():
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 20, {"q0": [(0, 5)]})
    results = check_all(end(hb, 20).history(), None, WINDOWS, clauses=PS_CLAUSES)
    assert {r.outcome for r in results} == {"not_exercised"}
    assert {r.exercised for r in results} == {"no per-scan queue was announced"}


# ---------------------------------------------------------------- PS-FILTER

def test_filter_passes_when_a_worker_leaves_a_forbidden_tag_alone():
    hb = base(tags=("delta",)).consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 5)], Q8: [(10, 30)]})
    r = judge(end(hb, 40), "PS-FILTER")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 (worker, forbidden queue) and 0 (explorer, per-scan queue) pairs judged"


def test_filter_fails_when_a_worker_consumes_a_tag_it_does_not_list():
    hb = base(tags=("delta",)).consume(11, "worker", Q7).consume(12, "worker", Q8)
    hb.levels(0, 40, {Q7: [(10, 5)], Q8: [(10, 30)]})
    r = judge(end(hb, 40), "PS-FILTER")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"worker consumed per-scan queue {Q8} (tag full) from +12.0 s to +40.5 s: tag full is not allowed by its "
        "CONVERSION_PRIORITY delta.")


def test_filter_fails_when_an_explorer_consumes_a_per_scan_queue():
    hb = base(tags=(), explorer=True).consume(11, "worker", Q7).consume(15, "explorer", Q8)
    hb.cancel(15.5, "explorer", Q8).levels(0, 40, {Q7: [(10, 5)], Q8: [(10, 30)]})
    r = judge(end(hb, 40), "PS-FILTER")
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith(f"explorer consumed per-scan queue {Q8} (tag full) from +15.0 s to "
                                                "+15.5 s: an explorer never consumes a per-scan queue")


def test_filter_not_exercised_when_every_worker_allows_every_tag():
    hb = base(tags=()).consume(11, "worker", Q7).consume(11, "worker", Q8)
    hb.levels(0, 40, {Q7: [(10, 5)], Q8: [(10, 30)]})
    r = judge(end(hb, 40), "PS-FILTER")
    assert r.outcome == "not_exercised"
    assert r.exercised.endswith("no stage was connected for W = 6 s while a per-scan queue it must not consume held work")


def test_filter_not_exercised_when_the_forbidden_queue_held_work_for_less_than_w():
    hb = base(tags=("delta",)).consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 5)], Q8: [(10, 3), (13, 0)]})
    assert judge(end(hb, 40), "PS-FILTER").outcome == "not_exercised"


# ---------------------------------------------------------------- PS-SUBSCRIBE

def test_subscribe_passes_when_the_worker_consumes_each_announced_queue():
    hb = base().consume(11, "worker", Q7).consume(11.5, "worker", Q8).levels(0, 40, {Q7: [(10, 0)], Q8: [(10, 0)]})
    r = judge(end(hb, 40), "PS-SUBSCRIBE")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "2 (announcement, worker) pairs judged"


def test_subscribe_fails_when_an_allowed_queue_is_ignored():
    hb = base().consume(11, "worker", Q7).levels(0, 80, {Q7: [(10, 0)], Q8: [(10, 0)]})
    hb.announce(70, Q8, "full", reason="rebroadcast")
    r = judge(end(hb, 80), "PS-SUBSCRIBE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"worker held no consumer on {Q8} (tag full, allowed by its CONVERSION_PRIORITY delta full) within W = 6 s "
        "of its announcement at +10.0 s (scan_start); it missed 1 later announcement(s) of it too.")


def test_subscribe_lets_a_worker_serving_a_higher_tag_wait():
    # Q7 (delta) holds work and the worker consumes it: it may leave Q8 (full) for later
    hb = base().consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 50)], Q8: [(10, 50)]})
    r = judge(end(hb, 40), "PS-SUBSCRIBE")
    assert r.outcome == "passed" and r.exercised == "1 (announcement, worker) pairs judged, 1 waited on a higher tag"


def test_subscribe_not_exercised_when_the_run_ends_within_w_of_the_announcement():
    hb = base().consume(11, "worker", Q7).levels(0, 14, {Q7: [(10, 0)], Q8: [(10, 0)]})
    r = judge(end(hb, 14), "PS-SUBSCRIBE")
    assert r.outcome == "not_exercised"
    assert r.exercised.startswith("0 (announcement, worker) pairs judged: no broadcast announcement")


# ---------------------------------------------------------------- PS-PRECEDENCE

def test_precedence_passes_when_the_lower_tag_is_dropped_within_w():
    hb = base().consume(11, "worker", Q7).consume(11, "worker", Q8).cancel(14, "worker", Q8)
    hb.levels(0, 40, {Q7: [(10, 50)], Q8: [(10, 50)]})
    r = judge(end(hb, 40), "PS-PRECEDENCE")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 windows of higher-tag work judged"


def test_precedence_fails_when_the_lower_tag_is_kept_while_the_higher_has_work():
    hb = base().consume(11, "worker", Q7).consume(11, "worker", Q8).levels(0, 40, {Q7: [(10, 50)], Q8: [(10, 50)]})
    r = judge(end(hb, 40), "PS-PRECEDENCE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"worker kept consuming {Q8} (tag full) for 29.0 s (+11.0..+40.0 s) while {Q7} (tag delta, higher in its "
        "CONVERSION_PRIORITY delta full) had ready messages throughout (W = 6 s).")


def test_precedence_not_exercised_without_a_ranked_worker():
    hb = base(tags=("full",)).consume(11, "worker", Q8).levels(0, 40, {Q7: [(10, 50)], Q8: [(10, 50)]})
    r = judge(end(hb, 40), "PS-PRECEDENCE")
    assert r.outcome == "not_exercised" and r.exercised.endswith("no worker has two or more tags in its CONVERSION_PRIORITY")


def test_precedence_not_exercised_when_the_higher_tag_never_held_work_for_w():
    hb = base().consume(11, "worker", Q7).consume(11, "worker", Q8).levels(0, 40, {Q7: [(10, 3), (13, 0)], Q8: [(10, 50)]})
    assert judge(end(hb, 40), "PS-PRECEDENCE").outcome == "not_exercised"


# ---------------------------------------------------------------- PS-PROGRESS

def test_progress_passes_when_waiting_work_is_consumed():
    hb = base(tags=()).consume(11, "worker", Q7).consume(11, "worker", Q8).levels(0, 40, {Q7: [(10, 0)], Q8: [(10, 80)]})
    r = judge(end(hb, 40), "PS-PROGRESS")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 windows with allowed per-scan work judged"


def test_progress_fails_when_a_worker_forgot_a_queue():
    # the worker consumed Q8 once, then dropped it although it had nothing better to do
    hb = base(tags=()).consume(11, "worker", Q7).consume(11, "worker", Q8).cancel(12, "worker", Q8)
    hb.levels(0, 40, {Q7: [(10, 0)], Q8: [(10, 80)]})
    r = judge(end(hb, 40), "PS-PROGRESS")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"{Q8} (tag full) had ready messages (up to 80) for 28.0 s (+12.0..+40.0 s) but no free worker allowed to "
        f"take it held a consumer on it: worker was consuming {Q7}.")


def test_progress_fails_when_a_worker_is_wedged_on_a_closed_channel():
    # the broker closed its channel at 20 s; it never consumed again: running (and idle) from 20 + G on
    hb = base(tags=()).consume(11, "worker", Q7).consume(11, "worker", Q8)
    hb.ev(20, "channel_closed", chan="chan-worker", stage="worker").levels(0, 70, {Q7: [(10, 0)], Q8: [(10, 80)]})
    r = judge(end(hb, 70), "PS-PROGRESS")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"{Q8} (tag full) had ready messages (up to 80) for 20.0 s (+50.0..+70.0 s) but no free worker allowed to "
        "take it held a consumer on it: worker was consuming nothing.")


def lost_hello(rebroadcast_at=None):
    """The worker reconnects at 21 s; its hello is lost (the admin records none): until a re-broadcast
    nothing tells its new connection of Q8."""
    hb = base(tags=()).consume(11, "worker", Q7).consume(11, "worker", Q8)
    hb.conn_closed(20, "worker").connect(21, "worker").levels(0, 50, {Q7: [(10, 0)], Q8: [(10, 80)]})
    if rebroadcast_at is not None:
        hb.announce(rebroadcast_at, Q8, "full", reason="rebroadcast")
    return end(hb, 50)


def test_progress_does_not_blame_a_worker_that_was_not_told_of_the_queue_since_it_reconnected():
    r = judge(lost_hello(), "PS-PROGRESS")
    assert r.outcome == "passed" and r.exercised == "1 windows with allowed per-scan work judged"


def test_progress_blames_a_worker_a_re_broadcast_told_of_the_queue():
    r = judge(lost_hello(rebroadcast_at=35), "PS-PROGRESS")
    assert r.outcome == "failed" and "for 15.0 s (+35.0..+50.0 s)" in r.findings[0].explanation


def test_progress_does_not_blame_a_worker_busy_with_a_higher_tag():
    hb = base().consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 50)], Q8: [(10, 80)]})
    r = judge(end(hb, 40), "PS-PROGRESS")
    assert r.outcome == "passed"  # Q7's windows judged; Q8 waits for a worker free of delta work


def test_progress_a_trickle_of_higher_tag_deliveries_keeps_a_worker_busy():
    # Q7 (delta) is never seen non-empty, yet the worker receives from it every second: by the engine's
    # rule (deliveries in its last window) it may leave Q8 (full) waiting until W after the last, at 29.5 s
    hb = base().consume(11, "worker", Q7).levels(0, 50, {Q7: [(10, 0)], Q8: [(10, 80)]})
    for k in range(19):
        hb.deliver(11.5 + k, Q7, "worker")
    r = judge(end(hb, 50), "PS-PROGRESS")
    assert r.outcome == "failed" and "for 14.5 s (+35.5..+50.0 s)" in r.findings[0].explanation
    r = judge(end(hb, 50), "PS-SUBSCRIBE")
    assert r.exercised == "1 (announcement, worker) pairs judged, 1 waited on a higher tag"


def test_progress_not_exercised_when_the_work_lasted_less_than_w():
    hb = base(tags=()).consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 0)], Q8: [(10, 5), (14, 0)]})
    r = judge(end(hb, 40), "PS-PROGRESS")
    assert r.outcome == "not_exercised"
    assert r.exercised.startswith("0 windows with allowed per-scan work judged: no live per-scan queue held ready")


# ---------------------------------------------------------------- PS-DELETE

def deletion(deliver_until=70, work_until=70, recreate_at=None):
    """Q7 (full) paused at 14 and deleted at 20 while the worker serves Q8 (here tagged delta)."""
    hb = HB().ps_stage(0, "worker", ("delta", "full")).hello(1.2, "worker")
    hb.announce(10, Q7, "full").announce(10, Q8, "delta")
    hb.consume(11, "worker", Q7).cancel(14, "worker", Q7).consume(11, "worker", Q8)
    hb.levels(0, 75, {Q7: [(10, 30), (20.2, None)], Q8: [(10, 120), (work_until, 0)]})
    hb.ps_delete(20, Q7)
    t = 11.5
    while t < deliver_until:
        hb.deliver(t, Q8, "worker")
        t += 1.0
    if recreate_at is not None:
        hb.queue(recreate_at, Q7).consume(recreate_at + 0.2, "worker", Q7)
    return end(hb, 75)


def test_delete_passes_when_the_worker_keeps_serving():
    r = judge(deletion(), "PS-DELETE")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 (deletion, worker) pairs judged"


def test_delete_fails_when_the_worker_consumes_nothing_after_a_paused_queue_is_deleted():
    r = judge(deletion(deliver_until=22), "PS-DELETE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"worker consumed nothing for 48 s (+21.5..+69.9 s) after {Q7} was deleted while paused; 120 objects "
        f"waiting in {Q8}.")


def test_delete_fails_when_a_stage_declares_the_deleted_queue_again():
    r = judge(deletion(recreate_at=30), "PS-DELETE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"{Q7} was declared again at +30.0 s, 9.9 s after it was deleted, and not by the admin; worker consumed it "
        "from +30.2 s: only the admin declares a per-scan queue.")


def test_delete_not_exercised_when_the_other_work_ran_out_before_2w():
    r = judge(deletion(work_until=25, deliver_until=25), "PS-DELETE")
    assert r.outcome == "not_exercised"
    assert r.exercised == (f"0 (deletion, worker) pairs judged; 1 not judged: worker after {Q7}: only 4.8 s of work "
                           "in its other queues after the deletion, the clause needs 2W = 12 s: no worker had 2W = "
                           "12 s of work in its other queues after a deletion")


def test_delete_leaves_work_abandoned_before_the_deletion_to_ps_progress():
    # the worker stops serving Q8 (delta) at 12 and keeps its static queue until 40; Q7 (full, never
    # consumed) is deleted at 30. Its silence after 40 began on Q8 before the deletion: one cause, one finding
    hb = HB().ps_stage(0, "worker", ("delta", "full"), priority=("conv",)).hello(1.2, "worker")
    hb.announce(10, Q7, "full").announce(10, Q8, "delta")
    hb.consume(2, "worker", "conv").consume(11, "worker", Q8).cancel(12, "worker", Q8)
    hb.levels(0, 75, {Q7: [(10, 30), (30.2, None)], Q8: [(10, 40)], "conv": [(2, 20), (40, 0)]})
    hb.ps_delete(30, Q7)
    for t in range(3, 40):
        hb.deliver(t, "conv", "worker")
    history = end(hb, 75)
    assert judge(history, "PS-PROGRESS").outcome == "failed"
    r = judge(history, "PS-DELETE")
    assert r.outcome == "not_exercised", r.findings
    assert "only 9.8 s of work in its other queues after the deletion" in r.exercised


def test_delete_not_exercised_without_a_deletion():
    hb = base().consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 5)]})
    r = judge(end(hb, 40), "PS-DELETE")
    assert r.outcome == "not_exercised" and r.exercised == "no per-scan queue was deleted before teardown"


# ---------------------------------------------------------------- PS-HELLO

Q6 = "osds_conversions.6_20260505T115500"


def reconnect(answered=(Q7,), consume=True, stale_storm=0):
    """Q7 (full) live from 10 s; Q6 deleted at 5 s. The worker's connection drops at 30 s; it reconnects at
    31 s and says hello, answered with ``answered``; a stale Q6 in it may make it reconnect ``stale_storm``
    more times."""
    hb = HB().ps_stage(0, "worker", ()).hello(1.2, "worker")
    hb.announce(3, Q6, "full").ps_delete(5, Q6)
    hb.announce(10, Q7, "full").consume(10.5, "worker", Q7).levels(0, 60, {Q7: [(10, 0)]})
    hb.conn_closed(30, "worker").connect(31, "worker").hello(31.2, "worker", answered)
    t = 31.2
    for _ in range(stale_storm):  # the stale Q6 closes its channel: reconnect, hello, again
        hb.conn_closed(t + 0.1, "worker").connect(t + 0.2, "worker").hello(t + 0.25, "worker", answered)
        t += 0.25
    if consume:
        hb.consume(t + 0.5, "worker", Q7)
    return end(hb, 60)


def test_hello_passes_when_the_reply_is_consumed_after_a_reconnect():
    r = judge(reconnect(), "PS-HELLO")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 hello replies judged, 0 naming a stale queue; 2 hellos from 1 worker(s)"


def test_hello_passes_when_a_stale_queue_costs_one_reconnect():
    r = judge(reconnect(answered=(Q6, Q7), stale_storm=1), "PS-HELLO")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "2 hello replies judged, 2 naming a stale queue; 3 hellos from 1 worker(s)"


def test_hello_fails_when_the_reply_is_not_consumed():
    r = judge(reconnect(consume=False), "PS-HELLO")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        f"worker said hello at +31.2 s (command queue amq.gen-worker-2); the reply named {Q7}, but it held no "
        f"consumer on {Q7} within W = 6 s.")


def test_hello_judges_the_reply_to_a_hello_that_a_fault_provoked_but_not_one_a_fault_cut_short():
    provoked = reconnect(consume=False)
    provoked.fault(29.9, "close_connection", "worker")  # the broker closes it at 30 s: the hello at 31.2 s follows
    r = judge(provoked, "PS-HELLO")
    assert r.outcome == "failed" and "held no consumer" in r.findings[0].explanation
    cut = reconnect(consume=False)
    cut.fault(33, "close_connection", "worker")  # inside the reply's W: the fault decides, not the reply
    assert judge(cut, "PS-HELLO").outcome != "failed"


def test_hello_fails_on_a_reconnect_storm_over_a_stale_queue():
    r = judge(reconnect(answered=(Q6, Q7), stale_storm=8, consume=False), "PS-HELLO")
    assert r.outcome == "failed"
    texts = [f.explanation for f in r.findings]
    assert any(t.startswith(f"worker reconnected 8 times after hello replies naming {Q6}, which no longer existed")
               for t in texts), texts
    assert "worker sent 10 worker_hellos within 60 s (+1.2..+33.2 s): a reconnect storm (at most 3 in any 60 s)." in texts


def test_hello_judges_a_worker_that_storms_from_its_first_hello_and_never_consumes():
    # the stale Q6 is named first: the worker never gets to a per-scan consumer, yet it said hello
    hb = HB().announce(3, Q6, "full").ps_delete(5, Q6).announce(10, Q7, "full").ps_stage(10.8, "worker", (), connect=0.2)
    t = 11.0
    for _ in range(12):
        hb.hello(t, "worker", (Q6, Q7)).conn_closed(t + 0.1, "worker").connect(t + 0.2, "worker")
        t += 0.25
    r = judge(end(hb.hello(t, "worker", (Q6, Q7)).levels(0, 40, {Q7: [(10, 30)]}), 40), "PS-HELLO")
    assert r.outcome == "failed"
    assert [f.explanation.split(" (")[0] for f in r.findings] == [
        "worker said hello at +11.0 s",
        f"worker reconnected 12 times after hello replies naming {Q6}, which no longer existed",
        "worker sent 13 worker_hellos within 60 s"]
    assert judge(end(hb, 40), "PS-PROGRESS").outcome == "failed"


def test_hello_fails_when_a_connection_says_no_hello():
    hb = HB().ps_stage(0, "worker", ()).announce(10, Q7, "full").consume(10.5, "worker", Q7)
    r = judge(end(hb.hello(3, "worker").connect(20, "worker"), 40), "PS-HELLO")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("worker connected at +20.0 s (command queue amq.gen-worker-2) but sent no "
                                         "worker_hello naming it within W = 6 s.")


def test_hello_not_exercised_when_no_reply_named_a_queue():
    hb = base().consume(11, "worker", Q7).levels(0, 40, {Q7: [(10, 0)]})
    r = judge(end(hb, 40), "PS-HELLO")
    assert r.outcome == "not_exercised"
    assert r.exercised == ("0 hello replies judged, 0 naming a stale queue; 1 hellos from 1 worker(s): no hello was "
                           "answered with a live queue allowed for its worker, nor with a queue that no longer existed")


@pytest.mark.parametrize("clause", PS_CLAUSES)
def test_every_ps_rule_states_its_numbers(clause):
    rule = registry.get(clause).rule
    assert rule.startswith("Rule") and "{" not in rule
