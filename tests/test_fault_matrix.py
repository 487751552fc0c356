"""The fault matrix: every clause catches the faults it exists for, and a conformant engine passes.

For every fault switch of the reference engine (``REFERENCE_ENGINE_FAULTS``)
one scenario that puts it to the test is run through the real plugin (the
``scenario_runner`` fixture, on a real broker, with real stage processes),
and the set of failed clauses is compared with the fault's declaration in
the fault registry ``harness/faults.py``: every clause it must break fails (else
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
from harness.faults import CONFIG_FAULTS, ENGINE_FAULTS, clauses_tripped
from harness.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "suites" / "clause_scenarios"
RESULTS = ROOT / "reports" / "fault-matrix"

CLEAN_SCENARIOS = sorted({f.scenario for f in [*ENGINE_FAULTS.values(), *CONFIG_FAULTS.values()]})


def record(row: str, scenario: str, expected, allowed, failed, problems=()) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A scenario stem may name a sub-folder (per_scan/precedence): one flat file per row all the same.
    (RESULTS / f"{row.replace('/', '__')}.json").write_text(json.dumps({
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
    faults = [*ENGINE_FAULTS.values(), *CONFIG_FAULTS.values()]
    assert [f.name for f in faults if not (SCENARIOS / f"{f.scenario}.yaml").exists()] == []
    assert [f.name for f in faults if not f.clauses or set(f.clauses) & set(getattr(f, "may_also", ()))] == []
    tripped = clauses_tripped()
    assert tripped <= set(CLAUSE_IDS), f"faults name unknown clauses: {sorted(tripped - set(CLAUSE_IDS))}"
    assert set(CLAUSE_IDS) <= tripped, f"clauses no fault can trip: {sorted(set(CLAUSE_IDS) - tripped)}"


@pytest.mark.parametrize("fault", sorted(ENGINE_FAULTS))
def test_fault_is_caught_by_exactly_its_clauses(scenario_runner, fault):
    declared = ENGINE_FAULTS[fault]
    scenario = declared.scenario
    run = scenario_runner(SCENARIOS / f"{scenario}.yaml", engine_env={"REFERENCE_ENGINE_FAULTS": fault})
    # A clause the scenario fails on purpose (checks.expect_fail, such as CF-TAGS) fails with the fault too.
    expected, allowed = set(declared.clauses), set(declared.may_also) | set(run.scenario.checks.expect_fail)
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


@pytest.mark.parametrize("row", sorted(CONFIG_FAULTS))
def test_configuration_fault_is_caught_by_the_lint(row):
    import yaml
    fault = CONFIG_FAULTS[row]
    scenario_name, clauses = fault.scenario, fault.clauses
    path = SCENARIOS / f"{scenario_name}.yaml"
    data = yaml.safe_load(path.read_text())
    fault.mutate(data)
    failed = {r.clause for r in lint(parse_scenario(data, path)) if r.failed}
    clean = {r.clause for r in lint(load_scenario(path)) if r.failed}
    record(row, scenario_name, set(clauses), set(), failed)
    assert not clean, f"the unmutated {scenario_name} already fails {sorted(clean)}"
    problem = verdict_text(row, set(clauses), set(), failed)
    assert problem is None, problem
