"""FT-*: robustness, judged around the history's ``fault`` events.

Fault kinds are matched by family (``_common.fault_family``): a kind containing "poison" is
FT-POISON's, one naming a queue and "delete"/"gone" FT-QUEUE-GONE's, one naming a "connection"
or "reconnect" FT-RECONNECT's. A clause with no fault of its family is not exercised.

A fault is judged only when its decisive moment came: after it took effect, the affected stage had
work ready in the queues it should still consume for at least 2W in all (``Context.decisive``), so
at least one of its own checks came after the fault while there was work to show what that check
did. A fault short of that is named in the exercised text ("not judged") and does not count; when no
fault of the clause is judged, the clause is not exercised. A finding is a failure either way.
"""
from __future__ import annotations

import bisect

from harness.checkers._common import DECISIVE_WINDOWS, Context, fault_family, intersect, merge
from harness.checkers.dl import _ex, tally
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause
from harness.messages import UNPARSEABLE

# How long after a fault request the broker's own event (queue.deleted, connection.closed) may come.
FAULT_EFFECT_WINDOW = 30.0
# An unexpected exit stamped this long after the teardown mark still belongs to the run: the exit ended it.
EXIT_AT_TEARDOWN = 0.5


def _faults(ctx: Context, family: str) -> list[dict]:
    return [f for f in ctx.history.of("fault") if fault_family(f.get("kind")) == family]


def _shortfall(ctx: Context, stages, queues, t: float, after: str = "it") -> str | None:
    """Why a fault that took effect at ``t`` on ``stages`` is not judged (None: it is): ``queues``, the
    ones those stages should still consume, held ready work for less than 2W in all after ``t``."""
    work = ctx.work_after(queues, t)
    if work >= ctx.decisive:
        return None
    who = ", ".join(sv.name for sv in stages)
    return (f"only {work:.1f} s of work in {who}'s queues after {after}, the clause needs "
            f"{DECISIVE_WINDOWS}W = {ctx.decisive:g} s")


def _result(ctx: Context, clause: str, findings: list[Finding], judged: int, text: str,
            unjudged: list[tuple[dict, float, str]]) -> ClauseResult:
    """Failed with any finding; else passed when something was judged; else not exercised. The faults
    not judged, with why, are appended to the exercised text."""
    if unjudged:
        n = len(unjudged)
        text += f"; {n} fault{'s' if n != 1 else ''} not judged: " + "; ".join(
            f"{f.get('kind')} {f.get('target')} at {ctx.rel(t)} — {why}" for f, t, why in unjudged)
    outcome = "failed" if findings else "passed" if judged else "not_exercised"
    return ClauseResult(clause, outcome, text, findings)


def _first_after(events, t0, t1, pred):
    for e in events:
        if e["t"] < t0:
            continue
        if e["t"] > t1:
            return None
        if pred(e):
            return e
    return None


def _exit_between(sv, a, b, ctx: Context | None = None):
    """The first exit of the stage in (a, b) that no kill_stage fault on it explains. An exit the
    harness did not cause (``expected`` false) also counts at b itself: a stage that dies ends the
    run, so the teardown phase is stamped in the same instant."""
    kills = [f["t"] for f in ctx.history.of("fault") if f.get("kind") == "kill_stage" and f.get("target") == sv.name] \
        if ctx is not None else []
    for e in sv.exits:
        inside = a < e["t"] < b or (e.get("expected") is False and a < e["t"] <= b + EXIT_AT_TEARDOWN)
        if inside and not any(k - 1 <= e["t"] <= k + FAULT_EFFECT_WINDOW for k in kills):
            return e
    return None


def _supervisor_restart(sv, ex):
    """The start by which a restart policy answered the exit ``ex`` (a non-zero exit it restarts), ``ex``
    itself when the run ended during the backoff, or None when no supervisor restarted it."""
    if ex.get("supervisor") != "restarting" or not ex.get("returncode"):
        return None
    return next((st for st in sv.starts if st["t"] >= ex["t"] and st.get("supervisor_restart")), ex)


def _restarts_after(sv, t: float) -> int:
    return sum(1 for st in sv.starts if st["t"] > t and st.get("supervisor_restart"))


def _restarts_note(sv, since: float) -> str:
    """The supervisor restarts of ``sv`` after ``since``, for a finding about an exit (none: empty)."""
    n = _restarts_after(sv, since)
    return (f"; its restart policy restarted it {n} time{'s' if n != 1 else ''} from then on "
            f"(a restart does not excuse the exit)") if n else ""


