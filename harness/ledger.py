"""The ledger: what a run owes, answered, dropped and aborted, folded from history events.

One account for the runner (is the run complete?) and for the checkers (DL-EXACTLY-ONCE, and
FT-RECONNECT's losses). ``Ledger.add`` takes one history event at a time; every answer is a
function of the events added, whatever their order, so the runner can feed it as events are
appended (``LiveLedger``, a ``HistoryWriter`` listener) and a checker from a saved history
(``Ledger.of``), and both reach the same account.

- **expected**: every object of every ``scan_planned`` event, keyed ``(scan, object)`` with the
  object's path relative (a leading ``/`` dropped).
- **answered**: an object's results are MatchesMessages routed to ``os2ds_matches``, its problems
  ProblemMessages naming it routed to ``os2ds_problems``. Two witnesses see them: the tracer's
  publishes and the observer's reads of the output queues (``output`` events). Each can miss
  some (a broker restart loses the tracer's backlog; an output queue may not be read), so an
  object counts the larger number. Reads are counted per connection of the observer (between its
  ``observer_reconnected`` phases), taking the largest count: after a reconnect the broker hands
  out again what the observer read but could not ack, and after a node crash it does so without
  the redelivered flag (and sets the flag on messages the observer never received), so the flag
  cannot tell a repeat from a first read.
- **dropped with a deleted queue** (``gone``): objects whose conversion was published to a queue a
  queue-deletion fault deleted and not delivered from it before the deletion (the broker's
  ``queue_deleted`` from 1 s before the fault on, else the fault). One a stage took is still owed.
- **dropped unroutable**: objects whose conversion no queue received. RT-ROUTABLE decides which
  publishes those are (``mark_unroutable``); the ledger only excuses them.
- **dropped with a deleted per-scan queue**: objects of the scans routed through a per-scan queue
  that a fault deleted, or the admin deleted on an abort (``ps_delete`` with reason ``fault`` or
  ``abort``: the queue may also hold other scans' messages, a hold's), unless a stage kept one: its
  latest delivery from the queue came before the deletion and that stage did not cancel its consumer
  on the queue in between (a worker pausing a per-scan queue returns what it had prefetched, which
  the tracer does not show). Objects the explorer had not published yet are excused too: they can
  no longer reach any queue.
- **aborted**: scans the admin aborted (``phase`` events named ``scan_aborted``).
- **owed**: expected, neither answered nor excused by the three above. A run is complete when
  nothing is owed; an object still owed at the end is lost.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any, Iterable

from harness.messages import PER_SCAN_PREFIX

RESULT_QUEUE = "os2ds_matches"
PROBLEM_QUEUE = "os2ds_problems"
WORKLOAD_TYPES = ("ScanSpecMessage", "ConversionMessage")  # what the harness's flood publishes
# A queue_deleted stamped this long before the deletion fault still is that deletion (the broker's
# event and the fault are stamped by two threads).
DELETED_BEFORE_FAULT = 1.0
# The firehose stamps a delivery when the observer reads it, the event exchange a consumer's cancel when
# the broker makes it: a delivery recorded up to this long after a cancel may have come before it.
CANCEL_SKEW = 0.5

Key = tuple[Any, Any]


def object_key(scan: Any, path: Any) -> Key:
    return scan, path.lstrip("/") if isinstance(path, str) else path


def _answer_kind(queue: Any, msg: dict) -> str | None:
    """'results' or 'problems' when a message in ``queue`` answers an object, else None."""
    if msg.get("scan") is None:
        return None
    if queue == RESULT_QUEUE and msg.get("type") == "MatchesMessage":
        return "results"
    if queue == PROBLEM_QUEUE and msg.get("type") == "ProblemMessage" and msg.get("object"):
        return "problems"
    return None


def _deletes_queue(kind: Any) -> bool:
    # Imported here: harness.checkers imports this module (DL-EXACTLY-ONCE reads the ledger).
    from harness.checkers._common import fault_family
    return fault_family(kind) == "queue_gone"


class Ledger:
    """The account of one run, folded from its history events (see the module docstring)."""

    def __init__(self) -> None:
        self.expected: set[Key] = set()
        self.scans = 0
        self.results: Counter = Counter()   # key -> MatchesMessages (the larger of the two witnesses)
        self.problems: Counter = Counter()  # key -> ProblemMessages naming the object
        self._seen = {"published": {"results": Counter(), "problems": Counter()}}
        self._witnesses: set[str] = set()  # 'published', 'read': which witness saw output traffic
        self.aborted: set[str] = set()
        self.redelivered: set[Key] = set()  # objects (or (scan, None) for a spec) handed out again
        self.unroutable: set[Key] = set()
        self.harness_publishes = 0  # workload messages the tracer saw the harness publish
        # First deliveries of work (scan specs, conversions) to anyone: the engine is doing something new.
        # Commands are left out: a stage that reconnects again and again says hello each time, and the
        # admin's replies and the broadcast hellos are first deliveries that are no progress.
        self.deliveries = 0
        self._unanswered: set[Key] = set()
        self._deletion_faults: dict[str, float] = {}  # queue -> first deletion fault
        self._deleted_seen: dict[str, list[float]] = {}  # queue -> its queue_deleted times
        self._published_to: dict[str, set[Key]] = {}  # queue -> conversions published to it
        self._first_taken: dict[tuple[str, Key], float] = {}  # (queue, key) -> first delivery from it
        self._version = 0
        self._cache: tuple[int, set[Key]] | None = None
        self._reads = {"results": {}, "problems": {}}  # kind -> key -> times the observer read it
        self._reconnects: list[float] = []  # the observer's reconnects: its reads are counted per connection
        self._answer_times: dict[Key, list[float]] = {}  # key -> times a result of it was seen
        self._restarts: list[float] = []  # restart_broker faults
        self._scan_queue: dict[str, str] = {}  # scan -> its per-scan queue
        self._ps_deleted: dict[str, float] = {}  # per-scan queue -> when a fault deleted it (ps_delete)
        self._ps_deliveries: dict[str, list[tuple[float, Any, Key]]] = {}  # per-scan queue -> (t, stage, key)
        self._ps_cancels: dict[tuple[str, Any], list[float]] = {}  # (per-scan queue, stage) -> consumer_deleted

    @classmethod
    def of(cls, events: Iterable[dict], unroutable: Iterable[dict] = ()) -> "Ledger":
        """The ledger of a whole history; ``unroutable``: the publishes RT-ROUTABLE found no queue for."""
        ledger = cls()
        for event in events:
            ledger.add(event)
        for event in unroutable:
            ledger.mark_unroutable(event)
        return ledger

    # -- the fold --------------------------------------------------------------
    def add(self, event: dict) -> None:
        handler = getattr(self, f"_on_{event.get('type')}", None)
        if handler is not None:
            handler(event)

    def mark_unroutable(self, publish: dict) -> None:
        msg = publish.get("msg") or {}
        if msg.get("type") == "ConversionMessage":
            self.unroutable.add(object_key(msg.get("scan"), msg.get("object")))
            self._version += 1

    def _on_scan_planned(self, e: dict) -> None:
        self.scans += 1
        if e.get("per_scan") is not None:
            self._scan_queue[e.get("scan")] = e.get("conversion_queue")
        for path in e.get("objects") or ():
            key = object_key(e.get("scan"), path)
            self.expected.add(key)
            if not self.answered(key):
                self._unanswered.add(key)
        self._version += 1

    def _on_publish(self, e: dict) -> None:
        msg = e.get("msg") or {}
        if e.get("stage") == "harness" and msg.get("type") in WORKLOAD_TYPES:
            self.harness_publishes += 1
        if msg.get("type") == "ConversionMessage":
            self._published_to.setdefault(e.get("routing_key"), set()).add(object_key(msg.get("scan"), msg.get("object")))
            self._version += e.get("routing_key") in self._deletion_faults or e.get("routing_key") in self._ps_deleted
        if e.get("exchange", "") == "" and e.get("routing_key") in (RESULT_QUEUE, PROBLEM_QUEUE):
            self._witness("published", e.get("routing_key"), msg, e.get("t"))

    def _on_output(self, e: dict) -> None:
        if e.get("queue") in (RESULT_QUEUE, PROBLEM_QUEUE):
            self._witness("read", e.get("queue"), e.get("msg") or {}, e.get("t"))

    def _witness(self, witness: str, queue: str, msg: dict, t: float | None = None) -> None:
        self._witnesses.add(witness)
        kind = _answer_kind(queue, msg)
        if kind is None:
            return
        key = object_key(msg.get("scan"), msg.get("object"))
        if kind == "results" and t is not None:
            self._answer_times.setdefault(key, []).append(t)
        if witness == "read":
            self._reads[kind].setdefault(key, []).append(t)
        else:
            self._seen[witness][kind][key] += 1
        self._settle(kind, key)

    def _read_count(self, kind: str, key: Key) -> int:
        """The most reads of ``key`` within one connection of the observer."""
        times = self._reads[kind].get(key)
        if not times:
            return 0
        per_connection = Counter(bisect.bisect_right(self._reconnects, t) for t in times)
        return max(per_connection.values())

    def _settle(self, kind: str, key: Key) -> None:
        total = self.results if kind == "results" else self.problems
        count = max(self._seen["published"][kind][key], self._read_count(kind, key))
        if count != total[key]:
            total[key] = count
            if count:
                self._unanswered.discard(key)
            self._version += 1

    def _on_deliver(self, e: dict) -> None:
        msg = e.get("msg") or {}
        self.deliveries += not e.get("redelivered") and msg.get("type") in WORKLOAD_TYPES
        if msg.get("type") == "ConversionMessage":
            key = object_key(msg.get("scan"), msg.get("object"))
            where = (e.get("queue"), key)
            if where not in self._first_taken or e["t"] < self._first_taken[where]:
                self._first_taken[where] = e["t"]
                self._version += e.get("queue") in self._deletion_faults or e.get("queue") in self._ps_deleted
            if str(e.get("queue")).startswith(PER_SCAN_PREFIX):
                self._ps_deliveries.setdefault(e.get("queue"), []).append((e["t"], e.get("stage"), key))
                self._version += e.get("queue") in self._ps_deleted
            if e.get("redelivered"):
                self.redelivered.add(key)
        elif msg.get("type") == "ScanSpecMessage" and e.get("redelivered"):
            self.redelivered.add((msg.get("scan"), None))

    def _on_fault(self, e: dict) -> None:
        if e.get("kind") == "restart_broker":
            bisect.insort(self._restarts, e["t"])
        if _deletes_queue(e.get("kind")):
            queue = e.get("target")
            self._deletion_faults[queue] = min(e["t"], self._deletion_faults.get(queue, e["t"]))
            self._version += 1

    def _on_consumer_deleted(self, e: dict) -> None:
        queue = e.get("queue")
        if str(queue).startswith(PER_SCAN_PREFIX):
            self._ps_cancels.setdefault((queue, e.get("stage")), []).append(e["t"])
            self._version += queue in self._ps_deleted

    def _on_ps_delete(self, e: dict) -> None:
        if e.get("reason") in ("fault", "abort"):
            queue = e.get("queue")
            self._ps_deleted[queue] = min(e["t"], self._ps_deleted.get(queue, e["t"]))
            self._version += 1

    def _on_queue_deleted(self, e: dict) -> None:
        self._deleted_seen.setdefault(e.get("queue"), []).append(e["t"])
        self._version += 1

    def _on_phase(self, e: dict) -> None:
        if e.get("name") == "scan_aborted":
            self.aborted.add(e.get("scan"))
            self._version += 1
        elif e.get("name") == "publish_resumed":  # the harness sent these scans' messages again
            self.redelivered.update((scan, None) for scan in e.get("scans") or ())
        elif e.get("name") == "observer_reconnected":
            bisect.insort(self._reconnects, e["t"])
            for kind, reads in self._reads.items():  # a late reconnect splits reads counted before
                for key in list(reads):
                    self._settle(kind, key)

    # -- the answers -----------------------------------------------------------
    def answered(self, key: Key) -> bool:
        return bool(self.results.get(key) or self.problems.get(key))

    @property
    def source(self) -> str:
        """Which witnesses saw the output queues' traffic, for the report."""
        names = {"published": "published", "read": "read from output queues"}
        return " and ".join(names[w] for w in ("published", "read") if w in self._witnesses) or "none"

    def deleted_at(self) -> dict[str, float]:
        """Queue -> when a deletion fault deleted it: the broker's queue_deleted, else the fault."""
        out = {}
        for queue, fault_t in self._deletion_faults.items():
            seen = [t for t in self._deleted_seen.get(queue, ()) if t >= fault_t - DELETED_BEFORE_FAULT]
            out[queue] = min(seen) if seen else fault_t
        return out

    @property
    def gone(self) -> set[Key]:
        """Objects whose conversion was still in a queue when a deletion fault deleted it, and the
        objects of a scan whose per-scan queue a fault deleted that were not taken from it before."""
        deleted = self.deleted_at()
        if not deleted and not self._ps_deleted:
            return set()
        taken = {key for (queue, key), t in self._first_taken.items() if queue in deleted and t < deleted[queue]}
        published = set().union(*(self._published_to.get(queue, set()) for queue in deleted))
        return (published - taken) | self._gone_with_scan_queues()

    def _gone_with_scan_queues(self) -> set[Key]:
        deleted = self._ps_deleted
        if not deleted:
            return set()
        kept = set().union(*(self._kept_from(queue, t) for queue, t in deleted.items()))
        owned = {key for key in self.expected if self._scan_queue.get(key[0]) in deleted}
        published = set().union(*(self._published_to.get(queue, set()) for queue in deleted))
        return (owned | published) - kept

    def _kept_from(self, queue: str, deleted_at: float) -> set[Key]:
        """Objects a stage still held when the admin deleted ``queue``: delivered last before the
        deletion to a stage that did not cancel its consumer on the queue since."""
        last: dict[Key, tuple[float, Any]] = {}
        for t, stage, key in self._ps_deliveries.get(queue, ()):
            if t < deleted_at and (key not in last or t > last[key][0]):
                last[key] = (t, stage)
        return {key for key, (t, stage) in last.items()
                if not any(t - CANCEL_SKEW < c < deleted_at for c in self._ps_cancels.get((queue, stage), ()))}

    def owed_in(self, scans: Iterable[str]) -> int:
        """Objects of these scans still owed (the admin deletes a per-scan queue at 0)."""
        wanted = set(scans)
        pool = self._owed() if (self.aborted or self._deletion_faults or self._ps_deleted or self.unroutable) \
            else self._unanswered
        return sum(1 for key in pool if key[0] in wanted)

    def published_into(self, queue: str, scans: Iterable[str]) -> bool:
        """Every expected object of these scans has had its conversion published into ``queue``."""
        wanted, published = set(scans), self._published_to.get(queue, set())
        return all(key in published for key in self.expected if key[0] in wanted)

    def _owed(self) -> set[Key]:
        if self._cache is None or self._cache[0] != self._version:
            excusing = self._deletion_faults or self._ps_deleted or self.unroutable
            excused = self.gone | self.unroutable if excusing else set()
            owed = {k for k in self._unanswered if k not in excused and k[0] not in self.aborted}
            self._cache = (self._version, owed)
        return self._cache[1]

    def owed(self) -> int:
        """Objects still owed a result (the runner waits for 0)."""
        if not (self.aborted or self._deletion_faults or self._ps_deleted or self.unroutable):
            return len(self._unanswered)  # nothing excused: no set to build on the runner's loop
        return len(self._owed())

    def answered_count(self) -> int:
        """Expected objects with a result or a problem."""
        return len(self.expected) - len(self._unanswered)

    @property
    def lost(self) -> list[Key]:
        """What is owed once the run is over."""
        return sorted(self._owed())

    @property
    def dropped_by_fault(self) -> list[Key]:
        return sorted(k for k in self.gone if not self.answered(k))

    @property
    def dropped_unroutable(self) -> list[Key]:
        return sorted(k for k in self.unroutable if not self.answered(k))

    @property
    def duplicated(self) -> dict[Key, int]:
        return {k: n for k, n in sorted(self.results.items()) if n > 1}

    def after_redelivery(self, key: Key) -> bool:
        """A duplicate a redelivery explains: its conversion, or its scan's spec, was delivered again
        (or the harness published the scan's messages again after a planned broker restart), or its
        results came before and after a broker restart (a stage's ack can die with the node, and a
        crashed node's redeliveries carry no redelivered flag)."""
        if key in self.redelivered or (key[0], None) in self.redelivered:
            return True
        times = self._answer_times.get(key, ())
        return any(min(times) < r < max(times) for r in self._restarts) if times else False

    @property
    def unexpected(self) -> list[Key]:
        return sorted(k for k in self.results if k not in self.expected)

    @property
    def as_problem(self) -> list[Key]:
        return sorted(k for k in self.expected if not self.results.get(k) and self.problems.get(k))


