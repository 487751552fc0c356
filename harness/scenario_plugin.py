"""Scenario files as pytest tests, the ``scenario_runner`` fixture, and the summary.

- ``scenarios/**/*.yaml`` (and any YAML file named on the command line) is
  collected as one test per file, id = file stem, with the file's markers.
- ``scenario_runner`` runs a scenario on the test's vhost and returns its
  ``RunResult``; the conformance suite under ``suites/`` is built on it.
- Options and ini keys for the engine under test and the windows of SPEC.md.
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any, Callable

import pytest

from harness.checkers import windows_for
from harness.checkers.model import ClauseResult, Windows
from harness.runner import EngineSettings, RunResult, ScenarioRunError, prepare_report_dir, run_scenario
from harness.scenario import Scenario, ScenarioError, load_scenario, parse_restart

DEFAULTS = Windows()
SUMMARY_KEY = "qp_summary"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qp-harness", "qp-harness: queue-priority conformance")

    def option(name: str, ini: str, help: str, default: Any, type_: str | None = None, **kwargs: Any) -> None:
        group.addoption(name, dest=ini, default=None, help=f"{help} (ini: {ini}; default {default!r})", **kwargs)
        parser.addini(ini, help, type=type_, default=default)

    option("--engine-cmd", "engine_cmd", "engine command template; {stage} becomes explorer or worker",
           "python -m reference_engine.run_stage {stage}")
    option("--engine-env", "engine_env", "extra KEY=VALUE for every stage (repeatable)", [],
           "linelist", action="append")
    option("--engine-restart", "engine_restart", "restart policy POLICY[:LIMIT[:BACKOFF]] (no, on-failure, always) "
           "for every stage whose scenario sets none", "no")
    option("--check-period", "check_period", "the engine's priority check period in seconds",
           str(DEFAULTS.check_period))
    option("--window-tolerance", "window_tolerance", "added to the check period to give the window W",
           str(DEFAULTS.tolerance))
    option("--startup-grace", "startup_grace", "G: seconds a stage has to declare its queues and consume",
           str(DEFAULTS.grace))
    option("--timeline", "timeline", "save a timeline PNG for failed runs, all runs, or none",
           "failed", choices=["failed", "all", "none"])
    option("--qp-report-dir", "qp_report_dir", "where each test's report folder goes", "reports/qp-harness")


# -- option values -----------------------------------------------------------
def _value(config: pytest.Config, name: str) -> Any:
    given = config.getoption(name)
    return given if given is not None else config.getini(name)


def _number(config: pytest.Config, name: str, flag: str) -> float:
    raw = _value(config, name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{flag} / ini {name}: expected a number of seconds, got {raw!r}") from None
    if value < 0 or (value == 0 and name != "window_tolerance"):
        raise pytest.UsageError(f"{flag} / ini {name}: must be positive, got {raw!r}")
    return value


def windows_from(config: pytest.Config, scenario: Scenario | None = None) -> Windows:
    """Command line or ini first; a scenario may override what it sets itself."""
    base = Windows(_number(config, "check_period", "--check-period"),
                   _number(config, "window_tolerance", "--window-tolerance"),
                   _number(config, "startup_grace", "--startup-grace"))
    return windows_for(scenario, base)


def engine_from(config: pytest.Config) -> EngineSettings:
    command = _value(config, "engine_cmd")
    try:
        words = shlex.split(command) if isinstance(command, str) else list(command)
    except ValueError as exc:  # an unbalanced quote
        raise pytest.UsageError(f"--engine-cmd / ini engine_cmd: cannot split {command!r}: {exc}") from None
    if not words or not any("{stage}" in w for w in words):
        raise pytest.UsageError(f"--engine-cmd / ini engine_cmd: the template must contain {{stage}}, got {command!r}")
    env: dict[str, str] = {}
    entries = (config.getini("engine_env") or []) + (config.getoption("engine_env") or [])
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(f"--engine-env / ini engine_env: expected KEY=VALUE, got {entry!r}")
        env[key.strip()] = value
    if words[:4] == ["python", "-m", "reference_engine.run_stage", "{stage}"]:
        import sys
        words[0] = sys.executable
    return EngineSettings(words, env, _restart(config))


def _restart(config: pytest.Config):
    raw = _value(config, "engine_restart")
    try:
        return parse_restart(str(raw))
    except ValueError as exc:
        raise pytest.UsageError(f"--engine-restart / ini engine_restart: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clauses(*ids): the SPEC.md clause ids a test enforces")
    # pika logs every channel the broker closes (the observer's passive declares of
    # missing queues do that on purpose) as a warning; keep test reports readable.
    logging.getLogger("pika").setLevel(logging.ERROR)
    if config.option.help or config.option.collectonly:
        return
    windows_from(config)  # fail fast on bad values, before any broker starts
    engine_from(config)
    timeline = _value(config, "timeline")
    if timeline not in ("failed", "all", "none"):  # the command line checks its choices, the ini file does not
        raise pytest.UsageError(f"--timeline / ini timeline: must be failed, all or none, got {timeline!r}")


# -- the fixture -------------------------------------------------------------
@pytest.fixture
def scenario_runner(request: pytest.FixtureRequest, broker, vhost, tmp_path: Path) -> Callable[..., RunResult]:
    """``scenario_runner(path_or_scenario)`` runs it on this test's vhost and returns the RunResult."""
    config = request.config
    engine = engine_from(config)
    report_root = Path(config.rootpath, _value(config, "qp_report_dir"))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    runs: list[RunResult] = []

    def progress(text: str) -> None:
        if reporter is not None and config.option.verbose > 0:
            reporter.write_line(f"[qp] {request.node.name}: {text}")

    def run(source: Scenario | str | Path, engine_env: dict[str, str] | None = None) -> RunResult:
        """Run a scenario (object or path relative to the rootdir); ``engine_env`` adds to --engine-env."""
        scenario = source if isinstance(source, Scenario) else load_scenario(Path(config.rootpath, source))
        windows = windows_from(config, scenario)
        name = request.node.nodeid if not runs else f"{request.node.nodeid}-{len(runs) + 1}"
        report_dir = prepare_report_dir(report_root, name)
        settings = EngineSettings(engine.command, {**engine.env, **(engine_env or {})}, engine.restart)
        result = run_scenario(scenario, broker, vhost.name, windows, settings, report_dir,
                              tmp_path / f"data{len(runs)}", progress)
        runs.append(result)
        _save_pictures(config, result)
        request.node.user_properties.append((SUMMARY_KEY, json.dumps(_summary(request.node.nodeid, result))))
        return result

    yield run


