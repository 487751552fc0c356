"""CF-*: static lint of a scenario's clients against its stages. No history, no broker."""
from __future__ import annotations

from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause
from harness.messages import DEFAULT_CONVERSION_QUEUE, DEFAULT_EXPLORER_QUEUE

EXPLORER_FIELDS = ("explorer_full_queue", "explorer_delta_queue")
CONVERSION_FIELDS = ("conversion_full_queue", "conversion_delta_queue")
DEFAULT_READ = {"explorer": DEFAULT_EXPLORER_QUEUE, "worker": DEFAULT_CONVERSION_QUEUE}


def readable(stage) -> set[str]:
    """The queues a stage reads: its QUEUE_PRIORITY plus its kind's default queue, which the engine
    always consumes too (ENGINE_CONTRACT.md section 2)."""
    return set(stage.priority) | {DEFAULT_READ[stage.kind]}


@clause("CF-ALIGN", "every client queue is read by a stage of the right kind", static=True)
def check_align(scenario) -> ClauseResult:
    """Rule: every queue named by a client's explorer fields is read by at least one explorer stage,
    every queue named by its conversion fields by at least one worker stage (a stage reads its
    QUEUE_PRIORITY plus its kind's default queue). A scenario with no stage of a kind (e.g. a worker-only
    scenario fed with conversions) does not judge that kind's fields."""
    findings = []
    n = 0
    by_kind = {k: set().union(*[readable(s) for s in scenario.stages if s.kind == k] or [set()])
               for k in ("explorer", "worker")}
    absent = [k for k in ("explorer", "worker") if not any(s.kind == k for s in scenario.stages)]
    for ci, client in enumerate(scenario.clients):
        for kind, fields in (("explorer", EXPLORER_FIELDS), ("worker", CONVERSION_FIELDS)):
            if kind in absent:
                continue  # that half of the pipeline is not part of this scenario
            for f in fields:
                n += 1
                q = getattr(client, f)
                if q not in by_kind[kind]:
                    names = [s.name for s in scenario.stages if s.kind == kind]
                    who = f"any {kind} stage ({', '.join(names)})"
                    findings.append(Finding(
                        "CF-ALIGN",
                        f"Client {client.name}'s {f} is {q}, which is not in the QUEUE_PRIORITY (or default queue) "
                        f"of {who}: its messages would never be consumed.",
                        None, [q], None, None, [{"field": f"clients.{ci}.{f}", "value": q}]))
    text = f"{n} client queue fields checked"
    if absent:
        text += f" (no {' or '.join(absent)} stage: its fields not judged)"
    return ClauseResult("CF-ALIGN", "failed" if findings else ("passed" if n else "not_exercised"), text, findings)


@clause("CF-NO-DUP", "no QUEUE_PRIORITY lists a queue twice", static=True)
def check_no_dup(scenario) -> ClauseResult:
    """Rule: no stage's QUEUE_PRIORITY (as written, before de-duplication) names a queue twice."""
    findings = []
    n = 0
    for si, stage in enumerate(scenario.stages):
        if not stage.queue_priority:
            continue
        n += 1
        seen: set[str] = set()
        for qi, q in enumerate(stage.queue_priority):
            if q in seen:
                findings.append(Finding(
                    "CF-NO-DUP",
                    f"Stage {stage.name}'s QUEUE_PRIORITY lists {q} twice "
                    f"({' '.join(stage.queue_priority)}); the engine keeps only the first.",
                    stage.name, [q], None, None, [{"field": f"stages.{si}.queue_priority.{qi}", "value": q}]))
            seen.add(q)
    return ClauseResult("CF-NO-DUP", "failed" if findings else ("passed" if n else "not_exercised"),
                        f"{n} QUEUE_PRIORITY lists checked", findings)