def _not_restarted(sv, ex, since: float) -> str:
    """Why the exit ``ex`` does not count as a reconnect."""
    if ex.get("supervisor") == "gave_up":
        n = _restarts_after(sv, since)
        return f"its restart policy gave up after {n} restart{'s' if n != 1 else ''}"
    if ex.get("supervisor") == "restarting":
        return "exit code 0: a stage that ends as if done has not failed, its restart is no reconnect"
    return "no restart policy restarted it"


def _deliveries(ctx: Context) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e in ctx.history.of("deliver"):
        out.setdefault(e.get("stage"), []).append(e["t"])
    return out


def _silent(times: list[float], a: float, b: float, gap: float):
    """First stretch longer than ``gap`` inside [a, b] with no time from ``times``."""
    i = bisect.bisect_left(times, a)
    prev = a
    while i < len(times) and times[i] <= b:
        if times[i] - prev > gap:
            return prev, times[i]
        prev = times[i]
        i += 1
    return (prev, b) if b - prev > gap else None


def _first_silence(times: list[float], intervals, gap: float):
    """The first stretch longer than ``gap`` with no time from ``times``, inside any of ``intervals``."""
    return next((s for a, b in intervals if (s := _silent(times, a, b, gap))), None)


def _stages_reading(ctx: Context, queue: str, t: float):
    out = []
    for sv in ctx.stages.values():
        reads = set(sv.priority) | {q for st in sv.starts for q in (st.get("read_queues") or [])}
        if queue in reads and any(a <= t < b for a, b in sv.lives):
            out.append(sv)
    return out


@clause("FT-QUEUE-GONE", "deleting a lower queue does not stop the stage")
def check_queue_gone(ctx: Context) -> ClauseResult:
    """Rule, per queue-deletion fault on queue q (timed from the broker's queue_deleted when there is
    one within 30 s): every stage reading q that was alive then must (a) not exit before teardown, and
    (b) while any of its other queues had ready messages (observed non-empty), receive a delivery at
    least every 2W. The other clauses keep judging its priorities; the deleted queue's consumer ending
    is legitimate for them. A (deletion, stage) pair counts as judged only when the stage's other queues
    held ready work for 2W in all after the deletion; a finding fails the clause either way."""
    W = ctx.windows.W
    faults = _faults(ctx, "queue_gone")
    if not faults:
        return ClauseResult("FT-QUEUE-GONE", "not_exercised", "0 queue deletions")
    dels = ctx.history.of("queue_deleted")
    deliv = _deliveries(ctx)
    findings, judged, unjudged = [], 0, []
    for f in faults:
        q = f.get("target")
        ev = _first_after(dels, f["t"] - 1, min(f["t"] + FAULT_EFFECT_WINDOW, ctx.teardown),
                          lambda e: e.get("queue") == q)
        if ev is None:
            continue  # the fault never took effect
        td = ev["t"]
        for sv in _stages_reading(ctx, q, td):
            short = _shortfall(ctx, [sv], [x for x in sv.reads if x != q], td)
            if short:
                unjudged.append((f, td, short))
            else:
                judged += 1
            ex = _exit_between(sv, td, ctx.teardown, ctx)
            if ex is not None:
                findings.append(Finding(
                    "FT-QUEUE-GONE",
                    f"Stage {sv.name} exited (code {ex.get('returncode')}) at {ctx.rel(ex['t'])}, "
                    f"{ex['t'] - td:.1f} s after its queue {q} was deleted.", sv.name, [q], td, ex["t"], [ev, ex]))
                continue
            others = [x for x in sv.priority if x != q]
            work = intersect(merge(iv for x in others for iv in ctx.levels.pos.get(x, ())),
                             [(td, min(ctx.teardown, ctx.end))])
            if not ctx.history.of("deliver"):
                continue
            gap = _first_silence(deliv.get(sv.name, []), work, 2 * W)
            if gap:
                findings.append(Finding(
                    "FT-QUEUE-GONE",
                    f"Stage {sv.name} received nothing for {gap[1] - gap[0]:.1f} s ({ctx.span(*gap)}) after its "
                    f"queue {q} was deleted, although {', '.join(others)} had ready messages.",
                    sv.name, [q] + others, gap[0], gap[1], [ev]))
    if judged == 0 and not findings and not unjudged:
        return ClauseResult("FT-QUEUE-GONE", "not_exercised", f"{len(faults)} queue-deletion faults, none took effect on a running stage")
    return _result(ctx, "FT-QUEUE-GONE", findings, judged, f"{judged} stage(s) judged after a queue deletion", unjudged)


