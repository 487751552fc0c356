"""The observer against a real broker: events attributed to launched stages, samples, firehose, own traffic left out."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pika
import pytest

from harness.history import EVENT_TYPES, HistoryWriter
from harness.messages import OUTPUT_QUEUES, encode_body
from harness.observer import Observer
from harness.scenario import Stage
from waiting import wait_until

FAKE_STAGE = [sys.executable, str(Path(__file__).parent / "helpers" / "fake_stage.py"), "{stage}"]


SCAN_TAG = {"time": "2025-01-01T00:00:00+00:00", "user": "u", "scanner": {"pk": 7, "name": "s"},
            "organisation": {"name": "o", "uuid": "org-1"}}
SPEC = {"scan_tag": SCAN_TAG, "source": {"type": "file", "path": "/srv"}, "rule": {"type": "cpr"}}


@pytest.fixture
def make_observer(broker, vhost, history):
    observers = []

    def make(queues=(), **kwargs):
        observer = Observer(broker, vhost.name, history, list(queues), **kwargs)
        observers.append(observer)
        observer.start()
        return observer

    yield make
    for observer in observers:
        observer.stop()


def of(history, type_, **match):
    return [e for e in history.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]



def test_a_detached_stage_is_attributed_by_its_own_broker_user(make_observer, make_launcher, history, broker, vhost):
    """A stage outside the launched process's tree (harness.detach, as docker run or ssh give) is known by
    the broker user the harness made for it; the user goes with the vhost."""
    import psutil
    observer = make_observer(["qa"])
    stages = make_launcher(command=[sys.executable, "-m", "harness.detach", *FAKE_STAGE], observer=observer)
    [proc] = stages.start(Stage(name="w1", kind="worker", queue_priority=["qa"]))
    assert observer.wait_for_consumers("w1", {"qa"}, timeout=20) == {"qa"}, proc.tail()
    [started] = of(history, "stage_started", stage="w1")
    assert started["broker_user"] == f"{vhost.name}.w1"
    [conn] = of(history, "connection_created", stage="w1")
    # The management API lists a connection some time after the broker's event says it exists.
    owners = wait_until(lambda: {c["name"]: c["user"] for c in broker.management.connections(vhost.name)
                                 if c["name"] == conn["name"]}, 10, "the management API listing the connection")
    assert owners[conn["name"]] == started["broker_user"]
    assert not psutil.Process(proc.pid).children(recursive=True), "the engine should not be the wrapper's child"
    stages.stop_all(grace=5)
    assert observer.wait_for(lambda: not observer.consumers_of("w1"), timeout=10)


def test_events_are_attributed_to_the_stage(make_observer, make_launcher, history):
    observer = make_observer(["qa", "qb"])
    stages = make_launcher(observer=observer)
    [proc] = stages.start(Stage(name="w1", kind="worker", queue_priority=["qa", "qb"], env={"FAKE_PREFETCH": "2"}))
    assert observer.wait_for_consumers("w1", {"qa", "qb"}, timeout=20) == {"qa", "qb"}, proc.tail()

    [conn] = of(history, "connection_created", stage="w1")
    assert conn["name"].startswith("127.0.0.1:") and conn["peer_port"] and conn["conn"].startswith("<")
    assert "broker_ms" in conn
    [chan] = of(history, "channel_created", stage="w1")
    assert chan["conn"] == conn["conn"]
    consumers = of(history, "consumer_created", stage="w1")
    assert sorted(c["queue"] for c in consumers) == ["qa", "qb"]
    assert all(c["chan"] == chan["chan"] and c["prefetch"] == 2 for c in consumers)
    assert {"qa", "qb"} <= {e["queue"] for e in of(history, "queue_created")}
    [started] = of(history, "stage_started", stage="w1")
    assert started["pid"] == proc.pid and started["read_queues"] == ["qa", "qb"]
    assert observer.connections_of("w1") == [conn["name"]]

    stages.stop_all(grace=5)
    assert observer.wait_for(lambda: not observer.consumers_of("w1"), timeout=10)
    observer.wait_for(lambda: of(history, "connection_closed", stage="w1"), timeout=10)
    assert sorted(e["queue"] for e in of(history, "consumer_deleted", stage="w1")) == ["qa", "qb"]
    assert of(history, "channel_closed", stage="w1")
    assert observer.connections_of("w1") == []
    [closed] = of(history, "connection_closed", stage="w1")
    assert closed["conn"] == conn["conn"]
    # Every event type written is a documented one, with at least the documented fields.
    for event in history.events:
        assert set(EVENT_TYPES[event["type"]]) <= set(event), event


def test_a_wrapper_command_is_attributed_through_its_child(make_observer, make_launcher, history):
    observer = make_observer()
    stages = make_launcher(observer=observer)
    stages.start(Stage(name="wrapped", kind="worker", queue_priority=["qw"], env={"FAKE_CHILD": "1"}))
    assert observer.wait_for_consumers("wrapped", {"qw"}, timeout=20) == {"qw"}
    assert of(history, "connection_created", stage="wrapped")


def test_harness_connections_are_marked_and_observer_traffic_is_absent(make_observer, history, vhost):
    observer = make_observer(["qh"])
    with pika.BlockingConnection(vhost.parameters()) as connection:
        channel = connection.channel()
        channel.queue_declare("qh", durable=True)
        channel.basic_consume("qh", lambda *a: None, consumer_tag="harness-tag")
        assert observer.wait_for(lambda: observer.consumers_of("harness") == {"qh"}, timeout=10)
    assert observer.wait_for(lambda: of(history, "connection_closed"), timeout=10)
    observer.stop()
    conns = of(history, "connection_created")
    assert [c["stage"] for c in conns] == ["harness"], conns
    # Nothing of the observer: its three connections, the output-queue consumers, its trace queue.
    consumers = of(history, "consumer_created")
    assert [(c["stage"], c["queue"]) for c in consumers] == [("harness", "qh")]
    created = [e["queue"] for e in history.events if e["type"] == "queue_created"]
    assert observer.trace_queue and observer.trace_queue not in created and "qh" in created
    assert all(e.get("stage") is not None for e in history.events if e["type"].startswith(("connection", "channel")))


def test_samples_follow_ready_counts(make_observer, amqp_channel, history):
    amqp_channel.queue_declare("qs", durable=True)
    observer = make_observer(["qs", "missing"], sample_interval=0.05)
    assert observer.wait_for(lambda: observer.samples >= 2, timeout=5)
    assert observer.ready("qs") == 0 and observer.ready("missing") is None
    for _ in range(3):
        amqp_channel.basic_publish("", "qs", b"{}")
    assert observer.wait_for_ready("qs", 3, timeout=5) == 3
    observer.add_queue("later")
    amqp_channel.queue_declare("later", durable=True)
    assert observer.wait_for(lambda: observer.ready("later") == 0, timeout=5)
    amqp_channel.queue_delete("qs")
    assert observer.wait_for(lambda: observer.ready_counts().get("qs", 0) is None, timeout=5)
    samples = of(history, "sample")
    assert samples and all(set(s["ready"]) >= {"qs", "missing"} for s in samples)
    assert any(s["ready"]["qs"] == 3 for s in samples)
    assert all(s["ready"]["missing"] is None for s in samples)
    # Samples keep coming at about the asked interval after missing-queue channel closes.
    times = [s["t"] for s in samples]
    assert len(times) >= 5 and max(b - a for a, b in zip(times, times[1:])) < 1.0


def test_firehose_publish_and_deliver_with_summaries(make_observer, make_launcher, history, amqp_channel):
    observer = make_observer(["specs"])
    stages = make_launcher(observer=observer)
    stages.start(Stage(name="ex", kind="explorer", queue_priority=["specs"],
                       env={"FAKE_PUBLISH_ON_DELIVERY": "os2ds_status",
                            "FAKE_BODY": '{"scan_tag": {"scanner": {"pk": 7}, "time": "2025-01-01T00:00:00+00:00"},'
                                         ' "status_is_error": false, "message": "", "total_objects": 1}'}))
    assert observer.wait_for_consumers("ex", {"specs"}, timeout=20)
    amqp_channel.basic_publish("", "specs", encode_body(SPEC),
                               pika.BasicProperties(delivery_mode=2, content_encoding="gzip"))
    assert observer.wait_for(lambda: observer.output_count("os2ds_status") == 1, timeout=10)
    assert observer.wait_for(lambda: of(history, "publish", stage="ex"), timeout=5)

    [pub] = of(history, "publish", stage="harness")
    assert pub["exchange"] == "" and pub["routing_key"] == "specs" and pub["routed"] == ["specs"]
    assert pub["msg"]["type"] == "ScanSpecMessage" and pub["msg"]["org"] == "org-1"
    assert pub["msg"]["scan"] == "7@2025-01-01T00:00:00+00:00"
    [dlv] = of(history, "deliver", queue="specs")
    assert dlv["stage"] == "ex" and dlv["redelivered"] is False and dlv["msg"]["type"] == "ScanSpecMessage"
    [status] = of(history, "publish", stage="ex")
    assert status["routing_key"] == "os2ds_status" and status["msg"]["type"] == "StatusMessage"
    [out] = of(history, "output")
    assert out["queue"] == "os2ds_status" and out["msg"]["type"] == "StatusMessage"
    # The observer's own consumption of the output queue is not a delivery in the history.
    assert not of(history, "deliver", queue="os2ds_status")
    assert not [e for e in history.events if e["type"] == "consumer_created" and e["queue"] in OUTPUT_QUEUES]


def test_a_queue_added_by_the_harness_is_traced_from_its_first_delivery_while_the_recorder_is_behind(
        make_observer, amqp_channel, history):
    # Under load the recorder's inbox runs seconds behind; a per-scan queue the admin creates may be
    # consumed at once, so add_queue must not wait for the recorder to trace it.
    observer = make_observer([])
    observer.recorder.on_stall = time.sleep
    observer.recorder.put("stall", 3.0)
    assert observer.add_queue("fresh", wait=2.0), "the firehose did not trace the queue while the recorder slept"
    amqp_channel.queue_declare("fresh", durable=True)
    amqp_channel.basic_publish("", "fresh", b"{}")
    _, _, body = amqp_channel.basic_get("fresh", auto_ack=True)
    assert body == b"{}"
    assert observer.wait_for(lambda: of(history, "deliver", queue="fresh"), timeout=10)
    assert observer.wait_for(lambda: observer.ready("fresh") == 0, timeout=5)


def test_results_are_counted(make_observer, amqp_channel):
    observer = make_observer()
    matches = {"scan_spec": {"scan_tag": SCAN_TAG}, "handle": {"type": "file", "path": "a.txt"},
               "matched": False, "matches": []}
    for _ in range(2):  # a duplicate is read (and counted) twice
        amqp_channel.basic_publish("", "os2ds_matches", encode_body(matches),
                                   pika.BasicProperties(delivery_mode=2, content_encoding="gzip"))
    assert observer.wait_for(lambda: observer.output_count("os2ds_matches") == 2, timeout=10)
    assert observer.output_count() == 2
    assert observer.output_types() == {"MatchesMessage": 2}


def test_stop_is_idempotent_and_survives_lost_connections(make_observer, broker, vhost):
    observer = make_observer(["q"])
    for worker in observer._workers:  # simulate a broker that dropped every connection
        sock = worker.connection._impl._transport._sock
        sock.shutdown(2)
    assert observer.wait_for(lambda: all(w.reconnects for w in observer._workers), timeout=15), observer.errors
    assert observer.wait_for(lambda: observer.errors, timeout=5)
    assert observer.wait_for(lambda: not observer.view.lost(), timeout=5)
    observer.stop()
    observer.stop()


def test_samples_carry_the_firehose_backlog(make_observer, history):
    observer = make_observer([], sample_interval=0.05)
    assert observer.wait_for(lambda: observer.samples >= 2, timeout=5)
    assert observer.firehose_backlog == 0
    assert all(s["firehose_backlog"] == 0 for s in of(history, "sample"))


def test_other_vhosts_are_left_out(make_observer, broker, history, vhost):
    other = "qp-other-" + vhost.name[3:]
    broker.management.create_vhost(other, tracing=True)
    try:
        observer = make_observer(["mine"])
        with pika.BlockingConnection(broker.connection_parameters(other)) as connection:
            channel = connection.channel()
            channel.queue_declare("theirs", durable=True)
            channel.basic_consume("theirs", lambda *a: None)
            channel.basic_publish("", "theirs", b"{}")
            with pika.BlockingConnection(vhost.parameters()) as mine:  # a marker that our events got through
                mine.channel().queue_declare("mine", durable=True)
                assert observer.wait_for(lambda: of(history, "queue_created", queue="mine"), timeout=10)
        assert observer.wait_for(lambda: len(of(history, "connection_closed")) == 1, timeout=10)
        observer.stop()
        assert not [e for e in history.events if "theirs" in str(e)]
        assert len(of(history, "connection_created")) == 1
    finally:
        broker.management.delete_vhost(other)


def test_a_connection_opened_before_the_observer_is_attributed_by_port(make_observer, history, vhost):
    with pika.BlockingConnection(vhost.parameters()) as connection:
        observer = make_observer()
        channel = connection.channel()
        channel.queue_declare("early", durable=True)
        channel.basic_consume("early", lambda *a: None)
        assert observer.wait_for(lambda: observer.consumers_of("harness") == {"early"}, timeout=10)
        [chan] = of(history, "channel_created")
        assert chan["stage"] == "harness"


def test_an_unknown_process_is_recorded_unattributed_after_the_timeout(make_observer, history, vhost, broker, tmp_path):
    import subprocess
    import tomli_w
    observer = make_observer(attribution_timeout=0.5)
    config = tmp_path / "stranger.toml"
    config.write_text(tomli_w.dumps({"amqp": {"AMQP_HOST": broker.host, "AMQP_PORT": broker.amqp_port,
                                              "AMQP_USER": broker.user, "AMQP_PWD": broker.password,
                                              "AMQP_VHOST": vhost.name}}))
    env = {**__import__("os").environ, "OS2DS_ENGINE_USER_CONFIG_PATH": str(config), "QUEUE_PRIORITY": "sq"}
    stranger = subprocess.Popen(FAKE_STAGE[:2] + ["worker"], env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        consumers = observer.wait_for(lambda: [c for c in observer.consumers() if c["queue"] == "sq"], timeout=15)
        seen = time.time()
        assert consumers and consumers[0]["stage"] is None
        [conn] = of(history, "connection_created")
        assert conn["stage"] is None
        # Recorded with the time it was received, not the time the attribution gave up.
        [consumer] = of(history, "consumer_created", queue="sq")
        assert seen - consumer["t"] >= 0.4
    finally:
        stranger.terminate()
        stranger.wait(10)


def test_a_closed_stage_connection_and_its_reconnect_are_attributed(make_observer, make_launcher, history, broker):
    observer = make_observer(["rq"])
    stages = make_launcher(command=None, observer=observer)
    [proc] = stages.start(Stage(name="ref", kind="worker", queue_priority=["rq"]))
    assert observer.wait_for_consumers("ref", {"rq"}, timeout=30), proc.tail()
    [name] = observer.connections_of("ref")
    # The management API knows a connection only once its statistics arrive: retry until the broker closed it.
    deadline = time.monotonic() + 20
    while not of(history, "connection_closed", stage="ref") and time.monotonic() < deadline:
        broker.management.close_connection(name, "test: close_connection")
        observer.wait_for(lambda: of(history, "connection_closed", stage="ref"), timeout=1)
    assert of(history, "connection_closed", stage="ref"), proc.tail()
    assert observer.wait_for(lambda: len(of(history, "connection_created", stage="ref")) == 2, timeout=30), proc.tail()
    assert observer.wait_for_consumers("ref", {"rq"}, timeout=30)
    [new] = observer.connections_of("ref")
    assert new != name
    assert stages.poll() == []


def test_an_unreachable_broker_is_a_clear_error(tmp_path):
    from harness.broker import Broker, free_port
    from harness.observer import ObserverError

    nowhere = Broker("127.0.0.1", free_port(), "http://127.0.0.1:1", "u", "p", "test")
    observer = Observer(nowhere, "v", HistoryWriter(), [])
    with pytest.raises(ObserverError) as info:
        observer.start()
    assert f"127.0.0.1:{nowhere.amqp_port}" in str(info.value) and info.value.__suppress_context__
    observer.stop()  # harmless after a failed start
