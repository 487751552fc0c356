"""QP-*: priority consumption, judged per stage instance that has QUEUE_PRIORITY set.

Inputs: the stage's consumer lifecycle (``_common.StageView``), the sampled
ready counts (``_common.QueueLevels``: conservative runs where a queue was
observed non-empty / empty) and the windows W and G. Every rule below is
written so that sampling noise, shutdown, broker-side connection closes and
deleted queues never produce a finding; see each function's docstring.
"""
from __future__ import annotations

import bisect
from collections import Counter

from harness.checkers._common import (
    OVERLAP_EPSILON, Context, covers, intersect, longer_than, median, merge, subtract,
)
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause


def _result(clause: str, findings: list[Finding], exercised: int, what: str, ctx: Context | None = None,
            **metrics) -> ClauseResult:
    text = f"{exercised} {what}"
    if ctx is not None and ctx.unjudged:
        text += f" ({', '.join(ctx.unjudged)} not judged: consumers on its queues the observer could not attribute)"
    if findings:
        outcome = "failed"
    elif exercised == 0:
        outcome = "not_exercised"
    else:
        outcome = "passed"
    return ClauseResult(clause, outcome, text, findings, dict(metrics))


def _clip(xs, until):
    return [(a, min(b, until)) for a, b in xs if a < until]


def _cons_events(sv, queue, a, b, limit=6):
    """The stage's consumers on ``queue`` overlapping [a, b], as evidence (indexed: cheap per finding)."""
    index = sv.__dict__.setdefault("_by_queue", {})
    if queue not in index:
        cs = [c for c in sv.consumers if c.queue == queue]
        index[queue] = (cs, [c.start for c in cs])
    cs, starts = index[queue]
    out = []
    k = bisect.bisect_left(starts, b) - 1
    while k >= 0 and len(out) < 50:
        c = cs[k]
        if c.end > a:
            out.append(c)
        elif len(out) or starts[k] < a - 3600:
            break
        k -= 1
    out.reverse()
    return [{"type": "consumer", "stage": sv.name, "queue": c.queue, "start": c.start, "end": c.end,
             "end_reason": c.reason} for c in out[:limit]]


def _busy_with(ctx: Context, sv, a: float, b: float) -> str:
    qs = sorted({c.queue for c in sv.consumers if c.start < b and c.end > a and c.queue in sv.priority},
                key=sv.priority.index)
    return ", ".join(qs) if qs else "nothing"


def _higher_union(ctx: Context, higher: list[str]):
    pos = ctx.levels.pos
    return merge(iv for q in higher for iv in pos.get(q, ()))


def _which_higher(ctx: Context, higher: list[str], a: float, b: float) -> list[str]:
    mid = (a + b) / 2
    out = [q for q in higher if covers(ctx.levels.pos.get(q, []), mid)]
    return out or [q for q in higher if intersect(ctx.levels.pos.get(q, []), [(a, b)])]


def _queues(qs: list[str]) -> str:
    return f"queue {qs[0]}" if len(qs) == 1 else f"queues {', '.join(qs)}"


# ------------------------------------------------------------------ QP-DECLARE

@clause("QP-DECLARE", "every QUEUE_PRIORITY queue exists within G of start")
def check_declare(ctx: Context) -> ClauseResult:
    """Rule: for every start of a stage with QUEUE_PRIORITY and every queue q in it, q existed at some
    instant of [start, start + G] (queue_created/queue_deleted events and sampled non-null counts).
    Not judged when nothing at all is known about q, or when the stage stopped at teardown (or the
    history ended) before start + G and q was not there yet. A stage that crashed before G is judged."""
    G = ctx.windows.G
    findings: list[Finding] = []
    judged = 0
    for sv in ctx.qp_stages_all:
        for st, (a, life_end) in zip(sv.starts, sv.lives):
            deadline = a + G
            crashed = life_end < min(deadline, ctx.teardown, ctx.end) and bool(sv.exits)
            for q in sv.priority:
                known = ctx.levels.exists_within(q, a, deadline)
                if known is None:
                    continue
                if known:
                    judged += 1
                    continue
                if deadline > min(ctx.end, ctx.teardown) and not crashed:
                    continue  # the run did not last G: cannot tell
                judged += 1
                how = "it crashed before then" if crashed else "never created or seen by a sample"
                findings.append(Finding(
                    "QP-DECLARE",
                    f"Stage {sv.name} started at {ctx.rel(a)} but its queue {q} did not exist within "
                    f"G = {G:g} s ({how}).",
                    sv.name, [q], a, deadline,
                    [{"type": "stage_started", "t": a, "stage": sv.name, "queue_priority": sv.priority}]))
    return _result("QP-DECLARE", findings, judged, "queue declarations judged")


