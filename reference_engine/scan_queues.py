"""Commands and per-scan conversion queues (OS2datascanner 3.32), mixed into the Stage.

ENGINE_CONTRACT.md section 7: every stage reads commands from a server-named queue bound to
``broadcast`` (auto-ack); a delivery is a command when its body is not empty and its routing key
is ``""`` or the stage's own command queue. A worker, on every (re)connect, forgets all per-scan
queues and says ``worker_hello`` once its static consumers are up; on ``new_queue`` with an
allowed tag it checks the queue with a passive declare on its side channel (a missing queue costs
nothing) and consumes it; on ``delete_queue`` it forgets it. With CONVERSION_PRIORITY set, every
check period it reads the depth of each known queue (side channel) and applies
``per_scan.decide_per_scan``. An explorer never consumes a per-scan queue.

State per connection is set in ``_reset_scan_queues``; the methods run on the stage's loop only
(the pika callbacks just append to the inboxes).
"""
from __future__ import annotations

import collections
import json
import logging

import pika.exceptions as pex

from . import messages
from .deliveries import Output, StageExit
from .per_scan import allowed, decide_per_scan

log = logging.getLogger("reference_engine.stage")

BROADCAST_EXCHANGE = "broadcast"
# debounce_new_queue fault: checks an announced queue waits before it is taken. 4 periods is more
# than W (one period plus a tolerance) at any period of 0.5 s or more.
DEBOUNCE_CHECKS = 4


