"""Which announced per-scan queues a worker consumes (OS2datascanner 3.32), as pure functions.

A worker learns of per-scan queues from ``new_queue`` commands, each with a tag (``delta``,
``full``, ...). Its ``CONVERSION_PRIORITY`` (``t0 t1 ...``, first = highest) filters them and
ranks them (SPEC.md, "Per-scan queues"):

- PS-FILTER: a queue whose tag is not listed is never consumed (no list = every tag allowed).
- PS-PRECEDENCE / PS-PROGRESS, depth-aware: at each check the worker keeps consumers only on the
  queues of the highest tag that has ready messages; when no known queue has ready messages it
  consumes every one of them (so new work is taken at once, whatever its tag). Without a list
  there is no per-scan priority: every announced queue is consumed.
- A queue that no longer exists (``ready`` is None) is never started.

Faults that change the decision: ``delivery_count_priority`` (3.32's own depth-blind rule: the
highest tag that had deliveries in the last window instead of the highest with ready messages)
and ``subscribe_every_tag`` (no filter; unlisted tags rank below every listed one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence


@dataclass(frozen=True)
class PerScanDecision:
    cancel: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    serving: str | None = None  # the tag served alone, or None when every known queue is served

    @property
    def is_switch(self) -> bool:
        return bool(self.cancel or self.start)


def allowed(tag: str | None, priority: Sequence[str], faults: AbstractSet[str] = frozenset()) -> bool:
    """Whether a queue announced with ``tag`` may be consumed by a worker with this CONVERSION_PRIORITY."""
    return not priority or "subscribe_every_tag" in faults or tag in priority


def rank(tag: str | None, priority: Sequence[str]) -> int:
    """0 for the highest tag; a tag the list does not name ranks below every listed one."""
    return priority.index(tag) if tag in priority else len(priority)


def decide_per_scan(priority: Sequence[str], tags: Mapping[str, str | None], consuming: AbstractSet[str],
                    ready: Mapping[str, int | None], delivered: Mapping[str, int] | None = None,
                    faults: AbstractSet[str] = frozenset()) -> PerScanDecision:
    """Consumers to cancel and to start among the known per-scan queues ``tags`` (queue -> tag).

    ``consuming``: the per-scan queues consumed now; ``ready``: ready counts by passive declare
    (None = no such queue); ``delivered``: deliveries per queue since the last check (read only by
    the ``delivery_count_priority`` fault).
    """
    exists = {q for q in tags if ready.get(q) is not None}
    if "delivery_count_priority" in faults:
        busy = {q for q in tags if (delivered or {}).get(q, 0) > 0}
    else:
        busy = {q for q in exists if (ready.get(q) or 0) > 0}
    serving = None
    target = set(tags)
    if priority and busy:
        top = min(rank(tags[q], priority) for q in busy)
        target = {q for q in tags if rank(tags[q], priority) == top}
        serving = tags[next(q for q in busy if rank(tags[q], priority) == top)]
    cancel = sorted(q for q in consuming if q in tags and q not in target)
    start = sorted(q for q in target if q not in consuming and q in exists)
    return PerScanDecision(tuple(cancel), tuple(start), serving)
