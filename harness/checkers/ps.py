"""PS-*: per-scan queues (OS2datascanner 3.32), judged from the admin's events and the workers' consumers.

Inputs: the harness's own admin events (``ps_announce``, ``ps_delete``, ``hello``), the stages'
consumer lifecycles (``_common.StageView``), the sampled ready counts (``_common.QueueLevels``) and the
windows W and G. A per-scan queue is **live** from an announcement at which it exists until its
``ps_delete`` (or the broker's ``queue_deleted``); its **work** is where it was observed non-empty while
live. A worker's tags are its ``stage_started.conversion_priority``; an empty list allows every tag and
sets no per-scan priority.

An engine that never consumed any announced per-scan queue and never sent a worker_hello (one that
predates them, 3.26) leaves every PS clause not exercised: there is nothing to judge, and nothing it
did is wrong by these rules. A hello alone is enough to judge: a worker caught in a reconnect storm
from its first hello may never hold a per-scan consumer.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from harness.checkers._common import (
    CREATE_SLACK, DECISIVE_WINDOWS, EXPLAIN_SLACK, Context, Interval, covers, intersect, longer_than, merge, subtract,
)
from harness.checkers.ft import FAULT_EFFECT_WINDOW, _exit_between, _first_silence
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause

# PS-HELLO's storm limit (SPEC.md): no more than this many hellos from one worker in any window of
# HELLO_STORM_SECONDS. The real bug measured about four reconnects a second.
HELLO_STORM_LIMIT = 3
HELLO_STORM_SECONDS = 60.0
# A queue_created this long after the harness's own announcement of a new scan's queue is the harness's
# declare (it declares, then announces: both are stamped on receipt by different subscriptions).
HARNESS_DECLARE_SLACK = 5.0
# Faults after which a worker legitimately reconnects (and says hello again): not a storm.
RECONNECTING_FAULTS = ("close_connection", "kill_stage", "restart_broker", "pause_stage")

NOT_CONSUMED = "the engine never consumed an announced per-scan queue"
NOT_ANNOUNCED = "no per-scan queue was announced"


@dataclass
class PerScanQueue:
    name: str
    tag: str
    live: list[Interval] = field(default_factory=list)
    work: list[Interval] = field(default_factory=list)  # observed non-empty while live
    announces: list[dict] = field(default_factory=list)  # ps_announce events, in time order
    deletes: list[dict] = field(default_factory=list)   # ps_delete events


@dataclass
class PerScan:
    """The per-scan view of a run, built once per Context."""

    queues: dict[str, PerScanQueue]
    engaged: bool                      # some stage consumed an announced queue, or a worker said hello
    unattributed: dict[str, list[Interval]]  # per-scan queue -> consumers the observer could not attribute
    owner: dict[str, str]              # command queue -> the stage consuming it
    connected: dict[str, list[Interval]]  # stage -> from its first consumer after a (re)start/drop to the next drop
    running: dict[str, list[Interval]]    # stage -> from its first consumer to its exit, less reconnects (<= G)

    def by_tags(self, tags) -> list[PerScanQueue]:
        return [q for q in self.queues.values() if q.tag in tags]

    def work_of(self, queues) -> list[Interval]:
        return merge(iv for q in queues for iv in q.work)


def per_scan(ctx: Context) -> PerScan:
    cached = ctx.__dict__.get("_per_scan")
    if cached is None:
        cached = ctx.__dict__["_per_scan"] = _build(ctx)
    return cached


def _build(ctx: Context) -> PerScan:
    h = ctx.history
    queues: dict[str, PerScanQueue] = {}
    for ev in h.of("ps_announce"):
        if not ev.get("queue"):
            continue
        q = queues.setdefault(ev["queue"], PerScanQueue(ev["queue"], ev.get("tag") or ""))
        q.tag = ev.get("tag") or q.tag
        q.announces.append(ev)
    for ev in h.of("ps_delete"):
        if ev.get("queue") in queues:
            queues[ev["queue"]].deletes.append(ev)
    for q in queues.values():
        q.live = _live(ctx, q)
        q.work = intersect(ctx.levels.pos.get(q.name, []), q.live)
    consumed = any(c.queue in queues for sv in ctx.stages.values() for c in sv.consumers)
    unattributed = _unattributed(ctx, queues)
    # A worker caught in a reconnect storm from its first hello may never hold a per-scan consumer; its
    # hellos still show an engine that knows per-scan queues (a 3.26 engine sends none).
    engaged = consumed or bool(unattributed) or bool(h.of("hello"))
    owner = {c.queue: sv.name for sv in ctx.stages.values() for c in sv.consumers
             if str(c.queue).startswith("amq.gen-")}
    connected = {sv.name: _connected(sv, ctx.teardown) for sv in ctx.stages.values()}
    running = {sv.name: _running(sv, ctx.teardown, ctx.windows.G) for sv in ctx.stages.values()}
    return PerScan(queues, engaged, unattributed, owner, connected, running)


def _unattributed(ctx: Context, queues) -> dict[str, list[Interval]]:
    """Per per-scan queue, the spans of consumers the observer could not tie to a stage: from their
    consumer_created to the consumer_deleted with their tag, or the queue's deletion."""
    spans: dict[str, list[Interval]] = {}
    open_: dict[tuple, float] = {}
    for ev in ctx.history.of("consumer_created", "consumer_deleted", "queue_deleted"):
        q = ev.get("queue")
        if q not in queues:
            continue
        if ev["type"] == "consumer_created" and ev.get("stage") is None:
            open_[(q, ev.get("tag"))] = ev["t"]
        elif ev["type"] == "consumer_deleted" and (q, ev.get("tag")) in open_:
            spans.setdefault(q, []).append((open_.pop((q, ev.get("tag"))), ev["t"]))
        elif ev["type"] == "queue_deleted":
            for key in [k for k in open_ if k[0] == q]:
                spans.setdefault(q, []).append((open_.pop(key), ev["t"]))
    for (q, _), t in open_.items():
        spans.setdefault(q, []).append((t, ctx.end))
    return {q: merge(ivs) for q, ivs in spans.items()}


