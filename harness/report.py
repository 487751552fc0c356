"""What a person reads after a run: failure text, a terminal summary and a timeline picture.

- ``format_failure(results, history)``: for every finding, the clause id first, then the story
  (stage, queues, time span relative to the run start, the evidence summarised).
- ``format_summary(results)``: one line per clause (outcome, how often exercised) and the
  measured switch latencies.
- ``render_timeline(history, results, path)``: PNG (matplotlib, Agg). Top: ready count per queue.
  Below: one lane per stage, one row per queue it may consume, a bar while it held a consumer;
  violations shaded red and labelled with the clause id; faults as dashed lines; a stage's own
  exits and its supervisor's restarts (``lane_marks``) as marks on its lane. With per-scan queues, a
  middle panel (``per_scan_rows``) has one row per queue, coloured by its tag: a bar while it was live,
  its announcements (scan start, re-broadcasts, hello replies, faults) and its deletion as marks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from harness.checkers import TITLES, registry
from harness.checkers._common import build_context
from harness.checkers.model import ClauseResult, Finding, Windows

MAX_FINDINGS_PER_CLAUSE = 5
MAX_EVIDENCE = 3


def _start(history) -> float:
    started = history.of("run_started")
    return started[0]["t"] if started else history.start


def _rel(t: float | None, t0: float) -> str:
    return "?" if t is None else f"+{t - t0:.1f} s"


def _evidence_line(ev: dict[str, Any], t0: float) -> str:
    if ev.get("type") == "consumer":
        return (f"{ev.get('stage')} consumed {ev.get('queue')} from {_rel(ev.get('start'), t0)} to "
                f"{_rel(ev.get('end'), t0)} (ended: {ev.get('end_reason')})")
    if "t" in ev and "type" in ev:
        typ = ev["type"]
        bits = []
        for key in ("stage", "queue", "exchange", "routing_key", "kind", "target", "returncode", "redelivered"):
            if key in ev and ev[key] not in (None, ""):
                bits.append(f"{key}={ev[key]}")
        msg = ev.get("msg") or {}
        if msg:
            bits.append(f"msg={msg.get('type')}" + (f" {msg.get('object')}" if msg.get("object") else ""))
        if ev.get("count", 1) > 1:
            bits.append(f"x{ev['count']}")
        return f"{typ} at {_rel(ev['t'], t0)}: " + " ".join(bits)
    parts = []
    for key, value in ev.items():
        if isinstance(value, list):
            shown = ", ".join("/".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v) for v in value[:3])
            parts.append(f"{key}: {shown}" + (f" (+{len(value) - 3} more)" if len(value) > 3 else ""))
        else:
            parts.append(f"{key}: {value}")
    return "; ".join(parts)


def format_finding(f: Finding, t0: float) -> str:
    lines = [f"{f.clause}: {f.explanation}"]
    where = []
    if f.stage:
        where.append(f"stage {f.stage}")
    if f.queues:
        where.append("queues " + ", ".join(q for q in f.queues if q))
    if f.start is not None:
        where.append(f"violation {_rel(f.start, t0)}" + (f"..{_rel(f.end, t0)}" if f.end is not None else ""))
    if where:
        lines.append("  " + "; ".join(where))
    for ev in f.evidence[:MAX_EVIDENCE]:
        lines.append("  evidence: " + _evidence_line(ev, t0))
    if len(f.evidence) > MAX_EVIDENCE:
        lines.append(f"  evidence: … {len(f.evidence) - MAX_EVIDENCE} more events")
    return "\n".join(lines)


def format_failure(results: Iterable[ClauseResult], history=None, timeline: Path | str | None = None) -> str:
    """Every finding of every failed clause, clause id first. Empty string when nothing failed."""
    t0 = _start(history) if history is not None else 0.0
    blocks = []
    for r in results:
        if not r.failed:
            continue
        for f in r.findings[:MAX_FINDINGS_PER_CLAUSE]:
            blocks.append(format_finding(f, t0))
        if len(r.findings) > MAX_FINDINGS_PER_CLAUSE:
            blocks.append(f"{r.clause}: … and {len(r.findings) - MAX_FINDINGS_PER_CLAUSE} more findings")
    if blocks and timeline:
        blocks.append(f"timeline: {timeline}")
    return "\n".join(blocks)


def format_summary(results: Iterable[ClauseResult]) -> str:
    """One line per clause: id, outcome, how often exercised; then the cancel latencies."""
    results = list(results)
    marks = {"passed": "PASS", "failed": "FAIL", "not_exercised": "n/e ", "error": "ERR "}
    lines = []
    for r in results:
        extra = f" ({len(r.findings)} findings)" if r.failed else ""
        lines.append(f"  {r.clause:<17} {marks.get(r.outcome, r.outcome)}  {r.exercised}{extra}")
    for r in results:
        metric = registry.get(r.clause).metric if r.clause in TITLES else None
        if metric is not None:
            lines.append(f"  {metric(r)}")
    n = {k: sum(1 for r in results if r.outcome == k) for k in marks}
    head = f"qp-harness: {n['passed']} passed, {n['failed']} failed, {n['not_exercised']} not exercised"
    if n["error"]:
        head += f", {n['error']} checker error(s)"
    return "\n".join([head] + lines)


# ---------------------------------------------------------------- timeline

def _queue_series(history, queues: set[str] | None):
    series: dict[str, tuple[list[float], list[float]]] = {}
    for ev in history.of("sample"):
        for q, n in (ev.get("ready") or {}).items():
            if queues is not None and q not in queues:
                continue
            xs, ys = series.setdefault(q, ([], []))
            xs.append(ev["t"])
            ys.append(n if n is not None else float("nan"))
    return series


def _thin(xs, ys, limit=4000):
    """Keep the picture light: at most ``limit`` points per queue, keeping each bucket's maximum."""
    if len(xs) <= limit:
        return xs, ys
    step = len(xs) / limit
    ox, oy = [], []
    k = 0.0
    while int(k) < len(xs):
        a, b = int(k), min(int(k + step), len(xs))
        b = max(b, a + 1)
        chunk = [y for y in ys[a:b] if y == y]
        ox.append(xs[a])
        oy.append(max(chunk) if chunk else float("nan"))
        k += step
    return ox, oy


