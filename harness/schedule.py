"""When workload phases and faults happen, and how a hold keeps a queue filled.

One schedule (``Schedule``) holds the scenario's phases and faults, and one
rule (``is_due``) decides for both: an item is due once ``at`` seconds have
passed since the stages consumed AND its ``when`` trigger holds (every
condition of it, on the broker state the observer sees, and with ``for``
given, without a break for that long). ``at`` is not a delay after the
trigger: with both given, the item waits for the later of the two. A scenario therefore describes situations ("while the worker consumes
the bottom queue"), not timings tuned for one engine's pace.

``HoldController`` is the closed loop behind ``hold:``: from the ready counts
the observer samples it decides how much to publish so that the queue never
runs dry, at whatever pace the engine consumes it. It is pure (no I/O), so it
is unit-tested with made-up samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from harness.scenario import Fault, Hold, Phase, Trigger

# A hold never publishes more than this in one top-up, nor keeps more than this many messages queued.
MAX_TARGET = 5000
# ... nor more than this many messages in all: past it the hold ends early (and says so in the history).
MAX_TOTAL = 100_000
# A hold keeps this many seconds of the engine's measured consumption queued above its depth: the time
# one turn of the loop may take on a loaded machine (a sample, a publish with confirms, a fresh sample).
REFILL_SECONDS = 1.0
# The consumption rate is measured over at least this long, so that the jitter of when the runner sees
# a sample (a few hundredths of a second) does not inflate it.
RATE_SPAN = 0.3


class BrokerState(Protocol):
    """What a trigger may look at: the observer's latest view, and what has happened so far."""

    def ready(self, queue: str) -> int | None: ...

    def consuming(self, stage: str, queue: str) -> bool: ...

    def consuming_tag(self, stage: str, tag: str) -> bool: ...

    def happened(self, name: str) -> bool: ...

    #: the run's W, for ``for: {windows: N}``
    window: float


def trigger_holds(trigger: Trigger | None, state: BrokerState) -> bool:
    if trigger is None:
        return True
    if trigger.queue is not None:
        ready = state.ready(trigger.queue)
        if ready is None or ready < trigger.ready_at_least:
            return False
    if trigger.consuming is not None and not state.consuming(trigger.stage, trigger.consuming):
        return False
    if trigger.consuming_tag is not None and not state.consuming_tag(trigger.stage, trigger.consuming_tag):
        return False
    return trigger.after is None or state.happened(trigger.after)


# ``is_due``'s ``held`` when the caller has not tracked it: whether the trigger holds is looked up now.
LOOK_NOW = -1.0


def is_due(at: float, when: Trigger | None, elapsed: float, state: BrokerState, held: float | None = LOOK_NOW) -> bool:
    """The one rule for phases and faults: the time has come AND the trigger holds; with ``for``, it has
    held for that long (``held``: seconds it has held without a break, None = it does not hold now)."""
    if held == LOOK_NOW:
        held = 0.0 if trigger_holds(when, state) else None
    if held is None or elapsed < at:
        return False
    return when is None or when.held_for is None or held >= when.held_for.resolve(state.window)


@dataclass(frozen=True)
class Item:
    """One scheduled thing: ``workload.N`` (a Phase) or ``faults.N`` (a Fault)."""

    part: str  # 'workload' or 'faults'
    index: int
    spec: Phase | Fault

    @property
    def label(self) -> str:
        return f"{self.part}.{self.index}"


@dataclass
class Schedule:
    """The phases and faults not yet due, in scenario order; ``due`` takes out those that are."""

    pending: list[Item]
    #: item label -> the elapsed time since which its trigger has held without a break (for ``for``)
    held_since: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, phases: list[Phase], faults: list[Fault]) -> "Schedule":
        return cls([Item("workload", i, p) for i, p in enumerate(phases)]
                   + [Item("faults", i, f) for i, f in enumerate(faults)])

    def due(self, elapsed: float, state: BrokerState) -> list[Item]:
        """The items due now (``is_due``), phases first, removed from the schedule."""
        now, later = [], []
        for item in self.pending:
            (now if is_due(item.spec.at, item.spec.when, elapsed, state, self._held(item, elapsed, state))
             else later).append(item)
        self.pending = later
        return now

    def _held(self, item: Item, elapsed: float, state: BrokerState) -> float | None:
        """How long the item's trigger has held without a break, or None when it does not hold now."""
        if not trigger_holds(item.spec.when, state):
            self.held_since.pop(item.label, None)
            return None
        return elapsed - self.held_since.setdefault(item.label, elapsed)

    def waiting(self, part: str) -> bool:
        """Some phase ('workload') or fault ('faults') is not due yet."""
        return any(item.part == part for item in self.pending)


