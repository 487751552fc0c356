"""Stage supervision end to end: the reference engine's no_reconnect and crash_on_poison faults
under a restart policy (stages[].restart), on a real broker with real stage processes."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenario import Restart, load_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "suites" / "clause_scenarios"
ON_FAILURE = Restart(policy="on-failure", limit=3, backoff=0.2)


def with_restart(name: str, restart: Restart | None):
    scenario = load_scenario(SCENARIOS / f"{name}.yaml")
    return scenario.model_copy(update={"stages": [s.model_copy(update={"restart": restart})
                                                  for s in scenario.stages]})


def supervisor_restarts(run) -> list[dict]:
    return [e for e in run.history.of("stage_started") if e.get("supervisor_restart")]


@pytest.mark.clauses("FT-RECONNECT")
def test_a_stage_that_exits_on_a_closed_connection_fails_ft_reconnect_without_a_policy(scenario_runner):
    run = scenario_runner(with_restart("reconnect", None), engine_env={"REFERENCE_ENGINE_FAULTS": "no_reconnect"})
    assert run.reason == "stage_exited"
    result = run.result("FT-RECONNECT")
    assert result.outcome == "failed"
    assert "no restart policy restarted it" in result.findings[0].explanation
    assert supervisor_restarts(run) == []


@pytest.mark.clauses("FT-RECONNECT", "DL-EXACTLY-ONCE")
def test_a_restart_policy_turns_the_exit_into_a_reconnect(scenario_runner):
    run = scenario_runner(with_restart("reconnect", ON_FAILURE),
                          engine_env={"REFERENCE_ENGINE_FAULTS": "no_reconnect"})
    assert run.reason == "complete" and run.problems == [], run.problems
    for clause in ("FT-RECONNECT", "DL-EXACTLY-ONCE"):  # the scenario allows duplicates
        assert run.result(clause).outcome == "passed", run.result(clause).findings
    assert "answered by a supervisor restart" in run.result("FT-RECONNECT").exercised
    [restart] = supervisor_restarts(run)
    assert restart["stage"] == "worker" and restart["supervisor_restart"] == 1
    [exited] = [e for e in run.history.of("stage_exited") if e.get("supervisor")]
    assert exited["returncode"] == 5 and exited["supervisor"] == "restarting"


@pytest.mark.clauses("FT-POISON")
def test_a_crash_loop_on_poison_fails_ft_poison_under_a_restart_policy(scenario_runner):
    run = scenario_runner(with_restart("poison", ON_FAILURE),
                          engine_env={"REFERENCE_ENGINE_FAULTS": "crash_on_poison"})
    assert run.reason == "stage_exited"  # the poison comes back to each restarted instance, past the limit
    assert "after 3 supervisor restarts" in "\n".join(run.problems)
    result = run.result("FT-POISON")
    assert result.outcome == "failed"
    assert any("its restart policy restarted it" in f.explanation for f in result.findings), result.findings
    assert len(supervisor_restarts(run)) == 3
