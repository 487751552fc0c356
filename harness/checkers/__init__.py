"""Checkers: pure functions from a history (and its scenario) to one ``ClauseResult`` per clause.

``check_all(history, scenario, windows)`` is the entry point; ``CLAUSES`` lists every clause of
SPEC.md in its order with a one-line title, read from the registry (``registry.py``) where each
family module (qp, rt, dl, cf, ft, ps) registers its checkers. A checker's docstring states the exact
rule it implements.
"""
from __future__ import annotations

from harness.checkers import registry
from harness.checkers._common import Context, build_context
from harness.checkers.model import SPEC_DEFAULT, ClauseResult, Finding, Windows

CLAUSES: list[tuple[str, str]] = [(c.id, c.title) for c in registry.all_clauses()]
CLAUSE_IDS = [c for c, _ in CLAUSES]
TITLES = dict(CLAUSES)


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
    """Each clause id -> the exact rule its checker implements, constants filled in."""
    return {c.id: c.rule for c in registry.all_clauses()}


def lint(scenario) -> list[ClauseResult]:
    """The static clauses (CF-*) only: needs no history and no broker."""
    return [c.check(scenario) for c in registry.all_clauses() if c.static]


def check_all(history, scenario=None, windows: Windows | None = None,
              clauses: list[str] | None = None) -> list[ClauseResult]:
    """Judge every selected clause (``clauses``, else scenario.checks.clauses, else all), in CLAUSES order."""
    windows = windows or windows_for(scenario)
    wanted = select(clauses if clauses is not None else (scenario.checks.clauses if scenario is not None else None))
    ctx = None
    out = []
    for cid in wanted:
        clause = registry.get(cid)
        if clause.static:
            if scenario is None:
                out.append(ClauseResult(cid, "not_exercised", "no scenario given"))
            else:
                out.append(clause.check(scenario))
            continue
        try:
            if ctx is None:
                ctx = build_context(history, scenario, windows)
            out.append(clause.check(ctx))
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
