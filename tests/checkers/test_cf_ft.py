"""CF-* (static lint) and FT-* (around fault events)."""
from __future__ import annotations

from harness.checkers import check_all, lint
from harness.checkers._common import build_context
from harness.scenario import parse_scenario

from .builder import HB, T0, WINDOWS, judge, scenario


def sc(clients, stages):
    return parse_scenario({"name": "cf", "clients": clients, "stages": stages})


GOOD = sc([{"name": "a", "explorer_full_queue": "ef", "explorer_delta_queue": "ed",
            "conversion_full_queue": "cf", "conversion_delta_queue": "cd"}],
          [{"name": "e", "kind": "explorer", "queue_priority": "ed ef"},
           {"name": "w", "kind": "worker", "queue_priority": "cd cf"}])


def by_clause(results):
    return {r.clause: r for r in results}


def test_cf_all_pass_on_aligned_scenario():
    res = by_clause(lint(GOOD))
    assert [r.outcome for r in res.values()] == ["passed"] * 3 + ["not_exercised"]  # CF-TAGS: no per-scan scan
    assert res["CF-ALIGN"].exercised == "4 client queue fields checked"


def test_cf_align_fails_on_unread_queue():
    s = sc([{"name": "a", "conversion_full_queue": "conversions_full_vejstrand"}],
           [{"name": "w", "kind": "worker", "queue_priority": "conversions_delta"},
            {"name": "e", "kind": "explorer"}])
    r = by_clause(lint(s))["CF-ALIGN"]
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        "Client a's conversion_full_queue is conversions_full_vejstrand, which is not in the QUEUE_PRIORITY (or "
        "default queue) of any worker stage (w): its messages would never be consumed.")
    assert r.findings[0].evidence[0]["field"] == "clients.0.conversion_full_queue"


def test_cf_align_skips_a_kind_the_scenario_does_not_run():
    s = sc([{"name": "a", "conversion_full_queue": "cf"}], [{"name": "w", "kind": "worker", "queue_priority": "cf"}])
    r = by_clause(lint(s))["CF-ALIGN"]
    assert r.outcome == "passed" and r.exercised == "2 client queue fields checked (no explorer stage: its fields not judged)"


def test_cf_no_dup_fails_on_seed_example():
    # the seed document's own example lists conversions_full_vejstrand twice
    s = sc([{"name": "a"}], [{"name": "w1", "kind": "worker", "queue_priority":
            "conversions_delta_vejstrand conversions_full_vejstrand conversions_delta_magenta conversions_full_vejstrand"},
            {"name": "e", "kind": "explorer"}])
    r = by_clause(lint(s))["CF-NO-DUP"]
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("Stage w1's QUEUE_PRIORITY lists conversions_full_vejstrand twice")


def test_cf_no_dup_not_exercised_without_priority():
    s = sc([{"name": "a"}], [{"name": "w", "kind": "worker"}, {"name": "e", "kind": "explorer"}])
    assert by_clause(lint(s))["CF-NO-DUP"].outcome == "not_exercised"


def test_cf_one_type_fails_on_shared_name():
    s = sc([{"name": "a", "explorer_full_queue": "shared", "conversion_full_queue": "shared"}],
           [{"name": "e", "kind": "explorer", "queue_priority": "shared"}, {"name": "w", "kind": "worker", "queue_priority": "shared"}])
    r = by_clause(lint(s))["CF-ONE-TYPE"]
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("Queue shared is used both as an explorer queue (clients.0.explorer_full_queue (a))")


def tagged(worker_tags, phases, client_per_scan=True):
    """An explorer and one worker per entry of ``worker_tags`` (its CONVERSION_PRIORITY); client a per scan."""
    stages = [{"name": "e", "kind": "explorer"}] + [
        {"name": f"w{i + 1}", "kind": "worker", "conversion_priority": t} for i, t in enumerate(worker_tags)]
    return parse_scenario({"name": "tags", "clients": [{"name": "a", "per_scan": client_per_scan}],
                           "stages": stages, "workload": phases})