def lane_marks(sv) -> list[tuple[float, str, str]]:
    """(time, kind, label) marks for a stage's lane: exits the harness did not cause ('exit', with the
    exit code) and restarts by its restart policy ('restart', with their number)."""
    marks = [(e["t"], "exit", f"exit {e.get('returncode')}") for e in sv.exits if not e.get("expected")]
    marks += [(st["t"], "restart", f"restart {st['supervisor_restart']}") for st in sv.starts
              if st.get("supervisor_restart")]
    return sorted(marks)


MARK_STYLE = {"exit": {"marker": "X", "color": "#b00020"}, "restart": {"marker": ">", "color": "#1b5e20"}}

# One colour per per-scan tag, in sorted tag order (delta, full, then any forced tags).
TAG_PALETTE = ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457")
# Marks on a per-scan queue's row: its announcements by reason, and its deletion.
PS_MARK_STYLE = {
    "scan_start": {"marker": "v", "ms": 8},
    "fault": {"marker": "*", "ms": 10, "color": "#6a1b9a"},
    "rebroadcast": {"marker": "|", "ms": 7},
    "hello_reply": {"marker": ".", "ms": 6},
    "delete": {"marker": "X", "ms": 8, "color": "#212121"},
}
MAX_PS_ROWS = 16
MAX_PS_PLOTTED = 60  # per-scan queues drawn in the ready-count panel


def _tag_row(tag: str) -> str:
    return f"[{tag}] per-scan queues"


def tag_colours(tags) -> dict[str, str]:
    return {tag: TAG_PALETTE[i % len(TAG_PALETTE)] for i, tag in enumerate(sorted(set(tags)))}


def per_scan_rows(ctx) -> list[dict[str, Any]]:
    """One row per announced per-scan queue, in order of first announcement: its tag, the spans it was
    live and its marks (time, kind, label): announcements by reason, and the admin's deletion."""
    from harness.checkers.ps import per_scan

    queues = per_scan(ctx).queues
    rows: dict[str, dict[str, Any]] = {}
    for ev in ctx.history.of("ps_announce"):
        q = queues.get(ev.get("queue"))
        if q is None:
            continue
        row = rows.setdefault(q.name, {"queue": q.name, "tag": q.tag, "live": list(q.live), "marks": []})
        row["marks"].append((ev["t"], ev.get("reason") or "scan_start", ev.get("reason") or ""))
    for ev in ctx.history.of("ps_delete"):
        if ev.get("queue") in rows:
            rows[ev["queue"]]["marks"].append((ev["t"], "delete", f"deleted ({ev.get('reason')})"))
    for row in rows.values():
        row["marks"].sort()
    return list(rows.values())


