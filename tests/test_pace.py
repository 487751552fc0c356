"""The pace figures that explain a not-exercised clause, from a hand-built history (no broker)."""
from __future__ import annotations

from harness.checkers.model import Windows
from harness.history import History
from harness.pace import pace_lines

from tests.checkers.builder import HB


def test_a_backlog_that_drained_within_a_window_is_named_with_its_figures():
    hb = HB()
    hb.ev(0.2, "calibration", stage="worker", queue="q0", rate=650.0, messages=400, seconds=0.62,
          phase="workload.0", lasting=18.0, sized=11700)
    for k in range(400):
        hb.ev(1.0 + k * 0.001, "publish", exchange="", routing_key="q1", stage="harness", msg={})
    hb.levels(1.0, 3.0, {"q1": [(1.0, 400), (1.6, 0)]})
    for k in range(400):
        hb.ev(1.0 + k * 0.0015, "deliver", queue="q1", stage="worker", redelivered=False, msg={})
    hb.ev(2.0, "hold", phase="workload.1", name="bottom busy", state="ended", queue="q2", depth=20, published=900,
          top_ups=30, shortfalls=2, final_target=160, stopped_early=None)
    lines = pace_lines(History(hb.events), Windows(5.0, 1.0, 30.0))
    text = "\n".join(lines)
    assert "worker measured before the drain: 650.0 msg/s on q0" in text
    assert "workload.0: a backlog of 11700 sized to last 18 s" in text
    assert "worker received 400 messages in 0.6 s" in text
    assert "hold on q2 (bottom busy): 900 published in 30 top-ups" in text
    assert "q1: 400 messages published; it held work for at most 0.5 s at a stretch, less than one window (W = 6 s)" \
        in text, text
