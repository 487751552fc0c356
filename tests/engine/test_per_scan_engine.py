"""Per-scan queues (OS2datascanner 3.32) against a real broker: the test plays the admin with pika.

It declares ``osds_conversions.<pk>_<time>`` queues, announces them with gzipped ``new_queue``
commands on ``broadcast`` (or straight to a worker's command queue, in reply to its hello), and
deletes them with ``delete_queue`` then ``queue.delete``, as ENGINE_CONTRACT.md section 7 says.
What the worker does is read at the broker: consumer and queue events, the firehose.

The PS-* clause each test is about is named in its docstring (this branch's clause registry does
not know those ids yet, and an unknown id in a ``clauses`` marker is a collection error). The
second half shows each per-scan fault of the reference engine doing the wrong thing.
"""
import time

import pika
import pytest

from .helpers import (COMMAND_PROPS, Admin, close_stage_connection, encode, fill, queue_events, ready,
                      wait_until)
from .test_engine_integration import wait_consuming

CHECK = 0.3  # PRIORITY_CHECK_SECONDS of these tests
W = 2 * CHECK + 1.0  # the switching window they allow (check period, one late check, tolerance)
D1 = "osds_conversions.7_20260505T120000"
D2 = "osds_conversions.8_20260505T120500"
F1 = "osds_conversions.9_20260505T110000"
F2 = "osds_conversions.10_20260505T110500"
STALE = "osds_conversions.11_20260101T000000"  # never declared: a scan that ended before the hello


@pytest.fixture
def admin(ch, observer):
    return Admin(ch, observer)


def worker(engine, priority: str, **kwargs):
    kwargs.setdefault("check", CHECK)
    return engine.start("worker", CONVERSION_PRIORITY=priority, **kwargs)


def deliveries_of(observer, queue: str) -> list[float]:
    return [e.t for e in observer.snapshot() if e.kind == f"deliver.{queue}"]


def consumer_times(observer, queue: str, kind: str) -> list[float]:
    return [t for t, k, q in observer.consumer_changes() if q == queue and k == kind]


# -- the conformant engine ------------------------------------------------------------------
def test_worker_subscribes_to_allowed_tags_only_and_the_explorer_to_none(observer, engine, admin):
    """PS-FILTER, PS-SUBSCRIBE, PS-HELLO; the command queue is consumed with auto-ack."""
    admin.declare(D1, F1, D2)
    worker(engine, "delta")
    engine.start("explorer", check=CHECK)
    command_queue = admin.wait_hello()
    wait_consuming(observer, "os2ds_scan_specs", "os2ds_conversions")
    admin.announce(D1, "delta")
    admin.announce(F1, "full")
    admin.announce(D2, "delta")
    wait_consuming(observer, D1, D2)
    # Commands are handled in order: the full queue was refused before D2 was taken.
    assert observer.created_count(F1) == 0
    assert observer.active()[D1] == 1  # the worker's: an explorer ignores new_queue
    assert admin.hellos() == [command_queue]  # an explorer says no hello
    created = {e.headers["queue"]: e.headers for e in observer.snapshot() if e.kind == "consumer.created"}
    assert created[D1]["prefetch_count"] == 2 and created[D1]["ack_required"] is True
    assert created[command_queue]["ack_required"] is False  # auto-ack: commands pass a full prefetch
    hello = next(e for e in observer.snapshot() if e.kind == "publish.broadcast")
    assert hello.headers["routing_keys"] == [""] and not hello.headers.get("properties")  # plain JSON


def test_priority_by_tag_follows_the_depth_of_the_queues(observer, engine, admin, ch, tmp_path):
    """PS-PRECEDENCE and PS-PROGRESS: full is paused while delta has ready messages, and resumed after."""
    admin.declare(D1, F1)
    fill(ch, tmp_path / "d", F1, 30)
    worker(engine, "delta full", work=0.1)
    admin.wait_hello()
    admin.announce(D1, "delta")
    admin.announce(F1, "full")
    wait_consuming(observer, D1, F1)  # nothing ready in delta: every allowed queue is consumed
    fill(ch, tmp_path / "d", D1, 10)
    filled = time.monotonic()
    wait_until(lambda: consumer_times(observer, F1, "deleted"), W + 1, "full paused for the delta backlog")
    assert consumer_times(observer, F1, "deleted")[0] - filled < W
    assert observer.consuming(D1)
    wait_until(lambda: observer.consuming(F1), 20, "full resumed once delta is drained")
    resumed = consumer_times(observer, F1, "created")[-1]
    assert len(deliveries_of(observer, D1)) >= 10
    assert max(deliveries_of(observer, D1)) < resumed + 0.3  # all of delta went before full came back
    assert observer.consuming(D1)  # nothing ready anywhere: both are consumed


