"""The admin (per-scan queues, OS2datascanner 3.32): naming and command bodies without a broker,
then the admin alone on a real broker against a tiny pika "worker" that says hello."""
from __future__ import annotations

import gzip
import json
import time
from types import SimpleNamespace

import pika
import pytest

from harness.admin import COMMAND_PROPERTIES, Admin, command_body, hello_queue, needed
from harness.ledger import LiveLedger
from harness.messages import COMMAND_KEYS, classify, decode_body, per_scan_queue, summarise
from harness.scenario import parse_scenario


# -- without a broker ----------------------------------------------------------------------
def test_a_per_scan_queue_is_named_from_the_scanner_pk_and_the_tags_local_time():
    tag = {"time": "2026-05-05T12:00:00.123456+02:00", "scanner": {"pk": 7}}
    assert per_scan_queue(tag) == "osds_conversions.7_20260505T120000"


def test_a_command_has_all_seven_keys_gzipped_with_the_admins_properties():
    body = command_body(new_queue="osds_conversions.7_20260505T120000", new_queue_priority="delta")
    obj = json.loads(gzip.decompress(body))
    assert list(obj) == list(COMMAND_KEYS) and obj["abort"] is None and obj["new_queue_priority"] == "delta"
    assert (COMMAND_PROPERTIES.delivery_mode, COMMAND_PROPERTIES.content_encoding, COMMAND_PROPERTIES.priority) \
        == (2, "gzip", 10)
    assert classify(obj) == "CommandMessage"
    assert summarise(body, "gzip")["new_queue"] == "osds_conversions.7_20260505T120000"


def test_only_a_worker_hello_naming_a_queue_is_a_hello():
    plain = SimpleNamespace(content_encoding=None)
    hello = json.dumps({key: None for key in COMMAND_KEYS} | {"worker_hello": "amq.gen-abc"}).encode()
    assert hello_queue(hello, plain) == "amq.gen-abc"
    assert hello_queue(command_body(new_queue="q", new_queue_priority="full"), SimpleNamespace(content_encoding="gzip")) is None
    for junk in (b"", b"\x00not json", b"[1, 2]", json.dumps({"worker_hello": 42}).encode()):
        assert hello_queue(junk, plain) is None


def _scenario(**phase):
    return parse_scenario({"clients": [{"name": "a"}], "stages": [{"name": "w", "kind": "worker"}],
                           "workload": [{"client": "a", "via": "conversions", **phase}]})


def test_the_admin_runs_only_when_a_scenario_needs_it():
    assert not needed(_scenario())
    assert needed(_scenario(per_scan=True)) and needed(_scenario(per_scan="urgent"))


# -- live: the admin and a fake worker -----------------------------------------------------
class FakeObserver:
    def __init__(self):
        self.queues = []

    def add_queue(self, queue, wait=0.0):
        self.queues.append(queue)
        return True

    def ready(self, queue):
        return 0

    def consumers(self):
        return []


def _planned(scan, queue, tag="full", phase=0):
    return SimpleNamespace(scan=scan, conversion_queue=queue, per_scan=tag, phase=phase)


