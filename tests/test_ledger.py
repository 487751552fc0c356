"""The ledger without a broker: hand-built event lists, folded in time order and out of it."""
from __future__ import annotations

import random

from harness.history import HistoryWriter, make_event
from harness.ledger import Ledger, LiveLedger

T0 = 1_000_000.0


def ev(t, type_, **fields):
    return make_event(type_, T0 + t, **fields)


def plan(t, scan, objects, queue="conv", client="c"):
    return ev(t, "scan_planned", scan=scan, client=client, org="o", mode="full", explorer_queue="spec",
              conversion_queue=queue, objects=list(objects), via="conversions")


def msg(type_, scan, obj=None):
    return {"type": type_, "scan": scan, "org": "o", **({"object": obj} if obj is not None else {})}


def result(t, scan, obj, witness="published"):
    m = msg("MatchesMessage", scan, "/" + obj)  # engines name the handle's path with a leading slash
    if witness == "published":
        return ev(t, "publish", exchange="", routing_key="os2ds_matches", stage="worker", routed=[], msg=m)
    return ev(t, "output", queue="os2ds_matches", msg=m, redelivered=False)


def problem(t, scan, obj):
    return ev(t, "publish", exchange="", routing_key="os2ds_problems", stage="worker", routed=[],
              msg={**msg("ProblemMessage", scan, obj), "message": "cannot read"})


def conversion(t, scan, obj, queue="conv", stage="harness"):
    return ev(t, "publish", exchange="", routing_key=queue, stage=stage, routed=[queue],
              msg=msg("ConversionMessage", scan, obj))


def deliver(t, scan, obj, queue="conv", redelivered=False):
    return ev(t, "deliver", queue=queue, stage="worker", redelivered=redelivered,
              msg=msg("ConversionMessage", scan, obj))


def test_an_object_is_owed_until_either_witness_sees_its_result():
    ledger = Ledger.of([plan(0, "s", ["a", "b", "c"]), result(1, "s", "a"), result(2, "s", "b", witness="read")])
    assert ledger.owed() == 1 and ledger.answered_count() == 2
    assert ledger.lost == [("s", "c")]
    ledger.add(problem(3, "s", "c"))
    assert ledger.owed() == 0 and ledger.as_problem == [("s", "c")]


def test_the_larger_count_of_the_two_witnesses_counts_not_their_sum():
    ledger = Ledger.of([plan(0, "s", ["a"]), result(1, "s", "a"), result(1.1, "s", "a", witness="read"),
                        result(2, "s", "a", witness="read")])
    assert ledger.results[("s", "a")] == 2 and ledger.duplicated == {("s", "a"): 2}
    assert ledger.source == "published and read from output queues"


def test_results_outside_the_result_queue_or_for_no_plan_are_not_answers():
    wrong_queue = ev(1, "publish", exchange="", routing_key="os2ds_metadata", stage="worker", routed=[],
                     msg=msg("MatchesMessage", "s", "a"))
    stranger = result(2, "s", "zzz")
    ledger = Ledger.of([plan(0, "s", ["a"]), wrong_queue, stranger])
    assert ledger.lost == [("s", "a")] and ledger.unexpected == [("s", "zzz")]


def test_an_aborted_scan_owes_nothing_more():
    ledger = Ledger.of([plan(0, "s", ["a", "b"]), plan(0, "t", ["x"]), result(1, "s", "a"),
                        ev(2, "phase", name="scan_aborted", scan="s", client="c")])
    assert ledger.owed() == 1 and ledger.lost == [("t", "x")] and ledger.aborted == {"s"}


def test_a_deleted_queue_drops_what_it_held_but_not_what_a_stage_took_before():
    events = [plan(0, "s", ["a", "b", "c"], queue="low"), conversion(1, "s", "a", "low"),
              conversion(1, "s", "b", "low"), conversion(1, "s", "c", "low"),
              deliver(2, "s", "a", "low"),
              ev(5, "fault", kind="delete_queue", target="low", detail="faults.0", params={}, name=None),
              deliver(5.5, "s", "b", "low"),  # taken after the request, before the broker deleted the queue
              ev(6, "queue_deleted", queue="low")]
    ledger = Ledger.of(events)
    # the broker's queue_deleted (6), not the request (5), is when the queue went: a and b are owed
    assert ledger.deleted_at() == {"low": T0 + 6}
    assert ledger.dropped_by_fault == [("s", "c")]
    assert ledger.lost == [("s", "a"), ("s", "b")]


def test_without_the_brokers_event_the_fault_marks_the_deletion():
    events = [plan(0, "s", ["a", "b"], queue="low"), conversion(1, "s", "a", "low"), conversion(1, "s", "b", "low"),
              deliver(2, "s", "a", "low"),
              ev(5, "fault", kind="delete_queue", target="low", detail="faults.0", params={}, name=None),
              deliver(5.5, "s", "b", "low")]
    assert Ledger.of(events).lost == [("s", "a")]