def test_cf_tags_passes_when_every_announced_tag_has_a_worker():
    s = tagged(["delta", "full"], [{"client": "a", "mode": "delta"}, {"client": "a", "mode": "full"}])
    r = by_clause(lint(s))["CF-TAGS"]
    assert r.outcome == "passed" and r.exercised == "2 per-scan tag(s) checked against 2 worker stage(s)"


def test_cf_tags_an_empty_conversion_priority_allows_every_tag():
    s = tagged([""], [{"client": "a", "mode": "full", "per_scan": "urgent"}])
    assert by_clause(lint(s))["CF-TAGS"].outcome == "passed"


def test_cf_tags_fails_on_a_tag_no_worker_allows():
    s = tagged(["delta"], [{"client": "a", "mode": "delta"}, {"name": "nightly", "client": "a", "mode": "full"}])
    r = by_clause(lint(s))["CF-TAGS"]
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        "Phase workload.1 (nightly) announces its scans' per-scan queues with tag 'full', which no worker allows "
        "(CONVERSION_PRIORITY: w1 'delta'): its conversions would never be consumed.")
    assert r.findings[0].evidence[0] == {"field": "clients.0.per_scan", "value": "full"}


def test_cf_tags_names_the_phase_field_that_forces_a_tag():
    s = tagged(["delta full"], [{"client": "a", "per_scan": "urgent"}], client_per_scan=False)
    r = by_clause(lint(s))["CF-TAGS"]
    assert r.outcome == "failed" and r.findings[0].evidence[0]["field"] == "workload.0.per_scan"


def test_cf_tags_not_exercised_without_per_scan_routing():
    s = tagged(["delta"], [{"client": "a", "mode": "full"}], client_per_scan=False)
    r = by_clause(lint(s))["CF-TAGS"]
    assert r.outcome == "not_exercised" and r.exercised == "no workload phase is routed through per-scan queues"


def test_cf_not_exercised_without_scenario():
    res = check_all(HB().history(), None, WINDOWS, clauses=["CF"])
    assert [r.outcome for r in res] == ["not_exercised"] * 4


# ---------------------------------------------------------------- FT-QUEUE-GONE

def gone(exit_at=None, deliver_until=40, work_until=45):
    # q0 holds work from 12 s until work_until; q2 (deleted at 10.2) held work before
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").consume(2, "worker", "q2")
    hb.levels(0, 45, {"q0": [(0, 0), (12, 40), (work_until, 0)], "q1": [(0, 0)], "q2": [(0, 10), (10, None)]})
    hb.fault(10, "delete_queue", "q2").delete(10.2, "q2")
    t = 12.5
    while t < deliver_until:
        hb.deliver(t, "q0", "worker")
        t += 1.0
    if exit_at:
        hb.exit(exit_at, "worker", 1)
    return hb.phase(45, "teardown").finish(45.5)


def test_queue_gone_passes_when_stage_keeps_serving():
    r = judge(gone(), "FT-QUEUE-GONE")
    assert r.outcome == "passed" and r.exercised == "1 stage(s) judged after a queue deletion"
    # the deleted queue's consumer ending is legitimate for the QP clauses
    assert judge(gone(), "QP-FIRST-PINNED").outcome == "passed"


