"""Measure a stage's pace before a drain, so that its backlog lasts as long as the scenario asks.

A drain's backlog must be in the queues before its stage starts, so the
harness cannot top it up as a hold does. Instead it first runs one instance
of that stage, with the same command and environment, on a vhost of its own,
feeds it a batch of the phase's messages and reads how fast the queue's ready
count falls (passive declares, as the observer does). The test's own vhost and
history see nothing of it but one ``calibration`` event with the figures.

Engines differ by orders of magnitude (DESIGN.md: about 10 objects/s for
OS2datascanner's worker, thousands for a bare engine), so a batch that empties
too fast to measure is followed by a larger one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pika

from harness.broker import Broker, VhostOwner
from harness.history import HistoryWriter
from harness.scenario import Phase, Stage
from harness.stages import StageLauncher

FIRST_BATCH = 40
LARGEST_BATCH = 5000
MEASURE_SECONDS = 4.0   # longest measurement of one batch
ENOUGH_SECONDS = 1.0    # a batch that lasted at least this long gives a usable rate
POLL_INTERVAL = 0.05


class CalibrationError(RuntimeError):
    """The stage could not be measured (it never consumed the calibration batch)."""


@dataclass
class Pace:
    """A stage instance's measured pace on one queue."""

    stage: str
    queue: str
    rate: float        # messages per second, one instance
    messages: int      # messages the measurement spans
    seconds: float     # how long it took

    def as_event(self) -> dict:
        return {"stage": self.stage, "queue": self.queue, "rate": round(self.rate, 2),
                "messages": self.messages, "seconds": round(self.seconds, 3)}


MakeMessages = Callable[[int], list[bytes | dict]]


def calibrate(stage: Stage, make_messages: MakeMessages, broker: Broker, vhost: str, engine, work_dir: Path,
              grace: float, say: Callable[[str], None]) -> Pace:
    """Run one instance of ``stage`` on a vhost of its own and measure how fast it consumes its first queue.

    ``make_messages(n)`` returns n messages of the kind the drain will publish."""
    side = f"{vhost}-calibration"
    broker.management.create_vhost(side, tracing=False, description=VhostOwner.this_process().description())
    work_dir.mkdir(parents=True, exist_ok=True)
    history = HistoryWriter(work_dir / f"{stage.name}.jsonl")
    launcher = StageLauncher(engine.command, engine.env, broker, side, work_dir, history)
    queue = stage.read_queues[0]
    try:
        with pika.BlockingConnection(broker.connection_parameters(side)) as connection:
            channel = connection.channel()
            channel.queue_declare(queue, durable=True)
            channel.confirm_delivery()
            say(f"measuring the pace of {stage.name} on {queue} (a calibration vhost of its own)")
            batch = FIRST_BATCH
            _publish(channel, queue, make_messages(batch))
            launcher.start(stage.model_copy(update={"replicas": 1}))
            _wait_until_consumed(channel, queue, batch, grace, launcher)
            while True:
                pace = _measure(channel, queue, stage.name)
                if pace.seconds >= ENOUGH_SECONDS or batch >= LARGEST_BATCH:
                    return pace
                batch = min(LARGEST_BATCH, batch * 10)
                _publish(channel, queue, make_messages(batch))
    finally:
        launcher.stop_all()
        history.close()
        broker.management.delete_vhost(side)


def _publish(channel, queue: str, messages: list) -> None:
    from harness.messages import encode_body
    properties = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")
    for message in messages:
        body = message if isinstance(message, bytes) else encode_body(message)
        channel.basic_publish("", queue, body, properties)


def _ready(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def _wait_until_consumed(channel, queue: str, batch: int, grace: float, launcher: StageLauncher) -> None:
    deadline = time.monotonic() + grace
    while _ready(channel, queue) >= batch:
        exits = launcher.poll()
        if exits:
            raise CalibrationError(exits[0].describe())
        if time.monotonic() > deadline:
            raise CalibrationError(f"the stage consumed nothing from {queue} within G = {grace:g} s")
        time.sleep(POLL_INTERVAL)


def _measure(channel, queue: str, stage: str) -> Pace:
    """Rate from the first sample on (past the prefetch burst) to the last non-empty one."""
    first_t, first_n = time.monotonic(), _ready(channel, queue)
    last_t, last_n = first_t, first_n
    while time.monotonic() - first_t < MEASURE_SECONDS:
        time.sleep(POLL_INTERVAL)
        n = _ready(channel, queue)
        now = time.monotonic()
        if n == 0:
            # emptied somewhere between the last sample and this one
            last_t, last_n = (last_t + now) / 2, 0
            break
        last_t, last_n = now, n
    handled = first_n - last_n
    seconds = max(last_t - first_t, POLL_INTERVAL)
    return Pace(stage, queue, handled / seconds if handled > 0 else 0.0, handled, seconds)


def make_messages_for(workload, phase_index: int, phase: Phase) -> MakeMessages:
    """Messages like the phase's own (its client and mode), from scans numbered apart from the run's."""
    numbers = iter(range(100_000, 1_000_000))

    def make(count: int) -> list:
        if phase.via == "conversions":
            scan = workload.plan_scan(phase_index, next(numbers), objects=count)
            return [body for _, body in scan.messages]
        return [body for _ in range(count)
                for _, body in workload.plan_scan(phase_index, next(numbers), objects=max(phase.objects, 1)).messages]
    return make