def _live(ctx: Context, q: PerScanQueue) -> list[Interval]:
    """From an announcement at which the queue exists (a scan_start one: always) to its deletion. After a
    ps_delete, only the announcement of a new scan opens it again (a fault may announce a queue that is gone)."""
    ends = sorted([e["t"] for e in q.deletes] +
                  [e["t"] for e in ctx.history.of("queue_deleted") if e.get("queue") == q.name])
    out: list[Interval] = []
    open_until = float("-inf")
    deleted = False
    for ev in q.announces:
        t = ev["t"]
        if t < open_until:
            continue
        deleted = deleted or any(e["t"] <= t for e in q.deletes)
        if deleted and ev.get("reason") != "scan_start":
            continue
        # the admin declared a new scan's queue just before announcing it (the broker's queue.created may
        # be stamped later); any other announcement opens the queue only if it exists
        if ev.get("reason") != "scan_start" and ctx.levels.exists_within(q.name, t - EXPLAIN_SLACK, t + EXPLAIN_SLACK) is False:
            continue
        i = bisect.bisect_right(ends, t)
        open_until = ends[i] if i < len(ends) else ctx.end
        out.append((t, open_until))
        deleted = False
    return merge(out)


def _connected(sv, until: float) -> list[Interval]:
    """From the stage's first consumer (any queue, its command queue included) after each start or
    connection drop, to the next drop, its exit or ``until``: when it can receive commands."""
    starts = sorted(c.start for c in sv.consumers)
    out: list[Interval] = []
    for a, b in sv.lives:
        b = min(b, until)
        bounds = [a] + [d for d in sv.drops if a < d < b] + [b]
        for s, e in zip(bounds, bounds[1:]):
            i = bisect.bisect_left(starts, s)
            if i < len(starts) and starts[i] < e:
                out.append((starts[i], e))
    return out


def _running(sv, until: float, grace: float) -> list[Interval]:
    """From the stage's first consumer after each start to its exit or ``until``, less the time it took
    to consume again after each connection drop, up to G (a reconnect in progress). A stage that does not
    consume again within G of a drop is running again from then on: wedged, not reconnecting."""
    starts = sorted(c.start for c in sv.consumers)
    out: list[Interval] = []
    for a, b in sv.lives:
        i = bisect.bisect_left(starts, a)
        if i < len(starts) and starts[i] < min(b, until):
            out.append((starts[i], min(b, until)))
    gaps = []
    for d in sv.drops:
        j = bisect.bisect_right(starts, d)
        gaps.append((d, min(starts[j] if j < len(starts) else float("inf"), d + grace)))
    return subtract(merge(out), merge(gaps))


# ------------------------------------------------------------------ shared helpers

def _tags(sv) -> list[str]:
    """The worker's CONVERSION_PRIORITY (duplicates dropped), [] = no filter."""
    return list(dict.fromkeys(sv.starts[0].get("conversion_priority") or [])) if sv.starts else []


def _allowed(sv, tag: str) -> bool:
    tags = _tags(sv)
    return not tags or tag in tags


def _higher(sv, tag: str) -> list[str]:
    tags = _tags(sv)
    return tags[:tags.index(tag)] if tag in tags else []


def _workers(ctx: Context):
    return [sv for sv in ctx.stages.values() if sv.kind == "worker"]


def _gate(ctx: Context, clause_id: str) -> ClauseResult | None:
    ps = per_scan(ctx)
    if not ps.queues:
        return ClauseResult(clause_id, "not_exercised", NOT_ANNOUNCED)
    if not ps.engaged:
        return ClauseResult(clause_id, "not_exercised", NOT_CONSUMED)
    return None


def _result(clause_id: str, findings: list[Finding], judged: int, text: str, missing: str) -> ClauseResult:
    """Failed with any finding; passed when something was judged; else not exercised, saying what was missing."""
    if findings:
        return ClauseResult(clause_id, "failed", text, findings)
    if judged:
        return ClauseResult(clause_id, "passed", text)
    return ClauseResult(clause_id, "not_exercised", f"{text}: {missing}")


def _length(xs: list[Interval]) -> float:
    return sum(b - a for a, b in xs)


def _tag_list(sv) -> str:
    tags = _tags(sv)
    return f"CONVERSION_PRIORITY {' '.join(tags)}" if tags else "no CONVERSION_PRIORITY"


def _holds(sv, queue: str, a: float, b: float) -> bool:
    return any(c.queue == queue and c.start < b and c.end > a for c in sv.consumers)


