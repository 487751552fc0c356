"""The fault registry: every fault the suite knows, once.

Three kinds, one table each:

- ``HARNESS_FAULTS``: what a scenario's ``faults:`` may ask the harness to do to a running
  engine (the nemesis carries them out, one ``Nemesis._<kind>`` method each): what its target
  names and which parameters it takes.
- ``ENGINE_FAULTS``: the reference engine's bugs, switched on on purpose with
  ``REFERENCE_ENGINE_FAULTS=name[,name...]``. Each names the clauses it must break, those it may
  break as a side effect, and the scenario under ``suites/clause_scenarios`` that exposes it.
- ``CONFIG_FAULTS``: mistakes in a scenario's configuration (the CF-* clauses are static, so no
  engine behaviour can break them): a mutation of a clean scenario and the clauses that catch it.

Scenario validation, the reference engine's ``REFERENCE_ENGINE_FAULTS`` check, the fault matrix
(tests/test_fault_matrix.py) and the docs read these tables. ``python -m harness faults`` prints
them (``--markdown`` for the docs table of engine faults).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

# -- harness faults -------------------------------------------------------------------------
POISON_SHAPES = ("not_json", "missing_fields")
BAD_COMMAND_SHAPES = ("empty", "not_json", "not_a_command", "no_abort", "bad_hello")
# What bad_command sends without a shape: one of each shape an engine before 3.32 also met.
DEFAULT_BAD_COMMANDS = ("empty", "not_json", "not_a_command")

# Parameter types: 'bool', 'seconds' (> 0), 'count' (whole number >= 1), 'tag' (a per-scan tag: one word
# of letters, digits, '_' or '-'), or a tuple of choices.
ParamType = str | tuple[str, ...]


@dataclass(frozen=True)
class HarnessFault:
    kind: str
    target: str | None  # what ``target:`` names: 'queue', 'stage', 'client', 'phase', or None for no target
    description: str
    params: dict[str, ParamType] = field(default_factory=dict)


HARNESS_FAULTS: dict[str, HarnessFault] = {f.kind: f for f in [
    HarnessFault("delete_queue", "queue", "delete the queue (as an admin or a broker policy would)"),
    HarnessFault("close_connection", "stage", "close the stage's connections from the broker's side"),
    HarnessFault("kill_stage", "stage", "SIGKILL the stage (restart: true starts it again at once)",
                 {"restart": "bool"}),
    HarnessFault("restart_broker", None, "stop the broker node (on a local cluster: every node) and start it "
                 "again after `seconds`",
                 {"seconds": "seconds"}),
    # A RabbitMQ cluster (--rabbitmq-nodes N): the node a stage instance is connected to.
    HarnessFault("kill_node", "stage", "SIGKILL the cluster node the stage (instance) connects to; with `seconds`, "
                 "start it again after that long (it rejoins); never the first node, which the observer uses",
                 {"seconds": "seconds"}),
    HarnessFault("restart_node", "stage", "stop RabbitMQ on the cluster node the stage (instance) connects to "
                 "(rabbitmqctl stop_app: its clients are told the node shuts down) and start it after `seconds` "
                 "(default 3), as a rolling restart does; never the first node", {"seconds": "seconds"}),
    HarnessFault("pause_stage", "stage", "SIGSTOP the stage for `seconds`, then SIGCONT", {"seconds": "seconds"}),
    HarnessFault("poison", "queue", "publish `count` messages no stage can parse, of `shape`",
                 {"shape": POISON_SHAPES, "count": "count"}),
    # Not a fault of the engine: the admin aborts the client's latest scan through the
    # broadcast exchange, so that command handling (RT-BROADCAST) is exercised.
    HarnessFault("abort_scan", "client", "the admin aborts the client's latest scan (a command on broadcast)"),
    HarnessFault("bad_command", None, "publish malformed messages on the broadcast exchange: `count` of "
                 "each `shape` (default: empty, not_json and not_a_command; no_abort is a 3.32 new_queue without "
                 "'abort', bad_hello a worker_hello naming no queue)", {"shape": BAD_COMMAND_SHAPES, "count": "count"}),
    # The admin's part in OS2datascanner 3.32 (per-scan queues), played wrong or at a bad moment on purpose.
    HarnessFault("delete_scan_queue", "phase", "the admin deletes the phase's (first live) per-scan queue as at "
                 "a scan's end: delete_queue on broadcast, then queue.delete (its messages are discarded)"),
    HarnessFault("stale_hello_reply", None, "from now on the admin's reply to a worker_hello starts with a "
                 "queue that no longer exists, then the live ones (make a worker say hello: close_connection)"),
    HarnessFault("short_scan", None, "the admin announces a new per-scan queue tagged `tag` (default full) "
                 "and deletes it at once", {"tag": "tag"}),
]}


def param_problem(kind: str, key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``params.<key>`` of a ``kind`` fault, or None."""
    wanted = HARNESS_FAULTS[kind].params.get(key)
    if wanted is None:
        known = ", ".join(HARNESS_FAULTS[kind].params) or "none"
        return f"unknown parameter for {kind} (known: {known})"
    if isinstance(wanted, tuple):
        return None if value in wanted else f"must be one of {', '.join(wanted)}"
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if wanted == "bool" and not isinstance(value, bool):
        return "must be true or false"
    if wanted == "seconds" and not (number and value > 0):
        return "must be a number of seconds > 0"
    if wanted == "count" and not (number and isinstance(value, int) and value >= 1):
        return "must be a whole number >= 1"
    if wanted == "tag" and not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", value)):
        return "must be a tag: one word of letters, digits, '_' or '-'"
    return None