def _save_pictures(config: pytest.Config, result: RunResult) -> None:
    mode = _value(config, "timeline")
    if mode == "none" or (mode == "failed" and not result.failed and not result.problems):
        return
    from harness.report import render_timeline
    try:
        result.timeline = render_timeline(result.history, result.results, result.report_dir / "timeline.png")
    except Exception as exc:  # a drawing bug must never hide the run's own verdict
        import warnings
        warnings.warn(f"qp-harness: timeline of {result.report_dir} not drawn: {exc!r}", stacklevel=1)


def _summary(nodeid: str, result: RunResult) -> dict[str, Any]:
    cancel = next((r for r in result.results if r.clause == "QP-CANCEL-WINDOW"), None)
    return {
        "test": nodeid,
        "scenario": result.scenario.name,
        "reason": result.reason,
        "report_dir": str(result.report_dir),
        "timeline": str(result.timeline) if result.timeline else None,
        "outcomes": {r.clause: r.outcome for r in result.results},
        "failed": [r.clause for r in result.failed],
        "problems": [p.splitlines()[0] for p in result.problems],
        "cancel_latency": (cancel.metrics.get("latency_s") or {}) if cancel else {},
    }


# -- asserting clauses -------------------------------------------------------
def assert_clauses(result: RunResult, *clauses: str) -> None:
    """Each clause must be exercised and passed; the failure message starts with the clause id."""
    from harness.report import format_failure
    problems: list[ClauseResult] = []
    for clause in clauses:
        outcome = result.result(clause)
        if outcome.outcome != "passed":
            problems.append(outcome)
    if problems or result.problems:
        raise AssertionError(_failure_text(result, problems, format_failure))