def stage_matches(wanted: str, instance: str | None) -> bool:
    """``worker`` names every replica (``worker``, ``worker#2``, ...); ``worker#2`` only that one."""
    if instance is None:
        return False
    return instance == wanted or ("#" not in wanted and instance.split("#")[0] == wanted)


@dataclass
class HoldController:
    """Keeps ``queue`` at ``depth`` ready messages or more until ``until`` (harness clock, seconds).

    Each turn the runner passes the latest sample (its ready count and the sampler's counter);
    ``top_up`` answers how many messages to publish now. One top-up is in flight at a time, and
    the next waits for a sample taken after it was confirmed, so a top-up is never counted twice.
    From each fresh sample it learns how fast the queue is consumed (what was there, plus what it
    published since, minus what is left) and keeps ``REFILL_SECONDS`` of that rate queued above
    ``depth``; when a sample still shows the queue below ``depth`` the target doubles as well.
    Messages the engine was told to drop (``work_discarded``: an aborted scan's) leave the queue
    far faster than work is done; their going is neither consumption nor a shortfall.
    """

    queue: str
    depth: int
    until: float
    target: int = 0
    published: int = 0
    top_ups: int = 0
    shortfalls: int = 0  # fresh samples that found the queue below depth while holding
    rate: float = 0.0  # the fastest consumption seen between two samples (messages/s)
    stopped_early: str | None = None
    discarded: int = 0  # messages of aborted scans, not counted as consumption
    _to_discount: int = 0  # of those, how many may still be in the queue
    _in_flight: bool = False
    _fresh_after: int = -1  # sample counter that a fresh sample must exceed
    _seen_sample: int = -1
    _last: tuple[float, int, int] | None = None  # (when, ready, published) at the last sample used

    def __post_init__(self) -> None:
        self.target = self.target or min(MAX_TARGET, 2 * self.depth)

    @classmethod
    def for_hold(cls, hold: Hold, queue: str, start: float, window: float) -> "HoldController":
        return cls(queue, hold.depth_at_least, start + hold.resolve(window))

    def active(self, now: float) -> bool:
        return now < self.until and self.stopped_early is None

    def top_up(self, now: float, ready: int | None, sample_number: int) -> int:
        """How many messages to publish now (0: none). ``ready`` None = the queue is not there yet."""
        if not self.active(now) or self._in_flight:
            return 0
        fresh = sample_number > self._fresh_after
        if not fresh:
            return 0
        if ready is None and self.published:
            return 0  # the queue went (deleted, or its cluster node is down): no pouring work into nothing
        level = ready or 0
        if sample_number != self._seen_sample:
            discarding = self._to_discount > 0
            self._learn_rate(now, level)
            if self.published and level < self.depth and not discarding:
                self.shortfalls += 1
                self.target = min(MAX_TARGET, self.target * 2)
        self._seen_sample = sample_number
        if level >= self.target - self.depth // 2 and self.published:
            return 0
        count = max(self.target - level, 1)
        if self.published + count > MAX_TOTAL:
            self.stopped_early = f"published {self.published} messages, the most one hold may ({MAX_TOTAL})"
            return 0
        self._in_flight = True
        self.top_ups += 1
        return count

    def _learn_rate(self, now: float, level: int) -> None:
        if self._last is not None:
            when, before, published = self._last
            if now - when < RATE_SPAN:
                return
            consumed = before + (self.published - published) - level
            dropped = min(max(consumed, 0), self._to_discount)
            self._to_discount -= dropped
            consumed -= dropped
            if consumed > 0:
                self.rate = max(self.rate, consumed / (now - when))
                self.target = min(MAX_TARGET, max(self.target, self.depth + math.ceil(self.rate * REFILL_SECONDS)))
        self._last = (now, level, self.published)

    def work_discarded(self, count: int) -> None:
        """``count`` of the messages this hold published belong to a scan that was just aborted."""
        self.discarded += count
        self._to_discount += count

    def confirmed(self, count: int, sample_number: int) -> None:
        """The top-up's publish finished; the next decision waits for a sample after this one."""
        self.published += count
        self._fresh_after = sample_number
        self._in_flight = False

    def summary(self) -> dict:
        return {"queue": self.queue, "depth": self.depth, "published": self.published, "top_ups": self.top_ups,
                "shortfalls": self.shortfalls, "final_target": self.target, "rate": round(self.rate, 1),
                "discarded": self.discarded, "stopped_early": self.stopped_early}


@dataclass
class Happenings:
    """Names of the phases and faults that have happened, for ``when: {after: NAME}``."""

    names: set[str] = field(default_factory=set)

    def add(self, name: str | None) -> None:
        if name:
            self.names.add(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names


def backlog_size(rate: float, seconds: float, replicas: int = 1, floor: int = 10, ceiling: int = 50_000) -> int:
    """Objects for a backlog that lasts ``seconds`` at ``rate`` messages/s per instance."""
    return max(floor, min(ceiling, math.ceil(rate * replicas * seconds)))
