"""The admin and its status collector, as OS2datascanner 3.32 runs them on the broker.

Per-scan queues (ENGINE_CONTRACT.md section 7): the admin declares a scan's queue before its spec
is sent and broadcasts ``new_queue``; it re-announces every live queue every R seconds; it answers
each ``worker_hello`` with one ``new_queue`` per live queue, sent to the worker's command queue; and
when every object of a scan is answered, or the scan is aborted, it broadcasts ``delete_queue`` and
deletes the queue. Every action is a history event (``ps_announce``, ``hello``, ``ps_delete``).

One thread owns the admin's connection and all its state; the runner, the phase driver and the
nemesis only enqueue requests (``open_scans`` and the fault helpers wait for theirs to be done).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import pika
import pika.exceptions

from harness.history import HistoryWriter
from harness.messages import BROADCAST_EXCHANGE, PER_SCAN_PREFIX, command, decode_body, encode_body

log = logging.getLogger(__name__)

# The admin's command properties (ENGINE_CONTRACT.md section 7: new_queue, delete_queue, abort).
COMMAND_PROPERTIES = pika.BasicProperties(delivery_mode=2, content_encoding="gzip", priority=10)
CHECK_EVERY = 0.25  # seconds between looks at the ledger for finished or aborted scans
REQUEST_TIMEOUT = 15.0  # seconds a caller waits for the admin's thread to carry out a request
RECONNECT_PAUSE = 0.5
TRACE_WAIT = 5.0  # seconds the admin waits for the observer to trace a per-scan queue's deliveries
# Scanner pks of the queues the harness announces on its own (short_scan, a stale reply's queue):
# far above the workload's (100 * client + 1 or 2), so their names never collide with a scan's.
FAULT_PK_BASE = 900_000


ADMIN_FAULTS = ("delete_scan_queue", "stale_hello_reply", "short_scan")


def needed(scenario) -> bool:
    """The run needs the admin: a phase is routed per scan, or a fault acts as the admin."""
    return (any(scenario.per_scan_tag(phase) is not None for phase in scenario.workload)
            or any(fault.kind in ADMIN_FAULTS for fault in scenario.faults))


class AdminError(RuntimeError):
    """A request the admin could not carry out (no such queue, the broker refused)."""


@dataclass
class LiveQueue:
    name: str
    tag: str
    phase: int | None  # the workload phase whose scans it carries (None: a fault's own queue)
    scans: list[str] = field(default_factory=list)


def command_body(**fields: Any) -> bytes:
    """A seven-key CommandMessage, gzipped as the admin sends it."""
    return encode_body(command(**fields))


def hello_queue(body: bytes, properties: Any) -> str | None:
    """The command queue a ``worker_hello`` names, or None for any other broadcast message."""
    try:
        obj = decode_body(body, getattr(properties, "content_encoding", None))
    except ValueError:
        return None
    name = obj.get("worker_hello") if isinstance(obj, dict) else None
    return name if isinstance(name, str) and name else None


class Admin:
    """Plays OS2datascanner's admin for one run: ``start``, ``stop``, ``open_scans`` before a spec is
    sent, ``phase_done`` when a phase has published everything; faults through ``delete_phase_queue``,
    ``reply_stale`` and ``short_scan``. ``scan_state(scans)`` is the live ledger's."""

    def __init__(self, parameters: pika.ConnectionParameters, history: HistoryWriter,
                 scan_state: Callable[[list[str], str], str], observer, rebroadcast_seconds: float,
                 say: Callable[[str], None] = lambda text: None, phase_names: list[str | None] = ()):
        self.parameters = parameters
        self.phase_names = list(phase_names)  # the scenario's workload names, for faults that name a phase
        self.history = history
        self.scan_state = scan_state
        self.observer = observer  # add_queue, ready, consumers
        self.rebroadcast_seconds = rebroadcast_seconds
        self.say = say
        self.errors: list[str] = []
        self._requests: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="admin")
        self._ready = threading.Event()
        # Shared with other threads, under _shared_lock: the queues deleted (the phase driver stops a hold
        # on one) and the live scan queues' tags (the runner's consuming_tag triggers).
        self._shared_lock = threading.Lock()
        self._gone: set[str] = set()
        self._live_tags: dict[str, str] = {}
        # Admin-thread state only.
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._live: dict[str, LiveQueue] = {}
        self._deleted: list[LiveQueue] = []
        self._done_phases: set[int] = set()
        self._stale: LiveQueue | None = None
        self._fault_queues = 0
        self._next_rebroadcast = 0.0
        self._next_check = 0.0

    # -- the public side (any thread) ------------------------------------------------
    def start(self, timeout: float = REQUEST_TIMEOUT) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AdminError(f"the admin could not connect within {timeout:g} s: {'; '.join(self.errors)}")

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def open_scans(self, scans: list) -> None:
        """Declare and announce the per-scan queues of these planned scans (workload.PlannedScan)."""
        if scans:
            self._call(self._open_scans, scans)

    def was_deleted(self, queue_name: str) -> bool:
        with self._shared_lock:
            return queue_name in self._gone

    def live_queues(self, tag: str) -> set[str]:
        """The live per-scan queues of the scenario's scans announced with ``tag``."""
        with self._shared_lock:
            return {name for name, queue_tag in self._live_tags.items() if queue_tag == tag}

    def phase_done(self, index: int) -> None:
        """Phase ``index`` publishes no more: its queues may go once their scans are answered."""
        self._call(self._done_phases.add, index, wait=False)

    def delete_phase_queue(self, phase: str) -> str:
        """Delete the first live per-scan queue of the phase named ``phase`` as the admin does (a fault)."""
        if phase not in self.phase_names:
            raise AdminError(f"no workload phase is named {phase!r}")
        return self._call(self._delete_phase_queue, self.phase_names.index(phase))

    def reply_stale(self) -> str:
        """From now on, every hello reply starts with a queue that no longer exists (a fault)."""
        return self._call(self._start_stale_replies)

    def short_scan(self, tag: str) -> str:
        """Announce a new queue and delete it at once (a fault)."""
        return self._call(self._short_scan, tag)

    # -- requests --------------------------------------------------------------------
    def _call(self, work: Callable, *args: Any, wait: bool = True) -> Any:
        if not self._thread.is_alive():
            raise AdminError("the admin is not running")
        outcome: dict[str, Any] = {}
        done = threading.Event()
        self._requests.put((work, args, outcome, done))
        self._wake()
        if not wait:
            return None
        if not done.wait(REQUEST_TIMEOUT):
            raise AdminError(f"the admin did not carry out {work.__name__} within {REQUEST_TIMEOUT:g} s")
        if "error" in outcome:
            raise AdminError(outcome["error"])
        return outcome.get("value")

    def _wake(self) -> None:
        connection = self._connection
        if connection is not None:
            try:
                connection.add_callback_threadsafe(lambda: None)
            except (pika.exceptions.AMQPError, RuntimeError):
                pass  # closed or reconnecting: the loop's next turn takes the request

    def _serve_requests(self) -> None:
        while True:
            try:
                work, args, outcome, done = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                outcome["value"] = work(*args)
            except (AdminError, KeyError) as exc:
                outcome["error"] = str(exc)
            except pika.exceptions.AMQPError as exc:
                outcome["error"] = f"{work.__name__}: the broker refused or did not answer: {exc!r}"
                raise
            finally:
                done.set()

    # -- the admin's thread ----------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._connect()
                self._ready.set()
                while not self._stopping.is_set():
                    self._connection.process_data_events(time_limit=0.05)
                    self._serve_requests()
                    self._tick(time.monotonic())
            except (pika.exceptions.AMQPError, OSError) as exc:
                if not self._stopping.is_set():
                    self.errors.append(f"admin connection lost: {exc!r}")
                    time.sleep(RECONNECT_PAUSE)
            finally:
                self._close()

    def _connect(self) -> None:
        self._connection = pika.BlockingConnection(self.parameters)
        channel = self._connection.channel()
        channel.exchange_declare(BROADCAST_EXCHANGE, "fanout", durable=True)
        # The status collector's own command queue: server-named, as every stage's.
        name = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(name, BROADCAST_EXCHANGE, "")
        channel.basic_consume(name, self._on_broadcast, auto_ack=True)
        channel.confirm_delivery()
        self._channel = channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass  # the broker went first: nothing left to close

    def _tick(self, now: float) -> None:
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._delete_finished()
        if now >= self._next_rebroadcast:
            if self._next_rebroadcast and self._live:
                for live in list(self._live.values()):
                    self._announce(live, "rebroadcast")
            self._next_rebroadcast = now + self.rebroadcast_seconds

    # -- announcing ------------------------------------------------------------------
    def _open_scans(self, scans: list) -> None:
        for scan in scans:
            live = self._live.get(scan.conversion_queue)
            if live is None:
                live = LiveQueue(scan.conversion_queue, scan.per_scan, scan.phase)
                self._declare(live.name)
                self._live[live.name] = live
                with self._shared_lock:
                    self._live_tags[live.name] = live.tag
                live.scans.append(scan.scan)
                self._announce(live, "scan_start")
            elif scan.scan not in live.scans:
                live.scans.append(scan.scan)

    def _declare(self, name: str) -> None:
        # Traced before it exists: a worker may consume it the moment it is announced.
        if not self.observer.add_queue(name, wait=TRACE_WAIT):
            log.warning("deliveries from %s not traced yet after %g s; declaring it anyway", name, TRACE_WAIT)
        # Exactly as the admin declares it: durable, not exclusive, not auto-delete, no arguments.
        self._channel.queue_declare(name, durable=True, exclusive=False, auto_delete=False)

    def _announce(self, live: LiveQueue, reason: str, to: str = BROADCAST_EXCHANGE) -> None:
        self.history.record("ps_announce", queue=live.name, tag=live.tag, scan=live.scans[0] if live.scans else None,
                            reason=reason, to=to)
        body = command_body(new_queue=live.name, new_queue_priority=live.tag)
        if to == BROADCAST_EXCHANGE:
            self._channel.basic_publish(BROADCAST_EXCHANGE, "", body, COMMAND_PROPERTIES)
        else:
            self._channel.basic_publish("", to, body, COMMAND_PROPERTIES)

    # -- hellos ----------------------------------------------------------------------
    def _on_broadcast(self, channel, method, properties, body: bytes) -> None:
        command_queue = hello_queue(body, properties)
        if command_queue is None:
            return  # our own commands, other admins' and malformed messages (bad_command) alike
        replies = ([self._stale] if self._stale is not None else []) + list(self._live.values())
        owner = next((c.get("stage") for c in self.observer.consumers() if c.get("queue") == command_queue), None)
        self.history.record("hello", command_queue=command_queue, stage=owner, answered=[q.name for q in replies])
        for live in replies:
            self._announce(live, "fault" if live is self._stale else "hello_reply", to=command_queue)

    # -- deleting --------------------------------------------------------------------
    def _delete_finished(self) -> None:
        # The results are read straight from the output queues, the conversions' publishes through the
        # firehose, which may lag under load: a scan is finished for the admin once the tracer has also
        # seen every conversion published into its queue, or a deletion would make those look unroutable.
        for live in list(self._live.values()):
            if live.phase is None or not live.scans:
                continue
            state = self.scan_state(live.scans, live.name)
            if state == "aborted":
                self._delete(live, "abort")
            elif state == "answered" and live.phase in self._done_phases:
                self._delete(live, "scan_end")

    def _delete(self, live: LiveQueue, reason: str) -> None:
        self._live.pop(live.name, None)
        self._channel.basic_publish(BROADCAST_EXCHANGE, "", command_body(delete_queue=live.name), COMMAND_PROPERTIES)
        self.history.record("ps_delete", queue=live.name, scan=live.scans[0] if live.scans else None, reason=reason,
                            ready=self.observer.ready(live.name))
        self._channel.queue_delete(live.name)
        self._deleted.append(live)
        with self._shared_lock:
            self._gone.add(live.name)
            self._live_tags.pop(live.name, None)

    def _delete_phase_queue(self, index: int) -> str:
        live = next((q for q in self._live.values() if q.phase == index), None)
        if live is None:
            raise AdminError(f"workload.{index} has no live per-scan queue (its scans have not started, "
                             f"or are over)")
        self._delete(live, "fault")
        return live.name

    # -- the admin's own queues (faults) -----------------------------------------------
    def _fault_queue(self, tag: str) -> LiveQueue:
        self._fault_queues += 1
        stamp = datetime.now().astimezone().strftime("%Y%m%dT%H%M%S")
        return LiveQueue(f"{PER_SCAN_PREFIX}{FAULT_PK_BASE + self._fault_queues}_{stamp}", tag, None)

    def _short_scan(self, tag: str) -> str:
        live = self._fault_queue(tag)
        self._declare(live.name)
        self._live[live.name] = live
        self._announce(live, "fault")
        self._delete(live, "fault")
        return live.name

    def _start_stale_replies(self) -> str:
        if self._deleted:
            self._stale = self._deleted[-1]
        else:  # nothing deleted yet: make a queue that existed, and delete it
            self._stale = self._fault_queue("full")
            self._declare(self._stale.name)
            self._channel.queue_delete(self._stale.name)
        return self._stale.name