def test_queue_gone_fails_when_stage_exits():
    r = judge(gone(exit_at=11), "FT-QUEUE-GONE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == "Stage worker exited (code 1) at +11.0 s, 0.8 s after its queue q2 was deleted."


def test_queue_gone_fails_when_stage_stalls():
    r = judge(gone(deliver_until=20), "FT-QUEUE-GONE")
    assert r.outcome == "failed" and "received nothing for" in r.findings[0].explanation


def test_queue_gone_not_exercised():
    assert judge(HB(), "FT-QUEUE-GONE").outcome == "not_exercised"


def test_queue_gone_not_exercised_when_the_work_ran_out_before_the_engines_next_check():
    # The stage's remaining queues held work for only 0.9 s after the deletion: an engine that notices
    # the missing queue at its next check, and fails there, had already taken everything.
    r = judge(gone(work_until=13, deliver_until=13), "FT-QUEUE-GONE")
    assert r.outcome == "not_exercised"
    assert r.exercised == ("0 stage(s) judged after a queue deletion; 1 fault not judged: delete_queue q2 at +10.2 s "
                           "— only 0.9 s of work in worker's queues after it, the clause needs 2W = 12 s")


def test_queue_gone_counts_work_in_the_remaining_queues_only():
    # q2 keeps reporting work after its deletion event (a late sample): only q0 and q1 count
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").consume(2, "worker", "q2")
    hb.levels(0, 45, {"q0": [(0, 0), (12, 40), (13, 0)], "q1": [(0, 0)], "q2": [(0, 10), (30, None)]})
    hb.fault(10, "delete_queue", "q2").delete(10.2, "q2").deliver(12.5, "q0", "worker")
    r = judge(hb.phase(45, "teardown").finish(45.5), "FT-QUEUE-GONE")
    assert r.outcome == "not_exercised" and "only 0.9 s of work" in r.exercised


def test_queue_gone_exit_fails_even_when_the_fault_is_not_judged():
    r = judge(gone(exit_at=11, work_until=13, deliver_until=13), "FT-QUEUE-GONE")
    assert r.outcome == "failed" and "1 fault not judged" in r.exercised
    assert r.findings[0].explanation.startswith("Stage worker exited (code 1) at +11.0 s")


# ---------------------------------------------------------------- FT-POISON

def poison(deliveries=1, problem=True, exit_at=None, second_poison=None, work_until=24):
    # q0 holds work from the poison on until work_until (the clause needs 2W = 12 s of it)
    hb = HB().stage(0, "worker").consume(1, "worker", "q0")
    hb.levels(0, 40, {"q0": [(0, 0), (10, 5), (work_until, 0)]})
    hb.fault(10, "poison", "q0", shape="not_json").publish(10.1, "q0", "Unparseable", stage=None)
    for k in range(deliveries):
        hb.deliver(10.2 + k * 0.5, "q0", "worker", "Unparseable", redelivered=k > 0)
    if problem:
        hb.publish(10.4, "os2ds_problems", "ProblemMessage", stage="worker")
    if second_poison is not None:  # a second fault, missing_fields; reported or not
        hb.fault(12, "poison", "q0", shape="missing_fields").publish(12.1, "q0", "Unparseable", stage=None)
        hb.deliver(12.2, "q0", "worker", "Unparseable")
        if second_poison == "reported":
            hb.publish(12.3, "os2ds_problems", "ProblemMessage", stage="worker")
    for k in range(int(work_until) - 10):
        hb.deliver(11 + k, "q0", "worker")
    if exit_at:
        hb.exit(exit_at, "worker", -11)
    return hb.phase(40, "teardown").finish(40.5)


def test_poison_passes():
    r = judge(poison(), "FT-POISON")
    assert r.outcome == "passed" and r.exercised == "1 poison messages judged"


def test_poison_fails_on_requeue_loop():
    r = judge(poison(deliveries=6), "FT-POISON")
    assert r.outcome == "failed"
    assert "were delivered 6 times" in r.findings[0].explanation


def test_poison_split_across_two_faults_by_late_stamps_is_no_requeue_loop():
    # Seen on a loaded machine: the firehose stamped the second not_json publish after the next
    # poison fault, so one fault owned 1 publish and saw 3 Unparseable deliveries from its t0.
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 40, {"q0": [(0, 0), (10, 5), (16, 0)]})
    hb.fault(10, "poison", "q0", shape="not_json", count=2).publish(10.4, "q0", "Unparseable", stage=None)
    hb.fault(10.5, "poison", "q0", shape="missing_fields")
    hb.publish(11.0, "q0", "Unparseable", stage=None).publish(12.0, "q0", "Unparseable", stage=None)
    for t in (11.7, 11.7, 12.9):
        hb.deliver(t, "q0", "worker", "Unparseable")
    for t in (11.8, 11.8, 13.0):
        hb.publish(t, "os2ds_problems", "ProblemMessage", stage="worker")
    for k in range(5):
        hb.deliver(13.5 + k, "q0", "worker", "ConversionMessage")
    r = judge(hb, "FT-POISON")
    assert not any("requeued" in f.explanation for f in r.findings), [f.explanation for f in r.findings]


