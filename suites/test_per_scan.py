"""PS-*: per-scan queues (OS2datascanner 3.32), with the harness as the admin and status collector.

Every test needs an engine that knows per-scan queues; deselect them with ``-m "not per_scan"`` for
an engine before 3.32. Besides its clauses, each test checks that the situation it is about was
really played: what the admin did (ps_announce, hello, ps_delete) and what the workers consumed.
"""
from __future__ import annotations

import pytest

from harness.messages import PER_SCAN_PREFIX
from harness.scenario_plugin import assert_clauses

HERE = "suites/clause_scenarios/per_scan"


def admin_did(run, type_: str, **fields) -> list[dict]:
    """The admin's events of ``type_`` whose fields have these values."""
    return [e for e in run.history.of(type_) if all(e.get(k) == v for k, v in fields.items())]


def consumed_per_scan(run, stage: str = "worker") -> set[str]:
    """Per-scan queues a stage (any of its replicas) held a consumer on."""
    return {e["queue"] for e in run.history.of("consumer_created")
            if (e.get("stage") or "").split("#")[0] == stage and e["queue"].startswith(PER_SCAN_PREFIX)}


def announced(run) -> set[str]:
    """Queues the admin announced at their scan's start."""
    return {e["queue"] for e in admin_did(run, "ps_announce", reason="scan_start")}


@pytest.mark.per_scan
@pytest.mark.clauses("PS-SUBSCRIBE", "PS-FILTER", "PS-PROGRESS", "DL-EXACTLY-ONCE", "RT-ONE-TYPE")
def test_workers_subscribe_to_announced_queues_by_their_tags(scenario_runner):
    run = scenario_runner(f"{HERE}/subscribe.yaml")
    assert_clauses(run)
    assert len(announced(run)) >= 4, "full and delta scans of two clients each get a queue"
    assert consumed_per_scan(run, "worker") and consumed_per_scan(run, "worker_2")
    assert {e["reason"] for e in run.history.of("ps_delete")} == {"scan_end"}


@pytest.mark.per_scan
@pytest.mark.clauses("PS-PRECEDENCE", "DL-EXACTLY-ONCE")
def test_a_delta_queue_with_work_pauses_the_full_queue(scenario_runner):
    run = scenario_runner(f"{HERE}/precedence.yaml")
    assert_clauses(run)
    tags = {e["queue"]: e["tag"] for e in admin_did(run, "ps_announce", reason="scan_start")}
    assert sorted(tags.values()) == ["delta", "full"]
    assert set(tags) <= consumed_per_scan(run)


@pytest.mark.per_scan
@pytest.mark.clauses("PS-DELETE", "PS-PROGRESS", "DL-EXACTLY-ONCE")
def test_deleting_a_paused_queue_does_not_stop_the_worker(scenario_runner):
    run = scenario_runner(f"{HERE}/delete_paused.yaml")
    assert_clauses(run)
    [deleted] = admin_did(run, "ps_delete", reason="fault")
    assert any(e["queue"] == deleted["queue"] for e in run.history.of("queue_deleted"))
    later = [e["t"] for e in run.history.of("consumer_created")
             if e.get("stage") == "worker" and e["queue"].startswith(PER_SCAN_PREFIX) and e["t"] > deleted["t"]]
    assert later, "the worker consumed no per-scan queue after the deletion"


@pytest.mark.per_scan
@pytest.mark.clauses("PS-HELLO", "DL-EXACTLY-ONCE")
def test_a_stale_hello_reply_costs_at_most_one_reconnect(scenario_runner):
    run = scenario_runner(f"{HERE}/hello_stale.yaml")
    assert_clauses(run)
    stale = [e for e in run.history.of("hello") if len(e["answered"]) > 1]
    assert stale, "no hello was answered with the stale queue and a live one"
    assert admin_did(run, "ps_announce", reason="fault", queue=stale[0]["answered"][0])


@pytest.mark.per_scan
@pytest.mark.clauses("PS-DELETE", "PS-PROGRESS", "DL-EXACTLY-ONCE")
def test_a_queue_announced_and_deleted_at_once_wedges_no_worker(scenario_runner):
    run = scenario_runner(f"{HERE}/short_scan.yaml")
    assert_clauses(run)
    shorts = {e["queue"] for e in admin_did(run, "ps_delete", reason="fault")}
    assert len(shorts) == 2
    assert consumed_per_scan(run, "worker") - shorts and consumed_per_scan(run, "worker_2") - shorts


@pytest.mark.per_scan
@pytest.mark.clauses("PS-FILTER", "DL-EXACTLY-ONCE")  # (CF-TAGS fails on purpose: checks.expect_fail)
def test_no_worker_consumes_a_tag_it_does_not_allow(scenario_runner):
    run = scenario_runner(f"{HERE}/unallowed_tag.yaml")
    assert_clauses(run)
    [urgent] = [e["queue"] for e in admin_did(run, "ps_announce", reason="scan_start", tag="urgent")]
    assert urgent not in consumed_per_scan(run)
    assert admin_did(run, "ps_delete", reason="abort", queue=urgent)


@pytest.mark.per_scan
@pytest.mark.clauses("FT-BAD-COMMAND", "DL-EXACTLY-ONCE")
def test_malformed_broadcasts_during_per_scan_work(scenario_runner):
    run = scenario_runner(f"{HERE}/bad_command.yaml")
    assert_clauses(run)
    shapes = [e["params"].get("shape") for e in run.history.of("fault") if e["kind"] == "bad_command"]
    assert shapes == [None, "no_abort", "bad_hello"]
    assert admin_did(run, "ps_delete", reason="abort"), "the aborted scan's queue was not deleted"
