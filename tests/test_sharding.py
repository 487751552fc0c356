"""Two CI shards (pytest-split groups) against one broker at once, without interference.

Each shard is a child ``pytest --splits 2 --group I`` on this session's broker as an external
one, the way docs/ci-gate.md's GitLab ``parallel:`` job runs them: every test of either shard gets
a vhost of its own, and neither shard's clean-up touches the other's live vhosts.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.broker import VhostOwner

ROOT = Path(__file__).resolve().parent.parent
# Two short scenarios, collected as one test each: one per shard.
SELECTION = ["scenarios/defaults_only.yaml", "scenarios/shared_delta_fifo.yaml"]
TIMEOUT = 600


def shard(broker, group: int, junit: Path, reports: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QP_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", *SELECTION, "-p", "no:xdist", "-q", "--splits", "2", "--group", str(group),
         "--rabbitmq-provider", "external", "--rabbitmq-url", broker.amqp_url(),
         "--rabbitmq-management-url", broker.management_url, f"--junitxml={junit}",
         "--qp-report-dir", str(reports / f"shard-{group}")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def passed_tests(junit: Path) -> list[str]:
    cases = ET.parse(junit).getroot().iter("testcase")
    return [c.get("name") for c in cases if not any(child.tag in ("failure", "error", "skipped") for child in c)]


def test_two_shards_share_one_broker_without_interference(broker, tmp_path):
    junits = [tmp_path / f"shard-{group}.xml" for group in (1, 2)]
    shards = [shard(broker, group, junit, tmp_path) for group, junit in zip((1, 2), junits)]
    outputs = [s.communicate(timeout=TIMEOUT)[0] for s in shards]
    for group, (s, output) in enumerate(zip(shards, outputs), 1):
        assert s.returncode == 0, f"shard {group} failed:\n{output[-6000:]}"
    ran = [passed_tests(junit) for junit in junits]
    assert all(len(names) == 1 for names in ran), ran  # one test each: the split, not one shard running both
    assert len(set(ran[0] + ran[1])) == 2, ran
    left = [r["name"] for r in broker.management.vhost_records() if _made_by(r, {s.pid for s in shards})]
    assert not left, f"the shards left vhosts behind: {left}"


def _made_by(record: dict, pids: set[int]) -> bool:
    description = record.get("description") or (record.get("metadata") or {}).get("description") or ""
    owner = VhostOwner.parse(description)
    return owner is not None and owner.pid in pids
