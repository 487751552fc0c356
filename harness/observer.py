"""The observer: records what the broker shows about a test's vhost into the history.

Three sources (ENGINE_CONTRACT.md section 5), each on a pika connection of
its own, each connection owned and serviced by one thread (pika is not
thread-safe, and an unserviced connection misses heartbeats):

- **events** (``amq.rabbitmq.event``; the plugin publishes the events of
  *every* vhost into one vhost, "/" by default, with a ``vhost`` header):
  connections, channels, queues and consumers of the test's vhost. Each
  connection is attributed to a stage by its client port (``peer_port``,
  mapped with psutil to a registered stage PID or one of its children),
  channels through their connection, consumers through their channel.
- **firehose** (``amq.rabbitmq.trace`` in the test's vhost): every publish and
  delivery, reduced to ``messages.summarise``; the same thread also consumes
  the engine's output queues (``output`` events), so they never fill up.
- **sampler**: a passive ``queue.declare`` of every scenario queue each
  ``sample_interval``, one ``sample`` event per tick.

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
import psutil

from harness.history import HistoryWriter
from harness.messages import OUTPUT_QUEUES, summarise

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "amq.rabbitmq.event"
TRACE_EXCHANGE = "amq.rabbitmq.trace"
EVENT_KEYS = ("consumer.*", "queue.*", "connection.*", "channel.*")
BROKER_DOWN = "qp-harness.broker_down"  # a marker the nemesis puts among the broker's events
HARNESS = "harness"

# Everything pika raises when a connection or channel goes away.
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError, AssertionError)
# Seconds an observer connection may stay lost (reconnects failing) before the broker counts as gone.
BROKER_GONE_AFTER = 5.0
OUTPUT_PREFETCH = 500  # unacked output messages in flight to the observer


def port_of_name(name: str | None) -> int | None:
    """The client port of a broker connection name '127.0.0.1:PORT -> 127.0.0.1:5672' (channel names too)."""
    if not name or " -> " not in name:
        return None
    try:
        return int(name.split(" -> ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


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
        pass


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


class ObserverError(RuntimeError):
    """The observer could not start (broker unreachable, event exchange plugin missing, ...)."""


class _Worker(threading.Thread):
    """One thread owning one connection: connect, set up, serve until stopped; reconnects when lost."""

    def __init__(self, observer: "Observer", role: str, vhost: str):
        super().__init__(name=f"observer-{role}", daemon=True)
        self.observer = observer
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
        port = _local_port(self.connection)
        if port is not None:
            self.observer._own_ports.add(port)
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

    def run(self) -> None:
        obs = self.observer
        while True:
            try:
                while not obs._stopping.is_set():
                    self.serve_once()
                self.drain()
                break
            except AMQP_ERRORS as exc:
                if obs._stopping.is_set():
                    break
                obs._lost.setdefault(self.role, (time.monotonic(), repr(exc)))
                obs._error(f"{self.role} connection lost: {exc!r}; reconnecting")
                _safe_close(self.connection)
                self.connection = None
                if not self._reconnect():
                    break
            except Exception as exc:  # a bug: report it, keep the other threads going
                obs._error(f"{self.role} thread failed: {exc!r}")
                log.exception("observer %s thread failed", self.role)
                break
        _safe_close(self.connection)

    def _reconnect(self) -> bool:
        delay = 0.2
        while not self.observer._stopping.is_set():
            try:
                self.connect()
                self.observer._lost.pop(self.role, None)
                self.reconnects += 1
                self.observer.history.record("phase", name="observer_reconnected", source=self.role)
                return True
            except (*AMQP_ERRORS, ObserverError) as exc:  # e.g. a restarted node without its event exchange yet
                self.observer._error(f"{self.role} reconnect failed: {exc!r}")
                self.observer._stopping.wait(delay)
                delay = min(delay * 2, 2.0)
        return False


class _EventWorker(_Worker):
    def setup(self) -> None:
        channel = self.connection.channel()
        # Durable, so that it outlives a broker restart with its bindings and holds the events of
        # stages that reconnect before we do; it expires a minute after its last consumer.
        queue = f"{self.observer.connection_name}-events"
        try:
            channel.queue_declare(queue, durable=True, arguments={"x-expires": 60_000})
            for key in EVENT_KEYS:
                channel.queue_bind(queue, EVENT_EXCHANGE, key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise ObserverError(f"cannot bind to {EVENT_EXCHANGE} in vhost {self.vhost!r} "
                                f"(is rabbitmq_event_exchange enabled?): {exc}") from None
        channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.channel, self.queue = channel, queue

    def _on_message(self, channel, method, properties, body) -> None:
        self.observer._inbox.append((time.time(), method.routing_key, properties.headers or {}))

    def serve_once(self) -> None:
        self.connection.process_data_events(time_limit=0.05)
        self.observer._process_events()

    def drain(self) -> None:
        quiet_since = time.monotonic()
        deadline = time.monotonic() + self.observer.drain_timeout
        while time.monotonic() < deadline:
            before = len(self.observer._inbox)
            self.connection.process_data_events(time_limit=0.05)
            if len(self.observer._inbox) != before:
                quiet_since = time.monotonic()
            self.observer._process_events()
            if time.monotonic() - quiet_since > self.observer.drain_quiet and not self.observer._pending:
                break
        self.observer._process_events(flush=True)
        try:
            self.channel.queue_delete(self.queue)
        except AMQP_ERRORS:
            pass  # it expires by itself


class _FirehoseWorker(_Worker):
    def setup(self) -> None:
        obs = self.observer
        if self.reconnects:
            # Tracing is off again after a broker restart (ENGINE_CONTRACT.md section 5).
            try:
                obs.broker.management.set_tracing(self.vhost, True)
            except Exception as exc:
                obs._error(f"could not switch tracing on again: {exc!r}")
        trace = self.connection.channel()
        # Not exclusive, so the sampler can read its backlog; auto-delete, and expiring, so it never outlives us.
        queue = f"{obs.connection_name}-trace"
        obs._own_queues.add(queue)  # before it exists, so its queue.created is never recorded
        trace.queue_declare(queue, auto_delete=True, arguments={"x-expires": 60_000})
        obs._trace_queue = queue
        trace.queue_bind(queue, TRACE_EXCHANGE, "publish.#")
        # Deliveries are traced per queue, leaving out the output queues the observer reads
        # itself: their deliveries would double the firehose for nothing (and it is the
        # firehose's volume that costs the engine throughput on a small machine).
        self.trace_channel, self.bound = trace, set()
        self.bind_deliveries(obs._delivery_queues())
        trace.basic_consume(queue, self._on_trace, auto_ack=True)
        output = self.connection.channel()
        # Acked once recorded: a broker killed mid-run (restart_broker) keeps what the observer had not
        # recorded yet and delivers it again, where the firehose's backlog is lost with the node.
        output.basic_qos(prefetch_count=OUTPUT_PREFETCH)
        for name in obs.output_queues:
            # Exactly as the engine declares them, or the broker refuses one of the two.
            output.queue_declare(name, durable=True)
            output.basic_consume(name, partial(self._on_output, name), auto_ack=False)
        self.last_message = time.monotonic()

    def bind_deliveries(self, queues) -> None:
        for name in queues:
            if name not in self.bound:
                self.trace_channel.queue_bind(self.observer._trace_queue, TRACE_EXCHANGE, f"deliver.{name}")
                self.bound.add(name)

    def _on_trace(self, channel, method, properties, body) -> None:
        self.last_message = time.monotonic()
        try:
            self.observer._on_trace(time.time(), method.routing_key, properties.headers or {}, body)
        except Exception as exc:  # one odd message must not stop the recording
            self.observer._error(f"firehose message {method.routing_key!r} not recorded: {exc!r}")

    def _on_output(self, queue, channel, method, properties, body) -> None:
        self.last_message = time.monotonic()
        try:
            self.observer._on_output(time.time(), queue, properties, body, bool(method.redelivered))
        except Exception as exc:
            self.observer._error(f"output message from {queue!r} not recorded: {exc!r}")
        channel.basic_ack(method.delivery_tag)

    def serve_once(self) -> None:
        if self.observer._new_queues:
            # Queues the broker announced since the last turn (event thread); bound here,
            # since only this thread may touch its channel.
            fresh, self.observer._new_queues = self.observer._new_queues, []
            self.bind_deliveries(fresh)
        self.connection.process_data_events(time_limit=0.1)

    def drain(self) -> None:
        deadline = time.monotonic() + self.observer.drain_timeout
        self.last_message = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - self.last_message < self.observer.drain_quiet:
            self.connection.process_data_events(time_limit=0.05)


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
        ready: dict[str, int | None] = {}
        for queue in list(obs._queues):
            ready[queue] = self._sample(queue, now)
        # Messages the firehose has not yet handed to the observer: while > 0, firehose times run late.
        backlog = self._ready(obs._trace_queue) if obs._trace_queue else None
        obs._on_sample(t, ready, backlog)

    def _sample(self, queue: str, now: float) -> int | None:
        # A passive declare of a missing queue costs the channel; while no queue.created event
        # names it, probe a missing queue only every missing_reprobe seconds.
        gone = self.missing.get(queue)
        generation = self.observer._queue_generation.get(queue, 0)
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

    Thread-safe read side for the runner: ``consumers_of``, ``ready``,
    ``result_count``, ``wait_for`` and friends.
    """

    def __init__(self, broker, vhost_name: str, history: HistoryWriter, queues: list[str],
                 sample_interval: float = 0.1, *, output_queues: tuple[str, ...] | list[str] = OUTPUT_QUEUES,
                 event_vhost: str = "/", attribution_timeout: float = 1.0,
                 drain_timeout: float = 5.0, drain_quiet: float = 0.3):
        self.broker = broker
        self.vhost = vhost_name
        self.history = history
        self.sample_interval = sample_interval
        self.output_queues = tuple(output_queues)
        self.event_vhost = event_vhost
        self.attribution_timeout = attribution_timeout
        self.drain_timeout = drain_timeout
        self.drain_quiet = drain_quiet
        self.connection_name = f"qp-harness-observer-{secrets.token_hex(4)}"
        self.errors: list[str] = []

        self._queues: list[str] = list(dict.fromkeys(queues))
        self._new_queues: list[str] = []  # announced by the event thread, bound by the firehose thread
        self._stage_pids: dict[str, int] = {}
        self._own_ports: set[int] = set()
        self._own_queues: set[str] = set()
        self._own_pid = os.getpid()
        self._broker_port = broker.amqp_port

        # Event-thread state (written by that thread only; read under _cond).
        self._inbox: list[tuple[float, str, dict]] = []  # list.append / slicing: atomic under the GIL
        self._pending: list[tuple[float, str, dict]] = []
        self._conns: dict[str, dict[str, Any]] = {}  # conn pid -> {name, port, stage, own}
        self._chans: dict[str, dict[str, Any]] = {}  # chan pid -> {conn, stage, own}
        self._consumers: dict[tuple[str, str], dict[str, Any]] = {}  # (chan, tag) -> info

        # Port -> (stage, expiry) cache shared by the event and firehose threads.
        self._port_cache: dict[int, tuple[str | None, float]] = {}
        self._port_lock = threading.Lock()
        self._queue_generation: dict[str, int] = {}  # queue -> queue.created events seen (sampler reads it)
        self.missing_reprobe = 1.0
        self._trace_queue: str | None = None
        self.firehose_backlog: int | None = None  # last sampled
        self._summaries: dict[tuple[bytes, str | None], dict[str, Any]] = {}  # firehose thread only

        self._cond = threading.Condition()
        self._ready: dict[str, int | None] = {}
        self._samples = 0
        self._outputs: Counter[str] = Counter()
        self._output_types: Counter[str] = Counter()
        self._results: set[tuple[Any, Any]] = set()
        self._first_delivery: dict[tuple[str, Any, Any], float] = {}  # (queue, scan, object) -> t (firehose thread)
        self.counts: Counter[str] = Counter()  # history events recorded, by type

        # role -> (monotonic time the connection was lost, the error); cleared on reconnect.
        self._lost: dict[str, tuple[float, str]] = {}
        self._broker_gone: str | None = None
        self._next_group_check = 0.0

        self._stopping = threading.Event()
        self._workers: list[_Worker] = []
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ set-up
    def register_stage(self, stage_name: str, pid: int) -> None:
        """A stage instance was spawned as ``pid``; its connections (and its children's) are its own."""
        with self._port_lock:
            self._stage_pids[stage_name] = pid
            # Forget failed look-ups: they may belong to this new process.
            self._port_cache = {p: v for p, v in self._port_cache.items() if v[0] is not None}

    def add_queue(self, queue: str) -> None:
        """Sample ``queue`` too from the next tick on."""
        if queue not in self._queues:
            self._queues = self._queues + [queue]
            self._new_queues = self._new_queues + [queue]

    def _delivery_queues(self) -> list[str]:
        """Queues whose deliveries are traced: the scenario's and every other queue of the vhost,
        but not the output queues the observer reads itself."""
        names = list(self._queues)
        try:
            names += [q["name"] for q in self.broker.management.queues(self.vhost)]
        except Exception as exc:  # the scenario's queues are the ones that matter most
            self._error(f"could not list the vhost's queues: {exc!r}")
        return [n for n in dict.fromkeys(names) if n not in self.output_queues and n not in self._own_queues]

    def start(self) -> None:
        """Connect and subscribe; returns once every subscription is in place."""
        if self._started:
            return
        self._started = True
        events = _EventWorker(self, "events", self.event_vhost)
        firehose = _FirehoseWorker(self, "firehose", self.vhost)
        sampler = _SampleWorker(self, "sampler", self.vhost)
        try:
            # The event queue is bound first, so it sees the other two connect; its
            # thread starts only once their ports are known, so they are filtered.
            for worker in (events, firehose, sampler):
                worker.connect()
                self._workers.append(worker)
        except ObserverError:
            self._close_unstarted()
            raise
        except AMQP_ERRORS as exc:
            self._close_unstarted()
            raise ObserverError(f"observer cannot connect to the broker at {self.broker.host}:"
                                f"{self.broker.amqp_port} (vhost {self.vhost!r}): {exc!r}") from None
        for worker in self._workers:
            worker.start()

    def _close_unstarted(self) -> None:
        for worker in self._workers:
            _safe_close(worker.connection)
        self._workers = []
        self._stopped = True

    def stop(self, timeout: float = 15.0) -> None:
        """Drain what is in flight, close every connection. Idempotent; never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                worker.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
            if worker.is_alive():
                self._error(f"{worker.role} thread did not stop within {timeout:g} s")
        try:
            self.history.flush()
        except Exception:
            pass

    def __enter__(self) -> "Observer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _error(self, text: str) -> None:
        log.warning("observer: %s", text)
        self.errors.append(text)

    # ------------------------------------------------------------------ read side
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
        lost = dict(self._lost)
        if lost:
            role, (since, error) = min(lost.items(), key=lambda item: item[1][0])
            if now - since >= lost_for:
                self._broker_gone = (f"broker gone: the observer's {role} connection to {self.broker.host}:"
                                     f"{self.broker.amqp_port} was lost {now - since:.0f} s ago and every "
                                     f"reconnect since failed ({error}); the run was ended")
                return self._broker_gone
        return None

    def consumers_of(self, stage: str) -> set[str]:
        """Queues ``stage`` currently holds consumers on."""
        with self._cond:
            return {c["queue"] for c in self._consumers.values() if c["stage"] == stage}

    def consumers(self) -> list[dict[str, Any]]:
        """Every live consumer of the vhost (not the observer's): stage, queue, tag, chan, prefetch."""
        with self._cond:
            return [dict(c) for c in self._consumers.values()]

    def consuming_stages(self) -> dict[str, set[str]]:
        """stage -> queues, for every stage holding at least one consumer (unattributed ones under None)."""
        result: dict[str, set[str]] = {}
        with self._cond:
            for c in self._consumers.values():
                result.setdefault(c["stage"], set()).add(c["queue"])
        return result

    def connections_of(self, stage: str) -> list[str]:
        """Broker names of ``stage``'s open connections (for the management API's close)."""
        with self._cond:
            return [c["name"] for c in self._conns.values() if c["stage"] == stage and c.get("open")]

    def ready(self, queue: str) -> int | None:
        """Last sampled ready count of ``queue``; None if missing or not sampled yet."""
        with self._cond:
            return self._ready.get(queue)

    def ready_counts(self) -> dict[str, int | None]:
        with self._cond:
            return dict(self._ready)

    @property
    def samples(self) -> int:
        return self._samples

    def output_count(self, queue: str | None = None) -> int:
        """Messages the observer read from the output queues (all, or one queue)."""
        with self._cond:
            return sum(self._outputs.values()) if queue is None else self._outputs[queue]

    def output_types(self) -> dict[str, int]:
        with self._cond:
            return dict(self._output_types)

    def result_count(self) -> int:
        """Distinct (scan, object) pairs with a result: MatchesMessage or object ProblemMessage, outside os2ds_checkups."""
        with self._cond:
            return len(self._results)

    def delivered_before(self, queue: str, t: float) -> set[tuple[Any, Any]]:
        """The (scan, object) pairs whose conversion was delivered from ``queue`` before time ``t``."""
        with self._cond:
            firsts = list(self._first_delivery.items())
        return {(scan, obj) for (q, scan, obj), first in firsts if q == queue and first < t}

    def answered(self) -> set[tuple[Any, Any]]:
        """The (scan, object) pairs counted by ``result_count``."""
        with self._cond:
            return set(self._results)

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every state change); returns its last value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0:
                    return value
                self._cond.wait(min(remaining, 0.1))

    def wait_for_consumers(self, stage: str, queues: set[str] | list[str] | None = None,
                           timeout: float = 30.0) -> set[str]:
        """Wait until ``stage`` consumes ``queues`` (or anything, when None); returns what it consumes."""
        wanted = set(queues) if queues is not None else None

        def done() -> bool:
            held = self.consumers_of(stage)
            return held >= wanted if wanted is not None else bool(held)

        self.wait_for(done, timeout)
        return self.consumers_of(stage)

    def wait_for_ready(self, queue: str, count: int, timeout: float) -> int | None:
        self.wait_for(lambda: self.ready(queue) == count, timeout)
        return self.ready(queue)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ attribution
    def _scan_ports(self) -> dict[int, str]:
        """Client ports (to the broker) of every registered stage process and its children, and of this process."""
        found: dict[int, str] = {}
        with self._port_lock:
            stages = list(self._stage_pids.items())
        owners: list[tuple[str, int, bool]] = [(s, p, True) for s, p in stages] + [(HARNESS, self._own_pid, False)]
        for stage, pid, with_children in owners:
            try:
                root = psutil.Process(pid)
                procs = [root] + (root.children(recursive=True) if with_children else [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for proc in procs:
                try:
                    conns = proc.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                for c in conns:
                    if c.laddr and c.raddr and c.raddr.port == self._broker_port:
                        found.setdefault(c.laddr.port, stage)
        return found

    def _stage_for_port(self, port: int | None, negative_ttl: float = 0.2) -> str | None:
        """Stage owning client port ``port``: HARNESS for this process, None when unknown."""
        if port is None:
            return None
        now = time.monotonic()
        hit = self._port_cache.get(port)
        if hit is not None and (hit[0] is not None or hit[1] > now):
            return hit[0]
        found = self._scan_ports()
        with self._port_lock:
            for p, stage in found.items():
                if p not in self._own_ports:
                    self._port_cache[p] = (stage, float("inf"))
            if port not in found:
                self._port_cache[port] = (None, now + negative_ttl)
        return found.get(port)

    def _forget_port(self, port: int | None) -> None:
        if port is not None:
            with self._port_lock:
                self._port_cache.pop(port, None)

    # ------------------------------------------------------------------ event exchange (event thread)
    def _process_events(self, flush: bool = False) -> None:
        """Move the inbox into the pending list and record every event whose owner is known (or timed out)."""
        if self._inbox:
            batch, self._inbox[:] = self._inbox[:], []
            self._pending.extend(e for e in batch if self._concerns_us(e))
        if not self._pending:
            return
        progress = True
        changed = False
        while progress and self._pending:
            progress = False
            still: list[tuple[float, str, dict]] = []
            for event in self._pending:
                expired = flush or time.time() - event[0] > self.attribution_timeout
                try:
                    handled = self._handle_event(*event, expired=expired, blocked=still)
                except Exception as exc:  # one odd event must not stop the recording
                    self._error(f"event {event[1]!r} not recorded: {exc!r}")
                    handled = True
                if handled:
                    progress = changed = True
                else:
                    still.append(event)
            self._pending = still
        if changed:
            self._notify()

    def note_broker_down(self) -> None:
        """The broker is about to be killed (a restart_broker fault). A dead node announces no
        closes, so the event thread records them: every stage connection ends now."""
        self._inbox.append((time.time(), BROKER_DOWN, {}))

    def _concerns_us(self, event: tuple[float, str, dict]) -> bool:
        _, key, headers = event
        if key == BROKER_DOWN:
            return True
        vhost = headers.get("vhost")
        if vhost is not None:
            return vhost == self.vhost
        # connection.closed and channel.closed carry no vhost: keep them when we know the pid,
        # or when its creation event is still waiting for attribution.
        pid = headers.get("pid")
        if key == "connection.closed":
            return pid in self._conns or any(h.get("pid") == pid for _, k, h in self._pending if k == "connection.created")
        if key == "channel.closed":
            return pid in self._chans or any(h.get("pid") == pid for _, k, h in self._pending if k == "channel.created")
        return False

    def _record(self, type_: str, t: float, **fields: Any) -> None:
        self.history.record(type_, t=t, **fields)
        self.counts[type_] += 1

    def _handle_event(self, t: float, key: str, h: dict, expired: bool, blocked: list) -> bool:
        """Record one event; False = not yet attributable (try again later)."""
        broker_ms = h.get("timestamp_in_ms")
        if key == BROKER_DOWN:
            self._close_everything(t)
            return True
        if key == "connection.created":
            pid, name = h.get("pid"), h.get("name")
            port = h.get("peer_port")
            port = int(port) if port not in (None, "") else port_of_name(name)
            provided = h.get("user_provided_name") or ""
            own = port in self._own_ports or str(provided).startswith(self.connection_name)
            if own:
                self._own_ports.add(port)
                self._conns[pid] = {"name": name, "port": port, "stage": None, "own": True, "open": True}
                return True
            stage = self._stage_for_port(port)
            if stage is None and not expired:
                return False
            with self._cond:
                self._conns[pid] = {"name": name, "port": port, "stage": stage, "own": False, "open": True}
            self._record("connection_created", t, conn=pid, name=name, peer_port=port, stage=stage,
                         broker_ms=broker_ms)
            return True
        if key == "connection.closed":
            conn = self._conns.get(h.get("pid"))
            if conn is None:
                return expired  # its creation is still pending; give up once expired
            if _waits_on(blocked, "connection.created", h.get("pid")):
                return False
            if conn["own"] or not conn["open"]:  # ours, or already closed by a broker-down marker
                return True
            with self._cond:
                conn["open"] = False
            self._forget_port(conn["port"])
            self._record("connection_closed", t, conn=h.get("pid"), name=h.get("name"), stage=conn["stage"],
                         broker_ms=broker_ms, cause=None)
            return True
        if key == "channel.created":
            pid, conn_pid = h.get("pid"), h.get("connection")
            conn = self._conns.get(conn_pid)
            if conn is None:
                if _waits_on(blocked, "connection.created", conn_pid) and not expired:
                    return False
                # A connection from before the observer subscribed: attribute by the port in the channel's name.
                port = port_of_name(h.get("name"))
                if port in self._own_ports:
                    conn = {"own": True, "stage": None}
                else:
                    stage = self._stage_for_port(port)
                    if stage is None and not expired:
                        return False
                    conn = {"own": False, "stage": stage}
            self._chans[pid] = {"conn": conn_pid, "stage": conn["stage"], "own": conn["own"]}
            if conn["own"]:
                return True
            self._record("channel_created", t, chan=pid, conn=conn_pid, stage=conn["stage"], number=h.get("number"),
                         broker_ms=broker_ms)
            return True
        if key == "channel.closed":
            chan = self._chans.get(h.get("pid"))
            if chan is None:
                return expired
            if _waits_on(blocked, "channel.created", h.get("pid")):
                return False
            if not chan["own"]:
                self._record("channel_closed", t, chan=h.get("pid"), stage=chan["stage"], broker_ms=broker_ms)
            return True
        if key in ("consumer.created", "consumer.deleted"):
            chan_pid, tag, queue = h.get("channel"), h.get("consumer_tag"), h.get("queue")
            chan = self._chans.get(chan_pid)
            if chan is None and not expired:
                return False
            if chan is not None and chan["own"]:
                return True
            if _waits_on(blocked, "consumer.created", chan_pid, field="channel", tag=tag):
                return False
            stage = chan["stage"] if chan else None
            if key == "consumer.created":
                with self._cond:
                    self._consumers[(chan_pid, tag)] = {"stage": stage, "queue": queue, "tag": tag, "chan": chan_pid,
                                                        "prefetch": _int(h.get("prefetch_count"))}
                self._record("consumer_created", t, stage=stage, queue=queue, tag=tag, chan=chan_pid,
                             prefetch=_int(h.get("prefetch_count")), ack_required=_as_bool(h.get("ack_required")),
                             broker_ms=broker_ms)
            else:
                with self._cond:
                    self._consumers.pop((chan_pid, tag), None)
                self._record("consumer_deleted", t, stage=stage, queue=queue, tag=tag, chan=chan_pid,
                             broker_ms=broker_ms)
            return True
        if key == "queue.created":
            name = h.get("name")
            self._queue_generation[name] = self._queue_generation.get(name, 0) + 1
            if name in self._own_queues or _is_own_exclusive(h, self._conns):
                return True
            if name not in self.output_queues:
                self._new_queues = self._new_queues + [name]  # its deliveries get traced too
            self._record("queue_created", t, queue=name, durable=_as_bool(h.get("durable")),
                         auto_delete=_as_bool(h.get("auto_delete")), arguments=h.get("arguments") or [],
                         exclusive=_as_bool(h.get("exclusive")), broker_ms=broker_ms)
            return True
        if key == "queue.deleted":
            if h.get("name") not in self._own_queues:
                self._record("queue_deleted", t, queue=h.get("name"), broker_ms=broker_ms)
            return True
        return True  # an event kind we do not record

    def _close_everything(self, t: float) -> None:
        """Record the end of every open stage connection (their channels and consumers go with them)."""
        with self._cond:
            closing = [(pid, conn) for pid, conn in self._conns.items() if conn["open"] and not conn["own"]]
            for _, conn in closing:
                conn["open"] = False
            self._consumers.clear()
        for pid, conn in closing:
            self._forget_port(conn["port"])
            self._record("connection_closed", t, conn=pid, name=conn["name"], stage=conn["stage"],
                         broker_ms=None, cause="broker_down")

    # ------------------------------------------------------------------ firehose (firehose thread)
    def _on_trace(self, t: float, key: str, h: dict, body: bytes) -> None:
        port = port_of_name(h.get("connection"))
        if port in self._own_ports:
            return
        stage = self._stage_for_port(port)
        msg = self._summary(body, (h.get("properties") or {}).get("content_encoding"))
        if key.startswith("deliver."):
            queue = key[len("deliver."):]
            self._record("deliver", t, queue=queue, stage=stage,
                         redelivered=_as_bool(h.get("redelivered")), msg=msg, conn=h.get("connection"))
            if msg.get("type") == "ConversionMessage":
                with self._cond:  # read by the runner's thread (delivered_before)
                    self._first_delivery.setdefault((queue, msg.get("scan"), msg.get("object")), t)
        elif key.startswith("publish."):
            keys = h.get("routing_keys") or [""]
            self._record("publish", t, exchange=h.get("exchange_name", key[len("publish."):]),
                         routing_key=keys[0], routed=list(h.get("routed_queues") or []), stage=stage, msg=msg,
                         conn=h.get("connection"))

    def _summary(self, body: bytes, encoding: str | None) -> dict[str, Any]:
        # A message is traced at least twice (publish, deliver) with the same body: decode it once.
        key = (body, encoding)
        cached = self._summaries.get(key)
        if cached is None:
            cached = summarise(body, encoding)
            if len(self._summaries) >= 20000:
                self._summaries.clear()
            self._summaries[key] = cached
        return dict(cached)

    def _on_output(self, t: float, queue: str, properties, body: bytes, redelivered: bool = False) -> None:
        msg = self._summary(body, properties.content_encoding)
        self._record("output", t, queue=queue, msg=msg, redelivered=redelivered)
        with self._cond:
            self._outputs[queue] += 1
            self._output_types[msg.get("type")] += 1
            if queue != "os2ds_checkups" and (msg.get("type") == "MatchesMessage"
                                              or (msg.get("type") == "ProblemMessage" and msg.get("object"))):
                self._results.add((msg.get("scan"), msg.get("object")))
            self._cond.notify_all()

    # ------------------------------------------------------------------ samples (sampler thread)
    def _on_sample(self, t: float, ready: dict[str, int | None], backlog: int | None = None) -> None:
        self._record("sample", t, ready=ready, firehose_backlog=backlog)
        with self._cond:
            self.firehose_backlog = backlog
            self._ready.update(ready)
            self._samples += 1
            self._cond.notify_all()


def _int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _waits_on(blocked: list, key: str, pid: Any, field: str = "pid", tag: Any = None) -> bool:
    """Whether an earlier event still pending in this pass is the creation this one depends on."""
    for _, k, h in blocked:
        if k == key and h.get(field) == pid and (tag is None or h.get("consumer_tag") == tag):
            return True
    return False


def _is_own_exclusive(headers: dict, conns: dict[str, dict[str, Any]]) -> bool:
    owner = conns.get(headers.get("owner_pid"))
    return bool(owner and owner.get("own"))
