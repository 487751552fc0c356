"""Wall time of the conformance suite against the reference engine.

Runs ``pytest suites -n 2`` twice in one go, with a 5 s and a 1 s check
period (the engine's PRIORITY_CHECK_SECONDS and the harness's --check-period
set together), and prints the wall time of each.

    python bench/suite_time.py            # both periods
    python bench/suite_time.py --period 1 # one
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {5.0: 300.0, 1.0: 120.0}  # check period -> wall-time goal in seconds


def run_suite(period: float, workers: int) -> tuple[float, int]:
    command = [sys.executable, "-m", "pytest", "suites", "-q", "-n", str(workers),
               "--check-period", str(period), "--engine-env", f"PRIORITY_CHECK_SECONDS={period}"]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    return time.monotonic() - started, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--period", type=float, action="append", help="check period(s) to run (default 5 and 1)")
    parser.add_argument("-n", "--workers", type=int, default=2)
    args = parser.parse_args()
    periods = args.period or [5.0, 1.0]
    lines = []
    for period in periods:
        wall, code = run_suite(period, args.workers)
        print(f"check period {period:g} s: suite wall time {wall:.1f} s, pytest exit code {code}", flush=True)
        goal = GOALS.get(period, 300.0)
        verdict = "PASS" if wall <= goal and code == 0 else "FAIL"
        lines.append(f"RESULT suite_wall_time_period_{period:g}s {wall:.1f} s goal <={goal:g} {verdict}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
