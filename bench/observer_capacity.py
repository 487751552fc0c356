"""Observer capacity and CPU cost: ``python bench/observer_capacity.py [COUNT]``.

A private broker, one vhost with the firehose on; a fake stage consumes queue
``bench`` (attributed through the launcher) while a separate process
publishes COUNT gzip ConversionMessages into it as fast as it can. The
firehose then carries 2 x COUNT messages (publish + deliver). Reported: the
publish rate, the rate at which the observer recorded them, how far it lagged
behind the publisher, and the CPU seconds this process (= the observer) used
per firehose event; then the observer's own cost per event without pika or
the broker. What the observer costs an engine is bench/observer_overhead.py.
Figures only, no goal of its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.broker import LocalBroker  # noqa: E402
from harness.history import HistoryWriter  # noqa: E402
from harness.observer import Observer  # noqa: E402
from harness.scenario import Stage  # noqa: E402
from harness.stages import StageLauncher  # noqa: E402

HERE = ROOT / "tests" / "helpers"  # fake_stage.py and publish_burst.py


def run(broker, work: Path, count: int, with_observer: bool, tracing: bool) -> dict:
    vhost = f"bench-{int(time.time() * 1000)}"
    broker.management.create_vhost(vhost, tracing=tracing)
    history = HistoryWriter(work / f"{vhost}.jsonl")
    observer = Observer(broker, vhost, history, ["bench"]) if with_observer else None
    launcher = StageLauncher([sys.executable, str(HERE / "fake_stage.py"), "{stage}"], {"FAKE_PREFETCH": "50"},
                             broker, vhost, work / vhost, history, observer)
    me = psutil.Process()
    try:
        if observer:
            observer.start()
        [stage] = launcher.start(Stage(name="sink", kind="worker", queue_priority=["bench"]))
        deadline = time.monotonic() + 20
        while "consuming" not in stage.tail() and time.monotonic() < deadline:
            time.sleep(0.02)
        cpu0, t0 = me.cpu_times(), time.perf_counter()
        out = subprocess.run([sys.executable, str(HERE / "publish_burst.py"), broker.amqp_url(vhost), "bench", str(count)],
                             capture_output=True, text=True, check=True)
        published = json.loads(out.stdout)
        t_pub = time.perf_counter() - t0
        result = {"observer": with_observer, "tracing": tracing, "count": count, "publish_rate": published["rate"]}
        if observer:
            want = 2 * count

            def recorded() -> int:
                return observer.counts["publish"] + observer.counts["deliver"]

            observer.wait_for(lambda: recorded() >= want, timeout=120)
            t_all = time.perf_counter() - t0
            cpu1 = me.cpu_times()
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            result.update(recorded=recorded(), firehose_events=want, seconds_to_record=round(t_all, 2),
                          observer_rate=round(recorded() / t_all), lag_after_publisher_s=round(t_all - t_pub, 2),
                          cpu_s=round(cpu, 2), cpu_us_per_event=round(1e6 * cpu / want, 1),
                          cpu_share_of_one_core=round(cpu / t_all, 2),
                          samples=observer.samples, errors=observer.errors[:3])
        return result
    finally:
        launcher.stop_all(grace=5)
        if observer:
            observer.stop()
        history.close()
        broker.management.delete_vhost(vhost)


def microbench(n: int = 20000) -> dict:
    """The observer's own cost per firehose message, without pika or the broker: summarise + record."""
    import gzip

    class Fake:
        amqp_port = 1
        host = "127.0.0.1"

    with tempfile.TemporaryDirectory() as tmp:
        history = HistoryWriter(Path(tmp) / "h.jsonl")
        observer = Observer(Fake(), "v", history, [])
        bodies = [gzip.compress(json.dumps({"scan_spec": {"scan_tag": {"time": "2025-01-01T00:00:00+00:00",
                                            "scanner": {"pk": 1}, "organisation": {"uuid": "o"}}},
                                            "handle": {"path": f"f{i}.txt"}, "progress": {"rule": {}}}).encode())
                  for i in range(30000)]
        headers = {"exchange_name": "", "routing_keys": ["bench"], "properties": {"content_encoding": "gzip"},
                   "connection": "127.0.0.1:5 -> 127.0.0.1:1", "channel": 1, "routed_queues": ["bench"]}
        observer.recorder.resolver.remember(5, "sink")
        t0 = time.perf_counter()
        for number in range(n):  # a distinct body each time, traced twice (publish, deliver) as on the wire
            body = bodies[number % len(bodies)]
            observer.recorder.on_trace(time.time(), "publish.", headers, body)
            observer.recorder.on_trace(time.time(), "deliver.bench", headers, body)
        elapsed = time.perf_counter() - t0
        history.close()
    return {"microbench_us_per_event": round(1e6 * elapsed / (2 * n), 1),
            "microbench_events_per_s": round(2 * n / elapsed)}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalBroker(Path(tmp) / "rabbitmq")
        broker = local.start()
        try:
            for with_observer, tracing in ((False, False), (False, True), (True, True)):
                print(json.dumps(run(broker, Path(tmp), count, with_observer, tracing)), flush=True)
            print(json.dumps(microbench()), flush=True)
        finally:
            local.stop()


if __name__ == "__main__":
    main()