def _deliveries(ctx: Context) -> dict[tuple[str, str], list[float]]:
    """(stage, queue) -> delivery times, and (stage, '*') -> all of the stage's delivery times."""
    cached = ctx.__dict__.get("_ps_deliveries")
    if cached is None:
        cached = {}
        for e in ctx.history.of("deliver"):
            cached.setdefault((e.get("stage"), e.get("queue")), []).append(e["t"])
            cached.setdefault((e.get("stage"), "*"), []).append(e["t"])
        ctx.__dict__["_ps_deliveries"] = cached
    return cached


def _serving_higher(ctx: Context, sv, tag: str, a: float, b: float) -> list[str]:
    """The higher-tag queues the worker was serving in [a, b]: it held a consumer on one while it had
    ready messages, or received deliveries from one in [a - W, b] (the engine chooses by the deliveries
    of its last window, which a trickle the sampler never sees non-empty still produces).
    PS-PRECEDENCE lets it wait on ``tag`` then."""
    W = ctx.windows.W
    deliv = _deliveries(ctx)
    out = []
    for q in per_scan(ctx).by_tags(_higher(sv, tag)):
        times = deliv.get((sv.name, q.name), [])
        i = bisect.bisect_left(times, a - W)
        delivered = i < len(times) and times[i] <= b
        if delivered or (intersect(q.work, [(a, b)]) and _holds(sv, q.name, a, b)):
            out.append(q.name)
    return out


def _max_ready(ctx: Context, queues, a: float, b: float) -> tuple[str | None, int]:
    """The queue of ``queues`` with the largest sampled ready count in [a, b], and that count."""
    samples = ctx.history.of("sample")
    times = ctx.__dict__.setdefault("_ps_sample_t", [e["t"] for e in samples])
    best: tuple[str | None, int] = (None, 0)
    for e in samples[bisect.bisect_left(times, a):bisect.bisect_right(times, b)]:
        for q in queues:
            n = (e.get("ready") or {}).get(q) or 0
            if n > best[1]:
                best = (q, n)
    return best


def _queues(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names)


# ------------------------------------------------------------------ PS-FILTER

@clause("PS-FILTER", "no stage consumes a per-scan queue that is not allowed for it")
def check_filter(ctx: Context) -> ClauseResult:
    """Rule: a consumer of a worker on an announced per-scan queue whose tag its CONVERSION_PRIORITY
    does not list (a non-empty list), or of an explorer on any announced per-scan queue, is a violation,
    however short. Exercised = (stage, queue) pairs where the queue was not allowed for the stage and
    held work (observed ready > 0 while live) for at least W in all while the stage was connected
    (from its first consumer after a start or reconnect to the next drop): long enough for an engine
    that subscribes wrongly at its next check to show it."""
    if (gated := _gate(ctx, "PS-FILTER")) is not None:
        return gated
    W = ctx.windows.W
    ps = per_scan(ctx)
    findings: list[Finding] = []
    judged = {"worker": 0, "explorer": 0}
    for sv in ctx.stages.values():
        if sv.kind not in judged:
            continue
        for q in ps.queues.values():
            if sv.kind == "worker" and _allowed(sv, q.tag):
                continue
            exposure = _length(intersect(subtract(ps.connected[sv.name], sv.excused), q.work))
            judged[sv.kind] += exposure >= W
            cons = [c for c in sv.consumers if c.queue == q.name and c.start < ctx.teardown]
            if not cons:
                continue
            c = cons[0]
            why = "an explorer never consumes a per-scan queue" if sv.kind == "explorer" else \
                f"tag {q.tag} is not allowed by its {_tag_list(sv)}"
            more = f" ({len(cons)} consumers in all)" if len(cons) > 1 else ""
            findings.append(Finding(
                "PS-FILTER",
                f"{sv.name} consumed per-scan queue {q.name} (tag {q.tag}) from {ctx.rel(c.start)} to "
                f"{ctx.rel(min(c.end, ctx.end))}{more}: {why}.",
                sv.name, [q.name], c.start, min(c.end, ctx.end), _consumer_evidence(sv, q.name)))
    text = (f"{judged['worker']} (worker, forbidden queue) and {judged['explorer']} (explorer, per-scan queue) "
            f"pairs judged")
    return _result("PS-FILTER", findings, sum(judged.values()), text,
                   f"no stage was connected for W = {W:g} s while a per-scan queue it must not consume held work")


def _consumer_evidence(sv, queue: str, limit: int = 3) -> list[dict]:
    return [{"type": "consumer", "stage": sv.name, "queue": c.queue, "start": c.start, "end": c.end,
             "end_reason": c.reason} for c in sv.consumers if c.queue == queue][:limit]


# ------------------------------------------------------------------ PS-SUBSCRIBE

