"""The health check between tests, and reviving a local broker that stopped answering (issue 11)."""
from __future__ import annotations

import os
import re
import signal
import time

import pika
import pytest

from harness.broker import LocalBroker, find_rabbitmq_bin, health_problem
from harness.watchdog import group_members, registered_process_groups

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")


def test_health_check_answers_on_a_working_broker(broker):
    began = time.monotonic()
    assert health_problem(broker) is None
    assert time.monotonic() - began < 1.0, "the check runs after every test: it must stay cheap"


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_revive_after_the_node_is_stopped_by_pid(tmp_path, how):
    """killed: SIGKILL to the node's and epmd's process groups; hung: SIGSTOP to the node's."""
    local = LocalBroker(tmp_path)
    broker = local.start()
    old_groups = list(broker.process_groups)
    try:
        broker.management.create_vhost("kept")
        if how == "killed":
            for group in old_groups:
                os.killpg(group, signal.SIGKILL)
            deadline = time.monotonic() + 15  # SIGKILL is delivered, not yet done: wait for the group to empty
            while group_members(old_groups[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            problem = health_problem(broker)
            assert re.fullmatch(rf"its rabbitmq-server \(process group {old_groups[0]}\) is no longer running",
                                problem), problem
        else:
            os.killpg(old_groups[0], signal.SIGSTOP)
            began = time.monotonic()
            problem = health_problem(broker, deadline=1.0)
            assert time.monotonic() - began < 5, "the check must keep to its deadline against a hung node"
            assert "did not answer within 1 s" in problem, problem

        seconds = local.revive()

        assert health_problem(broker) is None
        assert seconds == local.timings["revive"] < 60
        # Same ports, credentials and data: the Broker the tests hold is still valid.
        assert broker.management.vhost("kept") is not None
        with pika.BlockingConnection(broker.connection_parameters("kept")) as connection:
            connection.channel().queue_declare("after-revive")
        # The dead groups are gone and unregistered; the new ones are watched.
        new_groups = list(broker.process_groups)
        assert new_groups[0] != old_groups[0]
        if how == "hung":
            assert new_groups[1] == old_groups[1], "a live epmd is kept"
        assert not group_members(old_groups[0])
        assert old_groups[0] not in registered_process_groups()
        assert set(new_groups) <= set(registered_process_groups())
    finally:
        local.stop()
    assert not any(group_members(g) for g in old_groups + broker.process_groups)


LEAVES_A_CONNECTION = '''
import time
import pika

LEFT = []

def test_1_leaves_a_connection_open(broker, vhost):
    LEFT.append(pika.BlockingConnection(vhost.parameters(client_properties={"connection_name": "left-behind"})))
    deadline = time.monotonic() + 30
    while not broker.management.connections(vhost.name):  # the API learns of it within a few seconds
        assert time.monotonic() < deadline
        time.sleep(0.2)

def test_2_finds_nothing_of_it(broker, vhost):
    names = [(c.get("client_properties") or {}).get("connection_name") for c in broker.management.connections()]
    assert "left-behind" not in names
    assert len(broker.management.vhosts()) == 2  # "/" and this test's: the first test's vhost was deleted
'''


def test_connections_left_in_the_vhost_are_warned_of_and_closed(inner):
    done = inner(LEAVES_A_CONNECTION).run("--rabbitmq-provider", "local")
    out = done.stdout + done.stderr
    assert re.search(r"\b2 passed, 1 warning in", out), out
    assert re.search(r"test_inner\.py::test_1_leaves_a_connection_open\n.*LeftConnectionsWarning: qp-harness: 1 "
                     r"connection\(s\) still open in this test's vhost qp-main-\w+ at teardown \(a stage or client "
                     r"that did not exit\?\), closed: 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ \(user qp-\w+, "
                     r"'left-behind'\)", out), out
