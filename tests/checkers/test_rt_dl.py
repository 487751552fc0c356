"""RT-* and DL-EXACTLY-ONCE on hand-written histories."""
from __future__ import annotations

from .builder import HB, judge, scenario


def queues(hb, *names, t=0.5):
    for q in names:
        hb.queue(t, q)
    return hb


# ---------------------------------------------------------------- RT-ONE-TYPE

def test_one_type_passes():
    hb = queues(HB(), "q0", "os2ds_checkups")
    hb.publish(1, "q0").publish(2, "q0")
    hb.publish(3, "os2ds_checkups", "MatchesMessage", stage="worker").publish(4, "os2ds_checkups", "ProblemMessage", stage="worker")
    r = judge(hb, "RT-ONE-TYPE")
    assert r.outcome == "passed" and r.exercised == "2 messages classified in 1 queues"


def test_one_type_fails_on_mixed_queue():
    hb = queues(HB(), "q0").publish(1, "q0").publish(2, "q0", "ScanSpecMessage", stage="harness")
    r = judge(hb, "RT-ONE-TYPE")
    assert r.outcome == "failed"
    assert r.findings[0].explanation == ("Queue q0 carried ConversionMessage (first at +1.0 s) and then ScanSpecMessage "
                                         "at +2.0 s, published by harness.")


def test_one_type_ignores_injected_poison():
    hb = queues(HB(), "q0").publish(1, "q0").fault(2, "poison", "q0").publish(2.1, "q0", "Unparseable", stage=None)
    assert judge(hb, "RT-ONE-TYPE").outcome == "passed"


def test_one_type_not_exercised():
    assert judge(HB(), "RT-ONE-TYPE").outcome == "not_exercised"


# ---------------------------------------------------------------- RT-TENANT

def tenant(conv_queue="conv_full", org="org-a"):
    hb = queues(HB(), "conv_full", "conv_delta", "os2ds_matches").plan(0.8, "s1", ["a.txt"])
    hb.publish(1, conv_queue, scan="s1", org="org-a", object="a.txt")
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", org=org, object="a.txt")
    return hb


def test_tenant_passes():
    r = judge(tenant(), "RT-TENANT")
    assert r.outcome == "passed" and r.exercised == "1 conversions and 1 results followed for 1 scans"


def test_tenant_fails_on_wrong_conversion_queue():
    r = judge(tenant(conv_queue="conv_delta"), "RT-TENANT")
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("A conversion of full scan s1 (client a) went to conv_delta instead of conv_full")


def test_tenant_fails_on_wrong_organisation():
    r = judge(tenant(org="org-b"), "RT-TENANT")
    assert r.outcome == "failed" and "carries organisation org-b instead of org-a" in r.findings[0].explanation


def test_tenant_not_exercised():
    assert judge(HB(), "RT-TENANT").outcome == "not_exercised"


# ---------------------------------------------------------------- RT-ROUTABLE

def test_routable_passes():
    hb = queues(HB(), "q0").publish(1, "q0")
    hb.publish(2, "q9", stage="explorer").queue(2.1, "q9")  # created within the receipt-order slack
    hb.publish(3, "", "CommandMessage", exchange="broadcast", stage="harness")
    r = judge(hb, "RT-ROUTABLE")
    assert r.outcome == "passed" and r.exercised == "3 publishes judged"


def test_routable_fails_on_missing_queue():
    hb = queues(HB(), "q0").publish(1, "q0").publish(2, "conversions_typo").publish(3, "conversions_typo")
    r = judge(hb, "RT-ROUTABLE")
    assert r.outcome == "failed" and len(r.findings) == 1
    assert r.findings[0].explanation == ("Stage explorer published a ConversionMessage to routing key conversions_typo at "
                                         "+2.0 s but no queue received it (no such queue existed then); 2 such "
                                         "publishes until +3.0 s.")


def test_routable_fails_after_deletion_and_uses_samples():
    hb = HB().levels(0, 3, {"q1": [(0, 0), (1.5, None)]}).publish(1, "q1").publish(2, "q1")
    r = judge(hb, "RT-ROUTABLE")
    assert r.outcome == "failed" and "+2.0 s" in r.findings[0].explanation


def test_routable_fanout_with_no_bound_queue_fails():
    hb = HB().publish(1, "", "CommandMessage", exchange="broadcast", stage="harness", routed=[])
    r = judge(hb, "RT-ROUTABLE")
    assert r.outcome == "failed" and "exchange 'broadcast'" in r.findings[0].explanation


def test_routable_not_exercised():
    assert judge(HB(), "RT-ROUTABLE").outcome == "not_exercised"


# ---------------------------------------------------------------- RT-BROADCAST

