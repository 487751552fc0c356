"""The clause registry: every clause of SPEC.md once, with everything the harness needs to know of it.

A family module (qp, rt, dl, cf, ft, ps) registers each of its checkers with ``@clause(id, title)``;
scenario validation, ``python -m harness clauses``, the report, the fault matrix and the suite
markers all read the registry, so a new clause is written down in exactly one place.

The rule text of a clause is its checker's docstring (or ``rule_from``'s) with ``{NAME}``
filled in from the checker module's upper-case constants, so the text states the numbers the
code uses.
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable

from harness.checkers.model import ClauseResult

# SPEC.md's order of families; within a family, the order of registration (the modules' order).
FAMILY_ORDER = ("QP", "RT", "DL", "CF", "FT", "PS")


@dataclass(frozen=True)
class Clause:
    id: str
    title: str  # one line, for listings and reports
    check: Callable  # history clause: Context -> ClauseResult; static clause: Scenario -> ClauseResult
    static: bool = False  # judged on the scenario's configuration alone, no broker
    rule_from: Callable | None = None  # where the exact rule is written, when not the checker's docstring
    metric: Callable[[ClauseResult], str] | None = None  # a figure for the summary, e.g. switch latency

    @property
    def family(self) -> str:
        return self.id.split("-")[0]

    @property
    def rule(self) -> str:
        """The exact rule the checker implements, constants filled in."""
        source = self.rule_from or self.check
        constants = vars(sys.modules[source.__module__])
        return re.sub(r"\{([A-Z][A-Z0-9_]*)\}", lambda m: _constant(constants, m), inspect.getdoc(source) or "")


def _constant(constants: dict, match: re.Match) -> str:
    value = constants.get(match.group(1))
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value) if value is not None else match.group(0)


_REGISTRY: dict[str, Clause] = {}


def clause(clause_id: str, title: str, *, static: bool = False, rule_from: Callable | None = None,
           metric: Callable[[ClauseResult], str] | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated function as the checker of ``clause_id``."""
    if clause_id.split("-")[0] not in FAMILY_ORDER:
        raise ValueError(f"{clause_id}: unknown family; known: {', '.join(FAMILY_ORDER)}")

    def register(check: Callable) -> Callable:
        if clause_id in _REGISTRY:
            raise ValueError(f"{clause_id} registered twice ({_REGISTRY[clause_id].check.__qualname__}, "
                             f"{check.__qualname__})")
        _REGISTRY[clause_id] = Clause(clause_id, title, check, static, rule_from, metric)
        return check
    return register


def all_clauses() -> list[Clause]:
    """Every registered clause in SPEC.md's order."""
    _load_families()
    order = list(_REGISTRY)
    return sorted(_REGISTRY.values(), key=lambda c: (FAMILY_ORDER.index(c.family), order.index(c.id)))


def clause_ids() -> tuple[str, ...]:
    return tuple(c.id for c in all_clauses())


def get(clause_id: str) -> Clause:
    _load_families()
    return _REGISTRY[clause_id]


def _load_families() -> None:
    # Importing the family modules registers their checkers.
    from harness.checkers import cf, dl, ft, ps, qp, rt  # noqa: F401
