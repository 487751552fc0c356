"""Which windows a run is judged with, and where they came from (issue 11). No broker.

The ini keys that describe an engine (check_period, window_tolerance, startup_grace, engine_env) are
the profile of the engine the ini file runs: its engine_cmd, else the bundled reference engine. An
``--engine-cmd`` naming another engine gets SPEC's defaults instead; the command line always wins.
Configs are parsed by pytester (not configured, so no plugin side effects) in a folder of their own.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.checkers import windows_for
from harness.checkers.model import SPEC_DEFAULT, Windows
from harness.runner import RunResult
from harness.scenario import parse_scenario
from harness.scenario_plugin import (_failure_text, _summary, engine_from, engine_profile, pytest_report_header,
                                     windows_from)

pytest_plugins = ["pytester"]

REPO_INI = """
[tool.pytest.ini_options]
check_period = "1"
engine_env = ["PRIORITY_CHECK_SECONDS=1"]
"""
PROFILE = "reference engine profile in pyproject.toml [tool.pytest.ini_options]"
OTHER = "/srv/os2ds/bin/python -m os2datascanner.engine2.pipeline.run_stage {stage}"


@pytest.fixture
def parse(pytester: pytest.Pytester):
    """``parse(*args)``: a Config for this repository's ini profile and the given command line."""
    pytester.makepyprojecttoml(REPO_INI)
    return pytester.parseconfig


def test_the_bundled_engine_takes_the_ini_profile(parse):
    config = parse()
    w = windows_from(config)
    assert (w.check_period, w.tolerance, w.grace) == (1.0, 1.0, 30.0)
    assert w.sources == {"check_period": PROFILE, "tolerance": SPEC_DEFAULT, "grace": SPEC_DEFAULT}
    assert engine_from(config).env == {"PRIORITY_CHECK_SECONDS": "1"}
    assert engine_profile(config).ignored == ()


def test_naming_the_bundled_engine_explicitly_keeps_its_profile(parse):
    config = parse("--engine-cmd", "python  -m reference_engine.run_stage {stage}")
    assert windows_from(config).check_period == 1.0
    assert engine_from(config).env == {"PRIORITY_CHECK_SECONDS": "1"}


def test_another_engine_ignores_the_ini_profile_and_gets_spec_defaults(parse):
    config = parse("--engine-cmd", OTHER)
    w = windows_from(config)
    assert w == Windows(5.0, 1.0, 30.0)
    assert set(w.sources.values()) == {SPEC_DEFAULT}
    assert engine_from(config).env == {}  # the reference engine's pacing is not this engine's
    profile = engine_profile(config)
    assert not profile.applies
    assert profile.ignored == ("check_period = 1", "engine_env = PRIORITY_CHECK_SECONDS=1")


@pytest.mark.parametrize("engine", [None, OTHER], ids=["bundled", "another"])
def test_the_command_line_wins(parse, engine):
    args = ["--engine-cmd", engine] if engine else []
    config = parse(*args, "--check-period", "3", "--window-tolerance", "0.5", "--engine-env", "X=1")
    w = windows_from(config)
    assert (w.check_period, w.tolerance, w.grace) == (3.0, 0.5, 30.0)
    assert w.sources == {"check_period": "command line --check-period", "tolerance": "command line --window-tolerance",
                         "grace": SPEC_DEFAULT}
    expected_env = {"X": "1"} if engine else {"PRIORITY_CHECK_SECONDS": "1", "X": "1"}
    assert engine_from(config).env == expected_env
    # the ini check_period would not have applied anyway: only the engine_env is reported as ignored
    assert engine_profile(config).ignored == (("engine_env = PRIORITY_CHECK_SECONDS=1",) if engine else ())


def test_an_ini_override_on_the_command_line_wins_too(parse):
    w = windows_from(parse("--engine-cmd", OTHER, "-o", "startup_grace=12"))
    assert (w.check_period, w.grace) == (5.0, 12.0)
    assert w.sources["grace"] == "command line -o startup_grace"


def test_an_ini_naming_its_own_engine_gives_that_engine_its_profile(pytester: pytest.Pytester):
    pytester.makeini(f"[pytest]\nengine_cmd = {OTHER}\ncheck_period = 5\nstartup_grace = 60\n")
    w = windows_from(pytester.parseconfig())
    assert (w.check_period, w.grace) == (5.0, 60.0)
    assert w.sources["grace"] == "engine profile in tox.ini [pytest]"  # makeini writes tox.ini
    # ... and not to a third engine named on the command line
    assert windows_from(pytester.parseconfig("--engine-cmd", "my-engine {stage}")).grace == 30.0


