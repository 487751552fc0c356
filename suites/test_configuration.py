"""CF-*: the static lint, run on every scenario shipped with the suite (no broker needed)."""
from pathlib import Path

import pytest

from harness.checkers import lint
from harness.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "scenarios").rglob("*.yaml")) + sorted((ROOT / "suites" / "clause_scenarios").glob("*.yaml"))


@pytest.mark.clauses("CF-ALIGN", "CF-NO-DUP", "CF-ONE-TYPE")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenarios_are_aligned(path):
    scenario = load_scenario(path)
    expected = set(scenario.checks.expect_fail)
    for result in lint(scenario):
        if result.clause in expected:
            assert result.failed, f"{result.clause}: {path.name} expects this clause to fail"
        else:
            assert not result.failed, f"{result.clause}: {path.name}: " + "; ".join(f.explanation for f in result.findings)