def test_unroutable_conversions_are_excused_once_marked():
    lost_publish = conversion(1, "s", "b", "nowhere", stage="explorer")
    ledger = Ledger.of([plan(0, "s", ["a", "b"]), lost_publish, result(2, "s", "a")])
    assert ledger.lost == [("s", "b")]
    ledger.mark_unroutable(lost_publish)
    assert ledger.owed() == 0 and ledger.dropped_unroutable == [("s", "b")]


def test_redeliveries_explain_duplicates():
    events = [plan(0, "s", ["a", "b"]), deliver(1, "s", "a", redelivered=True),
              ev(1, "deliver", queue="spec", stage="explorer", redelivered=True, msg=msg("ScanSpecMessage", "t")),
              ev(2, "phase", name="publish_resumed", scans=["u"], resent=3, error="x")]
    ledger = Ledger.of(events)
    assert ledger.after_redelivery(("s", "a")) and not ledger.after_redelivery(("s", "b"))
    assert ledger.after_redelivery(("t", "x")) and ledger.after_redelivery(("u", "y"))


def test_the_account_does_not_depend_on_the_order_events_arrive_in():
    events = [plan(0, "s", ["a", "b", "c", "d"], queue="low"), plan(0.5, "t", ["x"]),
              *(conversion(1, "s", o, "low") for o in "abcd"), deliver(2, "s", "a", "low"),
              result(3, "s", "a"), result(3.2, "s", "a", witness="read"), problem(3.5, "s", "b"),
              ev(4, "fault", kind="delete_queue", target="low", detail="faults.0", params={}, name=None),
              ev(4.2, "queue_deleted", queue="low"), deliver(4.1, "s", "c", "low"),
              ev(5, "phase", name="scan_aborted", scan="t", client="c")]
    expected = Ledger.of(events)
    for seed in range(20):
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        ledger = Ledger.of(shuffled)
        assert (ledger.lost, ledger.owed(), ledger.dropped_by_fault, ledger.as_problem) == \
            (expected.lost, expected.owed(), expected.dropped_by_fault, expected.as_problem)
    assert expected.lost == [("s", "c")] and expected.dropped_by_fault == [("s", "d")]


def test_the_live_ledger_follows_the_writer_as_events_are_recorded():
    history = HistoryWriter()
    live = LiveLedger()
    history.listen(live)
    history.record("scan_planned", scan="s", client="c", org="o", mode="full", explorer_queue="spec",
                   conversion_queue="conv", objects=["a", "b"], via="conversions")
    history.record("publish", exchange="", routing_key="conv", stage="harness", routed=["conv"],
                   msg=msg("ConversionMessage", "s", "a"))
    history.record("publish", exchange="", routing_key="os2ds_matches", stage="worker", routed=[],
                   msg=msg("MatchesMessage", "s", "/a"))
    assert live.progress() == (1, 1) and live.harness_publishes() == 1
    history.record("output", queue="os2ds_matches", msg=msg("MatchesMessage", "s", "/b"), redelivered=False)
    assert live.progress() == (2, 0)


def read(t, scan, obj, redelivered=False):
    return ev(t, "output", queue="os2ds_matches", msg=msg("MatchesMessage", scan, obj), redelivered=redelivered)


def test_a_result_the_broker_hands_the_observer_again_after_a_reconnect_counts_once():
    # A crashed node gives back what the observer read but could not ack, without the redelivered flag.
    events = [plan(0, "s", ["a"]), read(1, "s", "a"), ev(5, "phase", name="observer_reconnected"),
              read(6, "s", "a")]
    ledger = Ledger.of(events)
    assert ledger.results[("s", "a")] == 1 and ledger.duplicated == {}
    # the same account when the reconnect is folded in last
    assert Ledger.of(events[:2] + events[3:] + events[2:3]).results[("s", "a")] == 1


def test_a_redelivered_result_the_observer_never_recorded_is_not_lost():
    # The node crashed while the result was on its way to the observer: it comes back flagged redelivered.
    ledger = Ledger.of([plan(0, "s", ["a"]), ev(5, "phase", name="observer_reconnected"),
                        read(6, "s", "a", redelivered=True)])
    assert ledger.owed() == 0 and ledger.lost == []


def test_two_results_read_on_one_connection_are_a_duplicate():
    ledger = Ledger.of([plan(0, "s", ["a"]), read(1, "s", "a"), ev(5, "phase", name="observer_reconnected"),
                        read(6, "s", "a"), read(7, "s", "a")])
    assert ledger.duplicated == {("s", "a"): 2}


