"""The flood against a real broker: counts, confirms, properties, rates, cancel, threads."""
from __future__ import annotations

import threading
import time

import pika
import pytest

from harness.flood import Flood, FloodError, FloodProgress, poison_body, progress_line
from harness.history import HistoryWriter
from harness.messages import decode_body


def ready(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def bodies(n: int) -> list[dict]:
    return [{"scan_spec": {"scan_tag": {"n": i}}, "handle": {"path": f"doc{i}.txt"}, "progress": {}} for i in range(n)]


@pytest.fixture
def flood(vhost):
    f = Flood(vhost.parameters())
    try:
        yield f
    finally:
        f.close()


def test_publish_counts_every_confirmed_message(flood, amqp_channel):
    flood.declare(["conversions_full"])
    assert flood.publish("conversions_full", bodies(500)) == 500
    assert flood.stats.sent == flood.stats.confirmed == 500
    assert flood.stats.returned == flood.stats.nacked == 0
    assert ready(amqp_channel, "conversions_full") == 500  # confirmed means the broker has them


def test_messages_have_the_engines_exact_properties(flood, amqp_channel):
    flood.declare(["explorer_full"])
    flood.publish("explorer_full", [{"source": {"type": "file"}, "rule": {"type": "cpr"}}])
    method, props, body = amqp_channel.basic_get("explorer_full", auto_ack=True)
    assert method.exchange == "" and method.routing_key == "explorer_full"
    assert props.delivery_mode == 2 and props.content_encoding == "gzip"
    assert props.headers is None and props.content_type is None and props.priority is None
    assert body[:2] == b"\x1f\x8b"
    assert decode_body(body, "gzip") == {"source": {"type": "file"}, "rule": {"type": "cpr"}}


def test_declare_matches_the_engine_settings(flood, amqp_channel, broker, vhost):
    flood.declare(["conversions_delta", "conversions_delta", "os2ds_conversions"])
    # The engine's declare (durable, no arguments) must be accepted on the same queue.
    amqp_channel.queue_declare("conversions_delta", durable=True)
    queues = {q["name"]: q for q in broker.management.queues(vhost.name)}
    for name in ("conversions_delta", "os2ds_conversions"):
        assert queues[name]["durable"] is True
        assert queues[name]["auto_delete"] is False and queues[name]["exclusive"] is False
        assert queues[name]["arguments"] == {}


def test_unroutable_messages_are_an_error_unless_allowed(flood):
    with pytest.raises(FloodError, match="unroutable"):
        flood.publish("no_such_queue", bodies(3))
    assert flood.stats.returned == 3
    assert flood.publish("no_such_queue", bodies(2), allow_unroutable=True) == 2
    assert flood.stats.returned == 2


def test_refused_messages_are_named_by_position_so_that_a_caller_can_send_them_again(flood, amqp_channel):
    # A queue that refuses publishes past two messages: the broker nacks the third and later ones,
    # as a quorum queue without a leader does while a cluster node is down.
    amqp_channel.queue_declare("tiny", durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    messages = [("tiny", body) for body in bodies(3)] + [("os2ds_nowhere", bodies(1)[0])]
    with pytest.raises(FloodError, match="refused") as refused:
        flood.publish_many(messages, allow_unroutable=True)
    stats = refused.value.flood_stats
    assert (stats.sent, stats.confirmed, stats.nacked) == (4, 3, 1)  # an unroutable message is confirmed
    assert stats.unconfirmed(len(messages)) == [2]
    assert stats.unconfirmed(6) == [2, 4, 5]  # and what was never sent


def test_publish_many_routes_each_message_to_its_queue(flood, amqp_channel):
    flood.declare(["a_q", "b_q"])
    pairs = [("a_q", b) for b in bodies(7)] + [("b_q", b) for b in bodies(5)]
    assert flood.publish_many(pairs) == 12
    assert flood.stats.per_queue == {"a_q": 7, "b_q": 5}
    assert ready(amqp_channel, "a_q") == 7 and ready(amqp_channel, "b_q") == 5


def test_rate_is_honoured_and_never_ahead_of_schedule(vhost, amqp_channel):
    snapshots: list[FloodProgress] = []
    rate, n = 200.0, 300
    with Flood(vhost.parameters(), progress=snapshots.append, progress_every=0.1) as flood:
        flood.declare(["rated"])
        start = time.monotonic()
        assert flood.publish("rated", bodies(n), rate=rate) == n
        elapsed = time.monotonic() - start
    # The last message is due at (n - 1) / rate; allow 25 % for scheduling and confirms.
    assert (n - 1) / rate <= elapsed <= (n - 1) / rate * 1.25 + 0.3, elapsed
    running = [p for p in snapshots if not p.done]
    assert running, "no progress reported during a 1.5 s flood"
    for p in running:
        # Never ahead: message i is sent at t0 + i / rate at the earliest.
        assert p.sent <= p.elapsed * rate + 1, (p.sent, p.elapsed)
        # And not far behind (deadline-based, no drift).
        assert p.sent >= (p.elapsed - 0.1) * rate * 0.8, (p.sent, p.elapsed)
    assert snapshots[-1].done and snapshots[-1].confirmed == n
    assert ready(amqp_channel, "rated") == n


def test_count_over_a_deadline_matches_the_rate(vhost):
    """A flood of an endless stream, cancelled at a deadline: the count is rate × time."""
    rate = 300.0

    def endless():
        i = 0
        while True:
            yield {"n": i}
            i += 1

    with Flood(vhost.parameters()) as flood:
        flood.declare(["endless"])
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(n=flood.publish("endless", endless(), rate=rate)))
        start = time.monotonic()
        worker.start()
        deadline = start + 1.5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        flood.cancel()
        worker.join(10)
        elapsed = time.monotonic() - start
        assert not worker.is_alive(), "cancel did not end the flood"
        assert 0.85 * rate * 1.5 <= result["n"] <= rate * elapsed + 1, (result["n"], elapsed)
        # The flood works again after a cancel.
        assert flood.publish("endless", bodies(3)) == 3


def test_as_fast_as_possible_is_pipelined(flood):
    flood.declare(["fast"])
    n = 3000
    start = time.monotonic()
    assert flood.publish("fast", bodies(n)) == n
    rate = n / (time.monotonic() - start)
    # One-by-one confirmed publishing manages ~2k msg/s here; the pipelined flood several times that.
    assert rate > 1000, rate


def test_parallel_publishes_from_threads(flood, amqp_channel):
    flood.declare(["t1", "t2"])
    counts: dict[str, int] = {}
    threads = [threading.Thread(target=lambda q=q: counts.update({q: flood.publish(q, bodies(400), rate=2000)}))
               for q in ("t1", "t2")]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counts == {"t1": 400, "t2": 400}
    # In parallel, not one after the other (each alone takes ~0.2 s at 2000/s).
    assert time.monotonic() - start < 0.8
    assert ready(amqp_channel, "t1") == ready(amqp_channel, "t2") == 400
    assert flood.totals.confirmed == 800


def test_publish_raw_sends_exact_bytes(flood, amqp_channel):
    flood.declare(["poisoned"])
    body, props = poison_body("not_json")
    assert flood.publish_raw("poisoned", body, props) == 1
    _method, got_props, got = amqp_channel.basic_get("poisoned", auto_ack=True)
    assert got == body and got_props.content_encoding is None and got_props.delivery_mode == 2
    body, props = poison_body("missing_fields")
    flood.publish_raw("poisoned", body, props)
    _method, got_props, got = amqp_channel.basic_get("poisoned", auto_ack=True)
    assert set(decode_body(got, got_props.content_encoding)) == {"scan_tag"}
    with pytest.raises(ValueError):
        poison_body("nonsense")


def test_history_markers_and_progress_line(vhost, tmp_path):
    history = HistoryWriter(tmp_path / "h.jsonl")
    lines: list[str] = []
    with Flood(vhost.parameters(), history=history, progress=lambda p: lines.append(progress_line(p))) as flood:
        flood.declare(["marked"])
        flood.publish("marked", bodies(10))
    names = [e["name"] for e in history.events if e["type"] == "phase"]
    assert names == ["flood_started", "flood_done"]
    assert history.events[-1]["confirmed"] == 10
    assert lines[-1].startswith("flood marked: 10/10 confirmed (100%)") and lines[-1].endswith("done")
    history.close()


def test_bad_rate_and_unreachable_broker(vhost):
    with Flood(vhost.parameters()) as flood:
        with pytest.raises(ValueError):
            flood.publish("x", bodies(1), rate=0)
    params = pika.ConnectionParameters(host="127.0.0.1", port=1, connection_attempts=1)
    with Flood(params, connect_timeout=5) as flood:
        with pytest.raises(FloodError, match="cannot connect"):
            flood.publish("x", bodies(1))


def test_connections_of_finished_threads_are_closed(flood, broker, vhost):
    flood.declare(["phase"])
    for _ in range(3):
        t = threading.Thread(target=lambda: flood.publish("phase", bodies(5)))
        t.start()
        t.join(30)
    flood.publish("phase", bodies(1))  # from this thread: the three ended threads' links are closed now
    assert flood.connections == 1


def test_cancel_is_not_undone_by_a_later_call(flood):
    """The time limit cancels a running flood; a phase starting just after must not revive it."""
    flood.declare(["slow", "quick"])

    def endless():
        while True:
            yield {"n": 1}

    slow = threading.Thread(target=lambda: flood.publish("slow", endless(), rate=100))
    slow.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        time.sleep(0.01)
    flood.cancel()
    assert flood.publish("quick", bodies(5)) == 5  # a call after the cancel runs normally
    slow.join(10)
    assert not slow.is_alive(), "the cancelled flood went on"
