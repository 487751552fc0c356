"""What the observer has seen so far, for the runner and the observer's own I/O threads.

One condition guards everything here. The recorder thread is the only writer
(the ``apply_*``, ``add_*``, ``set_*`` and ``count_*`` methods), but for
``add_queue``, which ``Observer.add_queue`` calls at once from the harness's
threads; any thread may read (the queries) and wait for a change (``wait_for``).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable


class LiveView:
    def __init__(self, queues: Iterable[str] = (), traced: Iterable[str] = ()):
        self._cond = threading.Condition()
        self._queues: list[str] = list(dict.fromkeys(queues))  # sampled each tick
        self._traced: list[str] = list(dict.fromkeys(traced))  # whose deliveries the firehose binds; append-only
        self._generation: dict[str, int] = {}  # queue -> queue.created events seen
        self._consumers: list[dict[str, Any]] = []
        self._connections: list[tuple[str | None, str | None]] = []  # (stage, broker name) of open connections
        self._ready: dict[str, int | None] = {}
        self._samples = 0
        self._firehose_backlog: int | None = None
        self._outputs: Counter[str] = Counter()
        self._output_types: Counter[str] = Counter()
        self._lost: dict[str, tuple[float, str]] = {}  # role -> (monotonic time lost, error); cleared on reconnect
        self._errors: list[str] = []

    # ------------------------------------------------------------------ writes (recorder thread only)
    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def apply_attribution(self, consumers: Iterable[dict[str, Any]], connections: list[tuple[str | None, str | None]],
                          generation: dict[str, int], fresh_queues: list[str]) -> None:
        with self._cond:
            self._consumers = [dict(c) for c in consumers]
            self._connections = list(connections)
            self._generation = dict(generation)
            self._traced += [q for q in fresh_queues if q not in self._traced]

    def add_queue(self, name: str, traced: bool) -> None:
        with self._cond:
            if name not in self._queues:
                self._queues = self._queues + [name]
            if traced and name not in self._traced:
                self._traced.append(name)

    def apply_sample(self, ready: dict[str, int | None], backlog: int | None) -> None:
        with self._cond:
            self._firehose_backlog = backlog
            self._ready.update(ready)
            self._samples += 1

    def count_output(self, queue: str, type_: str | None) -> None:
        with self._cond:
            self._outputs[queue] += 1
            self._output_types[type_] += 1

    def set_lost(self, role: str, lost: tuple[float, str] | None) -> None:
        with self._cond:
            if lost is None:
                self._lost.pop(role, None)
            else:
                self._lost.setdefault(role, lost)

    def add_error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)

    # ------------------------------------------------------------------ reads for the observer's I/O threads
    def sampled_queues(self) -> list[str]:
        with self._cond:
            return list(self._queues)

    def traced_queues(self, start: int = 0) -> list[str]:
        """Queues whose deliveries are traced, from the ``start``-th announced on."""
        with self._cond:
            return self._traced[start:]

    def generation(self, queue: str) -> int:
        with self._cond:
            return self._generation.get(queue, 0)

    def lost(self) -> dict[str, tuple[float, str]]:
        with self._cond:
            return dict(self._lost)

    @property
    def errors(self) -> list[str]:
        with self._cond:
            return list(self._errors)

    # ------------------------------------------------------------------ queries for the runner
    def consumers_of(self, stage: str) -> set[str]:
        """Queues ``stage`` currently holds consumers on."""
        with self._cond:
            return {c["queue"] for c in self._consumers if c["stage"] == stage}

    def consumers(self) -> list[dict[str, Any]]:
        """Every live consumer of the vhost (not the observer's): stage, queue, tag, chan, prefetch."""
        with self._cond:
            return [dict(c) for c in self._consumers]

    def consuming_stages(self) -> dict[str, set[str]]:
        """stage -> queues, for every stage holding at least one consumer (unattributed ones under None)."""
        result: dict[str, set[str]] = {}
        with self._cond:
            for c in self._consumers:
                result.setdefault(c["stage"], set()).add(c["queue"])
        return result

    def connections_of(self, stage: str) -> list[str]:
        """Broker names of ``stage``'s open connections (for the management API's close)."""
        with self._cond:
            return [name for owner, name in self._connections if owner == stage]

    def ready(self, queue: str) -> int | None:
        """Last sampled ready count of ``queue``; None if missing or not sampled yet."""
        with self._cond:
            return self._ready.get(queue)

    def ready_counts(self) -> dict[str, int | None]:
        with self._cond:
            return dict(self._ready)

    @property
    def samples(self) -> int:
        with self._cond:
            return self._samples

    @property
    def firehose_backlog(self) -> int | None:
        """Messages waiting in the observer's trace queue at the last sample."""
        with self._cond:
            return self._firehose_backlog

    def output_count(self, queue: str | None = None) -> int:
        """Messages the observer read from the output queues (all, or one queue)."""
        with self._cond:
            return sum(self._outputs.values()) if queue is None else self._outputs[queue]

    def output_types(self) -> dict[str, int]:
        with self._cond:
            return dict(self._output_types)

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every change); returns its last value."""
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
