"""RT-*: routing and message types, judged from the tracer's publish/deliver events."""
from __future__ import annotations

from dataclasses import dataclass, field

from harness.checkers._common import Context, fault_family
from harness.checkers.model import ClauseResult, Finding
from harness.checkers.registry import clause
from harness.messages import MULTI_TYPE_QUEUES, UNPARSEABLE

RESULT_TYPES = ("MatchesMessage", "MetadataMessage", "StatusMessage", "ProblemMessage")


def _outcome(findings, n):
    return "failed" if findings else ("passed" if n else "not_exercised")


def _who(ev) -> str:
    return ev.get("stage") or "an unattributed connection"


def _publisher(ev) -> str:
    stage = ev.get("stage")
    if stage == "harness":
        return "The harness"
    return f"Stage {stage}" if stage else "An unattributed connection"


def _poisoned_queues(ctx: Context) -> set[str]:
    return {f.get("target") for f in ctx.history.of("fault") if fault_family(f.get("kind")) == "poison"}


@clause("RT-ONE-TYPE", "each queue carries one message type")
def check_one_type(ctx: Context) -> ClauseResult:
    """Rule: over every publish to the default exchange that reached an existing queue (other than
    os2ds_checkups, os2ds_results and server-named amq.* queues), the first message type seen on a
    queue is its type; any other type on it is a violation (reported once per queue and type).
    Poison messages the harness itself injected into a queue named by a poison fault are excluded."""
    poisoned = _poisoned_queues(ctx)
    first: dict[str, dict] = {}
    findings: list[Finding] = []
    reported: set[tuple[str, str]] = set()
    n = 0
    for ev in ctx.history.of("publish"):
        if ev.get("exchange", "") != "":
            continue
        q = ev.get("routing_key") or ""
        if q in MULTI_TYPE_QUEUES or q.startswith("amq.") or not q:
            continue
        msg = ev.get("msg") or {}
        typ = msg.get("type") or UNPARSEABLE
        if ev.get("stage") in ("harness", None) and q in poisoned:
            continue
        if ctx.levels.exists_at(q, ev["t"]) is False:
            continue  # never entered a queue: RT-ROUTABLE's business
        n += 1
        f = first.get(q)
        if f is None:
            first[q] = ev
            continue
        ftyp = (f.get("msg") or {}).get("type") or UNPARSEABLE
        if typ != ftyp and (q, typ) not in reported:
            reported.add((q, typ))
            findings.append(Finding(
                "RT-ONE-TYPE",
                f"Queue {q} carried {ftyp} (first at {ctx.rel(f['t'])}) and then {typ} at {ctx.rel(ev['t'])}, "
                f"published by {_who(ev)}.",
                ev.get("stage"), [q], ev["t"], ev["t"] + 0.5, [f, ev]))
    return ClauseResult("RT-ONE-TYPE", _outcome(findings, n), f"{n} messages classified in {len(first)} queues", findings)


@clause("RT-TENANT", "a client's conversions go to its full/delta queue; results carry its organisation")
def check_tenant(ctx: Context) -> ClauseResult:
    """Rule: for every scan in scan_planned, each ConversionMessage of it must be published with the
    planned conversion_queue as routing key and carry the planned organisation; each result message
    (Matches, Metadata, Status, Problem; published or read from an output queue) must carry the
    planned organisation. Messages of unplanned scans are DL-EXACTLY-ONCE's business."""
    plans = {p.get("scan"): p for p in ctx.history.of("scan_planned")}
    findings: list[Finding] = []
    n_conv = n_res = 0
    bad_queue: set[tuple] = set()
    bad_org: set[tuple] = set()
    for ev in ctx.history.of("publish", "output"):
        msg = ev.get("msg") or {}
        plan = plans.get(msg.get("scan"))
        if plan is None:
            continue
        typ = msg.get("type")
        if typ == "ConversionMessage" and ev["type"] == "publish":
            n_conv += 1
            q = ev.get("routing_key")
            want = plan.get("conversion_queue")
            if want and q != want and (plan["scan"], q) not in bad_queue:
                bad_queue.add((plan["scan"], q))
                findings.append(Finding(
                    "RT-TENANT",
                    f"A conversion of {plan.get('mode')} scan {plan['scan']} (client {plan.get('client')}) went to "
                    f"{q} instead of {want}, published by {_who(ev)} at {ctx.rel(ev['t'])}.",
                    ev.get("stage"), [q, want], ev["t"], ev["t"] + 0.5, [ev]))
        elif typ in RESULT_TYPES:
            n_res += 1
        else:
            continue
        org, want_org = msg.get("org"), plan.get("org")
        if want_org and org != want_org and (plan["scan"], typ) not in bad_org:
            bad_org.add((plan["scan"], typ))
            where = ev.get("routing_key") if ev["type"] == "publish" else ev.get("queue")
            findings.append(Finding(
                "RT-TENANT",
                f"A {typ} of scan {plan['scan']} (client {plan.get('client')}) in {where} carries organisation "
                f"{org} instead of {want_org} (at {ctx.rel(ev['t'])}).",
                ev.get("stage"), [where] if where else [], ev["t"], ev["t"] + 0.5, [ev]))
    n = n_conv + n_res
    return ClauseResult("RT-TENANT", _outcome(findings, n),
                        f"{n_conv} conversions and {n_res} results followed for {len(plans)} scans", findings)