def test_poison_fails_without_problem_report():
    r = judge(poison(problem=False), "FT-POISON")
    assert r.outcome == "failed" and "but only 0 ProblemMessage(s) were reported" in r.findings[0].explanation


def test_poison_needs_a_problem_report_for_each_message():
    assert judge(poison(second_poison="reported"), "FT-POISON").outcome == "passed"
    r = judge(poison(second_poison="silently dropped"), "FT-POISON")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker received poison from q0 at +12.2 s: 1 poison message(s) from "
                                         "then on, but only 0 ProblemMessage(s) were reported (no ProblemMessage).")


def test_poison_fails_when_it_blocks_the_queue():
    # Reported, but the stage then takes nothing more from q0 while q0 holds work (stuck on the poison).
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 40, {"q0": [(0, 0), (10, 5)]})
    hb.fault(10, "poison", "q0", shape="not_json").publish(10.1, "q0", "Unparseable", stage=None)
    hb.deliver(10.2, "q0", "worker", "Unparseable").publish(10.4, "os2ds_problems", "ProblemMessage", stage="worker")
    r = judge(hb.phase(40, "teardown").finish(40.5), "FT-POISON")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Queue q0 was blocked after the poison message: consumed and holding ready "
                                         "messages, yet nothing was delivered from it for 29.8 s (+10.2..+40.0 s).")


def test_poison_fails_when_stage_dies():
    r = judge(poison(exit_at=10.5), "FT-POISON")
    assert r.outcome == "failed" and r.findings[0].explanation.startswith("Stage worker exited (code -11) at +10.5 s")


def test_poison_not_exercised():
    assert judge(HB(), "FT-POISON").outcome == "not_exercised"


def test_poison_not_exercised_when_the_work_ran_out_too_soon():
    r = judge(poison(work_until=16), "FT-POISON")
    assert r.outcome == "not_exercised"
    assert r.exercised == ("0 poison messages judged; 1 fault not judged: poison q0 at +10.1 s — only 5.8 s of work "
                           "in worker's queues after it, the clause needs 2W = 12 s")


def test_poison_requeue_loop_fails_even_when_the_fault_is_not_judged():
    r = judge(poison(deliveries=6, work_until=16), "FT-POISON")
    assert r.outcome == "failed" and "1 fault not judged" in r.exercised
    assert "were delivered 6 times" in r.findings[0].explanation


# ---------------------------------------------------------------- FT-RECONNECT

def reconnect(back_at=14.0, with_q0=True, work_until=30):
    # q0 holds work from before the close until work_until (the clause needs 2W = 12 s of it after the close)
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 60, {"q0": [(0, 0), (11, 8), (work_until, 0)]})
    hb.fault(10, "close_connection", "worker").cancel(12, "worker", "q0").conn_closed(12.01, "worker")
    if back_at is not None:
        hb.consume(back_at, "worker", "q0" if with_q0 else "q1")
    hb.plan(0.5, "s1", ["a"]).publish(20, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    return hb.phase(60, "teardown").finish(60.5)


def test_reconnect_passes():
    r = judge(reconnect(), "FT-RECONNECT")
    assert r.outcome == "passed" and r.exercised == "1 connection closes judged"
    assert judge(reconnect(), "QP-FIRST-PINNED").outcome == "passed"


def test_reconnect_fails_when_never_back():
    r = judge(reconnect(back_at=None), "FT-RECONNECT")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker did not consume again within G = 30 s after the broker closed "
                                         "its connection at +12.0 s.")


def test_reconnect_fails_without_first_queue():
    r = judge(reconnect(with_q0=False), "FT-RECONNECT")
    assert r.outcome == "failed" and "held no consumer on its first queue q0" in r.findings[0].explanation


