"""Observer overhead: engine throughput with and without the observer, same run, same broker.

    python bench/observer_overhead.py [--objects 3000] [--pairs 4] [--goal 10]

One private broker (harness.broker.LocalBroker). Each run gets a fresh vhost,
a backlog of ``--objects`` ConversionMessages made by harness.workload
(``via: conversions``) and published with harness.flood *before* the engine
starts, then one reference-engine worker (``python -m
reference_engine.run_stage worker``) drains it. Throughput = backlog / time from
the worker's first delivery until the queue is empty (a passive declare every
20 ms).

- **with**: firehose tracing on in the vhost and the harness's Observer
  recording (events, firehose, samples; it also reads the engine's output queues).
- **without**: tracing off and no Observer; a plain consumer drains the
  engine's output queues (os2ds_matches, os2ds_metadata, os2ds_status,
  os2ds_problems, os2ds_checkups) as the Observer would, or the broker slows
  down as they fill.

With/without runs alternate (the order flips each pair) ``--pairs`` times;
overhead = 1 - median(with) / median(without). Two engines are measured: a
paced one (``--work-seconds``, default 0.005 s a message: about 20 times the
real OS2datascanner worker), which is the goal, and a saturated one doing no
work at all, the worst case on a 2-core machine, where every cycle the
broker's tracer or the observer uses is taken from the engine. The last lines are
``RESULT observer_overhead <percent> % goal <=10 PASS|FAIL`` and
``RESULT observer_overhead_saturated <percent> % goal <=10 PASS|FAIL``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.broker import LocalBroker  # noqa: E402
from harness.flood import Flood  # noqa: E402
from harness.history import HistoryWriter  # noqa: E402
from harness.messages import OUTPUT_QUEUES  # noqa: E402
from harness.observer import Observer  # noqa: E402
from harness.scenario import Stage, parse_scenario  # noqa: E402
from harness.stages import StageLauncher  # noqa: E402
from harness.workload import Workload  # noqa: E402

QUEUE = "bench_conversions"


def scenario(objects: int):
    return parse_scenario({
        "seed": 5, "time_limit": 600,
        "clients": [{"name": "bench", "conversion_full_queue": QUEUE}],
        "stages": [{"name": "worker", "kind": "worker", "queue_priority": QUEUE}],
        "workload": [{"client": "bench", "via": "conversions", "objects": objects, "cpr_share": 0.3}],
    }, "<observer_overhead>")


def _drain_outputs(broker, vhost: str, stop: threading.Event, ready: threading.Event, trace: bool = False) -> None:
    """What the Observer does for the output queues (and, with ``trace``, the firehose), recording nothing."""
    connection = pika.BlockingConnection(broker.connection_parameters(vhost, heartbeat=0))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=500)
    for queue in OUTPUT_QUEUES:
        channel.queue_declare(queue, durable=True)
        channel.basic_consume(queue, lambda *a: None, auto_ack=True)
    if trace:
        traced = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(traced, "amq.rabbitmq.trace", "#")
        channel.basic_consume(traced, lambda *a: None, auto_ack=True)
    ready.set()
    while not stop.is_set():
        connection.process_data_events(0.1)
    connection.close()


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def one_run(broker, work: Path, messages: list, mode: str, number: int, work_seconds: float = 0.0) -> dict:
    """mode: "with" (tracing + Observer), "without" (neither), "tracing" (tracing, firehose read and dropped)."""
    with_observer = mode == "with"
    vhost = f"overhead-{number}-{mode}-{work_seconds:g}"
    broker.management.create_vhost(vhost, tracing=mode != "without")
    run_dir = work / vhost
    run_dir.mkdir()
    history = HistoryWriter(run_dir / "history.jsonl")
    observer = Observer(broker, vhost, history, [QUEUE]) if with_observer else None
    launcher = StageLauncher(None, {"PRIORITY_CHECK_SECONDS": "1", "REFERENCE_WORK_SECONDS": str(work_seconds)},
                             broker, vhost, run_dir, history, observer)
    stop_sink, sink_ready = threading.Event(), threading.Event()
    probe = pika.BlockingConnection(broker.connection_parameters(vhost, heartbeat=0))
    try:
        with Flood(broker.connection_parameters(vhost)) as flood:
            flood.declare([QUEUE, *OUTPUT_QUEUES])
            flood.publish_many(messages)
        channel = probe.channel()
        count = channel.queue_declare(QUEUE, passive=True).method.message_count
        assert count == len(messages), (count, len(messages))
        if observer:
            observer.start()
        else:
            threading.Thread(target=_drain_outputs, args=(broker, vhost, stop_sink, sink_ready, mode == "tracing"),
                             daemon=True).start()
            sink_ready.wait(10)
        launcher.start(Stage(name="worker", kind="worker", queue_priority=[QUEUE]))
        t_first = t_end = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            left = channel.queue_declare(QUEUE, passive=True).method.message_count
            now = time.perf_counter()
            if t_first is None and left < count:
                t_first, cpu_first = now, _cpu()
            if left == 0:
                t_end = now
                break
            probe.sleep(0.02)
        if t_end is None:
            raise RuntimeError(f"{vhost}: the worker did not drain {count} messages within 300 s")
        if launcher.poll():
            raise RuntimeError(f"{vhost}: the worker exited: {launcher.poll(include_expected=True)}")
        seconds = t_end - t_first
        cpu_share = (_cpu() - cpu_first) / seconds
        result = {"run": number, "mode": mode, "messages": count, "seconds": round(seconds, 3),
                  "rate": round(count / seconds, 1)}
        if observer:
            # This process's CPU while the worker drained: the Observer's threads (the probe is negligible).
            result["observer_cpu_share_of_one_core"] = round(cpu_share, 2)
            result["recorded"] = {k: observer.counts[k] for k in ("publish", "deliver")}
            result["observer_errors"] = observer.errors[:2]
        return result
    finally:
        stop_sink.set()
        launcher.stop_all(grace=5)
        if observer:
            observer.stop()
        try:
            probe.close()
        except Exception:
            pass
        history.close()
        broker.management.delete_vhost(vhost)


def compare(broker, work: Path, messages: list, modes: list[str], pairs: int, work_seconds: float,
            first_number: int) -> dict[str, float]:
    """Median engine rate per mode, runs alternating (the order rotates each round)."""
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    number = first_number
    for round_ in range(pairs):
        shift = round_ % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            number += 1
            result = one_run(broker, work, messages, mode, number, work_seconds)
            rates[mode].append(result["rate"])
            print(json.dumps({**result, "work_seconds": work_seconds}), flush=True)
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    for mode, values in rates.items():
        print(f"work {work_seconds:g} s/msg, engine rate {mode:>8}: median {medians[mode]:.0f} msg/s "
              f"(runs {', '.join(f'{r:.0f}' for r in values)})", flush=True)
    if "tracing" in medians:
        print(f"work {work_seconds:g} s/msg: of which the broker's tracer alone: "
              f"{100.0 * (1.0 - medians['tracing'] / medians['without']):.1f} %", flush=True)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=3000, help="backlog per run (default 3000)")
    parser.add_argument("--pairs", type=int, default=4, help="with/without pairs, alternating (default 4)")
    parser.add_argument("--goal", type=float, default=10.0, help="allowed overhead in percent (default 10)")
    parser.add_argument("--work-seconds", type=float, default=0.005,
                        help="REFERENCE_WORK_SECONDS of the paced engine (default 0.005: about 200 msg/s per "
                             "consumer, 20 times OS2datascanner's real worker)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also run 'tracing' (firehose on, read and dropped, no Observer) in each round, "
                             "to split the cost between the broker's tracer and the Observer's own work")
    args = parser.parse_args()
    modes = ["without", "with"] + (["tracing"] if args.breakdown else [])
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qp-overhead-") as tmp:
        work = Path(tmp)
        planned = Workload(scenario(args.objects), work / "data").plan(0)
        messages = [m for scan in planned for m in scan.messages]
        local = LocalBroker(work / "rabbitmq")
        broker = local.start()
        print(f"broker ready in {local.timings['start']:.1f} s; {len(messages)} conversion messages per run, "
              f"{args.pairs} rounds of {', '.join(modes)} (order rotates each round)", flush=True)
        try:
            # A paced engine (the goal) and a saturated one doing no work at all (the worst case:
            # every CPU cycle the broker's tracer or the observer takes is taken from the engine).
            paced = compare(broker, work, messages, modes, args.pairs, args.work_seconds, 0)
            saturated = compare(broker, work, messages, modes, args.pairs, 0.0, 100)
        finally:
            local.stop()
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, medians in (("observer_overhead", paced), ("observer_overhead_saturated", saturated)):
        overhead = 100.0 * (1.0 - medians["with"] / medians["without"])
        verdict = "PASS" if overhead <= args.goal else "FAIL"
        print(f"RESULT {name} {overhead:.1f} % goal <={args.goal:g} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
