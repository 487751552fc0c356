"""Attribution and the recorder without a broker: broker events built by hand, as the event exchange sends them."""
from __future__ import annotations

import threading

from harness.attribution import BROKER_DOWN, Attribution
from harness.history import EVENT_TYPES, HistoryWriter
from harness.live_view import LiveView
from harness.recorder import Recorder

VHOST = "qp-test"
OWN = "qp-harness-observer-abcd"
T0 = 1_000_000.0


class Resolver:
    """A stage resolver that knows what it is told: port -> stage."""

    def __init__(self, ports: dict[int, str] | None = None):
        self.ports = dict(ports or {})
        self.skip: set[int] = set()
        self.forgotten: list[int] = []
        self.registered: list[tuple[str, int]] = []
        self.asked: list[int | None] = []

    def __call__(self, port, user=None):
        self.asked.append(port)
        return self.ports.get(port)

    def register(self, stage, pid, user=None):
        self.registered.append((stage, pid))

    def forget(self, port):
        self.forgotten.append(port)


# ---------------------------------------------------------------- broker events, as the event exchange sends them

def conn_created(t, pid, port, provided=None, vhost=VHOST):
    headers = {"pid": pid, "name": f"127.0.0.1:{port} -> 127.0.0.1:5672", "peer_port": port, "vhost": vhost,
               "timestamp_in_ms": int(t * 1000)}
    if provided:
        headers["user_provided_name"] = provided
    return (t, "connection.created", headers)


def conn_closed(t, pid, port):  # no vhost: the broker leaves it out
    return (t, "connection.closed", {"pid": pid, "name": f"127.0.0.1:{port} -> 127.0.0.1:5672"})


def chan_created(t, pid, conn, port, number=1, vhost=VHOST):
    return (t, "channel.created", {"pid": pid, "connection": conn, "number": number, "vhost": vhost,
                                   "name": f"127.0.0.1:{port} -> 127.0.0.1:5672 ({number})"})


def chan_closed(t, pid):
    return (t, "channel.closed", {"pid": pid})


def consumer(t, chan, queue, tag, created=True, vhost=VHOST):
    return (t, "consumer.created" if created else "consumer.deleted",
            {"channel": chan, "queue": queue, "consumer_tag": tag, "prefetch_count": "2", "ack_required": "true",
             "vhost": vhost})


def queue_created(t, name, vhost=VHOST, owner=None):
    headers = {"name": name, "durable": "true", "auto_delete": "false", "exclusive": "false", "vhost": vhost}
    if owner:
        headers["owner_pid"] = owner
    return (t, "queue.created", headers)


def stage_session(t, stage_conn="<0.1.0>", port=40001, chan="<0.2.0>", queues=("qa",)):
    """A stage connecting, opening one channel and consuming ``queues``."""
    events = [conn_created(t, stage_conn, port), chan_created(t + 0.01, chan, stage_conn, port)]
    return events + [consumer(t + 0.02, chan, q, f"ctag-{q}") for q in queues]


def fold(attribution, events, now=None, flush=False):
    for event in events:
        attribution.add(*event)
    return attribution.advance(now if now is not None else max(e[0] for e in events), flush=flush)


def types(records):
    return [r[0] for r in records]


# ---------------------------------------------------------------- the fold

def test_connection_channel_and_consumers_are_attributed_through_the_port():
    att = Attribution(VHOST, OWN, Resolver({40001: "w1"}))
    records = fold(att, stage_session(T0, queues=("qa", "qb")))
    assert types(records) == ["connection_created", "channel_created", "consumer_created", "consumer_created"]
    assert {r[2]["stage"] for r in records} == {"w1"}
    conn, chan, first, _ = (r[2] for r in records)
    assert conn == {"conn": "<0.1.0>", "name": "127.0.0.1:40001 -> 127.0.0.1:5672", "peer_port": 40001,
                    "stage": "w1", "broker_ms": int(T0 * 1000)}
    assert chan["conn"] == "<0.1.0>" and chan["number"] == 1
    assert first["prefetch"] == 2 and first["ack_required"] is True and first["chan"] == "<0.2.0>"
    assert sorted(c["queue"] for c in att.consumers.values()) == ["qa", "qb"]
    assert att.open_connections() == [("w1", "127.0.0.1:40001 -> 127.0.0.1:5672")]
    for type_, _, fields in records:  # every field the history documents
        assert set(EVENT_TYPES[type_]) <= set(fields), (type_, fields)