@clause("FT-POISON", "an unparseable message is reported and removed, not a blocker")
def check_poison(ctx: Context) -> ClauseResult:
    """Rule, per poison fault on queue q (or on a stage: its read queues): the poison messages are the
    harness's publishes to q within [fault - 1 s, fault + 5 s], cut short by the next poison fault on
    the same target (Unparseable ones when there are any). Then (a) no stage reading q exits before
    teardown; (b) the poison is not requeued in a loop: at most 2 deliveries per poison message over the
    run (see _requeued_poison);
    (c) a ProblemMessage is published (or read from an output queue) for each poison message, after
    its first delivery (see _unreported_poison); (d) while a stage holds a consumer on q and q has
    ready messages, something is delivered from q at least every 2W. A fault counts as judged only when
    the queues of the stages reading q held ready work for 2W in all after the first poison publish;
    a finding fails the clause either way."""
    W = ctx.windows.W
    faults = _faults(ctx, "poison")
    if not faults:
        return ClauseResult("FT-POISON", "not_exercised", "0 poison messages")
    pubs = ctx.history.of("publish")
    findings, judged, unjudged = [], 0, []
    problems = sorted(e["t"] for e in ctx.history.of("publish", "output")
                      if (e.get("msg") or {}).get("type") == "ProblemMessage")
    delivered: list[tuple[float, int, str, dict]] = []  # (first delivery, poison messages, queue, that delivery)
    for f in faults:
        target = f.get("target")
        queues = [target]
        if target in ctx.stages:
            queues = ctx.stages[target].priority or [s.get("read_queues") for s in ctx.stages[target].starts][0] or []
        for q in queues:
            # up to 5 s after the fault, and before the next poison fault on the same target
            until = min([f["t"] + 5] + [g["t"] for g in faults if g["t"] > f["t"] and g.get("target") == target])
            cand = [e for e in pubs if f["t"] - 1 <= e["t"] <= until and e.get("routing_key") == q
                    and e.get("stage") in ("harness", None)]
            poison = [e for e in cand if (e.get("msg") or {}).get("type") == UNPARSEABLE] or cand[:1]
            readers = _stages_reading(ctx, q, f["t"])
            if not readers or not poison:
                continue
            t0 = poison[0]["t"]
            short = _shortfall(ctx, readers, [x for sv in readers for x in sv.reads], t0)
            if not short:
                judged += len(poison)
            elif all(u[0] is not f for u in unjudged):  # a fault on a stage poisons each of its queues
                unjudged.append((f, t0, short))
            # from the fault on: the firehose may stamp the poison's publish after the exit it caused
            put = min(f["t"], t0)
            for sv in readers:
                ex = _exit_between(sv, put, ctx.teardown, ctx)
                if ex is not None:
                    findings.append(Finding(
                        "FT-POISON",
                        f"Stage {sv.name} exited (code {ex.get('returncode')}) at {ctx.rel(ex['t'])}, "
                        f"{ex['t'] - put:.1f} s after a poison message was put in {q}{_restarts_note(sv, t0)}.",
                        sv.name, [q], t0, ex["t"], [poison[0], ex]))
            ptype = (poison[0].get("msg") or {}).get("type")
            pdel = [e for e in ctx.history.of("deliver") if e["t"] >= t0 and e.get("queue") == q
                    and (e.get("msg") or {}).get("type") == ptype and ptype == UNPARSEABLE]
            if pdel:
                delivered.append((pdel[0]["t"], len(poison), q, pdel[0]))
            times = sorted(e["t"] for e in ctx.history.of("deliver") if e.get("queue") == q)
            consumed = merge(iv for sv in readers for iv in sv.on(q))
            busy = intersect(intersect(ctx.levels.pos.get(q, []), consumed), [(t0, min(ctx.teardown, ctx.end))])
            gap = _first_silence(times, busy, 2 * W)
            if gap:
                findings.append(Finding(
                    "FT-POISON",
                    f"Queue {q} was blocked after the poison message: consumed and holding ready messages, yet "
                    f"nothing was delivered from it for {gap[1] - gap[0]:.1f} s ({ctx.span(*gap)}).",
                    None, [q], gap[0], gap[1], poison[:1]))
    findings += _requeued_poison(ctx, {f.get("target") for f in faults})
    findings += _unreported_poison(ctx, delivered, problems)
    if judged == 0 and not findings and not unjudged:
        return ClauseResult("FT-POISON", "not_exercised", f"{len(faults)} poison faults, no poison publish into a consumed queue seen")
    return _result(ctx, "FT-POISON", findings, judged, f"{judged} poison messages judged", unjudged)


