"""Runs one scenario end to end and returns its history and verdict.

The order is DESIGN.md's data flow: observer first (so it sees every stage
connect), then the stages, then the workload; when every planned object has
a result (or the time limit passes) the stages are stopped, the history is
closed and the checkers judge it. Everything that touches the network is
here or below; the verdict is a pure function of the history.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.broker import Broker, BrokerError
from harness.calibration import CalibrationError, Pace, calibrate, make_messages_for
from harness.checkers import CLAUSE_IDS, check_all
from harness.checkers.model import ClauseResult, Windows
from harness.flood import Flood, FloodError, progress_line
from harness.history import HISTORY_VERSION, History, HistoryWriter
from harness.messages import scan_id
from harness.nemesis import Nemesis, NemesisError
from harness.observer import BROKER_GONE_AFTER, Observer, ObserverError
from harness.scenario import Phase, Restart, Scenario
from harness.schedule import Happenings, HoldController, backlog_size, is_due, stage_matches
from harness.stages import StageExited, StageLauncher, StageStartError
from harness.workload import Workload

Progress = Callable[[str], None]
WORKLOAD_TYPES = ("ScanSpecMessage", "ConversionMessage")  # what the flood publishes


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
        self.expected: set[tuple[str, str]] = set()
        self.queue_of: dict[tuple[str, str], str] = {}  # planned object -> its conversion queue
        self.planned: list = []  # workload.PlannedScan, in publishing order
        self._plan_lock = threading.Lock()  # holds plan scans on publisher threads
        self.happenings = Happenings()  # named phases and faults that have happened (when: {after: ...})
        self.holds: dict[int, HoldController] = {}
        self.backlog_objects: dict[int, int] = {}  # phase index -> objects (or specs) of a lasting backlog
        self._phase_threads: dict[int, list[threading.Thread]] = {}
        self._observer: Observer | None = None
        self.problems: list[str] = []
        self.publish_errors: list[BaseException] = []
        self._publishers: list[threading.Thread] = []
        self.flood: Flood | None = None
        self.nemesis: Nemesis | None = None

    # -- the run -----------------------------------------------------------
    def run(self) -> str:
        scenario = self.scenario
        self.history.record("run_started", version=HISTORY_VERSION, scenario=scenario.name,
                            vhost=self.vhost, seed=scenario.seed, check_period=self.windows.check_period,
                            tolerance=self.windows.tolerance, grace=self.windows.grace,
                            window_sources=dict(self.windows.sources))
        observer = Observer(self.broker, self.vhost, self.history, scenario.queues)
        launcher = StageLauncher(self.engine.command, self.engine.env, self.broker, self.vhost,
                                 self.report_dir, self.history, observer, self.engine.restart, self.say)
        nemesis = Nemesis(scenario.faults, self.broker, self.vhost, self.history, launcher, observer, self.say)
        nemesis.latest_scan = lambda client: next(
            (scan for scan in reversed(self.planned) if scan.client == client), None)
        self.nemesis = nemesis
        reason = "error"
        try:
            observer.start()
            self.workload = Workload(scenario, self.data_dir)
            self._size_backlogs()
            self._observer = observer
            self.flood = Flood(self.broker.connection_parameters(self.vhost),
                               progress=lambda p: self.say(progress_line(p)))
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
        except (StageStartError, ObserverError, FloodError, BrokerError, CalibrationError) as exc:
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
        pending = list(enumerate(scenario.workload))
        later_started = not later
        while True:
            now = time.monotonic()
            self._check_broker(observer)
            self._check_stages(launcher)
            if self.publish_errors:
                raise RunEnded("error", f"publishing the workload failed: {self.publish_errors[0]}")
            for index, phase in list(pending):
                if is_due(phase.at, phase.when, now - started, self):
                    pending.remove((index, phase))
                    self._launch_phase(index, phase)
            self._tick_holds(observer)
            self._note_finished_phases()
            try:
                for name in nemesis.tick(now - started, self):
                    self.happenings.add(name)
            except (NemesisError, KeyError) as exc:
                raise RunEnded("error", f"a fault of the scenario could not be applied: {exc}") from None
            flooding = bool(pending) or self._publishing()
            if not flooding and not later_started:
                self.history.record("phase", name="flood_done")
                self._wait_for_firehose(self.flood.totals.sent)
                self._start_stages(launcher, observer, later)
                later_started = True
            answered = observer.answered()
            with self._plan_lock:
                done = len(answered & self.expected)
            wanted = self._still_expected(answered, nemesis, observer)
            if not flooding and later_started and not (nemesis.pending or nemesis.busy) and done >= wanted:
                self.say(f"all {wanted} objects have a result")
                self._settle(launcher)
                return "complete"
            if now > deadline:
                silent = self._silent_stages(observer, launcher)
                self.say(f"time limit {scenario.time_limit:g} s reached with {done}/{wanted} results"
                         + (f"; silent: {', '.join(silent)}" if silent else ""))
                if silent:
                    self.problems.append(f"time limit {scenario.time_limit:g} s reached; stage(s) with no "
                                         f"delivery in the last {self.windows.W:g} s: {', '.join(silent)}")
                return "time_limit"
            time.sleep(0.05)

    # -- what triggers look at (schedule.BrokerState) ------------------------
    def ready(self, queue: str) -> int | None:
        return self._observer.ready(queue)

    def consuming(self, stage: str, queue: str) -> bool:
        return any(stage_matches(stage, instance) and queue in queues
                   for instance, queues in self._observer.consuming_stages().items())

    def happened(self, name: str) -> bool:
        return name in self.happenings

    def _wait_for_firehose(self, published: int, timeout: float = 10.0) -> None:
        """Before a drain's stage starts, let the observer record every publish of the backlog.

        Firehose events are stamped when the observer receives them, so a backlog still in
        flight would look as if it was published after the stage started (not a drain)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recorded = sum(1 for e in self.history.events if e["type"] == "publish" and e.get("stage") == "harness"
                           and (e.get("msg") or {}).get("type") in WORKLOAD_TYPES)  # not a fault's poison or abort
            if recorded >= published:
                return
            time.sleep(0.05)
        self.say(f"the firehose recorded fewer than {published} workload publishes within {timeout:g} s")

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

    def _still_expected(self, seen: set[tuple[str, str]], nemesis: Nemesis, observer: Observer) -> int:
        """Objects that can still get a result: not those of an aborted scan, nor those still in a
        queue when a fault deleted it (an object a stage took from it before that is still owed)."""
        deleted, aborted = nemesis.deleted_queues, nemesis.aborted_scans
        with self._plan_lock:
            expected = list(self.expected)
        if not deleted and not aborted:
            return len(expected)
        taken = {key for queue, t in deleted.items() for key in observer.delivered_before(queue, t)}
        return sum(1 for key in expected if key in seen or (
            key[0] not in aborted and (self.queue_of[key] not in deleted or key in taken)))

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

    def _launch_phase(self, index: int, phase: Phase) -> None:
        if phase.hold is not None:
            queue = self.scenario.target_queue(phase)
            self.holds[index] = hold = HoldController.for_hold(phase.hold, queue, time.monotonic(), self.windows.W)
            self._phase_threads.setdefault(index, [])
            self.history.record("hold", phase=f"workload.{index}", name=phase.name, state="started", queue=queue,
                                depth=hold.depth, seconds=phase.hold.resolve(self.windows.W))
            self.say(f"workload.{index}: holding {queue} at {hold.depth}+ ready for {phase.hold.describe()}")
            return
        if phase.lasting is not None:
            count = self.backlog_objects[index]
            planned = ([self.workload.plan_scan(index, 0, objects=count)] if phase.via == "conversions"
                       else [self.workload.plan_scan(index, number) for number in range(count)])
        else:
            planned = self.workload.plan(index)
        messages = self._register(planned)
        self.history.record("phase", name=f"workload.{index}", client=phase.client, mode=phase.mode,
                            messages=len(messages))
        self.say(f"workload.{index}: {len(planned)} {phase.mode} scan(s) of {phase.client}, {len(messages)} message(s)")
        self._start_publisher(index, lambda: self._publish(messages, phase.rate))

    def _register(self, planned: list) -> list[tuple[str, Any]]:
        """Record planned scans in the history and in what the run waits for; their messages in order."""
        messages: list[tuple[str, Any]] = []
        with self._plan_lock:
            for scan in planned:
                self.planned.append(scan)
                self.history.record("scan_planned", **scan.as_event())
                for obj in scan.objects:
                    self.expected.add((scan.scan, obj))
                    self.queue_of[(scan.scan, obj)] = scan.conversion_queue
                messages += scan.messages
        return messages

    def _start_publisher(self, index: int, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work, daemon=True, name=f"flood-{index}")
        self._publishers.append(thread)
        self._phase_threads.setdefault(index, []).append(thread)
        thread.start()

    def _tick_holds(self, observer: Observer) -> None:
        for index, hold in self.holds.items():
            count = hold.top_up(time.monotonic(), observer.ready(hold.queue), observer.samples)
            if count:
                self._start_publisher(index, lambda index=index, hold=hold, count=count:
                                      self._top_up(index, hold, count, observer))

    def _top_up(self, index: int, hold: HoldController, count: int, observer: Observer) -> None:
        phase = self.scenario.workload[index]
        first = hold.published  # scan numbers: one per message published so far, so never reused
        try:
            if phase.via == "conversions":
                planned = [self.workload.plan_scan(index, first, objects=count)]
            else:
                planned = [self.workload.plan_scan(index, first + k) for k in range(count)]
            self._publish(self._register(planned), None)
        finally:
            hold.confirmed(count, observer.samples)

    def _note_finished_phases(self) -> None:
        """Phases whose publishing is over: a hold past its end, every publisher thread done."""
        for index, threads in self._phase_threads.items():
            phase = self.scenario.workload[index]
            hold = self.holds.get(index)
            if f"workload.{index}" in self.happenings or (hold is not None and hold.active(time.monotonic())):
                continue
            if not any(t.is_alive() for t in threads):
                self.happenings.add(f"workload.{index}")
                self.happenings.add(phase.name)
                if hold is not None:
                    self.history.record("hold", phase=f"workload.{index}", name=phase.name, state="ended",
                                        **hold.summary())

    def _publishing(self) -> bool:
        now = time.monotonic()
        return any(t.is_alive() for t in self._publishers) or any(h.active(now) for h in self.holds.values())

    def _publish(self, messages: list[tuple[str, Any]], rate: float | None) -> None:
        """Publish in order. A connection lost to a restart_broker fault is the harness's own doing:
        like the admin, wait for the broker and send again what it had not confirmed (recorded, so
        that DL-EXACTLY-ONCE can tell these scans' duplicates from the engine's). Any other failure
        ends the run."""
        remaining = list(messages)
        while True:
            try:
                # Unroutable messages are the engine's or the configuration's fault, judged by RT-ROUTABLE.
                self.flood.publish_many(remaining, rate=rate, allow_unroutable=True)
                return
            except BaseException as exc:  # reported by the driving loop
                stats = getattr(exc, "flood_stats", None)
                if stats is None or not self._wait_out_planned_restart():
                    self.publish_errors.append(exc)
                    return
                # Confirms come in order for these queues; what was sent after the last one may or may
                # not have reached the broker, so it is sent again.
                remaining = remaining[stats.confirmed:]
                self.history.record("phase", name="publish_resumed", error=f"{type(exc).__name__}: {exc}",
                                    resent=len(remaining), scans=_scans_of(remaining))

    def _wait_out_planned_restart(self) -> bool:
        """True once the broker is back after a restart_broker fault that was under way; False at
        once when no planned restart explains the failure (or the broker does not come back)."""
        nemesis = self.nemesis
        if nemesis is None or not nemesis.broker_down_on_purpose(grace=BROKER_GONE_AFTER):
            return False
        deadline = time.monotonic() + BROKER_GONE_AFTER + 60
        while nemesis.broker_down_on_purpose(grace=0) and time.monotonic() < deadline:
            time.sleep(0.1)
        return time.monotonic() < deadline

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


def _scans_of(messages: list[tuple[str, Any]]) -> list[str]:
    """The scans (ids) the messages belong to: a scan spec's own tag, a conversion's spec's tag."""
    tags = (body.get("scan_tag") or (body.get("scan_spec") or {}).get("scan_tag")
            for _, body in messages if isinstance(body, dict))
    return sorted({sid for sid in map(scan_id, tags) if sid})


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