def _commands(channel, queue, want, timeout=10.0, until=lambda method, command: False):
    """Commands read from ``queue``: ``want`` of them, or up to the first that ``until`` accepts."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline and not any(until(m, c) for m, _, c in got):
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        command = decode_body(body, properties.content_encoding)
        if not command.get("worker_hello"):  # the worker's own hello comes back through broadcast
            got.append((method, properties, command))
    return got


@pytest.fixture
def admin(vhost, history):
    ledger = LiveLedger()
    history.listen(ledger)
    admin = Admin(vhost.parameters(), history, ledger.scan_state, FakeObserver(), rebroadcast_seconds=1.0,
                  phase_names=["big"])
    admin.start()
    yield admin, ledger
    admin.stop()


def test_the_admin_announces_answers_a_hello_and_deletes_a_finished_scan(admin, amqp_channel, history):
    admin, ledger = admin
    queue = "osds_conversions.101_20260105T070000"
    worker = amqp_channel
    command_queue = worker.queue_declare("", exclusive=True, arguments={"x-max-priority": 10}).method.queue
    worker.queue_bind(command_queue, "broadcast", "")
    history.record("scan_planned", scan="s1", client="a", org="o", mode="full", explorer_queue="x",
                   conversion_queue=queue, objects=["doc"], via="conversions", per_scan="full")
    admin.open_scans([_planned("s1", queue)])
    worker.queue_declare(queue, passive=True)  # declared before the spec would be sent
    [(method, properties, body)] = _commands(worker, command_queue, 1)
    assert body["new_queue"] == queue and body["new_queue_priority"] == "full" and method.exchange == "broadcast"
    assert (properties.delivery_mode, properties.content_encoding, properties.priority) == (2, "gzip", 10)

    hello = json.dumps({key: None for key in COMMAND_KEYS} | {"worker_hello": command_queue})
    worker.basic_publish("broadcast", "", hello.encode())
    replies = [r for r in _commands(worker, command_queue, 9, until=lambda m, c: m.exchange == "")
               if r[0].exchange == ""]
    assert replies and replies[0][2]["new_queue"] == queue and replies[0][0].routing_key == command_queue
    assert [e["command_queue"] for e in history.events if e["type"] == "hello"] == [command_queue]

    time.sleep(1.2)  # R = 1 s: announced again
    reasons = {e["reason"] for e in history.events if e["type"] == "ps_announce"}
    assert reasons == {"scan_start", "hello_reply", "rebroadcast"}

    admin.phase_done(0)
    history.record("publish", exchange="", routing_key=queue, stage="harness", routed=[queue],
                   msg={"type": "ConversionMessage", "scan": "s1", "org": "o", "object": "doc"})
    history.record("publish", exchange="", routing_key="os2ds_matches", stage="worker", routed=["os2ds_matches"],
                   msg={"type": "MatchesMessage", "scan": "s1", "org": "o", "object": "/doc"})
    deadline = time.monotonic() + 5
    while not any(e["type"] == "ps_delete" for e in history.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    [deleted] = [e for e in history.events if e["type"] == "ps_delete"]
    assert deleted["queue"] == queue and deleted["reason"] == "scan_end"
    assert any(c[2]["delete_queue"] == queue
               for c in _commands(worker, command_queue, 99, until=lambda m, c: c["delete_queue"] == queue))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        worker.queue_declare(queue, passive=True)


def test_stale_replies_and_a_short_scan(admin, amqp_channel, history):
    admin, _ = admin
    short = admin.short_scan("delta")
    stale = admin.reply_stale()
    assert stale == short, "the stale reply names the queue deleted last"
    command_queue = amqp_channel.queue_declare("", exclusive=True).method.queue
    amqp_channel.queue_bind(command_queue, "broadcast", "")
    hello = json.dumps({key: None for key in COMMAND_KEYS} | {"worker_hello": command_queue})
    amqp_channel.basic_publish("broadcast", "", hello.encode())
    replies = [r for r in _commands(amqp_channel, command_queue, 9, until=lambda m, c: m.exchange == "")
               if r[0].exchange == ""]
    assert replies[0][2]["new_queue"] == stale
    kinds = [(e["type"], e.get("reason")) for e in history.events if e["type"] in ("ps_announce", "ps_delete")]
    assert kinds[:2] == [("ps_announce", "fault"), ("ps_delete", "fault")]


def test_per_scan_queue_names_never_collide(tmp_path):
    from harness.workload import Workload
    scenario = parse_scenario({
        "clients": [{"name": "a", "per_scan": True}, {"name": "b", "per_scan": True}],
        "stages": [{"name": "w", "kind": "worker"}],
        "workload": [{"client": c, "mode": m, "via": "conversions", "scans": 3, "objects": 1}
                     for c in ("a", "b") for m in ("full", "delta")] * 2})
    workload = Workload(scenario, tmp_path)
    planned = [scan for phase in workload.plan_all() for scan in phase]
    names = [scan.conversion_queue for scan in planned]
    assert len(set(names)) == len(names) == 24
    assert all(scan.spec["conversion_queue"] == scan.conversion_queue == per_scan_queue(scan.spec["scan_tag"])
               for scan in planned)
    assert workload.per_scan_queue(5, 2) == planned[5 * 3 + 2].conversion_queue
    # A hold's later top-ups (numbered past a day's worth of minutes) still get names of their own.
    assert workload.per_scan_queue(0, 1440) not in names
    assert {scan.as_event()["per_scan"] for scan in planned} == {"full", "delta"}


class FakeAdmin:
    def __init__(self):
        self.opened, self.deleted, self.done = [], set(), []

    def open_scans(self, scans):
        self.opened += scans

    def was_deleted(self, queue):
        return queue in self.deleted

    def phase_done(self, index):
        self.done.append(index)


def test_a_per_scan_hold_keeps_one_queue_and_stops_when_the_admin_deletes_it(tmp_path, history):
    from harness.phases import PhaseDriver
    from harness.schedule import Happenings
    from harness.workload import Workload
    scenario = parse_scenario({"clients": [{"name": "a", "per_scan": True}], "stages": [{"name": "w", "kind": "worker"}],
                               "workload": [{"name": "busy", "client": "a", "via": "conversions",
                                             "hold": {"seconds": 60}}]})
    workload, admin = Workload(scenario, tmp_path), FakeAdmin()
    driver = PhaseDriver(scenario, workload, None, history, 1.0, Happenings(), lambda grace: False, lambda text: None,
                         {}, admin)
    driver.launch(0, scenario.workload[0])
    queue = driver.holds[0].queue
    assert queue == workload.per_scan_queue(0, 0) and queue.startswith("osds_conversions.")
    top_ups = [workload.plan_scan(0, n, objects=2, conversion_queue=queue) for n in (0, 7)]
    assert {scan.conversion_queue for scan in top_ups} == {queue} and len({scan.scan for scan in top_ups}) == 2
    driver._register(top_ups)
    assert admin.opened == top_ups
    admin.deleted.add(queue)
    driver.tick(lambda q: 0, lambda: 5)
    assert driver.holds[0].stopped_early == "the admin deleted its per-scan queue"
    assert [e["per_scan"] for e in history.events if e["type"] == "scan_planned"] == ["full", "full"]