@clause("CF-ONE-TYPE", "no queue is both an explorer and a conversion queue", static=True)
def check_one_type(scenario) -> ClauseResult:
    """Rule: no queue name is both an explorer queue (a client's explorer fields, an explorer's read
    queues) and a conversion queue (a client's conversion fields, a worker's read queues)."""
    uses: dict[str, dict[str, list[str]]] = {}
    for ci, c in enumerate(scenario.clients):
        for f in EXPLORER_FIELDS:
            uses.setdefault(getattr(c, f), {}).setdefault("explorer", []).append(f"clients.{ci}.{f} ({c.name})")
        for f in CONVERSION_FIELDS:
            uses.setdefault(getattr(c, f), {}).setdefault("conversion", []).append(f"clients.{ci}.{f} ({c.name})")
    for si, s in enumerate(scenario.stages):
        role = "explorer" if s.kind == "explorer" else "conversion"
        for q in s.priority:
            uses.setdefault(q, {}).setdefault(role, []).append(f"stages.{si}.queue_priority ({s.name})")
    findings = []
    for q, kinds in uses.items():
        if len(kinds) > 1:
            findings.append(Finding(
                "CF-ONE-TYPE",
                f"Queue {q} is used both as an explorer queue ({kinds['explorer'][0]}) and as a conversion "
                f"queue ({kinds['conversion'][0]}).",
                None, [q], None, None, [{"explorer": kinds["explorer"], "conversion": kinds["conversion"]}]))
    n = len(uses)
    return ClauseResult("CF-ONE-TYPE", "failed" if findings else ("passed" if n else "not_exercised"),
                        f"{n} queue names checked", findings)



def _allows(stage, tag: str) -> bool:
    """A worker allows a tag when its CONVERSION_PRIORITY lists it, or is empty (no filter)."""
    return not stage.conversion_priority or tag in stage.conversion_priority


@clause("CF-TAGS", "every per-scan tag is allowed for at least one worker", static=True)
def check_tags(scenario) -> ClauseResult:
    """Rule: every tag the scenario's scans are announced with (for each workload phase routed per scan,
    Scenario.per_scan_tag: the phase's forced tag, else its mode) is allowed for at least one worker
    stage: its conversion_priority lists the tag, or is empty (no filter). Not exercised when no phase is
    routed per scan, or when the scenario has no worker stage (a scenario that judges the explorer alone)."""
    phases: dict[str, list[int]] = {}
    for pi, phase in enumerate(scenario.workload):
        tag = scenario.per_scan_tag(phase)
        if tag is not None:
            phases.setdefault(tag, []).append(pi)
    if not phases:
        return ClauseResult("CF-TAGS", "not_exercised", "no workload phase is routed through per-scan queues")
    workers = [s for s in scenario.stages if s.kind == "worker"]
    if not workers:
        return ClauseResult("CF-TAGS", "not_exercised",
                            f"{len(phases)} per-scan tag(s) ({', '.join(phases)}), but no worker stage: not judged")
    findings = []
    for tag, indexes in phases.items():
        if any(_allows(w, tag) for w in workers):
            continue
        pi = indexes[0]
        phase = scenario.workload[pi]
        named = f"workload.{pi}" + (f" ({phase.name})" if phase.name else "")
        lists = ", ".join(f"{w.name} {' '.join(w.conversion_priority)!r}" for w in workers)
        field = f"workload.{pi}.per_scan" if phase.per_scan is not None else \
            f"clients.{[c.name for c in scenario.clients].index(phase.client)}.per_scan"
        more = f" (and {len(indexes) - 1} more phase(s))" if len(indexes) > 1 else ""
        findings.append(Finding(
            "CF-TAGS",
            f"Phase {named}{more} announces its scans' per-scan queues with tag {tag!r}, which no worker allows "
            f"(CONVERSION_PRIORITY: {lists}): its conversions would never be consumed.",
            None, [], None, None, [{"field": field, "value": tag}]))
    return ClauseResult("CF-TAGS", "failed" if findings else "passed",
                        f"{len(phases)} per-scan tag(s) checked against {len(workers)} worker stage(s)", findings)