# -- reference-engine faults ----------------------------------------------------------------
@dataclass(frozen=True)
class EngineFault:
    name: str
    clauses: tuple[str, ...]  # each must fail when the fault is on
    scenario: str  # the scenario (stem under suites/clause_scenarios) that exposes it
    description: str
    stages: tuple[str, ...] = ("explorer", "worker")
    may_also: tuple[str, ...] = ()  # clauses it can break as a side effect in its scenario


ENGINE_FAULTS: dict[str, EngineFault] = {f.name: f for f in [
    EngineFault("slow_check", ("QP-CANCEL-WINDOW", "QP-PRECEDENCE"), "burst",
                "The stage re-evaluates a lower consumer it holds only every 6 x PRIORITY_CHECK_SECONDS "
                "+ 2 s (32 s with the default 5 s): cancels and moves down come that late. A stage with "
                "no lower consumer still picks one up at the normal period.",
                may_also=("QP-PROGRESS", "QP-DRAIN-ORDER")),
    EngineFault("two_lower", ("QP-ONE-LOWER",), "stuck",
                "When moving down to the next lower queue, the consumer of the emptied lower queue "
                "is not cancelled; it is only cancelled at the next upward switch."),
    EngineFault("cancel_first", ("QP-FIRST-PINNED",), "burst",
                "Every switch of the lower consumer also cancels the consumer of the first queue "
                "and starts it again."),
    EngineFault("consume_all_at_start", ("QP-ONE-LOWER", "QP-PRECEDENCE", "QP-DRAIN-ORDER"), "drain",
                "At start-up (and after a reconnect) every QUEUE_PRIORITY queue is consumed, and the "
                "first priority check only runs after 8 check periods + 2 s.",
                may_also=("QP-CANCEL-WINDOW",)),
    EngineFault("no_move_down", ("QP-PROGRESS",), "stuck",
                "Once a lower queue is consumed the stage stays on it when it empties, instead of "
                "moving down to the next non-empty lower queue (it still moves up).",
                # The stranded work never gets a result before the time limit.
                may_also=("DL-EXACTLY-ONCE",)),
    EngineFault("reverse_priority", ("QP-PRECEDENCE", "QP-DRAIN-ORDER"), "drain",
                "The lower queues are ranked in reverse order (the last one in QUEUE_PRIORITY is "
                "preferred); the first queue stays first.",
                may_also=("QP-CANCEL-WINDOW", "QP-PROGRESS")),
    EngineFault("get_ahead", ("QP-DRAIN-ORDER",), "drain",
                "At every check the stage also fetches one message with basic.get from the next "
                "non-empty queue below the one it should be serving (a 'cache warm-up'); "
                "no consumer is involved.",
                may_also=("QP-PRECEDENCE",)),
    EngineFault("no_declare", ("QP-DECLARE",), "tenants",
                "The QUEUE_PRIORITY queues are not declared; the stage only consumes the ones that "
                "somebody else created.",
                may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "RT-ROUTABLE", "DL-EXACTLY-ONCE")),
    EngineFault("ignore_conversion_queue", ("RT-TENANT",), "tenants",
                "The explorer publishes every conversion to os2ds_conversions, ignoring the scan "
                "spec's conversion_queue.", stages=("explorer",),
                may_also=("DL-EXACTLY-ONCE",)),
    EngineFault("status_into_conversions", ("RT-ONE-TYPE",), "tenants",
                "The explorer publishes its StatusMessage into the spec's conversion queue instead "
                "of os2ds_status.", stages=("explorer",)),
    EngineFault("command_via_queue", ("RT-BROADCAST",), "broadcast",
                "The explorer relays every command it receives to the workers through "
                "os2ds_conversions instead of leaving it to the broadcast exchange.",
                stages=("explorer",), may_also=("RT-ONE-TYPE",)),
    EngineFault("typo_output_queue", ("RT-ROUTABLE",), "tenants",
                "The worker publishes its MetadataMessages to 'os2ds_meta_data', a queue nobody "
                "declares (dropped by the broker as unroutable).", stages=("worker",)),
    EngineFault("ack_on_cancel", ("DL-EXACTLY-ONCE",), "burst",
                "When a lower consumer is cancelled, the messages it had prefetched are acked "
                "without being processed (lost) instead of being returned to their queue."),
    EngineFault("dup_on_cancel", ("DL-EXACTLY-ONCE",), "burst",
                "When a lower consumer is cancelled, the messages it had prefetched are handled (their "
                "results published) and ALSO returned to their queue, so they are handled again later "
                "(duplicated results)."),
    EngineFault("dup_after_reconnect", ("DL-EXACTLY-ONCE",), "reconnect",
                "After a reconnect the outputs of the last 5 messages handled (and acked) before the "
                "connection was lost are published again: duplicate results no redelivery explains."),
    EngineFault("crash_on_poison", ("FT-POISON",), "poison",
                "A message that cannot be parsed crashes the stage (exit code 3); it goes back to "
                "its queue unacked.", may_also=("QP-PROGRESS", "DL-EXACTLY-ONCE")),
    EngineFault("requeue_poison", ("FT-POISON",), "poison",
                "A message that cannot be parsed is rejected WITH requeue and no problem is "
                "reported, so it is redelivered forever.",
                # The loop takes a prefetch slot from real work: a queue kept filled is not finished in time.
                may_also=("QP-PROGRESS", "DL-EXACTLY-ONCE")),
    EngineFault("die_on_queue_gone", ("FT-QUEUE-GONE",), "queue_gone",
                "When one of its queues disappears (consumer cancelled by the broker, or a passive "
                "declare answers 404) the stage exits with code 4.",
                may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "DL-EXACTLY-ONCE")),
    EngineFault("no_reconnect", ("FT-RECONNECT",), "reconnect",
                "When the broker closes the connection the stage exits with code 5 instead of "
                "reconnecting.", may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "DL-EXACTLY-ONCE")),
    EngineFault("crash_on_bad_command", ("FT-BAD-COMMAND",), "bad_command",
                "A message on the broadcast exchange that is not a command (empty, not JSON, or JSON "
                "without a command's fields) crashes the stage (exit code 6) instead of being ignored.",
                # With every stage gone, the abort that follows reaches no queue (RT-ROUTABLE).
                may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "RT-ROUTABLE", "DL-EXACTLY-ONCE")),
    # Per-scan queues (OS2datascanner 3.32): the worker's side of new_queue, delete_queue and hello.
    EngineFault("wedge_on_deleted_paused_queue", ("PS-DELETE", "PS-PROGRESS"), "per_scan/delete_paused",
                "OS2datascanner 3.32.4's first reported bug. delete_queue is acted on only for a queue the "
                "worker consumes; a queue paused by per-scan priority stays known, and the next check reads "
                "its depth on the consuming channel: the 404 closes that channel, which the worker takes for "
                "'queue gone' and keeps. It then consumes nothing at all, for good, without exiting.",
                stages=("worker",),
                # The dead channel held every consumer, the command queue's and the QUEUE_PRIORITY ones
                # too: later announcements go unheard and work left in any queue gets no result in time.
                may_also=("PS-SUBSCRIBE", "QP-FIRST-PINNED", "QP-PROGRESS", "DL-EXACTLY-ONCE")),
    EngineFault("reconnect_on_missing_hello_queue", ("PS-HELLO",), "per_scan/hello_stale",
                "OS2datascanner 3.32.4's second reported bug. The passive declare of a queue named in a "
                "hello reply runs on the consuming channel: a reply naming a queue that no longer exists "
                "closes it, the worker reconnects (4 times a second) and says hello again, and the "
                "announcements listed after the missing queue are lost with the old command queue.",
                # Each reconnect drops every consumer (the QUEUE_PRIORITY ones too) and returns the
                # prefetched messages, which are then delivered again; a storm set off by a deleted queue
                # leaves the worker consuming nothing after that deletion (PS-DELETE).
                stages=("worker",), may_also=("PS-PROGRESS", "PS-SUBSCRIBE", "PS-DELETE", "QP-FIRST-PINNED",
                                              "QP-PROGRESS", "FT-RECONNECT", "DL-EXACTLY-ONCE")),
    EngineFault("delivery_count_priority", ("PS-PRECEDENCE",), "per_scan/precedence",
                "OS2datascanner 3.32's own depth-blind per-scan priority: at each check the worker keeps only "
                "the queues of the highest tag that had deliveries in the last window, and with no deliveries "
                "consumes every allowed queue. Deliveries are counted for the queues consumed when the window "
                "began, so a queue subscribed on its announcement counts none and is paused at the next check; "
                "a paused queue has no deliveries, so a higher tag waits for as long as a lower one delivers, "
                "and comes back only after a window with no deliveries at all (it flaps).",
                stages=("worker",), may_also=("PS-PROGRESS",)),
    EngineFault("subscribe_every_tag", ("PS-FILTER",), "per_scan/unallowed_tag",
                "CONVERSION_PRIORITY ranks the tags but does not filter them: the worker subscribes to every "
                "announced per-scan queue at once; at its checks a tag it does not list ranks below every "
                "listed one.",
                stages=("worker",)),
    EngineFault("redeclare_deleted_queue", ("PS-DELETE",), "per_scan/delete_paused",
                "The worker declares announced queues with a plain (not passive) declare, on new_queue, on "
                "hello replies and at every check to read their depth, and ignores delete_queue (it waits for "
                "the broker to cancel its consumer, and then tries again): a deleted per-scan queue is "
                "created again within one check period.", stages=("worker",)),
    # FT-BAD-COMMAND judges a stage's deliveries as a whole, and this worker keeps receiving from its static
    # queue; what shows is the per-scan work it leaves waiting (PS-PROGRESS).
    EngineFault("wedge_on_empty_broadcast", ("PS-PROGRESS",), "per_scan/bad_command",
                "An empty message on the broadcast exchange kills the command consumer, which nobody "
                "restarts (not even after a reconnect), and with it the worker's per-scan handling: its "
                "per-scan consumers are cancelled, and later commands (abort, new_queue, delete_queue) are "
                "never acted on. The stage does not exit and keeps serving its QUEUE_PRIORITY queues.",
                # The per-scan queues it served, and any announced later, are left with their work.
                may_also=("PS-SUBSCRIBE", "FT-BAD-COMMAND", "DL-EXACTLY-ONCE")),
    EngineFault("debounce_new_queue", ("PS-SUBSCRIBE",), "per_scan/subscribe",
                "The worker lets an announcement 'settle' before acting on it (to dodge scans that end at "
                "once): a newly announced per-scan queue, broadcast or in a hello reply, is taken only at "
                "the 4th check after its announcement (3 to 4 check periods, more than W).",
                # Work in the new queue waits meanwhile.
                stages=("worker",), may_also=("PS-PROGRESS",)),
]}


