"""Faults that can be switched on on purpose: ``REFERENCE_ENGINE_FAULTS=name[,name...]``.

Each fault is a realistic bug a reviewer of a real engine would fear. It is
tied to the SPEC.md clause ids it must break (``clauses``); ``may_also`` lists
clauses it can break as a side effect in some scenarios. The fault matrix uses
this table: every fault must be caught by each clause in ``clauses``.

The CF-* clauses are static checks of a scenario's configuration; no engine
behaviour can break them, so they are tripped by misconfigured scenarios and
have no fault here (see ``STATIC_CLAUSES``).

``python -m reference_engine.faults`` prints the table (``--json`` for JSON,
``--markdown`` for the docs table).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Fault:
    name: str
    clauses: tuple[str, ...]
    description: str
    stages: tuple[str, ...] = ("explorer", "worker")
    may_also: tuple[str, ...] = ()


_ALL = [
    Fault("slow_check", ("QP-CANCEL-WINDOW", "QP-PRECEDENCE"),
          "The stage re-evaluates a lower consumer it holds only every 6 x PRIORITY_CHECK_SECONDS "
          "+ 2 s (32 s with the default 5 s): cancels and moves down come that late. A stage with "
          "no lower consumer still picks one up at the normal period.",
          may_also=("QP-PROGRESS", "QP-DRAIN-ORDER")),
    Fault("two_lower", ("QP-ONE-LOWER",),
          "When moving down to the next lower queue, the consumer of the emptied lower queue "
          "is not cancelled; it is only cancelled at the next upward switch."),
    Fault("cancel_first", ("QP-FIRST-PINNED",),
          "Every switch of the lower consumer also cancels the consumer of the first queue "
          "and starts it again."),
    Fault("consume_all_at_start", ("QP-ONE-LOWER", "QP-PRECEDENCE", "QP-DRAIN-ORDER"),
          "At start-up (and after a reconnect) every QUEUE_PRIORITY queue is consumed, and the "
          "first priority check only runs after 8 check periods + 2 s.",
          may_also=("QP-CANCEL-WINDOW",)),
    Fault("no_move_down", ("QP-PROGRESS",),
          "Once a lower queue is consumed the stage stays on it when it empties, instead of "
          "moving down to the next non-empty lower queue (it still moves up).",
          # The stranded work never gets a result before the time limit.
          may_also=("DL-EXACTLY-ONCE",)),
    Fault("reverse_priority", ("QP-PRECEDENCE", "QP-DRAIN-ORDER"),
          "The lower queues are ranked in reverse order (the last one in QUEUE_PRIORITY is "
          "preferred); the first queue stays first.",
          may_also=("QP-CANCEL-WINDOW", "QP-PROGRESS")),
    Fault("get_ahead", ("QP-DRAIN-ORDER",),
          "At every check the stage also fetches one message with basic.get from the next "
          "non-empty queue below the one it should be serving (a 'cache warm-up'); "
          "no consumer is involved.",
          may_also=("QP-PRECEDENCE",)),
    Fault("no_declare", ("QP-DECLARE",),
          "The QUEUE_PRIORITY queues are not declared; the stage only consumes the ones that "
          "somebody else created.",
          may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "RT-ROUTABLE", "DL-EXACTLY-ONCE")),
    Fault("ignore_conversion_queue", ("RT-TENANT",),
          "The explorer publishes every conversion to os2ds_conversions, ignoring the scan "
          "spec's conversion_queue.", stages=("explorer",),
          may_also=("DL-EXACTLY-ONCE",)),
    Fault("status_into_conversions", ("RT-ONE-TYPE",),
          "The explorer publishes its StatusMessage into the spec's conversion queue instead "
          "of os2ds_status.", stages=("explorer",)),
    Fault("command_via_queue", ("RT-BROADCAST",),
          "The explorer relays every command it receives to the workers through "
          "os2ds_conversions instead of leaving it to the broadcast exchange.",
          stages=("explorer",), may_also=("RT-ONE-TYPE",)),
    Fault("typo_output_queue", ("RT-ROUTABLE",),
          "The worker publishes its MetadataMessages to 'os2ds_meta_data', a queue nobody "
          "declares (dropped by the broker as unroutable).", stages=("worker",)),
    Fault("ack_on_cancel", ("DL-EXACTLY-ONCE",),
          "When a lower consumer is cancelled, the messages it had prefetched are acked "
          "without being processed (lost) instead of being returned to their queue."),
    Fault("dup_on_cancel", ("DL-EXACTLY-ONCE",),
          "When a lower consumer is cancelled, the messages it had prefetched are handled (their "
          "results published) and ALSO returned to their queue, so they are handled again later "
          "(duplicated results)."),
    Fault("dup_after_reconnect", ("DL-EXACTLY-ONCE",),
          "After a reconnect the outputs of the last 5 messages handled (and acked) before the "
          "connection was lost are published again: duplicate results no redelivery explains."),
    Fault("crash_on_poison", ("FT-POISON",),
          "A message that cannot be parsed crashes the stage (exit code 3); it goes back to "
          "its queue unacked.", may_also=("QP-PROGRESS", "DL-EXACTLY-ONCE")),
    Fault("requeue_poison", ("FT-POISON",),
          "A message that cannot be parsed is rejected WITH requeue and no problem is "
          "reported, so it is redelivered forever.",
          # The loop takes a prefetch slot from real work: a queue kept filled is not finished in time.
          may_also=("QP-PROGRESS", "DL-EXACTLY-ONCE")),
    Fault("die_on_queue_gone", ("FT-QUEUE-GONE",),
          "When one of its queues disappears (consumer cancelled by the broker, or a passive "
          "declare answers 404) the stage exits with code 4.",
          may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "DL-EXACTLY-ONCE")),
    Fault("no_reconnect", ("FT-RECONNECT",),
          "When the broker closes the connection the stage exits with code 5 instead of "
          "reconnecting.", may_also=("QP-FIRST-PINNED", "QP-PROGRESS", "DL-EXACTLY-ONCE")),
]

FAULTS: dict[str, Fault] = {f.name: f for f in _ALL}

SPEC_CLAUSES = (
    "QP-DECLARE", "QP-FIRST-PINNED", "QP-ONE-LOWER", "QP-PRECEDENCE", "QP-CANCEL-WINDOW",
    "QP-PROGRESS", "QP-DRAIN-ORDER", "RT-ONE-TYPE", "RT-TENANT", "RT-ROUTABLE", "RT-BROADCAST",
    "DL-EXACTLY-ONCE", "CF-ALIGN", "CF-NO-DUP", "CF-ONE-TYPE", "FT-QUEUE-GONE", "FT-POISON",
    "FT-RECONNECT",
)
# Judged on the scenario's configuration alone; no engine fault can break them.
STATIC_CLAUSES = ("CF-ALIGN", "CF-NO-DUP", "CF-ONE-TYPE")


def parse_faults(value: str | None) -> frozenset[str]:
    """The fault names in ``REFERENCE_ENGINE_FAULTS`` (comma or whitespace separated).

    Raises ValueError naming any unknown fault.
    """
    if not value:
        return frozenset()
    names = [n.strip() for n in value.replace(",", " ").split() if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return frozenset(names)


def clauses_covered() -> set[str]:
    return {c for f in FAULTS.values() for c in f.clauses}


def markdown_table() -> str:
    lines = ["| fault | stages | must break | may also break | what it does |",
             "|---|---|---|---|---|"]
    for f in FAULTS.values():
        lines.append(f"| `{f.name}` | {', '.join(f.stages)} | {', '.join(f.clauses)} | "
                     f"{', '.join(f.may_also) or '-'} | {f.description} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--json" in argv:
        print(json.dumps({n: asdict(f) for n, f in FAULTS.items()}, indent=2))
    elif "--markdown" in argv:
        print(markdown_table())
    else:
        width = max(len(n) for n in FAULTS)
        for f in FAULTS.values():
            extra = f"  (may also: {', '.join(f.may_also)})" if f.may_also else ""
            print(f"{f.name:<{width}}  {', '.join(f.clauses)}{extra}")
            print(f"{'':<{width}}  [{', '.join(f.stages)}] {f.description}")
        missing = [c for c in SPEC_CLAUSES if c not in clauses_covered()]
        print(f"\nclauses with no fault: {', '.join(missing) or 'none'} "
              f"(CF-* are static configuration checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