def test_events_wait_until_their_connection_is_attributable_and_keep_their_receive_time():
    resolver = Resolver()
    att = Attribution(VHOST, OWN, resolver, attribution_timeout=1.0)
    assert fold(att, stage_session(T0), now=T0 + 0.1) == []  # the stage has not registered yet
    assert len(att.pending) == 3
    resolver.ports[40001] = "w1"
    records = att.advance(T0 + 0.3)
    assert types(records) == ["connection_created", "channel_created", "consumer_created"]
    assert [r[1] for r in records] == [T0, T0 + 0.01, T0 + 0.02]
    assert not att.pending


def test_an_unknown_owner_is_recorded_unattributed_once_expired():
    att = Attribution(VHOST, OWN, Resolver(), attribution_timeout=1.0)
    assert fold(att, stage_session(T0), now=T0 + 0.5) == []
    records = att.advance(T0 + 1.5)
    assert types(records) == ["connection_created", "channel_created", "consumer_created"]
    assert all(r[2]["stage"] is None for r in records) and records[0][1] == T0


def test_a_channel_received_before_its_connection_waits_for_it():
    att = Attribution(VHOST, OWN, Resolver({40001: "w1"}))
    conn, chan, cons = stage_session(T0)
    records = fold(att, [cons, chan, conn])  # receipt order scrambled
    assert sorted(types(records)) == ["channel_created", "connection_created", "consumer_created"]
    assert {r[2]["stage"] for r in records} == {"w1"} and not att.pending


def test_closes_without_a_vhost_are_kept_only_for_known_pids():
    resolver = Resolver({40001: "w1"})
    att = Attribution(VHOST, OWN, resolver, forget_port=resolver.forget)
    fold(att, stage_session(T0))
    records = fold(att, [consumer(T0 + 1, "<0.2.0>", "qa", "ctag-qa", created=False),
                         chan_closed(T0 + 1.1, "<0.2.0>"), conn_closed(T0 + 1.2, "<0.1.0>", 40001),
                         conn_closed(T0 + 1.3, "<0.9.9>", 40009), chan_closed(T0 + 1.3, "<0.9.8>")])
    assert types(records) == ["consumer_deleted", "channel_closed", "connection_closed"]
    assert records[2][2]["cause"] is None and records[2][2]["stage"] == "w1"
    assert not att.consumers and att.open_connections() == []
    assert resolver.forgotten == [40001]  # the port may be reused by another process
    assert not att.pending


def test_a_close_waits_for_its_pending_creation():
    resolver = Resolver()
    att = Attribution(VHOST, OWN, resolver)
    assert fold(att, [conn_created(T0, "<0.1.0>", 40001), conn_closed(T0 + 0.1, "<0.1.0>", 40001)],
                now=T0 + 0.2) == []
    resolver.ports[40001] = "w1"
    assert types(att.advance(T0 + 0.3)) == ["connection_created", "connection_closed"]


def test_the_observers_own_connections_queues_and_other_vhosts_are_left_out():
    att = Attribution(VHOST, OWN, Resolver({40001: "w1", 40002: "harness"}))
    att.own_ports.add(40003)
    events = [conn_created(T0, "<0.5.0>", 40002, provided=f"{OWN}-firehose"),
              chan_created(T0, "<0.6.0>", "<0.5.0>", 40002), consumer(T0, "<0.6.0>", "os2ds_matches", "o"),
              queue_created(T0, f"{OWN}-trace"), queue_created(T0, "excl", owner="<0.5.0>"),
              chan_created(T0, "<0.7.0>", "<0.4.0>", 40003),  # a connection from before, by its own port
              conn_created(T0, "<0.8.0>", 40001, vhost="elsewhere"), queue_created(T0, "theirs", vhost="elsewhere"),
              conn_closed(T0 + 1, "<0.5.0>", 40002), (T0, "user.authentication.success", {"vhost": VHOST})]
    assert fold(att, events) == []
    assert 40002 in att.own_ports and not att.pending


def test_a_channel_of_a_connection_from_before_the_observer_is_attributed_by_its_name():
    att = Attribution(VHOST, OWN, Resolver({40001: "harness"}))
    records = fold(att, [chan_created(T0, "<0.2.0>", "<0.1.0>", 40001), consumer(T0, "<0.2.0>", "early", "t")])
    assert [(r[0], r[2]["stage"]) for r in records] == [("channel_created", "harness"),
                                                         ("consumer_created", "harness")]


