"""Benchmark: the flood's publish rate vs a bare pika publish loop with confirms, same broker, same run.

Usage: ``python bench/flood.py [--messages N] [--repeat R]``

Starts a private RabbitMQ (harness.broker.LocalBroker), makes a vhost, and
publishes N ConversionMessages (as ``harness.workload`` builds them, about
2 KB of JSON each) into a durable queue:

* bare: ``pika.BlockingConnection`` + ``confirm_delivery()`` + a
  ``basic_publish`` loop with the same properties, on bodies encoded beforehand;
* flood: ``harness.flood.Flood.publish`` on the message dicts (so the flood's
  figure includes gzip-JSON encoding; the bare loop's does not).

Each is run R times alternately (queues purged in between); the best rate of
each counts. Ends with ``RESULT flood_rate_ratio <x> x goal >=0.8 PASS|FAIL``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.broker import LocalBroker  # noqa: E402
from harness.flood import DATA_PROPERTIES, Flood  # noqa: E402
from harness.messages import encode_body  # noqa: E402
from harness.scenario import parse_scenario  # noqa: E402
from harness.workload import Workload  # noqa: E402

QUEUE = "conversions_full"


def make_messages(n: int, data_dir: Path) -> list[dict]:
    scenario = parse_scenario({
        "seed": 1,
        "clients": [{"name": "bench", "conversion_full_queue": QUEUE}],
        "stages": [{"name": "worker", "kind": "worker", "queue_priority": QUEUE}],
        "workload": [{"client": "bench", "mode": "full", "objects": n, "via": "conversions"}],
    }, "bench")
    scan = Workload(scenario, data_dir).plan(0)[0]
    return [body for _queue, body in scan.messages]


def bare(parameters: pika.ConnectionParameters, bodies: list[bytes]) -> float:
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        start = time.perf_counter()
        for body in bodies:
            channel.basic_publish("", QUEUE, body, DATA_PROPERTIES)
        return len(bodies) / (time.perf_counter() - start)
    finally:
        connection.close()


def flood(parameters: pika.ConnectionParameters, messages: list[dict]) -> float:
    with Flood(parameters) as f:
        f.declare([QUEUE])
        start = time.perf_counter()
        confirmed = f.publish(QUEUE, messages)
        seconds = time.perf_counter() - start
    assert confirmed == len(messages), (confirmed, len(messages))
    return confirmed / seconds


def purge(parameters: pika.ConnectionParameters) -> int:
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        count = channel.queue_declare(QUEUE, passive=True).method.message_count
        channel.queue_purge(QUEUE)
        return count
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qp-bench-flood-") as tmp:
        t = time.perf_counter()
        messages = make_messages(args.messages, Path(tmp) / "data")
        gen = time.perf_counter() - t
        print(f"workload: {args.messages} files + ConversionMessages in {gen:.2f} s "
              f"({args.messages / gen:.0f} files/s)")
        encoded = [encode_body(m) for m in messages]
        print(f"message size: {sum(map(len, encoded)) / len(encoded):.0f} bytes gzip")
        local = LocalBroker(Path(tmp) / "rabbitmq")
        try:
            broker = local.start()
            broker.management.create_vhost("bench", tracing=False)
            parameters = broker.connection_parameters("bench")
            setup = pika.BlockingConnection(parameters)
            setup.channel().queue_declare(QUEUE, durable=True)
            setup.close()
            bare_rates, flood_rates = [], []
            for round_ in range(args.repeat):
                bare_rates.append(bare(parameters, encoded))
                assert purge(parameters) == len(encoded)
                flood_rates.append(flood(parameters, messages))
                assert purge(parameters) == len(messages)
                print(f"round {round_ + 1}: bare pika {bare_rates[-1]:.0f} msg/s, flood {flood_rates[-1]:.0f} msg/s")
        finally:
            local.stop()
    best_bare, best_flood = max(bare_rates), max(flood_rates)
    ratio = best_flood / best_bare
    print(f"bare pika publish loop with confirms: {best_bare:.0f} msg/s (best of {args.repeat})")
    print(f"flood (pipelined confirms, incl. encoding): {best_flood:.0f} msg/s (best of {args.repeat})")
    print(f"RESULT flood_rate_ratio {ratio:.2f} x goal >=0.8 {'PASS' if ratio >= 0.8 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
