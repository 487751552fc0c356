"""Shared, precomputed views of a history for the checkers.

Everything here is built in one pass (or one sort) over the history, so the
checkers stay linear or n log n in its length:

- interval algebra on sorted, disjoint ``(start, end)`` lists;
- ``QueueLevels``: from the ``sample`` events, for every queue the runs where
  it was *observed* non-empty and the runs where it was *observed* empty
  (both conservative: a run spans first to last observation, so a gap in the
  sampling never invents a state), plus when the queue existed;
- ``StageView``: per stage instance its lives (start..exit), its consumer
  intervals with the reason each one ended, and the connection drops;
- ``Context``: all of the above, with the run's start, its teardown instant
  and a ``rel(t)`` helper for messages ("+12.3 s").
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from harness.checkers.model import Windows

Interval = tuple[float, float]

# The observer's timing, as recorded in run_started (``Slack.of``); these are the values of
# histories that do not record it (an observer sampling every 0.1 s).
# A queue observation older than this is not carried forward: a longer gap in
# the sampling breaks a run instead of bridging it (never invents a state).
MAX_SAMPLE_GAP = 2.0
# Two events this close are treated as simultaneous when one explains the other
# (a consumer.deleted emitted by the broker for a closed connection or a
# deleted queue can be stamped just before or after that event).
EXPLAIN_SLACK = 1.0
# A queue created this soon after a publish still counts as existing for it:
# the broker's queue.created and the tracer's publish are stamped on receipt
# by two different subscriptions.
CREATE_SLACK = 0.25
# A cancel up to this long after the last sample that saw the higher queue
# non-empty still counts as a switch (the queue emptied between two samples).
SWITCH_SLACK = 0.5
# Overlaps shorter than this are receipt-order noise, not an instant with two consumers.
OVERLAP_EPSILON = 0.1
# A fault (or any event whose effect can only show at the engine's next check) is judged only when
# the stage had work ready in its queues for this many windows W after it. The engine checks once
# per check period, so within one W it has made a check after the event; the second W lets what
# that check did (an exit, a stall, a wrong consumer) show while there is still work to show it on.
# With less, an engine that fails at its next check may have taken all the work before then.
DECISIVE_WINDOWS = 2

TEARDOWN_PHASE = re.compile(r"teardown|stopping|shutdown|stop_stages|stages_stop", re.I)

# Fault kinds, matched loosely so the fault injector may spell them its way.
def fault_family(kind: str | None) -> str | None:
    k = (kind or "").lower().replace("-", "_")
    if "poison" in k:
        return "poison"
    if "queue" in k and ("delete" in k or "gone" in k or "drop" in k):
        return "queue_gone"
    if "connection" in k or "reconnect" in k or "disconnect" in k or k in ("kill_node", "restart_node"):
        return "reconnect"
    return None


@dataclass(frozen=True)
class Slack:
    """The receipt-order slack the checkers allow, from the observer that recorded the history."""
    max_sample_gap: float = MAX_SAMPLE_GAP
    create: float = CREATE_SLACK
    switch: float = SWITCH_SLACK

    @classmethod
    def of(cls, history) -> "Slack":
        """From the history's run_started (its ``max_sample_gap``, ``create_slack``, ``switch_slack``);
        the defaults above for a field it lacks or that is not a non-negative number."""
        started = history.of("run_started")
        fields = started[0] if started else {}
        found = {}
        for name, key in (("max_sample_gap", "max_sample_gap"), ("create", "create_slack"),
                          ("switch", "switch_slack")):
            value = fields.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                found[name] = float(value)
        return cls(**found)


# ---------------------------------------------------------------- intervals

def merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if b < a:
            continue
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a = max(xs[i][0], ys[j][0])
        b = min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    j = 0
    for a, b in xs:
        cur = a
        while j < len(ys) and ys[j][1] <= cur:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > cur:
                out.append((cur, ys[k][0]))
            cur = max(cur, ys[k][1])
            if cur >= b:
                break
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def longer_than(xs: list[Interval], length: float) -> list[Interval]:
    return [(a, b) for a, b in xs if b - a > length]


def covers(xs: list[Interval], t: float) -> bool:
    i = bisect.bisect_right(xs, (t, float("inf"))) - 1
    return i >= 0 and xs[i][0] <= t < xs[i][1]


# ---------------------------------------------------------------- queues

@dataclass
class QueueLevels:
    pos: dict[str, list[Interval]] = field(default_factory=dict)   # observed ready > 0
    zero: dict[str, list[Interval]] = field(default_factory=dict)  # observed ready == 0 or queue missing
    observed: set[str] = field(default_factory=set)
    # existence change points per queue: sorted times and the state from then on
    exist_t: dict[str, list[float]] = field(default_factory=dict)   # from queue_created/queue_deleted
    exist_v: dict[str, list[bool]] = field(default_factory=dict)
    sample_t: dict[str, list[float]] = field(default_factory=dict)  # from sampled counts (null = missing)
    sample_v: dict[str, list[bool]] = field(default_factory=dict)
    create_slack: float = CREATE_SLACK

    def exists_at(self, queue: str, t: float) -> bool | None:
        """True/False when known, None when the history says nothing about the queue.
        A queue created up to ``create_slack`` after ``t`` counts as existing (receipt-order noise)."""
        return self.exists_within(queue, t, t + self.create_slack)

    def exists_within(self, queue: str, a: float, b: float) -> bool | None:
        """Did the queue exist at some instant of [a, b]? None when nothing is known about it.
        The broker's queue events and the sampler's counts are two witnesses; either one seeing the
        queue is enough (a sampler that has not yet re-probed a new queue still reports it missing)."""
        ev = _state_within(self.exist_t.get(queue), self.exist_v.get(queue), a, b)
        sm = _state_within(self.sample_t.get(queue), self.sample_v.get(queue), a, b)
        if ev or sm:
            return True
        if ev is None and sm is None:
            return None
        return False


def _state_within(times, vals, a: float, b: float) -> bool | None:
    if not times:
        return None
    i = bisect.bisect_right(times, a) - 1
    if i >= 0 and vals[i]:
        return True
    j = bisect.bisect_right(times, b)
    return any(vals[k] for k in range(i + 1, j))


def build_levels(history, end: float, slack: Slack | None = None) -> QueueLevels:
    slack = slack or Slack.of(history)
    lv = QueueLevels(create_slack=slack.create)
    # state per queue: (kind 'pos'|'zero', run_start, last_t)
    state: dict[str, list[Any]] = {}
    changes: list[tuple[float, int, str, bool]] = []  # (t, order, queue, exists)
    order = 0
    for ev in history.of("sample"):
        t = ev["t"]
        ready = ev.get("ready") or {}
        for q, n in ready.items():
            kind = "pos" if (n is not None and n > 0) else "zero"
            st = state.get(q)
            if st is None:
                state[q] = [kind, t, t, n is not None]
                lv.observed.add(q)
                changes.append((t, order, q, n is not None))
                order += 1
                continue
            if st[0] != kind or t - st[2] > slack.max_sample_gap:
                (lv.pos if st[0] == "pos" else lv.zero).setdefault(q, []).append((st[1], st[2]))
                st[0] = kind
                st[1] = t
            st[2] = t
            ex = n is not None
            if ex != st[3]:
                st[3] = ex
                changes.append((t, order, q, ex))
                order += 1
    for q, st in state.items():
        (lv.pos if st[0] == "pos" else lv.zero).setdefault(q, []).append((st[1], st[2]))
    _start_runs_at_publish(lv, history, slack.max_sample_gap)
    for q in list(lv.pos):
        lv.pos[q] = [iv for iv in lv.pos[q] if iv[1] > iv[0]]
    for q in list(lv.zero):
        lv.zero[q] = [iv for iv in lv.zero[q] if iv[1] > iv[0]]
    for t, _, q, ex in changes:  # samples come in time order
        lv.sample_t.setdefault(q, []).append(t)
        lv.sample_v.setdefault(q, []).append(ex)
    events = [(ev["t"], k, ev.get("queue"), True) for k, ev in enumerate(history.of("queue_created"))]
    events += [(ev["t"], k, ev.get("queue"), False) for k, ev in enumerate(history.of("queue_deleted"))]
    events.sort()
    for t, _, q, ex in events:
        lv.exist_t.setdefault(q, []).append(t)
        lv.exist_v.setdefault(q, []).append(ex)
    return lv


def _start_runs_at_publish(lv: QueueLevels, history, max_sample_gap: float) -> None:
    """A queue holds work from the publish that filled it, not from the next sample (up to 100 ms
    later): a run of ready messages starts at the first publish into the queue after its last
    empty sample. Without this, a stage that reacts within one sample interval cancels "before"
    the work it reacts to, and its switch is not counted. Publishes stamped after the sample
    (a late firehose) leave the run as sampled, and so do publishes more than max_sample_gap
    before it: across a gap in the samples the queue may have emptied and filled again unseen."""
    published: dict[str, list[float]] = {}
    for ev in history.of("publish"):
        if ev.get("exchange", "") == "" and ev.get("routing_key") in lv.pos:
            published.setdefault(ev["routing_key"], []).append(ev["t"])
    for q, times in published.items():
        times.sort()
        zero_ends = sorted(b for _, b in lv.zero.get(q, []))
        runs = []
        previous_end = float("-inf")
        for a, b in sorted(lv.pos[q]):
            i = bisect.bisect_left(zero_ends, a) - 1
            last_empty = max(zero_ends[i] if i >= 0 else float("-inf"), previous_end)
            previous_end = b
            j = bisect.bisect_right(times, max(last_empty, a - max_sample_gap))
            if j < len(times) and times[j] < a:
                a = times[j]
            runs.append((a, b))
        lv.pos[q] = runs


# ---------------------------------------------------------------- stages

@dataclass
class Consumer:
    stage: str
    queue: str
    start: float
    end: float
    reason: str  # 'cancel' (stage's own), 'exit', 'conn_closed', 'queue_deleted', 'teardown', 'open'
    tag: str | None = None
    chan: str | None = None


@dataclass
class StageView:
    name: str
    kind: str | None
    role: str | None
    priority: list[str]
    lives: list[Interval] = field(default_factory=list)      # [start, exit or run end)
    exits: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)          # connection_closed / channel_closed times
    # Spans where a fault froze the stage on purpose (pause_stage .. resume_stage + W): the stage
    # cannot react then, so the QP clauses do not judge it.
    excused: list[Interval] = field(default_factory=list)
    # Consumers on its queues that the observer could not attribute to any stage: its own consumer
    # lifecycle is then incomplete, so the consumer-based QP clauses do not judge it.
    unattributed: int = 0

    @property
    def reads(self) -> list[str]:
        """The queues the stage consumes by configuration: its QUEUE_PRIORITY, else the read queues
        its starts reported (the default queue of a stage without one)."""
        if self.priority:
            return list(self.priority)
        return list(dict.fromkeys(q for st in self.starts for q in (st.get("read_queues") or [])))

    def on(self, queue: str) -> list[Interval]:
        return merge((c.start, c.end) for c in self.consumers if c.queue == queue)

    def on_any(self, queues: Iterable[str]) -> list[Interval]:
        qs = set(queues)
        return merge((c.start, c.end) for c in self.consumers if c.queue in qs)

    def segments(self, until: float) -> list[Interval]:
        """Consuming segments: from the first consumer on a priority queue after each (re)start or
        connection drop, to the next drop, the exit, or ``until`` (teardown)."""
        cuts = sorted(self.drops)
        pq = set(self.priority)
        starts = sorted(c.start for c in self.consumers if c.queue in pq)
        out: list[Interval] = []
        for a, b in self.lives:
            b = min(b, until)
            bounds = [a] + [d for d in cuts if a < d < b] + [b]
            for s, e in zip(bounds, bounds[1:]):
                i = bisect.bisect_left(starts, s)
                if i < len(starts) and starts[i] < e:
                    out.append((starts[i], e))
        return out


@dataclass
class Context:
    history: Any
    scenario: Any
    windows: Windows
    start: float
    end: float
    teardown: float
    levels: QueueLevels
    stages: dict[str, StageView]
    slack: Slack = Slack()

    def rel(self, t: float | None) -> str:
        if t is None:
            return "?"
        return f"+{t - self.start:.1f} s"

    def span(self, a: float, b: float) -> str:
        return f"+{a - self.start:.1f}..+{b - self.start:.1f} s"

    def work_after(self, queues: Iterable[str], t: float) -> float:
        """Seconds from ``t`` to teardown (or the end of the history) during which at least one of
        ``queues`` was observed with ready messages (the sampled runs of ``levels.pos``)."""
        until = min(self.teardown, self.end)
        if until <= t:
            return 0.0
        work = intersect(merge(iv for q in set(queues) for iv in self.levels.pos.get(q, ())), [(t, until)])
        return sum(b - a for a, b in work)

    @property
    def decisive(self) -> float:
        """The work a stage needs after a fault for the fault to be judged: DECISIVE_WINDOWS × W."""
        return DECISIVE_WINDOWS * self.windows.W

    @property
    def qp_stages(self) -> list[StageView]:
        """Stages with QUEUE_PRIORITY whose consumers are all attributed (the ones QP can judge)."""
        return [s for s in self.stages.values() if s.priority and not s.unattributed]

    @property
    def qp_stages_all(self) -> list[StageView]:
        return [s for s in self.stages.values() if s.priority]

    @property
    def unjudged(self) -> list[str]:
        return [s.name for s in self.stages.values() if s.priority and s.unattributed]


def build_context(history, scenario, windows: Windows) -> Context:
    cached = getattr(history, "_qp_context", None)
    if cached is not None and cached[0] == windows and cached[1] is scenario:
        return cached[2]
    started = history.of("run_started")
    start = started[0]["t"] if started else history.start
    end = history.end
    teardown = end
    for ev in history.of("phase"):
        if TEARDOWN_PHASE.search(str(ev.get("name", ""))):
            teardown = min(teardown, ev["t"])
            break
    for ev in history.of("run_finished"):
        teardown = min(teardown, ev["t"])
    slack = Slack.of(history)
    levels = build_levels(history, end, slack)
    stages = _build_stages(history, end, teardown, windows)
    ctx = Context(history, scenario, windows, start, end, teardown, levels, stages, slack)
    try:
        history._qp_context = (windows, scenario, ctx)
    except AttributeError:
        pass
    return ctx


def _build_stages(history, end: float, teardown: float, windows: Windows) -> dict[str, StageView]:
    stages = _stage_lives(history, end)
    fold = _ConsumerFold(end)
    for ev in history.of(*_ConsumerFold.EVENTS):
        getattr(fold, "on_" + ev["type"])(ev)
    fold.finish()
    exits_by_stage: dict[str, list[float]] = {}
    for sv in stages.values():
        exits_by_stage[sv.name] = [e["t"] for e in sv.exits]
    _explain_cancels(fold, exits_by_stage, teardown, windows)
    for c in fold.closed:
        sv = stages.get(c.stage)
        if sv is not None:
            sv.consumers.append(c)
    for name, ds in fold.drops_by_stage.items():
        if name in stages:
            stages[name].drops = sorted(ds)
    for sv in stages.values():
        sv.consumers.sort(key=lambda c: (c.start, c.end))
    _excuse_pauses(history, stages, end, windows)
    for sv in stages.values():
        pq = set(sv.priority)
        sv.unattributed = sum(1 for t, q in fold.unattributed if q in pq and any(a <= t <= b for a, b in sv.lives))
    return stages


def _stage_lives(history, end: float) -> dict[str, StageView]:
    """A view per stage instance with its starts, exits and lives (start to next exit)."""
    stages: dict[str, StageView] = {}
    for ev in history.of("stage_started"):
        name = ev.get("stage")
        sv = stages.get(name)
        if sv is None:
            sv = stages[name] = StageView(name, ev.get("kind"), ev.get("role"),
                                          list(dict.fromkeys(ev.get("queue_priority") or [])))
        sv.starts.append(ev)
    for ev in history.of("stage_exited"):
        if ev.get("stage") in stages:
            stages[ev["stage"]].exits.append(ev)
    for sv in stages.values():
        exits = sorted(e["t"] for e in sv.exits)
        for st in sv.starts:
            i = bisect.bisect_left(exits, st["t"])
            sv.lives.append((st["t"], exits[i] if i < len(exits) else end))
    return stages


class _ConsumerFold:
    """Every consumer's life, folded from the broker's events: one handler per event type."""

    EVENTS = ("consumer_created", "consumer_deleted", "channel_created", "channel_closed",
              "connection_closed", "queue_deleted", "stage_exited")

    def __init__(self, end: float):
        self.end = end
        self.chan_conn: dict[Any, Any] = {}
        self.open: dict[tuple, Consumer] = {}  # (chan, tag, stage, queue) -> consumer
        self.by_stage_open: dict[str, set] = {}
        self.drops_by_stage: dict[str, list[float]] = {}
        self.qdel: dict[str, list[float]] = {}
        self.closed: list[Consumer] = []
        self.unattributed: list[tuple[float, str]] = []

    def close(self, key, t, reason) -> None:
        c = self.open.pop(key)
        self.by_stage_open.get(c.stage, set()).discard(key)
        c.end, c.reason = t, reason
        self.closed.append(c)

    def finish(self) -> None:
        for k in list(self.open):
            self.close(k, self.end, "open")

    def on_consumer_created(self, ev: dict) -> None:
        stage, t = ev.get("stage"), ev["t"]
        if stage is None:
            self.unattributed.append((t, ev.get("queue")))
            return
        if stage == "harness":
            return
        key = (ev.get("chan"), ev.get("tag"), stage, ev.get("queue"))
        if key in self.open:
            self.close(key, t, "cancel")
        self.open[key] = Consumer(stage, ev.get("queue"), t, self.end, "open", ev.get("tag"), ev.get("chan"))
        self.by_stage_open.setdefault(stage, set()).add(key)

    def on_consumer_deleted(self, ev: dict) -> None:
        stage = ev.get("stage")
        key = (ev.get("chan"), ev.get("tag"), stage, ev.get("queue"))
        if key not in self.open:
            # the observer may not know the owner at deletion time: match by tag
            key = next((k for k in self.by_stage_open.get(stage, ()) if k[1] == ev.get("tag")), None) if stage else None
            if key is None:
                key = next((k for k in self.open if k[1] == ev.get("tag") and k[3] == ev.get("queue")), None)
            if key is None:
                return
        self.close(key, ev["t"], "cancel")

    def on_channel_created(self, ev: dict) -> None:
        self.chan_conn[ev.get("chan")] = ev.get("conn")

    def on_channel_closed(self, ev: dict) -> None:
        stage = ev.get("stage")
        keys = [k for k in self.open if k[0] == ev.get("chan") and ev.get("chan") is not None]
        for k in keys:
            self.close(k, ev["t"], "conn_closed")
        if stage and keys:  # closing a channel without consumers (e.g. a publishing one) drops nothing
            self.drops_by_stage.setdefault(stage, []).append(ev["t"])

    def on_connection_closed(self, ev: dict) -> None:
        stage, conn = ev.get("stage"), ev.get("conn")
        keys = [k for k in self.open if k[0] is not None and self.chan_conn.get(k[0]) == conn and conn is not None]
        if not keys and stage:
            keys = [k for k in list(self.by_stage_open.get(stage, ()))
                    if k[0] not in self.chan_conn or self.chan_conn.get(k[0]) == conn]
        for k in keys:
            self.close(k, ev["t"], "conn_closed")
        if stage:
            self.drops_by_stage.setdefault(stage, []).append(ev["t"])

    def on_queue_deleted(self, ev: dict) -> None:
        q = ev.get("queue")
        self.qdel.setdefault(q, []).append(ev["t"])
        for k in [k for k in self.open if k[3] == q]:
            self.close(k, ev["t"], "queue_deleted")

    def on_stage_exited(self, ev: dict) -> None:
        for k in list(self.by_stage_open.get(ev.get("stage"), ())):
            self.close(k, ev["t"], "exit")


def _explain_cancels(fold: _ConsumerFold, exits_by_stage: dict[str, list[float]], teardown: float,
                     windows: Windows) -> None:
    """A broker-side consumer.deleted stamped next to the event that caused it is not a cancel."""
    for c in fold.closed:
        if c.reason != "cancel":
            continue
        t = c.end
        if t >= teardown:
            c.reason = "teardown"
        elif _near(fold.qdel.get(c.queue, ()), t - EXPLAIN_SLACK, t + EXPLAIN_SLACK):
            c.reason = "queue_deleted"
        elif _near(fold.drops_by_stage.get(c.stage, ()), t - EXPLAIN_SLACK, t + EXPLAIN_SLACK):
            c.reason = "conn_closed"
        elif _near(exits_by_stage.get(c.stage, ()), t - EXPLAIN_SLACK, t + windows.W):
            c.reason = "exit"


def _excuse_pauses(history, stages: dict[str, StageView], end: float, windows: Windows) -> None:
    """A paused stage is excused from its pause until W after it was resumed."""
    paused: dict[str, float] = {}
    for ev in history.of("fault"):
        kind, target = str(ev.get("kind", "")), ev.get("target")
        if target not in stages:
            continue
        if kind == "pause_stage":
            paused.setdefault(target, ev["t"])
        elif kind == "resume_stage" and target in paused:
            stages[target].excused.append((paused.pop(target), ev["t"] + windows.W))
    for target, t in paused.items():
        stages[target].excused.append((t, end))
    for sv in stages.values():
        sv.excused = merge(sv.excused)


def _near(times, a: float, b: float) -> bool:
    if not times:
        return False
    times = sorted(times) if not isinstance(times, list) else times
    i = bisect.bisect_left(times, a)
    return i < len(times) and times[i] <= b


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
