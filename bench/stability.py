"""Stability: the suite and the fault matrix, N times each, against the reference engine.

    python bench/stability.py 10          # N = 10 (the issue's goal: 10/10 each)
    python bench/stability.py 5 --only suite             # the suite at both paces, 5 times each
    python bench/stability.py 5 --only suite --pace 0.1  # one pace only

The suite is run at each pace given with ``--pace`` (seconds per object of
the reference engine, set through ``--engine-env REFERENCE_WORK_SECONDS=...``
as for any engine; default: 0 and 0.1, OS2datascanner's pace), with one
RESULT line per pace.

Each repetition is a fresh ``python -m pytest`` run with two xdist workers.
For the suite, a repetition counts as green when every test passed. For the
fault matrix, each row is counted on its own: a fault row is a detection when
its test passed (every declared clause failed, nothing else did), a clean row
when the unfaulted engine failed nothing. The JUnit XML and the report
folders of each run are kept under reports/stability/, one per repetition
(``suite-0.1s-3/``), so that a failure of an early run can still be read.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "stability"


def run(paths: list[str], junit: Path, *extra: str) -> tuple[int, float]:
    command = [sys.executable, "-m", "pytest", *paths, "-n", "2", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *extra]
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return code, time.monotonic() - started


def outcomes(junit: Path) -> dict[str, bool]:
    """test name -> passed, from a JUnit XML file (skipped tests left out)."""
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        if not skipped:
            results[case.get("name")] = not failed
    return results


def suite_runs(n: int, pace: float) -> str:
    """The suite n times at one pace; its RESULT line."""
    green = 0
    for i in range(1, n + 1):
        junit = OUT / f"suite-{pace:g}s-{i}.xml"
        code, wall = run(["suites"], junit, "--engine-env", f"REFERENCE_WORK_SECONDS={pace:g}",
                         "--qp-report-dir", f"reports/stability/suite-{pace:g}s-{i}")
        failed = sorted(n for n, ok in outcomes(junit).items() if not ok) if junit.exists() else ["(no report)"]
        green += code == 0
        print(f"suite run {i}/{n} at {pace:g} s per object: exit {code}, {wall:.0f} s"
              + (f", failed: {failed}" if failed else ""), flush=True)
    verdict = "PASS" if green == n else "FAIL"
    return f"RESULT suite_green_runs_at_{pace:g}s {green} runs goal >={n} {verdict}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, help="repetitions of each")
    parser.add_argument("--only", choices=["suite", "matrix"], help="run only one of the two")
    parser.add_argument("--pace", type=float, action="append",
                        help="seconds per object for the suite runs (repeatable; default 0 and 0.1)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    if args.only in (None, "suite"):
        for pace in args.pace or [0.0, 0.1]:
            lines.append(suite_runs(args.n, pace))
    if args.only in (None, "matrix"):
        passed: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        for i in range(1, args.n + 1):
            junit = OUT / f"matrix-{i}.xml"
            code, wall = run(["tests/test_fault_matrix.py"], junit, "--qp-report-dir", f"reports/stability/matrix-{i}")
            results = outcomes(junit) if junit.exists() else {}
            for name, ok in results.items():
                seen[name] += 1
                passed[name] += ok
            bad = sorted(name for name, ok in results.items() if not ok)
            print(f"matrix run {i}/{args.n}: exit {code}, {wall:.0f} s" + (f", failed: {bad}" if bad else ""),
                  flush=True)
        print("\nper row (passes / runs):")
        for name in sorted(seen):
            print(f"  {passed[name]:>3}/{seen[name]:<3} {name}")
        faults = [n for n in seen if "fault_is_caught" in n]
        clean = [n for n in seen if "conformant_engine" in n]
        detected = sum(1 for n in faults if passed[n] == seen[n] == args.n)
        quiet = sum(1 for n in clean if passed[n] == seen[n] == args.n)
        print(f"\nfault rows detected in all {args.n} runs: {detected}/{len(faults)}; "
              f"clean rows green in all {args.n} runs: {quiet}/{len(clean)}")
        lines.append(f"RESULT fault_rows_detected_every_run {detected} faults "
                     f"goal >={len(faults)} {'PASS' if detected == len(faults) else 'FAIL'}")
        lines.append(f"RESULT clean_rows_green_every_run {quiet} scenarios "
                     f"goal >={len(clean)} {'PASS' if quiet == len(clean) else 'FAIL'}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