class LiveLedger:
    """A ledger fed as the history is written (a ``HistoryWriter`` listener: events are folded in
    the order they are appended, under the writer's lock) and read from the runner's thread."""

    def __init__(self) -> None:
        self._ledger = Ledger()
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self._lock:
            self._ledger.add(event)

    def progress(self) -> tuple[int, int]:
        """(objects answered, objects still owed)."""
        with self._lock:
            return self._ledger.answered_count(), self._ledger.owed()

    def activity(self) -> tuple[int, int, int]:
        """Changes whenever the engine does something new: a first delivery of work to a stage, a result
        (a message requeued and handed out again and again is no progress, nor are commands)."""
        with self._lock:
            return self._ledger.deliveries, self._ledger.answered_count(), self._ledger.owed()

    def harness_publishes(self) -> int:
        with self._lock:
            return self._ledger.harness_publishes

    def scan_state(self, scans: Iterable[str], queue: str | None = None) -> str:
        """'aborted' when the admin aborted one of these scans, 'owed' while an object of them is
        owed, 'untraced' while the tracer has not yet seen every object's conversion published into
        ``queue``, else 'answered' (what the admin reads to delete a per-scan queue)."""
        scans = list(scans)
        with self._lock:
            if any(scan in self._ledger.aborted for scan in scans):
                return "aborted"
            if self._ledger.owed_in(scans):
                return "owed"
            if queue is not None and not self._ledger.published_into(queue, scans):
                return "untraced"
            return "answered"
