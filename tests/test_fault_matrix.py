"""The fault matrix: every clause catches the faults it exists for, and a conformant engine passes.

For every fault switch of the reference engine (``REFERENCE_ENGINE_FAULTS``)
one scenario that puts it to the test is run through the real plugin (the
``scenario_runner`` fixture, on a real broker, with real stage processes),
and the set of failed clauses is compared with the fault's declaration in
``reference_engine/faults.py``: every clause it must break fails (else
MISSED), and no clause fails that is neither expected nor declared as a
possible side effect (else FALSE ALARM). The unfaulted engine runs every
scenario and must fail nothing. Configuration faults (CF-*) are mutations of
a scenario file, judged by the static lint.

Each run leaves ``reports/fault-matrix/<row>.json``; ``python
bench/fault_matrix_table.py`` turns them into the README's table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.checkers import CLAUSE_IDS, lint
from harness.scenario import load_scenario, parse_scenario
from reference_engine.faults import FAULTS

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "suites" / "clause_scenarios"
RESULTS = ROOT / "reports" / "fault-matrix"

# The scenario that puts each engine fault to the test (file stem under suites/clause_scenarios).
FAULT_SCENARIO = {
    "slow_check": "burst",
    "two_lower": "stuck",
    "cancel_first": "burst",
    "consume_all_at_start": "drain",
    "no_move_down": "stuck",
    "reverse_priority": "drain",
    "get_ahead": "drain",
    "no_declare": "tenants",
    "ignore_conversion_queue": "tenants",
    "status_into_conversions": "tenants",
    "command_via_queue": "broadcast",
    "typo_output_queue": "tenants",
    "ack_on_cancel": "burst",
    "dup_on_cancel": "burst",
    "dup_after_reconnect": "reconnect",
    "crash_on_poison": "poison",
    "requeue_poison": "poison",
    "die_on_queue_gone": "queue_gone",
    "no_reconnect": "reconnect",
}

# Configuration faults: a mutation of a clean scenario and the clauses that must catch it.
CONFIG_FAULTS = {
    "cfg_unread_client_queue": ("tenants", ["CF-ALIGN"]),
    "cfg_duplicate_priority": ("stuck", ["CF-NO-DUP"]),
    "cfg_queue_of_two_types": ("tenants", ["CF-ONE-TYPE"]),
}

CLEAN_SCENARIOS = sorted({*FAULT_SCENARIO.values(), *(s for s, _ in CONFIG_FAULTS.values())})


def record(row: str, scenario: str, expected, allowed, failed, problems=()) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{row}.json").write_text(json.dumps({
        "row": row, "scenario": scenario, "expected": sorted(expected), "allowed": sorted(allowed),
        "failed": sorted(failed), "problems": [p.splitlines()[0] for p in problems],
    }, indent=1))


def verdict_text(row: str, expected: set[str], allowed: set[str], failed: set[str]) -> str | None:
    missed = expected - failed
    false_alarms = failed - expected - allowed
    if not missed and not false_alarms:
        return None
    lines = [f"{row}: failed clauses {sorted(failed) or 'none'}"]
    if missed:
        lines.append(f"MISSED (the fault went unnoticed by): {', '.join(sorted(missed))}")
    if false_alarms:
        lines.append(f"FALSE ALARM (failed without reason): {', '.join(sorted(false_alarms))}")
    return "\n".join(lines)


def test_every_fault_has_a_scenario_and_every_clause_a_fault():
    assert set(FAULT_SCENARIO) == set(FAULTS), "each engine fault needs a scenario in FAULT_SCENARIO"
    tripped = {c for f in FAULTS.values() for c in f.clauses}
    tripped |= {c for _, clauses in CONFIG_FAULTS.values() for c in clauses}
    assert set(CLAUSE_IDS) <= tripped, f"clauses no fault can trip: {sorted(set(CLAUSE_IDS) - tripped)}"


@pytest.mark.parametrize("fault", sorted(FAULT_SCENARIO))
def test_fault_is_caught_by_exactly_its_clauses(scenario_runner, fault):
    declared = FAULTS[fault]
    scenario = FAULT_SCENARIO[fault]
    run = scenario_runner(SCENARIOS / f"{scenario}.yaml", engine_env={"REFERENCE_ENGINE_FAULTS": fault})
    expected, allowed = set(declared.clauses), set(declared.may_also)
    failed = run.failed_clauses
    record(fault, scenario, expected, allowed, failed, run.problems)
    problem = verdict_text(fault, expected, allowed, failed)
    assert problem is None, f"{problem}\nreport folder: {run.report_dir}"


@pytest.mark.parametrize("scenario", CLEAN_SCENARIOS)
def test_conformant_engine_fails_no_clause(scenario_runner, scenario):
    run = scenario_runner(SCENARIOS / f"{scenario}.yaml")
    allowed = set(run.scenario.checks.expect_fail)
    failed = run.failed_clauses
    record(f"clean_{scenario}", scenario, set(), allowed, failed, run.problems)
    problem = verdict_text(f"clean engine on {scenario}", set(), allowed, failed)
    assert problem is None, f"{problem}\nreport folder: {run.report_dir}"
    assert not run.problems, "\n".join(run.problems)


def _mutate(row: str, data: dict) -> dict:
    if row == "cfg_unread_client_queue":
        data["clients"][0]["conversion_delta_queue"] = "conversions_delta_nobody_reads"
    elif row == "cfg_duplicate_priority":
        worker = next(s for s in data["stages"] if s["kind"] == "worker")
        worker["queue_priority"] += " " + worker["queue_priority"].split()[1]
    elif row == "cfg_queue_of_two_types":
        # The explorer also reads it, so the queue is aligned but carries two types.
        queue = data["clients"][0]["conversion_full_queue"]
        data["clients"][0]["explorer_full_queue"] = queue
        explorer = next(s for s in data["stages"] if s["kind"] == "explorer")
        explorer["queue_priority"] += " " + queue
    return data


@pytest.mark.parametrize("row", sorted(CONFIG_FAULTS))
def test_configuration_fault_is_caught_by_the_lint(row):
    import yaml
    scenario_name, clauses = CONFIG_FAULTS[row]
    path = SCENARIOS / f"{scenario_name}.yaml"
    data = _mutate(row, yaml.safe_load(path.read_text()))
    failed = {r.clause for r in lint(parse_scenario(data, path)) if r.failed}
    clean = {r.clause for r in lint(load_scenario(path)) if r.failed}
    record(row, scenario_name, set(clauses), set(), failed)
    assert not clean, f"the unmutated {scenario_name} already fails {sorted(clean)}"
    problem = verdict_text(row, set(clauses), set(), failed)
    assert problem is None, problem