# -- configuration faults -------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigFault:
    name: str
    clauses: tuple[str, ...]
    scenario: str
    mutate: Callable[[dict], None]  # changes the scenario file's parsed YAML in place


def _unread_client_queue(data: dict) -> None:
    data["clients"][0]["conversion_delta_queue"] = "conversions_delta_nobody_reads"


def _duplicate_priority(data: dict) -> None:
    worker = next(s for s in data["stages"] if s["kind"] == "worker")
    worker["queue_priority"] += " " + worker["queue_priority"].split()[1]


def _queue_of_two_types(data: dict) -> None:
    # The explorer also reads it, so the queue is aligned but carries two types.
    queue = data["clients"][0]["conversion_full_queue"]
    data["clients"][0]["explorer_full_queue"] = queue
    explorer = next(s for s in data["stages"] if s["kind"] == "explorer")
    explorer["queue_priority"] += " " + queue


def _tag_no_worker_allows(data: dict) -> None:
    # Every worker keeps only its first tag, so the scans of the other tag have no worker left.
    for stage in data["stages"]:
        if stage.get("conversion_priority"):
            stage["conversion_priority"] = "full"


CONFIG_FAULTS: dict[str, ConfigFault] = {f.name: f for f in [
    ConfigFault("cfg_unread_client_queue", ("CF-ALIGN",), "tenants", _unread_client_queue),
    ConfigFault("cfg_duplicate_priority", ("CF-NO-DUP",), "stuck", _duplicate_priority),
    ConfigFault("cfg_queue_of_two_types", ("CF-ONE-TYPE",), "tenants", _queue_of_two_types),
    ConfigFault("cfg_tag_no_worker_allows", ("CF-TAGS",), "per_scan/subscribe", _tag_no_worker_allows),
]}


