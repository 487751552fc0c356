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
idle flood connection is not reset by the broker between phases. Calls from
different threads (the runner floods phases in parallel) each get a
connection of their own, so a slow rate-limited phase never holds up
another. ``cancel()`` may be called from any thread (time limit, Ctrl-C
handler) and makes running calls return early with what was confirmed so far.

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
    # Positions (0-based, in the call's order) the broker nacked, and those sent but never settled
    # (the connection went first): with what was never sent, what a caller that resumes sends again.
    nacked_at: list[int] = field(default_factory=list)
    unsettled_at: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.confirmed / self.seconds if self.seconds > 0 else 0.0

    def unconfirmed(self, total: int) -> list[int]:
        """Positions of a call of ``total`` messages that the broker did not confirm."""
        return sorted(set(self.nacked_at) | set(self.unsettled_at) | set(range(self.sent, total)))


def poison_body(shape: str) -> tuple[bytes, pika.BasicProperties]:
    """A poison message for the FT-POISON fault: ``not_json`` or ``missing_fields``."""
    if shape == "not_json":
        return b"\x00this is not JSON {", pika.BasicProperties(delivery_mode=2)
    if shape == "missing_fields":
        # A gzip JSON object with a scan tag but none of the fields a stage needs.
        body = gzip.compress(json.dumps({"scan_tag": {"time": "2026-01-01T00:00:00+00:00"}}).encode())
        return body, copy.copy(DATA_PROPERTIES)
    raise ValueError(f"unknown poison shape {shape!r}; known: not_json, missing_fields")


class _Link:
    """One connection + confirm-mode channel, driven by the thread that uses it."""

    def __init__(self, flood: "Flood"):
        self.flood = flood
        self.conn: pika.SelectConnection | None = None
        self.chan = None
        self.error: str | None = None
        self.closing = False
        self.busy = False
        self.pending: collections.deque[int] = collections.deque()
        self.single: dict[int, bool] = {}
        self.first_tag = 1  # the delivery tag of the current call's first message (tags count on per channel)
        self.tag = 0
        self.stats = FloodStats()
        self.on_settled: Callable[[], None] | None = None
        self.generation = 0  # the flood's cancel generation when the current call started

    @property
    def cancelled(self) -> bool:
        """``Flood.cancel()`` was called after the current call started."""
        return self.flood._generation != self.generation

    # --- I/O loop ---------------------------------------------------------------

    def run_until(self, goal: Callable[[], bool], timeout: float | None = None) -> None:
        """Run the I/O loop in this thread until ``goal()`` holds, an error, cancel or timeout.

        The loop is stopped every 50 ms to look at the goal (callbacks stop it sooner when they can).
        """
        assert self.conn is not None
        loop = self.conn.ioloop
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.error:
                raise FloodError(self.error)
            if goal() or self.cancelled:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise FloodError(f"timed out after {timeout:.0f} s")
            timer = loop.call_later(0.05, loop.stop)
            try:
                loop.start()
            finally:
                loop.remove_timeout(timer)

    def connect(self) -> None:
        if self.conn is not None and self.conn.is_open and self.chan is not None and self.chan.is_open:
            return
        self.close()
        self.error = None
        self.closing = False
        ready = {"open": False}

        def on_open(conn: pika.SelectConnection) -> None:
            conn.channel(on_open_callback=on_channel)

        def on_channel(chan) -> None:
            self.chan = chan
            chan.add_on_close_callback(on_channel_closed)
            chan.add_on_return_callback(on_return)
            chan.confirm_delivery(self.on_confirm, callback=lambda _frame: ready.update(open=True))

        def on_open_error(_conn, exc) -> None:
            self.error = f"cannot connect to the broker: {exc!r}"
            self.stop_loop()

        def on_closed(_conn, reason) -> None:
            if self.error is None and not self.closing:
                self.error = f"connection closed: {reason!r}"
            self.stop_loop()

        def on_channel_closed(_chan, reason) -> None:
            if self.error is None and not self.closing:
                self.error = f"channel closed: {reason!r}"
            self.stop_loop()

        def on_return(_chan, _method, _props, _body) -> None:
            self.stats.returned += 1

        self.conn = pika.SelectConnection(self.flood.parameters, on_open_callback=on_open,
                                          on_open_error_callback=on_open_error, on_close_callback=on_closed)
        self.tag = 0
        self.pending.clear()
        self.single.clear()
        self.run_until(lambda: ready["open"], timeout=self.flood.connect_timeout)

    def stop_loop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.ioloop.stop()
            except Exception:  # noqa: BLE001 - loop already gone
                pass

    def close(self) -> None:
        conn, self.conn, self.chan = self.conn, None, None
        if conn is None:
            return
        self.closing = True
        try:
            if conn.is_open:
                conn.close()
                deadline = time.monotonic() + 5
                while not conn.is_closed and time.monotonic() < deadline:
                    timer = conn.ioloop.call_later(0.05, conn.ioloop.stop)
                    conn.ioloop.start()
                    conn.ioloop.remove_timeout(timer)
        except Exception:  # noqa: BLE001 - teardown never crashes on a lost connection
            pass

    # --- confirms ---------------------------------------------------------------

    def on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        if method.multiple:
            while self.pending and self.pending[0] <= tag:
                t = self.pending.popleft()
                self.settle(t, self.single.pop(t, ok))
        else:
            self.single[tag] = ok
        while self.pending and self.pending[0] in self.single:
            t = self.pending.popleft()
            self.settle(t, self.single.pop(t))
        if self.on_settled is not None:
            self.on_settled()

    def settle(self, tag: int, ok: bool) -> None:
        if ok:
            self.stats.confirmed += 1
        else:
            self.stats.nacked += 1
            self.stats.nacked_at.append(tag - self.first_tag)


