"""Runs one scenario end to end and returns its history and verdict.

The order is DESIGN.md's data flow: observer first (so it sees every stage
connect), then the stages, then the workload; one schedule says when each
phase and fault is due. When the ledger (fed from the history as it is
written) owes nothing more (or the time limit passes) the stages are
stopped, the history is closed and the checkers judge it. Everything that
touches the network is here or below; the verdict is a pure function of the
history.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness import admin as ps_admin
from harness.broker import Broker, BrokerError
from harness.calibration import CalibrationError, Pace, calibrate, make_messages_for
from harness.checkers import CLAUSE_IDS, check_all
from harness.checkers.model import ClauseResult, Windows
from harness.flood import Flood, FloodError, progress_line
from harness.history import HISTORY_VERSION, History, HistoryWriter
from harness.ledger import LiveLedger
from harness.nemesis import Nemesis, NemesisError
from harness.observer import BROKER_GONE_AFTER, Observer, ObserverError
from harness.phases import PhaseDriver
from harness.scenario import Restart, Scenario
from harness.schedule import Happenings, Item, Schedule, backlog_size, stage_matches
from harness.stages import StageExited, StageLauncher, StageStartError
from harness.workload import Workload

# A run with work owed, nothing left to publish or inject, and no new delivery or result for this many
# windows W (at least STALL_MIN_SECONDS), and G past since its stages started, ends as 'stalled' rather
# than waiting for its time limit:
# an engine that lost or wedged the work has shown it by then (a failure that can only show at the
# engine's next check shows within one W), and the fault matrix's faulty runs end long before their limits.
STALL_WINDOWS = 3
STALL_MIN_SECONDS = 10.0

Progress = Callable[[str], None]


class ScenarioRunError(Exception):
    """The run itself could not be carried out (bad engine command, broker gone, ...)."""


@dataclass
class EngineSettings:
    """How to start the engine under test: a command template and extra environment."""

    command: list[str] | str | None = None  # None = the bundled reference engine
    env: dict[str, str] = field(default_factory=dict)
    restart: Restart | None = None  # the restart policy of every stage that sets none itself


@dataclass
class RunResult:
    scenario: Scenario
    windows: Windows
    history: History
    results: list[ClauseResult]
    report_dir: Path
    reason: str
    # What went wrong with the run itself (a stage died or never consumed, the
    # workload could not be published): the test fails on these whatever the clauses say.
    problems: list[str] = field(default_factory=list)
    timeline: Path | None = None
    marked: tuple[str, ...] = ()  # the clauses the test states (its ``clauses`` marker), set by the plugin

    def result(self, clause: str) -> ClauseResult:
        for result in self.results:
            if result.clause == clause:
                return result
        raise KeyError(f"{clause} was not judged in scenario {self.scenario.name}")

    @property
    def failed(self) -> list[ClauseResult]:
        return [r for r in self.results if r.failed]

    @property
    def failed_clauses(self) -> set[str]:
        return {r.clause for r in self.failed}


class RunEnded(Exception):
    """Ends the driving loop early; ``reason`` goes into run_finished."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason
        self.problem = problem