def test_broker_down_closes_every_stage_connection_once():
    att = Attribution(VHOST, OWN, Resolver({40001: "w1", 40002: "w2"}))
    fold(att, stage_session(T0) + stage_session(T0, "<0.3.0>", 40002, "<0.4.0>", ("qb",)))
    records = fold(att, [(T0 + 5, BROKER_DOWN, {}), conn_closed(T0 + 5.1, "<0.1.0>", 40001)])
    assert [(r[0], r[2]["stage"], r[2]["cause"]) for r in records] == [
        ("connection_closed", "w1", "broker_down"), ("connection_closed", "w2", "broker_down")]
    assert not att.consumers and att.open_connections() == []


def test_queue_generations_count_every_creation():
    att = Attribution(VHOST, OWN, Resolver())
    records = fold(att, [queue_created(T0, "q"), (T0 + 1, "queue.deleted", {"name": "q", "vhost": VHOST}),
                         queue_created(T0 + 2, "q")])
    assert types(records) == ["queue_created", "queue_deleted", "queue_created"]
    assert att.queue_generation == {"q": 2}


def test_an_odd_event_is_reported_not_fatal():
    att = Attribution(VHOST, OWN, Resolver({40001: "w1"}))
    records = fold(att, [(T0, "connection.created", {"vhost": VHOST, "peer_port": "not a port"}),
                         *stage_session(T0)])
    assert types(records) == ["connection_created", "channel_created", "consumer_created"]
    assert len(att.problems) == 1 and "connection.created" in att.problems[0]


# ---------------------------------------------------------------- the recorder (one writer)

def make_recorder(resolver=None, queues=("qa",)):
    history = HistoryWriter()
    view = LiveView(queues, traced=queues)
    recorder = Recorder(history, VHOST, OWN, resolver or Resolver({40001: "w1"}), view, ("os2ds_matches",),
                        drain_timeout=0.0)
    return recorder, history, view


def run_dry(recorder):
    """What the recorder thread does, in this thread: apply the inbox until it is empty."""
    while not recorder.inbox.empty():
        recorder.step()


def test_the_recorder_applies_items_in_order_and_updates_the_view():
    recorder, history, view = make_recorder()
    recorder.put("stage", "w1", 123)
    for event in stage_session(T0, queues=("qa", "fresh")) + [queue_created(T0, "fresh")]:
        recorder.put("event", *event)
    recorder.put("sample", T0 + 1, {"qa": 3}, 0)
    view.add_queue("later", traced=True)  # Observer.add_queue writes the view at once, not through the inbox
    run_dry(recorder)
    assert recorder.resolver.registered == [("w1", 123)]
    assert [e["type"] for e in history.events] == ["connection_created", "channel_created", "consumer_created",
                                                   "consumer_created", "queue_created", "sample"]
    assert view.consumers_of("w1") == {"qa", "fresh"} and view.consuming_stages() == {"w1": {"qa", "fresh"}}
    assert view.connections_of("w1") == ["127.0.0.1:40001 -> 127.0.0.1:5672"]
    assert view.ready("qa") == 3 and view.samples == 1 and view.firehose_backlog == 0
    assert view.sampled_queues() == ["qa", "later"]
    assert view.traced_queues() == ["qa", "later", "fresh"] and view.generation("fresh") == 1
    assert view.wait_for(lambda: view.consumers_of("w1"), timeout=0) == {"qa", "fresh"}