# ------------------------------------------------------------------ QP-FIRST-PINNED

@clause("QP-FIRST-PINNED", "the consumer on the first queue is never cancelled while running")
def check_first_pinned(ctx: Context) -> ClauseResult:
    """Rule, for a stage with first queue q0:
    (a) a consumer on q0 that the stage itself cancelled before teardown is a violation, unless a
        stage_exited follows within W, or a connection/channel close of the stage or a deletion of q0
        lies within 1 s of it (those end consumers legitimately);
    (b) in every consuming segment (from the first consumer after a start or reconnect to the next
        connection drop, exit or teardown) longer than W, a q0 consumer exists within the first W;
    (c) a stage that lives longer than G before teardown holds a q0 consumer within G of its start."""
    W, G = ctx.windows.W, ctx.windows.G
    findings: list[Finding] = []
    judged = 0
    for sv in ctx.qp_stages:
        q0 = sv.priority[0]
        on_q0 = sv.on(q0)
        never_lives = []
        for a, b in sv.lives:
            b = min(b, ctx.teardown)
            if b - a > G and not intersect(on_q0, [(a, a + G)]):
                never_lives.append((a, b))
                judged += 1
                findings.append(Finding(
                    "QP-FIRST-PINNED",
                    f"Stage {sv.name} started at {ctx.rel(a)} but held no consumer on its first queue {q0} "
                    f"within G = {G:g} s.", sv.name, [q0], a, a + G, []))
        for c in sv.consumers:
            if c.queue != q0:
                continue
            judged += 1
            if c.reason == "cancel" and c.end < ctx.teardown:
                findings.append(Finding(
                    "QP-FIRST-PINNED",
                    f"Stage {sv.name} cancelled its consumer on its first queue {q0} at {ctx.rel(c.end)} while "
                    f"running (no exit, connection close or queue deletion explains it).",
                    sv.name, [q0], c.end, c.end + 0.5,
                    [{"type": "consumer_deleted", "t": c.end, "stage": sv.name, "queue": q0, "tag": c.tag}]))
        for a, b in sv.segments(ctx.teardown):
            if any(la <= a < lb for la, lb in never_lives) or b - a <= W:
                continue
            if not intersect(on_q0, [(a, a + W)]):
                findings.append(Finding(
                    "QP-FIRST-PINNED",
                    f"Stage {sv.name} started consuming at {ctx.rel(a)} ({_busy_with(ctx, sv, a, b)}) but held "
                    f"no consumer on its first queue {q0} within W = {W:g} s.",
                    sv.name, [q0], a, min(b, a + W), _cons_events(sv, q0, a, b)))
    return _result("QP-FIRST-PINNED", findings, judged, "first-queue consumers followed", ctx)


# ------------------------------------------------------------------ QP-ONE-LOWER

@clause("QP-ONE-LOWER", "never consumers on two lower queues at once")
def check_one_lower(ctx: Context) -> ClauseResult:
    """Rule: for a stage with two or more lower queues, the instants where it holds consumers on two
    or more distinct lower queues form intervals; one longer than 0.1 s (receipt-order noise) is a
    violation. Exercised = lower consumers seen in stages that have at least two lower queues."""
    findings: list[Finding] = []
    judged = 0
    for sv in ctx.qp_stages:
        lower = sv.priority[1:]
        if len(lower) < 2:
            continue
        points = []
        for q in lower:
            ivs = _clip(sv.on(q), ctx.teardown)
            judged += sum(1 for c in sv.consumers if c.queue == q and c.start < ctx.teardown)
            for a, b in ivs:
                points.append((a, 1, q))
                points.append((b, -1, q))
        points.sort(key=lambda p: (p[0], p[1]))
        held: set[str] = set()
        since = None
        seen: set[str] = set()
        for t, d, q in points:
            if d > 0:
                held.add(q)
                if len(held) == 2:
                    since, seen = t, set(held)
                elif len(held) > 2:
                    seen |= held
            else:
                held.discard(q)
                if len(held) == 1 and since is not None:
                    if t - since > OVERLAP_EPSILON:
                        qs = sorted(seen, key=sv.priority.index)
                        findings.append(Finding(
                            "QP-ONE-LOWER",
                            f"Stage {sv.name} held consumers on {len(qs)} lower queues ({', '.join(qs)}) at once "
                            f"for {t - since:.1f} s from {ctx.rel(since)}.",
                            sv.name, qs, since, t,
                            [e for qq in qs for e in _cons_events(sv, qq, since, t, 2)]))
                    since = None
    return _result("QP-ONE-LOWER", findings, judged, "lower-queue consumers observed", ctx)


