"""Failure text, summary and timeline picture."""
from __future__ import annotations

from harness.checkers import check_all
from harness.report import format_failure, format_summary, render_timeline

from .builder import HB, T0, WINDOWS, scenario
from .test_qp import switch_history


def test_failure_text_starts_with_clause_id_and_tells_the_story():
    h = switch_history(None).history()
    res = check_all(h, scenario(), WINDOWS, clauses=["QP-PRECEDENCE"])
    text = format_failure(res, h, "out/timeline.png")
    lines = text.splitlines()
    assert lines[0].startswith("QP-PRECEDENCE: Stage worker kept consuming lower queue q1")
    assert lines[1] == "  stage worker; queues q1, q0; violation +16.0 s..+29.9 s"
    assert lines[2].startswith("  evidence: worker consumed q1 from +2.0 s to ")
    assert lines[-1] == "timeline: out/timeline.png"


def test_no_failure_text_when_all_pass():
    h = switch_history(13.0).consume(31, "worker", "q1").history()
    assert format_failure(check_all(h, scenario(), WINDOWS), h) == ""


def test_summary_lists_every_clause_and_latencies():
    h = switch_history(13.0).history()
    text = format_summary(check_all(h, scenario(), WINDOWS))
    assert text.splitlines()[0].startswith("qp-harness: ")
    assert "  QP-CANCEL-WINDOW  PASS  1 switches observed" in text
    assert "switch latency: min 3.00 s, median 3.00 s, max 3.00 s (n=1)" in text
    assert "QP-DRAIN-ORDER    n/e" in text


def test_timeline_png(tmp_path):
    h = switch_history(None).history()
    res = check_all(h, scenario(), WINDOWS)
    out = render_timeline(h, res, tmp_path / "sub" / "timeline.png", WINDOWS)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_timeline_marks_a_stages_own_exits_and_its_supervisor_restarts(tmp_path):
    from harness.checkers._common import build_context
    from harness.report import lane_marks

    hb = HB().stage(0, "worker").consume(1, "worker", "q0").supervised_restart(5, "worker", 5, 1)
    hb.consume(6.5, "worker", "q0").phase(20, "teardown")
    hb.ev(20.2, "stage_exited", stage="worker", pid=0, returncode=0, expected=True)  # the harness stopped it
    h = hb.finish(20.5).history()
    marks = lane_marks(build_context(h, None, WINDOWS).stages["worker"])
    assert [(round(t - T0, 1), kind, label) for t, kind, label in marks] == [
        (5.0, "exit", "exit 5"), (6.0, "restart", "restart 1")]
    out = render_timeline(h, check_all(h, scenario(), WINDOWS), tmp_path / "timeline.png", WINDOWS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checker_that_raises_costs_only_its_own_verdict(monkeypatch):
    import dataclasses

    from harness.checkers import registry

    def broken(ctx):
        raise KeyError("no such stage")

    clause = registry.get("QP-PRECEDENCE")
    monkeypatch.setitem(registry._REGISTRY, clause.id, dataclasses.replace(clause, check=broken))
    h = switch_history(13.0).history()
    res = {r.clause: r for r in check_all(h, scenario(), WINDOWS)}
    assert res["QP-PRECEDENCE"].errored and res["QP-PRECEDENCE"].outcome != "passed"
    assert "KeyError" in res["QP-PRECEDENCE"].exercised
    assert "raise KeyError" in res["QP-PRECEDENCE"].metrics["traceback"]
    assert res["QP-CANCEL-WINDOW"].outcome == "passed"  # the others were still judged
    summary = format_summary(res.values())
    assert "1 checker error(s)" in summary.splitlines()[0]
    assert "QP-PRECEDENCE     ERR" in summary


def per_scan_history():
    from .test_ps import Q7, Q8, base, end

    hb = base().consume(11, "worker", Q7).consume(11, "worker", Q8).cancel(14, "worker", Q8)
    hb.levels(0, 40, {Q7: [(10, 20), (20, 0), (25.2, None)], Q8: [(10, 50)]})
    hb.announce(22, Q8, "full", reason="rebroadcast").connect(23, "worker").hello(23.2, "worker", [Q8])
    return end(hb.ps_delete(25, Q7), 40).history()


def test_the_timeline_draws_per_scan_queues_with_their_tag_and_marks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from harness.checkers._common import build_context
    from harness.report import per_scan_rows

    from .test_ps import Q7, Q8

    h = per_scan_history()
    rows = per_scan_rows(build_context(h, None, WINDOWS))
    assert [(r["queue"], r["tag"]) for r in rows] == [(Q7, "delta"), (Q8, "full")]
    assert [(round(t - T0, 2), kind) for t, kind, _ in rows[0]["marks"]] == [(10.0, "scan_start"), (25.0, "delete")]
    assert [kind for _, kind, _ in rows[1]["marks"]] == ["scan_start", "rebroadcast", "hello_reply"]
    seen = {}

    def keep(fig, *args, **kwargs):
        panel = fig.axes[1]
        seen["rows"] = [t.get_text() for t in panel.get_yticklabels()]
        seen["colours"] = {t.get_text(): t.get_color() for t in panel.get_yticklabels()}
        seen["lanes"] = [t.get_text() for t in fig.axes[-1].get_yticklabels()]
        return original(fig, *args, **kwargs)

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", keep)
    out = render_timeline(h, check_all(h, scenario(), WINDOWS), tmp_path / "timeline.png", WINDOWS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["rows"] == [f"[delta] {Q7}", f"[full] {Q8}"]
    assert seen["colours"][f"[delta] {Q7}"] != seen["colours"][f"[full] {Q8}"]
    assert seen["lanes"] == ["worker  [delta] per-scan queues", "worker  [full] per-scan queues"]
