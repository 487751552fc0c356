"""The nemesis: carries out a scenario's ``faults:`` when the schedule says they are due.

Each fault is recorded in the history as a ``fault`` event *before* it is
applied, so checkers can judge the engine's behaviour around it (FT-*), and
so that other clauses know which disturbances were on purpose.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from typing import Callable

import pika

from harness.admin import AdminError
from harness.broker import Broker, BrokerError
from harness.history import HistoryWriter
from harness.flood import poison_body
from harness.messages import command, encode_body
from harness.faults import BAD_COMMAND_SHAPES, DEFAULT_BAD_COMMANDS
from harness.scenario import Fault


CLOSE_DEADLINE = 15.0  # seconds to get a connection closed through the management API


def bad_command_body(shape: str) -> tuple[bytes, pika.BasicProperties]:
    """A malformed broadcast message, sent with the admin's command properties where it has a body."""
    command_like = pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip")
    if shape == "empty":
        return b"", pika.BasicProperties(priority=10, delivery_mode=2)
    if shape == "not_json":
        return b"\x00this is not a command {", pika.BasicProperties(priority=10, delivery_mode=2)
    if shape == "not_a_command":
        return encode_body({"greeting": "hello", "scan_tag": None}), command_like
    if shape == "no_abort":
        # 3.32's keys without 'abort': the engine must refuse it, not subscribe to a queue nobody declared.
        return encode_body({"new_queue": "osds_conversions.0_19700101T000000", "new_queue_priority": "full",
                            "delete_queue": None, "worker_hello": None}), command_like
    if shape == "bad_hello":
        # A worker_hello naming no queue: an admin must not answer it, nor stop answering others.
        return json.dumps({**command(), "worker_hello": 42}).encode(), pika.BasicProperties()
    raise ValueError(f"unknown bad_command shape {shape!r}; known: {', '.join(BAD_COMMAND_SHAPES)}")


class NemesisError(RuntimeError):
    """A fault could not be applied (no such stage, no connection to close, ...)."""