# ------------------------------------------------------------------ QP-PRECEDENCE

@clause("QP-PRECEDENCE", "no lower queue consumed for W while a higher queue has ready messages")
def check_precedence(ctx: Context) -> ClauseResult:
    """Rule: for each lower queue qi of a stage, H = union of the runs where some higher queue
    q0..q(i-1) was observed non-empty (first to last positive sample). Any overlap of H with the
    stage's consumer on qi longer than W is a violation. Exercised = periods of higher-queue work
    longer than W, inside the stage's consuming segments, in which qi had work or was consumed."""
    W = ctx.windows.W
    findings: list[Finding] = []
    judged = 0
    for sv in ctx.qp_stages:
        active = subtract(sv.segments(ctx.teardown), sv.excused)
        for i in range(1, len(sv.priority)):
            qi, higher = sv.priority[i], sv.priority[:i]
            H = _higher_union(ctx, higher)
            C = _clip(sv.on(qi), ctx.teardown)
            cands = longer_than(intersect(H, active), W)
            if cands:
                tempt = merge(list(ctx.levels.pos.get(qi, [])) + C)
                hit = intersect(cands, tempt)
                starts = [a for a, _ in cands]
                judged += len({bisect.bisect_right(starts, a) - 1 for a, _ in hit})
            for a, b in longer_than(subtract(intersect(H, C), sv.excused), W):
                hq = _which_higher(ctx, higher, a, b)
                findings.append(Finding(
                    "QP-PRECEDENCE",
                    f"Stage {sv.name} kept consuming lower queue {qi} for {b - a:.1f} s ({ctx.span(a, b)}) while "
                    f"higher {_queues(hq)} had ready messages throughout (W = {W:g} s).",
                    sv.name, [qi] + hq, a + W, b, _cons_events(sv, qi, a, b)))
    return _result("QP-PRECEDENCE", findings, judged, "windows of higher-queue work judged", ctx)


# ------------------------------------------------------------------ QP-CANCEL-WINDOW

def format_latency(r: ClauseResult) -> str:
    """QP-CANCEL-WINDOW's figure for the summary: the switch latencies it measured."""
    lat = r.metrics.get("latency_s") or {}
    if not lat.get("count"):
        return "switch latency: no switches observed"
    return f"switch latency: min {lat['min']:.2f} s, median {lat['median']:.2f} s, max {lat['max']:.2f} s (n={lat['count']})"


def cancel_latencies(ctx: Context):
    """Returns (latencies, findings). Rule: for each consumer of a stage on a lower queue qi and each run h of
    higher-queue work (union of q0..q(i-1) observed non-empty) overlapping it, trigger T = max(h.start,
    consumer.start):
    - the stage cancelled while h lasted (up to 0.5 s after its last positive sample): a switch with
      latency cancel - T; a violation when the consumer was held while h lasted more than W after T;
    - h lasted longer than W after T and the consumer was still held at T + W (whatever ended it
      later, or the run ended): a violation;
    - otherwise (h ended within W, or an exit/connection close/queue deletion ended the consumer
      within W): nothing to judge."""
    W = ctx.windows.W
    latencies: list[float] = []
    findings: list[Finding] = []
    for sv in ctx.qp_stages:
        for i in range(1, len(sv.priority)):
            qi, higher = sv.priority[i], sv.priority[:i]
            H = subtract(_higher_union(ctx, higher), sv.excused)
            if not H:
                continue
            hstarts = [a for a, _ in H]
            for c in sv.consumers:
                if c.queue != qi or c.start >= ctx.teardown:
                    continue
                end = min(c.end, ctx.teardown)
                j = max(bisect.bisect_right(hstarts, c.start) - 1, 0)
                while j < len(H) and H[j][0] < end:
                    ha, hb = H[j]
                    j += 1
                    if hb <= c.start:
                        continue
                    T = max(ha, c.start)
                    if c.reason == "cancel" and end <= hb + ctx.slack.switch:
                        lat = end - T
                        latencies.append(lat)
                        # late only if the higher queue really stayed non-empty for W while it was held
                        if min(end, hb) - T > W:
                            hq = _which_higher(ctx, higher, T, min(hb, end))
                            findings.append(Finding(
                                "QP-CANCEL-WINDOW",
                                f"Stage {sv.name} cancelled lower queue {qi} only {lat:.1f} s after higher "
                                f"{_queues(hq)} filled at {ctx.rel(T)} (W = {W:g} s).",
                                sv.name, [qi] + hq, T + W, end, _cons_events(sv, qi, T, end)))
                        break
                    if min(hb, end) - T > W:
                        hq = _which_higher(ctx, higher, T, min(hb, end))
                        still = "until the end of the run" if c.reason in ("open", "teardown") and end >= ctx.teardown \
                            else f"for {min(hb, end) - T:.1f} s"
                        findings.append(Finding(
                            "QP-CANCEL-WINDOW",
                            f"Stage {sv.name} did not cancel lower queue {qi} within W = {W:g} s after higher "
                            f"{_queues(hq)} filled at {ctx.rel(T)}; it kept consuming it {still}.",
                            sv.name, [qi] + hq, T + W, min(hb, end), _cons_events(sv, qi, T, end)))
                        break
    return latencies, findings