def test_hello_on_start_and_reconnect_and_a_stale_reply_costs_no_reconnect(observer, engine, admin, vhost):
    """PS-HELLO: one hello per connection; a reply naming a deleted queue does not keep the worker
    from the queues listed after it, and costs no reconnect."""
    admin.declare(D1, D2)
    stage = worker(engine, "delta full")
    first = admin.wait_hello()
    admin.announce(D1, "delta", to=first)
    wait_consuming(observer, D1)
    close_stage_connection(vhost, stage)
    second = admin.wait_hello(2)
    assert second != first  # a new command queue per connection
    admin.announce(STALE, "delta", to=second)
    admin.announce(D2, "full", to=second)
    wait_consuming(observer, D2)
    assert not observer.consuming(D1)  # every per-scan queue is forgotten on reconnect
    assert admin.hellos() == [first, second]
    assert stage.alive()


def test_a_deleted_paused_queue_does_not_wedge_the_worker(observer, engine, admin, ch, tmp_path):
    """PS-DELETE, PS-PROGRESS: a full queue paused for delta work is deleted; the worker goes on
    with delta, then takes a full queue announced later, and nobody re-creates the deleted one."""
    stage = start_with_a_paused_full_queue(observer, engine, admin, ch, tmp_path)
    admin.delete(F1)
    deleted = wait_until(lambda: queue_events(observer, F1, "deleted"), 10, "queue.deleted of the paused queue")
    admin.announce(F2, "full")
    wait_until(lambda: ready(ch, "os2ds_matches") == 15, 20, "12 delta and 3 full results")
    assert observer.created_count(F2) >= 1 and observer.created_count(F1) == 0
    assert ready(ch, F1) is None and not [t for t in queue_events(observer, F1, "created") if t > deleted[0]]
    assert stage.alive()


def start_with_a_paused_full_queue(observer, engine, admin, ch, tmp_path, faults=""):
    admin.declare(D1, F1, F2)
    for queue, n in ((D1, 12), (F1, 5), (F2, 3)):
        fill(ch, tmp_path / "d", queue, n)
    stage = worker(engine, "delta full", work=0.15, faults=faults)
    admin.wait_hello()
    admin.announce(D1, "delta")
    admin.announce(F1, "full")
    wait_consuming(observer, D1)
    wait_until(lambda: ready(ch, "os2ds_matches"), 10, "the first delta result")
    assert observer.created_count(F1) == 0  # paused: delta has ready messages
    return stage


def test_malformed_broadcasts_are_ignored(observer, engine, admin):
    """FT-BAD-COMMAND: empty, not JSON, not a command, a command without 'abort' (refused, as 3.32
    does); a later valid command, gzip or plain JSON, still takes effect."""
    admin.declare(D1, D2, F1)
    stage = worker(engine, "delta")
    admin.wait_hello()
    admin.broadcast_raw(b"", COMMAND_PROPS)
    admin.broadcast_raw(b"\x00this is not a command {", pika.BasicProperties(priority=10, delivery_mode=2))
    admin.broadcast_raw(encode({"greeting": "hello", "scan_tag": None}), COMMAND_PROPS)
    admin.broadcast_raw(encode({"log_level": None, "new_queue": F1, "new_queue_priority": "delta"}), COMMAND_PROPS)
    admin.announce(D1, "delta")
    admin.broadcast_raw(b'{"abort": null, "new_queue": "%s", "new_queue_priority": "delta"}' % D2.encode())
    wait_consuming(observer, D1, D2)
    assert observer.created_count(F1) == 0
    assert stage.alive() and stage.log().count("not a command") == 4, stage.log()[-3000:]


