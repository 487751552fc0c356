"""Faults that can be switched on on purpose: ``REFERENCE_ENGINE_FAULTS=name[,name...]``.

Each fault is a realistic bug a reviewer of a real engine would fear. The list, with what each
does, the SPEC.md clauses it must break and the scenario that exposes it, is the harness's fault
registry (``harness.faults.ENGINE_FAULTS``), read here only for its names; what a fault does is
implemented where the stage would go wrong (``settings.has(name)``).

``python -m reference_engine.faults`` prints the table (``--json`` for JSON, ``--markdown`` for
the docs table); ``python -m harness faults`` prints every kind of fault.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

from harness.faults import ENGINE_FAULTS as FAULTS
from harness.faults import engine_fault_table as markdown_table


def parse_faults(value: str | None) -> frozenset[str]:
    """The fault names in ``REFERENCE_ENGINE_FAULTS`` (comma or whitespace separated).

    Raises ValueError naming any unknown fault.
    """
    if not value:
        return frozenset()
    names = [n.strip() for n in value.replace(",", " ").split() if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return frozenset(names)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--json" in argv:
        print(json.dumps({n: asdict(f) for n, f in FAULTS.items()}, indent=2))
    elif "--markdown" in argv:
        print(markdown_table())
    else:
        width = max(len(n) for n in FAULTS)
        for f in FAULTS.values():
            extra = f"  (may also: {', '.join(f.may_also)})" if f.may_also else ""
            print(f"{f.name:<{width}}  {', '.join(f.clauses)}{extra}")
            print(f"{'':<{width}}  [{', '.join(f.stages)}] {f.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