@clause("PS-SUBSCRIBE", "every allowed worker subscribes within W of an announcement")
def check_subscribe(ctx: Context) -> ClauseResult:
    """Rule, per broadcast announcement (scan_start, rebroadcast or fault; hello replies are PS-HELLO's)
    of a queue q with tag t at time a: every worker for which t is allowed and which was connected
    throughout [a, a + W] holds a consumer on q at some instant of [a, a + W]. Not judged: q not live at
    a, or deleted before a + W; a + W after teardown; the worker paused by a fault then; q with
    consumers the observer could not attribute. A worker serving a higher tag of its CONVERSION_PRIORITY
    (a consumer on a higher-tag queue that had ready messages in the window, or deliveries from one in
    [a - W, a + W]) may wait: counted apart, not judged. One finding per (worker, queue), with the later
    announcements it missed too."""
    if (gated := _gate(ctx, "PS-SUBSCRIBE")) is not None:
        return gated
    W = ctx.windows.W
    ps = per_scan(ctx)
    missed: dict[tuple[str, str], list[dict]] = {}
    judged = waited = 0
    for ev in ctx.history.of("ps_announce"):
        q, a = ps.queues.get(ev.get("queue")), ev["t"]
        if ev.get("to") != "broadcast" or q is None or a + W > ctx.teardown or q.name in ps.unattributed:
            continue
        if not covers(q.live, a) or not covers(q.live, a + W):
            continue
        for sv in _workers(ctx):
            if not _allowed(sv, q.tag) or not _connected_through(ps, sv, a, a + W) or \
                    intersect(sv.excused, [(a, a + W)]):
                continue
            if _holds(sv, q.name, a, a + W):
                judged += 1
            elif _serving_higher(ctx, sv, q.tag, a, a + W):
                waited += 1
            else:
                judged += 1
                missed.setdefault((sv.name, q.name), []).append(ev)
    findings = []
    for (name, qname), evs in missed.items():
        sv, q, first = ctx.stages[name], ps.queues[qname], evs[0]
        more = f"; it missed {len(evs) - 1} later announcement(s) of it too" if len(evs) > 1 else ""
        findings.append(Finding(
            "PS-SUBSCRIBE",
            f"{name} held no consumer on {qname} (tag {q.tag}, allowed by its {_tag_list(sv)}) within "
            f"W = {W:g} s of its announcement at {ctx.rel(first['t'])} ({first.get('reason')}){more}.",
            name, [qname], first["t"], first["t"] + W, evs[:3]))
    text = f"{judged} (announcement, worker) pairs judged" + (f", {waited} waited on a higher tag" if waited else "")
    return _result("PS-SUBSCRIBE", findings, judged, text,
                   "no broadcast announcement of a live queue was followed by W in which a worker allowing its "
                   "tag stayed connected")


def _connected_through(ps: PerScan, sv, a: float, b: float) -> bool:
    return any(x <= a and b <= y for x, y in ps.connected[sv.name])


# ------------------------------------------------------------------ PS-PRECEDENCE

@clause("PS-PRECEDENCE", "no lower-tag queue consumed for W while a higher tag has ready messages")
def check_precedence(ctx: Context) -> ClauseResult:
    """Rule, per worker with CONVERSION_PRIORITY t0 t1 … and each tag ti (i ≥ 1): H = where some live
    queue of a higher tag t0..t(i-1) that the worker knew of (as in PS-PROGRESS) was observed non-empty; C = where the worker held a consumer on a
    queue of tag ti. An interval of H ∩ C longer than W (outside pauses by a fault, before teardown) is a
    violation. Exercised = intervals of H longer than W while the worker was connected in which a
    ti queue had work or was consumed."""
    if (gated := _gate(ctx, "PS-PRECEDENCE")) is not None:
        return gated
    W = ctx.windows.W
    ps = per_scan(ctx)
    findings: list[Finding] = []
    judged = 0
    ranked = [sv for sv in _workers(ctx) if len(_tags(sv)) > 1]
    for sv in ranked:
        tags = _tags(sv)
        active = subtract(ps.connected[sv.name], sv.excused)
        for i in range(1, len(tags)):
            higher, lower = ps.by_tags(tags[:i]), ps.by_tags([tags[i]])
            H = merge(iv for q in higher for iv in intersect(q.work, _informed(ctx, sv, q.name)))
            C = [(a, min(b, ctx.teardown)) for a, b in sv.on_any(q.name for q in lower) if a < ctx.teardown]
            cands = longer_than(intersect(H, active), W)
            judged += sum(1 for c in cands if intersect([c], merge(C + ps.work_of(lower))))
            for a, b in longer_than(subtract(intersect(H, C), sv.excused), W):
                low = [q.name for q in lower if _holds(sv, q.name, a, b)]
                high = [q.name for q in higher if covers(q.work, (a + b) / 2)] or \
                       [q.name for q in higher if intersect(q.work, [(a, b)])]
                findings.append(Finding(
                    "PS-PRECEDENCE",
                    f"{sv.name} kept consuming {_queues(low)} (tag {tags[i]}) for {b - a:.1f} s ({ctx.span(a, b)}) "
                    f"while {_queues(high)} (tag {', '.join(sorted({ps.queues[n].tag for n in high}))}, higher in "
                    f"its {_tag_list(sv)}) had ready messages throughout (W = {W:g} s).",
                    sv.name, low + high, a + W, b, [e for n in low for e in _consumer_evidence(sv, n, 2)]))
    missing = ("no worker has two or more tags in its CONVERSION_PRIORITY" if not ranked else
               f"no live queue of a higher tag held ready messages for W = {W:g} s while a worker with a "
               f"lower-tag queue to consume was connected")
    return _result("PS-PRECEDENCE", findings, judged, f"{judged} windows of higher-tag work judged", missing)


# ------------------------------------------------------------------ PS-PROGRESS