def _draw_per_scan(ax, rows: list[dict[str, Any]], t0: float, colours: dict[str, str]) -> None:
    """The per-scan panel: a bar per queue while it was live, in its tag's colour, with its marks."""
    shown = rows[:MAX_PS_ROWS]
    for y, row in enumerate(shown):
        colour = colours.get(row["tag"], "#777777")
        ax.broken_barh([(a - t0, max(b - a, 0.05)) for a, b in row["live"]], (y + 0.25, 0.5),
                       facecolors=colour, alpha=0.3, edgecolor="none")
        for t, kind, label in row["marks"]:
            style = {"color": colour, **PS_MARK_STYLE.get(kind, PS_MARK_STYLE["scan_start"])}
            ax.plot([t - t0], [y + 0.5], ls="none", **style)
            if kind == "delete":
                ax.annotate(label, (t - t0, y + 0.5), xytext=(5, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks([y + 0.5 for y in range(len(shown))])
    ax.set_yticklabels([f"[{r['tag']}] {r['queue']}" for r in shown], fontsize=8)
    for label, row in zip(ax.get_yticklabels(), shown):
        label.set_color(colours.get(row["tag"], "#333333"))
    ax.set_ylim(len(shown), 0)
    ax.grid(True, axis="x", alpha=0.3)
    if len(rows) > len(shown):
        ax.text(0.995, 0.02, f"+{len(rows) - len(shown)} more per-scan queues", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7)


def render_timeline(history, results: Iterable[ClauseResult], path: Path | str,
                    windows: Windows | None = None, title: str | None = None) -> Path:
    """Write the timeline PNG to ``path`` and return it: queue levels on top, the per-scan queues (if
    any) below them, one lane per stage at the bottom; faults, teardown and violations marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    windows = windows or Windows()
    ctx = build_context(history, None, windows)
    t0 = ctx.start
    t_end = max(ctx.end, t0 + 1)
    plan = _timeline_plan(ctx, history, plt)
    lanes, ps_rows = plan["lanes"], plan["ps_rows"]
    n_rows = sum(max(len(r), 1) for _, r in lanes) + max(len(lanes) - 1, 0)
    ps_height = 0.28 * min(len(ps_rows), MAX_PS_ROWS) + 0.3 if ps_rows else 0.0
    fig_h = 3.2 + 0.28 * n_rows + 0.6 + ps_height
    ratios = [3.2] + ([ps_height] if ps_rows else []) + [max(0.28 * n_rows, 0.8)]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(13, fig_h), sharex=True, gridspec_kw={"height_ratios": ratios})
    ax_q, ax_s = axes[0], axes[-1]
    if ps_rows:
        _draw_per_scan(axes[1], ps_rows, t0, plan["tag_colour"])
    failed = [r.clause for r in results if r.failed]
    fig.suptitle(title or f"{history.of('run_started')[0].get('scenario', '') if history.of('run_started') else ''}"
                 f"  —  {'FAILED: ' + ', '.join(failed) if failed else 'no violations'}"
                 f"  (W = {windows.W:g} s, G = {windows.G:g} s)",
                 fontsize=12, color="#b00020" if failed else "#1b5e20", x=0.01, ha="left")
    _draw_levels(ax_q, plan, t0)
    lane_y, row_pos = _draw_lanes(ax_s, plan, t0)
    _draw_faults(axes, ax_q, history, ctx, t0)
    _draw_violations(ax_q, ax_s, results, lane_y, row_pos, t0, t_end)
    _draw_legend(ax_q, results, lanes)
    ax_s.set_xlim(0, t_end - t0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _timeline_plan(ctx, history, plt) -> dict:
    """What the timeline shows: the queues plotted and their colours, the per-scan rows, the stage lanes."""
    stages = [sv for sv in ctx.stages.values() if sv.consumers or sv.priority]
    prio_queues: list[str] = []
    for sv in stages:
        for q in sv.priority:
            if q not in prio_queues:
                prio_queues.append(q)
    series = _queue_series(history, None)
    ps_rows = per_scan_rows(ctx)
    ps_tag = {r["queue"]: r["tag"] for r in ps_rows}
    busy = [q for q, (_, ys) in series.items() if any(y > 0 for y in ys if y == y)]
    extra = [q for q in busy if q not in prio_queues and q not in ps_tag]
    plot_queues = (prio_queues + sorted(extra))[:12]
    cmap = plt.get_cmap("tab10" if len(plot_queues) <= 10 else "tab20")
    colour = {q: cmap(i % cmap.N) for i, q in enumerate(plot_queues)}
    # per-scan queues share their tag's colour (one legend entry per tag), so all of them fit
    plot_queues += [q for q in ps_tag if q in busy][:MAX_PS_PLOTTED]
    tag_colour = tag_colours(ps_tag.values())
    colour.update({q: tag_colour[tag] for q, tag in ps_tag.items()})

    # lanes: per stage, one row per priority queue (q0 on top), plus one for other consumed queues, plus one
    # per tag for the per-scan queues it consumed (a scan's queue lives minutes: one row each would not fit)
    lanes = []
    for sv in stages:
        rows = list(sv.priority) or []
        others = sorted({c.queue for c in sv.consumers if c.queue not in rows and c.queue not in ps_tag
                         and not str(c.queue).startswith("amq.")})
        tags = sorted({ps_tag[c.queue] for c in sv.consumers if c.queue in ps_tag})
        lanes.append((sv, rows + others + [_tag_row(tag) for tag in tags]))
    return {"series": series, "ps_rows": ps_rows, "ps_tag": ps_tag, "plot_queues": plot_queues, "colour": colour,
            "tag_colour": tag_colour, "lanes": lanes}


def _draw_levels(ax_q, plan: dict, t0: float) -> None:
    """The top panel: each plotted queue's ready count (per-scan queues in their tag's colour)."""
    series, ps_tag, plot_queues, colour = plan["series"], plan["ps_tag"], plan["plot_queues"], plan["colour"]
    for q in plot_queues:
        xs, ys = series.get(q, ([], []))
        if not xs:
            continue
        xs, ys = _thin(xs, ys)
        label = q
        if q in ps_tag:  # one legend entry per tag: the panel below names each queue
            first = next(p for p in plot_queues if ps_tag.get(p) == ps_tag[q])
            label = f"[{ps_tag[q]}] per-scan queues" if q == first else "_nolegend_"
        ax_q.step([x - t0 for x in xs], ys, where="post", color=colour[q], lw=1.4, label=label,
                  ls="--" if q in ps_tag and list(ps_tag).index(q) % 2 else "-")
    ax_q.set_ylabel("ready messages")
    ax_q.grid(True, alpha=0.3)



def _draw_lanes(ax_s, plan: dict, t0: float) -> tuple[dict, dict]:
    """The stage lanes: a row per queue a stage consumed, bars while it held a consumer; returns where
    each lane and row is (for the violations)."""
    lanes, ps_tag, colour = plan["lanes"], plan["ps_tag"], plan["colour"]
    yticks, ylabels = [], []
    y = 0.0
    lane_y: dict[str, tuple[float, float]] = {}
    row_pos: dict[str, dict[str, float]] = {}
    for sv, rows in lanes:
        top = y
        row_y = {}
        for q in rows or ["(none)"]:
            row_y[q] = y
            yticks.append(y + 0.4)
            rank = f"q{sv.priority.index(q)}" if q in sv.priority else "--"
            ylabels.append(f"{sv.name}  {q}" if q.startswith("[") else f"{sv.name}  [{rank}] {q}")
            y += 1
        row_y.update({q: row_y[_tag_row(tag)] for q, tag in ps_tag.items() if _tag_row(tag) in row_y})
        lane_y[sv.name] = (top, y)
        row_pos[sv.name] = row_y
        for c in sv.consumers:
            if c.queue not in row_y:
                continue
            ax_s.broken_barh([(c.start - t0, max(c.end - c.start, 0.05))], (row_y[c.queue] + 0.1, 0.6),
                             facecolors=colour.get(c.queue, "#777777"), edgecolor="white" if c.queue in ps_tag else "none",
                             lw=0.5)
            if c.reason == "cancel":
                ax_s.plot([c.end - t0], [row_y[c.queue] + 0.4], marker="|", color="black", ms=8)
        for a, b in sv.excused:
            ax_s.axvspan(a - t0, b - t0, ymin=0, ymax=1, color="#999999", alpha=0.12)
        for t, kind, label in lane_marks(sv):
            ax_s.plot([t - t0], [top + 0.4], ms=8, ls="none", **MARK_STYLE[kind])
            ax_s.annotate(label, (t - t0, top + 0.4), xytext=(4, -2), textcoords="offset points", fontsize=7,
                          color=MARK_STYLE[kind]["color"], va="bottom")
        y += 1  # gap between stages
        ax_s.axhline(y - 0.5, color="#cccccc", lw=0.8)
    ax_s.set_yticks(yticks)
    ax_s.set_yticklabels(ylabels, fontsize=8)
    ax_s.set_ylim(max(y - 0.5, 1), -0.2)
    ax_s.set_xlabel("seconds since run start")
    ax_s.grid(True, axis="x", alpha=0.3)

    return lane_y, row_pos


def _draw_faults(axes, ax_q, history, ctx, t0: float) -> None:
    for ev in history.of("fault"):
        for ax in axes:
            ax.axvline(ev["t"] - t0, color="#6a1b9a", ls="--", lw=1)
        ax_q.annotate(f"{ev.get('kind')} {ev.get('target') or ''}", (ev["t"] - t0, 1.0), xycoords=("data", "axes fraction"),
                      rotation=90, va="top", ha="right", fontsize=7, color="#6a1b9a")
    if ctx.teardown < ctx.end:
        for ax in axes:
            ax.axvline(ctx.teardown - t0, color="#444444", ls=":", lw=1)



def _draw_violations(ax_q, ax_s, results: list[ClauseResult], lane_y: dict, row_pos: dict, t0: float,
                     t_end: float) -> None:
    """Shade the rows of the queues a finding names (the whole lane if none), label the clause id once
    per stage and span; the top panel gets the union of all violation spans."""
    from harness.checkers._common import merge as _merge
    spans: dict[tuple, list[str]] = {}
    rows_of: dict[tuple, set] = {}
    top_spans = []
    for r in results:
        for f in r.findings:
            if f.start is None:
                continue
            a = f.start - t0
            b = (f.end if f.end is not None else f.start + 0.5) - t0
            b = max(b, a + (t_end - t0) * 0.004)
            top_spans.append((a, b))
            key = (f.stage if f.stage in lane_y else None, round(a, 1), round(b, 1))
            if f.clause not in spans.setdefault(key, []):
                spans[key].append(f.clause)
            rows_of.setdefault(key, set()).update(q for q in f.queues if q)
    for a, b in _merge(top_spans):
        ax_q.axvspan(a, b, color="#e53935", alpha=0.12, lw=0)
    per_lane: dict[str | None, int] = {}
    named: dict[str | None, set] = {}
    for key, clauses in list(spans.items())[:80]:
        stage, a, b = key
        fresh = [c for c in clauses if c not in named.setdefault(stage, set())]
        named[stage].update(fresh)
        k = per_lane.get(stage, 0)
        if fresh:
            per_lane[stage] = k + 1
        else:
            k = 99  # already labelled in this lane: shade only
        label = " " + ", ".join(fresh)
        if stage is not None:
            top, bottom = lane_y[stage]
            rows = row_pos[stage]
            hit = {rows[q] for q in rows_of[key] if q in rows}
            bands = [(y0, y0 + 1) for y0 in sorted(hit)] or [(top, bottom)]
            for y0, y1 in bands:
                ax_s.fill_between([a, b], y0 - 0.02, y1 - 0.18, color="#e53935", alpha=0.22, lw=0)
                ax_s.plot([a, a], [y0 - 0.02, y1 - 0.18], color="#b00020", lw=1.2)
            if k < 8:
                ax_s.text(a, top - 0.1 + 0.55 * (k % max(int(bottom - top) * 2 - 1, 1)), label, color="#b00020",
                          fontsize=8, va="top", ha="left", fontweight="bold", clip_on=True,
                          bbox={"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 1})
        elif k < 8:
            ax_q.text(a, 0.97 - 0.07 * k, label, transform=ax_q.get_xaxis_transform(), color="#b00020",
                      fontsize=8, va="top", fontweight="bold", bbox={"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 1})


def _draw_legend(ax_q, results: list[ClauseResult], lanes) -> None:
    from matplotlib.patches import Patch
    handles = [Patch(color="#e53935", alpha=0.3, label="violation (clause id)")]
    if any(sv.excused for sv, _ in lanes):
        handles.append(Patch(color="#999999", alpha=0.2, label="stage paused by a fault"))
    if any(r.findings for r in results) is False:
        handles = []
    lines, names = ax_q.get_legend_handles_labels()
    if lines or handles:  # a run that ended before any sample (no stage started) has nothing to label
        ax_q.legend(lines + handles, names + [h.get_label() for h in handles], loc="upper right", fontsize=8,
                    ncol=min(4, len(lines) + len(handles)), framealpha=0.85)


__all__ = ["format_failure", "format_finding", "format_summary", "per_scan_rows", "render_timeline", "TITLES"]
