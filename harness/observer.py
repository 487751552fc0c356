"""The observer: records what the broker shows about a test's vhost into the history.

Three sources (ENGINE_CONTRACT.md section 5), each on a pika connection of
its own, each connection owned and serviced by one thread (pika is not
thread-safe, and an unserviced connection misses heartbeats):

- **events** (``amq.rabbitmq.event``; the plugin publishes the events of
  *every* vhost into one vhost, "/" by default, with a ``vhost`` header):
  connections, channels, queues and consumers of the test's vhost, attributed
  to stages by harness.attribution (a connection by its client port, mapped
  by harness.port_resolver to a registered stage PID or one of its children;
  channels through their connection, consumers through their channel).
- **firehose** (``amq.rabbitmq.trace`` in the test's vhost): every publish and
  delivery, reduced to ``messages.summarise``; the same thread also consumes
  the engine's output queues (``output`` events), so they never fill up.
- **sampler**: a passive ``queue.declare`` of every scenario queue each
  ``sample_interval``, one ``sample`` event per tick.

These threads only put what they receive on the recorder's inbox; the
recorder thread (harness.recorder) alone decides what it means, writes the
history and updates the ``LiveView`` the runner queries.

The observer's own connections carry a client-provided connection name
(``qp-harness-observer-…``) and are left out of the history entirely, with
their channels, consumers, queues and deliveries. Connections from this
Python process that are not the observer's are attributed to ``'harness'``.

Every event is stamped ``t`` = the observer's receive time; event-exchange
events also carry ``broker_ms`` (the broker's ``timestamp_in_ms``).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import Counter
from functools import partial
from typing import Any, Callable

import pika
import pika.exceptions

from harness.attribution import BROKER_DOWN, NODE_DOWN
from harness.history import HistoryWriter
from harness.live_view import LiveView
from harness.messages import OUTPUT_QUEUES
from harness.port_resolver import PortResolver
from harness.recorder import Recorder, StageResolver

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "amq.rabbitmq.event"
TRACE_EXCHANGE = "amq.rabbitmq.trace"
EVENT_KEYS = ("consumer.*", "queue.*", "connection.*", "channel.*")

# Everything pika raises when a connection or channel goes away.
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError, AssertionError)
# Seconds an observer connection may stay lost (reconnects failing) before the broker counts as gone.
BROKER_GONE_AFTER = 5.0
OUTPUT_PREFETCH = 500  # unacked output messages in flight to the observer

SAMPLE_INTERVAL = 0.1  # seconds between two samples of the ready counts
# What the checkers may assume of this observer (recorded in run_started; harness.checkers._common):
# - samples more than this many intervals apart do not bridge a run of one state: the sampler
#   may fall behind (a missing queue costs it a channel) but not by this much;
MAX_SAMPLE_GAP_INTERVALS = 20
# - a queue may empty just after a sample: a cancel this many intervals after the last sample that
#   saw a higher queue non-empty is still a switch;
SWITCH_SLACK_INTERVALS = 5
# - queue.created (event thread) and a publish (firehose thread) arrive on two subscriptions,
#   each polled every 0.05-0.1 s: either may be received up to this many seconds before the other.
CREATE_SLACK = 0.25


def _local_port(connection: pika.BlockingConnection) -> int | None:
    try:
        return connection._impl._transport._sock.getsockname()[1]  # noqa: SLF001 (no public accessor)
    except Exception:  # pragma: no cover - pika internals changed
        return None


def _safe_close(connection: pika.BlockingConnection | None) -> None:
    if connection is None:
        return
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # a lost connection must never crash teardown
        log.debug("observer: closing a connection failed", exc_info=True)


class ObserverError(RuntimeError):
    """The observer could not start (broker unreachable, event exchange plugin missing, ...)."""


class _Worker(threading.Thread):
    """One thread owning one connection: connect, set up, serve until stopped; reconnects when lost.
    What it receives goes to the recorder's inbox, nowhere else."""

    def __init__(self, observer: "Observer", role: str, vhost: str):
        super().__init__(name=f"observer-{role}", daemon=True)
        self.observer = observer
        self.put = observer.recorder.put
        self.view = observer.view
        self.role = role
        self.vhost = vhost
        self.connection: pika.BlockingConnection | None = None
        self.reconnects = 0

    # connect() runs in the thread that calls Observer.start(), before run(): the
    # connection is then handed over and only this thread touches it.
    def connect(self) -> None:
        params = self.observer.broker.connection_parameters(
            self.vhost, heartbeat=30, blocked_connection_timeout=None,
            client_properties={"connection_name": f"{self.observer.connection_name}-{self.role}"})
        self.connection = pika.BlockingConnection(params)
        self.put("own_port", _local_port(self.connection))
        try:
            self.setup()
        except BaseException:
            _safe_close(self.connection)
            self.connection = None
            raise

    def setup(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def serve_once(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def drain(self) -> None:
        """Called once the observer stops: take what is still in flight."""

    def drain_until_quiet(self) -> None:
        """Read on until nothing has come for drain_quiet seconds (at most drain_timeout)."""
        deadline = time.monotonic() + self.observer.drain_timeout
        self.last_message = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - self.last_message < self.observer.drain_quiet:
            self.connection.process_data_events(time_limit=0.05)

    def run(self) -> None:
        stopping = self.observer._stopping
        while True:
            try:
                while not stopping.is_set():
                    self.serve_once()
                self.drain()
                break
            except AMQP_ERRORS as exc:
                if stopping.is_set():
                    break
                self.put("lost", self.role, time.monotonic(), repr(exc))
                self.put("error", f"{self.role} connection lost: {exc!r}; reconnecting")
                _safe_close(self.connection)
                self.connection = None
                if not self._reconnect():
                    break
            except Exception as exc:  # a bug: report it, keep the other threads going
                self.put("error", f"{self.role} thread failed: {exc!r}")
                log.exception("observer %s thread failed", self.role)
                break
        _safe_close(self.connection)

    def _reconnect(self) -> bool:
        delay = 0.2
        stopping = self.observer._stopping
        while not stopping.is_set():
            try:
                self.connect()
                self.reconnects += 1
                self.put("reconnected", self.role)
                return True
            except (*AMQP_ERRORS, ObserverError) as exc:  # e.g. a restarted node without its event exchange yet
                self.put("error", f"{self.role} reconnect failed: {exc!r}")
                stopping.wait(delay)
                delay = min(delay * 2, 2.0)
        return False


class _EventWorker(_Worker):
    def setup(self) -> None:
        channel = self.connection.channel()
        # Durable, so that it outlives a broker restart with its bindings and holds the events of
        # stages that reconnect before we do; it expires a minute after its last consumer. Classic
        # whatever the vhost's default queue type (a scenario's broker.default_queue_type).
        queue = f"{self.observer.connection_name}-events"
        try:
            channel.queue_declare(queue, durable=True, arguments={"x-expires": 60_000, "x-queue-type": "classic"})
            for key in EVENT_KEYS:
                channel.queue_bind(queue, EVENT_EXCHANGE, key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise ObserverError(f"cannot bind to {EVENT_EXCHANGE} in vhost {self.vhost!r} "
                                f"(is rabbitmq_event_exchange enabled?): {exc}") from None
        channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.channel, self.queue = channel, queue
        self.received = 0

    def _on_message(self, channel, method, properties, body) -> None:
        self.received += 1
        self.put("event", time.time(), method.routing_key, properties.headers or {})

    def serve_once(self) -> None:
        self.connection.process_data_events(time_limit=0.05)

    def drain(self) -> None:
        obs = self.observer
        quiet_since = time.monotonic()
        deadline = time.monotonic() + obs.drain_timeout
        while time.monotonic() < deadline and time.monotonic() - quiet_since <= obs.drain_quiet:
            before = self.received
            self.connection.process_data_events(time_limit=0.05)
            if self.received != before:
                quiet_since = time.monotonic()
        try:
            self.channel.queue_delete(self.queue)
        except AMQP_ERRORS:
            pass  # it expires by itself


class _FirehoseWorker(_Worker):
    def setup(self) -> None:
        obs = self.observer
        if self.reconnects or obs.broker.nodes:
            # Tracing is off again after a broker restart (ENGINE_CONTRACT.md section 5), and on a
            # cluster it is per node: the vhost's creation switched it on for the first node only.
            try:
                obs.broker.trace_on(self.vhost)
            except Exception as exc:
                self.put("error", f"could not switch tracing on: {exc!r}")
        trace = self.connection.channel()
        # Not exclusive, so the sampler can read its backlog; auto-delete, and expiring, so it never outlives us.
        trace.queue_declare(obs.trace_queue, auto_delete=True,
                            arguments={"x-expires": 60_000, "x-queue-type": "classic"})
        trace.queue_bind(obs.trace_queue, TRACE_EXCHANGE, "publish.#")
        # Deliveries are traced per queue, leaving out the output queues the observer reads
        # itself: their deliveries would double the firehose for nothing (and it is the
        # firehose's volume that costs the engine throughput on a small machine).
        self.trace_channel, self.bound = trace, set()
        self.announced = 0  # queues of view.traced_queues() bound so far
        self.bind_deliveries(obs._delivery_queues() + self._announced())
        trace.basic_consume(obs.trace_queue, self._on_trace, auto_ack=True)
        self.last_message = time.monotonic()

    def _announced(self) -> list[str]:
        fresh = self.view.traced_queues(self.announced)
        self.announced += len(fresh)
        return fresh

    def bind_deliveries(self, queues) -> None:
        fresh = [name for name in dict.fromkeys(queues) if name not in self.bound]
        for name in fresh:
            self.trace_channel.queue_bind(self.observer.trace_queue, TRACE_EXCHANGE, f"deliver.{name}")
            self.bound.add(name)
        if fresh:
            self.observer._note_traced(fresh)

    def _on_trace(self, channel, method, properties, body) -> None:
        self.last_message = time.monotonic()
        self.put("trace", time.time(), method.routing_key, properties.headers or {}, body)

    def serve_once(self) -> None:
        # Queues announced since the last turn (by the broker's queue.created or add_queue);
        # bound here, since only this thread may touch its channel.
        self.bind_deliveries(self._announced())
        self.connection.process_data_events(time_limit=0.1)

    def drain(self) -> None:
        self.drain_until_quiet()


class _OutputWorker(_Worker):
    """The engine's output queues, read on a connection of their own: with the firehose on the same
    connection, the fast, acked output traffic held the trace deliveries back for seconds under load."""

    def setup(self) -> None:
        output = self.connection.channel()
        # Acked once handed to the recorder: a broker killed mid-run (restart_broker) keeps what the
        # observer had not received yet and delivers it again, where the firehose's backlog is lost.
        output.basic_qos(prefetch_count=OUTPUT_PREFETCH)
        for name in self.observer.output_queues:
            # Exactly as the engine declares them, or the broker refuses one of the two.
            output.queue_declare(name, durable=True)
            output.basic_consume(name, partial(self._on_output, name), auto_ack=False)
        self.last_message = time.monotonic()

    def _on_output(self, queue, channel, method, properties, body) -> None:
        self.last_message = time.monotonic()
        self.put("output", time.time(), queue, properties.content_encoding, body, bool(method.redelivered))
        channel.basic_ack(method.delivery_tag)

    def serve_once(self) -> None:
        self.connection.process_data_events(time_limit=0.1)

    def drain(self) -> None:
        self.drain_until_quiet()


class _SampleWorker(_Worker):
    def setup(self) -> None:
        self.channel = self.connection.channel()
        self.next_tick = time.monotonic()
        # queue -> (monotonic time of the probe that found it missing, creation count then)
        self.missing: dict[str, tuple[float, int]] = {}

    def serve_once(self) -> None:
        obs = self.observer
        now = time.monotonic()
        if now < self.next_tick:
            self.connection.sleep(min(self.next_tick - now, 0.1))
            return
        self.next_tick = max(self.next_tick + obs.sample_interval, now)
        t = time.time()
        ready = {queue: self._sample(queue, now) for queue in self.view.sampled_queues()}
        # Messages the firehose has not yet handed to the observer: while > 0, firehose times run late.
        backlog = self._ready(obs.trace_queue)
        self.put("sample", t, ready, backlog)

    def _sample(self, queue: str, now: float) -> int | None:
        # A passive declare of a missing queue costs the channel; while no queue.created event
        # names it, probe a missing queue only every missing_reprobe seconds.
        gone = self.missing.get(queue)
        generation = self.view.generation(queue)
        if gone is not None and gone[1] == generation and now - gone[0] < self.observer.missing_reprobe:
            return None
        count = self._ready(queue)
        if count is None:
            self.missing[queue] = (now, generation)
        else:
            self.missing.pop(queue, None)
        return count

    def _ready(self, queue: str) -> int | None:
        if self.channel is None or not self.channel.is_open:
            self.channel = self.connection.channel()
        try:
            return self.channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            # 404 (no such queue) or 405 (exclusive to another connection): the channel is gone.
            self.channel = None
            return None


class Observer:
    """Records broker events, the firehose and queue samples of one vhost into ``history``.

    Any thread may query it (``consumers_of``, ``ready``, ``wait_for`` and friends: a ``LiveView``
    that only the recorder thread updates, but for ``add_queue``) and tell it things
    (``register_stage``, ``note_broker_down``: put on the recorder's inbox, applied in order).
    """

    def __init__(self, broker, vhost_name: str, history: HistoryWriter, queues: list[str],
                 sample_interval: float = SAMPLE_INTERVAL, *,
                 output_queues: tuple[str, ...] | list[str] = OUTPUT_QUEUES, event_vhost: str = "/",
                 attribution_timeout: float = 1.0, drain_timeout: float = 5.0, drain_quiet: float = 0.3,
                 resolver: StageResolver | None = None):
        self.broker = broker
        self.vhost = vhost_name
        self.history = history
        self.sample_interval = sample_interval
        self.output_queues = tuple(output_queues)
        self.event_vhost = event_vhost
        self.drain_timeout = drain_timeout
        self.drain_quiet = drain_quiet
        self.missing_reprobe = 1.0
        self.connection_name = f"qp-harness-observer-{secrets.token_hex(4)}"
        self.trace_queue = f"{self.connection_name}-trace"
        self.view = LiveView(queues, traced=[q for q in queues if q not in self.output_queues])
        self.recorder = Recorder(history, vhost_name, self.connection_name,
                                 resolver or PortResolver(broker.amqp_port, os.getpid()), self.view,
                                 self.output_queues, attribution_timeout=attribution_timeout,
                                 drain_timeout=drain_timeout)
        self._recorder_thread = threading.Thread(target=self.recorder.run, name="observer-recorder", daemon=True)
        self._broker_gone: str | None = None  # the runner's thread only (broker_problem)
        self._next_group_check = 0.0
        self._stopping = threading.Event()
        self._traced_cond = threading.Condition()
        self._traced: set[str] = set()  # queues whose deliveries the firehose thread has bound (add_queue waits)
        self._workers: list[_Worker] = []
        self._started = False
        self._stopped = False

    def sampling_parameters(self) -> dict[str, float]:
        """What the checkers may assume of this observer's timing (run_started fields)."""
        return {"sample_interval": self.sample_interval,
                "max_sample_gap": MAX_SAMPLE_GAP_INTERVALS * self.sample_interval,
                "switch_slack": SWITCH_SLACK_INTERVALS * self.sample_interval,
                "create_slack": CREATE_SLACK}

    # ------------------------------------------------------------------ told by other threads
    def register_stage(self, stage_name: str, pid: int, user: str | None = None) -> None:
        """A stage instance was spawned as ``pid`` with its own broker ``user``: its connections are
        those of that user (else those of the process and its children)."""
        self.recorder.put("stage", stage_name, pid, user)

    def add_queue(self, queue: str, wait: float = 0.0) -> bool:
        """Sample ``queue`` too, and trace its deliveries, from the observer threads' next turn on.

        The one write to the view from outside the recorder: a queue the harness is about to create
        may be consumed at once, and under load the recorder's inbox runs seconds behind, so a queue
        put there missed its first deliveries (the queue list only grows: no order to keep). With
        ``wait``, block until the firehose traces its deliveries, at most that many seconds; returns
        whether it does."""
        self.view.add_queue(queue, traced=queue not in self.output_queues)
        with self._traced_cond:
            return self._traced_cond.wait_for(lambda: queue in self._traced, timeout=wait)

    def _note_traced(self, queues: list[str]) -> None:
        """The firehose thread has bound the deliveries of ``queues``."""
        with self._traced_cond:
            self._traced.update(queues)
            self._traced_cond.notify_all()

    def note_node_down(self, amqp_port: int) -> None:
        """A cluster node is about to be killed (kill_node): its stage connections end now."""
        self.recorder.put("event", time.time(), NODE_DOWN, {"port": amqp_port})

    def note_broker_down(self) -> None:
        """The broker is about to be killed (a restart_broker fault). A dead node announces no
        closes, so the recorder records them: every stage connection ends now."""
        self.recorder.put("event", time.time(), BROKER_DOWN, {})

    # ------------------------------------------------------------------ life cycle
    def _delivery_queues(self) -> list[str]:
        """Queues whose deliveries are traced: the scenario's and every other queue of the vhost,
        but not the output queues the observer reads itself."""
        names = self.view.sampled_queues()
        try:
            names += [q["name"] for q in self.broker.management.queues(self.vhost)]
        except Exception as exc:  # the scenario's queues are the ones that matter most
            self.recorder.put("error", f"could not list the vhost's queues: {exc!r}")
        return [n for n in dict.fromkeys(names)
                if n not in self.output_queues and not n.startswith(self.connection_name)]

    def start(self) -> None:
        """Connect and subscribe; returns once every subscription is in place."""
        if self._started:
            return
        self._started = True
        events = _EventWorker(self, "events", self.event_vhost)
        firehose = _FirehoseWorker(self, "firehose", self.vhost)
        output = _OutputWorker(self, "output", self.vhost)
        sampler = _SampleWorker(self, "sampler", self.vhost)
        try:
            # The event queue is bound first, so it sees the others connect (and leaves them out).
            for worker in (events, firehose, output, sampler):
                worker.connect()
                self._workers.append(worker)
        except ObserverError:
            self._close_unstarted()
            raise
        except AMQP_ERRORS as exc:
            self._close_unstarted()
            raise ObserverError(f"observer cannot connect to the broker at {self.broker.host}:"
                                f"{self.broker.amqp_port} (vhost {self.vhost!r}): {exc!r}") from None
        self._recorder_thread.start()
        for worker in self._workers:
            worker.start()

    def _close_unstarted(self) -> None:
        for worker in self._workers:
            _safe_close(worker.connection)
        self._workers = []
        self._stopped = True

    def stop(self, timeout: float = 15.0) -> None:
        """Drain what is in flight, record it, close every connection. Idempotent; never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                self.recorder.put("error", f"{worker.role} thread did not stop within {timeout:g} s")
        if self._recorder_thread.is_alive():
            self.recorder.put("stop")
            self._recorder_thread.join(max(0.0, deadline - time.monotonic()))
            if self._recorder_thread.is_alive():
                log.warning("observer: the recorder did not stop within %g s", timeout)
        try:
            self.history.flush()
        except (OSError, ValueError) as exc:  # a closed or full file: the run's own error says more
            log.warning("observer: could not flush the history: %r", exc)

    def __enter__(self) -> "Observer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def errors(self) -> list[str]:
        return self.view.errors

    @property
    def counts(self) -> Counter[str]:
        """History events recorded, by type."""
        return self.recorder.counts

    # ------------------------------------------------------------------ queries (LiveView)
    def broker_problem(self, lost_for: float = BROKER_GONE_AFTER) -> str | None:
        """Why the broker looks gone, or None while it answers.

        A local broker whose server process group has emptied is gone at once;
        any broker is gone once one of the observer's connections has been lost
        and every reconnect has failed for ``lost_for`` seconds.
        """
        if self._broker_gone is not None:
            return self._broker_gone
        now = time.monotonic()
        groups = list(getattr(self.broker, "process_groups", None) or [])
        if groups and now >= self._next_group_check:
            self._next_group_check = now + 1.0
            from harness.watchdog import group_members
            if not group_members(groups[0]):
                self._broker_gone = (f"broker gone: the local rabbitmq-server (process group {groups[0]}) is no "
                                     f"longer running; the run was ended")
                return self._broker_gone
        lost = self.view.lost()
        if lost:
            role, (since, error) = min(lost.items(), key=lambda item: item[1][0])
            if now - since >= lost_for:
                self._broker_gone = (f"broker gone: the observer's {role} connection to {self.broker.host}:"
                                     f"{self.broker.amqp_port} was lost {now - since:.0f} s ago and every "
                                     f"reconnect since failed ({error}); the run was ended")
                return self._broker_gone
        return None

    def consumers_of(self, stage: str) -> set[str]:
        return self.view.consumers_of(stage)

    def consumers(self) -> list[dict[str, Any]]:
        return self.view.consumers()

    def consuming_stages(self) -> dict[str, set[str]]:
        return self.view.consuming_stages()

    def connections_of(self, stage: str) -> list[str]:
        return self.view.connections_of(stage)

    def ready(self, queue: str) -> int | None:
        return self.view.ready(queue)

    def ready_counts(self) -> dict[str, int | None]:
        return self.view.ready_counts()

    @property
    def samples(self) -> int:
        return self.view.samples

    @property
    def firehose_backlog(self) -> int | None:
        return self.view.firehose_backlog

    def output_count(self, queue: str | None = None) -> int:
        return self.view.output_count(queue)

    def output_types(self) -> dict[str, int]:
        return self.view.output_types()

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        return self.view.wait_for(predicate, timeout)

    def wait_for_consumers(self, stage: str, queues: set[str] | list[str] | None = None,
                           timeout: float = 30.0) -> set[str]:
        return self.view.wait_for_consumers(stage, queues, timeout)

    def wait_for_ready(self, queue: str, count: int, timeout: float) -> int | None:
        return self.view.wait_for_ready(queue, count, timeout)
