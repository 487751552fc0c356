"""Scenario files as pytest tests, the ``scenario_runner`` fixture, and the summary.

- ``scenarios/**/*.yaml`` (and any YAML file named on the command line) is
  collected as one test per file, id = file stem, with the file's markers.
- ``scenario_runner`` runs a scenario on the test's vhost and returns its
  ``RunResult``; the conformance suite under ``suites/`` is built on it.
- Options and ini keys for the engine under test and the windows of SPEC.md.
  The ini keys that describe an engine (its windows and ``engine_env``) are
  that engine's *profile*: they apply only to the engine the ini file runs
  (its ``engine_cmd``, else the bundled reference engine), never to another
  engine given with ``--engine-cmd`` (issue 11). The command line always wins.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from harness.checkers import windows_for
from harness.checkers.model import SPEC_DEFAULT, ClauseResult, Windows
from harness.runner import EngineSettings, RunResult, ScenarioRunError, prepare_report_dir, run_scenario
from harness.scenario import Scenario, ScenarioError, load_scenario, parse_restart

DEFAULTS = Windows()
SUMMARY_KEY = "qp_summary"
BUNDLED_ENGINE = "python -m reference_engine.run_stage {stage}"
# ini key -> (command-line flag, Windows field). Their ini defaults are None so that "not set" can be told
# from "set to the SPEC value"; the SPEC defaults (DEFAULTS) are applied in _window_setting.
WINDOW_KEYS = {"check_period": ("--check-period", "check_period"),
               "window_tolerance": ("--window-tolerance", "tolerance"),
               "startup_grace": ("--startup-grace", "grace")}
# The ini keys that describe one engine: its windows and its environment.
PROFILE_KEYS = (*WINDOW_KEYS, "engine_env")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qp-harness", "qp-harness: queue-priority conformance")

    def option(name: str, ini: str, help: str, default: Any, type_: str | None = None, **kwargs: Any) -> None:
        group.addoption(name, dest=ini, default=None, help=f"{help} (ini: {ini}; default {default!r})", **kwargs)
        parser.addini(ini, help, type=type_, default=None if ini in WINDOW_KEYS else default)

    option("--engine-cmd", "engine_cmd", "engine command template; {stage} becomes explorer or worker",
           BUNDLED_ENGINE)
    option("--engine-image", "engine_image", "run every stage as a container of this image (testcontainers; "
           "the stage's command inside is --engine-cmd if given, else just {stage})", None)
    option("--engine-network", "engine_network", "with --engine-image: 'host' (the broker on loopback) or 'bridge' "
           "(the broker at host.docker.internal)", "host", choices=["host", "bridge"])
    option("--engine-env", "engine_env", "extra KEY=VALUE for every stage (repeatable)", [],
           "linelist", action="append")
    option("--engine-restart", "engine_restart", "restart policy POLICY[:LIMIT[:BACKOFF]] (no, on-failure, always) "
           "for every stage whose scenario sets none", "no")
    option("--check-period", "check_period", "the engine's priority check period in seconds (an ini value applies "
           "only to the ini's own engine)", str(DEFAULTS.check_period))
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


def _words(command: Any) -> list[str] | None:
    try:
        return shlex.split(command) if isinstance(command, str) else list(command)
    except ValueError:  # an unbalanced quote: engine_from says so
        return None


def _overridden(config: pytest.Config, name: str) -> bool:
    """Set with ``-o name=value``: a command-line setting, not the ini file's."""
    return any(entry.split("=", 1)[0].strip() == name for entry in config.getoption("override_ini") or [])


@dataclass(frozen=True)
class EngineProfile:
    """Whether the ini file's engine settings (PROFILE_KEYS) apply to the engine under test.

    They describe the engine the ini file runs: its ``engine_cmd``, else the bundled reference
    engine. An ``--engine-cmd`` naming another engine gets none of them (this repository's 1 s
    check period judged OS2datascanner's 5 s checks as failures), so SPEC's defaults apply to it
    unless the command line says otherwise.
    """

    applies: bool
    origin: str  # where the profile's values come from, as a window source
    ignored: tuple[str, ...] = ()  # "check_period = 1", ...: set in the ini file, would have applied, do not

    def note(self) -> str | None:
        if not self.ignored:
            return None
        return (f"ignored the {self.origin} ({', '.join(self.ignored)}): --engine-cmd names another engine; "
                "give its own with --check-period, --window-tolerance, --startup-grace, --engine-env")


def engine_profile(config: pytest.Config) -> EngineProfile:
    given = config.getoption("engine_cmd")
    if _value(config, "engine_image"):
        given = given or "{stage}"  # a container image is another engine than the ini's
    if given is None and _overridden(config, "engine_cmd"):
        # -o engine_cmd=... is the command line's engine; the file's own engine_cmd is then out of sight,
        # so the profile is taken to be the bundled engine's (as in this repository).
        given, ini_engine = config.getini("engine_cmd"), BUNDLED_ENGINE
    else:
        ini_engine = config.getini("engine_cmd") or BUNDLED_ENGINE
    applies = given is None or _words(given) == _words(ini_engine)
    whose = "reference engine profile" if _words(ini_engine) == _words(BUNDLED_ENGINE) else "engine profile"
    path = config.inipath
    if path is None:
        where = "the ini file"
    elif path.name == "pyproject.toml":
        where = "pyproject.toml [tool.pytest.ini_options]"
    else:
        where = f"{path.name} [{'tool:pytest' if path.name == 'setup.cfg' else 'pytest'}]"
    origin = f"{whose} in {where}"
    ignored: list[str] = []
    if not applies:
        for key in PROFILE_KEYS:
            value = config.getini(key)
            on_command_line = _overridden(config, key) or (key in WINDOW_KEYS and config.getoption(key) is not None)
            if value not in (None, "", []) and not on_command_line:
                ignored.append(f"{key} = {' '.join(value) if isinstance(value, list) else value}")
    return EngineProfile(applies, origin, tuple(ignored))