@dataclass
class Routing:
    """Publishes judged for routability: how many, how many excused, and those no queue received."""

    judged: int = 0
    excused: int = 0
    unroutable: list[dict] = field(default_factory=list)


def routing(ctx: Context) -> Routing:
    """Rule: a publish to the default exchange is unroutable when its routing key named no existing
    queue at publish time: existence from queue_created/queue_deleted events and sampled counts
    (null = missing), with a queue created up to 0.25 s after the publish counted as existing; a queue
    the history never mentions counts as missing. Publishes to a queue after a delete_queue fault
    targeted it are excused. For other exchanges the tracer's ``routed`` list is trusted: an empty
    list is unroutable. DL-EXACTLY-ONCE reads the same verdict, so one lost publish is one finding."""
    r = Routing()
    deleted: dict[str, float] = {}
    for f in ctx.history.of("fault"):
        if fault_family(f.get("kind")) == "queue_gone":
            deleted.setdefault(f.get("target"), f["t"])
    for d in ctx.history.of("ps_delete"):  # the admin deleted a per-scan queue on a fault or an abort
        if d.get("reason") in ("fault", "abort"):
            deleted.setdefault(d.get("queue"), d["t"])
    for ev in ctx.history.of("publish"):
        ex = ev.get("exchange", "")
        rk = ev.get("routing_key") or ""
        r.judged += 1
        if ex == "":
            if rk.startswith("amq.") or ctx.levels.exists_at(rk, ev["t"]):
                continue
            if rk in deleted and ev["t"] >= deleted[rk]:
                r.excused += 1  # the harness deleted that queue on purpose
                continue
        else:
            routed = ev.get("routed")
            if routed is None or len(routed) > 0:
                continue
        r.unroutable.append(ev)
    return r


@clause("RT-ROUTABLE", "no published message is dropped as unroutable")
def check_routable(ctx: Context) -> ClauseResult:
    """Every unroutable publish (see ``routing``), reported once per (publisher, exchange, routing key)."""
    r = routing(ctx)
    findings: list[Finding] = []
    seen: dict[tuple, Finding] = {}
    for ev in r.unroutable:
        ex, rk = ev.get("exchange", ""), ev.get("routing_key") or ""
        key = (ev.get("stage"), ex, rk)
        if key in seen:
            f = seen[key]
            f.end = ev["t"]
            f.evidence[0]["count"] += 1
            continue
        typ = (ev.get("msg") or {}).get("type")
        target = f"routing key {rk}" if ex == "" else f"exchange {ex!r}"
        f = Finding(
            "RT-ROUTABLE",
            f"{_publisher(ev)} published a {typ} to "
            f"{target} at {ctx.rel(ev['t'])} but no queue received it (no such queue existed then).",
            ev.get("stage"), [rk] if rk else [], ev["t"], ev["t"] + 0.5, [{"count": 1, **ev}])
        seen[key] = f
        findings.append(f)
    for f in findings:
        c = f.evidence[0]["count"]
        if c > 1:
            f.explanation = f.explanation[:-1] + f"; {c} such publishes until {ctx.rel(f.end)}."
    text = f"{r.judged} publishes judged" + (f" ({r.excused} to a queue a fault deleted, excused)" if r.excused else "")
    return ClauseResult("RT-ROUTABLE", _outcome(findings, r.judged), text, findings)


@clause("RT-BROADCAST", "commands travel only on the broadcast exchange")
def check_broadcast(ctx: Context) -> ClauseResult:
    """Rule: a CommandMessage published to any exchange other than ``broadcast``, or delivered from a
    queue that is not a server-named (amq.*) broadcast queue, is a violation. One exception (3.32): the
    admin's reply to a worker_hello, a ``new_queue`` command sent on the default exchange straight to
    the worker's own command queue (amq.*)."""
    findings: list[Finding] = []
    n = 0
    for ev in ctx.history.of("publish", "deliver"):
        msg = ev.get("msg") or {}
        if msg.get("type") != "CommandMessage":
            continue
        if ev["type"] == "publish":
            n += 1
            if ev.get("exchange") != "broadcast" and not _hello_reply(ev, msg):
                where = ev.get("exchange") or f"the default exchange (routing key {ev.get('routing_key')})"
                findings.append(Finding(
                    "RT-BROADCAST",
                    f"A CommandMessage was published to {where} at {ctx.rel(ev['t'])} by {_who(ev)}, not to "
                    f"the broadcast exchange.", ev.get("stage"), [ev.get("routing_key") or ""], ev["t"], ev["t"] + 0.5, [ev]))
        else:
            q = ev.get("queue") or ""
            if not q.startswith("amq."):
                findings.append(Finding(
                    "RT-BROADCAST",
                    f"A CommandMessage was delivered from data queue {q} to {_who(ev)} at {ctx.rel(ev['t'])}.",
                    ev.get("stage"), [q], ev["t"], ev["t"] + 0.5, [ev]))
    return ClauseResult("RT-BROADCAST", _outcome(findings, n), f"{n} command messages seen", findings)



def _hello_reply(publish: dict, msg: dict) -> bool:
    """The admin's answer to a worker_hello: a new_queue sent straight to the worker's own command queue
    (a server-named ``amq.gen-...`` queue) on the default exchange (ENGINE_CONTRACT.md section 7)."""
    return publish.get("exchange") == "" and str(publish.get("routing_key") or "").startswith("amq.") \
        and msg.get("new_queue") is not None