def _requeued_poison(ctx: Context, queues: set) -> list[Finding]:
    """(b) over the whole run, per poisoned queue: Unparseable deliveries from it number at most twice the
    harness's Unparseable publishes into it. Counted over the run, not per fault, because firehose
    stamps run late under load and would hand one fault's poison to the next fault's window."""
    findings = []
    for q in sorted(x for x in queues if x):
        published = sum(1 for e in ctx.history.of("publish") if e.get("routing_key") == q
                        and e.get("stage") in ("harness", None) and (e.get("msg") or {}).get("type") == UNPARSEABLE)
        pdel = [e for e in ctx.history.of("deliver") if e.get("queue") == q
                and (e.get("msg") or {}).get("type") == UNPARSEABLE]
        if published and len(pdel) > 2 * published:
            findings.append(Finding(
                "FT-POISON",
                f"The {published} poison message(s) put in {q} were delivered {len(pdel)} times (from "
                f"{ctx.rel(pdel[0]['t'])} to {ctx.rel(pdel[-1]['t'])}): they are requeued instead of rejected.",
                pdel[0].get("stage"), [q], pdel[0]["t"], pdel[-1]["t"], pdel[:3]))
    return findings


def _unreported_poison(ctx: Context, delivered, problems: list[float]) -> list[Finding]:
    """(c) one ProblemMessage for each poison message: for every fault, the ProblemMessages from its
    first poison delivery on (0.5 s of clock slack) must number at least the poison messages of
    that fault and of every fault delivered after it. Not judged within W of the end of the run."""
    delivered = sorted(delivered, key=lambda d: d[0])
    for k in reversed(range(len(delivered))):  # the latest shortfall is the most specific
        first, _, q, delivery = delivered[k]
        owed = sum(n for _, n, _, _ in delivered[k:])
        reported = len(problems) - bisect.bisect_left(problems, first - 0.5)
        if reported < owed and ctx.end - first > ctx.windows.W:
            stage = delivery.get("stage")
            return [Finding("FT-POISON",
                            f"Stage {stage} received poison from {q} at {ctx.rel(first)}: {owed} poison message(s) "
                            f"from then on, but only {reported} ProblemMessage(s) were reported "
                            f"({'no ProblemMessage' if reported == 0 else 'one is owed for each'}).",
                            stage, [q], first, ctx.end, [delivery])]
    return []