class ScanQueues:
    """Command handling and per-scan queues of a Stage (needs its settings, channels and consumers)."""

    def _reset_scan_queues(self) -> None:
        self.command_queue: str | None = None
        self.command_consumer: str | None = None
        self.scan_queue_tags: dict[str, str | None] = {}  # known (allowed) per-scan queue -> its tag
        self.scan_queue_ready: dict[str, int | None] = {}  # depths read at the last check
        # Only with the delivery_count_priority fault: deliveries in this window, counted for the
        # queues consumed when it began (a queue subscribed since has no counter yet).
        self.scan_deliveries: collections.Counter[str] = collections.Counter()
        self.hello_due = self.settings.stage == "worker" and not self.commands_stopped
        self.wedged: str | None = None  # wedge_on_deleted_paused_queue: the channel is dead, nothing runs
        self.pending_queues: dict[str, list] = {}  # debounce_new_queue: queue -> [tag, checks left]

    # -- commands -------------------------------------------------------------
    def _handle_command(self, item) -> None:
        s = self.settings
        if self.commands_stopped:
            return
        if not item.body:
            if s.has("wedge_on_empty_broadcast"):
                self._stop_commands()
                return
            self._bad_command("an empty message")
            return
        if item.routing_key not in ("", self.command_queue):
            log.info("ignoring a delivery with routing key %r on the command queue (not a command)",
                     item.routing_key)
            return
        try:
            command = messages.parse_command(messages.decode(item.body, item.properties.content_encoding))
        except messages.PoisonMessage as exc:
            self._bad_command(str(exc))
            return
        self._apply_command(command, reply=item.routing_key == self.command_queue)

    def _bad_command(self, why: str) -> None:
        if self.settings.has("crash_on_bad_command"):
            raise StageExit(6, f"a broadcast message that is not a command (fault crash_on_bad_command): {why}")
        log.warning("ignoring a broadcast message that is not a command: %s", why)

    def _stop_commands(self) -> None:
        # The fault: the per-scan handling runs in the command consumer; an empty body raises in it,
        # its clean-up cancels the per-scan consumers, and nobody starts any of it again.
        log.error("empty broadcast message: command consumer and per-scan queues stopped "
                  "(fault wedge_on_empty_broadcast)")
        self.commands_stopped = True  # for good, across reconnects
        self.hello_due = False
        if self.command_consumer is not None:
            self.channel.basic_cancel(self.command_consumer)
            self.command_consumer = None
        for queue in list(self.scan_queue_tags):
            self._forget_scan_queue(queue)
            self._cancel(queue, requeue=True)

    def _apply_command(self, command: dict, reply: bool = False) -> None:
        """``reply``: the command came straight to our command queue (the admin's answer to our hello)."""
        if isinstance(command["abort"], dict):
            key = messages.scan_key(command["abort"])
            self.aborted.add(key)
            log.info("abort: dropping the rest of scan %s", key)
        if isinstance(command["log_level"], str):
            logging.getLogger().setLevel(command["log_level"].upper())
        if self.settings.has("command_via_queue") and self.settings.stage == "explorer":
            self._publish([Output(messages.DEFAULT_CONVERSION_QUEUE, command)])
        if self.settings.stage != "worker":
            return  # an explorer never consumes a per-scan queue
        queue = command["new_queue"]
        if isinstance(queue, str) and queue:
            if self.settings.has("debounce_new_queue") and queue not in self.scan_queue_tags:
                # The fault: wait for an announcement to "settle" (to dodge short scans) before taking it.
                self.pending_queues.setdefault(queue, [command["new_queue_priority"], DEBOUNCE_CHECKS])
            else:
                self._on_new_queue(queue, command["new_queue_priority"], reply)
        if isinstance(command["delete_queue"], str) and command["delete_queue"]:
            self.pending_queues.pop(command["delete_queue"], None)
            self._on_delete_queue(command["delete_queue"])
        # worker_hello is for the admin; a worker ignores its own and other workers' hellos.

    def _say_hello_if_due(self) -> None:
        if not self.hello_due or self.command_queue is None:
            return
        self.hello_due = False
        body = json.dumps(messages.command(worker_hello=self.command_queue)).encode("utf-8")
        self.channel.basic_publish(BROADCAST_EXCHANGE, "", body)  # plain JSON, no properties, as 3.32
        log.info("worker_hello sent for command queue %s", self.command_queue)

    # -- per-scan queues --------------------------------------------------------
    def _on_new_queue(self, queue: str, tag, reply: bool) -> None:
        s = self.settings
        if not allowed(tag, s.conversion_priority, s.faults):
            log.debug("new_queue %s with tag %r: not in CONVERSION_PRIORITY, ignored", queue, tag)
            return
        if s.has("redeclare_deleted_queue"):
            # The fault: a plain declare, so an announcement of a deleted queue creates it again.
            count = self.channel.queue_declare(queue, durable=True).method.message_count
        elif reply and s.has("reconnect_on_missing_hello_queue"):
            # The fault: the hello reply is handled by its own code path, whose passive declare runs on
            # the consuming channel; a missing queue closes it, the stage reconnects (and says hello
            # again), and the announcements after this one are lost with the old command queue.
            count = self.channel.queue_declare(queue, passive=True).method.message_count
        else:
            count = self._probe(queue)
            if count is None:
                log.warning("new_queue %s: no such queue (deleted already?); ignored", queue)
                return
        known = queue in self.scan_queue_tags
        self.scan_queue_tags[queue] = tag
        self.scan_queue_ready[queue] = count
        if not known:
            log.info("new_queue %s (tag %r, %d ready)", queue, tag, count)
        if s.has("delivery_count_priority") or s.has("subscribe_every_tag"):
            self._start(queue)  # as 3.32: subscribe at once, the next check pauses what it must
        else:
            self._apply_per_scan()

    def _on_delete_queue(self, queue: str) -> None:
        s = self.settings
        if s.has("redeclare_deleted_queue"):
            log.debug("delete_queue %s: left to the broker's consumer cancel (fault)", queue)
            return
        consuming = queue in self.consuming
        if s.has("wedge_on_deleted_paused_queue") and not consuming:
            # The fault: only a consumed queue is forgotten; a paused one stays known.
            log.info("delete_queue %s: not consuming it, nothing to do", queue)
            return
        if queue not in self.scan_queue_tags and not consuming:
            return
        self._forget_scan_queue(queue)
        if consuming:
            self._cancel(queue, requeue=False)  # prefetched messages stay in the inbox, handled in turn
        log.info("delete_queue %s: forgotten (%s)", queue, "was consuming" if consuming else "was paused")

    def _forget_scan_queue(self, queue: str) -> None:
        self.scan_queue_tags.pop(queue, None)
        self.scan_queue_ready.pop(queue, None)
        self.scan_deliveries.pop(queue, None)

    def _on_scan_queue_cancelled(self, queue: str) -> None:
        """The broker cancelled our consumer on a per-scan queue: it was deleted."""
        if not self.settings.has("redeclare_deleted_queue"):
            self._forget_scan_queue(queue)

    def _check_per_scan(self) -> None:
        s = self.settings
        if self.commands_stopped:
            return
        if self.pending_queues:
            self._take_settled_queues()
        if not self.scan_queue_tags:
            return
        if not s.conversion_priority and not s.has("redeclare_deleted_queue"):
            return  # no per-scan priority: every announced queue is consumed from its announcement
        ready: dict[str, int | None] = {}
        for queue in list(self.scan_queue_tags):
            ready[queue] = self._probe_scan_queue(queue)
            if self.wedged:
                return
            if ready[queue] is None:
                log.info("per-scan queue %s is gone: forgotten", queue)
                self._forget_scan_queue(queue)
        self.scan_queue_ready = {q: n for q, n in ready.items() if n is not None}
        self._apply_per_scan()
        if s.has("delivery_count_priority"):
            self.scan_deliveries = collections.Counter({q: 0 for q in self.consuming if q in self.scan_queue_tags})

    def _take_settled_queues(self) -> None:
        for queue, pending in list(self.pending_queues.items()):
            pending[1] -= 1
            if pending[1] <= 0:
                del self.pending_queues[queue]
                self._on_new_queue(queue, pending[0], reply=False)

    def _probe_scan_queue(self, queue: str) -> int | None:
        s = self.settings
        if s.has("redeclare_deleted_queue"):
            return self.channel.queue_declare(queue, durable=True).method.message_count
        if s.has("wedge_on_deleted_paused_queue"):
            # The fault: the depth is read on the consuming channel, and a 404 that closes it is
            # taken for "queue gone, nothing to do": the stage keeps a dead channel, consuming nothing.
            try:
                return self.channel.queue_declare(queue, passive=True).method.message_count
            except pex.ChannelClosedByBroker:
                log.warning("per-scan queue %s is gone (fault wedge_on_deleted_paused_queue)", queue)
                self.wedged = queue
                return None
        return self._probe(queue)

    def _apply_per_scan(self) -> None:
        s = self.settings
        consuming = {q for q in self.consuming if q in self.scan_queue_tags}
        decision = decide_per_scan(s.conversion_priority, self.scan_queue_tags, consuming,
                                   self.scan_queue_ready, self.scan_deliveries, s.faults)
        for queue in decision.cancel:
            self._cancel(queue, requeue=True)
        for queue in decision.start:
            self._start(queue)
        if decision.is_switch:
            log.info("per-scan check: ready %s; serving %s; cancelled %s; started %s", self.scan_queue_ready,
                     decision.serving or "every tag", list(decision.cancel), list(decision.start))