def test_results_before_and_after_a_broker_restart_are_explained_by_it():
    base = [plan(0, "s", ["a"]), result(1, "s", "a"), ev(4, "fault", kind="restart_broker", target=None)]
    straddling = Ledger.of(base + [result(9, "s", "a")])
    assert straddling.duplicated == {("s", "a"): 2} and straddling.after_redelivery(("s", "a"))
    both_before = Ledger.of(base + [result(2, "s", "a")])
    assert both_before.duplicated and not both_before.after_redelivery(("s", "a"))


# -- per-scan queues (OS2datascanner 3.32) -------------------------------------------------
PS_QUEUE = "osds_conversions.101_20260105T070000"


def per_scan_plan(t, scan, objects, queue=PS_QUEUE):
    return {**plan(t, scan, objects, queue=queue), "per_scan": "full"}


def ps_delete(t, reason, queue=PS_QUEUE, scan="s"):
    return ev(t, "ps_delete", queue=queue, scan=scan, reason=reason, ready=3)


def test_objects_of_a_scan_whose_queue_a_fault_deleted_are_excused_unless_taken_before():
    events = [per_scan_plan(0, "s", ["a", "b", "c"]), conversion(1, "s", "a", queue=PS_QUEUE),
              conversion(1, "s", "b", queue=PS_QUEUE), deliver(2, "s", "a", queue=PS_QUEUE),
              ps_delete(3, "fault")]  # "c" was never published: the explorer had not got to it
    for order in (events, list(reversed(events))):
        ledger = Ledger.of(order)
        assert ledger.lost == [("s", "a")], "a stage took 'a' before the deletion: it is still owed"
        assert ledger.dropped_by_fault == [("s", "b"), ("s", "c")]


def test_a_scan_end_deletion_excuses_nothing():
    ledger = Ledger.of([per_scan_plan(0, "s", ["a", "b"]), result(1, "s", "a"), ps_delete(2, "scan_end")])
    assert ledger.lost == [("s", "b")] and ledger.dropped_by_fault == []


def test_owed_in_counts_only_the_scans_asked_for():
    ledger = Ledger.of([per_scan_plan(0, "s", ["a", "b"]), per_scan_plan(0, "t", ["a"], queue="q2"),
                        result(1, "s", "a")])
    assert ledger.owed_in(["s"]) == 1 and ledger.owed_in(["t"]) == 1 and ledger.owed_in(["s", "t"]) == 2
    ledger.add(result(2, "s", "b"))
    assert ledger.owed_in(["s"]) == 0


def test_the_live_ledger_says_when_a_scan_queue_may_go():
    live = LiveLedger()
    for event in (per_scan_plan(0, "s", ["a"]), per_scan_plan(0, "t", ["a"], queue="q2")):
        live(event)
    assert live.scan_state(["s"]) == "owed"
    live(result(1, "s", "a"))
    assert live.scan_state(["s"]) == "answered"
    assert live.scan_state(["s"], PS_QUEUE) == "untraced", "its conversion's publish is not recorded yet"
    live(conversion(0.5, "s", "a", queue=PS_QUEUE))
    assert live.scan_state(["s"], PS_QUEUE) == "answered"
    live(ev(2, "phase", name="scan_aborted", scan="t", client="c"))
    assert live.scan_state(["t"]) == "aborted"


def test_a_delivery_returned_by_a_pause_before_the_deletion_is_excused():
    events = [per_scan_plan(0, "s", ["a", "b"]), conversion(1, "s", "a", queue=PS_QUEUE),
              conversion(1, "s", "b", queue=PS_QUEUE), deliver(2, "s", "a", queue=PS_QUEUE),
              deliver(2, "s", "b", queue=PS_QUEUE),
              ev(2.5, "consumer_deleted", stage="worker", queue=PS_QUEUE, tag="c1", chan="ch"),  # paused: 'a' returned
              deliver(3, "s", "b", queue=PS_QUEUE, redelivered=True),  # 'b' taken again by a new consumer
              ps_delete(4, "fault")]
    for order in (events, list(reversed(events))):
        ledger = Ledger.of(order)
        assert ledger.lost == [("s", "b")] and ledger.dropped_by_fault == [("s", "a")]


def test_only_new_work_and_results_are_activity_for_the_stall_rule():
    live = LiveLedger()
    live(plan(0, "s1", ["a", "b"]))
    before = live.activity()

    def deliver(t, message, redelivered=False, queue="conv"):
        live(ev(t, "deliver", queue=queue, stage="worker", redelivered=redelivered, msg=message))

    # A stage that reconnects again and again: hellos and the admin's replies reach every command queue.
    deliver(1, {"type": "CommandMessage", "worker_hello": "amq.gen-1"}, queue="amq.gen-2")
    deliver(1.1, {"type": "CommandMessage", "new_queue": "q"}, queue="amq.gen-1")
    deliver(1.2, msg("ConversionMessage", "s1", "a"), redelivered=True)  # handed out again: no progress
    assert live.activity() == before
    deliver(2, msg("ConversionMessage", "s1", "b"))
    assert live.activity() != before