@clause("FT-RECONNECT", "after a broker-side close the stage reconnects and obeys the rules again")
def check_reconnect(ctx: Context) -> ClauseResult:
    """Rule, per connection-close fault on stage S, timed from the broker's connection_closed (or
    channel_closed) for S within 30 s of the request: (a) S does not exit before it consumes again,
    unless its restart policy restarted it after a non-zero exit (the supervisor's restart is the
    reconnect; every exit before S consumes again must be one); (b) S creates a consumer again
    within G of the close, or of its last supervisor restart (not judged when the run ends first);
    (c) it holds a consumer on its first queue within W of that first new consumer; (d) no planned
    object is lost (nothing is still owed in the run's ledger, as DL-EXACTLY-ONCE reads it;
    duplicates allowed). A close counts as judged only when S's queues held ready work for 2W in all
    after it (after the supervisor restart, when one answered an exit), and not when the run ended
    within G of it before S consumed again; a finding fails the clause either way."""
    faults = [f for f in _faults(ctx, "reconnect") if f["t"] < ctx.teardown]
    if not faults:
        return ClauseResult("FT-RECONNECT", "not_exercised", "0 connection closes")
    # The fault closes connections; a channel close stands in only when no connection close was seen
    # (a stage closing a channel of its own is not the fault taking effect).
    conn_closes, chan_closes = ctx.history.of("connection_closed"), ctx.history.of("channel_closed")
    findings, judged, supervised, unjudged = [], 0, 0, []
    for f in faults:
        name = f.get("target")
        sv = ctx.stages.get(name)
        if sv is None:
            continue
        # the broker's close, not the request (closing via the management API takes 1-3 s); a close
        # at teardown is the harness stopping the stage, not the fault taking effect
        a, b = f["t"] - 1, min(f["t"] + FAULT_EFFECT_WINDOW, ctx.teardown)
        ev = (_first_after(conn_closes, a, b, lambda e: e.get("stage") == name)
              or _first_after(chan_closes, a, b, lambda e: e.get("stage") == name))
        # A stage that exits has lost its connection by then: when the observer could not tie the
        # fault's close to the stage (its close stamped without a stage), its exit marks the close.
        ex = _exit_between(sv, a, ev["t"] if ev is not None else b, ctx)
        if ex is not None and (ev is None or ex["t"] < ev["t"]):
            ev = {**ex, "t": ex["t"] - 0.01}
        if ev is None:
            continue
        tc = ev["t"]
        short, since = _judge_reconnect(ctx, sv, ev, findings)
        if short is None:
            judged += 1
        else:
            unjudged.append((f, tc, short))
        supervised += since != tc
    if judged == 0 and not findings and not unjudged:
        return ClauseResult("FT-RECONNECT", "not_exercised",
                            f"{len(faults)} connection-close faults, the broker closed no stage connection")
    ledger = tally(ctx)  # the run's ledger (harness/ledger.py), shared with DL-EXACTLY-ONCE
    lost = ledger.lost
    if lost:
        findings.append(Finding("FT-RECONNECT",
                                f"{len(lost)} of {len(ledger.expected)} objects were lost across the reconnect: {_ex(lost)}.",
                                None, [], None, None, [{"lost": [list(k) for k in lost[:50]]}]))
    exercised = f"{judged} connection closes judged" + (f" ({supervised} answered by a supervisor restart)"
                                                           if supervised else "")
    return _result(ctx, "FT-RECONNECT", findings, judged, exercised, unjudged)


def _judge_reconnect(ctx: Context, sv, ev: dict, findings: list[Finding]) -> tuple[str | None, float]:
    """Rules (a)-(c) of check_reconnect for one close ``ev`` of stage ``sv``; findings go to ``findings``.
    Returns why the close is not judged (None: it is) and the instant the stage could act again from:
    the close, or the supervisor restart that answered an exit after it."""
    W, G = ctx.windows.W, ctx.windows.G
    name, tc = sv.name, ev["t"]
    again = sorted(c.start for c in sv.consumers if c.start > tc)
    tr = again[0] if again else None
    until = min(tr if tr is not None else ctx.teardown, ctx.teardown)
    ex, restart = _exit_between(sv, tc, until, ctx), None
    while ex is not None and (answer := _supervisor_restart(sv, ex)) is not None:
        restart = answer
        ex = _exit_between(sv, ex["t"], until, ctx)
    since = restart["t"] if restart is not None else tc
    short = _shortfall(ctx, [sv], sv.reads, since,
                       f"its supervisor restart at {ctx.rel(since)}" if restart is not None else "it")
    if ex is not None:
        findings.append(Finding(
            "FT-RECONNECT",
            f"Stage {name} exited (code {ex.get('returncode')}) at {ctx.rel(ex['t'])} instead of reconnecting "
            f"after the broker closed its connection at {ctx.rel(tc)} ({_not_restarted(sv, ex, tc)}).",
            name, [], tc, ex["t"], [ev, ex]))
        return short, tc
    if tr is None or tr - since > G:
        left = min(ctx.end, ctx.teardown) - since
        if left <= G:  # the run ended before the stage had to be back
            return (f"the run ended {left:.1f} s after "
                    f"{'its supervisor restart' if restart is not None else 'it'}, before the stage consumed "
                    f"again (it has G = {G:g} s)"), since
        after = f"its supervisor restart at {ctx.rel(since)}" if restart is not None else \
            f"the broker closed its connection at {ctx.rel(tc)}"
        findings.append(Finding(
            "FT-RECONNECT",
            f"Stage {name} did not consume again within G = {G:g} s after {after}.",
            name, [], since, since + G, [ev]))
        return short, since
    if sv.priority:
        q0 = sv.priority[0]
        if not any(c.queue == q0 and c.start < tr + W and c.end > tc for c in sv.consumers if c.start > tc):
            findings.append(Finding(
                "FT-RECONNECT",
                f"Stage {name} reconnected at {ctx.rel(tr)} but held no consumer on its first queue {q0} "
                f"within W = {W:g} s.", name, [q0], tr, tr + W, [ev]))
    return short, since



