"""The flood: publish workload messages the way OS2datascanner's admin does, with confirms.

Every data message goes to the default exchange with routing key = queue,
body = gzip of the JSON text, and properties exactly ``delivery_mode=2,
content_encoding="gzip"`` (ENGINE_CONTRACT.md section 3). Publisher confirms
are pipelined: up to ``window`` messages are in flight, and ``publish``
returns only when every message it sent is confirmed by the broker (so a
returned count means "the broker has these"). Messages are published with
``mandatory=True``: a message the default exchange cannot route (no such
queue) comes back, is counted in ``stats.returned`` and makes ``publish``
raise ``FloodError`` unless ``allow_unroutable=True``.

Rates: ``rate=None`` publishes as fast as the broker confirms; a rate in
messages per second schedules message ``i`` at ``t0 + i / rate`` (absolute
deadlines, so there is no drift however long the flood runs).

The connection is a pika ``SelectConnection`` whose I/O loop runs in the
caller's thread only while a call is in progress; heartbeats are off so an
idle flood connection is not reset by the broker between phases. ``cancel()``
may be called from another thread (time limit, Ctrl-C handler) and makes a
running ``publish`` return early with what was confirmed so far.

The observer's firehose records every publish; the flood itself only returns
counts (``publish`` returns the number confirmed; ``stats`` has the rest)
and, when given a history, records ``phase`` markers ``flood_started`` /
``flood_done``.
"""
from __future__ import annotations

import collections
import copy
import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pika
from pika.spec import Basic

from harness.history import HistoryWriter
from harness.messages import encode_body

DATA_PROPERTIES = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")


class FloodError(RuntimeError):
    """The broker refused, lost or could not route messages, or the connection failed."""


@dataclass
class FloodProgress:
    """A snapshot of a running (or finished) publish call."""

    queue: str  # the queue, or "<several>" for publish_many over several queues
    sent: int
    confirmed: int
    total: int | None  # None when the bodies came from an iterator of unknown length
    elapsed: float
    done: bool = False

    @property
    def rate(self) -> float:
        return self.confirmed / self.elapsed if self.elapsed > 0 else 0.0


def progress_line(p: FloodProgress) -> str:
    """One human line, e.g. ``flood conversions_full: 4200/10000 confirmed (42%), 2100 msg/s, 2.0 s``."""
    if p.total:
        count = f"{p.confirmed}/{p.total} confirmed ({100 * p.confirmed // p.total}%)"
    else:
        count = f"{p.confirmed} confirmed"
    state = "done" if p.done else f"{p.sent - p.confirmed} in flight"
    return f"flood {p.queue}: {count}, {p.rate:.0f} msg/s, {p.elapsed:.1f} s, {state}"


@dataclass
class FloodStats:
    """Counts of the last publish call (and totals over the flood's life in ``Flood.totals``)."""

    sent: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    seconds: float = 0.0
    per_queue: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.confirmed / self.seconds if self.seconds > 0 else 0.0


def poison_body(shape: str) -> tuple[bytes, pika.BasicProperties]:
    """A poison message for the FT-POISON fault: ``not_json`` or ``missing_fields``."""
    if shape == "not_json":
        return b"\x00this is not JSON {", pika.BasicProperties(delivery_mode=2)
    if shape == "missing_fields":
        # A gzip JSON object with a scan tag but none of the fields a stage needs.
        body = gzip.compress(json.dumps({"scan_tag": {"time": "2026-01-01T00:00:00+00:00"}}).encode())
        return body, copy.copy(DATA_PROPERTIES)
    raise ValueError(f"unknown poison shape {shape!r}; known: not_json, missing_fields")