def latency_metrics(latencies: list[float]) -> dict:
    if not latencies:
        return {"count": 0, "min": None, "median": None, "max": None}
    return {"count": len(latencies), "min": round(min(latencies), 3), "median": round(median(latencies), 3),
            "max": round(max(latencies), 3)}


@clause("QP-CANCEL-WINDOW", "the lower consumer is cancelled within W of work arriving above",
        rule_from=cancel_latencies, metric=format_latency)
def check_cancel_window(ctx: Context) -> ClauseResult:
    latencies, findings = cancel_latencies(ctx)
    res = _result("QP-CANCEL-WINDOW", findings, len(latencies), "switches observed", ctx,
                  **{"latency_s": latency_metrics(latencies)})
    if findings and not latencies:
        res.exercised = f"0 switches observed, {len(findings)} missed"
    return res


# ------------------------------------------------------------------ QP-PROGRESS

@clause("QP-PROGRESS", "allowed work is not left waiting for W")
def check_progress(ctx: Context) -> ClauseResult:
    """Rule: inside the stage's consuming segments (first consumer after start/reconnect .. next drop,
    exit or teardown), for each qi: Z = instants where every higher queue q0..q(i-1) was observed empty
    (ready 0 or missing), P = instants where qi was observed non-empty. An interval of Z ∩ P longer
    than W in which the stage held no consumer on qi is a violation: it is idle, stuck on a lower
    queue, or sitting on an empty higher lower queue instead of moving down. A delivery to the stage
    from one of q1..q(i-1) proves that queue had work at that instant, so it splits the interval
    (a trickle the sampler cannot see keeps the stage up there legitimately).
    Queues never sampled are never judged. Exercised = Z ∩ P intervals longer than W."""
    W = ctx.windows.W
    findings: list[Finding] = []
    judged = 0
    zero, pos = ctx.levels.zero, ctx.levels.pos
    delivered: dict[tuple[str, str], list[float]] = {}
    names = {sv.name for sv in ctx.qp_stages}
    for ev in ctx.history.of("deliver"):
        if ev.get("stage") in names:
            delivered.setdefault((ev["stage"], ev.get("queue")), []).append(ev["t"])
    for sv in ctx.qp_stages:
        active = subtract(sv.segments(ctx.teardown), sv.excused)
        Z = active
        for i, qi in enumerate(sv.priority):
            if i > 0:
                Z = intersect(Z, zero.get(sv.priority[i - 1], []))
            if not Z:
                break
            work = intersect(Z, pos.get(qi, []))
            windows = longer_than(work, W)
            judged += len(windows)
            if not windows:
                continue
            idle = subtract(windows, sv.on(qi))
            if i > 1:
                points = sorted(t for q in sv.priority[1:i] for t in delivered.get((sv.name, q), ()))
                idle = subtract(idle, [(t, t) for t in points])
            for a, b in longer_than(idle, W):
                busy = _busy_with(ctx, sv, a, b)
                above = f"every queue above it ({', '.join(sv.priority[:i])}) was empty" if i else "it is the first queue"
                findings.append(Finding(
                    "QP-PROGRESS",
                    f"Stage {sv.name} left {qi} with ready messages for {b - a:.1f} s ({ctx.span(a, b)}) although "
                    f"{above}; it was consuming {busy}.",
                    sv.name, [qi], a + W, b, _cons_events(sv, qi, a - W, b)))
    return _result("QP-PROGRESS", findings, judged, "windows with allowed work judged", ctx)


