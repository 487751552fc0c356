"""One running stage: connection, priority checks on its own clock, one message per turn.

The loop (DESIGN.md, "a check tied to message flow never runs under load"):

    while running:
        service the connection briefly (deliveries go to our own inbox)
        handle the commands received (scan_queues.py: abort, new_queue, delete_queue, ...)
        if now >= next_check: run the priority checks (passive declares + decide), QUEUE_PRIORITY
                              and per-scan; a worker says hello after its first check
        handle ONE message from the inbox (publish outputs with confirms, then ack)

so the checks run between messages whatever the load.
"""
from __future__ import annotations

import collections
import logging
import signal
import time
from typing import Callable

import pika
import pika.exceptions as pex

from . import messages
from .config import DEFAULT_READ_QUEUE, Settings
from .deliveries import Delivery, Output, StageExit
from .priority import Decision, decide, ranked
from .scan_queues import BROADCAST_EXCHANGE, ScanQueues

__all__ = ["Delivery", "Output", "Stage", "StageExit"]

log = logging.getLogger("reference_engine.stage")

MAX_CONNECT_FAILURES = 12
DUP_AFTER_RECONNECT = 5  # handled messages whose outputs the dup_after_reconnect fault publishes again
# After the broker closed our channel (the connection was fine), a new connection at once: no backoff
# is needed. Four tries a second, the pace of the reconnect storm reported against 3.32.4.
CHANNEL_ERROR_RETRY_SECONDS = 0.25