class Flood:
    """Publishes to one vhost with pipelined confirms. Not thread-safe except ``cancel()``."""

    def __init__(self, parameters: pika.ConnectionParameters, history: HistoryWriter | None = None,
                 progress: Callable[[FloodProgress], None] | None = None, *, window: int = 1000,
                 progress_every: float = 2.0, connect_timeout: float = 30.0):
        self.parameters = copy.copy(parameters)
        self.parameters.heartbeat = 0  # never serviced between calls: no heartbeats to miss
        self.history = history
        self.progress = progress
        self.window = max(1, window)
        self.progress_every = progress_every
        self.connect_timeout = connect_timeout
        self.totals = FloodStats()
        self.stats = FloodStats()
        self._conn: pika.SelectConnection | None = None
        self._chan = None
        self._error: str | None = None
        self._cancel = threading.Event()
        # per-call state
        self._pending: collections.deque[int] = collections.deque()
        self._single: dict[int, bool] = {}
        self._tag = 0
        self._goal: Callable[[], bool] = lambda: True

    # --- connection and I/O loop ------------------------------------------------

    def _run_until(self, goal: Callable[[], bool], timeout: float | None = None) -> None:
        """Run the I/O loop in this thread until ``goal()`` holds, an error, cancel or timeout.

        The loop is stopped every 50 ms to look at the goal (callbacks stop it sooner when they can).
        """
        assert self._conn is not None
        loop = self._conn.ioloop
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._error:
                raise FloodError(self._error)
            if goal() or self._cancel.is_set():
                return
            if deadline is not None and time.monotonic() > deadline:
                raise FloodError(f"timed out after {timeout:.0f} s")
            timer = loop.call_later(0.05, loop.stop)
            try:
                loop.start()
            finally:
                loop.remove_timeout(timer)

    def _connect(self) -> None:
        if self._conn is not None and self._conn.is_open and self._chan is not None and self._chan.is_open:
            return
        self._close_quietly()
        self._error = None
        ready = {"open": False}

        def on_open(conn: pika.SelectConnection) -> None:
            conn.channel(on_open_callback=on_channel)

        def on_channel(chan) -> None:
            self._chan = chan
            chan.add_on_close_callback(on_channel_closed)
            chan.add_on_return_callback(on_return)
            chan.confirm_delivery(self._on_confirm, callback=lambda _frame: ready.update(open=True))

        def on_open_error(_conn, exc) -> None:
            self._error = f"cannot connect to the broker: {exc!r}"

        def on_closed(_conn, reason) -> None:
            if self._error is None and not self._closing:
                self._error = f"connection closed: {reason!r}"
            self._wake_up(force=True)

        def on_channel_closed(_chan, reason) -> None:
            if self._error is None and not self._closing:
                self._error = f"channel closed: {reason!r}"
            self._wake_up(force=True)

        def on_return(_chan, method, _props, _body) -> None:
            self.stats.returned += 1
            self.totals.returned += 1

        self._closing = False
        self._conn = pika.SelectConnection(self.parameters, on_open_callback=on_open,
                                           on_open_error_callback=on_open_error, on_close_callback=on_closed)
        self._tag = 0
        self._pending.clear()
        self._single.clear()
        self._run_until(lambda: ready["open"], timeout=self.connect_timeout)

    def _wake_up(self, force: bool = False) -> None:
        if self._conn is None:
            return
        if force:
            try:
                self._conn.ioloop.stop()
            except Exception:  # noqa: BLE001 - loop already gone
                pass

    def _close_quietly(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        if conn is None:
            return
        self._closing = True
        try:
            if conn.is_open:
                conn.close()
                deadline = time.monotonic() + 5
                while not conn.is_closed and time.monotonic() < deadline:
                    conn.ioloop.call_later(0.05, conn.ioloop.stop)
                    conn.ioloop.start()
        except Exception:  # noqa: BLE001 - teardown never crashes on a lost connection
            pass

    # --- confirms ------------------------------------------------------------------

    def _on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        if method.multiple:
            while self._pending and self._pending[0] <= tag:
                t = self._pending.popleft()
                self._settle(self._single.pop(t, ok))
        else:
            self._single[tag] = ok
        while self._pending and self._pending[0] in self._single:
            self._settle(self._single.pop(self._pending.popleft()))
        if self._on_settled is not None:
            self._on_settled()

    _on_settled: Callable[[], None] | None = None
    _closing = False

    def _settle(self, ok: bool) -> None:
        if ok:
            self.stats.confirmed += 1
            self.totals.confirmed += 1
        else:
            self.stats.nacked += 1
            self.totals.nacked += 1

    # --- the public API ---------------------------------------------------------------

    def declare(self, queues: Iterable[str]) -> None:
        """Declare queues exactly as the engine does: durable, not exclusive, no auto-delete, no arguments."""
        self._connect()
        names = list(dict.fromkeys(queues))
        done: set[str] = set()
        for name in names:
            self._chan.queue_declare(name, durable=True, exclusive=False, auto_delete=False, arguments=None,
                                     callback=lambda _frame, name=name: done.add(name))
        self._run_until(lambda: len(done) == len(names), timeout=self.connect_timeout)

    def publish(self, queue: str, bodies: Iterable[dict[str, Any] | bytes], rate: float | None = None, *,
                allow_unroutable: bool = False) -> int:
        """Publish ``bodies`` (dicts are gzip-JSON encoded; bytes are sent as they are) to ``queue``.

        Returns the number of messages the broker confirmed.
        """
        total = len(bodies) if hasattr(bodies, "__len__") else None
        return self._publish(((queue, b) for b in bodies), total, queue, rate, allow_unroutable)

    def publish_many(self, messages: Iterable[tuple[str, dict[str, Any] | bytes]], rate: float | None = None, *,
                     allow_unroutable: bool = False) -> int:
        """Publish ``(queue, body)`` pairs in order (e.g. ``PlannedScan.messages``); returns the confirmed count."""
        total = len(messages) if hasattr(messages, "__len__") else None
        return self._publish(iter(messages), total, "<several>", rate, allow_unroutable)

    def publish_raw(self, queue: str, body: bytes, properties: pika.BasicProperties | None = None) -> int:
        """Publish exact bytes (poison messages); default properties ``delivery_mode=2`` only."""
        props = properties if properties is not None else pika.BasicProperties(delivery_mode=2)
        return self._publish(iter([(queue, body)]), 1, queue, None, True, props)

    def cancel(self) -> None:
        """Make a running ``publish`` return soon (thread-safe)."""
        self._cancel.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(conn.ioloop.stop)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> "Flood":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the publishing loop -------------------------------------------------------

    def _publish(self, items: Iterator[tuple[str, Any]], total: int | None, label: str, rate: float | None,
                 allow_unroutable: bool, properties: pika.BasicProperties | None = None) -> int:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 messages per second (or None for as fast as possible)")
        self._cancel.clear()
        self._connect()
        self.stats = FloodStats()
        props = properties or DATA_PROPERTIES
        chan = self._chan
        loop = self._conn.ioloop
        state = {"exhausted": False, "timer": None}
        t0 = time.monotonic()
        last_progress = [t0]
        interval = None if rate is None else 1.0 / rate
        stats = self.stats
        per_queue = stats.per_queue

        if self.history is not None:
            self.history.record("phase", name="flood_started", queue=label, total=total, rate=rate)

        def report(done: bool = False) -> None:
            if self.progress is None:
                return
            now = time.monotonic()
            if done or now - last_progress[0] >= self.progress_every:
                last_progress[0] = now
                self.progress(FloodProgress(label, stats.sent, stats.confirmed, total, now - t0, done))

        def pump() -> None:
            """Send what is due and fits in the window; schedule the next send if rate-limited."""
            state["timer"] = None
            if self._cancel.is_set() or self._error:
                return
            now = time.monotonic()
            while not state["exhausted"] and stats.sent - stats.confirmed - stats.nacked < self.window:
                if interval is not None:
                    due = t0 + stats.sent * interval
                    if due > now:
                        state["timer"] = loop.call_later(due - now, pump)
                        break
                try:
                    queue, body = next(items)
                except StopIteration:
                    state["exhausted"] = True
                    break
                data = body if isinstance(body, (bytes, bytearray)) else encode_body(body)
                try:
                    chan.basic_publish("", queue, data, props, mandatory=True)
                except Exception as exc:  # noqa: BLE001 - channel or connection gone
                    self._error = f"publish failed: {exc!r}"
                    loop.stop()
                    return
                self._tag += 1
                self._pending.append(self._tag)
                stats.sent += 1
                self.totals.sent += 1
                per_queue[queue] = per_queue.get(queue, 0) + 1
            report()

        def on_settled() -> None:
            if state["timer"] is None:
                pump()
            if finished():
                loop.stop()

        def finished() -> bool:
            return state["exhausted"] and stats.confirmed + stats.nacked >= stats.sent

        self._on_settled = on_settled
        try:
            pump()
            self._run_until(finished)
        except KeyboardInterrupt:
            self._cancel.set()
            raise
        finally:
            self._on_settled = None
            if state["timer"] is not None:
                loop.remove_timeout(state["timer"])
            stats.seconds = time.monotonic() - t0
            self.totals.seconds += stats.seconds
            for q, n in per_queue.items():
                self.totals.per_queue[q] = self.totals.per_queue.get(q, 0) + n
            if self._cancel.is_set() or self._error:
                # Confirms for messages in flight are lost with the connection: start afresh next time.
                self._close_quietly()
        report(done=True)
        if self.history is not None:
            self.history.record("phase", name="flood_done", queue=label, sent=stats.sent,
                                confirmed=stats.confirmed, returned=stats.returned, seconds=round(stats.seconds, 3))
        if stats.nacked:
            raise FloodError(f"the broker refused (nacked) {stats.nacked} of {stats.sent} messages to {label}")
        if stats.returned and not allow_unroutable:
            raise FloodError(f"{stats.returned} of {stats.sent} messages to {label} were unroutable "
                             f"(no such queue; declare it first or pass allow_unroutable=True)")
        return stats.confirmed
