"""DL-EXACTLY-ONCE: every planned object produces exactly one result (Jepsen total-queue style)."""
from __future__ import annotations

from harness.checkers._common import Context
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause
from harness.checkers.rt import routing
from harness.ledger import RESULT_QUEUE, Ledger

EXAMPLES = 5


def tally(ctx: Context) -> Ledger:
    """Results are MatchesMessages routed to os2ds_matches, problems ProblemMessages naming an object
    routed to os2ds_problems. Two sources see them: the tracer's publishes and the observer's reads of
    the output queues (``output``). Each can miss some (a broker restart loses the tracer's backlog;
    an output queue may not be read), so an object counts the larger of the two numbers, with outputs
    the broker handed out again after a restart not counted twice. An object with no result but a
    problem is reported, not lost. Not lost either: an object whose conversion was still in a queue a
    delete_queue fault deleted (dropped by the fault), and one whose conversion no queue received
    (RT-ROUTABLE names that publish; one cause, one finding). The account is the run's ledger
    (harness/ledger.py), the same the runner waits on live."""
    cached = getattr(ctx.history, "_qp_ledger", None)
    if cached is not None and cached[0] is ctx:
        return cached[1]
    ledger = Ledger.of(ctx.history.events, unroutable=routing(ctx).unroutable)
    try:
        ctx.history._qp_ledger = (ctx, ledger)
    except AttributeError:
        pass
    return ledger


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

