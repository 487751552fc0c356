"""The pace matrix: the whole conformance suite passes, every asserted clause exercised, at very different paces.

A verdict that changes with the engine's speed is a harness bug. Each point of
the matrix runs ``pytest suites/ -n 2`` in a child process against this
session's broker (the external provider: per-test vhosts, no broker start), with the
reference engine slowed down or its prefetch changed only through
``--engine-env``, as a user would configure any engine. The plain suite run
(``.ci/run suites``) is the remaining point: 0 s per object, prefetch 2.

The points (DESIGN.md: OS2datascanner's worker handles about 10 objects/s, a
bare engine thousands) cross the two settings, so that two runs cover four
values and CI stays within its time:
- 0 s per object with prefetch 1: a fast engine that takes one message at a time, its stages run
  detached (harness.detach), as in a container or on another host;
- 0.1 s per object (OS2datascanner's pace) with prefetch 10: a slow engine that
  holds a second's work in its prefetch when it is told to move.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

POINTS = {
    "0s-prefetch-1": ["REFERENCE_WORK_SECONDS=0", "REFERENCE_PREFETCH=1"],
    "0.1s-prefetch-10": ["REFERENCE_WORK_SECONDS=0.1", "REFERENCE_PREFETCH=10"],
}
# The fast point also runs every stage detached from the process the harness launches (harness.detach:
# a double fork into a session of its own, as docker run or ssh give), so the whole suite is judged
# with the stages attributed by their own broker users and not by the process tree. --engine-cmd names
# "another engine" then, so its windows are given as a user would give them.
PYTHON = shlex.quote(sys.executable)
DETACHED = {"0s-prefetch-1": ["--engine-cmd", f"{PYTHON} -m harness.detach {PYTHON} -m reference_engine.run_stage {{stage}}",
                              "--check-period", "1", "--engine-env", "PRIORITY_CHECK_SECONDS=1"]}
TIMEOUT = 1200  # seconds for one child suite run


def child_command(broker, point: str) -> list[str]:
    settings = [arg for entry in POINTS[point] for arg in ("--engine-env", entry)]
    return [sys.executable, "-m", "pytest", "suites", "-n", "2", "-p", "no:cacheprovider", "-q",
            "--rabbitmq-provider", "external", "--rabbitmq-url", broker.amqp_url(),
            "--rabbitmq-management-url", broker.management_url,
            "--qp-report-dir", f"reports/pace-matrix/{point}", *settings, *DETACHED.get(point, [])]


# CI runs the fast point; the slow one (about 6 minutes, the longest step) is run on purpose with the
# other long runs: pytest tests/test_pace_matrix.py -p no:xdist -m slow (bench/README.md).
ON_PURPOSE = {"0.1s-prefetch-10"}


@pytest.mark.pace_matrix
@pytest.mark.parametrize("point", [pytest.param(p, marks=[pytest.mark.slow] if p in ON_PURPOSE else [])
                                   for p in POINTS])
def test_the_suite_passes_at_this_pace(broker, point):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QP_"))}
    done = subprocess.run(child_command(broker, point), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)"
    assert done.returncode == 0, (f"pytest suites/ with --engine-env {' '.join(POINTS[point])} failed: "
                                  f"{summary}\n{_failures(done.stdout)}")
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def _failures(output: str, limit: int = 12000) -> str:
    """The child's failure section (the clause texts), or its tail."""
    start = output.find("= FAILURES =")
    text = output[start:] if start >= 0 else output
    return text[-limit:]