# ------------------------------------------------------------------ QP-DRAIN-ORDER

@clause("QP-DRAIN-ORDER", "in a drain, each queue is emptied before the next one is served")
def check_drain_order(ctx: Context) -> ClauseResult:
    """Rule (only when scenario.checks.drain): for each stage with QUEUE_PRIORITY, s = its first
    consumer on a priority queue; stages whose priority queues received a publish after s are skipped
    (not a drain). Over its non-redelivered deliveries after s + W, in time order, with m the lowest
    priority index delivered so far: a delivery from q_j with j < m is a violation (q_j was not drained
    before q_m), and so is the first delivery from q_m while a queue above it was observed non-empty
    and still held messages that no stage had received yet (published there minus first deliveries
    from it). A message the stage had already received and gave back does not count: pika nacks the
    deliveries it has not dispatched yet when a consumer is cancelled, so moving down from a queue
    whose last message was in flight puts that message back; QP-PRECEDENCE judges how long it waits.
    Exercised = first deliveries from a queue below the previous one (boundaries crossed)."""
    sc = ctx.scenario
    if sc is None or not sc.checks.drain:
        return ClauseResult("QP-DRAIN-ORDER", "not_exercised", "not a drain scenario (checks.drain is false)")
    W = ctx.windows.W
    findings: list[Finding] = []
    judged = 0
    last_pub: dict[str, float] = {}
    published: Counter[str] = Counter()
    for ev in ctx.history.of("publish"):
        if ev.get("exchange", "") == "":
            last_pub[ev.get("routing_key")] = ev["t"]
        published.update(set(ev.get("routed") or ()))
    deliveries: dict[str, list[dict]] = {}
    first_deliveries: dict[str, list[float]] = {}  # queue -> times a message left it for the first time
    qp_names = {sv.name for sv in ctx.qp_stages}
    for ev in ctx.history.of("deliver"):
        if ev.get("stage") in qp_names:
            deliveries.setdefault(ev["stage"], []).append(ev)
        if not ev.get("redelivered"):
            first_deliveries.setdefault(ev.get("queue"), []).append(ev["t"])

    def never_received(queue: str, t: float) -> int:
        return published[queue] - bisect.bisect_left(first_deliveries.get(queue, []), t)  # deliveries are in time order
    skipped = 0
    for sv in ctx.qp_stages:
        pq = sv.priority
        starts = [c.start for c in sv.consumers if c.queue in pq]
        if len(pq) < 2 or not starts:
            continue
        s = min(starts)
        if any(last_pub.get(q, -1e18) > s for q in pq):
            skipped += 1
            continue
        index = {q: k for k, q in enumerate(pq)}
        m = -1
        reported: set[tuple[int, int]] = set()
        for ev in deliveries.get(sv.name, ()):
            q = ev.get("queue")
            if q not in index or ev["t"] <= s + W or ev.get("redelivered"):
                continue
            k = index[q]
            if k > m:
                if m >= 0 or k > 0:
                    judged += 1
                    waiting = [p for p in pq[:k]
                               if covers(ctx.levels.pos.get(p, []), ev["t"]) and never_received(p, ev["t"]) > 0]
                    if waiting:
                        untouched = ", ".join(f"{p}: {never_received(p, ev['t'])}" for p in waiting)
                        findings.append(Finding(
                            "QP-DRAIN-ORDER",
                            f"Stage {sv.name} received its first message from {q} at {ctx.rel(ev['t'])} while "
                            f"higher {_queues(waiting)} still had ready messages that no stage had received yet "
                            f"({untouched}).",
                            sv.name, waiting + [q], ev["t"], ev["t"] + 0.5, [ev]))
                m = k
            elif k < m and (k, m) not in reported:
                reported.add((k, m))
                findings.append(Finding(
                    "QP-DRAIN-ORDER",
                    f"Stage {sv.name} received a message from {q} at {ctx.rel(ev['t'])} after it had already "
                    f"started on lower queue {pq[m]}: {q} was not drained first.",
                    sv.name, [q, pq[m]], ev["t"], ev["t"] + 0.5, [ev]))
    res = _result("QP-DRAIN-ORDER", findings, judged, "queue boundaries crossed", ctx)
    if skipped:
        res.exercised += f" ({skipped} stage(s) skipped: published to after start)"
    return res

