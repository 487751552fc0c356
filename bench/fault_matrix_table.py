"""Turn the fault matrix's results into the README's table.

Run the matrix first (``python -m pytest tests/test_fault_matrix.py -n 2``);
each run leaves ``reports/fault-matrix/<row>.json``. This script prints the
table (fault x clause) and the kill rate, and with ``--write`` replaces the
table between the markers in README.md.

Cells: ``caught`` the clause failed as the fault's declaration says;
``(also)`` a declared side effect that failed too; ``MISSED`` a clause that
should have failed and did not; ``FALSE ALARM`` a clause that failed without
reason; blank: not expected, not failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.checkers import CLAUSE_IDS  # noqa: E402

RESULTS = ROOT / "reports" / "fault-matrix"
START, END = "<!-- fault-matrix:start -->", "<!-- fault-matrix:end -->"


def cell(clause: str, row: dict) -> str:
    failed, expected, allowed = set(row["failed"]), set(row["expected"]), set(row["allowed"])
    if clause in expected:
        return "caught" if clause in failed else "**MISSED**"
    if clause in failed:
        return "(also)" if clause in allowed else "**FALSE ALARM**"
    return ""


def build_table(rows: list[dict]) -> str:
    short = [c.split("-", 1)[1] for c in CLAUSE_IDS]
    lines = ["| fault (scenario) | " + " | ".join(short) + " |",
             "|---|" + "---|" * len(CLAUSE_IDS)]
    for row in rows:
        lines.append(f"| `{row['row']}` ({row['scenario']}) | " + " | ".join(cell(c, row) for c in CLAUSE_IDS) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    faults = [r for r in rows if r["expected"]]
    clean = [r for r in rows if not r["expected"]]
    killed = [r for r in faults if set(r["expected"]) <= set(r["failed"])]
    exact = [r for r in rows if all("**" not in cell(c, r) for c in CLAUSE_IDS)]
    covered = {c for r in faults for c in r["expected"] if c in r["failed"]}
    return [
        f"Kill rate: {len(killed)}/{len(faults)} faults caught by all their clauses "
        f"({100 * len(killed) // max(1, len(faults))} %).",
        f"Clauses tripped by at least one fault: {len(covered)}/{len(CLAUSE_IDS)} "
        f"({100 * len(covered) // len(CLAUSE_IDS)} %).",
        f"Rows with no MISSED and no FALSE ALARM: {len(exact)}/{len(rows)}; clean-engine rows: {len(clean)}.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not rows:
        print(f"no results under {RESULTS}; run the fault matrix first", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: (not r["expected"], r["row"]))
    text = build_table(rows) + "\n\n" + "\n".join(summary(rows))
    print(text)
    if args.write:
        readme = ROOT / "README.md"
        content = readme.read_text()
        if START not in content or END not in content:
            print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
            return 2
        head, rest = content.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
        print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
