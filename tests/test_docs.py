"""Docs that must match the code."""
import re
import subprocess
import sys
from pathlib import Path

import yaml

from harness.checkers import lint
from harness.history import HISTORY_VERSION, markdown_table
from harness.scenario import parse_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_history_doc_lists_every_event_type():
    text = (ROOT / "docs" / "history.md").read_text()
    assert f"version {HISTORY_VERSION}" in text
    assert markdown_table() in text, "regenerate the table in docs/history.md from harness.history.markdown_table()"


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_scenario_is_valid_and_lints_clean():
    [example] = [b for b in readme_blocks("yaml") if b.startswith("# scenarios/")]
    scenario = parse_scenario(yaml.safe_load(example), "README.md")
    assert scenario.checks.clauses and scenario.faults
    assert [r.clause for r in lint(scenario) if r.outcome == "failed"] == []


def test_the_readme_lists_every_qp_harness_option():
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    group = help_text.split("qp-harness: queue-priority conformance:", 1)[1].split("\n\n", 1)[0]
    options = set(re.findall(r"^\s+(--[a-z-]+)", group, flags=re.M))
    assert len(options) >= 10, group
    readme = (ROOT / "README.md").read_text()
    assert sorted(o for o in options if f"`{o}" not in readme and f" {o}`" not in readme) == []
