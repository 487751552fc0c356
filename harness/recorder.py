"""The observer's one writer: a loop that takes what the I/O threads put on its inbox and applies it.

The observer's threads (event exchange, firehose, sampler) and its callers
(``register_stage``, ``note_broker_down``) only ``put`` raw
tuples ``(kind, *args)`` on ``Recorder.inbox``; the recorder thread takes them
in order and dispatches each to ``on_<kind>`` (the pytest-xdist controller's
loop). It alone writes the history, the attribution tables and the
``LiveView`` the runner reads (but for ``Observer.add_queue``, which appends
to its queue lists at once), so none of them needs rules about who may touch
what.

No pika here: the recorder is driven by tests without a broker.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from typing import Any, Callable, Optional, Protocol

from harness.attribution import Attribution, as_bool, port_of_name
from harness.history import HistoryWriter
from harness.live_view import LiveView
from harness.messages import summarise

log = logging.getLogger(__name__)

BATCH = 500  # inbox items applied between two attribution passes (and view notifications)
SUMMARY_CACHE = 20000  # message summaries kept (a message is traced twice with the same body)


class StageResolver(Protocol):
    """What the recorder needs of a resolver (harness.port_resolver.PortResolver is one)."""

    skip: set[int]

    def __call__(self, port: Optional[int], user: Optional[str] = None) -> Optional[str]: ...

    def register(self, stage: str, pid: int, user: Optional[str] = None) -> None: ...

    def forget(self, port: Optional[int]) -> None: ...


class Recorder:
    def __init__(self, history: HistoryWriter, vhost: str, own_prefix: str, resolver: StageResolver,
                 view: LiveView, output_queues: tuple[str, ...], *, attribution_timeout: float = 1.0,
                 drain_timeout: float = 5.0, clock: Callable[[], float] = time.time):
        self.history = history
        self.resolver = resolver
        self.view = view
        self.output_queues = output_queues
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.attribution = Attribution(vhost, own_prefix, resolver, attribution_timeout=attribution_timeout,
                                       forget_port=resolver.forget)
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.counts: Counter[str] = Counter()  # history events recorded, by type
        self.stopped = False
        self._summaries: dict[tuple[bytes, str | None], dict[str, Any]] = {}

    def put(self, kind: str, *args: Any) -> None:
        """Any thread: hand one raw item to the recorder (applied by ``on_<kind>``)."""
        self.inbox.put((kind, *args))

    # ------------------------------------------------------------------ the loop (recorder thread)
    def run(self) -> None:
        while self.step(timeout=0.05):
            pass
        self.finish()

    def step(self, timeout: float | None = None) -> bool:
        """Apply one batch from the inbox (waiting up to ``timeout`` for the first item), then
        retry the pending attribution and wake the view's waiters. False once stopped."""
        batch = []
        try:
            batch.append(self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait())
            while len(batch) < BATCH:
                batch.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for item in batch:
            self.apply(item)
        changed = self.advance() or bool(batch)
        if changed:
            self.view.notify()
        return not self.stopped

    def apply(self, item: tuple[Any, ...]) -> None:
        kind, *args = item
        try:
            getattr(self, f"on_{kind}")(*args)
        except Exception as exc:  # one odd item must not stop the recording
            self.on_error(f"{kind} not recorded: {exc!r}")
            log.debug("observer: %s not recorded", kind, exc_info=True)

    def advance(self, flush: bool = False) -> bool:
        """Record the pending broker events that became attributable; True if any was."""
        att = self.attribution
        if not att.pending:
            return False
        records = att.advance(self.clock(), flush=flush)
        for problem in att.problems:
            self.on_error(problem)
        att.problems.clear()
        for type_, t, fields in records:
            self.record(type_, t, **fields)
        if records:
            fresh = [f["queue"] for type_, _, f in records
                     if type_ == "queue_created" and f["queue"] not in self.output_queues]
            self.view.apply_attribution(att.consumers.values(), att.open_connections(), att.queue_generation, fresh)
        return bool(records)

    def record(self, type_: str, t: float, **fields: Any) -> None:
        self.history.record(type_, t=t, **fields)
        self.counts[type_] += 1

    # ------------------------------------------------------------------ one handler per kind of item
    def on_event(self, t: float, key: str, headers: dict) -> None:
        """A message of the event exchange, or the BROKER_DOWN marker: recorded now if it can be."""
        self.attribution.add(t, key, headers)
        self.advance()

    def on_trace(self, t: float, key: str, h: dict, body: bytes) -> None:
        """A firehose message: one publish or one delivery."""
        port = port_of_name(h.get("connection"))
        if port in self.attribution.own_ports:
            return
        stage = self.resolver(port, h.get("user"))
        msg = self.summary(body, (h.get("properties") or {}).get("content_encoding"))
        if key.startswith("deliver."):
            self.record("deliver", t, queue=key[len("deliver."):], stage=stage,
                        redelivered=as_bool(h.get("redelivered")), msg=msg, conn=h.get("connection"))
        elif key.startswith("publish."):
            keys = h.get("routing_keys") or [""]
            self.record("publish", t, exchange=h.get("exchange_name", key[len("publish."):]),
                        routing_key=keys[0], routed=list(h.get("routed_queues") or []), stage=stage, msg=msg,
                        conn=h.get("connection"))

    def on_output(self, t: float, queue_name: str, encoding: str | None, body: bytes, redelivered: bool) -> None:
        """A message the observer read from one of the engine's output queues."""
        msg = self.summary(body, encoding)
        self.record("output", t, queue=queue_name, msg=msg, redelivered=redelivered)
        self.view.count_output(queue_name, msg.get("type"))

    def on_sample(self, t: float, ready: dict[str, int | None], backlog: int | None) -> None:
        self.record("sample", t, ready=ready, firehose_backlog=backlog)
        self.view.apply_sample(ready, backlog)

    def on_stage(self, stage: str, pid: int, user: str | None = None) -> None:
        self.resolver.register(stage, pid, user)

    def on_own_port(self, port: int | None) -> None:
        if port is not None:
            self.attribution.own_ports.add(port)
            self.resolver.skip.add(port)

    def on_lost(self, role: str, since: float, error: str) -> None:
        self.view.set_lost(role, (since, error))

    def on_reconnected(self, role: str) -> None:
        self.view.set_lost(role, None)
        self.record("phase", self.clock(), name="observer_reconnected", source=role)

    def on_error(self, text: str) -> None:
        log.warning("observer: %s", text)
        self.view.add_error(text)

    def on_stop(self) -> None:
        """Every I/O thread has stopped (the observer's stop): the loop ends after this batch."""
        self.stopped = True

    def finish(self) -> None:
        """Apply what is left, give the pending events their last chance, then record them as they are."""
        while not self.inbox.empty():
            self.step()
        deadline = time.monotonic() + self.drain_timeout
        while self.attribution.pending and time.monotonic() < deadline:
            time.sleep(0.05)
            self.advance()
        self.advance(flush=True)
        self.view.notify()

    # ------------------------------------------------------------------ helpers
    def summary(self, body: bytes, encoding: str | None) -> dict[str, Any]:
        # A message is traced at least twice (publish, deliver) with the same body: decode it once.
        key = (body, encoding)
        cached = self._summaries.get(key)
        if cached is None:
            cached = summarise(body, encoding)
            if len(self._summaries) >= SUMMARY_CACHE:
                self._summaries.clear()
            self._summaries[key] = cached
        return dict(cached)
