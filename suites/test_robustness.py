"""FT-*: the engine under faults injected by the harness (deleted queue, poison, dropped connection)."""
from pathlib import Path

import pytest

from harness.scenario import Restart, Scenario, load_scenario
from harness.scenario_plugin import assert_clauses

HERE = "suites/clause_scenarios"


def supervised(scenario: Scenario, restart: Restart = Restart(policy="on-failure")) -> Scenario:
    """The scenario with every stage under a restart policy, as Docker, systemd or Kubernetes run them."""
    return scenario.model_copy(update={"stages": [s.model_copy(update={"restart": restart}) for s in scenario.stages]})


@pytest.mark.clauses("FT-POISON", "DL-EXACTLY-ONCE", "QP-FIRST-PINNED")
def test_poison_messages_are_reported_and_removed(scenario_runner):
    run = scenario_runner(f"{HERE}/poison.yaml")
    assert_clauses(run)


@pytest.mark.clauses("FT-QUEUE-GONE", "QP-FIRST-PINNED", "DL-EXACTLY-ONCE")
def test_deleted_lower_queue_does_not_stop_the_stage(scenario_runner):
    run = scenario_runner(f"{HERE}/queue_gone.yaml")
    assert_clauses(run)


@pytest.mark.clauses("FT-RECONNECT", "DL-EXACTLY-ONCE")
@pytest.mark.parametrize("supervision", ["none", "on-failure"])
def test_stage_reconnects_after_broker_closes_its_connection(scenario_runner, supervision):
    # Without a restart policy the stage must reconnect by itself; under one (production's
    # restart: on-failure), exiting non-zero and being restarted also counts (SPEC.md FT-RECONNECT).
    scenario = load_scenario(Path(__file__).parent / "clause_scenarios" / "reconnect.yaml")
    run = scenario_runner(supervised(scenario) if supervision == "on-failure" else scenario)
    assert_clauses(run)


@pytest.mark.clauses("DL-EXACTLY-ONCE", "QP-FIRST-PINNED")
def test_stages_survive_a_broker_restart(scenario_runner, broker):
    if broker.restart is None:
        pytest.skip(f"restart_broker needs the local provider (this broker: {broker.provider})")
    run = scenario_runner(f"{HERE}/broker_restart.yaml")
    assert_clauses(run)
    assert any(e.get("name") == "broker_restarted" for e in run.history.of("phase")), "the broker was not restarted"
    # A killed node announces no closes: the observer records them, or the pre-restart consumers
    # would still count as open, and QP-FIRST-PINNED would pass on them alone.
    down = [e for e in run.history.of("connection_closed") if e.get("cause") == "broker_down"]
    assert {e["stage"].split("#")[0] for e in down} >= {"explorer", "worker"}, down
    assert any(e["stage"].startswith("worker") and e["queue"] == "conversions_first" and e["t"] > down[0]["t"]
               for e in run.history.of("consumer_created")), "the worker's return to its first queue was not seen"


@pytest.mark.clauses("DL-EXACTLY-ONCE", "QP-FIRST-PINNED")
def test_a_killed_and_a_paused_worker_lose_nothing(scenario_runner):
    run = scenario_runner(f"{HERE}/kill_and_pause.yaml")
    assert_clauses(run)
    kinds = [e["kind"] for e in run.history.of("fault")]
    assert "kill_stage" in kinds and "pause_stage" in kinds and "resume_stage" in kinds
    restarted = [e for e in run.history.of("stage_started") if e["stage"] == "worker#2"]
    assert len(restarted) == 2, "worker#2 was not started again after the kill"


@pytest.mark.clauses("FT-BAD-COMMAND", "RT-BROADCAST", "DL-EXACTLY-ONCE")
def test_malformed_broadcast_messages_do_not_stop_a_stage(scenario_runner):
    run = scenario_runner(f"{HERE}/bad_command.yaml")
    assert_clauses(run)