def test_a_bad_ini_value_is_still_a_usage_error_for_its_engine(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\ncheck_period = abc\n")
    with pytest.raises(pytest.UsageError, match="--check-period / ini check_period: expected a number"):
        windows_from(pytester.parseconfig())


def test_a_scenario_override_is_named_as_its_source(parse):
    scenario = parse_scenario({"name": "slow", "clients": [{"name": "a"}],
                               "stages": [{"name": "worker", "kind": "worker"}], "checks": {"grace": 45}})
    w = windows_from(parse("--engine-cmd", OTHER), scenario)
    assert (w.check_period, w.grace) == (5.0, 45.0)
    assert w.sources["grace"] == "scenario slow checks.grace"
    assert w.sources["check_period"] == SPEC_DEFAULT


def test_describe_states_the_windows_and_their_sources():
    assert windows_for(None).describe() == "W = 6 s, G = 30 s (check period 5 s, tolerance 1 s, grace 30 s: SPEC default)"
    w = Windows(1.0, 1.0, 30.0, {"check_period": PROFILE, "tolerance": SPEC_DEFAULT, "grace": SPEC_DEFAULT})
    assert w.describe() == f"W = 2 s, G = 30 s (check period 1 s: {PROFILE}; tolerance 1 s, grace 30 s: SPEC default)"
    assert Windows(5.0, 1.0, 10.0).describe() == "W = 6 s, G = 10 s"  # no sources recorded: values only
    assert w == Windows(1.0, 1.0, 30.0)  # sources are a label, not part of the value


def test_the_header_states_engine_windows_and_what_was_ignored(parse):
    header = pytest_report_header(parse())
    assert header[0] == "qp-harness: engine python -m reference_engine.run_stage {stage} (the bundled reference engine)"
    assert header[1].startswith(f"qp-harness: windows W = 2 s, G = 30 s (check period 1 s: {PROFILE}; ")
    assert len(header) == 2

    header = pytest_report_header(parse("--engine-cmd", OTHER))
    assert header[0] == f"qp-harness: engine {OTHER}"
    assert header[1].startswith("qp-harness: windows W = 6 s, G = 30 s (check period 5 s, tolerance 1 s, "
                                "grace 30 s: SPEC default)")
    assert header[2].startswith(f"qp-harness: ignored the {PROFILE} (check_period = 1, "
                                "engine_env = PRIORITY_CHECK_SECONDS=1): --engine-cmd names another engine")


def test_the_header_is_printed_by_a_real_run(pytester: pytest.Pytester):
    pytester.makepyprojecttoml(REPO_INI)
    done = pytester.runpytest_subprocess("--co", "-p", "no:cacheprovider", "--engine-cmd", OTHER)
    done.stdout.fnmatch_lines(["qp-harness: windows W = 6 s, G = 30 s (*SPEC default)*",
                               "qp-harness: ignored the reference engine profile*"])


def test_failure_text_and_summary_state_the_windows(tmp_path: Path):
    w = Windows(5.0, 1.0, 30.0, {"check_period": "command line --check-period", "tolerance": SPEC_DEFAULT,
                                 "grace": SPEC_DEFAULT})
    scenario = parse_scenario({"name": "s", "clients": [{"name": "a"}], "stages": [{"name": "worker", "kind": "worker"}]})
    result = RunResult(scenario, w, None, [], tmp_path, "complete", ["stage worker exited"])
    text = _failure_text(result, [], None)
    assert ("judged with W = 6 s, G = 30 s (check period 5 s: command line --check-period; "
            "tolerance 1 s, grace 30 s: SPEC default)") in text.splitlines()
    assert _summary("t", result)["windows"] == "W = 6 s, G = 30 s"


def test_the_readme_shows_the_header_as_printed(parse):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    engine = "/srv/os2ds/venv/bin/python -m os2datascanner.engine2.pipeline.run_stage {stage}"
    for line in pytest_report_header(parse("--engine-cmd", engine)):
        assert f"\n{line}\n" in readme, f"README.md 'Which windows apply' lacks: {line}"