@clause("PS-PROGRESS", "allowed per-scan work is not left waiting for W")
def check_progress(ctx: Context) -> ClauseResult:
    """Rule, per live per-scan queue q with tag t: P = where q was observed non-empty while live, before
    teardown; F = where some worker allowing t was running (from its first consumer to its exit, less up to
    G after each connection drop while it reconnects: a worker wedged on a closed channel stays running),
    knew of q (an announcement of q, broadcast or a hello reply to it, reached its current connection),
    was not paused by a fault, and had nothing better to do: no live queue of a tag higher than t in its
    CONVERSION_PRIORITY was observed non-empty, nor delivered to it within W before (the engine chooses
    by the deliveries of its last window; a trickle the sampler never sees non-empty still counts).
    Within the intervals of P ∩ F longer than W, a stretch longer than W in which no such free worker
    held a consumer on q (consumers the observer could not attribute count as held; a delivery from q
    splits the stretch) is a violation. Exercised = intervals of P ∩ F longer than W."""
    if (gated := _gate(ctx, "PS-PROGRESS")) is not None:
        return gated
    W = ctx.windows.W
    ps = per_scan(ctx)
    findings: list[Finding] = []
    judged = 0
    delivered: dict[str, list[float]] = {}
    for e in ctx.history.of("deliver"):
        delivered.setdefault(e.get("queue"), []).append(e["t"])
    for q in ps.queues.values():
        free = {sv.name: _free(ctx, ps, sv, q) for sv in _workers(ctx) if _allowed(sv, q.tag)}
        P = intersect(q.work, [(ctx.start, ctx.teardown)])
        owed = longer_than(intersect(P, merge(iv for ivs in free.values() for iv in ivs)), W)
        judged += len(owed)
        if not owed:
            continue
        served = merge([iv for name, ivs in free.items() for iv in intersect(ctx.stages[name].on(q.name), ivs)]
                       + ps.unattributed.get(q.name, []))
        idle = subtract(subtract(owed, served), [(t, t) for t in delivered.get(q.name, [])])
        for a, b in longer_than(idle, W):
            who = [name for name, ivs in free.items() if intersect(ivs, [(a, b)])]
            doing = "; ".join(f"{n} was consuming {_busy(ctx, ps, ctx.stages[n], a, b)}" for n in who)
            _, ready = _max_ready(ctx, [q.name], a, b)
            findings.append(Finding(
                "PS-PROGRESS",
                f"{q.name} (tag {q.tag}) had ready messages (up to {ready}) for {b - a:.1f} s ({ctx.span(a, b)}) "
                f"but no free worker allowed to take it held a consumer on it: {doing}.",
                who[0] if len(who) == 1 else None, [q.name], a + W, b,
                [e for n in who for e in _consumer_evidence(ctx.stages[n], q.name, 2)]))
    return _result("PS-PROGRESS", findings, judged, f"{judged} windows with allowed per-scan work judged",
                   f"no live per-scan queue held ready messages for W = {W:g} s while a worker allowed to take it "
                   "was running and free of higher-tag work")


def _free(ctx: Context, ps: PerScan, sv, q: PerScanQueue) -> list[Interval]:
    """Where the worker was running, knew of ``q``, was not paused, and had no ready work of a higher tag:
    none observed, and no delivery from a higher-tag queue within W before (the engine's window)."""
    higher = ps.by_tags(_higher(sv, q.tag))
    deliv = _deliveries(ctx)
    recent = [(t, t + ctx.windows.W) for h in higher for t in deliv.get((sv.name, h.name), [])]
    busy = merge(ps.work_of(higher) + recent)
    return subtract(subtract(intersect(ps.running[sv.name], _informed(ctx, sv, q.name)), sv.excused), busy)


def _informed(ctx: Context, sv, queue: str) -> list[Interval]:
    """Where the worker knew of ``queue``: from the first announcement of it that reached its current
    connection (a broadcast one, or a hello reply to its command queue) to its next connection, which
    forgets every per-scan queue. Connections are its command queues (amq.gen-…); without any seen, its
    starts. A reply the admin never sent (a hello lost while the broker restarted) informs nobody."""
    cached = ctx.__dict__.setdefault("_ps_informed", {})
    if (sv.name, queue) in cached:
        return cached[(sv.name, queue)]
    own = {c.queue: c.start for c in sv.consumers if str(c.queue).startswith("amq.gen-")}
    conns = sorted(set(own.values())) or sorted(a for a, _ in sv.lives)
    told = [e["t"] for e in per_scan(ctx).queues[queue].announces if e.get("to") == "broadcast" or e.get("to") in own]
    out: list[Interval] = []
    for c0, c1 in zip(conns, conns[1:] + [float("inf")]):
        i = bisect.bisect_left(told, c0 - CREATE_SLACK)
        if i < len(told) and told[i] < c1:
            out.append((told[i], min(c1, ctx.end)))
    cached[(sv.name, queue)] = out
    return out


def _busy(ctx: Context, ps: PerScan, sv, a: float, b: float) -> str:
    held = sorted({c.queue for c in sv.consumers if c.start < b and c.end > a and not str(c.queue).startswith("amq.")})
    return ", ".join(held) if held else "nothing"


# ------------------------------------------------------------------ PS-DELETE

