"""The README's clause table names every registered clause, in SPEC.md's order."""
from __future__ import annotations

import re
from pathlib import Path

from harness.checkers import registry

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_clause_table_lists_every_clause_in_order():
    text = README.read_text()
    table = text.split("| family | clauses |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"\b([A-Z]{2}-[A-Z0-9-]+[A-Z0-9])\b", table)
    assert listed == list(registry.clause_ids()), "update the clause table in README.md's 'What is checked'"
