"""The stage launcher: config and environment, early exits, stop_all, faults, a missing command."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from harness.observer import Observer
from harness.scenario import Restart, Stage
from harness.stages import DEFAULT_COMMAND, StageExited, StageLauncher, StageStartError
from waiting import wait_until

FAKE_STAGE = [sys.executable, str(Path(__file__).parent / "helpers" / "fake_stage.py"), "{stage}"]




def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_config_file_and_environment(make_launcher, tmp_path, broker, vhost, history):
    dump = tmp_path / "dump.json"
    launcher = make_launcher(command=" ".join(FAKE_STAGE), env={"LOG_LEVEL": "DEBUG", "SHARED": "engine"})
    [proc] = launcher.start(Stage(name="w", kind="worker", queue_priority=["qa", "qb", "qa"],
                                  env={"FAKE_DUMP": str(dump), "SHARED": "stage"}))
    assert wait_until(lambda: dump.exists() and dump.stat().st_size, 10), proc.tail()
    seen = json.loads(wait_until(lambda: dump.read_text() if dump.read_text().endswith("}") else "", 5))
    assert seen["argv"][1:] == ["worker"]
    password = seen["config"]["amqp"].pop("AMQP_PWD")
    assert password and password != broker.password  # the instance's own user, made for this vhost
    assert seen["config"] == {"amqp": {"AMQP_HOST": broker.host, "AMQP_PORT": broker.amqp_port,
                                       "AMQP_USER": f"{vhost.name}.w", "AMQP_VHOST": vhost.name}}
    env = seen["env"]
    assert env["OS2DS_ENGINE_USER_CONFIG_PATH"] == str(tmp_path / "stages" / "w.toml")
    assert tomllib.loads((tmp_path / "stages" / "w.toml").read_text())["amqp"]["AMQP_PWD"] == password
    assert env["QUEUE_PRIORITY"] == "qa qb qa"  # as written: the engine must drop duplicates itself
    assert env["LOG_LEVEL"] == "DEBUG" and env["SHARED"] == "stage"  # stage env wins over engine env
    assert wait_until(lambda: "consuming qa qb" in proc.tail(), 10)
    [started] = [e for e in history.events if e["type"] == "stage_started"]
    assert started["queue_priority"] == ["qa", "qb"] and started["kind"] == "worker" and started["role"] == "w"
    assert os.getpgid(proc.pid) == proc.pid  # a process group of its own


def test_no_queue_priority_means_unset(make_launcher, tmp_path, monkeypatch):
    monkeypatch.setenv("QUEUE_PRIORITY", "leaked from the harness")
    monkeypatch.setenv("amqp__AMQP_VHOST", "leaked")
    dump = tmp_path / "dump.json"
    launcher = make_launcher()
    launcher.start(Stage(name="e", kind="explorer", env={"FAKE_DUMP": str(dump), "FAKE_DEFAULT_QUEUE": "os2ds_scan_specs"}))
    assert wait_until(lambda: dump.exists() and dump.read_text().endswith("}"), 10)
    env = json.loads(dump.read_text())["env"]
    assert "QUEUE_PRIORITY" not in env and "amqp__AMQP_VHOST" not in env


def test_placeholders_carry_the_instance_its_config_and_its_own_variables(make_launcher, tmp_path):
    """{instance}, {config}, {config_toml} and {env_file}: what a command needs to run a stage elsewhere."""
    dump = tmp_path / "dump.json"
    template = " ".join(FAKE_STAGE) + " {instance} {config} {env_file} {config_toml}"
    launcher = make_launcher(command=template, env={"LOG_LEVEL": "DEBUG"})
    launcher.start(Stage(name="w", kind="worker", replicas=2, queue_priority=["qa"], conversion_priority=["delta"],
                         env={"FAKE_DUMP": str(dump)}))
    assert wait_until(lambda: dump.exists() and dump.read_text().endswith("}"), 10)
    argv = json.loads(dump.read_text())["argv"]
    instance, config, env_file, config_toml = argv[2:6]
    assert argv[1] == "worker" and instance in ("w", "w#2")
    assert Path(config) == tmp_path / "stages" / f"{instance}.toml"
    assert tomllib.loads(config_toml) == tomllib.loads(Path(config).read_text())
    lines = Path(env_file).read_text().splitlines()
    assert "QUEUE_PRIORITY=qa" in lines and "CONVERSION_PRIORITY=delta" in lines and "LOG_LEVEL=DEBUG" in lines
    assert f"OS2DS_ENGINE_USER_CONFIG_PATH={config}" in lines and f"FAKE_DUMP={dump}" in lines
    assert not [line for line in lines if line.startswith(("PATH=", "HOME="))]  # never the harness's environment


def test_replicas_get_instance_names(make_launcher, history):
    launcher = make_launcher()
    procs = launcher.start(Stage(name="w", kind="worker", replicas=3, queue_priority=["q"]))
    assert [p.name for p in procs] == ["w", "w#2", "w#3"]
    assert len({p.pid for p in procs}) == 3
    assert all(p.log_path.name == f"{p.name}.log" for p in procs)
    assert wait_until(lambda: all("consuming q" in p.tail() for p in procs), 15)


def test_a_stage_that_exits_at_once_is_reported(make_launcher, history):
    launcher = make_launcher()
    [proc] = launcher.start(Stage(name="crash", kind="worker", env={"FAKE_EXIT": "3", "FAKE_LINES": "50"}))
    exits = wait_until(launcher.poll, 10)
    assert [(e.name, e.returncode) for e in exits] == [("crash", 3)]
    message = str(StageExited.from_exits(exits))
    assert "crash" in message and "exit code 3" in message and f"pid {proc.pid}" in message
    assert "fake worker line 50" in message and "fake worker line 11\n" in message
    assert "fake worker line 10\n" not in message  # only the last 40 lines
    assert launcher.poll() == []  # reported once
    [exited] = [e for e in history.events if e["type"] == "stage_exited"]
    assert exited["stage"] == "crash" and exited["returncode"] == 3 and exited["expected"] is False


def test_a_supervised_stage_is_restarted_with_backoff_up_to_its_limit(make_launcher, history):
    launcher = make_launcher()
    restart = Restart(policy="on-failure", limit=2, backoff=0.3)
    [proc] = launcher.start(Stage(name="crash", kind="worker", env={"FAKE_EXIT": "5", "FAKE_LINES": "3"},
                                  restart=restart))
    exits = wait_until(launcher.poll, 20)  # two restarts pass silently: only the third exit is an error
    assert [(e.name, e.returncode, e.supervisor, e.restarts) for e in exits] == [("crash", 5, "gave_up", 2)]
    assert "after 2 supervisor restarts" in str(StageExited.from_exits(exits))
    starts = [e for e in history.events if e["type"] == "stage_started"]
    assert [e["supervisor_restart"] for e in starts] == [0, 1, 2]
    ended = [e for e in history.events if e["type"] == "stage_exited"]
    assert [e["supervisor"] for e in ended] == ["restarting", "restarting", "gave_up"]
    # the backoff doubles: 0.3 s, then 0.6 s
    assert starts[1]["t"] - ended[0]["t"] >= 0.3 and starts[2]["t"] - ended[1]["t"] >= 0.6
    assert "supervisor restart 2" in proc.tail(60)


def test_the_run_default_applies_where_a_stage_sets_no_policy(make_launcher, history):
    launcher = make_launcher(restart=Restart(policy="on-failure", limit=1, backoff=0))
    launcher.start(Stage(name="own", kind="worker", env={"FAKE_EXIT": "5"}, restart=Restart(policy="no")))
    launcher.start(Stage(name="default", kind="worker", env={"FAKE_EXIT": "5"}))
    launcher.start(Stage(name="clean", kind="worker", env={"FAKE_EXIT": "0"}))  # on-failure: exit 0 is final
    seen = []
    assert wait_until(lambda: seen.extend(launcher.poll()) or len(seen) == 3, 20), seen
    assert sorted((e.name, e.supervisor) for e in seen) == [("clean", None), ("default", "gave_up"), ("own", None)]


def test_an_exit_the_harness_caused_is_not_restarted(make_launcher, history):
    launcher = make_launcher(restart=Restart(policy="always", limit=5, backoff=0))
    [proc] = launcher.start(Stage(name="w", kind="worker", queue_priority=["q"]))
    assert wait_until(lambda: "consuming q" in proc.tail(), 15)
    launcher.kill("w", signal.SIGKILL)
    assert wait_until(lambda: gone(proc.pid), 5)
    time.sleep(0.2)
    assert launcher.poll() == [] and launcher.running() == []
    assert [e["supervisor"] for e in history.events if e["type"] == "stage_exited"] == [None]


def test_stop_all_cancels_a_pending_restart(make_launcher, history):
    launcher = make_launcher(restart=Restart(policy="on-failure", limit=3, backoff=0.5))
    [proc] = launcher.start(Stage(name="crash", kind="worker", env={"FAKE_EXIT": "5"}))
    assert wait_until(lambda: proc.popen.poll() is not None, 10)
    assert launcher.poll() == [] and launcher.restart_pending  # restart scheduled
    launcher.stop_all(grace=1)
    assert not launcher.restart_pending
    time.sleep(0.7)
    assert launcher.poll() == [] and launcher.running() == []
    assert len([e for e in history.events if e["type"] == "stage_started"]) == 1


def test_stop_all_leaves_no_process(make_launcher, history):
    launcher = make_launcher()
    procs = launcher.start(Stage(name="polite", kind="worker", replicas=2, queue_priority=["q"]))
    procs += launcher.start(Stage(name="stubborn", kind="worker", queue_priority=["q"], env={"FAKE_IGNORE_TERM": "1"}))
    procs += launcher.start(Stage(name="wrapper", kind="worker", queue_priority=["q"], env={"FAKE_CHILD": "1"}))
    assert wait_until(lambda: all("consuming q" in p.tail() for p in procs), 20), [p.tail() for p in procs]
    child = psutil.Process(procs[-1].pid).children()[0].pid
    started = time.monotonic()
    exits = launcher.stop_all(grace=1.5)
    took = time.monotonic() - started
    assert sorted(e.name for e in exits) == ["polite", "polite#2", "stubborn", "wrapper"]
    codes = {e.name: e.returncode for e in exits}
    assert codes["polite"] == 0 and codes["stubborn"] == -signal.SIGKILL
    assert all(gone(p.pid) and group_gone(p.pid) for p in procs)
    assert gone(child)
    assert 1.4 < took < 8
    assert all(e["expected"] for e in history.events if e["type"] == "stage_exited")
    assert launcher.poll() == [] and launcher.stop_all() == []  # idempotent, never raises


def test_kill_and_restart(make_launcher, broker, vhost, history):
    observer = Observer(broker, vhost.name, history, [])
    observer.start()
    try:
        launcher = make_launcher(observer=observer)
        [first] = launcher.start(Stage(name="w", kind="worker", queue_priority=["q"]))
        assert observer.wait_for_consumers("w", {"q"}, 20)
        old_pid = first.pid
        launcher.kill("w", signal.SIGKILL)
        assert wait_until(lambda: gone(old_pid), 5)
        assert observer.wait_for(lambda: not observer.consumers_of("w"), 10)
        assert launcher.poll() == []  # an exit the harness caused is not an error
        [proc] = launcher.restart("w")
        assert proc.pid != old_pid
        assert observer.wait_for_consumers("w", {"q"}, 20)
        conns = [e for e in history.events if e["type"] == "connection_created"]
        assert [c["stage"] for c in conns] == ["w", "w"]
        assert "restarting w" in proc.tail()
    finally:
        observer.stop()


def test_a_missing_engine_command_is_a_clear_error(make_launcher):
    launcher = make_launcher(command="/nonexistent/engine-bin {stage}")
    with pytest.raises(StageStartError) as info:
        launcher.start(Stage(name="w", kind="worker"))
    message = str(info.value)
    assert "'/nonexistent/engine-bin' not found" in message and "/nonexistent/engine-bin worker" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "Traceback" not in message


def test_a_wrapper_whose_engine_is_missing_exits_with_its_output(make_launcher):
    launcher = make_launcher(command=["sh", "-c", "exec /nonexistent/engine {stage}"])
    launcher.start(Stage(name="w", kind="worker"))
    [exit_] = wait_until(launcher.poll, 10)
    assert exit_.returncode == 127 and "/nonexistent/engine" in exit_.tail


def test_default_command_is_the_reference_engine():
    assert DEFAULT_COMMAND[1:] == ["-m", "reference_engine.run_stage", "{stage}"]


@pytest.mark.parametrize("kind, first, prefetch", [("worker", "cd", 2), ("explorer", "ed", 1)])
def test_the_reference_engine_runs_under_the_default_command(make_launcher, broker, vhost, history, kind, first, prefetch):
    observer = Observer(broker, vhost.name, history, [first, "lower"])
    observer.start()
    try:
        launcher = make_launcher(command=None, observer=observer)
        [proc] = launcher.start(Stage(name="ref", kind=kind, queue_priority=[first, "lower"]))
        held = observer.wait_for_consumers("ref", {first}, timeout=30)
        assert first in held, f"{held}\n{proc.tail()}\n{launcher.poll()}"
        created = [e for e in history.events if e["type"] == "consumer_created" and e["stage"] == "ref"]
        assert {e["prefetch"] for e in created if e["queue"] == first} == {prefetch}
        assert observer.wait_for(lambda: observer.ready("lower") == 0, timeout=10)  # it declared its queues
        [exit_] = launcher.stop_all(grace=10)
        assert exit_.returncode == 0, exit_.tail
        assert observer.wait_for(lambda: not observer.consumers_of("ref"), timeout=10)
    finally:
        observer.stop()


def test_log_tails_lose_terminal_colour_codes(tmp_path):
    from harness.stages import read_tail
    log = tmp_path / "worker.log"
    log.write_bytes(b"\x1b[32mINFO\x1b[0m started\n\x1b]0;title\x07\x1b[1;31mERROR\x1b[0m boom\n")
    assert read_tail(log) == "INFO started\nERROR boom"


def test_conversion_priority_is_set_from_the_stage_and_never_inherited(tmp_path, monkeypatch):
    # Broker-free: the environment a stage is started with (OS2datascanner 3.32's per-scan tags).
    monkeypatch.setenv("CONVERSION_PRIORITY", "from the harness's own shell")
    launcher = StageLauncher(None, {}, None, "v", tmp_path, None)
    tagged = launcher.environment(Stage(name="w", kind="worker", conversion_priority="delta full"), tmp_path / "w.toml")
    assert tagged["CONVERSION_PRIORITY"] == "delta full"
    plain = launcher.environment(Stage(name="w", kind="worker"), tmp_path / "w.toml")
    assert "CONVERSION_PRIORITY" not in plain
