"""A tiny builder for hand-written histories: times are seconds after the run start."""
from __future__ import annotations

from typing import Any

from harness.checkers import check_all
from harness.checkers.model import Windows
from harness.history import History, make_event
from harness.scenario import parse_scenario

T0 = 1_000_000.0
WINDOWS = Windows(5.0, 1.0, 30.0)  # W = 6, G = 30


class HB:
    def __init__(self):
        self.events: list[dict[str, Any]] = []
        self._tags: dict[tuple[str, str], list[str]] = {}
        self._command: dict[str, list[str]] = {}
        self._n = 0
        self.ev(0.0, "run_started", version=1, scenario="test", vhost="v", seed=0)

    def ev(self, t: float, type_: str, **fields) -> "HB":
        self.events.append(make_event(type_, T0 + t, **fields))
        return self

    # stages and consumers
    def stage(self, t, name, priority=("q0", "q1", "q2"), kind="worker", create_queues=True, supervisor_restart=0,
              tags=()):
        prio = list(priority)
        default = "os2ds_conversions" if kind == "worker" else "os2ds_scan_specs"
        self.ev(t, "stage_started", stage=name, role=name.split("#")[0], kind=kind, pid=100 + len(self.events),
                queue_priority=prio, read_queues=prio or [default], supervisor_restart=supervisor_restart,
                conversion_priority=list(tags))
        if create_queues:
            for q in prio:
                self.ev(t + 0.5, "queue_created", queue=q, durable=True, auto_delete=False, arguments=[])
        return self

    def consume(self, t, stage, queue):
        self._n += 1
        tag = f"ctag{self._n}"
        self._tags.setdefault((stage, queue), []).append(tag)
        return self.ev(t, "consumer_created", stage=stage, queue=queue, tag=tag, chan=f"chan-{stage}", prefetch=1)

    def cancel(self, t, stage, queue):
        tag = self._tags[(stage, queue)].pop()
        return self.ev(t, "consumer_deleted", stage=stage, queue=queue, tag=tag, chan=f"chan-{stage}")

    def exit(self, t, stage, rc=0, supervisor=None):
        """``supervisor``: 'restarting' or 'gave_up' when a restart policy applies (see stages.py)."""
        return self.ev(t, "stage_exited", stage=stage, pid=0, returncode=rc, supervisor=supervisor)

    def supervised_restart(self, t_exit, stage, rc, n, backoff=1.0, priority=("q0", "q1", "q2")):
        """A non-zero exit the restart policy answers: stage_exited, then its n-th restart after ``backoff``."""
        self.exit(t_exit, stage, rc, supervisor="restarting")
        return self.stage(t_exit + backoff, stage, priority, create_queues=False, supervisor_restart=n)

    def conn_closed(self, t, stage):
        return self.ev(t, "connection_closed", conn=f"conn-{stage}", name="x", stage=stage)

    # queues
    def queue(self, t, q):
        return self.ev(t, "queue_created", queue=q, durable=True, auto_delete=False, arguments=[])

    def delete(self, t, q):
        return self.ev(t, "queue_deleted", queue=q)

    def levels(self, a, b, steps: dict[str, list[tuple[float, int | None]]], dt=0.1):
        """Samples every dt in [a, b]; steps[q] = [(t, ready), ...] change points of a step function."""
        n = int(round((b - a) / dt))
        for k in range(n + 1):
            t = a + k * dt
            ready = {}
            for q, pts in steps.items():
                v = 0
                for tt, vv in pts:
                    if tt <= t + 1e-9:
                        v = vv
                ready[q] = v
            self.ev(t, "sample", ready=ready)
        return self

    # per-scan queues (OS2datascanner 3.32)
    def ps_stage(self, t, name, tags=(), kind="worker", priority=(), connect=1.0):
        """A stage with CONVERSION_PRIORITY ``tags`` that consumes its command queue ``connect`` s later."""
        self.stage(t, name, priority, kind=kind, tags=tags)
        return self.connect(t + connect, name)

    def command_queue(self, stage) -> str:
        return self._command.get(stage, [None])[-1]

    def connect(self, t, stage):
        """A (re)connection: a new command queue amq.gen-<stage>-<n>, consumed."""
        queue = f"amq.gen-{stage}-{len(self._command.get(stage, [])) + 1}"
        self._command.setdefault(stage, []).append(queue)
        return self.consume(t, stage, queue)

    def announce(self, t, queue, tag, reason="scan_start", to="broadcast", scan=None, declare=None):
        """A new_queue command; a scan_start announcement is preceded by the admin's declare."""
        if declare if declare is not None else reason == "scan_start":
            self.queue(t - 0.1, queue)
        return self.ev(t, "ps_announce", queue=queue, tag=tag, scan=scan, reason=reason, to=to)

    def ps_delete(self, t, queue, reason="scan_end", ready=0):
        """delete_queue on broadcast, then queue.delete (the broker's queue_deleted 0.1 s later)."""
        self.ev(t, "ps_delete", queue=queue, scan=None, reason=reason, ready=ready)
        return self.delete(t + 0.1, queue)

    def hello(self, t, stage, answered=(), tags=None):
        """The stage's worker_hello naming its latest command queue, and the admin's reply."""
        cq = self.command_queue(stage)
        self.ev(t, "hello", command_queue=cq, stage=None, answered=list(answered))
        for q in answered:
            self.ev(t + 0.01, "ps_announce", queue=q, tag=(tags or {}).get(q, "full"), scan=None,
                    reason="hello_reply", to=cq)
        return self

    # messages
    def publish(self, t, rk, mtype="ConversionMessage", stage="explorer", exchange="", routed=None, **msg):
        if routed is None:
            routed = [rk] if exchange == "" else ["amq.gen-broadcast"]
        return self.ev(t, "publish", exchange=exchange, routing_key=rk, stage=stage, routed=routed,
                       msg={"type": mtype, **msg})

    def deliver(self, t, queue, stage, mtype="ConversionMessage", redelivered=False, **msg):
        return self.ev(t, "deliver", queue=queue, stage=stage, redelivered=redelivered, msg={"type": mtype, **msg})

    def output(self, t, queue, mtype, **msg):
        return self.ev(t, "output", queue=queue, msg={"type": mtype, **msg})

    def plan(self, t, scan, objects, client="a", org="org-a", mode="full", conversion_queue="conv_full",
             explorer_queue="expl_full"):
        return self.ev(t, "scan_planned", scan=scan, client=client, org=org, mode=mode, explorer_queue=explorer_queue,
                       conversion_queue=conversion_queue, objects=list(objects), via="explorer")

    def fault(self, t, kind, target, **params):
        return self.ev(t, "fault", kind=kind, target=target, detail="test", params=params)

    def phase(self, t, name):
        return self.ev(t, "phase", name=name)

    def finish(self, t, reason="complete"):
        return self.ev(t, "run_finished", reason=reason)

    def history(self) -> History:
        return History(list(self.events))


def scenario(**checks):
    data = {
        "name": "t",
        "clients": [{"name": "a", "organisation": "org-a", "explorer_full_queue": "expl_full",
                     "explorer_delta_queue": "expl_delta", "conversion_full_queue": "q1",
                     "conversion_delta_queue": "q0"}],
        "stages": [{"name": "explorer", "kind": "explorer", "queue_priority": "expl_delta expl_full"},
                   {"name": "worker", "kind": "worker", "queue_priority": "q0 q1 q2"}],
        "checks": checks,
    }
    return parse_scenario(data)


def judge(hb: HB, clause: str, sc=None, windows=WINDOWS):
    (res,) = check_all(hb.history(), sc if sc is not None else scenario(), windows, clauses=[clause])
    return res
