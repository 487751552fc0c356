"""Time ``check_all`` on synthetic histories of 100k, 300k and 1M events.

The history looks like a busy run: three worker replicas and an explorer with
QUEUE_PRIORITY, queue samples every 100 ms, consumers switching every few
seconds, and a steady stream of publishes, deliveries and results for planned
scans. Run on purpose: ``python bench/checkers.py [--sizes 100000,300000,1000000]``.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.checkers import check_all  # noqa: E402
from harness.checkers.model import Windows  # noqa: E402
from harness.history import History  # noqa: E402
from harness.scenario import parse_scenario  # noqa: E402

PRIO = ["conv_delta", "conv_full", "os2ds_conversions"]
EXPLORER = ["expl_delta", "expl_full"]
OUT = ["os2ds_matches", "os2ds_status", "os2ds_problems", "os2ds_metadata", "os2ds_checkups"]
SCENARIO = parse_scenario({
    "name": "bench",
    "clients": [{"name": "a", "explorer_full_queue": "expl_full", "explorer_delta_queue": "expl_delta",
                 "conversion_full_queue": "conv_full", "conversion_delta_queue": "conv_delta"}],
    "stages": [{"name": "explorer", "kind": "explorer", "queue_priority": " ".join(EXPLORER)},
               {"name": "worker", "kind": "worker", "queue_priority": " ".join(PRIO), "replicas": 3}],
})


def synthetic(n: int, seed: int = 1) -> History:
    rnd = random.Random(seed)
    ev: list[dict] = []
    t0 = 1_700_000_000.0
    add = ev.append
    add({"t": t0, "type": "run_started", "version": 1, "scenario": "bench", "vhost": "v", "seed": seed})
    workers = [f"worker#{k}" for k in range(1, 4)]
    for name, prio, kind in [("explorer", EXPLORER, "explorer")] + [(w, PRIO, "worker") for w in workers]:
        add({"t": t0 + 0.1, "type": "stage_started", "stage": name, "role": name.split("#")[0], "kind": kind,
             "pid": 1, "queue_priority": prio, "read_queues": prio})
    for q in PRIO + EXPLORER + OUT:
        add({"t": t0 + 0.5, "type": "queue_created", "queue": q, "durable": True, "auto_delete": False, "arguments": []})
    tags = 0
    chan = {w: f"<chan.{w}>" for w in workers + ["explorer"]}
    for w in workers + ["explorer"]:
        tags += 1
        q0 = EXPLORER[0] if w == "explorer" else PRIO[0]
        add({"t": t0 + 1.0, "type": "consumer_created", "stage": w, "queue": q0, "tag": f"c{tags}", "chan": chan[w], "prefetch": 2})
    # the workload: each second ~ 1950 message events, 10 samples, a few consumer switches
    t = t0 + 1.0
    scan_n = 0
    lower: dict[str, tuple[str, str] | None] = {w: None for w in workers}
    level = {q: 0 for q in PRIO + EXPLORER + OUT}
    while len(ev) < n:
        t += 0.1
        # ready counts wander; the delta queue fills in bursts
        for q in level:
            level[q] = max(0, level[q] + rnd.randint(-30, 30))
        if rnd.random() < 0.02:
            level["conv_delta"] += 300
        add({"t": t, "type": "sample", "ready": {q: level[q] for q in PRIO + EXPLORER + OUT}})
        # a consumer switch now and then
        w = rnd.choice(workers)
        if rnd.random() < 0.05:
            cur = lower[w]
            if cur is not None:
                add({"t": t + 0.01, "type": "consumer_deleted", "stage": w, "queue": cur[0], "tag": cur[1], "chan": chan[w]})
                lower[w] = None
            else:
                tags += 1
                q = rnd.choice(PRIO[1:])
                add({"t": t + 0.02, "type": "consumer_created", "stage": w, "queue": q, "tag": f"c{tags}", "chan": chan[w], "prefetch": 2})
                lower[w] = (q, f"c{tags}")
        # a scan with 60 objects: conversions, deliveries, results
        scan_n += 1
        scan = f"{scan_n}@2026-01-01T00:00:00+00:00"
        objs = [f"dir/file{k}.txt" for k in range(60)]
        add({"t": t + 0.001, "type": "scan_planned", "scan": scan, "client": "a", "org": "org-a", "mode": "full",
             "explorer_queue": "expl_full", "conversion_queue": "conv_full", "objects": objs, "via": "explorer"})
        for k, o in enumerate(objs):
            tt = t + 0.001 * (k + 2)
            msg = {"type": "ConversionMessage", "scan": scan, "org": "org-a", "object": o, "conversion_queue": "conv_full"}
            add({"t": tt, "type": "publish", "exchange": "", "routing_key": "conv_full", "routed": ["conv_full"],
                 "stage": "explorer", "msg": msg})
            add({"t": tt + 0.0002, "type": "deliver", "queue": "conv_full", "stage": rnd.choice(workers),
                 "redelivered": False, "msg": msg})
            add({"t": tt + 0.0004, "type": "publish", "exchange": "", "routing_key": "os2ds_matches", "routed": ["os2ds_matches"],
                 "stage": "worker#1", "msg": {"type": "MatchesMessage", "scan": scan, "org": "org-a", "object": o, "matched": False}})
    ev = ev[:n]
    ev.append({"t": ev[-1]["t"] + 1, "type": "phase", "name": "teardown"})
    ev.append({"t": ev[-1]["t"] + 1, "type": "run_finished", "reason": "complete"})
    return History(ev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    times: dict[int, float] = {}
    for n in sizes:
        h = synthetic(n)
        best = float("inf")
        for _ in range(args.repeat):
            h = History(h.events)  # fresh, no cached context
            gc.collect()
            t = time.perf_counter()
            results = check_all(h, SCENARIO, Windows())
            best = min(best, time.perf_counter() - t)
        times[n] = best
        failed = [r.clause for r in results if r.failed]
        print(f"{n:>9} events  check_all {best:6.2f} s  ({best / n * 1e6:.2f} us/event)  "
              f"failed clauses on random data: {', '.join(failed) or 'none'}")
    if 1_000_000 in times:
        t1m = times[1_000_000]
        print(f"RESULT checker_time_1M {t1m:.2f} s goal <=10 {'PASS' if t1m <= 10 else 'FAIL'}")
        if 100_000 in times:
            ratio = t1m / (10 * times[100_000])
            print(f"RESULT checker_linearity {ratio:.2f} x goal <=2 {'PASS' if ratio <= 2 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
