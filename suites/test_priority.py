"""QP-*: priority consumption, judged per stage from consumers and queue depths."""
import pytest

from harness.scenario_plugin import assert_clauses

HERE = "suites/clause_scenarios"


@pytest.mark.clauses("QP-DRAIN-ORDER", "QP-ONE-LOWER", "QP-PRECEDENCE", "QP-PROGRESS", "QP-FIRST-PINNED")
def test_backlog_drains_in_priority_order(scenario_runner):
    run = scenario_runner(f"{HERE}/drain.yaml")
    assert_clauses(run)


@pytest.mark.clauses("QP-CANCEL-WINDOW", "QP-PRECEDENCE", "QP-ONE-LOWER", "QP-FIRST-PINNED")
def test_burst_into_higher_queue_cancels_lower_consumer(scenario_runner):
    run = scenario_runner(f"{HERE}/burst.yaml")
    assert_clauses(run)


@pytest.mark.clauses("QP-PROGRESS", "QP-ONE-LOWER", "QP-PRECEDENCE")
def test_stage_moves_down_when_lower_queue_empties(scenario_runner):
    run = scenario_runner(f"{HERE}/stuck.yaml")
    assert_clauses(run)


@pytest.mark.clauses("QP-DECLARE")
def test_stages_declare_their_queues(scenario_runner):
    run = scenario_runner(f"{HERE}/tenants.yaml")
    assert_clauses(run)