def assert_scenario(result: RunResult) -> None:
    """What a scenario file promises: no failed clause, except those it expects to fail (which must fail)."""
    from harness.report import format_failure
    checks = result.scenario.checks
    expected = set(checks.expect_fail)
    unexpected = [r for r in result.results if (r.failed and r.clause not in expected) or r.errored]
    missing = [c for c in sorted(expected) if not result.result(c).failed]
    unexercised = [r for r in result.results
                   if checks.clauses and r.clause in checks.clauses and r.outcome == "not_exercised"]
    text = []
    if unexpected or unexercised or result.problems:
        text.append(_failure_text(result, unexpected + unexercised, format_failure))
    if missing:
        text.append(f"{', '.join(missing)}: expected to fail in this scenario, but did not")
    if text:
        raise AssertionError("\n".join(text))


def _failure_text(result: RunResult, problems: list[ClauseResult], format_failure) -> str:
    lines = [format_failure(problems, result.history)] if any(p.failed for p in problems) else []
    idle = [p for p in problems if p.outcome == "not_exercised"]
    lines += [f"{p.clause}: not exercised ({p.exercised}); this test needs the clause put to the test"
              for p in idle]
    if idle:
        from harness.pace import pace_lines
        lines.append("what this engine did in the run (the scenario must create the situation at this pace):")
        lines += [f"  {line}" for line in pace_lines(result.history, result.windows)]
    for p in problems:
        if p.errored:  # no verdict: the harness's own bug, reported with its traceback
            lines.append(f"{p.clause}: {p.exercised} (a bug of qp-harness; the other clauses were judged)\n"
                         f"{p.metrics.get('traceback', '')}".rstrip())
    lines += [f"the run itself failed: {problem}" for problem in result.problems]
    if result.reason != "complete":
        lines.append(f"(the run ended by {result.reason})")
    lines.append(f"report folder: {result.report_dir}")
    if result.timeline:
        lines.append(f"timeline: {result.timeline}")
    return "\n".join(lines)


# -- scenario files as tests ---------------------------------------------------
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    named = any(Path(arg.split("::")[0]).resolve() == file_path.resolve() for arg in parent.config.args)
    if "scenarios" in file_path.parts or named:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self):
        try:
            scenario = load_scenario(self.path)
        except ScenarioError as exc:
            raise self.CollectError(str(exc)) from None
        item = ScenarioItem.from_parent(self, name=self.path.stem, callobj=_make_test(scenario))
        for marker in scenario.markers:
            item.add_marker(marker)
        if scenario.checks.clauses:
            item.add_marker(pytest.mark.clauses(*scenario.checks.clauses))
        yield item


class ScenarioItem(pytest.Function):
    """A pytest Function whose body runs a scenario file; fixtures resolve as for any test."""

    def reportinfo(self):
        return self.path, 0, f"scenario {self.name}"

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (AssertionError, ScenarioRunError, ScenarioError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def _make_test(scenario: Scenario):
    def run_scenario_file(scenario_runner):
        assert_scenario(scenario_runner(scenario))
    return run_scenario_file


# -- the terminal summary ----------------------------------------------------
_collected: list[dict[str, Any]] = []  # per-run summaries, gathered on the controller under xdist


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == SUMMARY_KEY:
            _collected.append({**json.loads(value), "outcome": report.outcome})



def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if not _collected:
        return
    tr = terminalreporter
    tr.section("qp-harness")
    for entry in _collected:
        latency = entry.get("cancel_latency") or {}
        figure = ""
        if latency.get("count"):
            figure = (f"  cancel latency min/median/max {latency['min']:.2f}/{latency['median']:.2f}/"
                      f"{latency['max']:.2f} s over {latency['count']}")
        failed = f"  FAILED {', '.join(entry['failed'])}" if entry["failed"] else ""
        failed += "".join(f"  RUN PROBLEM: {p}" for p in entry.get("problems", []))
        passed = sum(1 for o in entry["outcomes"].values() if o == "passed")
        idle = sum(1 for o in entry["outcomes"].values() if o == "not_exercised")
        broken = sum(1 for o in entry["outcomes"].values() if o == "error")
        errors = f", {broken} checker error(s)" if broken else ""
        tr.write_line(f"{entry['test']}: {passed} passed, {idle} not exercised{errors}{failed}{figure}")
        if entry.get("timeline"):
            tr.write_line(f"    timeline: {entry['timeline']}")
        if entry["outcome"] != "passed":
            tr.write_line(f"    report: {entry['report_dir']}")