def _window_setting(config: pytest.Config, name: str, profile: EngineProfile) -> tuple[float, str]:
    """(seconds, where they came from): command line, else the ini's engine profile if it applies, else SPEC."""
    flag, field = WINDOW_KEYS[name]
    given = config.getoption(name)
    if given is not None:
        raw, source = given, f"command line {flag}"
    elif _overridden(config, name):
        raw, source = config.getini(name), f"command line -o {name}"
    elif profile.applies and config.getini(name) not in (None, ""):
        raw, source = config.getini(name), profile.origin
    else:
        return getattr(DEFAULTS, field), SPEC_DEFAULT
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{flag} / ini {name}: expected a number of seconds, got {raw!r}") from None
    if value < 0 or (value == 0 and name != "window_tolerance"):
        raise pytest.UsageError(f"{flag} / ini {name}: must be positive, got {raw!r}")
    return value, source


def windows_from(config: pytest.Config, scenario: Scenario | None = None) -> Windows:
    """Command line, else the ini's engine profile (if it is the engine under test), else SPEC;
    a scenario may override what it sets itself. ``sources`` says which, per value."""
    profile = engine_profile(config)
    values, sources = {}, {}
    for name, (_, field) in WINDOW_KEYS.items():
        values[field], sources[field] = _window_setting(config, name, profile)
    return windows_for(scenario, Windows(**values, sources=sources))


def engine_from(config: pytest.Config) -> EngineSettings:
    command = _value(config, "engine_cmd")
    try:
        words = shlex.split(command) if isinstance(command, str) else list(command)
    except ValueError as exc:  # an unbalanced quote
        raise pytest.UsageError(f"--engine-cmd / ini engine_cmd: cannot split {command!r}: {exc}") from None
    if not words or not any("{stage}" in w for w in words):
        raise pytest.UsageError(f"--engine-cmd / ini engine_cmd: the template must contain {{stage}}, got {command!r}")
    env: dict[str, str] = {}
    ini_env = config.getini("engine_env") or []
    if not (engine_profile(config).applies or _overridden(config, "engine_env")):
        ini_env = []  # the ini's engine profile, not this engine's (see EngineProfile)
    for entry in ini_env + (config.getoption("engine_env") or []):
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise pytest.UsageError(f"--engine-env / ini engine_env: expected KEY=VALUE, got {entry!r}")
        env[key.strip()] = value
    image = _value(config, "engine_image")
    if image:
        inside = words if config.getoption("engine_cmd") is not None else ["{stage}"]
        words = [sys.executable, "-m", "harness.container", "--image", image,
                 "--network", _value(config, "engine_network") or "host", "--", *inside]
    elif words[:4] == _words(BUNDLED_ENGINE):
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


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The engine under test and the windows it is judged with, and where each value came from."""
    try:
        engine, windows, profile = _value(config, "engine_cmd"), windows_from(config), engine_profile(config)
    except pytest.UsageError as exc:  # --collect-only skips pytest_configure's check
        return [f"qp-harness: {exc}"]
    bundled = " (the bundled reference engine)" if (_words(engine) or [])[:4] == _words(BUNDLED_ENGINE) else ""
    lines = [f"qp-harness: engine {engine}{bundled}",
             f"qp-harness: windows {windows.describe()}; a scenario may set its own under checks:"]
    if profile.note():
        lines.append(f"qp-harness: {profile.note()}")
    return lines


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
        result.marked = marked_clauses(request.node)
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
        result.timeline = render_timeline(result.history, result.results, result.report_dir / "timeline.png",
                                          result.windows)
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
        "windows": f"W = {result.windows.W:g} s, G = {result.windows.G:g} s",
    }


# -- asserting clauses -------------------------------------------------------
def marked_clauses(node: pytest.Item) -> tuple[str, ...]:
    """The clause ids of the test's ``clauses`` markers, in the order written."""
    ids: list[str] = []
    for marker in node.iter_markers("clauses"):
        ids += [c for c in marker.args if c not in ids]
    return tuple(ids)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A typo in a ``clauses`` marker is a collection error, not a clause silently never asserted."""
    from harness.checkers import CLAUSE_IDS
    for item in items:
        unknown = [c for c in marked_clauses(item) if c not in CLAUSE_IDS]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.clauses names unknown clause id(s) "
                                    f"{', '.join(unknown)}; known: {', '.join(CLAUSE_IDS)}")


def assert_clauses(result: RunResult, *clauses: str) -> None:
    """Each clause must be exercised and passed; the failure message starts with the clause id.

    Without ids, the clauses of the test's ``@pytest.mark.clauses(...)`` are asserted: a test
    states its clauses once, in its marker.
    """
    from harness.report import format_failure
    clauses = clauses or result.marked
    if not clauses:
        raise AssertionError("assert_clauses: no clause to assert; mark the test with @pytest.mark.clauses(...)")
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
    lines.append(f"judged with {result.windows.describe()}")
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
        windows = f" ({entry['windows']})" if entry.get("windows") else ""
        tr.write_line(f"{entry['test']}: {passed} passed, {idle} not exercised{errors}{windows}{failed}{figure}")
        if entry.get("timeline"):
            tr.write_line(f"    timeline: {entry['timeline']}")
        if entry["outcome"] != "passed":
            tr.write_line(f"    report: {entry['report_dir']}")