def test_reconnect_is_timed_from_the_connection_close_not_an_own_channel_close():
    # The stage closes a channel of its own (and consumes on a fresh one) at 10.3, before the
    # management API closes its connection at 12; it never consumes after that.
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").fault(10, "close_connection", "worker")
    hb.ev(10.3, "channel_closed", chan="chan-old", stage="worker").consume(10.4, "worker", "q1")
    hb.cancel(12, "worker", "q0").cancel(12, "worker", "q1").conn_closed(12.01, "worker")
    hb.plan(0.5, "s1", ["a"]).publish(5, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    r = judge(hb.phase(60, "teardown").finish(60.5), "FT-RECONNECT")
    assert r.outcome == "failed"
    assert "did not consume again within G = 30 s after the broker closed its connection at +12.0 s" in \
        r.findings[0].explanation


def test_reconnect_not_exercised_when_no_close_happened():
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").fault(10, "close_connection", "worker")
    assert judge(hb, "FT-RECONNECT").outcome == "not_exercised"


def test_reconnect_not_exercised_when_the_work_ran_out_too_soon():
    r = judge(reconnect(work_until=15), "FT-RECONNECT")
    assert r.outcome == "not_exercised"
    assert r.exercised == ("0 connection closes judged; 1 fault not judged: close_connection worker at +12.0 s — "
                           "only 2.9 s of work in worker's queues after it, the clause needs 2W = 12 s")


def test_reconnect_not_exercised_when_the_run_ends_before_the_stage_had_to_be_back():
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 30, {"q0": [(0, 0), (11, 8)]})
    hb.fault(10, "close_connection", "worker").cancel(12, "worker", "q0").conn_closed(12.01, "worker")
    r = judge(hb.phase(30, "teardown").finish(30.5), "FT-RECONNECT")
    assert r.outcome == "not_exercised"
    assert r.exercised.endswith("close_connection worker at +12.0 s — the run ended 18.0 s after it, before the "
                                "stage consumed again (it has G = 30 s)")


def test_reconnect_failure_counts_even_when_the_close_is_not_judged():
    r = judge(reconnect(with_q0=False, work_until=15), "FT-RECONNECT")
    assert r.outcome == "failed" and "1 fault not judged" in r.exercised


def test_reconnect_under_a_restart_policy_counts_work_from_the_restart():
    # 2W of work after the close, but only 10.7 s after the supervisor restart at 13.2 s
    r = judge(supervised_reconnect(work_until=24), "FT-RECONNECT")
    assert r.outcome == "not_exercised"
    assert r.exercised.endswith("close_connection worker at +12.0 s — only 10.7 s of work in worker's queues after its "
                                "supervisor restart at +13.2 s, the clause needs 2W = 12 s")


def test_reconnect_close_at_teardown_is_not_the_fault_taking_effect():
    # the management API never closed the connection; the only close is the harness stopping the stage
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").fault(5, "close_connection", "worker")
    hb.phase(14, "teardown").cancel(14.05, "worker", "q0").conn_closed(14.06, "worker").exit(14.3, "worker")
    r = judge(hb, "FT-RECONNECT")
    assert r.outcome == "not_exercised" and "the broker closed no stage connection" in r.exercised


# -- FT-RECONNECT under a restart policy (the stage exits on the close and its supervisor restarts it)

