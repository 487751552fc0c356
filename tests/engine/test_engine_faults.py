"""Every fault switch changes the engine's behaviour observably at the broker.

Each test starts a stage with one fault and asserts the broker-visible
symptom that the conformant engine never shows (the conformant behaviour is
asserted in test_engine_integration.py). Every fault is also run by the
fault matrix (tests/test_fault_matrix.py), which shows a clause failing on
it; a fault added with its matrix row needs no test here.
"""
import os

import pika
import pytest


from .helpers import (close_stage_connection, declare, encode, fill, publish, ready, scan_spec,
                      scan_tag, take_all, wait_until)
from .test_engine_integration import make_files, wait_consuming


def paths(ch, queue="os2ds_matches"):
    return [m["handle"]["path"].split("-")[0] for m in take_all(ch, queue)]


def test_fault_slow_check(observer, engine, ch, tmp_path):
    # With a 0.2 s period the conformant worker cancels the lower consumer after at most a few
    # lower deliveries; with slow_check (3.2 s) it keeps taking lower messages while the burst waits.
    declare(ch, "sc0", "sc1")
    fill(ch, tmp_path / "d", "sc1", 200)
    engine.start("worker", "sc0 sc1", faults="slow_check", work=0.05)
    wait_consuming(observer, "sc0", "sc1")
    mark = len(observer.deliveries())
    fill(ch, tmp_path / "d", "sc0", 40)
    wait_until(lambda: not observer.consuming("sc1"), 15, "sc1 consumer cancelled")
    lower_after_burst = [q for q, _h in observer.deliveries()[mark:] if q == "sc1"]
    assert len(lower_after_burst) > 12


def test_fault_two_lower(observer, engine, ch, tmp_path):
    declare(ch, "tl0", "tl1", "tl2")
    fill(ch, tmp_path / "d", "tl1", 3)
    fill(ch, tmp_path / "d", "tl2", 10)
    engine.start("worker", "tl0 tl1 tl2", faults="two_lower")
    wait_until(lambda: observer.max_simultaneous({"tl1", "tl2"}) == 2, 15, "two lower consumers at once")


def test_fault_cancel_first(observer, engine, ch, tmp_path):
    declare(ch, "cf0", "cf1")
    engine.start("worker", "cf0 cf1", faults="cancel_first")
    wait_consuming(observer, "cf0")
    fill(ch, tmp_path / "d", "cf1", 3)
    wait_until(lambda: [c for c in observer.consumer_changes() if c[1:] == ("deleted", "cf0")], 15,
               "the first queue's consumer cancelled")


def test_fault_consume_all_at_start(observer, engine, ch, tmp_path):
    declare(ch, "ca0", "ca1", "ca2")
    for q in ("ca0", "ca1", "ca2"):
        fill(ch, tmp_path / "d", q, 5)
    engine.start("worker", "ca0 ca1 ca2", faults="consume_all_at_start", work=0.02)
    wait_until(lambda: ready(ch, "os2ds_status") == 15, 30, "15 results")
    assert observer.max_simultaneous({"ca1", "ca2"}) == 2
    order = paths(ch)
    assert order != sorted(order)  # lower queues served before ca0 drained


def test_fault_no_move_down(observer, engine, ch, tmp_path):
    declare(ch, "nm0", "nm1", "nm2")
    fill(ch, tmp_path / "d", "nm1", 2)
    fill(ch, tmp_path / "d", "nm2", 5)
    engine.start("worker", "nm0 nm1 nm2", faults="no_move_down")
    wait_until(lambda: ready(ch, "nm1") == 0 and (ready(ch, "os2ds_status") or 0) >= 2, 15, "nm1 drained")
    # 15 check periods later nm2 is still waiting, and the stage still sits on the empty nm1
    with pytest.raises(AssertionError, match="not within"):
        wait_until(lambda: ready(ch, "nm2") < 5, 3, "nm2 served")
    assert observer.consuming("nm1") and not observer.consuming("nm2")


def test_fault_reverse_priority(observer, engine, ch, tmp_path):
    declare(ch, "rp0", "rp1", "rp2")
    fill(ch, tmp_path / "d", "rp1", 5)
    fill(ch, tmp_path / "d", "rp2", 5)
    engine.start("worker", "rp0 rp1 rp2", faults="reverse_priority")
    wait_until(lambda: ready(ch, "os2ds_status") == 10, 20, "10 results")
    assert paths(ch) == ["rp2"] * 5 + ["rp1"] * 5
    first_lower = [c for c in observer.consumer_changes() if c[1] == "created" and c[2] != "rp0"][0]
    assert first_lower[2] == "rp2"


