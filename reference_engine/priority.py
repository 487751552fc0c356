"""The queue-priority decision, as a pure function.

``decide(queues, consuming, ready)`` takes the stage's QUEUE_PRIORITY
(``q0 q1 ... qn``), the set of queues it currently consumes and the ready
counts from passive declares (``None`` = the queue does not exist), and
returns which consumers to cancel and which to start. The stage applies the
cancels before the starts, so it never holds two lower consumers.

Rules (SPEC.md):
- QP-FIRST-PINNED: ``q0`` is always consumed (started if missing, never cancelled).
- QP-PRECEDENCE / QP-ONE-LOWER: at most one lower queue is consumed, the
  highest non-empty one, and only while every queue above it is empty.
- QP-CANCEL-WINDOW: a lower consumer is cancelled as soon as a higher queue
  has ready messages (the stage runs this at every check).
- QP-PROGRESS: when the consumed lower queue is empty and a queue below it
  is not, the stage moves down. When nothing is ready anywhere the current
  lower consumer is kept (it may hold prefetched work, and new messages in
  its queue are then served at once).
- A missing queue (deleted under the stage, FT-QUEUE-GONE) counts as empty
  and is never started.

Faults that change the decision: ``two_lower``, ``cancel_first``,
``no_move_down``, ``reverse_priority`` (see faults.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence


@dataclass(frozen=True)
class Decision:
    cancel: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    target: str | None = None  # the lower queue the stage should be serving, if any

    @property
    def is_switch(self) -> bool:
        return bool(self.cancel or self.start)


def ranked(queues: Sequence[str], faults: AbstractSet[str] = frozenset()) -> list[str]:
    """The queues in the order the stage prefers them."""
    queues = list(queues)
    if "reverse_priority" in faults and len(queues) > 2:
        return [queues[0], *reversed(queues[1:])]
    return queues


def decide(queues: Sequence[str], consuming: AbstractSet[str], ready: Mapping[str, int | None],
           faults: AbstractSet[str] = frozenset()) -> Decision:
    if not queues:
        return Decision()
    order = ranked(queues, faults)
    first, lower = order[0], order[1:]
    rank = {q: i for i, q in enumerate(order)}

    def exists(q: str) -> bool:
        return ready.get(q) is not None

    def count(q: str) -> int:
        return ready.get(q) or 0

    current = [q for q in lower if q in consuming]  # in rank order
    first_ready = next((q for q in order if count(q) > 0), None)

    if first_ready is None:
        # Nothing ready anywhere: keep serving the current lower queue (if it still exists).
        alive = [q for q in current if exists(q)]
        target = alive[0] if alive else None
    elif first_ready == first:
        target = None
    else:
        target = first_ready

    if "no_move_down" in faults and target is not None:
        alive = [q for q in current if exists(q)]
        if alive and rank[target] > rank[alive[0]]:
            target = alive[0]

    cancel = [q for q in current if q != target]
    if "two_lower" in faults and target is not None:
        # Bug: moving down leaves the emptied (higher) lower consumer in place.
        cancel = [q for q in cancel if rank[q] > rank[target] or not exists(q)]

    start: list[str] = []
    if first not in consuming and exists(first):
        start.append(first)
    if target is not None and target not in consuming and exists(target):
        start.append(target)

    if "cancel_first" in faults and first in consuming and (cancel or start):
        cancel.insert(0, first)
        start.insert(0, first)
    return Decision(tuple(cancel), tuple(start), target)