def test_the_recorder_records_the_firehose_and_outputs_but_not_its_own_traffic():
    from harness.messages import encode_body
    recorder, history, view = make_recorder()
    recorder.put("own_port", 40003)
    body = encode_body({"scan_spec": {"scan_tag": {"scanner": {"pk": 1}, "time": "2025-01-01T00:00:00+00:00"}},
                        "handle": {"type": "file", "path": "a"}, "matched": False, "matches": []})
    mine = {"connection": "127.0.0.1:40003 -> 127.0.0.1:5672", "routing_keys": ["qa"], "exchange_name": ""}
    theirs = {**mine, "connection": "127.0.0.1:40001 -> 127.0.0.1:5672", "routed_queues": ["qa"],
              "properties": {"content_encoding": "gzip"}}
    recorder.put("trace", T0, "publish.", mine, body)
    recorder.put("trace", T0, "publish.", theirs, body)
    recorder.put("trace", T0 + 0.1, "deliver.qa", {**theirs, "redelivered": "false"}, body)
    recorder.put("output", T0 + 0.2, "os2ds_matches", "gzip", body, False)
    run_dry(recorder)
    publish, deliver, output = history.events
    assert (publish["type"], publish["stage"], publish["routing_key"], publish["routed"]) == ("publish", "w1", "qa",
                                                                                             ["qa"])
    assert (deliver["type"], deliver["queue"], deliver["redelivered"]) == ("deliver", "qa", False)
    assert output["msg"]["type"] == "MatchesMessage" and view.output_count() == 1
    assert view.output_types() == {"MatchesMessage": 1} and recorder.counts["publish"] == 1
    assert 40003 in recorder.resolver.skip


def test_lost_and_reconnected_connections_reach_the_view_and_the_history():
    recorder, history, view = make_recorder()
    recorder.put("lost", "firehose", 5.0, "ConnectionResetError()")
    recorder.put("lost", "firehose", 6.0, "again")  # the first loss is the one that counts
    recorder.put("error", "firehose connection lost")
    run_dry(recorder)
    assert view.lost() == {"firehose": (5.0, "ConnectionResetError()")} and view.errors == ["firehose connection lost"]
    recorder.put("reconnected", "firehose")
    run_dry(recorder)
    assert view.lost() == {} and [e["name"] for e in history.events] == ["observer_reconnected"]


def test_stop_records_what_is_left_and_flushes_the_pending_unattributed():
    recorder, history, view = make_recorder(Resolver())
    for event in stage_session(T0):
        recorder.put("event", *event)
    recorder.put("stop")
    recorder.run()  # returns: the stop item ends the loop, finish() flushes
    assert [(e["type"], e["stage"]) for e in history.events] == [
        ("connection_created", None), ("channel_created", None), ("consumer_created", None)]


def test_an_item_that_fails_is_reported_and_the_next_one_recorded():
    recorder, history, view = make_recorder()
    recorder.put("sample", T0)  # missing arguments
    recorder.put("sample", T0, {"qa": 1}, None)
    run_dry(recorder)
    assert len(view.errors) == 1 and "sample" in view.errors[0]
    assert [e["type"] for e in history.events] == ["sample"]


# ---------------------------------------------------------------- the lost-inbox race, replayed

def test_the_old_copy_then_clear_inbox_lost_a_marker_put_in_between():
    """What the observer did before the recorder: the event thread took its inbox with
    ``batch, inbox[:] = inbox[:], []`` while the nemesis thread appended a broker-down marker.
    Replayed at the bytecode boundary between the copy and the clear, the marker is gone."""
    inbox = [stage_session(T0)[0]]
    batch = inbox[:]  # the event thread copies ...
    inbox.append((T0 + 1, BROKER_DOWN, {}))  # ... the nemesis thread's note_broker_down runs here ...
    inbox[:] = []  # ... and the event thread clears
    assert [e[1] for e in batch + inbox] == ["connection.created"]  # the marker was never seen


def test_a_marker_put_while_the_recorder_is_applying_an_event_is_recorded():
    """The same interleaving against the recorder: the nemesis thread puts the marker while the
    recorder is inside the resolver for the connection event (as far into the work as it gets)."""
    nemesis_may_run, nemesis_done = threading.Event(), threading.Event()

    class SlowResolver(Resolver):
        def __call__(self, port, user=None):
            if not nemesis_may_run.is_set():
                nemesis_may_run.set()
                assert nemesis_done.wait(5)
            return super().__call__(port)

    recorder, history, view = make_recorder(SlowResolver({40001: "w1"}))

    def nemesis():
        assert nemesis_may_run.wait(5)
        recorder.put("event", T0 + 1, BROKER_DOWN, {})  # Observer.note_broker_down
        nemesis_done.set()

    thread = threading.Thread(target=nemesis)
    thread.start()
    for event in stage_session(T0):
        recorder.put("event", *event)
    run_dry(recorder)
    thread.join(5)
    assert [(e["type"], e.get("cause")) for e in history.events] == [
        ("connection_created", None), ("channel_created", None), ("consumer_created", None),
        ("connection_closed", "broker_down")]
    assert view.consumers() == [] and view.connections_of("w1") == []