@clause("PS-DELETE", "deleting a per-scan queue neither stops nor wedges a worker, and nobody re-creates it")
def check_delete(ctx: Context) -> ClauseResult:
    """Rule, per ps_delete of queue q, timed from the broker's queue_deleted of q within
    {FAULT_EFFECT_WINDOW} s (else from the ps_delete itself), at td, for every worker alive at td
    (whether it was consuming q, had paused it, or never consumed it): (a) it does not exit before
    teardown (an exit a kill_stage fault explains excepted); (b) while its other queues (its read queues,
    and the live per-scan queues it allows while it knew of them, as in PS-PROGRESS, less those it had
    already left waiting for W up to td while free to take them: PS-PROGRESS's finding, which the deletion
    did not cause) had ready messages after td, outside pauses by a fault, it receives a delivery at least
    every 2W. A (deletion, worker) pair counts as judged only when those queues held ready work for
    {DECISIVE_WINDOWS}W in all after td; a finding fails the clause either way.
    (c) A queue_created of q after td is a violation, unless the harness announced a new scan's queue
    of that name (reason scan_start) within {HARNESS_DECLARE_SLACK} s of it: only the admin declares a
    per-scan queue."""
    if (gated := _gate(ctx, "PS-DELETE")) is not None:
        return gated
    ps = per_scan(ctx)
    deletes = [e for e in ctx.history.of("ps_delete") if e["t"] < ctx.teardown and e.get("queue") in ps.queues]
    if not deletes:
        return ClauseResult("PS-DELETE", "not_exercised", "no per-scan queue was deleted before teardown")
    findings: list[Finding] = []
    judged, unjudged = 0, []
    for d in deletes:
        q = ps.queues[d["queue"]]
        gone = next((e["t"] for e in ctx.history.of("queue_deleted") if e.get("queue") == q.name
                     and d["t"] - 1 <= e["t"] <= d["t"] + FAULT_EFFECT_WINDOW), d["t"])
        for sv in [sv for sv in _workers(ctx) if any(a <= gone < b for a, b in sv.lives)]:
            short = _judge_deletion(ctx, ps, q, gone, sv, findings, _how_held(sv, q.name, min(d["t"], gone)))
            if short:
                unjudged.append(f"{sv.name} after {q.name}: {short}")
            else:
                judged += 1
        findings += _recreated(ctx, q, gone)
    text = f"{judged} (deletion, worker) pairs judged"
    if unjudged:
        text += f"; {len(unjudged)} not judged: " + "; ".join(unjudged[:5])
    return _result("PS-DELETE", findings, judged, text,
                   f"no worker had {DECISIVE_WINDOWS}W = {ctx.decisive:g} s of work in its other queues after a "
                   "deletion")


def _judge_deletion(ctx: Context, ps: PerScan, q: PerScanQueue, td: float, sv, findings: list[Finding],
                    how: str) -> str | None:
    """Rules (a) and (b) of check_delete for one worker; returns why the pair is not judged (None: it is)."""
    ex = _exit_between(sv, td, ctx.teardown, ctx)
    if ex is not None:
        findings.append(Finding(
            "PS-DELETE",
            f"{sv.name} exited (code {ex.get('returncode')}) at {ctx.rel(ex['t'])}, {ex['t'] - td:.1f} s after "
            f"{q.name} was deleted {how}.", sv.name, [q.name], td, ex["t"], [ex]))
    others = [x for x in sv.reads if x != q.name] + \
             [p.name for p in ps.queues.values() if p.name != q.name and _allowed(sv, p.tag)
              and not _neglected_before(ctx, ps, sv, p, td)]
    spans = merge([iv for x in others if x not in ps.queues for iv in ctx.levels.pos.get(x, ())] +
                  [iv for x in others if x in ps.queues for iv in intersect(ps.queues[x].work, _informed(ctx, sv, x))])
    spans = subtract(intersect(spans, [(td, min(ctx.teardown, ctx.end))]), sv.excused)
    work = _length(spans)
    short = None if work >= ctx.decisive else (
        f"only {work:.1f} s of work in its other queues after the deletion, the clause needs "
        f"{DECISIVE_WINDOWS}W = {ctx.decisive:g} s")
    if ex is not None or not ctx.history.of("deliver"):
        return short
    gap = _first_silence(_deliveries(ctx).get((sv.name, "*"), []), spans, 2 * ctx.windows.W)
    if gap:
        queue, ready = _max_ready(ctx, others, *gap)
        waiting = f"; {ready} objects waiting in {queue}" if queue else ""
        findings.append(Finding(
            "PS-DELETE",
            f"{sv.name} consumed nothing for {gap[1] - gap[0]:.0f} s ({ctx.span(*gap)}) after {q.name} was deleted "
            f"{how}{waiting}.", sv.name, [q.name] + ([queue] if queue else []), gap[0], gap[1],
            _consumer_evidence(sv, q.name)))
    return short


def _neglected_before(ctx: Context, ps: PerScan, sv, p: PerScanQueue, td: float) -> bool:
    """Whether the worker had already left per-scan queue ``p`` waiting for more than W, free to take it
    and holding no consumer on it, up to the deletion at ``td``: a silence on that work began before the
    deletion and is PS-PROGRESS's finding, not a consequence of the deletion (one cause, one finding)."""
    idle = subtract(intersect(p.work, _free(ctx, ps, sv, p)), sv.on(p.name))
    idle = subtract(idle, [(t, t) for t in _deliveries(ctx).get((sv.name, p.name), [])])
    return any(a + ctx.windows.W < td <= b for a, b in idle)


def _how_held(sv, queue: str, t: float) -> str:
    """How the worker stood to the queue at its deletion: consuming it, paused (consumed it before), or never."""
    before = [c for c in sv.consumers if c.queue == queue and c.start <= t]
    if not before:
        return "(it had never consumed it)"
    if any(c.end >= t - CREATE_SLACK for c in before):
        return "while it consumed it"
    return "while paused"


