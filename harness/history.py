"""The history: an append-only list of typed, timestamped events.

The observer, the stage launcher and the workload write it; the checkers
read it. On disk it is JSON Lines (``history.jsonl``), one event per line,
so that a failed run can be re-checked offline
(``python -m harness check history.jsonl --scenario s.yaml``).

Every event is a dict with at least ``t`` (seconds since the epoch, on the
harness's clock) and ``type`` (one of ``EVENT_TYPES``). The fields of each
type are documented in ``EVENT_TYPES`` and in docs/history.md; bump
``HISTORY_VERSION`` when a field changes meaning.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

HISTORY_VERSION = 1

# type -> {field: meaning}. The single source for docs/history.md.
EVENT_TYPES: dict[str, dict[str, str]] = {
    "run_started": {
        "version": "HISTORY_VERSION of the writer",
        "scenario": "scenario name",
        "vhost": "the test's vhost",
        "seed": "workload seed",
        "check_period": "the check period the run was judged with (s)",
        "tolerance": "the window tolerance (s); W = check_period + tolerance",
        "grace": "the start-up grace G (s)",
        "default_queue_type": "the vhost's default queue type (the scenario's broker.default_queue_type): the type "
                              "of every queue declared without x-queue-type; absent in histories before it",
        "window_sources": "where each of check_period, tolerance and grace came from: 'command line --check-period' "
                          "(and the like), an ini file's engine profile, the scenario's checks, or 'SPEC default'",
        "sample_interval": "seconds between two of the observer's samples",
        "max_sample_gap": "samples further apart than this (s) do not bridge a run of one queue state",
        "switch_slack": "a cancel up to this long (s) after the last sample that saw a higher queue non-empty is "
                        "still a switch (the queue may have emptied just after it)",
        "create_slack": "a queue created up to this long (s) after a publish still existed for it (queue events "
                        "and the firehose arrive on two subscriptions)",
    },
    "run_finished": {"reason": "why the run ended: 'complete', 'stalled' (work owed, nothing left to do, no delivery "
                               "or result for several W), 'time_limit', 'stage_exited', 'stage_silent', "
                               "'broker_gone', 'error'"},
    "stage_started": {
        "stage": "stage instance name, e.g. 'worker' or 'worker#2' for replicas",
        "role": "the scenario's stage name (shared by replicas)",
        "kind": "'explorer' or 'worker'",
        "pid": "OS process id",
        "queue_priority": "list of queue names, duplicates removed; [] = feature off",
        "read_queues": "queues the stage is expected to read (QUEUE_PRIORITY or default)",
        "command": "the command line it was started with",
        "log": "path of its captured output",
        "supervisor_restart": "n when the restart policy started it again for the n-th time, 0 for the harness's "
                              "own starts (a kill_stage restart included)",
        "conversion_priority": "list of tags of its CONVERSION_PRIORITY (workers; per-scan queues), first = "
                               "highest; [] = unset or empty: no filter, no per-scan priority",

        "broker_user": "the broker user the instance logs in as (its own, made for this test's vhost): the "
                       "observer attributes its connections by it",
    },
    "stage_exited": {"stage": "stage instance", "pid": "OS pid", "returncode": "exit code, negative = signal",
                     "expected": "true when the harness stopped or killed it on purpose",
                     "supervisor": "under a restart policy: 'restarting' (a stage_started with supervisor_restart "
                                   "follows after the backoff) or 'gave_up' (past its limit: the run ends); null when "
                                   "no policy applies to this exit"},
    "connection_created": {
        "conn": "broker's connection pid (string)",
        "name": "'127.0.0.1:PORT -> 127.0.0.1:PORT'",
        "peer_port": "client's local TCP port",
        "stage": "stage instance owning it, 'harness' for the harness's own, or null",
        "broker_ms": "the broker's timestamp_in_ms (on every event-exchange event)",
    },
    "connection_closed": {"conn": "broker's connection pid", "name": "connection name", "stage": "owner or null",
                          "cause": "null when the broker announced the close; 'broker_down' when a "
                                   "restart_broker fault killed the node, which announces none; 'node_down' when a kill_node "
                          "fault killed the cluster node it was connected to"},
    "channel_created": {"chan": "broker's channel pid", "conn": "connection pid", "stage": "owner or null",
                        "number": "channel number on its connection"},
    "channel_closed": {"chan": "broker's channel pid", "stage": "owner or null"},
    "queue_created": {"queue": "name", "durable": "bool", "auto_delete": "bool", "exclusive": "bool",
                      "arguments": "declare arguments"},
    "queue_deleted": {"queue": "name"},
    "consumer_created": {
        "stage": "owner stage instance or null",
        "queue": "queue consumed",
        "tag": "consumer tag",
        "chan": "broker's channel pid",
        "prefetch": "prefetch_count",
        "ack_required": "bool",
    },
    "consumer_deleted": {"stage": "owner or null", "queue": "queue", "tag": "consumer tag", "chan": "channel pid"},
    "sample": {"ready": "{queue: ready count, or null when the queue does not exist}",
               "firehose_backlog": "messages waiting in the observer's trace queue; > 0 means firehose times are late"},
    "publish": {
        "exchange": "exchange name ('' = default)",
        "routing_key": "routing key",
        "stage": "publishing stage instance, 'harness' or null",
        "routed": "the tracer's routed_queues (names the routing key even when no such queue exists)",
        "conn": "publishing connection name",
        "msg": "message summary (see harness.messages.summarise)",
    },
    "deliver": {
        "queue": "queue delivered from",
        "stage": "receiving stage instance or null",
        "redelivered": "bool",
        "conn": "receiving connection name",
        "msg": "message summary",
    },
    "output": {"queue": "engine output queue the observer read", "msg": "message summary",
               "redelivered": "true when the broker delivered it again (the observer had not acked it before "
                              "a broker restart): it may have been recorded already"},
    "scan_planned": {
        "scan": "scan id (harness.messages.scan_id)",
        "client": "client name",
        "org": "organisation uuid",
        "mode": "'full' or 'delta'",
        "explorer_queue": "queue the spec is published to",
        "conversion_queue": "queue its conversions must go to",
        "objects": "relative paths of the objects the scan must produce a result for",
        "via": "'explorer' (a ScanSpecMessage) or 'conversions' (ConversionMessages published directly)",
        "per_scan": "the tag ('delta', 'full' or a forced one) when the scan is routed through a per-scan queue "
                    "of its own (then conversion_queue names it), else null",
    },
    "ps_announce": {"queue": "the per-scan queue announced (a new_queue command)", "tag": "its new_queue_priority",
                    "scan": "scan id, or null for a queue the harness announces on its own (a fault)",
                    "reason": "'scan_start', 'rebroadcast' (every R s), 'hello_reply' or 'fault'",
                    "to": "'broadcast' (the broadcast exchange), or the command queue of the worker answered"},
    "ps_delete": {"queue": "the per-scan queue the admin deletes: a delete_queue command on broadcast, then "
                           "queue.delete (the observer's queue_deleted follows)",
                  "scan": "scan id or null", "reason": "'scan_end' (every object answered), 'abort' or 'fault'",
                  "ready": "its last sampled ready count (messages the delete discards), or null"},
    "hello": {"command_queue": "the command queue a worker_hello named (the stage consuming it is the worker: "
                               "see consumer_created)",
              "stage": "the stage owning that queue when the admin knew it at once, else null",
              "answered": "the queues the admin's reply announced to it, in order (ps_announce events follow)"},
    "fault": {"kind": "fault kind", "target": "stage, queue or client", "detail": "which fault of the scenario",
              "params": "the fault's parameters", "name": "the fault's name in the scenario, or null"},
    "hold": {"phase": "'workload.N'", "name": "the phase's name or null", "state": "'started' or 'ended'",
             "queue": "the queue kept filled", "depth": "the ready count it is kept at or above",
             "seconds": "(started) how long it is held",
             "published": "(ended) messages published by the hold", "top_ups": "(ended) publishes it took",
             "shortfalls": "(ended) samples that found the queue below depth (the engine outran a top-up)",
             "final_target": "(ended) the level the hold aimed at last",
             "rate": "(ended) the fastest consumption of the queue it measured (messages/s)",
             "discarded": "(ended) its messages that belonged to an aborted scan (their drop is not counted as consumption)",
             "stopped_early": "(ended) why it ended before its time, or null"},
    "calibration": {"stage": "the stage measured before a drain (one instance, on a vhost of its own)",
                    "queue": "the queue it consumed", "rate": "messages per second, one instance",
                    "messages": "messages the measurement spans", "seconds": "how long they took",
                    "phase": "'workload.N', the backlog sized from it", "lasting": "how long that backlog "
                    "should last (s)", "sized": "objects (scan specs, via explorer) the backlog got"},
    "phase": {"name": "a marker: 'stages_ready', 'workload.N', 'flood_done', 'teardown', 'observer_reconnected', 'publish_resumed' (resent, scans: the harness sent again what a planned broker restart left unconfirmed), ..."},
}


class HistoryError(ValueError):
    """A history file that cannot be read: names the file, line and reason."""


def make_event(type_: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown history event type {type_!r}")
    return {"t": time.time() if t is None else t, "type": type_, **fields}


class HistoryWriter:
    """Thread-safe JSONL writer; also keeps the events in memory for the checkers.

    Listeners (``listen``) see every event as it is appended, in the order of the list, under the
    writer's lock: a fold kept by a listener (the runner's ledger) never misses or reorders one.
    A listener must be quick and must not record events itself."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._file = open(path, "w", encoding="utf-8") if path else None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` for every event recorded from now on."""
        with self._lock:
            self._listeners.append(listener)

    def record(self, type_: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
        event = make_event(type_, t, **fields)
        line = json.dumps(event, separators=(",", ":"), default=str)
        with self._lock:
            self.events.append(event)
            if self._file:
                self._file.write(line + "\n")
            for listener in self._listeners:
                listener(event)
        return event

    def flush(self) -> None:
        with self._lock:
            if self._file:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file:
                self._file.close()
                self._file = None

    def history(self) -> "History":
        with self._lock:
            return History(list(self.events))


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HistoryError(f"{path}:{number}: not JSON: {exc.msg}") from None
            if not isinstance(event, dict) or "t" not in event or "type" not in event:
                raise HistoryError(f"{path}:{number}: an event needs 't' and 'type'")
            yield event


@dataclass
class History:
    """Events sorted by time, with the lookups every checker needs."""

    events: list[dict[str, Any]]
    by_type: dict[str, list[dict[str, Any]]] = field(init=False)

    def __post_init__(self) -> None:
        self.events.sort(key=lambda e: e["t"])  # stable: keeps write order for ties
        self.by_type = {}
        for event in self.events:
            self.by_type.setdefault(event["type"], []).append(event)

    @classmethod
    def load(cls, path: Path) -> "History":
        return cls(list(read_events(Path(path))))

    def of(self, *types: str) -> list[dict[str, Any]]:
        if len(types) == 1:
            return self.by_type.get(types[0], [])
        return [e for e in self.events if e["type"] in types]

    @property
    def start(self) -> float:
        return self.events[0]["t"] if self.events else 0.0

    @property
    def end(self) -> float:
        return self.events[-1]["t"] if self.events else 0.0

    def stages(self) -> list[dict[str, Any]]:
        return self.of("stage_started")

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.events)


def write_events(path: Path, events: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")


def markdown_table() -> str:
    """The event table of docs/history.md, generated from EVENT_TYPES."""
    rows = ["| event type | field | meaning |", "|---|---|---|"]
    for type_, fields in EVENT_TYPES.items():
        rows.append(f"| `{type_}` | `t` | seconds since the epoch, harness clock |")
        rows += [f"| | `{name}` | {meaning} |" for name, meaning in fields.items()]
    return "\n".join(rows) + "\n"