def test_fault_get_ahead(observer, engine, ch, tmp_path):
    declare(ch, "ga0", "ga1")
    fill(ch, tmp_path / "d", "ga0", 20)
    fill(ch, tmp_path / "d", "ga1", 5)
    engine.start("worker", "ga0 ga1", faults="get_ahead", work=0.05)
    wait_until(lambda: ready(ch, "os2ds_status") == 25, 30, "25 results")
    order = paths(ch)
    assert order.index("ga1") < max(i for i, q in enumerate(order) if q == "ga0")
    assert observer.max_simultaneous({"ga1"}) <= 1  # no consumer involved in the violation


def test_fault_no_declare(observer, engine, ch, tmp_path):
    engine.start("worker", "nd0 nd1", faults="no_declare")
    wait_until(lambda: ready(ch, "os2ds_status") is not None, 15, "the worker's output queues")
    wait_until(lambda: [e for e in observer.snapshot() if e.kind == "consumer.created"], 15, "command consumer")
    assert ready(ch, "nd0") is None and ready(ch, "nd1") is None
    declare(ch, "nd0")  # somebody else creates it: the stage then consumes it
    wait_consuming(observer, "nd0")


def test_fault_ignore_conversion_queue(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    make_files(data, 3)
    declare(ch, "tenant_conv")
    engine.start("explorer", faults="ignore_conversion_queue")
    wait_consuming(observer, "os2ds_scan_specs")
    publish(ch, "os2ds_scan_specs", scan_spec(data, conversion_queue="tenant_conv"))
    wait_until(lambda: ready(ch, "os2ds_conversions") == 3, 15, "3 conversions in os2ds_conversions")
    assert ready(ch, "tenant_conv") == 0


def test_fault_status_into_conversions(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    make_files(data, 2)
    declare(ch, "conv_s")
    engine.start("explorer", faults="status_into_conversions")
    wait_consuming(observer, "os2ds_scan_specs")
    publish(ch, "os2ds_scan_specs", scan_spec(data, conversion_queue="conv_s"))
    wait_until(lambda: ready(ch, "conv_s") == 3, 15, "3 messages in conv_s")
    kinds = ["status" if "status_is_error" in m else "conversion" for m in take_all(ch, "conv_s")]
    assert kinds == ["conversion", "conversion", "status"]
    assert ready(ch, "os2ds_status") == 0


def test_fault_command_via_queue(observer, engine, ch, tmp_path):
    engine.start("explorer", faults="command_via_queue")
    wait_consuming(observer, "os2ds_scan_specs")
    ch.exchange_declare("broadcast", "fanout", durable=True)
    command = {"abort": scan_tag(9), "log_level": None, "profiling": None}
    ch.basic_publish("broadcast", "", encode(command),
                     pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip"))
    relayed = wait_until(lambda: take_all(ch, "os2ds_conversions"), 15, "a command in os2ds_conversions")
    assert "abort" in relayed[0]


def test_fault_typo_output_queue(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    make_files(data, 1)  # doc00 has a CPR: matched, so it has metadata
    declare(ch, "tq0")
    engine.start("worker", "tq0", faults="typo_output_queue")
    wait_consuming(observer, "tq0")
    from .helpers import conversion
    publish(ch, "tq0", conversion(data, "doc00.txt"))
    wait_until(lambda: ready(ch, "os2ds_status") == 1, 15, "1 result")
    assert ready(ch, "os2ds_metadata") == 0
    assert ready(ch, "os2ds_meta_data") is None  # published to a queue that does not exist
    assert any(keys == ["os2ds_meta_data"] for keys, _b, _h in observer.publishes())


def test_fault_ack_on_cancel(observer, engine, ch, tmp_path):
    declare(ch, "ac0", "ac1")
    fill(ch, tmp_path / "d", "ac1", 30)
    worker = engine.start("worker", "ac0 ac1", faults="ack_on_cancel", work=0.05)
    wait_consuming(observer, "ac1")
    fill(ch, tmp_path / "d", "ac0", 10)
    wait_until(lambda: [c for c in observer.consumer_changes() if c[1:] == ("deleted", "ac1")], 15,
               "ac1 consumer cancelled")
    wait_until(lambda: ready(ch, "ac0") == 0, 15, "ac0 served")
    assert worker.stop() == 0  # finishes the message in hand; unacked messages go back
    order = paths(ch)
    # Every ac1 object is either handled or back in its queue - unless it was acked unprocessed.
    assert order.count("ac0") + ready(ch, "ac0") == 10
    assert order.count("ac1") + ready(ch, "ac1") < 30


def test_fault_dup_on_cancel(observer, engine, ch, tmp_path):
    from collections import Counter
    declare(ch, "dc0", "dc1")
    fill(ch, tmp_path / "d", "dc1", 30)
    engine.start("worker", "dc0 dc1", faults="dup_on_cancel", work=0.05)
    wait_consuming(observer, "dc1")
    fill(ch, tmp_path / "d", "dc0", 10)
    wait_until(lambda: [c for c in observer.consumer_changes() if c[1:] == ("deleted", "dc1")], 15,
               "dc1 consumer cancelled")
    wait_until(lambda: ready(ch, "dc0") == 0 and ready(ch, "dc1") == 0, 30, "both queues emptied")
    wait_until(lambda: (ready(ch, "os2ds_matches") or 0) > 40, 30, "more results than objects")
    counts = Counter(m["handle"]["path"] for m in take_all(ch, "os2ds_matches"))
    assert max(counts.values()) == 2  # an object with two results


def test_fault_dup_after_reconnect(observer, engine, ch, tmp_path, vhost):
    from collections import Counter
    declare(ch, "dr0")
    fill(ch, tmp_path / "d", "dr0", 10)
    worker = engine.start("worker", "dr0", faults="dup_after_reconnect")
    wait_until(lambda: ready(ch, "dr0") == 0 and (ready(ch, "os2ds_matches") or 0) >= 10, 30, "the backlog handled")
    close_stage_connection(vhost, worker)
    wait_until(lambda: (ready(ch, "os2ds_matches") or 0) > 10, 30, "results published again after the reconnect")
    counts = Counter(m["handle"]["path"] for m in take_all(ch, "os2ds_matches"))
    assert len(counts) == 10 and max(counts.values()) == 2  # acked objects with a second result


def test_fault_crash_on_poison(observer, engine, ch, tmp_path):
    declare(ch, "cp0")
    worker = engine.start("worker", "cp0", faults="crash_on_poison")
    wait_consuming(observer, "cp0")
    publish(ch, "cp0", None, raw=b"not json at all")
    wait_until(lambda: not worker.alive(), 15, "the worker to die")
    assert worker.process.returncode == 3
    assert ready(ch, "cp0") == 1 and ready(ch, "os2ds_problems") == 0


def test_fault_requeue_poison(observer, engine, ch, tmp_path):
    declare(ch, "rq0")
    worker = engine.start("worker", "rq0", faults="requeue_poison")
    wait_consuming(observer, "rq0")
    publish(ch, "rq0", None, raw=b"not json at all")
    wait_until(lambda: sum(1 for q, h in observer.deliveries() if q == "rq0" and h.get("redelivered")) > 5,
               15, "the poison message redelivered again and again")
    assert ready(ch, "os2ds_problems") == 0 and worker.alive()


def test_fault_die_on_queue_gone(observer, engine, ch, tmp_path):
    declare(ch, "dg0", "dg1")
    fill(ch, tmp_path / "d", "dg1", 100)
    worker = engine.start("worker", "dg0 dg1", faults="die_on_queue_gone", work=0.02)
    wait_consuming(observer, "dg1")
    ch.queue_delete("dg1")
    wait_until(lambda: not worker.alive(), 15, "the worker to exit")
    assert worker.process.returncode == 4
    wait_until(lambda: not observer.consuming("dg0"), 10, "dg0 no longer consumed")


def test_fault_no_reconnect(observer, engine, ch, tmp_path, vhost):
    declare(ch, "nr0")
    worker = engine.start("worker", "nr0", faults="no_reconnect")
    wait_consuming(observer, "nr0")
    close_stage_connection(vhost, worker)
    wait_until(lambda: not worker.alive(), 20, "the worker to exit")
    assert worker.process.returncode == 5


def test_unknown_fault_is_refused(engine):
    if os.environ.get("QP_ENGINE_TESTS_DROP_FAULTS"):
        pytest.skip("contrast run")
    stage = engine.start("worker", faults="no_such_fault")
    wait_until(lambda: not stage.alive(), 15, "the stage to refuse to start")
    assert stage.process.returncode == 2 and "no_such_fault" in stage.log()
