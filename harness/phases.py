"""The workload side of a run: phases launched, holds kept filled, messages published.

The runner's schedule says when a phase is due; ``PhaseDriver.launch`` plans its scans (each one a
``scan_planned`` event: what the ledger expects), and publishes their messages on a thread of its
own. ``tick`` tops holds up from the observer's samples and marks the phases whose publishing is
over (for ``when: {after: ...}``). A publish cut by a planned broker restart waits for the broker
and sends again what was not confirmed.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from harness.admin import AdminError
from harness.flood import Flood
from harness.history import HistoryWriter
from harness.messages import scan_id
from harness.observer import BROKER_GONE_AFTER
from harness.scenario import Phase, Scenario
from harness.schedule import Happenings, HoldController
from harness.workload import Workload


class PhaseDriver:
    """Launches the scenario's phases and publishes them; ``errors`` ends the run (the runner reads it).

    ``down_on_purpose(grace)``: a restart_broker or node fault has the broker down, or had it less than
    ``grace`` seconds ago (Nemesis.broker_down_on_purpose)."""

    def __init__(self, scenario: Scenario, workload: Workload, flood: Flood, history: HistoryWriter, window: float,
                 happenings: Happenings, down_on_purpose: Callable[[float], bool], say: Callable[[str], None],
                 backlog_objects: dict[int, int], admin=None):
        self.scenario = scenario
        self.workload = workload
        self.flood = flood
        self.history = history
        self.window = window
        self.happenings = happenings
        self.down_on_purpose = down_on_purpose
        self.say = say
        self.backlog_objects = backlog_objects  # phase index -> objects (or specs) of a lasting backlog
        self.admin = admin  # harness.admin.Admin when the scenario routes scans per scan, else None
        self.holds: dict[int, HoldController] = {}
        self.errors: list[BaseException] = []
        self.latest: dict[str, Any] = {}  # client -> its latest workload.PlannedScan (what abort_scan aborts)
        self._lock = threading.Lock()  # held while planning scans (publisher threads plan hold top-ups)
        self._threads: dict[int, list[threading.Thread]] = {}

    def launch(self, index: int, phase: Phase) -> None:
        if phase.hold is not None:
            queue = self._hold_queue(index, phase)
            self.holds[index] = hold = HoldController.for_hold(phase.hold, queue, time.monotonic(), self.window)
            self._threads.setdefault(index, [])
            self.history.record("hold", phase=f"workload.{index}", name=phase.name, state="started", queue=queue,
                                depth=hold.depth, seconds=phase.hold.resolve(self.window))
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

    def _hold_queue(self, index: int, phase: Phase) -> str:
        """The queue a hold keeps filled: a per-scan hold of conversions keeps its first scan's queue."""
        if phase.via == "conversions" and self.scenario.per_scan_tag(phase) is not None:
            return self.workload.per_scan_queue(index, 0)
        return self.scenario.target_queue(phase)

    def tick(self, ready: Callable[[str], int | None], samples: Callable[[], int]) -> None:
        """Top the holds up from the latest sample; note the phases whose publishing is over."""
        for index, hold in self.holds.items():
            if self.admin is not None and hold.stopped_early is None and self.admin.was_deleted(hold.queue):
                hold.stopped_early = "the admin deleted its per-scan queue"
            count = hold.top_up(time.monotonic(), ready(hold.queue), samples())
            if count:
                self._start_publisher(index, lambda index=index, hold=hold, count=count:
                                      self._top_up(index, hold, count, samples))
        self._note_finished()

    def scan_aborted(self, scan) -> None:
        """The admin aborted ``scan``: its messages still queued will be dropped, not worked on, and a
        hold must not take their going for the engine's pace (it would overfill the queue for the rest)."""
        hold = self.holds.get(scan.phase)
        if hold is not None:
            hold.work_discarded(sum(1 for queue, _ in scan.messages if queue == hold.queue))

    def publishing(self) -> bool:
        now = time.monotonic()
        return (any(t.is_alive() for threads in self._threads.values() for t in threads)
                or any(h.active(now) for h in self.holds.values()))

    def _register(self, planned: list) -> list[tuple[str, Any]]:
        """Record planned scans in the history (the ledger's expected objects); their messages in order."""
        messages: list[tuple[str, Any]] = []
        with self._lock:
            if self.admin is not None:
                # The admin declares and announces each per-scan queue before the scan's spec is sent.
                self.admin.open_scans([scan for scan in planned if scan.per_scan is not None])
            for scan in planned:
                self.latest[scan.client] = scan
                self.history.record("scan_planned", **scan.as_event())
                messages += scan.messages
        return messages

    def _start_publisher(self, index: int, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work, daemon=True, name=f"flood-{index}")
        self._threads.setdefault(index, []).append(thread)
        thread.start()

    def _top_up(self, index: int, hold: HoldController, count: int, samples: Callable[[], int]) -> None:
        phase = self.scenario.workload[index]
        first = hold.published  # scan numbers: one per message published so far, so never reused
        try:
            if phase.via == "conversions":
                per_scan = self.scenario.per_scan_tag(phase) is not None
                planned = [self.workload.plan_scan(index, first, objects=count,
                                                   conversion_queue=hold.queue if per_scan else None)]
            else:
                planned = [self.workload.plan_scan(index, first + k) for k in range(count)]
            self._publish(self._register(planned), None)
        except AdminError as exc:  # the admin could not declare the scan's queue: the run ends
            self.errors.append(exc)
        finally:
            hold.confirmed(count, samples())

    def _note_finished(self) -> None:
        """Phases whose publishing is over: a hold past its end, every publisher thread done."""
        for index, threads in self._threads.items():
            phase = self.scenario.workload[index]
            hold = self.holds.get(index)
            if f"workload.{index}" in self.happenings or (hold is not None and hold.active(time.monotonic())):
                continue
            if not any(t.is_alive() for t in threads):
                self.happenings.add(f"workload.{index}")
                self.happenings.add(phase.name)
                if self.admin is not None:
                    self.admin.phase_done(index)
                if hold is not None:
                    self.history.record("hold", phase=f"workload.{index}", name=phase.name, state="ended",
                                        **hold.summary())

    def _publish(self, messages: list[tuple[str, Any]], rate: float | None) -> None:
        """Publish in order. A connection lost, or messages refused, while a restart_broker or node
        fault is under way is the harness's own doing: like the admin, wait for the broker and send
        again what it had not confirmed (recorded, so that DL-EXACTLY-ONCE can tell these scans'
        duplicates from the engine's). Any other failure ends the run."""
        remaining = list(messages)
        while True:
            try:
                # Unroutable messages are the engine's or the configuration's fault, judged by RT-ROUTABLE.
                self.flood.publish_many(remaining, rate=rate, allow_unroutable=True)
                return
            except BaseException as exc:  # reported by the driving loop
                stats = getattr(exc, "flood_stats", None)
                if stats is None or not self._wait_out_planned_restart():
                    self.errors.append(exc)
                    return
                # What was nacked, or sent and never settled, may or may not have reached a queue: sent again.
                remaining = [remaining[i] for i in stats.unconfirmed(len(remaining))]
                self.history.record("phase", name="publish_resumed", error=f"{type(exc).__name__}: {exc}",
                                    resent=len(remaining), scans=_scans_of(remaining))
                time.sleep(RESEND_PAUSE)

    def _wait_out_planned_restart(self) -> bool:
        """True once the broker is back after a restart_broker fault that was under way; False at
        once when no planned restart explains the failure (or the broker does not come back)."""
        if not self.down_on_purpose(BROKER_GONE_AFTER):
            return False
        deadline = time.monotonic() + BROKER_GONE_AFTER + 60
        while self.down_on_purpose(0) and time.monotonic() < deadline:
            time.sleep(0.1)
        return time.monotonic() < deadline


# Between two attempts to publish while the broker or a node recovers (a quorum queue elects a leader).
RESEND_PAUSE = 0.5


def _scans_of(messages: list[tuple[str, Any]]) -> list[str]:
    """The scans (ids) the messages belong to: a scan spec's own tag, a conversion's spec's tag."""
    tags = (body.get("scan_tag") or (body.get("scan_spec") or {}).get("scan_tag")
            for _, body in messages if isinstance(body, dict))
    return sorted({sid for sid in map(scan_id, tags) if sid})