def supervised_reconnect(exit_rc=5, supervisor="restarting", back_at=14.0, crash_again=None, work_until=30):
    # q0 holds work until work_until: 2W = 12 s of it are needed after the supervisor restart at 13.2
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 60, {"q0": [(0, 0), (11, 8), (work_until, 0)]})
    hb.fault(10, "close_connection", "worker").cancel(12, "worker", "q0").conn_closed(12.01, "worker")
    if supervisor == "restarting":
        hb.supervised_restart(12.2, "worker", exit_rc, 1)
    else:
        hb.exit(12.2, "worker", exit_rc, supervisor=supervisor)
    if crash_again:
        hb.exit(13.5, "worker", exit_rc, supervisor=crash_again)
    elif back_at is not None:
        hb.consume(back_at, "worker", "q0")
    hb.plan(0.5, "s1", ["a"]).publish(20, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    return hb.phase(60, "teardown").finish(60.5)


def test_reconnect_passes_when_the_restart_policy_restarts_the_stage():
    r = judge(supervised_reconnect(), "FT-RECONNECT")
    assert r.outcome == "passed", r.findings
    assert r.exercised == "1 connection closes judged (1 answered by a supervisor restart)"


def test_a_supervised_restart_is_not_reported_by_other_clauses():
    hb = supervised_reconnect()
    for clause in ("QP-FIRST-PINNED", "QP-DECLARE", "DL-EXACTLY-ONCE"):
        assert judge(hb, clause).outcome in ("passed", "not_exercised"), clause
    ctx = build_context(hb.history(), scenario(), WINDOWS)
    assert [(round(a - T0, 1), round(b - T0, 1)) for a, b in ctx.stages["worker"].lives] == [(0.0, 12.2), (13.2, 60.5)]


def test_reconnect_fails_when_the_stage_exits_without_a_restart_policy():
    r = judge(supervised_reconnect(supervisor=None), "FT-RECONNECT")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker exited (code 5) at +12.2 s instead of reconnecting after the "
                                         "broker closed its connection at +12.0 s (no restart policy restarted it).")


def test_reconnect_fails_when_the_restart_policy_gives_up():
    r = judge(supervised_reconnect(crash_again="gave_up"), "FT-RECONNECT")
    assert r.outcome == "failed"
    assert "exited (code 5) at +13.5 s" in r.findings[0].explanation
    assert "(its restart policy gave up after 1 restart)" in r.findings[0].explanation


def test_a_clean_exit_restarted_by_policy_always_is_no_reconnect():
    r = judge(supervised_reconnect(exit_rc=0), "FT-RECONNECT")
    assert r.outcome == "failed" and "exit code 0" in r.findings[0].explanation


def test_reconnect_fails_when_the_restarted_stage_does_not_consume_within_g():
    r = judge(supervised_reconnect(back_at=None), "FT-RECONNECT")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Stage worker did not consume again within G = 30 s after its supervisor "
                                         "restart at +13.2 s.")


def test_a_crash_loop_on_poison_fails_under_a_restart_policy():
    hb = HB().stage(0, "worker").consume(1, "worker", "q0").levels(0, 40, {"q0": [(0, 0), (10, 5), (16, 0)]})
    hb.fault(10, "poison", "q0", shape="not_json").publish(10.1, "q0", "Unparseable", stage=None)
    hb.deliver(10.2, "q0", "worker", "Unparseable").supervised_restart(10.3, "worker", 3, 1)
    hb.deliver(11.5, "q0", "worker", "Unparseable", redelivered=True).exit(11.6, "worker", 3, supervisor="gave_up")
    r = judge(hb.phase(40, "teardown").finish(40.5), "FT-POISON")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == (
        "Stage worker exited (code 3) at +10.3 s, 0.3 s after a poison message was put in q0; its restart policy "
        "restarted it 1 time from then on (a restart does not excuse the exit).")


def test_poison_crash_counts_when_the_firehose_stamps_the_poison_after_the_exit_and_the_teardown():
    # Seen on a loaded machine: the worker died of the poison at +1.5 s, the run's teardown mark came in the
    # same instant, and the tracer's copy of the poison publish arrived at +1.8 s.
    hb = HB().stage(0, "worker").consume(0.5, "worker", "q0").levels(0, 3, {"q0": [(0, 0), (1.3, 1)]})
    hb.fault(1.3, "poison", "q0", shape="not_json")
    hb.ev(1.52, "stage_exited", stage="worker", pid=0, returncode=3, expected=False, supervisor=None)
    hb.phase(1.52, "teardown").publish(1.78, "q0", "Unparseable", stage=None)
    hb.deliver(1.81, "q0", "worker", "Unparseable")
    r = judge(hb.finish(3), "FT-POISON")
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("Stage worker exited (code 3) at +1.5 s, 0.2 s after a poison message")


