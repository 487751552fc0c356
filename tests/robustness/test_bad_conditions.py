"""The harness under bad conditions (issue 7): each case in a child pytest, real processes throughout.

Every test checks the child's exit code and output (a readable failure, no
Python traceback) and that no process the child started (broker, epmd,
watchdog, stages, the child itself) is left 15 s after it ended.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from robust_support import assert_no_traceback, engine
from harness.broker import find_rabbitmq_bin

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")


def slow_worker(time_limit: int, objects: int, **more: str) -> dict[str, str]:
    """Substitutions for one_worker.yaml: a worker taking 0.05 s a message, more work, another time limit."""
    return {"queue_priority: robust_conversions": "queue_priority: robust_conversions\n"
                                                  '    env: {REFERENCE_WORK_SECONDS: "0.05"}',
            "time_limit: 12": f"time_limit: {time_limit}", "objects: 40}": f"objects: {objects}}}", **more}


def test_engine_command_that_does_not_exist(child):
    scenario = child.add("one_worker")
    done = child.run("--engine-cmd", "/nonexistent/qp-no-such-engine {stage}", "--startup-grace", "3", scenario)
    out = done.output
    assert done.returncode == 1, out
    assert "engine command '/nonexistent/qp-no-such-engine' not found" in out, out
    assert "check --engine-cmd / engine_cmd" in out, out
    assert "(the run ended by error)" in out, out
    assert_no_traceback(out)
    assert child.stage_events() == []  # nothing was started
    assert child.records(), "the child never reached the test"
    child.assert_nothing_left()


def test_engine_that_exits_at_once(child):
    scenario = child.add("one_worker")
    done = child.run("--engine-cmd", engine("exit_at_once"), "--startup-grace", "3", scenario)
    out = done.output
    assert done.returncode == 1, out
    found = re.search(r"stage (explorer|worker) \(pid (\d+)\) exited early with exit code 3; "
                      r"last 40 lines of \S+/stages/\1\.log:\n", out)
    assert found, out
    stage = found.group(1)
    # Its last lines, not its first ones, and its final word.
    assert f"exit_at_once {stage}: start-up line 60\nexit_at_once {stage}: FATAL cannot read configuration" in out
    assert f"exit_at_once {stage}: start-up line 10\n" not in out
    assert "(the run ended by stage_exited)" in out, out
    assert_no_traceback(out)
    assert int(found.group(2)) in [e["pid"] for e in child.stage_events()]
    child.assert_nothing_left()


def test_stage_that_never_connects_fails_at_G_with_its_log_tail(child):
    scenario = child.add("one_worker")
    done = child.run("--engine-cmd", engine("never_connects"), "--startup-grace", "3", scenario)
    out = done.output
    assert done.returncode == 1, out
    assert "stage(s) explorer, worker did not start consuming within G = 3 s" in out, out
    assert re.search(r"--- worker \(pid \d+\), last lines of \S+worker\.log ---\n"
                     r"never_connects worker: starting up\nnever_connects worker: waiting for the licence server",
                     out), out
    assert "(the run ended by stage_silent)" in out, out
    assert_no_traceback(out)
    # Ended at G, not at the scenario's time limit: the stage_exited events come a few seconds in.
    history = child.histories()[0]
    started = next(e["t"] for e in history if e["type"] == "run_started")
    ended = next(e["t"] for e in history if e["type"] == "run_finished")
    assert ended - started < 3 + 10, f"run took {ended - started:.1f} s"
    child.assert_nothing_left()


def test_a_hanging_stage_is_named_whether_the_run_stalls_or_reaches_its_time_limit(child):
    """hangs.py consumes, takes one message and never returns from its callback (and ignores SIGTERM).

    With a short time limit the run ends there; with a long one it ends once nothing is left to publish
    and nothing new is delivered or answered for STALL_WINDOWS x W (at least STALL_MIN_SECONDS): stalled.
    Either way the silent worker is named and killed. One child pytest runs both (one broker start)."""
    limited = child.add("one_worker", as_name="a_limited", **{"time_limit: 12": "time_limit: 8"})
    stalls = child.add("one_worker", as_name="b_stalls", **{"time_limit: 12": "time_limit: 300"})
    done = child.run("--engine-cmd", engine("hangs"), "--startup-grace", "3", "--check-period", "1", limited, stalls)
    out = done.output
    assert done.returncode == 1, out
    # The explorer has no work (nothing is sent to it), so only the worker is silent.
    assert "time limit 8 s reached; stage(s) with no delivery in the last 2 s: worker\n" in out, out
    assert "(the run ended by time_limit)" in out, out
    assert re.search(r"the run stalled \(\d+ objects owed\); stage\(s\) with no delivery in the last 2 s: worker\n",
                     out), out
    assert "(the run ended by stalled)" in out, out
    assert_no_traceback(out)
    runs = {e["scenario"]: e["t"] for e in child.stage_events("run_started")}
    ends = [e["t"] for e in child.stage_events("run_finished")]
    assert max(ends) - runs["b_stalls"] < 120, "the stalled run waited for its time limit"
    exits = [e for e in child.stage_events("stage_exited") if e["stage"] == "worker"]
    assert [(e["returncode"], e["expected"]) for e in exits] == [(-signal.SIGKILL, True)] * 2, exits
    child.assert_nothing_left()


def test_broker_that_dies_mid_test(child):
    """The child SIGKILLs its local broker 4 s into the first of two scenarios (child_conftest.py).

    The first scenario fails and is named as the one the broker died in; the broker is revived
    for the second, which runs and passes (issue 11: no test can break the tests after it)."""
    first = child.add("one_worker", as_name="a_first", **slow_worker(time_limit=60, objects=400))
    second = child.add("one_worker", as_name="b_second")
    done = child.run(first, second, "--startup-grace", "10", QP_KILL_BROKER_AFTER="4")
    out = done.output
    assert any(r.get("event") == "broker_killed" for r in child.records()), out
    assert done.returncode == 1, out
    assert re.search(r"the run itself failed: broker gone: the local rabbitmq-server \(process group \d+\) "
                     r"is no longer running; the run was ended\n", out), out
    assert "(the run ended by broker_gone)" in out, out
    # The test the broker died in is blamed at its teardown; the next one gets a revived broker.
    assert re.search(r"ERROR at teardown of scenario a_first _*\nqp-harness: the session's local broker "
                     r"\(127\.0\.0\.1:\d+\) stopped answering during test a_first\.yaml::a_first: its rabbitmq-server "
                     r"\(process group \d+\) is no longer running\. It was restarted", out), out
    assert "ERROR at setup" not in out, out
    assert "b_second.yaml::b_second: " in out and "1 failed, 1 passed, 1 error" in out, out
    assert_no_traceback(out)
    assert done.seconds < 60, f"the child took {done.seconds:.0f} s; the first scenario's time limit was 60 s"
    records = [r for r in child.records() if r.get("event") == "test"]
    assert records[1]["groups"][0] != records[0]["groups"][0], "the second scenario ran on a new broker node"
    child.assert_nothing_left()


def test_broker_that_dies_after_a_planned_restart(child):
    """A restart_broker fault takes the broker down on purpose; a real death after it is still caught."""
    slow = slow_worker(time_limit=120, objects=1000,
                       **{"checks:": "faults:\n  - {kind: restart_broker, at: 1, params: {seconds: 1}}\nchecks:"})
    scenario = child.add("one_worker", as_name="restarted", **slow)
    done = child.run(scenario, "--startup-grace", "10", QP_KILL_BROKER_AFTER="25")
    out = done.output
    assert any(r.get("event") == "broker_killed" for r in child.records()), out
    assert done.returncode == 1, out
    assert "(the run ended by broker_gone)" in out, out
    assert_no_traceback(out)
    assert done.seconds < 60, f"the child took {done.seconds:.0f} s; the time limit was 120 s"
    child.assert_nothing_left()


def test_fault_due_while_the_broker_is_down(child):
    """A poison fault falls in a restart_broker outage: the run ends with a sentence, not a pika traceback."""
    faults = ("faults:\n  - {kind: restart_broker, at: 1, params: {seconds: 4}}\n"
              "  - {kind: poison, target: robust_conversions, at: 2}\nchecks:")
    scenario = child.add("one_worker", as_name="poisoned_while_down",
                         **{"time_limit: 12": "time_limit: 60", "objects: 40}": "objects: 400}", "checks:": faults})
    done = child.run(scenario, "--startup-grace", "10")
    out = done.output
    assert done.returncode == 1, out
    assert re.search(r"a fault of the scenario could not be applied: faults\.1 \(poison\): the broker refused or "
                     r"did not answer", out), out
    assert "(the run ended by error)" in out, out
    assert_no_traceback(out)
    child.assert_nothing_left()


def test_ctrl_c_during_a_flood(child):
    scenario = child.add("flood")
    proc = child.start(scenario, "--startup-grace", "10")
    deadline = time.monotonic() + 90
    # Wait until the flood is under way: the workload phase has begun and the worker is getting messages.
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the child's flood never got going"
        histories = child.histories()
        events = histories[0] if histories else []
        if any(e.get("name") == "workload.0" for e in events) and sum(e["type"] == "deliver" for e in events) > 50:
            break
        time.sleep(0.3)
    pids = child.pids()
    assert pids["broker"] and pids["watchdog"] and len(pids["stage"]) == 2, pids
    os.kill(proc.pid, signal.SIGINT)
    signalled = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=30)
    except Exception:
        pytest.fail(f"the child did not exit within 30 s of Ctrl-C; known pids {pids}")
    took = time.monotonic() - signalled
    assert proc.returncode == 2, out  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out, out
    left_after = child.assert_nothing_left()
    print(f"Ctrl-C: child exited {took:.1f} s after SIGINT; broker, epmd, watchdog and stages gone "
          f"{left_after:.1f} s later")


def test_external_broker_that_dies_mid_test(child, tmp_path):
    """Without a process group to watch, the observer's lost connections tell: broker gone after 5 s."""
    from harness.broker import LocalBroker

    local = LocalBroker(tmp_path / "external-rabbitmq")
    broker = local.start()
    try:
        slow = slow_worker(time_limit=60, objects=400)
        first = child.add("one_worker", as_name="a_first", **slow)
        second = child.add("one_worker", as_name="b_second", **slow)
        proc = child.start(first, second, "--rabbitmq-provider", "external", "--rabbitmq-url", broker.amqp_url(),
                           "--rabbitmq-management-url", broker.management_url, "--startup-grace", "10")
        deadline = time.monotonic() + 60
        while True:  # until the worker is busy
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the child's scenario never got going"
            histories = child.histories()
            if histories and sum(e["type"] == "deliver" for e in histories[0]) > 20:
                break
            time.sleep(0.3)
        local.stop()  # SIGKILL of the external broker's process groups
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        local.stop()
    assert proc.returncode == 1, out
    assert re.search(r"the run itself failed: broker gone: the observer's \w+ connection to 127\.0\.0\.1:\d+ was "
                     r"lost \d+ s ago and every reconnect since failed \(.+\); the run was ended\n", out), out
    assert "(the run ended by broker_gone)" in out, out
    # Not ours to restart: the test it died in is blamed at teardown, the next one at setup names that test.
    assert re.search(r"ERROR at teardown of scenario a_first _*\nqp-harness: the session's external broker "
                     r"\(127\.0\.0\.1:\d+\) stopped answering during test a_first\.yaml::a_first: .+\. It is not "
                     r"the harness's to restart", out), out
    assert re.search(r"ERROR at setup of scenario b_second _*\nqp-harness: the session's external broker "
                     r"\(127\.0\.0\.1:\d+\) stopped answering after test a_first\.yaml::a_first ", out), out
    assert "1 failed, 2 errors" in out, out
    assert_no_traceback(out)
    assert took < 40, f"the child took {took:.0f} s after the broker died; the time limit was 60 s"
    child.assert_nothing_left()