def test_broadcast_passes():
    hb = HB().publish(1, "", "CommandMessage", exchange="broadcast", stage="harness").deliver(1.1, "amq.gen-x", "worker", "CommandMessage")
    assert judge(hb, "RT-BROADCAST").outcome == "passed"


def test_broadcast_fails_on_data_queue():
    hb = queues(HB(), "q0").publish(1, "q0", "CommandMessage", stage="harness").deliver(1.1, "q0", "worker", "CommandMessage")
    r = judge(hb, "RT-BROADCAST")
    assert r.outcome == "failed" and len(r.findings) == 2
    assert r.findings[0].explanation.startswith("A CommandMessage was published to the default exchange (routing key q0)")


def test_broadcast_allows_the_admins_hello_reply_to_a_workers_command_queue_only():
    reply = HB().publish(1, "amq.gen-w-1", "CommandMessage", stage="harness", new_queue="osds_conversions.7_x")
    assert judge(reply, "RT-BROADCAST").outcome == "passed"
    abort = HB().publish(1, "amq.gen-w-1", "CommandMessage", stage="harness", abort="7@x")  # not a hello reply
    assert judge(abort, "RT-BROADCAST").outcome == "failed"


def test_routable_excuses_a_per_scan_queue_the_admin_deleted_on_an_abort_but_not_at_scan_end():
    def after(reason):
        hb = queues(HB(), "osds_conversions.7_x").publish(1, "osds_conversions.7_x")
        hb.ps_delete(2, "osds_conversions.7_x", reason=reason)
        return judge(hb.publish(3, "osds_conversions.7_x"), "RT-ROUTABLE")
    assert after("abort").outcome == "passed" and "excused" in after("abort").exercised
    assert after("scan_end").outcome == "failed"


def test_broadcast_not_exercised():
    assert judge(queues(HB(), "q0").publish(1, "q0"), "RT-BROADCAST").outcome == "not_exercised"


# ---------------------------------------------------------------- DL-EXACTLY-ONCE

def results(*objs, scan="s1", planned=("a", "b", "c")):
    hb = HB().plan(0.5, scan, planned)
    for k, o in enumerate(objs):
        hb.publish(1 + k, "os2ds_matches", "MatchesMessage", stage="worker", scan=scan, org="org-a", object=o)
    return hb


