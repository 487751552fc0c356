"""The reference engine against a real private broker: scans, priority, robustness."""
import random

import pytest
from faker import Faker

from reference_engine import rules

from .helpers import (close_stage_connection, declare, decode, fill, publish, ready, scan_spec, take_all,
                      wait_until)
from .test_rules import make_cpr

OUTPUTS = ("os2ds_matches", "os2ds_status", "os2ds_problems", "os2ds_metadata", "os2ds_checkups")


def wait_consuming(observer, *queues, timeout=20):
    return wait_until(lambda: all(observer.consuming(q) for q in queues), timeout,
                      f"consumers on {', '.join(queues)}")


def make_files(data, n, seed=1):
    """n text files with Faker da_DK text; returns {name: [expected censored matches]}."""
    fake = Faker("da_DK")
    Faker.seed(seed)
    rng = random.Random(seed)
    data.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n):
        kind = i % 5
        born = fake.date_of_birth(minimum_age=1, maximum_age=99)
        cpr = make_cpr(born.day, born.month, born.year)
        text = f"{fake.name()}\n{fake.address()}\n{fake.paragraph()}\n"
        found = []
        if kind == 0:
            text += f"CPR-nummer: {cpr[:6]}-{cpr[6:]}\n"
            found = [cpr[:4] + "XXXXXX"]
        elif kind == 1:
            other = fake.date_of_birth()
            cpr2 = make_cpr(other.day, other.month, other.year)
            text += f"cpr {cpr}\n{fake.paragraph()} {fake.paragraph()} {fake.paragraph()}\nog {cpr2}\n"
            found = [cpr[:4] + "XXXXXX", cpr2[:4] + "XXXXXX"]
        elif kind == 2:  # fails modulus 11
            bad = cpr[:9] + str((int(cpr[9]) + rng.randint(1, 9)) % 10)
            assert not rules.modulus11_ok(bad)
            text += f"Nummer {bad[:6]}-{bad[6:]}\n"
        elif kind == 3:  # blacklisted context
            text += f"Fakturanummer {cpr}\n"
        name = f"doc{i:02d}.txt"
        (data / name).write_text(text)
        expected[name] = found
    return expected


@pytest.mark.clauses("DL-EXACTLY-ONCE", "RT-ONE-TYPE")
def test_full_scan_of_50_files(observer, engine, ch, tmp_path):
    data = tmp_path / "scan"
    expected = make_files(data, 50)
    explorer = engine.start("explorer")
    worker = engine.start("worker")
    wait_consuming(observer, "os2ds_scan_specs", "os2ds_conversions")
    publish(ch, "os2ds_scan_specs", scan_spec(data, pk=7))
    wait_until(lambda: ready(ch, "os2ds_status") == 51, 60, "51 status messages")
    matches = take_all(ch, "os2ds_matches")
    assert len(matches) == 50
    by_name = {m["handle"]["path"]: m for m in matches}
    assert set(by_name) == set(expected)
    for name, want in expected.items():
        m = by_name[name]
        got = [x["match"] for entry in m["matches"] for x in (entry["matches"] or [])]
        assert got == want, name
        assert m["matched"] == bool(want), name
        assert m["scan_spec"]["scan_tag"]["scanner"]["pk"] == 7
    statuses = take_all(ch, "os2ds_status")
    explorer_status = [s for s in statuses if s["total_objects"] is not None]
    assert [s["total_objects"] for s in explorer_status] == [50]
    assert len(take_all(ch, "os2ds_metadata")) == sum(1 for w in expected.values() if w)
    assert len(take_all(ch, "os2ds_checkups")) == 50
    assert take_all(ch, "os2ds_problems") == []
    # wire format: gzip JSON, delivery_mode 2, content_encoding gzip, default exchange
    pubs = [p for p in observer.publishes() if p[0] == ["os2ds_conversions"]]
    assert len(pubs) == 50
    props = pubs[0][2]["properties"]
    assert props.get("delivery_mode") == 2 and props.get("content_encoding") == "gzip"
    assert explorer.stop() == 0 and worker.stop() == 0