def _recreated(ctx: Context, q: PerScanQueue, td: float) -> list[Finding]:
    """(c): queue_created of the deleted queue after td that the harness's own scan_start does not explain."""
    starts = [e["t"] for e in q.announces if e.get("reason") == "scan_start"]
    for e in ctx.history.of("queue_created"):
        t = e["t"]
        if e.get("queue") != q.name or t <= td or any(t - CREATE_SLACK <= s <= t + HARNESS_DECLARE_SLACK for s in starts):
            continue
        who = next((c for sv in ctx.stages.values() for c in sv.consumers if c.queue == q.name and c.start >= t), None)
        by = f"; {who.stage} consumed it from {ctx.rel(who.start)}" if who else ""
        return [Finding(
            "PS-DELETE",
            f"{q.name} was declared again at {ctx.rel(t)}, {t - td:.1f} s after it was deleted, and not by the "
            f"admin{by}: only the admin declares a per-scan queue.",
            who.stage if who else None, [q.name], t, t + 0.5, [e])]
    return []


# ------------------------------------------------------------------ PS-HELLO

@clause("PS-HELLO", "a (re)connecting worker says hello, subscribes to the reply's queues within W, never storms")
def check_hello(ctx: Context) -> ClauseResult:
    """Rule, per worker; its hellos are the hello events naming it or a command queue (amq.gen-…) it
    consumed:
    (a) every connection of the worker that lasted W (a consumer on a command queue) is followed within W
        by a hello naming that command queue (not judged within {FAULT_EFFECT_WINDOW} s after a
        restart_broker fault, when the admin itself reconnects);
    (b) per hello at h whose reply named live queues allowed for it: it holds a consumer on each of them
        still live at the deadline at some instant of [h, h + W]; when the reply also named a queue that
        no longer existed (stale) and its connection dropped within W, of [h, h' + W] instead, h' its
        next hello (the one reconnect a stale queue may cost). A worker serving a higher tag may wait, as
        in PS-SUBSCRIBE. Not judged past teardown, while paused, or when a fault that makes it reconnect
        ({RECONNECTING_FAULTS}) falls inside that interval (the fault that made it say hello comes before);
    (c) of the hello replies naming one stale queue, at most one is followed within W by a drop of its
        connection (or an exit), unless such a fault falls inside that W;
    (d) no more than {HELLO_STORM_LIMIT} hellos from one worker within any {HELLO_STORM_SECONDS} s,
        leaving out hellos within {FAULT_EFFECT_WINDOW} s after such a fault.
    Exercised = hello replies judged by (b) plus replies naming a stale queue judged by (c)."""
    if (gated := _gate(ctx, "PS-HELLO")) is not None:
        return gated
    ps = per_scan(ctx)
    hellos = ctx.history.of("hello")
    if not hellos:
        return ClauseResult("PS-HELLO", "not_exercised", "no worker_hello was seen")
    by_worker: dict[str, list[dict]] = {}
    for h in hellos:
        name = h.get("stage") or ps.owner.get(h.get("command_queue"))
        if name in ctx.stages:
            by_worker.setdefault(name, []).append(h)
    findings = _silent_connections(ctx, hellos)
    replies = stale = 0
    for name, hs in by_worker.items():
        sv = ctx.stages[name]
        n, found = _judge_replies(ctx, ps, sv, hs)
        replies, findings = replies + n, findings + found
        n, found = _stale_reconnects(ctx, ps, sv, hs)
        stale, findings = stale + n, findings + found
        findings += _storm(ctx, sv, hs)
    orphans = len(hellos) - sum(len(hs) for hs in by_worker.values())
    text = f"{replies} hello replies judged, {stale} naming a stale queue; {len(hellos)} hellos from {len(by_worker)} worker(s)"
    if orphans:
        text += f" ({orphans} from no known stage)"
    return _result("PS-HELLO", findings, replies + stale, text,
                   "no hello was answered with a live queue allowed for its worker, nor with a queue that no longer existed")


def _reconnect_faults(ctx: Context, sv) -> list[float]:
    return [f["t"] for f in ctx.history.of("fault")
            if f.get("kind") in RECONNECTING_FAULTS and f.get("target") in (sv.name, sv.role, None)]


def _near_fault(faults: list[float], a: float, b: float) -> bool:
    return any(a - FAULT_EFFECT_WINDOW <= f <= b for f in faults)


def _fault_during(faults: list[float], a: float, b: float) -> bool:
    """A reconnecting fault inside [a, b]: it, not the reply, decides what the worker does then. (The
    fault that made the worker say hello comes before: its reply is what (b) and (c) judge.)"""
    return any(a <= f <= b for f in faults)