def clauses_tripped() -> set[str]:
    """Every clause some engine or configuration fault must break."""
    return {c for f in [*ENGINE_FAULTS.values(), *CONFIG_FAULTS.values()] for c in f.clauses}


def engine_fault_table() -> str:
    """The docs table of engine faults (docs/reference-engine.md)."""
    lines = ["| fault | stages | must break | may also break | exposed by | what it does |",
             "|---|---|---|---|---|---|"]
    for f in ENGINE_FAULTS.values():
        lines.append(f"| `{f.name}` | {', '.join(f.stages)} | {', '.join(f.clauses)} | "
                     f"{', '.join(f.may_also) or '-'} | {f.scenario} | {f.description} |")
    return "\n".join(lines)


def describe() -> str:
    """All three tables as text, for ``python -m harness faults``."""
    lines = ["harness faults (scenario faults:):"]
    for f in HARNESS_FAULTS.values():
        params = ", ".join(f"{k}: {'|'.join(v) if isinstance(v, tuple) else v}" for k, v in f.params.items())
        target = f"target {f.target}" if f.target else "no target"
        lines.append(f"  {f.kind:<17} {target}; params {params or 'none'}\n  {'':<17} {f.description}")
    lines.append("\nreference-engine faults (REFERENCE_ENGINE_FAULTS=...), with the scenario that exposes each:")
    for e in ENGINE_FAULTS.values():
        extra = f" (may also: {', '.join(e.may_also)})" if e.may_also else ""
        lines.append(f"  {e.name:<24} {', '.join(e.clauses)} in {e.scenario}{extra}\n"
                     f"  {'':<24} [{', '.join(e.stages)}] {e.description}")
    lines.append("\nconfiguration faults (mutations of a scenario, judged by the static lint):")
    lines += [f"  {c.name:<24} {', '.join(c.clauses)} in {c.scenario}" for c in CONFIG_FAULTS.values()]
    return "\n".join(lines)
