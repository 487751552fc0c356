"""The largest class and the largest function of harness/, in lines (STYLE: classes <= 300, functions <= 80).

    python bench/code_size.py [--top 5] [--classes 300] [--functions 80]

Lines are counted from the ``def``/``class`` line (decorators excluded) to the
last line of the body. Nested functions count on their own and inside their parent.
The last two lines are ``RESULT largest_class_lines N lines goal <=300 PASS|FAIL``
and ``RESULT largest_function_lines N lines goal <=80 PASS|FAIL``.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sizes(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, 'path:line name') of every class and of every function under ``root``."""
    classes, functions = [], []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                (classes if isinstance(node, ast.ClassDef) else functions).append((lines, where))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5, help="how many of each to list (default 5)")
    parser.add_argument("--classes", type=int, default=300, help="largest class allowed (default 300)")
    parser.add_argument("--functions", type=int, default=80, help="largest function allowed (default 80)")
    args = parser.parse_args()
    classes, functions = sizes(ROOT / "harness")
    for title, found, goal in (("classes", classes, args.classes), ("functions", functions, args.functions)):
        print(f"largest {title} (goal <= {goal} lines):")
        for lines, where in found[:args.top]:
            print(f"  {lines:5d}  {where}{'  OVER' if lines > goal else ''}")
    for name, found, goal in (("largest_class_lines", classes, args.classes),
                              ("largest_function_lines", functions, args.functions)):
        largest = found[0][0] if found else 0
        print(f"RESULT {name} {largest} lines goal <={goal} {'PASS' if largest <= goal else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