class Nemesis:
    """Applies faults (``apply``); when they are due is the runner's schedule's business
    (schedule.Schedule). What a fault does to the run's account (a deleted queue, an aborted scan)
    is in the history it records, for the ledger to read."""

    def __init__(self, broker: Broker, vhost: str, history: HistoryWriter, launcher, observer,
                 say: Callable[[str], None], latest_scan: Callable[[str], object | None] = lambda client: None,
                 scan_aborted: Callable[[object], None] = lambda scan: None, admin=None):
        self.broker = broker
        self.vhost = vhost
        self.history = history
        self.launcher = launcher
        self.observer = observer
        self.say = say
        self.threads: list[threading.Thread] = []
        # Stage instances a fault stopped on purpose: their exit is no error.
        self.expected_exits: set[str] = set()
        self.errors: list[str] = []  # from faults applied in the background
        self._broker_restarting = False
        self._broker_back_at: float | None = None
        # The latest planned scan of a client (a workload.PlannedScan), or None: what abort_scan aborts.
        self.latest_scan = latest_scan
        self.scan_aborted = scan_aborted  # told of the scan once its abort is sent (a hold discounts it)
        self.admin = admin  # harness.admin.Admin, for the faults that act as OS2datascanner's admin

    def _in_background(self, work: Callable[[], None], kind: str) -> None:
        """Faults that take time (a close the API must learn of, a pause, a restart) run off the
        runner's thread; ``busy`` holds the run open until they are done, and their errors reach
        the runner through tick()."""
        def guarded() -> None:
            try:
                work()
            except Exception as exc:
                self.errors.append(f"{kind}: {exc!r}")

        thread = threading.Thread(target=guarded, daemon=True, name=f"nemesis-{kind}")
        self.threads.append(thread)
        thread.start()

    def broker_down_on_purpose(self, grace: float) -> bool:
        """A restart_broker fault, or a node fault, is under way, or ended less than ``grace`` seconds
        ago (the time connections get to come back, and a quorum queue to elect a new leader). Outside
        that window a broker that is gone, or refuses messages, is a failure."""
        back_at = self._broker_back_at
        return self._broker_restarting or (back_at is not None and time.monotonic() - back_at < grace)

    def finish(self, timeout: float = 60.0) -> None:
        """Let faults still under way end (a broker restart must not outlive its test)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def busy(self) -> bool:
        """A fault is still being applied in the background."""
        return any(t.is_alive() for t in self.threads)

    def check(self) -> None:
        """Raise the first error of a fault applied in the background."""
        if self.errors:
            raise NemesisError(self.errors[0])

    def apply(self, index: int, fault: Fault) -> None:
        self.history.record("fault", kind=fault.kind, target=fault.target, detail=f"faults.{index}",
                            params=fault.params, name=fault.name)
        self.say(f"fault faults.{index}: {fault.kind} {fault.target or ''}".rstrip())
        handler = getattr(self, f"_{fault.kind}", None)
        if handler is None:
            raise NemesisError(f"faults.{index}.kind: unknown fault kind {fault.kind!r}")
        try:
            handler(fault)
        except (pika.exceptions.AMQPError, BrokerError, OSError) as exc:
            # e.g. the broker is down (a restart_broker fault earlier) when this fault is due
            raise NemesisError(f"faults.{index} ({fault.kind}): the broker refused or did not answer: {exc!r}") from None

    # -- the faults ----------------------------------------------------------
    def _delete_queue(self, fault: Fault) -> None:
        with pika.BlockingConnection(self.broker.connection_parameters(self.vhost)) as connection:
            connection.channel().queue_delete(fault.target)

    def _close_connection(self, fault: Fault) -> None:
        names = self.observer.connections_of(fault.target)
        if not names:
            raise NemesisError(f"close_connection: stage {fault.target!r} has no open connection")
        # The management API learns of a connection one statistics interval after it opens,
        # and answers 404 until then: keep asking, off the runner's thread.
        def close() -> None:
            deadline = time.monotonic() + CLOSE_DEADLINE
            pending = set(names)
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    if self.broker.management.close_connection(name, "qp-harness fault: close_connection"):
                        pending.discard(name)
                if pending:
                    time.sleep(0.25)
            if pending:
                self.errors.append(f"close_connection: the management API never knew connection(s) "
                                   f"{', '.join(sorted(pending))} of stage {fault.target} within {CLOSE_DEADLINE:g} s")

        self._in_background(close, "close_connection")

    def _kill_stage(self, fault: Fault) -> None:
        self.expected_exits.add(fault.target)
        self.launcher.kill(fault.target, signal.SIGKILL)
        if fault.params.get("restart"):
            self.launcher.restart(fault.target)

    def _kill_node(self, fault: Fault) -> None:
        cluster, index, instance = self._node_of(fault)
        self.observer.note_node_down(cluster.broker.nodes[index].amqp_port)
        self._broker_restarting = "seconds" in fault.params
        cluster.kill_node(index)
        self._broker_back_at = time.monotonic()  # a node that stays down: the survivors take over now
        self.history.record("phase", name="node_killed", node=cluster.nodes[index].node, stage=instance)
        if "seconds" in fault.params:
            self._in_background(lambda: self._node_back(cluster, index, float(fault.params["seconds"])), "kill_node")

    def _restart_node(self, fault: Fault) -> None:
        """A rolling restart's step: the node's RabbitMQ application is stopped (it closes its clients'
        connections as shutdown) and started again after ``seconds``."""
        cluster, index, instance = self._node_of(fault)
        self.observer.note_node_down(cluster.broker.nodes[index].amqp_port)
        self._broker_restarting = True
        cluster.stop_app(index)
        self.history.record("phase", name="node_stopped", node=cluster.nodes[index].node, stage=instance)
        down = float(fault.params.get("seconds", 3))
        self._in_background(lambda: self._node_back(cluster, index, down, app_only=True), "restart_node")

    def _node_back(self, cluster, index: int, down: float, app_only: bool = False) -> None:
        time.sleep(down)
        try:
            if app_only:
                cluster.start_app(index)
            else:
                cluster.start_node(index)
            self.broker.trace_on(self.vhost)  # a node starts with its firehose off
            self.history.record("phase", name="node_restarted", node=cluster.nodes[index].node, down=down)
        finally:
            self._broker_back_at = time.monotonic()
            self._broker_restarting = False

    def _node_of(self, fault: Fault) -> tuple:
        """The local cluster, the index of the node the fault's stage instance is connected to, the instance."""
        cluster = getattr(self.broker, "cluster", None)
        if cluster is None:
            raise NemesisError(f"{fault.kind} needs a local cluster (--rabbitmq-provider local --rabbitmq-nodes N)")
        [instance] = self.launcher.instances(fault.target)[:1] or [None]
        if instance is None:
            raise NemesisError(f"{fault.kind}: no running instance of {fault.target!r}")
        index = cluster.node_index(self.launcher.node_address(instance.name))
        if index == 0:
            raise NemesisError(f"{fault.kind}: {instance.name} is connected to the first node, which the observer "
                               "watches the cluster from; target a stage on another node")
        return cluster, index, instance.name

    def _pause_stage(self, fault: Fault) -> None:
        seconds = float(fault.params.get("seconds", 3))
        self.launcher.kill(fault.target, signal.SIGSTOP)

        def resume() -> None:
            time.sleep(seconds)
            self.history.record("fault", kind="resume_stage", target=fault.target, detail="end of pause_stage")
            self.launcher.kill(fault.target, signal.SIGCONT)

        self._in_background(resume, "pause_stage")

    def _poison(self, fault: Fault) -> None:
        body, properties = poison_body(fault.params.get("shape", "not_json"))
        count = int(fault.params.get("count", 1))
        with pika.BlockingConnection(self.broker.connection_parameters(self.vhost)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for _ in range(count):
                channel.basic_publish("", fault.target, body, properties)

    def _abort_scan(self, fault: Fault) -> None:
        scan = self.latest_scan(fault.target)
        if scan is None:
            raise NemesisError(f"abort_scan: client {fault.target!r} has no scan planned yet")
        self.history.record("phase", name="scan_aborted", scan=scan.scan, client=fault.target)
        abort = command(abort=scan.spec["scan_tag"])  # all seven keys, as a 3.32 admin writes it
        properties = pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip")
        with pika.BlockingConnection(self.broker.connection_parameters(self.vhost)) as connection:
            channel = connection.channel()
            channel.exchange_declare("broadcast", "fanout", durable=True)
            channel.confirm_delivery()
            channel.basic_publish("broadcast", "", encode_body(abort), properties)
        self.scan_aborted(scan)

    def _bad_command(self, fault: Fault) -> None:
        shapes = [fault.params["shape"]] if "shape" in fault.params else list(DEFAULT_BAD_COMMANDS)
        with pika.BlockingConnection(self.broker.connection_parameters(self.vhost)) as connection:
            channel = connection.channel()
            channel.exchange_declare("broadcast", "fanout", durable=True)
            channel.confirm_delivery()
            for shape in shapes * int(fault.params.get("count", 1)):
                body, properties = bad_command_body(shape)
                channel.basic_publish("broadcast", "", body, properties)

    # -- the admin's faults (per-scan queues, OS2datascanner 3.32) -----------------
    def _as_admin(self, fault: Fault, work: Callable[[], str]) -> None:
        if self.admin is None:
            raise NemesisError(f"{fault.kind}: the run has no admin (no phase is routed per scan)")
        try:
            self.say(f"  {fault.kind}: {work()}")
        except AdminError as exc:
            raise NemesisError(f"{fault.kind}: {exc}") from None

    def _delete_scan_queue(self, fault: Fault) -> None:
        self._as_admin(fault, lambda: self.admin.delete_phase_queue(fault.target))

    def _stale_hello_reply(self, fault: Fault) -> None:
        self._as_admin(fault, lambda: self.admin.reply_stale())

    def _short_scan(self, fault: Fault) -> None:
        self._as_admin(fault, lambda: self.admin.short_scan(fault.params.get("tag", "full")))

    def _restart_broker(self, fault: Fault) -> None:
        if self.broker.restart is None:
            raise NemesisError(f"restart_broker needs the local provider; this broker is {self.broker.provider}")
        down = float(fault.params.get("seconds", 1.0))

        def restart() -> None:
            self._broker_restarting = True
            try:
                self.observer.note_broker_down()
                self.broker.restart(down)
                # Tracing is per node run: switch the firehose on again for the test's vhost.
                self.broker.trace_on(self.vhost)
                self.history.record("phase", name="broker_restarted", down=down)
            finally:
                self._broker_back_at = time.monotonic()
                self._broker_restarting = False

        self._in_background(restart, "restart_broker")
