"""The seed scenarios of the engine's design note, run end to end: no clause may fail."""
from pathlib import Path

import pytest

from harness.scenario_plugin import assert_scenario

ROOT = Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
def test_seed_scenario(scenario_runner, path):
    assert_scenario(scenario_runner(path))
