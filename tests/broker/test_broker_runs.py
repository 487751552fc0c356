"""Whole pytest runs in a subprocess: external provider, xdist workers, cleanup on SIGKILL and Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from broker_support import alive, kill_pids
from harness.broker import find_rabbitmq_bin

needs_local = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")

RECORD = '''
import json, os
from pathlib import Path
from harness.watchdog import group_members, watchdog_pid

def record(broker, vhost, **extra):
    members = [p.pid for g in broker.process_groups for p in group_members(g)]
    line = dict(worker=os.environ.get("PYTEST_XDIST_WORKER", "main"), pid=os.getpid(),
                node=broker.management.overview()["node"], amqp_port=broker.amqp_port,
                management_url=broker.management_url, provider=broker.provider, vhost=vhost.name,
                groups=broker.process_groups, members=members, watchdog=watchdog_pid(), **extra)
    with open(os.environ["QP_RECORD"], "a") as f:
        f.write(json.dumps(line) + "\\n")
'''


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_records(path, child, timeout: float) -> list[dict]:
    """The child's records, once it has written a whole line (it fails if the child ends first)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert child.poll() is None, child.stdout.read()
        assert time.monotonic() < deadline, f"the child run never got going within {timeout:g} s"
        time.sleep(0.2)
    return read_records(path)


def test_external_provider_against_a_broker_this_test_started(broker, inner, tmp_path):
    vhosts_before = sorted(broker.management.vhosts())
    run = inner(RECORD + '''
def test_one(broker, vhost, amqp_channel):
    assert broker.provider == "external"
    amqp_channel.queue_declare("ext", durable=True)
    assert broker.management.vhost(vhost.name)["tracing"] is True
    record(broker, vhost)

def test_two(broker, vhost):
    record(broker, vhost)
''')
    record = tmp_path / "record.jsonl"
    result = run.run("--rabbitmq-provider", "external", "--rabbitmq-url", broker.amqp_url(),
                     "--rabbitmq-management-url", broker.management_url, QP_RECORD=str(record))
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_records(record)
    assert len(records) == 2 and {r["amqp_port"] for r in records} == {broker.amqp_port}
    assert all(r["groups"] == [] for r in records)  # nothing started, nothing to stop
    assert sorted(broker.management.vhosts()) == vhosts_before  # its vhosts are gone, ours untouched
    assert "external broker ready" in result.stdout


def test_external_provider_with_a_wrong_password_is_a_clear_error(broker, inner):
    url = broker.amqp_url().replace(broker.password, "wrong")
    result = inner("def test_one(broker):\n    pass\n").run(
        "--rabbitmq-url", url, "--rabbitmq-management-url", broker.management_url)
    assert result.returncode == 1
    assert "external broker" in result.stdout and "is not usable: AMQP does not answer" in result.stdout


@needs_local
def test_xdist_workers_get_brokers_of_their_own_without_clashes(inner, tmp_path):
    run = inner(RECORD + '''
import pytest

@pytest.mark.parametrize("n", range(6))
def test_many(n, broker, vhost, amqp_channel):
    amqp_channel.queue_declare("same-name-everywhere", durable=True)
    record(broker, vhost)
''')
    record = tmp_path / "record.jsonl"
    result = run.run("-n", "2", "--rabbitmq-provider", "local", QP_RECORD=str(record))
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_records(record)
    assert len(records) == 6
    by_worker = {}
    for r in records:
        by_worker.setdefault(r["worker"], set()).add((r["node"], r["amqp_port"], r["management_url"]))
    assert set(by_worker) == {"gw0", "gw1"}
    assert all(len(brokers) == 1 for brokers in by_worker.values())  # one broker per worker
    (a,), (b,) = by_worker.values()
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]  # node names and ports differ
    assert len({r["vhost"] for r in records}) == 6
    time.sleep(0.5)
    assert alive({pid for r in records for pid in r["members"] + [r["watchdog"]]}) == []


@needs_local
@pytest.mark.parametrize("how, xdist", [("SIGKILL", False), ("SIGINT", False), ("SIGKILL", True)],
                         ids=["SIGKILL", "SIGINT", "SIGKILL-xdist-controller"])
def test_nothing_is_left_when_pytest_dies(how, xdist, inner, tmp_path):
    """SIGKILL: the watchdog stops broker and stage within 15 s. SIGINT (Ctrl-C): pytest's own teardown.

    With xdist, killing the controller must stop the workers' brokers and stages too.
    """
    run = inner(RECORD + '''
import subprocess, time
from harness.watchdog import register_process_group

def test_hangs(broker, vhost):
    stage = subprocess.Popen(["sleep", "600"], start_new_session=True)  # a stand-in for an engine stage
    register_process_group(stage.pid)
    record(broker, vhost, stage=stage.pid)
    time.sleep(600)
''')
    record = tmp_path / "record.jsonl"
    child = run.popen("--rabbitmq-provider", "local", *(["-n", "1"] if xdist else []), QP_RECORD=str(record))
    pids = []
    try:
        (r,) = wait_for_records(record, child, timeout=90)
        pids = r["members"] + [r["stage"], r["watchdog"]] + ([r["pid"]] if xdist else [])
        assert alive(pids) == pids and len(r["members"]) >= 2
        killed_at = time.monotonic()
        os.kill(child.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
        while alive(pids) and time.monotonic() - killed_at < 15:
            time.sleep(0.2)
        took = time.monotonic() - killed_at
        left = alive(pids)
        assert left == [], f"still running {took:.1f} s after {how}: {left}"
        print(f"{how}{' (xdist controller)' if xdist else ''}: broker, epmd, stage, watchdog{', worker' if xdist else ''} gone {took:.2f} s after the signal")
        child.wait(30)
        if how == "SIGINT":
            assert child.returncode == 2  # pytest's "interrupted"
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        kill_pids(pids)


def test_vhosts_of_a_killed_session_on_an_external_broker_are_removed_by_the_next(broker, inner, tmp_path):
    """SIGKILL leaves an external broker's per-test vhost behind; the next session on this host removes it."""
    external = ("--rabbitmq-provider", "external", "--rabbitmq-url", broker.amqp_url(),
                "--rabbitmq-management-url", broker.management_url)
    record = tmp_path / "record.jsonl"
    hanging = inner(RECORD + '''
import time

def test_hangs(broker, vhost):
    record(broker, vhost)
    time.sleep(600)
''')
    child = hanging.popen(*external, QP_RECORD=str(record))
    try:
        (left,) = wait_for_records(record, child, timeout=60)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert left["vhost"] in broker.management.vhosts()  # nobody could delete it

    result = inner("def test_one(broker, vhost):\n    pass\n").run(*external)
    assert result.returncode == 0, result.stdout + result.stderr
    assert left["vhost"] not in broker.management.vhosts()
    assert f"removed 1 vhost(s) left on the broker by killed qp-harness sessions on this host: {left['vhost']}" \
        in result.stdout
