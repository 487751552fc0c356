"""No test can break the tests after it (issue 11): each case is a child pytest session.

Its first test stops the session broker by PID; the report must blame that test (a teardown
error naming it and what was wrong) and the tests after it must either pass on a revived
broker (local provider: ours) or fail at setup naming that test (external: not ours to restart).
"""
from __future__ import annotations

import json
import re

import pytest

from broker_support import alive, kill_pids
from harness.broker import LocalBroker, find_rabbitmq_bin

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")

CHILD = '''
import json, os, signal
import pika
from harness.watchdog import group_members

def record(broker, **line):
    members = [p.pid for g in broker.process_groups for p in group_members(g)]
    with open(os.environ["QP_RECORD"], "a") as f:
        f.write(json.dumps(dict(groups=list(broker.process_groups), members=members, **line)) + "\\n")

def test_1_breaks_the_broker(broker, vhost):
    record(broker, test=1)
    groups = {"killed": broker.process_groups, "hung": broker.process_groups[:1]}[os.environ["QP_HOW"]]
    for group in groups or [int(os.environ["QP_EXTERNAL_GROUP"])]:
        os.killpg(group, signal.SIGSTOP if os.environ["QP_HOW"] == "hung" else signal.SIGKILL)

def test_2_still_has_a_working_broker(broker, vhost):
    record(broker, test=2)
    with pika.BlockingConnection(vhost.parameters()) as connection:
        connection.channel().queue_declare("work", durable=True)
    assert [q["name"] for q in broker.management.queues(vhost.name)] == ["work"]
    assert broker.management.vhost(vhost.name)["tracing"] is True

def test_3_needs_only_the_broker(broker):
    assert broker.management.whoami()["name"] == broker.user
'''


def _pids(records: list[dict]) -> list[int]:
    return sorted({pid for r in records for pid in r["members"] + r["groups"]})


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_local_broker_is_revived_and_the_test_that_broke_it_is_named(inner, how):
    run = inner(CHILD)
    record = run.directory / "record.jsonl"
    done = run.run("-rA", "--rabbitmq-provider", "local", QP_RECORD=str(record), QP_HOW=how)
    records = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    try:
        out = done.stdout + done.stderr
        assert re.search(r"3 passed, 1 error in", out), out
        assert "ERROR at teardown of test_1_breaks_the_broker" in out, out
        assert "ERROR at setup" not in out, out
        what = {"killed": r"its rabbitmq-server \(process group \d+\) is no longer running",
                "hung": r"AMQP at 127\.0\.0\.1:\d+ did not answer within 5 s \(\w+\)"}[how]
        assert re.search(r"qp-harness: the session's local broker \(127\.0\.0\.1:\d+\) stopped answering during "
                         rf"test test_inner\.py::test_1_breaks_the_broker: {what}\. It was restarted \(same ports, "
                         r"data and credentials; [\d.]+ s\) so that the tests after this one have a working broker",
                         out), out
        assert re.search(r"qp-harness: the local broker stopped answering during test_inner\.py::"
                         r"test_1_breaks_the_broker \(.+\); restarted in [\d.]+ s", out), out
        first, second = records
        assert first["test"] == 1 and second["test"] == 2
        assert second["groups"][0] != first["groups"][0], "the node was started again"
        assert "Traceback" not in out, out
    finally:
        kill_pids(_pids(records))  # last resort only; the assertion below says whether it was needed
    assert not alive(_pids(records)), "the child left broker processes running"


def test_external_broker_is_left_alone_and_later_tests_name_the_test_that_broke_it(inner, tmp_path):
    local = LocalBroker(tmp_path / "external-rabbitmq")
    external = local.start()
    try:
        run = inner(CHILD)
        done = run.run("--rabbitmq-provider", "external", "--rabbitmq-url", external.amqp_url(),
                       "--rabbitmq-management-url", external.management_url, QP_RECORD=str(run.directory / "r"),
                       QP_HOW="killed", QP_EXTERNAL_GROUP=str(external.process_groups[0]))
        out = done.stdout + done.stderr
        assert re.search(r"1 passed, 3 errors? in", out), out
        assert "ERROR at teardown of test_1_breaks_the_broker" in out, out
        assert re.search(r"qp-harness: the session's external broker \(127\.0\.0\.1:\d+\) stopped answering during "
                         r"test test_inner\.py::test_1_breaks_the_broker: AMQP at 127\.0\.0\.1:\d+ did not answer "
                         r"within 5 s \(\w+\)\. It is not the harness's to restart", out), out
        for later in ("test_2_still_has_a_working_broker", "test_3_needs_only_the_broker"):
            assert f"ERROR at setup of {later}" in out, out
        # named at both later setups (the short summary may repeat the lines)
        assert out.count("stopped answering after test test_inner.py::test_1_breaks_the_broker") >= 2, out
        assert "cannot create this test's vhost" not in out, out
        assert "Traceback" not in out, out
        assert local.process.poll() is not None and local.epmd.poll() is None, "the harness restarted it"
    finally:
        local.stop()