class Stage(ScanQueues):
    def __init__(self, settings: Settings, handler: Callable[[dict, str], list[Output]],
                 problem_queues: tuple[str, ...] = ("os2ds_problems",)):
        self.settings = settings
        self.handler = handler
        self.problem_queues = problem_queues
        self.stopping = False
        self.aborted: set = set()
        self.handled = 0
        self.recent_outputs: list[list[Output]] = []  # only kept with the dup_after_reconnect fault
        self.commands_stopped = False  # only with the wedge_on_empty_broadcast fault
        self._reset()

    # -- state per connection -------------------------------------------------
    def _reset(self) -> None:
        self.connection: pika.BlockingConnection | None = None
        self.channel = None
        self.passive_channel = None
        self.consuming: dict[str, str] = {}  # queue -> consumer tag
        self.tag_queue: dict[str, str] = {}  # consumer tag -> queue
        self.inbox: collections.deque[Delivery] = collections.deque()
        self.commands: collections.deque[Delivery] = collections.deque()
        self.seen_queues: set[str] = set()
        self.gone: str | None = None
        self._reset_scan_queues()

    # -- entry point ----------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        failures = 0
        backoff = 0.5
        connected_once = False
        while not self.stopping:
            try:
                self._connect()
                failures, backoff = 0, 0.5
                if connected_once and self.settings.has("dup_after_reconnect") and self.recent_outputs:
                    # The fault: outputs of messages already handled and acked go out once more.
                    log.warning("republishing the outputs of %d handled messages (fault dup_after_reconnect)",
                                len(self.recent_outputs))
                    for outputs in self.recent_outputs:
                        self._publish(outputs)
                    self.recent_outputs = []
                connected_once = True
                self._serve()
            except StageExit as exc:
                log.error("exiting with code %d: %s", exc.code, exc)
                self._close()
                return exc.code
            except (pex.AMQPConnectionError, pex.AMQPChannelError, pex.ConnectionWrongStateError,
                    pex.ChannelWrongStateError, OSError) as exc:
                self._close()
                if self.stopping:
                    break
                if connected_once and self.settings.has("no_reconnect"):
                    log.error("connection lost (%r); not reconnecting (fault no_reconnect)", exc)
                    return 5
                failures += 1
                if failures > MAX_CONNECT_FAILURES:
                    log.error("broker unreachable after %d attempts: %r", failures - 1, exc)
                    return 1
                if isinstance(exc, pex.ChannelClosedByBroker):
                    log.warning("the broker closed our channel (%r); reconnecting", exc)
                    self._pause(CHANNEL_ERROR_RETRY_SECONDS)
                    continue
                log.warning("connection lost or refused (%r); reconnecting in %.1f s", exc, backoff)
                self._pause(backoff)
                backoff = min(backoff * 2, 5.0)
        self._shutdown()
        return 0

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: stopping after the message in hand", signum)
        self.stopping = True

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- connection set-up ----------------------------------------------------
    def _parameters(self) -> pika.ConnectionParameters:
        s = self.settings
        return pika.ConnectionParameters(
            host=s.amqp_host, port=s.amqp_port, virtual_host=s.amqp_vhost,
            credentials=pika.PlainCredentials(s.amqp_user, s.amqp_password),
            heartbeat=60, blocked_connection_timeout=300, connection_attempts=1, socket_timeout=5)

    def _connect(self) -> None:
        self._reset()
        s = self.settings
        self.connection = pika.BlockingConnection(self._parameters())
        ch = self.connection.channel()
        self.channel = ch
        ch.confirm_delivery()
        ch.basic_qos(prefetch_count=s.prefetch, global_qos=False)
        ch.add_on_cancel_callback(self._on_broker_cancel)
        declared = []
        for q in self._queues_to_declare():
            ch.queue_declare(q, durable=True)
            declared.append(q)
        ch.exchange_declare(BROADCAST_EXCHANGE, exchange_type="fanout", durable=True)
        result = ch.queue_declare("", durable=False, exclusive=False, auto_delete=True,
                                  arguments={"x-max-priority": 10})
        command_queue = result.method.queue
        ch.queue_bind(command_queue, BROADCAST_EXCHANGE, routing_key="")
        self.command_queue = command_queue
        if not self.commands_stopped:
            # Auto-ack: no prefetch limit applies, so commands arrive even when data prefetch is full.
            self.command_consumer = ch.basic_consume(command_queue, self._on_command, auto_ack=True)
        self.passive_channel = self.connection.channel()
        log.info("%s connected to %s:%s vhost %s; queues %s; declared %s",
                 s.stage, s.amqp_host, s.amqp_port, s.amqp_vhost, " ".join(s.read_queues),
                 " ".join(declared))

    def _queues_to_declare(self) -> list[str]:
        s = self.settings
        base = [DEFAULT_READ_QUEUE[s.stage], *s.output_queues]
        priority = [] if s.has("no_declare") else list(s.queue_priority)
        out: list[str] = []
        for q in [*priority, *base]:
            if q not in out:
                out.append(q)
        return out

    def _close(self) -> None:
        conn = self.connection
        self.connection = None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass

    def _shutdown(self) -> None:
        conn = self.connection
        if conn is None or not conn.is_open:
            return
        try:
            # Prefetched messages go back to their queue; then the consumers are cancelled.
            for item in list(self.inbox):
                self.channel.basic_reject(item.delivery_tag, requeue=True)
            self.inbox.clear()
            for queue in list(self.consuming):
                self._cancel(queue)
        except Exception:  # noqa: BLE001
            pass
        self._close()
        log.info("stopped after %d messages", self.handled)

    # -- callbacks (they only record; the loop acts) --------------------------
    def _on_message(self, channel, method, properties, body) -> None:
        queue = self.tag_queue.get(method.consumer_tag, method.routing_key)
        self.inbox.append(Delivery(queue, method.consumer_tag, method.delivery_tag, properties, body))
        if queue in self.scan_deliveries:  # only with the delivery_count_priority fault
            self.scan_deliveries[queue] += 1

    def _on_command(self, channel, method, properties, body) -> None:
        self.commands.append(Delivery(self.command_queue or "", method.consumer_tag, method.delivery_tag,
                                      properties, body, method.routing_key))

    def _on_broker_cancel(self, method_frame) -> None:
        tag = method_frame.method.consumer_tag
        queue = self.tag_queue.pop(tag, None)
        if queue is not None and self.consuming.get(queue) == tag:
            del self.consuming[queue]
            log.warning("broker cancelled the consumer on %s (queue deleted?)", queue)
            if queue in self.scan_queue_tags:
                self._on_scan_queue_cancelled(queue)
            elif self.settings.has("die_on_queue_gone"):
                self.gone = queue

    # -- the loop -------------------------------------------------------------
    def _serve(self) -> None:
        s = self.settings
        period = s.check_seconds
        slow_period = s.effective_check_seconds
        next_full_check = time.monotonic()
        next_check = time.monotonic()
        if s.has("consume_all_at_start"):
            for q in s.read_queues:
                if self._ready(q) is not None:
                    self._start(q)
            next_check = next_full_check = time.monotonic() + 8 * period + 2.0
            self._say_hello_if_due()
        while not self.stopping:
            if self.wedged:  # fault wedge_on_deleted_paused_queue: a dead channel, nothing else runs
                self.connection.process_data_events(time_limit=0.05)
                continue
            self.connection.process_data_events(time_limit=0)
            if self.gone:
                raise StageExit(4, f"queue {self.gone} is gone (fault die_on_queue_gone)")
            while self.commands:
                self._handle_command(self.commands.popleft())
            now = time.monotonic()
            if now >= next_check:
                full = now >= next_full_check
                self._check(full)
                self._check_per_scan()
                if self.wedged:
                    continue
                self._say_hello_if_due()
                if full and slow_period != period:
                    next_full_check = time.monotonic() + slow_period
                # Keep the checks on a fixed grid (a late check does not push the next one back).
                next_check += period
                if next_check <= time.monotonic():
                    next_check = time.monotonic() + period
                if self.gone:
                    raise StageExit(4, f"queue {self.gone} is gone (fault die_on_queue_gone)")
            if self.inbox:
                self._handle(self.inbox.popleft())
            else:
                wait = max(0.0, min(0.05, next_check - time.monotonic()))
                self.connection.process_data_events(time_limit=wait)

    # -- priority check -------------------------------------------------------
    def _probe(self, queue: str) -> int | None:
        """Ready messages in ``queue`` (passive declare on the side channel), or None when it does not exist."""
        try:
            if self.passive_channel is None or not self.passive_channel.is_open:
                self.passive_channel = self.connection.channel()
            result = self.passive_channel.queue_declare(queue, passive=True)
        except pex.ChannelClosedByBroker as exc:
            self.passive_channel = None
            if exc.reply_code == 404:
                return None
            raise
        return result.method.message_count

    def _ready(self, queue: str) -> int | None:
        """``_probe`` for a QUEUE_PRIORITY queue (the die_on_queue_gone fault watches those)."""
        count = self._probe(queue)
        if count is None:
            if queue in self.seen_queues and self.settings.has("die_on_queue_gone"):
                self.gone = queue
            return None
        self.seen_queues.add(queue)
        return count

    def _check(self, full: bool = True) -> None:
        s = self.settings
        queues = s.read_queues
        ready = {q: self._ready(q) for q in queues}
        decision = decide(queues, frozenset(self.consuming), ready, s.faults)
        if not full:
            # slow_check fault: between the slow checks a held lower consumer is left alone;
            # only a stage without one picks one up (and q0 is kept).
            holds_lower = any(q in self.consuming for q in queues[1:])
            if holds_lower:
                decision = Decision((), tuple(q for q in decision.start if q == queues[0]), decision.target)
        order = ranked(queues, s.faults)
        for q in decision.cancel:
            # Cancelled because a queue above it has work: its prefetched messages go back.
            # Cancelled because it ran dry (moving down): they are still the next work in order.
            above = order[:order.index(q)] if q in order else []
            self._cancel(q, requeue=any((ready.get(h) or 0) > 0 for h in above))
        for q in decision.start:
            self._start(q)
        if decision.is_switch:
            log.info("priority check: ready %s; cancelled %s; started %s; consuming %s",
                     ready, list(decision.cancel), list(decision.start), list(self.consuming))
        if s.has("get_ahead"):
            self._get_ahead(queues, ready)

    def _start(self, queue: str) -> None:
        if queue in self.consuming:
            return
        tag = self.channel.basic_consume(queue, self._on_message, auto_ack=False)
        self.consuming[queue] = tag
        self.tag_queue[tag] = queue

    def _cancel(self, queue: str, requeue: bool = True) -> None:
        tag = self.consuming.pop(queue, None)
        if tag is None:
            return
        self.tag_queue.pop(tag, None)
        self.channel.basic_cancel(tag)
        if not requeue:
            return  # its prefetched messages stay in the inbox and are handled in turn
        # Messages this consumer had prefetched go back to their queue (or, with the
        # ack_on_cancel fault, are acked without being processed: lost).
        mine = [item for item in self.inbox if item.consumer_tag == tag]
        self.inbox = collections.deque(item for item in self.inbox if item.consumer_tag != tag)
        for item in mine:
            if self.settings.has("ack_on_cancel"):
                self.channel.basic_ack(item.delivery_tag)
            elif self.settings.has("dup_on_cancel"):
                if not self._handle(item, settle=False):  # results published ...
                    self.channel.basic_reject(item.delivery_tag, requeue=True)  # ... and requeued
            else:
                self.channel.basic_reject(item.delivery_tag, requeue=True)

    def _get_ahead(self, queues: list[str], ready: dict) -> None:
        order = ranked(queues, self.settings.faults)
        nonempty = [q for q in order if (ready.get(q) or 0) > 0]
        if len(nonempty) < 2:
            return
        method, properties, body = self.channel.basic_get(nonempty[1], auto_ack=False)
        if method is not None:
            self.inbox.appendleft(Delivery(nonempty[1], None, method.delivery_tag, properties, body))

    # -- data messages --------------------------------------------------------
    def _handle(self, item: Delivery, settle: bool = True) -> bool:
        """Handle one message; True when it was acked or rejected (settled)."""
        s = self.settings
        try:
            obj = messages.decode(item.body, item.properties.content_encoding)
        except messages.PoisonMessage as exc:
            self._poison(item, None, exc)
            return True
        key = messages.scan_key(messages.best_effort_tag(obj))
        if key is not None and key in self.aborted:
            self.channel.basic_reject(item.delivery_tag, requeue=False)
            log.debug("dropped a message of aborted scan %s", key)
            return True
        if s.work_seconds > 0:
            self.connection.sleep(s.work_seconds)
        try:
            outputs = self.handler(obj, item.queue)
        except (pex.AMQPError, StageExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a message we cannot use is poison
            self._poison(item, obj, exc)
            return True
        self._publish(outputs)
        self.handled += 1
        if s.has("dup_after_reconnect"):
            self.recent_outputs = (self.recent_outputs + [outputs])[-DUP_AFTER_RECONNECT:]
        if settle:
            self.channel.basic_ack(item.delivery_tag)
        return settle

    def _publish(self, outputs: list[Output]) -> None:
        for out in outputs:
            try:
                self.channel.basic_publish("", out.queue, messages.encode(out.body),
                                           properties=messages.DATA_PROPERTIES,
                                           mandatory=out.mandatory)
            except pex.UnroutableError:
                if out.on_return is None:
                    raise
                log.warning("queue %s does not exist; reporting a problem", out.queue)
                for q in self.problem_queues:
                    self.channel.basic_publish("", q, messages.encode(out.on_return),
                                               properties=messages.DATA_PROPERTIES)

    def _poison(self, item: Delivery, obj, exc: Exception) -> None:
        s = self.settings
        log.warning("unusable message from %s: %s", item.queue, exc)
        if s.has("crash_on_poison"):
            raise StageExit(3, f"unusable message from {item.queue} (fault crash_on_poison)")
        if s.has("requeue_poison"):
            self.channel.basic_nack(item.delivery_tag, requeue=True)
            return
        body = messages.problem(messages.best_effort_tag(obj),
                                f"Unusable message in queue {item.queue}: {exc}")
        self._publish([Output(q, body) for q in self.problem_queues])
        self.channel.basic_reject(item.delivery_tag, requeue=False)