# ---------------------------------------------------------------- recorded from a live run

def recorded():
    """The event-exchange tuples of a small live run (tests/data/broker_events.json): the observer
    starting, a fake worker w1 consuming qa and qb, a harness connection consuming qh, w1 stopped.
    ``expected`` is what the observer recorded then: (type, stage, queue)."""
    import json
    from pathlib import Path
    return json.loads((Path(__file__).parent / "data" / "broker_events.json").read_text())


def test_a_recorded_run_replays_to_what_the_observer_recorded_live():
    data = recorded()
    ports = {int(port): stage for port, stage in data["ports"].items()}
    att = Attribution(data["vhost"], data["own_prefix"], Resolver(ports))
    records = []
    for t, key, headers in data["events"]:
        att.add(T0 + t, key, headers)
        records += att.advance(T0 + t)
    assert [[r[0], r[2].get("stage"), r[2].get("queue")] for r in records] == data["expected"]
    assert not att.pending and not att.consumers and att.open_connections() == []


def test_a_recorded_run_replays_the_same_when_the_stages_register_late():
    """Each stage's port becomes known 0.3 s after its connection event (its PID registered late); the
    recorder retries the pending events every 0.05 s, well within the attribution timeout."""
    data = recorded()
    ports = {int(port): stage for port, stage in data["ports"].items()}
    known_from = {h["peer_port"]: T0 + t + 0.3 for t, key, h in data["events"]
                  if key == "connection.created" and h.get("peer_port") in ports}
    clock = [T0]

    class LateResolver(Resolver):
        def __call__(self, port, user=None):
            return self.ports.get(port) if clock[0] >= known_from.get(port, float("inf")) else None

    att = Attribution(data["vhost"], data["own_prefix"], LateResolver(ports), attribution_timeout=1.0)
    records = []
    for t, key, headers in data["events"]:
        while clock[0] + 0.05 < T0 + t:  # the recorder's idle ticks
            clock[0] += 0.05
            records += att.advance(clock[0])
        clock[0] = T0 + t
        att.add(T0 + t, key, headers)
        records += att.advance(clock[0])
    records += att.advance(clock[0] + 0.5)
    assert sorted([r[0], str(r[2].get("stage")), str(r[2].get("queue"))] for r in records) == sorted(
        [t, str(s), str(q)] for t, s, q in data["expected"])


def test_a_stage_is_known_by_its_own_broker_user_without_asking_the_os():
    from harness.port_resolver import PortResolver
    resolver = PortResolver(broker_port=5672, own_pid=1)
    resolver.register("worker#2", pid=999999, user="qp-gw0-1234.worker#2")
    assert resolver(40001, "qp-gw0-1234.worker#2") == "worker#2"
    resolver.remember(40002, "explorer")  # the port is also known from the process tree, as another stage's
    assert resolver(40002, "qp-gw0-1234.worker#2") == "worker#2"
    assert resolver.mismatches == [(40002, "worker#2", "explorer")]


def test_a_killed_cluster_node_ends_the_connections_to_it_and_their_consumers():
    from harness.attribution import NODE_DOWN
    att = Attribution(VHOST, OWN, Resolver({40001: "w1", 40002: "w2"}))
    for port, node in ((40001, 5672), (40002, 5673)):
        fold(att, [(T0, "connection.created", {"pid": f"<c{port}>", "name": f"127.0.0.1:{port} -> 127.0.0.1:{node}",
                                               "peer_port": port, "vhost": VHOST}),
                   (T0, "channel.created", {"pid": f"<h{port}>", "connection": f"<c{port}>", "number": 1,
                                            "vhost": VHOST, "name": f"127.0.0.1:{port} -> 127.0.0.1:{node} (1)"}),
                   (T0, "consumer.created", {"channel": f"<h{port}>", "queue": "qa", "consumer_tag": f"t{port}",
                                             "vhost": VHOST, "prefetch_count": 1, "ack_required": True})])
    records = fold(att, [(T0 + 1, NODE_DOWN, {"port": 5673})])
    assert [(r[0], r[2]["stage"], r[2]["cause"]) for r in records] == [("connection_closed", "w2", "node_down")]
    assert [c["stage"] for c in att.consumers.values()] == ["w1"]