class Flood:
    """Publishes to one vhost with pipelined confirms; one connection per calling thread."""

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
        self.totals = FloodStats()  # over every call, all threads
        self.stats = FloodStats()  # of the last call that finished (any thread)
        self._generation = 0  # bumped by cancel(): calls started before it stop, later ones run
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}

    def _link(self) -> _Link:
        with self._lock:
            # Connections of threads that have ended (one per workload phase in the runner) are closed
            # here, so a long scenario does not collect idle connections.
            alive = {t.ident for t in threading.enumerate()}
            dead = [ident for ident in self._links if ident not in alive]
            stale = [self._links.pop(ident) for ident in dead]
            link = self._links.get(threading.get_ident())
            if link is None:
                link = self._links[threading.get_ident()] = _Link(self)
        for old in stale:
            if not old.busy:
                old.close()
        return link

    @property
    def connections(self) -> int:
        """Open flood connections (one per thread that has published and is still alive)."""
        with self._lock:
            return sum(1 for link in self._links.values() if link.conn is not None and link.conn.is_open)

    # --- the public API ---------------------------------------------------------------

    def declare(self, queues: Iterable[str]) -> None:
        """Declare queues exactly as the engine does: durable, not exclusive, no auto-delete, no arguments."""
        link = self._link()
        link.generation = self._generation
        link.busy = True
        try:
            link.connect()
            names = list(dict.fromkeys(queues))
            done: set[str] = set()
            for name in names:
                link.chan.queue_declare(name, durable=True, exclusive=False, auto_delete=False, arguments=None,
                                        callback=lambda _frame, name=name: done.add(name))
            link.run_until(lambda: len(done) == len(names), timeout=self.connect_timeout)
        finally:
            link.busy = False

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
        """Make running calls return soon (thread-safe). Later calls work again."""
        with self._lock:
            self._generation += 1
            links = list(self._links.values())
        for link in links:
            conn = link.conn
            if conn is not None:
                try:
                    conn.ioloop.add_callback_threadsafe(conn.ioloop.stop)
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        """Close every idle connection; busy ones are cancelled and close themselves."""
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        if any(link.busy for link in links):
            self.cancel()
        for link in links:
            if not link.busy:
                link.close()

    def __enter__(self) -> "Flood":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the publishing loop -------------------------------------------------------

    def _publish(self, items: Iterator[tuple[str, Any]], total: int | None, label: str, rate: float | None,
                 allow_unroutable: bool, properties: pika.BasicProperties | None = None) -> int:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 messages per second (or None for as fast as possible)")
        link = self._link()
        link.generation = self._generation
        link.busy = True
        stats = link.stats = FloodStats()
        state: dict[str, Any] = {"exhausted": False, "timer": None}
        t0 = time.monotonic()
        try:
            link.connect()
            link.first_tag = link.tag + 1
            self._flood(link, items, total, label, rate, properties or DATA_PROPERTIES, state, t0)
        except KeyboardInterrupt:
            link.error = "interrupted"
            raise
        except Exception as exc:
            exc.flood_stats = stats  # what was sent and confirmed before the failure, for a caller that resumes
            raise
        finally:
            link.on_settled = None
            if state["timer"] is not None and link.conn is not None:
                link.conn.ioloop.remove_timeout(state["timer"])
            stats.seconds = time.monotonic() - t0
            stats.unsettled_at = [tag - link.first_tag for tag in link.pending]
            if link.cancelled or link.error:
                # Confirms for messages in flight are lost with the connection: start afresh next time.
                link.close()
            link.busy = False
            with self._lock:
                self.stats = stats
                totals = self.totals
                totals.sent += stats.sent
                totals.confirmed += stats.confirmed
                totals.nacked += stats.nacked
                totals.returned += stats.returned
                totals.seconds += stats.seconds
                for q, n in stats.per_queue.items():
                    totals.per_queue[q] = totals.per_queue.get(q, 0) + n
                if link not in self._links.values():  # closed while we were busy
                    link.close()
        if self.progress is not None:
            self.progress(FloodProgress(label, stats.sent, stats.confirmed, total, stats.seconds, True))
        if self.history is not None:
            self.history.record("phase", name="flood_done", queue=label, sent=stats.sent,
                                confirmed=stats.confirmed, returned=stats.returned, seconds=round(stats.seconds, 3))
        if stats.nacked:
            refused = FloodError(f"the broker refused (nacked) {stats.nacked} of {stats.sent} messages to {label}")
            refused.flood_stats = stats  # which ones, for a caller that sends them again
            raise refused
        if stats.returned and not allow_unroutable:
            raise FloodError(f"{stats.returned} of {stats.sent} messages to {label} were unroutable "
                             f"(no such queue; declare it first or pass allow_unroutable=True)")
        return stats.confirmed

    def _flood(self, link: _Link, items: Iterator[tuple[str, Any]], total: int | None, label: str,
               rate: float | None, props: pika.BasicProperties, state: dict[str, Any], t0: float) -> None:
        stats = link.stats
        per_queue = stats.per_queue
        chan = link.chan
        loop = link.conn.ioloop
        interval = None if rate is None else 1.0 / rate
        last_progress = [t0]
        window = self.window
        if self.history is not None:
            self.history.record("phase", name="flood_started", queue=label, total=total, rate=rate)

        def report() -> None:
            if self.progress is None:
                return
            now = time.monotonic()
            if now - last_progress[0] >= self.progress_every:
                last_progress[0] = now
                self.progress(FloodProgress(label, stats.sent, stats.confirmed, total, now - t0))

        def pump() -> None:
            """Send what is due and fits in the window; schedule the next send if rate-limited."""
            state["timer"] = None
            if link.cancelled or link.error:
                return
            now = time.monotonic()
            while not state["exhausted"] and stats.sent - stats.confirmed - stats.nacked < window:
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
                    link.error = f"publish failed: {exc!r}"
                    loop.stop()
                    return
                link.tag += 1
                link.pending.append(link.tag)
                stats.sent += 1
                per_queue[queue] = per_queue.get(queue, 0) + 1
            report()

        def finished() -> bool:
            return state["exhausted"] and stats.confirmed + stats.nacked >= stats.sent

        def on_settled() -> None:
            if state["timer"] is None:
                pump()
            if finished():
                loop.stop()

        link.on_settled = on_settled
        pump()
        link.run_until(finished)
