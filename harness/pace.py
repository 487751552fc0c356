"""How fast the engine went in one run, read from its history.

A clause that was not exercised is a scenario that did not create its
situation for this engine; the person reading the report needs the measured
figures to see why and what the scenario would need ("the backlog of 400
lasted 0.6 s, less than one window of 6 s"). Pure: history in, lines out.
"""
from __future__ import annotations

from harness.checkers._common import build_levels
from harness.checkers.model import Windows


def pace_lines(history, windows: Windows) -> list[str]:
    """One line per measurement: calibrations, each stage's delivery rate, holds, and queue backlogs."""
    return (_calibrations(history) + _stage_rates(history) + _holds(history)
            + _backlogs(history, windows))


def _calibrations(history) -> list[str]:
    seen: set[tuple] = set()
    lines = []
    for e in history.of("calibration"):
        key = (e.get("stage"), e.get("queue"))
        if key not in seen:
            seen.add(key)
            lines.append(f"{e.get('stage')} measured before the drain: {e.get('rate', 0):.1f} msg/s on "
                         f"{e.get('queue')} ({e.get('messages')} messages in {e.get('seconds', 0):.2f} s)")
        lines.append(f"{e.get('phase')}: a backlog of {e.get('sized')} sized to last {e.get('lasting', 0):g} s")
    return lines


def _stage_rates(history) -> list[str]:
    times: dict[str, list[float]] = {}
    for e in history.of("deliver"):
        stage = e.get("stage")
        if stage and stage != "harness":
            times.setdefault(stage, []).append(e["t"])
    lines = []
    for stage, ts in sorted(times.items()):
        span = ts[-1] - ts[0]
        rate = f"{(len(ts) - 1) / span:.1f} msg/s" if span > 0 else "all at once"
        lines.append(f"{stage} received {len(ts)} messages in {span:.1f} s ({rate})")
    return lines


def _holds(history) -> list[str]:
    return [f"hold on {e.get('queue')} ({e.get('name') or e.get('phase')}): {e.get('published')} published in "
            f"{e.get('top_ups')} top-ups; {e.get('shortfalls')} sample(s) found it below {e.get('depth')}"
            + (f"; consumed at up to {e['rate']:g} msg/s, so it aimed at {e.get('final_target')}" if e.get("rate") else "")
            + (f"; {e['discarded']} of its messages were an aborted scan's (not counted)" if e.get("discarded") else "")
            + (f"; ended early: {e['stopped_early']}" if e.get("stopped_early") else "")
            for e in history.of("hold") if e.get("state") == "ended"]


def _backlogs(history, windows: Windows) -> list[str]:
    """The longest stretch each queue was seen holding work, against the window W."""
    levels = build_levels(history, history.end)
    lines = []
    for queue, runs in sorted(levels.pos.items()):
        longest = max((b - a for a, b in runs), default=0.0)
        published = sum(1 for e in history.of("publish") if e.get("exchange", "") == "" and
                        e.get("routing_key") == queue)
        verdict = "longer than" if longest > windows.W else "less than"
        lines.append(f"{queue}: {published} messages published; it held work for at most {longest:.1f} s at a "
                     f"stretch, {verdict} one window (W = {windows.W:g} s)")
    return lines
