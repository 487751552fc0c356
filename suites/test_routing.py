"""RT-*: message types per queue, tenant routing, routability, broadcast."""
import pytest

from harness.scenario_plugin import assert_clauses, assert_scenario

HERE = "suites/clause_scenarios"


@pytest.mark.clauses("RT-ONE-TYPE", "RT-TENANT", "RT-ROUTABLE")
def test_two_tenants_stay_apart(scenario_runner):
    run = scenario_runner(f"{HERE}/tenants.yaml")
    assert_clauses(run)
    # No command is sent in this scenario: RT-BROADCAST may not be exercised, but must not fail.
    assert not run.result("RT-BROADCAST").failed


@pytest.mark.clauses("CF-ALIGN", "RT-ROUTABLE")
def test_misrouted_conversions_are_caught(scenario_runner):
    run = scenario_runner(f"{HERE}/misrouted.yaml")
    assert_scenario(run)


@pytest.mark.clauses("RT-BROADCAST", "RT-ONE-TYPE", "DL-EXACTLY-ONCE")
def test_abort_command_travels_on_the_broadcast_exchange(scenario_runner):
    run = scenario_runner(f"{HERE}/broadcast.yaml")
    assert_clauses(run)