# Result types a stage publishes for an object: their scan shows whose work it did.
RESULT_TYPES = ("MatchesMessage", "MetadataMessage")


@clause("FT-BAD-COMMAND", "a malformed broadcast message does not stop, wedge or slow any stage")
def check_bad_command(ctx: Context) -> ClauseResult:
    """Rule, per bad_command fault (malformed messages the harness published on the broadcast
    exchange) at time t: every stage alive at t must (a) not exit before teardown (a restart by its
    policy does not excuse the exit: the stage stopped); (b) while any queue it reads holds ready
    messages (observed non-empty) after t, receive a delivery at least every 2W (a wedged or stalled
    stage receives nothing); (c) let a later valid command take effect: when the admin aborts a scan
    after t, no stage publishes a result of that scan more than W after the abort. A (fault, stage)
    pair counts as judged only when the stage's queues held ready work for 2W in all after t; a
    finding fails the clause either way."""
    W = ctx.windows.W
    faults = [f for f in ctx.history.of("fault") if f.get("kind") == "bad_command" and f["t"] < ctx.teardown]
    if not faults:
        return ClauseResult("FT-BAD-COMMAND", "not_exercised", "0 malformed-command faults")
    deliv = _deliveries(ctx)
    findings, judged, unjudged = [], 0, []
    for f in faults:
        t = f["t"]
        for sv in [sv for sv in ctx.stages.values() if any(a <= t < b for a, b in sv.lives)]:
            short = _shortfall(ctx, [sv], sv.reads, t, after="the malformed commands")
            if short:
                unjudged.append(f"{sv.name}: {short}")
            else:
                judged += 1
            ex = _exit_between(sv, t, ctx.teardown, ctx)
            if ex is not None:
                findings.append(Finding(
                    "FT-BAD-COMMAND",
                    f"Stage {sv.name} exited (code {ex.get('returncode')}) at {ctx.rel(ex['t'])}, "
                    f"{ex['t'] - t:.1f} s after malformed messages on the broadcast exchange"
                    f"{_restarts_note(sv, t)}.", sv.name, [], t, ex["t"], [f, ex]))
                continue
            work = intersect(merge(iv for q in sv.reads for iv in ctx.levels.pos.get(q, ())),
                             [(t, min(ctx.teardown, ctx.end))])
            gap = _first_silence(deliv.get(sv.name, []), work, 2 * W) if ctx.history.of("deliver") else None
            if gap:
                findings.append(Finding(
                    "FT-BAD-COMMAND",
                    f"Stage {sv.name} received nothing for {gap[1] - gap[0]:.1f} s ({ctx.span(*gap)}) after "
                    f"malformed messages on the broadcast exchange at {ctx.rel(t)}, although its queues held "
                    f"ready messages: it is wedged or stalled.", sv.name, sv.reads, gap[0], gap[1], [f]))
    findings += _aborts_ignored(ctx, min(f["t"] for f in faults))
    text = f"{judged} stage(s) judged after {len(faults)} malformed-command fault(s)"
    if unjudged:
        text += "; not judged: " + "; ".join(unjudged)
    return ClauseResult("FT-BAD-COMMAND", "failed" if findings else "passed" if judged else "not_exercised",
                        text, findings)


def _aborts_ignored(ctx: Context, since: float) -> list[Finding]:
    """(c) results of a scan aborted after ``since`` that a stage published more than W after the abort."""
    findings = []
    for abort in ctx.history.of("phase"):
        if abort.get("name") != "scan_aborted" or abort["t"] < since:
            continue
        late = [e for e in ctx.history.of("publish") if e["t"] > abort["t"] + ctx.windows.W
                and e.get("stage") not in ("harness", None) and (e.get("msg") or {}).get("scan") == abort.get("scan")
                and (e.get("msg") or {}).get("type") in RESULT_TYPES]
        if late:
            findings.append(Finding(
                "FT-BAD-COMMAND",
                f"Scan {abort.get('scan')} was aborted at {ctx.rel(abort['t'])}, after malformed messages on the "
                f"broadcast exchange, yet {len(late)} of its results were published from {ctx.rel(late[0]['t'])} "
                f"on (more than W = {ctx.windows.W:g} s later): the abort did not take effect.",
                late[0].get("stage"), [], abort["t"], late[-1]["t"], [abort, late[0]]))
    return findings
