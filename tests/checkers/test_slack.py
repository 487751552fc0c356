"""The checkers' slack comes from the observer that recorded the history (run_started), with today's values as
the fallback for histories that do not record it."""
from __future__ import annotations

from harness.checkers._common import CREATE_SLACK, MAX_SAMPLE_GAP, SWITCH_SLACK, Slack, build_levels
from harness.history import History, make_event
from tests.checkers.builder import HB, T0


def history_with(**started) -> History:
    return History([make_event("run_started", T0, version=1, scenario="s", vhost="v", seed=0, **started)])


def test_an_old_history_gets_the_default_slack():
    assert Slack.of(history_with()) == Slack(MAX_SAMPLE_GAP, CREATE_SLACK, SWITCH_SLACK)
    assert Slack.of(History([])) == Slack()


def test_the_recorded_slack_is_used_and_a_bad_value_falls_back():
    slack = Slack.of(history_with(sample_interval=0.5, max_sample_gap=10.0, switch_slack=2.5, create_slack=0.4))
    assert slack == Slack(max_sample_gap=10.0, create=0.4, switch=2.5)
    assert Slack.of(history_with(max_sample_gap="soon", switch_slack=-1, create_slack=True)) == Slack()


def sampled_with_a_gap(**started) -> History:
    """q0 seen non-empty, then 3 s without samples, then non-empty again."""
    hb = HB()
    hb.events[0].update(started)
    hb.ev(1.0, "sample", ready={"q0": 2}).ev(1.1, "sample", ready={"q0": 2})
    hb.ev(4.1, "sample", ready={"q0": 2}).ev(4.2, "sample", ready={"q0": 2})
    return hb.history()


def test_a_slower_observer_bridges_longer_sample_gaps():
    assert len(build_levels(sampled_with_a_gap(), T0 + 5).pos["q0"]) == 2  # a 3 s gap breaks the run
    slow = sampled_with_a_gap(sample_interval=0.5, max_sample_gap=10.0)
    assert build_levels(slow, T0 + 5).pos["q0"] == [(T0 + 1.0, T0 + 4.2)]


def test_the_create_slack_follows_the_history():
    hb = HB().queue(1.2, "late")
    assert build_levels(hb.history(), T0 + 5).exists_at("late", T0 + 1.0) is True  # within 0.25 s
    assert build_levels(hb.history(), T0 + 5).exists_at("late", T0 + 0.9) is False
    hb.events[0]["create_slack"] = 0.5
    assert build_levels(hb.history(), T0 + 5).exists_at("late", T0 + 0.9) is True
