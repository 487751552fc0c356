"""DL-EXACTLY-ONCE: every planned object produces exactly one result (Jepsen total-queue style)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from harness.checkers._common import Context, fault_family
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause
from harness.checkers.rt import routing

RESULT_QUEUE = "os2ds_matches"
PROBLEM_QUEUE = "os2ds_problems"
EXAMPLES = 5


def _obj(path):
    return path.lstrip("/") if isinstance(path, str) else path


@dataclass
class Tally:
    expected: set = field(default_factory=set)
    results: Counter = field(default_factory=Counter)     # (scan, object) -> MatchesMessages
    problems: Counter = field(default_factory=Counter)    # (scan, object) -> ProblemMessages with an object
    scans: int = 0
    source: str = ""
    gone: set = field(default_factory=set)  # objects whose conversion went to a queue a fault deleted
    aborted: set = field(default_factory=set)  # scans the admin aborted with a command
    redelivered: set = field(default_factory=set)  # objects (or (scan, None) for a spec) handed out again
    unroutable: set = field(default_factory=set)  # objects whose conversion no queue received (RT-ROUTABLE's)

    @property
    def lost(self) -> list:
        return sorted(k for k in self.expected if not self.results.get(k) and not self.problems.get(k)
                      and k not in self.gone and k not in self.unroutable and k[0] not in self.aborted)

    @property
    def dropped_by_fault(self) -> list:
        return sorted(k for k in self.gone if not self.results.get(k) and not self.problems.get(k))

    @property
    def dropped_unroutable(self) -> list:
        return sorted(k for k in self.unroutable if not self.results.get(k) and not self.problems.get(k))

    @property
    def duplicated(self) -> dict:
        return {k: n for k, n in sorted(self.results.items()) if n > 1}

    def after_redelivery(self, key) -> bool:
        """A duplicate a redelivery explains: its conversion, or its scan's spec, was delivered again
        (or the harness published the scan's messages again after a planned broker restart)."""
        return key in self.redelivered or (key[0], None) in self.redelivered

    @property
    def unexpected(self) -> list:
        return sorted(k for k in self.results if k not in self.expected)

    @property
    def as_problem(self) -> list:
        return sorted(k for k in self.expected if not self.results.get(k) and self.problems.get(k))


def tally(ctx: Context) -> Tally:
    """Results are MatchesMessages routed to os2ds_matches, problems ProblemMessages naming an object
    routed to os2ds_problems. Two sources see them: the tracer's publishes and the observer's reads of
    the output queues (``output``). Each can miss some (a broker restart loses the tracer's backlog;
    an output queue may not be read), so an object counts the larger of the two numbers, with outputs
    the broker handed out again after a restart not counted twice. An object with no result but a
    problem is reported, not lost. Not lost either: an object whose conversion was still in a queue a
    delete_queue fault deleted (dropped by the fault), and one whose conversion no queue received
    (RT-ROUTABLE names that publish; one cause, one finding)."""
    t = Tally()
    plans = ctx.history.of("scan_planned")
    t.scans = len(plans)
    for p in plans:
        for o in p.get("objects") or ():
            t.expected.add((p.get("scan"), _obj(o)))
    published = [e for e in ctx.history.of("publish") if e.get("exchange", "") == "" and
                 e.get("routing_key") in (RESULT_QUEUE, PROBLEM_QUEUE)]
    read = [e for e in ctx.history.of("output") if e.get("queue") in (RESULT_QUEUE, PROBLEM_QUEUE)
            and not e.get("redelivered")]
    t.source = " and ".join(name for name, evs in (("published", published), ("read from output queues", read))
                            if evs) or "none"
    from_publishes = _count(published, "routing_key")
    from_reads = _count(read, "queue")
    for kind, counter in (("results", t.results), ("problems", t.problems)):
        a, b = from_publishes[kind], from_reads[kind]
        for k in set(a) | set(b):
            counter[k] = max(a[k], b[k])
    t.gone = _dropped_with_deleted_queues(ctx)
    t.unroutable = {(m.get("scan"), _obj(m.get("object"))) for m in
                    ((e.get("msg") or {}) for e in routing(ctx).unroutable) if m.get("type") == "ConversionMessage"}
    t.aborted = {p.get("scan") for p in ctx.history.of("phase") if p.get("name") == "scan_aborted"}
    for e in ctx.history.of("phase"):
        if e.get("name") == "publish_resumed":  # the harness sent these scans' messages again
            t.redelivered.update((scan, None) for scan in e.get("scans") or ())
    for e in ctx.history.of("deliver"):
        msg = e.get("msg") or {}
        if e.get("redelivered") and msg.get("type") == "ConversionMessage":
            t.redelivered.add((msg.get("scan"), _obj(msg.get("object"))))
        elif e.get("redelivered") and msg.get("type") == "ScanSpecMessage":
            t.redelivered.add((msg.get("scan"), None))
    return t


def _count(events, key) -> dict[str, Counter]:
    out = {"results": Counter(), "problems": Counter()}
    for e in events:
        msg = e.get("msg") or {}
        if msg.get("scan") is None:
            continue
        k = (msg.get("scan"), _obj(msg.get("object")))
        if e.get(key) == RESULT_QUEUE and msg.get("type") == "MatchesMessage":
            out["results"][k] += 1
        elif e.get(key) == PROBLEM_QUEUE and msg.get("type") == "ProblemMessage" and msg.get("object"):
            out["problems"][k] += 1
    return out


def _dropped_with_deleted_queues(ctx: Context) -> set:
    """Objects whose conversion was still in a queue when a delete_queue fault deleted it: published
    to that queue and not delivered from it before the deletion (the broker's queue_deleted, else
    the fault). An object a stage had already taken is the stage's to finish."""
    deleted_at: dict[str, float] = {}
    for f in ctx.history.of("fault"):
        if fault_family(f.get("kind")) == "queue_gone":
            q = f.get("target")
            seen = [e["t"] for e in ctx.history.of("queue_deleted") if e.get("queue") == q and e["t"] >= f["t"] - 1]
            deleted_at.setdefault(q, min(seen) if seen else f["t"])
    if not deleted_at:
        return set()
    taken = set()
    for e in ctx.history.of("deliver"):
        msg = e.get("msg") or {}
        q = e.get("queue")
        if q in deleted_at and e["t"] < deleted_at[q] and msg.get("type") == "ConversionMessage":
            taken.add((msg.get("scan"), _obj(msg.get("object"))))
    gone = set()
    for e in ctx.history.of("publish"):
        msg = e.get("msg") or {}
        if msg.get("type") == "ConversionMessage" and e.get("routing_key") in deleted_at:
            gone.add((msg.get("scan"), _obj(msg.get("object"))))
    return gone - taken


def _ex(keys) -> str:
    keys = list(keys)
    shown = ", ".join(f"{o} ({s})" for s, o in keys[:EXAMPLES])
    return shown + (f", … {len(keys) - EXAMPLES} more" if len(keys) > EXAMPLES else "")


@clause("DL-EXACTLY-ONCE", "every object of every scan produces exactly one result", rule_from=tally)
def check_exactly_once(ctx: Context) -> ClauseResult:
    t = tally(ctx)
    allow = bool(ctx.scenario is not None and ctx.scenario.checks.allow_duplicates)
    lost, unexp = t.lost, t.unexpected
    # Allowed duplicates are those a redelivery explains; a result published twice for a message
    # that was handed out once is a bug even in a fault scenario.
    dup_all = t.duplicated
    dup = {k: n for k, n in dup_all.items() if not (allow and t.after_redelivery(k))}
    excused = len(dup_all) - len(dup)
    metrics = {"expected": len(t.expected), "lost": len(lost), "duplicated": len(dup), "unexpected": len(unexp),
               "as_problem": len(t.as_problem), "dropped_by_fault": len(t.dropped_by_fault),
               "dropped_unroutable": len(t.dropped_unroutable),
               "results": sum(t.results.values()), "source": t.source,
               "duplicates_allowed": allow}
    exercised = f"{len(t.expected)} objects of {t.scans} scans checked"
    if not t.expected and not t.results:
        return ClauseResult("DL-EXACTLY-ONCE", "not_exercised", "0 objects planned", [], metrics)
    findings = []
    if lost:
        findings.append(Finding("DL-EXACTLY-ONCE",
                                f"{len(lost)} of {len(t.expected)} objects produced no result: {_ex(lost)}.",
                                None, [RESULT_QUEUE], None, None, [{"lost": [list(k) for k in lost[:50]]}]))
    if dup:
        findings.append(Finding("DL-EXACTLY-ONCE",
                                f"{len(dup)} objects produced more than one result "
                                f"({sum(dup.values())} results in all): {_ex(dup)}.",
                                None, [RESULT_QUEUE], None, None,
                                [{"duplicated": [[s, o, n] for (s, o), n in list(dup.items())[:50]]}]))
    if unexp:
        findings.append(Finding("DL-EXACTLY-ONCE",
                                f"{len(unexp)} results are for objects no scan planned: {_ex(unexp)}.",
                                None, [RESULT_QUEUE], None, None, [{"unexpected": [list(k) for k in unexp[:50]]}]))
    if excused:
        exercised += f" ({excused} duplicated after a redelivery, allowed)"
    if t.aborted:
        exercised += f" ({len(t.aborted)} aborted scan(s): missing results excused)"
    if t.dropped_by_fault:
        exercised += f" ({len(t.dropped_by_fault)} dropped with a queue a fault deleted, excused)"
    if t.dropped_unroutable:
        exercised += f" ({len(t.dropped_unroutable)} whose conversion no queue received: RT-ROUTABLE's finding)"
    return ClauseResult("DL-EXACTLY-ONCE", "failed" if findings else "passed", exercised, findings, metrics)