def test_reconnect_takes_the_exit_as_the_close_when_the_close_was_not_tied_to_the_stage():
    # Seen live: the fault's connection close was stamped without a stage; the worker then exited
    # (code 5) and its supervisor restarted it; only the close at its exit named the worker.
    hb = HB().stage(0, "worker", priority=("q0",)).consume(0.5, "worker", "q0")
    hb.levels(0, 30, {"q0": [(0, 0), (1, 10), (25, 0)]})
    hb.fault(1.5, "close_connection", "worker").ev(2.3, "connection_closed", conn="c1", stage=None)
    hb.supervised_restart(3.7, "worker", 5, 1, backoff=0.2, priority=("q0",))
    hb.ev(3.72, "connection_closed", conn="c0", stage="worker").consume(4.5, "worker", "q0")
    r = judge(hb.phase(30, "teardown").finish(30.5), "FT-RECONNECT")
    assert r.outcome == "passed" and "1 answered by a supervisor restart" in r.exercised, (r.exercised, r.findings)


# ---------------------------------------------------------------- FT-BAD-COMMAND

def bad_command(exit_at=None, deliver_until=40, work_until=45, late_result=None, supervisor=None):
    # q0 holds work from 2 s until work_until; malformed broadcast messages at 10 s; abort of scan s1 at 11 s
    hb = HB().stage(0, "worker").consume(1, "worker", "q0")
    hb.levels(0, 45, {"q0": [(0, 0), (2, 40), (work_until, 0)], "q1": [(0, 0)], "q2": [(0, 0)]})
    hb.fault(10, "bad_command", None).ev(11, "phase", name="scan_aborted", scan="s1", client="a")
    t = 2.5
    while t < deliver_until:
        hb.deliver(t, "q0", "worker")
        t += 1.0
    if late_result is not None:
        hb.publish(late_result, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1")
    if exit_at:
        hb.exit(exit_at, "worker", 6, supervisor=supervisor)
    return hb.phase(45, "teardown").finish(45.5)


def test_bad_command_passes_when_every_stage_keeps_serving():
    r = judge(bad_command(), "FT-BAD-COMMAND")
    assert r.outcome == "passed" and r.exercised == "1 stage(s) judged after 1 malformed-command fault(s)"


def test_bad_command_fails_when_a_stage_exits_even_if_its_policy_restarts_it():
    r = judge(bad_command(exit_at=10.5, supervisor="restarting"), "FT-BAD-COMMAND")
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("Stage worker exited (code 6) at +10.5 s, 0.5 s after malformed "
                                                "messages on the broadcast exchange")


def test_bad_command_fails_when_a_stage_wedges():
    r = judge(bad_command(deliver_until=11), "FT-BAD-COMMAND")
    assert r.outcome == "failed" and "it is wedged or stalled" in r.findings[0].explanation


def test_bad_command_fails_when_a_later_abort_does_not_take_effect():
    assert judge(bad_command(late_result=16.0), "FT-BAD-COMMAND").outcome == "passed"  # within W of the abort
    r = judge(bad_command(late_result=18.0), "FT-BAD-COMMAND")
    assert r.outcome == "failed" and "the abort did not take effect" in r.findings[0].explanation


def test_bad_command_not_exercised_without_the_fault_or_without_work_after_it():
    assert judge(HB(), "FT-BAD-COMMAND").outcome == "not_exercised"
    r = judge(bad_command(work_until=12, deliver_until=12), "FT-BAD-COMMAND")
    assert r.outcome == "not_exercised" and "only 1.9 s of work in worker's queues after the malformed commands" \
        in r.exercised


def test_cf_tags_is_applied_by_the_lint_command(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "tags.yaml"
    path.write_text("name: tags\nclients: [{name: a, per_scan: true}]\n"
                    "stages: [{name: e, kind: explorer}, {name: w, kind: worker, conversion_priority: delta}]\n"
                    "workload: [{client: a, mode: full}]\n")
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "CF-TAGS failed" in out.splitlines()[0]
    assert out.splitlines()[1].endswith(f"[{path}: clients.0.per_scan]")