@pytest.mark.clauses("DL-EXACTLY-ONCE", "RT-TENANT")
def test_delta_scan_skips_old_files_and_uses_the_spec_queues(observer, engine, ch, tmp_path):
    import os
    data = tmp_path / "delta"
    make_files(data, 6)
    for name in ("doc00.txt", "doc01.txt"):
        os.utime(data / name, (1600000000, 1600000000))  # 2020
    declare(ch, "explorer_delta", "conversions_delta")
    engine.start("explorer", "explorer_delta os2ds_scan_specs")
    wait_consuming(observer, "explorer_delta")
    rule = {"type": "and", "components": [
        {"type": "last-modified", "after": "2025-01-01T00:00:00+0100"}, {"type": "cpr"}]}
    spec = scan_spec(data, pk=3, rule=rule, conversion_queue="conversions_delta")
    publish(ch, "explorer_delta", spec)
    status = wait_until(lambda: take_all(ch, "os2ds_status"), 20, "explorer status")
    assert status[0]["total_objects"] == 4 and status[0]["skipped_by_last_modified"] == 2
    convs = take_all(ch, "conversions_delta")
    assert sorted(c["handle"]["path"] for c in convs) == ["doc02.txt", "doc03.txt", "doc04.txt", "doc05.txt"]
    assert ready(ch, "os2ds_conversions") == 0