def _silent_connections(ctx: Context, hellos: list[dict]) -> list[Finding]:
    """(a): a worker's command queue consumed for W with no hello naming it within W."""
    W = ctx.windows.W
    named: dict[str, float] = {}
    for h in hellos:
        named.setdefault(h.get("command_queue"), h["t"])
    # the admin may miss a hello while the broker restarts (it reconnects too)
    restarts = [f["t"] for f in ctx.history.of("fault") if f.get("kind") == "restart_broker"]
    findings = []
    for sv in _workers(ctx):
        silent = [c for c in sv.consumers if str(c.queue).startswith("amq.gen-") and c.end - c.start >= W
                  and c.start + W <= ctx.teardown and not (c.start - 1 <= named.get(c.queue, -1e18) <= c.start + W)
                  and not _near_fault(restarts, c.start, c.start + W)]
        if silent:
            c = silent[0]
            more = f" ({len(silent)} connections in all)" if len(silent) > 1 else ""
            findings.append(Finding(
                "PS-HELLO",
                f"{sv.name} connected at {ctx.rel(c.start)} (command queue {c.queue}) but sent no worker_hello "
                f"naming it within W = {ctx.windows.W:g} s{more}.", sv.name, [c.queue], c.start, c.start + W,
                _consumer_evidence(sv, c.queue, 1)))
    return findings


def _stale(ps: PerScan, h: dict) -> list[str]:
    return [x for x in h.get("answered") or [] if x not in ps.queues or not covers(ps.queues[x].live, h["t"])]


def _dropped(ctx: Context, sv, a: float, b: float) -> bool:
    return any(a < d <= b for d in sv.drops) or any(a < e["t"] <= b for e in sv.exits)


def _judge_replies(ctx: Context, ps: PerScan, sv, hs: list[dict]) -> tuple[int, list[Finding]]:
    """(b): the reply's live allowed queues consumed within W (after at most one stale reconnect)."""
    W = ctx.windows.W
    faults = _reconnect_faults(ctx, sv)
    judged, failed = 0, []
    for k, h in enumerate(hs):
        t, stale = h["t"], _stale(ps, h)
        wanted = [x for x in h.get("answered") or [] if x not in stale and _allowed(sv, ps.queues[x].tag)]
        if not wanted:
            continue
        deadline, after = t + W, ""
        if _dropped(ctx, sv, t, t + W):
            if not stale or k + 1 >= len(hs):
                continue  # a drop the stale queue does not explain: its next hello is judged instead
            deadline = hs[k + 1]["t"] + W
            after = (f" of its next hello at {ctx.rel(hs[k + 1]['t'])} (the one reconnect the stale "
                     f"{_queues(stale)} may cost)")
        if deadline > ctx.teardown or intersect(sv.excused, [(t, deadline)]) or _fault_during(faults, t, deadline):
            continue
        judged += 1
        missing = [x for x in wanted if covers(ps.queues[x].live, deadline) and not _holds(sv, x, t, deadline)
                   and not _serving_higher(ctx, sv, ps.queues[x].tag, t, deadline)]
        if missing:
            failed.append((h, missing, after))
    if not failed:
        return judged, []
    h, missing, after = failed[0]
    more = f" ({len(failed) - 1} later hello(s) likewise)" if len(failed) > 1 else ""
    stale = _stale(ps, h)
    named = ", ".join(h.get("answered") or []) + (f" (stale: {_queues(stale)})" if stale else "")
    return judged, [Finding(
        "PS-HELLO",
        f"{sv.name} said hello at {ctx.rel(h['t'])} (command queue {h.get('command_queue')}); the reply named "
        f"{named}, but it held no consumer on {_queues(missing)} within W = {W:g} s{after or ''}{more}.",
        sv.name, missing, h["t"], h["t"] + W, [h])]


def _stale_reconnects(ctx: Context, ps: PerScan, sv, hs: list[dict]) -> tuple[int, list[Finding]]:
    """(c): at most one reconnect per stale queue named in hello replies."""
    W = ctx.windows.W
    faults = _reconnect_faults(ctx, sv)
    per_queue: dict[str, list[dict]] = {}
    judged = 0
    for h in hs:
        if h["t"] + W > ctx.teardown or _fault_during(faults, h["t"], h["t"] + W):
            continue
        for x in _stale(ps, h):
            judged += 1
            if _dropped(ctx, sv, h["t"], h["t"] + W):
                per_queue.setdefault(x, []).append(h)
    findings = []
    for x, dropped in per_queue.items():
        if len(dropped) > 1:
            findings.append(Finding(
                "PS-HELLO",
                f"{sv.name} reconnected {len(dropped)} times after hello replies naming {x}, which no longer existed "
                f"({ctx.span(dropped[0]['t'], dropped[-1]['t'])}): a stale queue may cost at most one reconnect.",
                sv.name, [x], dropped[0]["t"], dropped[-1]["t"], dropped[:3]))
    return judged, findings


def _storm(ctx: Context, sv, hs: list[dict]) -> list[Finding]:
    """(d): more than HELLO_STORM_LIMIT hellos within HELLO_STORM_SECONDS, fault-caused ones left out."""
    faults = _reconnect_faults(ctx, sv)
    times = [h["t"] for h in hs if not _near_fault(faults, h["t"], h["t"])]
    worst, where = 0, (0.0, 0.0)
    for i, t in enumerate(times):
        j = bisect.bisect_right(times, t + HELLO_STORM_SECONDS)
        if j - i > worst:
            worst, where = j - i, (t, times[j - 1])
    if worst <= HELLO_STORM_LIMIT:
        return []
    return [Finding(
        "PS-HELLO",
        f"{sv.name} sent {worst} worker_hellos within {HELLO_STORM_SECONDS:g} s ({ctx.span(*where)}): a reconnect "
        f"storm (at most {HELLO_STORM_LIMIT} in any {HELLO_STORM_SECONDS:g} s).",
        sv.name, [], where[0], where[1], [h for h in hs if where[0] <= h["t"] <= where[1]][:3])]