class ScenarioRun:
    """One run of one scenario on one vhost."""

    def __init__(self, scenario: Scenario, broker: Broker, vhost: str, windows: Windows,
                 engine: EngineSettings, report_dir: Path, data_dir: Path, progress: Progress | None = None):
        self.scenario = scenario
        self.broker = broker
        self.vhost = vhost
        self.windows = windows
        self.engine = engine
        self.report_dir = report_dir
        self.data_dir = data_dir
        self.say = progress or (lambda text: None)
        self.history = HistoryWriter(report_dir / "history.jsonl")
        self.ledger = LiveLedger()  # what the run owes, folded from the history as it is written
        self.history.listen(self.ledger)
        self.schedule = Schedule.of(scenario.workload, scenario.faults)
        self.happenings = Happenings()  # named phases and faults that have happened (when: {after: ...})
        self.backlog_objects: dict[int, int] = {}  # phase index -> objects (or specs) of a lasting backlog
        self._observer: Observer | None = None
        self._admin: ps_admin.Admin | None = None
        self.problems: list[str] = []
        self.flood: Flood | None = None
        self.phases: PhaseDriver | None = None
        self.nemesis: Nemesis | None = None

    # -- the run -----------------------------------------------------------
    def run(self) -> str:
        scenario = self.scenario
        observer = Observer(self.broker, self.vhost, self.history, scenario.queues)
        queue_type = scenario.broker.default_queue_type
        self.history.record("run_started", version=HISTORY_VERSION, scenario=scenario.name, default_queue_type=queue_type,
                            vhost=self.vhost, seed=scenario.seed, check_period=self.windows.check_period,
                            tolerance=self.windows.tolerance, grace=self.windows.grace,
                            window_sources=dict(self.windows.sources), **observer.sampling_parameters())
        launcher = StageLauncher(self.engine.command, self.engine.env, self.broker, self.vhost,
                                 self.report_dir, self.history, observer, self.engine.restart, self.say)
        admin = ps_admin.Admin(self.broker.connection_parameters(self.vhost), self.history, self.ledger.scan_state,
                               observer, scenario.admin.rebroadcast_seconds, self.say,
                               [p.name for p in scenario.workload]) if ps_admin.needed(scenario) else None
        nemesis = Nemesis(self.broker, self.vhost, self.history, launcher, observer, self.say,
                          latest_scan=lambda client: self.phases.latest.get(client) if self.phases else None,
                          scan_aborted=lambda scan: self.phases.scan_aborted(scan) if self.phases else None,
                          admin=admin)
        self.nemesis = nemesis
        reason = "error"
        try:
            if queue_type != "classic":  # before anyone declares a queue
                self.broker.management.set_default_queue_type(self.vhost, queue_type)
            observer.start()
            if admin is not None:  # before the stages, so that their first hellos are answered
                admin.start()
            self.workload = Workload(scenario, self.data_dir)
            self._size_backlogs()
            self._observer = observer
            self._admin = admin
            self.flood = Flood(self.broker.connection_parameters(self.vhost),
                               progress=lambda p: self.say(progress_line(p)))
            self.phases = PhaseDriver(scenario, self.workload, self.flood, self.history, self.windows.W,
                                      self.happenings, lambda grace: nemesis.broker_down_on_purpose(grace=grace),
                                      self.say, self.backlog_objects, admin)
            first = [s for s in scenario.stages if s.start == "immediately"]
            later = [s for s in scenario.stages if s.start == "after_workload"]
            if later:
                # A drain: the queues must hold the backlog before their stage exists to declare them.
                # Declared exactly as the engine declares them (durable, no arguments).
                self.flood.declare(q for s in later for q in s.read_queues)
            self._start_stages(launcher, observer, first)
            reason = self._drive(launcher, observer, nemesis, later)
        except RunEnded as ended:
            reason = ended.reason
            self.problems.append(ended.problem)
            self.say(ended.problem.splitlines()[0])
        except (StageStartError, ObserverError, FloodError, BrokerError, CalibrationError, ps_admin.AdminError) as exc:
            # The harness could not do its part (bad engine command, broker unreachable): say so plainly.
            self.problems.append(f"{type(exc).__name__}: {exc}")
            self.say(self.problems[-1].splitlines()[0])
        except Exception:
            # A bug of the harness itself: the run still gets its verdict, with the traceback to report.
            self.problems.append(f"qp-harness internal error (please report it):\n{traceback.format_exc()}")
            self.say(self.problems[-1].splitlines()[0])
        finally:
            self.history.record("phase", name="teardown")
            if self.flood is not None:
                self.flood.cancel()
            nemesis.finish()
            if admin is not None:
                admin.stop()
            launcher.stop_all()
            observer.stop()
            self.history.record("run_finished", reason=reason)
            self.history.close()
            if self.flood is not None:
                self.flood.close()
        return reason

    def _start_stages(self, launcher: StageLauncher, observer: Observer, stages) -> None:
        if not stages:
            return
        instances = []
        for stage in stages:
            instances += launcher.start(stage)
        self.say(f"started {', '.join(p.name for p in instances)}; waiting for their consumers (G = {self.windows.G:g} s)")
        deadline = time.monotonic() + self.windows.G
        waiting = {p.name for p in instances}
        while waiting:
            self._check_broker(observer)
            self._check_stages(launcher)
            waiting = {name for name in waiting if not observer.consumers_of(name)}
            if not waiting:
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name} (pid {p.pid}), last lines of {p.log_path} ---\n{p.tail(40)}"
                                  for p in instances if p.name in waiting)
                raise RunEnded("stage_silent", f"stage(s) {', '.join(sorted(waiting))} did not start consuming "
                                               f"within G = {self.windows.G:g} s\n{tails}")
            time.sleep(0.05)
        self.history.record("phase", name="stages_ready", stages=[p.name for p in instances])

    def _drive(self, launcher: StageLauncher, observer: Observer, nemesis: Nemesis, later) -> str:
        scenario = self.scenario
        started = time.monotonic()
        deadline = started + scenario.time_limit
        later_started = not later
        # Not before G has passed since the stages started: clauses judged at G (QP-DECLARE) need it.
        last_activity, quiet_since, stages_graced = None, started, started + self.windows.G
        while True:
            now = time.monotonic()
            self._check_broker(observer)
            self._check_stages(launcher)
            if self.phases.errors:
                raise RunEnded("error", f"publishing the workload failed: {self.phases.errors[0]}")
            self._start_due(self.schedule.due(now - started, self), nemesis)
            self.phases.tick(observer.ready, lambda: observer.samples)
            flooding = self.schedule.waiting("workload") or self.phases.publishing()
            if not flooding and not later_started:
                self.history.record("phase", name="flood_done")
                self._wait_for_firehose(self.flood.totals.sent)
                self._start_stages(launcher, observer, later)
                later_started = True
                stages_graced = time.monotonic() + self.windows.G
            done, owed = self.ledger.progress()
            faulting = self.schedule.waiting("faults") or nemesis.busy
            if not flooding and later_started and not faulting and owed == 0:
                self.say(f"all {done} objects owed have a result")
                self._settle(launcher)
                return "complete"
            activity = self.ledger.activity()
            if activity != last_activity or flooding or not later_started or faulting or launcher.restart_pending:
                last_activity, quiet_since = activity, now
            elif now - quiet_since > self._stall_after() and now >= stages_graced:
                self.say(f"stalled: no new delivery and no result for {now - quiet_since:.0f} s with {owed} objects "
                         f"owed and nothing left to publish or inject; ending the run")
                self._note_silent(observer, launcher, f"the run stalled ({owed} objects owed)")
                return "stalled"
            if now > deadline:
                self.say(f"time limit {scenario.time_limit:g} s reached with {done}/{done + owed} results")
                self._note_silent(observer, launcher, f"time limit {scenario.time_limit:g} s reached")
                return "time_limit"
            time.sleep(0.05)

    def _start_due(self, items: list[Item], nemesis: Nemesis) -> None:
        """Start the phases and apply the faults the schedule says are due. A fault that cannot be
        applied, now or in the background since the last turn, ends the run."""
        for item in items:
            if item.part == "workload":
                self.phases.launch(item.index, item.spec)
        try:
            nemesis.check()
            for item in items:
                if item.part == "faults":
                    nemesis.apply(item.index, item.spec)
                    self.happenings.add(item.label)
                    self.happenings.add(item.spec.name)
        except (NemesisError, KeyError) as exc:
            raise RunEnded("error", f"a fault of the scenario could not be applied: {exc}") from None

    # -- what triggers look at (schedule.BrokerState) ------------------------
    @property
    def window(self) -> float:
        return self.windows.W

    def ready(self, queue: str) -> int | None:
        return self._observer.ready(queue)

    def consuming(self, stage: str, queue: str) -> bool:
        return any(stage_matches(stage, instance) and queue in queues
                   for instance, queues in self._observer.consuming_stages().items())

    def consuming_tag(self, stage: str, tag: str) -> bool:
        tagged = self._admin.live_queues(tag) if self._admin is not None else set()
        return any(stage_matches(stage, instance) and tagged & set(queues)
                   for instance, queues in self._observer.consuming_stages().items())

    def happened(self, name: str) -> bool:
        return name in self.happenings

    def _wait_for_firehose(self, published: int, timeout: float = 10.0) -> None:
        """Before a drain's stage starts, let the observer record every publish of the backlog.

        Firehose events are stamped when the observer receives them, so a backlog still in
        flight would look as if it was published after the stage started (not a drain)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ledger.harness_publishes() >= published:  # workload messages, not a fault's poison or abort
                return
            time.sleep(0.05)
        self.say(f"the firehose recorded fewer than {published} workload publishes within {timeout:g} s")

    def _stall_after(self) -> float:
        """How long a run may show no delivery and no result, with work owed and nothing left to do,
        before it ends as stalled: long enough for any check of the engine to have come (several W),
        so that every clause whose failure shows at the next check has shown it."""
        return max(STALL_WINDOWS * self.windows.W, STALL_MIN_SECONDS)

    def _note_silent(self, observer: Observer, launcher: StageLauncher, why: str) -> None:
        silent = self._silent_stages(observer, launcher)
        if silent:
            self.say(f"silent: {', '.join(silent)}")
            self.problems.append(f"{why}; stage(s) with no delivery in the last {self.windows.W:g} s: "
                                 f"{', '.join(silent)}")

    def _silent_stages(self, observer: Observer, launcher: StageLauncher) -> list[str]:
        """Running stages with work ready in a queue they read but no delivery in the last W (a hang)."""
        horizon = time.time() - self.windows.W
        heard = {e.get("stage") for e in self.history.events[-20000:]
                 if e["type"] == "deliver" and e["t"] >= horizon}
        silent = []
        for process in launcher.running():
            queues = self.scenario.stage(process.role).read_queues
            if process.name not in heard and any((observer.ready(q) or 0) > 0 for q in queues):
                silent.append(process.name)
        return sorted(silent)

    def _settle(self, launcher: StageLauncher) -> None:
        # A short look after the last result, so duplicates and late cancels are seen. A stage its
        # restart policy is about to start again is waited for and looked at as long: a crash loop
        # (poison redelivered to each new instance) is seen to its end, not cut off by the teardown.
        look = min(1.0, self.windows.W)
        end = time.monotonic() + look
        while time.monotonic() < end or launcher.restart_pending:
            if launcher.restart_pending:
                end = time.monotonic() + look
            self._check_stages(launcher)
            time.sleep(0.05)

    # -- workload ----------------------------------------------------------
    def _size_backlogs(self) -> None:
        """Measure the pace of each drain's stage, and size its ``lasting`` backlogs from it."""
        paces: dict[tuple[str, str], Pace] = {}
        for index, phase in enumerate(self.scenario.workload):
            if phase.lasting is None:
                continue
            stage = self.scenario.drained_by(self.scenario.target_queue(phase))[0]
            key = (stage.name, phase.via)
            if key not in paces:
                paces[key] = calibrate(stage, make_messages_for(self.workload, index, phase), self.broker,
                                       self.vhost, self.engine, self.report_dir / "calibration", self.windows.G,
                                       self.say)
            pace, seconds = paces[key], phase.lasting.resolve(self.windows.W)
            self.backlog_objects[index] = backlog_size(pace.rate, seconds, stage.replicas)
            self.history.record("calibration", **pace.as_event(), phase=f"workload.{index}",
                                lasting=seconds, sized=self.backlog_objects[index])
            self.say(f"{stage.name} handles about {pace.rate:.1f} msg/s on {pace.queue}: workload.{index} gets "
                     f"{self.backlog_objects[index]} to last {seconds:g} s")

    def _check_broker(self, observer: Observer) -> None:
        # Before the stages: a stage that exits because the broker died must not take the blame.
        if self.nemesis is not None and self.nemesis.broker_down_on_purpose(grace=BROKER_GONE_AFTER):
            return  # a restart_broker fault has it down, or its connections are still coming back
        problem = observer.broker_problem()
        if problem:
            raise RunEnded("broker_gone", problem)

    def _check_stages(self, launcher: StageLauncher) -> None:
        exits = launcher.poll()
        if exits:
            raise RunEnded("stage_exited", str(StageExited.from_exits(exits)))


def prepare_report_dir(root: Path, test_id: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_.[]" else "_" for ch in test_id).strip("_")
    path = root / safe
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_scenario(scenario: Scenario, broker: Broker, vhost: str, windows: Windows, engine: EngineSettings,
                 report_dir: Path, data_dir: Path, progress: Progress | None = None) -> RunResult:
    run = ScenarioRun(scenario, broker, vhost, windows, engine, report_dir, data_dir, progress)
    reason = run.run()
    history = History.load(report_dir / "history.jsonl")
    # Every clause is judged; the scenario's own list says which must also be exercised.
    results = check_all(history, scenario, windows, clauses=CLAUSE_IDS)
    (report_dir / "verdict.json").write_text(json.dumps({
        "scenario": scenario.name, "reason": reason, "problems": run.problems,
        "outcomes": {r.clause: r.outcome for r in results},
        "windows": {"W": windows.W, "G": windows.G, "check_period": windows.check_period,
                    "tolerance": windows.tolerance, "grace": windows.grace, "sources": windows.sources,
                    "text": windows.describe()},
    }, indent=1))
    return RunResult(scenario, windows, history, results, report_dir, reason, run.problems)
