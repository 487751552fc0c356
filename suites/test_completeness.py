"""DL-EXACTLY-ONCE: every object of every scan gets exactly one result."""
import pytest

from harness.scenario_plugin import assert_clauses

HERE = "suites/clause_scenarios"


@pytest.mark.clauses("DL-EXACTLY-ONCE")
def test_every_object_has_exactly_one_result(scenario_runner):
    run = scenario_runner(f"{HERE}/tenants.yaml")
    assert_clauses(run)
