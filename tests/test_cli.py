"""``python -m harness`` lint / check / schema, run as a user would (subprocess, no broker)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.history import write_events

from checkers.test_qp import switch_history

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
clients:
  - name: a
    conversion_full_queue: conv_full
    conversion_delta_queue: conv_delta
stages:
  - name: worker
    kind: worker
    queue_priority: conv_delta conv_full
  - name: explorer
    kind: explorer
"""


def run(*args):
    p = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_lint_good(tmp_path):
    f = tmp_path / "good.yaml"
    f.write_text(GOOD)
    rc, out, err = run("lint", f)
    assert rc == 0, err
    assert "CF-ALIGN passed, CF-NO-DUP passed, CF-ONE-TYPE passed" in out


def test_lint_findings_exit_1(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text(GOOD.replace("conv_delta conv_full", "conv_delta conv_full conv_delta").replace(
        "conversion_full_queue: conv_full", "conversion_full_queue: conv_typo"))
    rc, out, err = run("lint", f)
    assert rc == 1
    lines = [line for line in out.splitlines() if line.startswith("CF-")]
    assert lines[0].startswith("CF-ALIGN: Client a's conversion_full_queue is conv_typo")
    assert lines[0].endswith(f"[{f}: clients.0.conversion_full_queue]")
    assert lines[1].startswith("CF-NO-DUP: Stage worker's QUEUE_PRIORITY lists conv_delta twice")


def test_lint_bad_file_names_field_without_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(GOOD.replace("kind: worker", "kind: wrker"))
    rc, out, err = run("lint", f)
    assert rc == 2
    assert str(f) in err and "stages.0.kind" in err
    assert "Traceback" not in err + out


def test_check_reports_findings(tmp_path):
    hist = tmp_path / "history.jsonl"
    write_events(hist, switch_history(None).events)
    sc = tmp_path / "s.yaml"
    sc.write_text(GOOD.replace("conv_delta conv_full", "q0 q1 q2").replace("conv_", "q"))
    png = tmp_path / "timeline.png"
    rc, out, err = run("check", hist, "--scenario", sc, "--check-period", "5", "--tolerance", "1", "--timeline", png)
    assert rc == 1, err
    assert "W = 6 s, G = 30 s" in out
    assert any(line.startswith("QP-PRECEDENCE: Stage worker kept consuming lower queue q1") for line in out.splitlines())
    assert f"timeline: {png}" in out and png.stat().st_size > 10_000


def test_check_passes_and_window_options_matter(tmp_path):
    hist = tmp_path / "history.jsonl"
    write_events(hist, switch_history(13.0).events)
    rc, out, _ = run("check", hist, "--clauses", "QP-PRECEDENCE,QP-CANCEL-WINDOW")
    assert rc == 0 and "QP-CANCEL-WINDOW  PASS" in out and "median 3.00 s" in out
    rc, out, _ = run("check", hist, "--clauses", "QP-CANCEL-WINDOW", "--check-period", "1", "--tolerance", "0.5")
    assert rc == 1 and "QP-CANCEL-WINDOW: Stage worker cancelled lower queue q1 only 3.0 s after" in out


def test_check_json(tmp_path):
    hist = tmp_path / "history.jsonl"
    write_events(hist, switch_history(13.0).events)
    rc, out, _ = run("check", hist, "--json", "--clauses", "QP")
    data = json.loads(out)
    assert [r["clause"] for r in data["results"]][0] == "QP-DECLARE"


def test_check_bad_history(tmp_path):
    hist = tmp_path / "history.jsonl"
    hist.write_text('{"t": 1, "type": "phase"}\nnot json\n')
    rc, out, err = run("check", hist)
    assert rc == 2 and f"{hist}:2: not JSON" in err and "Traceback" not in err


def test_schema():
    rc, out, _ = run("schema")
    assert rc == 0 and "stages" in json.loads(out)["properties"]


def test_check_uses_windows_recorded_in_the_history(tmp_path):
    hist = tmp_path / "history.jsonl"
    events = switch_history(13.0).events
    events[0] = {**events[0], "check_period": 1.0, "tolerance": 0.5, "grace": 10.0}
    write_events(hist, events)
    rc, out, _ = run("check", hist, "--clauses", "QP-CANCEL-WINDOW")
    assert "W = 1.5 s, G = 10 s" in out and rc == 1
    rc, out, _ = run("check", hist, "--clauses", "QP-CANCEL-WINDOW", "--check-period", "5", "--tolerance", "1")
    assert "W = 6 s" in out and rc == 0


def test_clauses_lists_every_clause_with_its_rule():
    rc, out, _ = run("clauses", "--rules")
    assert rc == 0
    for cid in ("QP-DECLARE", "QP-PROGRESS", "RT-ROUTABLE", "DL-EXACTLY-ONCE", "CF-ALIGN", "FT-RECONNECT"):
        assert f"\n{cid} " in "\n" + out
    assert "Rule:" in out
