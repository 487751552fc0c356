"""Switch latency of the reference engine: burst into a higher queue -> lower consumer cancelled.

A worker with ``QUEUE_PRIORITY="bench_hi bench_lo"`` is kept busy on a large
backlog in ``bench_lo`` (the pitfall of DESIGN.md: a check tied to message
flow never runs under load). Each trial publishes a burst into ``bench_hi``
(publisher confirms) at a random phase of the check clock and times the
``consumer.deleted`` event for ``bench_lo`` from the broker's event exchange
(both stamped on this machine's clock on receipt). After the burst drains
the worker must come back to ``bench_lo`` before the next trial.

Run on purpose, never in CI:

    python bench/switch_latency.py [--check-period 5] [--trials 6] [--work 0.005]

A private rabbitmq-server is started (harness.broker.LocalBroker) and
stopped at the end. The last line is exactly
``RESULT cancel_latency <max> s goal <=<check period> PASS|FAIL``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pika  # noqa: E402
import pika.exceptions  # noqa: E402

from harness.broker import LocalBroker  # noqa: E402

HI, LO = "bench_hi", "bench_lo"
PROPS = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")


class ConsumerEvents:
    """consumer.created / consumer.deleted for one vhost, stamped on receipt, on its own thread."""

    def __init__(self, broker, vhost: str):
        self.broker, self.vhost = broker, vhost
        self.events: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(15)

    def _run(self) -> None:
        conn = pika.BlockingConnection(self.broker.connection_parameters("/"))
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "amq.rabbitmq.event", "consumer.*")

        def on_event(_ch, method, props, _body):
            h = props.headers or {}
            vhost = h.get("vhost")
            vhost = vhost.decode() if isinstance(vhost, bytes) else vhost
            if vhost == self.vhost:
                queue = h.get("queue")
                queue = queue.decode() if isinstance(queue, bytes) else queue
                with self.lock:
                    self.events.append((time.monotonic(), method.routing_key, queue))

        ch.basic_consume(q, on_event, auto_ack=True)
        self.ready.set()
        try:
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.01)
            conn.close()
        except pika.exceptions.AMQPError:
            pass  # the broker went away at the end of the run

    def first(self, kind: str, queue: str, after: float) -> float | None:
        with self.lock:
            for t, k, q in self.events:
                if k == kind and q == queue and t >= after:
                    return t
        return None

    def wait(self, kind: str, queue: str, after: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(kind, queue, after)
            if t is not None:
                return t
            time.sleep(0.002)
        raise TimeoutError(f"no {kind} for {queue} within {timeout:.0f} s")


def conversion(data: Path, name: str) -> bytes:
    spec = {"scan_tag": {"time": "2026-11-27T18:28:56+00:00", "user": "bench",
                         "scanner": {"pk": 1, "name": "bench"},
                         "organisation": {"name": "Bench", "uuid": "bbbbbbbb-0000-4000-8000-000000000009"}},
            "source": {"type": "file", "path": str(data)}, "rule": {"type": "cpr"}}
    return gzip.compress(json.dumps({
        "scan_spec": spec, "handle": {"type": "file", "source": spec["source"], "path": name},
        "progress": {"rule": spec["rule"], "matches": []}}).encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-period", type=float, default=5.0, help="PRIORITY_CHECK_SECONDS (default 5)")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--work", type=float, default=0.005, help="REFERENCE_WORK_SECONDS (keeps the worker busy)")
    parser.add_argument("--burst", type=int, default=0, help="messages per burst (default: enough for 2 periods)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="qp-bench-switch-"))
    local = LocalBroker(workdir / "rabbitmq")
    broker = local.start()
    worker = None
    events = None
    result_line = None
    try:
        vhost = "bench-" + secrets.token_hex(4)
        broker.management.create_vhost(vhost, tracing=False)
        data = workdir / "data"
        data.mkdir()
        (data / "obj.txt").write_text("nothing to see here")
        conn = pika.BlockingConnection(broker.connection_parameters(vhost))
        ch = conn.channel()
        ch.confirm_delivery()
        fast = conn.channel()
        for q in (HI, LO):
            ch.queue_declare(q, durable=True)
        body = conversion(data, "obj.txt")
        # bench_hi must stay non-empty for more than a period while served by the first consumer
        burst = args.burst or int(2 * args.check_period / max(args.work, 0.001)) + 100
        backlog = int(args.trials * (3 * args.check_period + 2) / max(args.work, 0.001)) + 500
        for _ in range(backlog):
            fast.basic_publish("", LO, body, PROPS)
        ch.basic_publish("", LO, body, PROPS)  # confirms everything before it on this connection's queue
        events = ConsumerEvents(broker, vhost)
        cfg = workdir / "engine.toml"
        cfg.write_text(f'[amqp]\nAMQP_HOST = "{broker.host}"\nAMQP_PORT = {broker.amqp_port}\n'
                       f'AMQP_USER = "{broker.user}"\nAMQP_PWD = "{broker.password}"\nAMQP_VHOST = "{vhost}"\n')
        env = {**os.environ, "OS2DS_ENGINE_USER_CONFIG_PATH": str(cfg), "QUEUE_PRIORITY": f"{HI} {LO}",
               "PRIORITY_CHECK_SECONDS": str(args.check_period), "REFERENCE_WORK_SECONDS": str(args.work),
               "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
        log = open(workdir / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "reference_engine.run_stage", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        events.wait("consumer.created", LO, 0, 30 + 2 * args.check_period)
        latencies = []
        rng = random.Random(1)
        for trial in range(args.trials):
            time.sleep(rng.uniform(0, args.check_period))  # random phase against the check clock
            ch.basic_publish("", HI, body, PROPS)
            t_burst = time.monotonic()  # the first message is confirmed: it is in bench_hi
            for _ in range(burst - 1):  # the rest keeps bench_hi non-empty beyond one period
                fast.basic_publish("", HI, body, PROPS)
            t_cancel = events.wait("consumer.deleted", LO, t_burst, 4 * args.check_period + 10)
            latencies.append(t_cancel - t_burst)
            print(f"trial {trial + 1}: cancel latency {t_cancel - t_burst:.3f} s", flush=True)
            ch.queue_purge(HI)  # end the burst; the worker must come back to bench_lo
            events.wait("consumer.created", LO, t_cancel, 4 * args.check_period + 30)
        conn.close()
        worst = max(latencies)
        print(f"cancel latency over {len(latencies)} trials: min {min(latencies):.3f} s, "
              f"median {statistics.median(latencies):.3f} s, max {worst:.3f} s "
              f"(check period {args.check_period} s, work {args.work} s/message, busy worker)")
        verdict = "PASS" if worst <= args.check_period else "FAIL"
        result_line = f"RESULT cancel_latency {worst:.3f} s goal <={args.check_period:g} {verdict}"
        return 0 if verdict == "PASS" else 1
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(5)
        if events is not None:
            events.stop.set()
            events.thread.join(10)
        local.stop()
        if result_line is None:
            result_line = f"RESULT cancel_latency nan s goal <={args.check_period:g} FAIL"
        print(result_line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