def test_exactly_once_passes():
    r = judge(results("a", "b", "c"), "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.exercised == "3 objects of 1 scans checked"


def test_exactly_once_reports_lost():
    r = judge(results("a"), "DL-EXACTLY-ONCE")
    assert r.outcome == "failed" and r.metrics["lost"] == 2
    assert r.findings[0].explanation == "2 of 3 objects produced no result: b (s1), c (s1)."


def test_exactly_once_reports_duplicates_and_unexpected():
    r = judge(results("a", "b", "c", "c", "zzz"), "DL-EXACTLY-ONCE")
    assert r.outcome == "failed"
    texts = [f.explanation for f in r.findings]
    assert texts == ["1 objects produced more than one result (2 results in all): c (s1).",
                     "1 results are for objects no scan planned: zzz (s1)."]


def test_exactly_once_allows_duplicates_after_a_redelivery_when_asked():
    hb = results("a", "b", "c", "c").deliver(3.5, "conv_full", "worker", redelivered=True, scan="s1", object="c")
    r = judge(hb, "DL-EXACTLY-ONCE", scenario(allow_duplicates=True))
    assert r.outcome == "passed" and "1 duplicated after a redelivery, allowed" in r.exercised


def test_exactly_once_duplicate_without_redelivery_fails_even_when_duplicates_are_allowed():
    # A result published twice for a conversion handed out once is a bug in any scenario.
    r = judge(results("a", "b", "c", "c"), "DL-EXACTLY-ONCE", scenario(allow_duplicates=True))
    assert r.outcome == "failed"
    assert r.findings[0].explanation.startswith("1 objects produced more than one result")


def test_exactly_once_excuses_missing_results_of_an_aborted_scan_only():
    hb = results("a").ev(2.5, "phase", name="scan_aborted", scan="s1", client="a")
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and "1 aborted scan(s)" in r.exercised


def test_exactly_once_problem_is_not_lost():
    hb = results("a", "b").publish(5, "os2ds_problems", "ProblemMessage", stage="worker", scan="s1", object="c")
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.metrics["as_problem"] == 1


def test_exactly_once_falls_back_to_output_reads():
    hb = HB().plan(0.5, "s1", ["a"]).output(2, "os2ds_matches", "MatchesMessage", scan="s1", object="a")
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.metrics["source"] == "read from output queues"


def test_exactly_once_not_exercised():
    assert judge(HB(), "DL-EXACTLY-ONCE").outcome == "not_exercised"


def test_fault_deleted_queue_excuses_unroutable_and_lost():
    hb = queues(HB(), "conv_full", "os2ds_matches").plan(0.8, "s1", ["a", "b"])
    hb.publish(1, "conv_full", scan="s1", object="a").publish(1.1, "conv_full", scan="s1", object="b")
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    hb.fault(3, "delete_queue", "conv_full").delete(3.2, "conv_full").publish(4, "conv_full", scan="s1", object="b")
    r = judge(hb, "RT-ROUTABLE")
    assert r.outcome == "passed" and "1 to a queue a fault deleted, excused" in r.exercised
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.metrics["dropped_by_fault"] == 1


def test_an_object_taken_before_its_queue_was_deleted_is_still_owed():
    # b was delivered from conv_full before the fault deleted the queue: the stage had it, and lost it.
    hb = queues(HB(), "conv_full", "os2ds_matches").plan(0.8, "s1", ["a", "b", "c"])
    for k, obj in enumerate("abc"):
        hb.publish(1 + k / 10, "conv_full", scan="s1", object=obj)
    hb.deliver(1.5, "conv_full", "worker", scan="s1", object="a").deliver(2.5, "conv_full", "worker", scan="s1", object="b")
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    hb.fault(3, "delete_queue", "conv_full").delete(3.2, "conv_full")
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "failed" and r.metrics["lost"] == 1 and r.metrics["dropped_by_fault"] == 1
    assert "b (s1)" in r.findings[0].explanation


def test_routable_trusts_queue_created_over_a_stale_missing_sample():
    # the sampler re-probes a missing queue only now and then: its null at 1.05 s is stale
    hb = HB().levels(0, 0.9, {"q5": [(0, None)]}, dt=0.3).queue(1.0, "q5")
    hb.ev(1.05, "sample", ready={"q5": None}).publish(1.1, "q5").ev(2.0, "sample", ready={"q5": 0})
    assert judge(hb, "RT-ROUTABLE").outcome == "passed"


def test_a_conversion_no_queue_received_is_rt_routables_finding_not_also_a_loss():
    # An engine that publishes without mandatory: the conversion of b went to a queue that does not exist.
    hb = queues(HB(), "conv_full", "os2ds_matches").plan(0.8, "s1", ["a", "b"])
    hb.publish(1, "conv_full", scan="s1", object="a").publish(1.1, "conv_nowhere", scan="s1", object="b")
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    assert judge(hb, "RT-ROUTABLE").outcome == "failed"
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.metrics["dropped_unroutable"] == 1
    assert "1 whose conversion no queue received: RT-ROUTABLE's finding" in r.exercised


def test_exactly_once_counts_a_result_either_source_saw_and_a_redelivered_read_once():
    # The tracer lost the publish of b (a broker restart drops its backlog); the observer read b's
    # result twice, the second time as a redelivery after the restart.
    hb = queues(HB(), "conv_full", "os2ds_matches").plan(0.8, "s1", ["a", "b"])
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    hb.output(2.1, "os2ds_matches", "MatchesMessage", scan="s1", object="a")
    hb.output(2.2, "os2ds_matches", "MatchesMessage", scan="s1", object="b")
    hb.phase(4.9, "observer_reconnected")
    hb.ev(5, "output", queue="os2ds_matches", redelivered=True, msg={"type": "MatchesMessage", "scan": "s1", "object": "b"})
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "passed" and r.metrics["results"] == 2
    assert r.metrics["source"] == "published and read from output queues"


def test_exactly_once_still_sees_a_duplicate_only_one_source_saw():
    hb = queues(HB(), "conv_full", "os2ds_matches").plan(0.8, "s1", ["a"])
    hb.publish(2, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    hb.publish(2.5, "os2ds_matches", "MatchesMessage", stage="worker", scan="s1", object="a")
    hb.output(2.1, "os2ds_matches", "MatchesMessage", scan="s1", object="a")
    r = judge(hb, "DL-EXACTLY-ONCE")
    assert r.outcome == "failed" and r.metrics["duplicated"] == 1


def test_a_scan_the_harness_published_again_after_a_planned_restart_may_be_duplicated_when_allowed():
    hb = results("a", "b", "c", "c").ev(0.9, "phase", name="publish_resumed", resent=3, scans=["s1"])
    assert judge(hb, "DL-EXACTLY-ONCE", scenario(allow_duplicates=True)).outcome == "passed"
    assert judge(hb, "DL-EXACTLY-ONCE").outcome == "failed"  # still a duplicate where none is allowed
