"""Checkers: pure functions from a history (and its scenario) to one ``ClauseResult`` per clause.

``check_all(history, scenario, windows)`` is the entry point; ``CLAUSES`` lists every clause of
SPEC.md in its order with a one-line title. Each family module (qp, rt, dl, cf, ft) documents in
its functions' docstrings the exact rule it implements.
"""
from __future__ import annotations

from harness.checkers import cf, dl, ft, qp, rt
from harness.checkers._common import Context, build_context
from harness.checkers.model import SPEC_DEFAULT, ClauseResult, Finding, Windows

CLAUSES: list[tuple[str, str]] = [
    ("QP-DECLARE", "every QUEUE_PRIORITY queue exists within G of start"),
    ("QP-FIRST-PINNED", "the consumer on the first queue is never cancelled while running"),
    ("QP-ONE-LOWER", "never consumers on two lower queues at once"),
    ("QP-PRECEDENCE", "no lower queue consumed for W while a higher queue has ready messages"),
    ("QP-CANCEL-WINDOW", "the lower consumer is cancelled within W of work arriving above"),
    ("QP-PROGRESS", "allowed work is not left waiting for W"),
    ("QP-DRAIN-ORDER", "in a drain, each queue is emptied before the next one is served"),
    ("RT-ONE-TYPE", "each queue carries one message type"),
    ("RT-TENANT", "a client's conversions go to its full/delta queue; results carry its organisation"),
    ("RT-ROUTABLE", "no published message is dropped as unroutable"),
    ("RT-BROADCAST", "commands travel only on the broadcast exchange"),
    ("DL-EXACTLY-ONCE", "every object of every scan produces exactly one result"),
    ("CF-ALIGN", "every client queue is read by a stage of the right kind"),
    ("CF-NO-DUP", "no QUEUE_PRIORITY lists a queue twice"),
    ("CF-ONE-TYPE", "no queue is both an explorer and a conversion queue"),
    ("FT-QUEUE-GONE", "deleting a lower queue does not stop the stage"),
    ("FT-POISON", "an unparseable message is reported and removed, not a blocker"),
    ("FT-RECONNECT", "after a broker-side close the stage reconnects and obeys the rules again"),
]
CLAUSE_IDS = [c for c, _ in CLAUSES]
TITLES = dict(CLAUSES)

HISTORY_CHECKS = {**qp.CHECKS, **rt.CHECKS, **dl.CHECKS, **ft.CHECKS}
STATIC_CHECKS = cf.LINTS


def select(clauses: list[str] | None) -> list[str]:
    """The clause ids to judge: all by default; entries may be ids or family prefixes ('QP', 'QP-*')."""
    if not clauses:
        return list(CLAUSE_IDS)
    unknown = []
    chosen: set[str] = set()
    for c in clauses:
        c = c.strip().upper()
        fam = c.rstrip("*").rstrip("-")
        if c in TITLES:
            chosen.add(c)
        elif any(cid.split("-")[0] == fam for cid in CLAUSE_IDS):
            chosen |= {cid for cid in CLAUSE_IDS if cid.split("-")[0] == fam}
        else:
            unknown.append(c)
    if unknown:
        raise ValueError(f"unknown clause id(s): {', '.join(unknown)}; known: {', '.join(CLAUSE_IDS)}")
    return [c for c in CLAUSE_IDS if c in chosen]


def windows_for(scenario, base: Windows | None = None) -> Windows:
    """The scenario's own check_period/tolerance/grace where set, else ``base`` (command line / ini / SPEC)."""
    if base is None:
        base = Windows(sources={name: SPEC_DEFAULT for name in ("check_period", "tolerance", "grace")})
    if scenario is None:
        return base
    values, sources = {}, dict(base.sources)
    for name in ("check_period", "tolerance", "grace"):
        own = getattr(scenario.checks, name)
        values[name] = own if own is not None else getattr(base, name)
        if own is not None:
            sources[name] = f"scenario {scenario.name} checks.{name}" if scenario.name else f"scenario checks.{name}"
    return Windows(**values, sources=sources)


def rules() -> dict[str, str]:
    """Each clause id -> the exact rule its checker implements (its function's docstring)."""
    import inspect
    out = {}
    for cid in CLAUSE_IDS:
        fn = HISTORY_CHECKS.get(cid) or STATIC_CHECKS.get(cid)
        doc = inspect.getdoc(fn) or ""
        if cid == "QP-CANCEL-WINDOW":
            doc = inspect.getdoc(qp.cancel_latencies) or doc
        if cid == "DL-EXACTLY-ONCE":
            doc = inspect.getdoc(dl.tally) or doc
        out[cid] = doc
    return out


def lint(scenario) -> list[ClauseResult]:
    """CF-* only: needs no history and no broker."""
    return cf.lint(scenario)


def check_all(history, scenario=None, windows: Windows | None = None,
              clauses: list[str] | None = None) -> list[ClauseResult]:
    """Judge every selected clause (``clauses``, else scenario.checks.clauses, else all), in CLAUSES order."""
    windows = windows or windows_for(scenario)
    wanted = select(clauses if clauses is not None else (scenario.checks.clauses if scenario is not None else None))
    ctx = None
    out = []
    for cid in wanted:
        if cid in STATIC_CHECKS:
            if scenario is None:
                out.append(ClauseResult(cid, "not_exercised", "no scenario given"))
            else:
                out.append(STATIC_CHECKS[cid](scenario))
            continue
        try:
            if ctx is None:
                ctx = build_context(history, scenario, windows)
            out.append(HISTORY_CHECKS[cid](ctx))
        except Exception as exc:  # Jepsen's check-safe: one broken checker must not cost the others their verdict
            out.append(checker_error(cid, exc))
    return out


def checker_error(clause: str, exc: BaseException) -> ClauseResult:
    """The outcome of a checker that raised: no verdict, with the traceback for the report."""
    import traceback
    text = "".join(traceback.format_exception(exc))
    return ClauseResult(clause, "error", f"checker error: {type(exc).__name__}: {exc}",
                        metrics={"traceback": text})


__all__ = ["CLAUSES", "CLAUSE_IDS", "TITLES", "ClauseResult", "Context", "Finding", "Windows", "build_context",
           "check_all", "checker_error", "lint", "rules", "select", "windows_for"]