@pytest.mark.clauses("RT-ROUTABLE")
def test_unroutable_conversion_becomes_a_problem(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    make_files(data, 2)
    engine.start("explorer")
    wait_consuming(observer, "os2ds_scan_specs")
    publish(ch, "os2ds_scan_specs", scan_spec(data, conversion_queue="no_such_queue"))
    problems = wait_until(lambda: take_all(ch, "os2ds_problems"), 20, "problem messages")
    assert "no_such_queue" in problems[0]["message"]
    assert problems[0]["handle"]["path"] in ("doc00.txt", "doc01.txt")


@pytest.mark.clauses("QP-DECLARE", "QP-FIRST-PINNED")
def test_declares_its_queues_exactly_as_the_contract_says(observer, engine, ch, tmp_path, broker, vhost):
    worker = engine.start("worker", "wq0 wq1 wq0 wq2")
    wait_consuming(observer, "wq0")
    for q in ("wq0", "wq1", "wq2", "os2ds_conversions", "os2ds_matches", "os2ds_checkups",
              "os2ds_problems", "os2ds_metadata", "os2ds_status"):
        assert ready(ch, q) == 0, q
        ch.queue_declare(q, durable=True)  # same settings (durable, no arguments) or the broker refuses
    created = [e for e in observer.snapshot() if e.kind == "consumer.created"]
    data = [e for e in created if e.headers["queue"] == "wq0"]
    assert data[0].headers["prefetch_count"] == 2
    # the command queue: server-named, auto-delete, x-max-priority 10, bound to broadcast
    channel = data[0].headers["channel"]
    cmd = [e for e in created if str(e.headers["queue"]).startswith("amq.gen") and e.headers["channel"] == channel]
    assert cmd, "no consumer on a broadcast queue"
    queues = {q["name"]: q for q in broker.management.queues(vhost.name)}
    gen = queues[cmd[0].headers["queue"]]
    assert gen["auto_delete"] is True, gen
    assert gen["arguments"].get("x-max-priority") == 10, gen
    # one connection, one channel for all consumers
    ours = [e for e in created if not str(e.headers["queue"]).startswith("amq.gen")]
    assert {e.headers["channel"] for e in ours} == {channel}
    assert worker.stop() == 0


@pytest.mark.clauses("QP-DRAIN-ORDER", "QP-ONE-LOWER", "QP-FIRST-PINNED")
def test_backlog_over_three_queues_drains_in_priority_order(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    declare(ch, "p0", "p1", "p2")
    for q in ("p2", "p1", "p0"):  # fill lowest first
        fill(ch, data, q, 15)
    worker = engine.start("worker", "p0 p1 p2", work=0.01)
    wait_until(lambda: ready(ch, "os2ds_status") == 45, 60, "45 results")
    order = [m["handle"]["path"].split("-")[0] for m in take_all(ch, "os2ds_matches")]
    assert order == ["p0"] * 15 + ["p1"] * 15 + ["p2"] * 15
    assert observer.max_simultaneous({"p1", "p2"}) == 1
    assert not [c for c in observer.consumer_changes() if c[1:] == ("deleted", "p0")]
    assert worker.stop() == 0


@pytest.mark.clauses("QP-CANCEL-WINDOW", "QP-PRECEDENCE", "QP-PROGRESS")
def test_burst_into_higher_queue_cancels_lower_and_comes_back(observer, engine, ch, tmp_path):
    data = tmp_path / "d"
    declare(ch, "h0", "h1", "h2")
    fill(ch, data, "h2", 40)
    worker = engine.start("worker", "h0 h1 h2", work=0.05)
    wait_consuming(observer, "h0", "h2")
    fill(ch, data, "h1", 10)
    wait_until(lambda: not observer.consuming("h2"), 10, "h2 consumer cancelled")
    wait_until(lambda: observer.consuming("h1"), 10, "h1 consumer started")
    wait_until(lambda: observer.consuming("h2"), 20, "h2 consumer back after h1 drained")
    wait_until(lambda: ready(ch, "os2ds_status") == 50, 30, "50 results")
    assert observer.max_simultaneous({"h1", "h2"}) == 1
    assert worker.stop() == 0


def test_without_queue_priority_consumes_default_queue_only(observer, engine, ch, tmp_path):
    declare(ch, "other")
    engine.start("worker", "  ")
    wait_consuming(observer, "os2ds_conversions")
    fill(ch, tmp_path / "d", "other", 1)
    fill(ch, tmp_path / "d", "os2ds_conversions", 2)
    wait_until(lambda: ready(ch, "os2ds_status") == 2, 20, "2 results")
    assert ready(ch, "other") == 1
    assert set(observer.active()) == {"os2ds_conversions"}


@pytest.mark.clauses("FT-POISON")
def test_poison_message_is_rejected_reported_and_the_stage_goes_on(observer, engine, ch, tmp_path):
    declare(ch, "x0")
    worker = engine.start("worker", "x0")
    wait_consuming(observer, "x0")
    publish(ch, "x0", None, raw=b"\x00 definitely not json")
    publish(ch, "x0", {"scan_spec": {"scan_tag": {}}})  # JSON, missing fields
    fill(ch, tmp_path / "d", "x0", 2)
    wait_until(lambda: ready(ch, "os2ds_matches") == 2, 20, "2 good objects handled")
    problems = take_all(ch, "os2ds_problems")
    assert len(problems) == 2 and all("x0" in p["message"] for p in problems)
    wait_until(lambda: ready(ch, "x0") == 0, 5, "x0 empty")
    assert worker.alive()


@pytest.mark.clauses("FT-QUEUE-GONE")
def test_deleting_a_lower_queue_does_not_stop_the_stage(observer, engine, ch, tmp_path):
    declare(ch, "g0", "g1", "g2")
    fill(ch, tmp_path / "d", "g1", 200)
    worker = engine.start("worker", "g0 g1 g2", work=0.02)
    wait_consuming(observer, "g1")
    ch.queue_delete("g1")
    wait_until(lambda: not observer.consuming("g1"), 10, "g1 consumer gone")
    fill(ch, tmp_path / "d", "g2", 3)
    fill(ch, tmp_path / "d", "g0", 3)
    wait_until(lambda: ready(ch, "g2") == 0 and ready(ch, "g0") == 0, 20, "g0 and g2 served")
    assert worker.alive() and observer.consuming("g0")


@pytest.mark.clauses("FT-RECONNECT", "DL-EXACTLY-ONCE")
def test_reconnects_after_the_broker_closes_the_connection(observer, engine, ch, tmp_path, vhost):
    declare(ch, "r0", "r1")
    worker = engine.start("worker", "r0 r1", work=0.02)
    wait_consuming(observer, "r0")
    fill(ch, tmp_path / "d", "r1", 30)
    n_created = observer.created_count("r0")
    close_stage_connection(vhost, worker)
    wait_until(lambda: observer.created_count("r0") > n_created, 20, "consumer on r0 again after reconnect")
    wait_until(lambda: ready(ch, "r1") == 0, 30, "r1 drained")
    wait_until(lambda: (ready(ch, "os2ds_status") or 0) >= 30, 30, "30 results")
    paths = {m["handle"]["path"] for m in take_all(ch, "os2ds_matches")}
    assert len(paths) == 30  # nothing lost (duplicates allowed)
    assert worker.alive()


@pytest.mark.clauses("RT-BROADCAST")
def test_abort_command_drops_the_rest_of_a_scan(observer, engine, ch, tmp_path):
    declare(ch, "a0")
    worker = engine.start("worker", "a0", work=0.05)
    wait_consuming(observer, "a0")
    data = tmp_path / "d"
    fill(ch, data, "a0", 40, pk=404)
    fill(ch, data, "a0", 2, pk=5)
    wait_until(lambda: (ready(ch, "os2ds_matches") or 0) >= 2, 10, "some results")
    from .helpers import encode, scan_tag
    import pika
    ch.exchange_declare("broadcast", "fanout", durable=True)
    ch.basic_publish("broadcast", "", encode({"abort": scan_tag(404), "log_level": None, "profiling": None}),
                     pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip"))
    wait_until(lambda: ready(ch, "a0") == 0, 20, "a0 emptied")
    wait_until(lambda: any(m["scan_spec"]["scan_tag"]["scanner"]["pk"] == 5
                           for m in take_all_keep(ch)), 20, "the other scan handled")
    matches = take_all(ch, "os2ds_matches")
    aborted = [m for m in matches if m["scan_spec"]["scan_tag"]["scanner"]["pk"] == 404]
    assert len(aborted) < 40
    assert [m for m in matches if m["scan_spec"]["scan_tag"]["scanner"]["pk"] == 5]
    assert worker.alive()


def take_all_keep(ch):
    """Matches so far, without consuming them."""
    side = ch.connection.channel()
    out = []
    try:
        while True:
            method, _p, body = side.basic_get("os2ds_matches", auto_ack=False)
            if method is None:
                break
            out.append(decode(body))
    finally:
        side.close()  # unacked messages return to the queue
    return out


def test_sigterm_finishes_the_message_in_hand_and_exits_0(observer, engine, ch, tmp_path):
    declare(ch, "s0")
    fill(ch, tmp_path / "d", "s0", 20)
    worker = engine.start("worker", "s0", work=0.5)
    wait_until(lambda: (ready(ch, "os2ds_matches") or 0) >= 1, 20, "first result")
    rc = worker.stop(timeout=10)
    assert rc == 0, worker.log()[-2000:]
    handled = ready(ch, "os2ds_status")
    assert ready(ch, "os2ds_matches") == handled
    assert ready(ch, "s0") + handled == 20  # nothing lost, nothing half-done


@pytest.mark.clauses("RT-BROADCAST")
def test_abort_command_reaches_the_explorer_too(observer, engine, ch, tmp_path):
    import pika
    from .helpers import encode, scan_tag
    data = tmp_path / "d"
    make_files(data, 1)
    explorer = engine.start("explorer", work=0.2)
    wait_consuming(observer, "os2ds_scan_specs")
    for _ in range(15):
        publish(ch, "os2ds_scan_specs", scan_spec(data, pk=404))
    wait_until(lambda: (ready(ch, "os2ds_status") or 0) >= 1, 10, "the first spec handled")
    ch.exchange_declare("broadcast", "fanout", durable=True)
    ch.basic_publish("broadcast", "", encode({"abort": scan_tag(404), "log_level": None, "profiling": None}),
                     pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip"))
    wait_until(lambda: ready(ch, "os2ds_scan_specs") == 0, 20, "the scan's specs dropped")
    assert explorer.stop() == 0
    assert ready(ch, "os2ds_status") < 15