# -- the faults ---------------------------------------------------------------------------------
def test_fault_wedge_on_deleted_paused_queue(observer, engine, admin, ch, tmp_path):
    stage = start_with_a_paused_full_queue(observer, engine, admin, ch, tmp_path,
                                           faults="wedge_on_deleted_paused_queue")
    admin.delete(F1)
    wait_until(lambda: not observer.consuming(D1) and not observer.consuming("os2ds_conversions"), 10,
               "the worker consuming nothing at all")
    assert stage.alive() and ready(ch, D1) > 0


def test_fault_reconnect_on_missing_hello_queue(observer, engine, admin):
    admin.declare(D1)
    worker(engine, "delta", faults="reconnect_on_missing_hello_queue")
    answered: list[str] = []

    def answer_every_hello():
        for command_queue in admin.hellos()[len(answered):]:
            answered.append(command_queue)
            admin.announce(STALE, "delta", to=command_queue)
            admin.announce(D1, "delta", to=command_queue)
        return len(answered) >= 4

    began = time.monotonic()
    wait_until(answer_every_hello, 15, "a reconnect storm (4 hellos)")
    assert time.monotonic() - began < 10
    assert observer.created_count(D1) == 0  # the queue listed after the missing one: never consumed


def test_fault_delivery_count_priority(observer, engine, admin, ch, tmp_path):
    # Delta arrives, with work, while full delivers: subscribed on its announcement, it has no counter
    # in that window, so the next check keeps full only; paused, it gets no deliveries, so it stays
    # paused for as long as full delivers.
    admin.declare(D1, F1)
    fill(ch, tmp_path / "d", F1, 40)
    fill(ch, tmp_path / "d", D1, 10)
    worker(engine, "delta full", work=0.1, faults="delivery_count_priority")
    admin.wait_hello()
    admin.announce(F1, "full")
    # full delivering for a few windows (its first window counts nothing: subscribed during it)
    wait_until(lambda: len(deliveries_of(observer, F1)) >= 10, 10, "full delivering")
    admin.announce(D1, "delta")
    wait_until(lambda: consumer_times(observer, D1, "deleted"), 10, "delta paused for full")
    since = len(deliveries_of(observer, F1))
    wait_until(lambda: len(deliveries_of(observer, F1)) - since >= 10, 15, "10 full deliveries")
    assert ready(ch, D1) == 10 and not observer.consuming(D1)


def test_fault_subscribe_every_tag(observer, engine, admin):
    admin.declare(F1)
    worker(engine, "delta", faults="subscribe_every_tag")
    admin.wait_hello()
    admin.announce(F1, "full")
    wait_consuming(observer, F1)


def test_fault_redeclare_deleted_queue(observer, engine, admin):
    admin.declare(F1)
    worker(engine, "delta full", faults="redeclare_deleted_queue")
    admin.wait_hello()
    admin.announce(F1, "full")
    wait_consuming(observer, F1)
    admin.delete(F1)
    deleted = wait_until(lambda: queue_events(observer, F1, "deleted"), 10, "queue.deleted")
    wait_until(lambda: [t for t in queue_events(observer, F1, "created") if t > deleted[0]], 10,
               "the deleted queue created again")


def test_fault_wedge_on_empty_broadcast(observer, engine, admin):
    admin.declare(D1, D2)
    stage = worker(engine, "delta", faults="wedge_on_empty_broadcast")
    command_queue = admin.wait_hello()
    admin.announce(D1, "delta")
    wait_consuming(observer, D1, "os2ds_conversions")
    admin.broadcast_raw(b"", COMMAND_PROPS)
    # Its consumer cancelled, the auto-delete command queue goes: no later command can reach the worker;
    # the per-scan consumer goes too.
    wait_until(lambda: queue_events(observer, command_queue, "deleted") and not observer.consuming(D1), 10,
               "the command queue deleted and the per-scan queue left")
    assert stage.alive() and observer.consuming("os2ds_conversions")


def test_fault_debounce_new_queue(observer, engine, admin):
    admin.declare(D1)
    worker(engine, "delta", faults="debounce_new_queue")
    admin.wait_hello()
    announced = time.monotonic()
    admin.announce(D1, "delta")
    wait_consuming(observer, D1, timeout=10)
    assert consumer_times(observer, D1, "created")[0] - announced > 3 * CHECK
