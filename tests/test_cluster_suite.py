"""The whole conformance suite on a local 3-node RabbitMQ cluster (marked slow: ``pytest -m slow``).

The child run starts its own cluster (``--rabbitmq-nodes 3``): stages connect to different nodes,
the observer watches the whole cluster from the seed node.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 2400


@pytest.mark.slow
def test_the_suite_passes_on_a_three_node_cluster():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QP_"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "suites", "-n", "2", "-q", "-p", "no:cacheprovider",
                           "--rabbitmq-provider", "local", "--rabbitmq-nodes", "3",
                           "--qp-report-dir", "reports/cluster-suite"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)"
    assert done.returncode == 0, f"the suite on a 3-node cluster failed: {summary}\n{done.stdout[-8000:]}"
