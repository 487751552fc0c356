"""Attribution of the broker's events to stages: a pure fold, no pika, no threads, no psutil.

The event exchange tells about connections, channels, consumers and queues,
each with the broker's pid of the thing (``<0.123.0>``). A connection is
attributed to a stage by its broker user or client port, through an injected
``resolver`` (``(port, user) -> stage | None``; harness.port_resolver.PortResolver
knows each stage's own user and asks the OS for the rest);
channels through their connection, consumers through their channel.

An event whose owner is not yet attributable (a stage that connected before
the harness registered its PID, a channel whose connection event is still
pending) waits in ``pending`` and is retried on each ``advance``, up to
``attribution_timeout`` seconds after it was received; then it is recorded
unattributed (stage None), stamped with the time it was received.

``advance`` returns the history events to record as ``(type, t, fields)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

BROKER_DOWN = "qp-harness.broker_down"  # a marker the nemesis puts among the broker's events
NODE_DOWN = "qp-harness.node_down"  # the same for one node of a cluster: headers {"port": its AMQP port}

Event = tuple[float, str, dict]  # (receive time, routing key, headers)
Record = tuple[str, float, dict]  # (history event type, t, fields)
Resolver = Callable[[Optional[int], Optional[str]], Optional[str]]  # (client port, broker user) -> stage


def port_of_name(name: str | None) -> int | None:
    """The client port of a broker connection name '127.0.0.1:PORT -> 127.0.0.1:5672' (channel names too)."""
    if not name or " -> " not in name:
        return None
    try:
        return int(name.split(" -> ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


def as_int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


@dataclass
class Connection:
    name: str | None
    port: int | None
    stage: str | None
    own: bool  # one of the observer's own connections: never recorded
    open: bool = True


@dataclass
class Channel:
    conn: str | None
    stage: str | None
    own: bool


class Attribution:
    """Connection, channel and consumer tables of one vhost, folded from the broker's events."""

    def __init__(self, vhost: str, own_prefix: str, resolver: Resolver, *, attribution_timeout: float = 1.0,
                 forget_port: Callable[[Optional[int]], None] = lambda port: None):
        self.vhost = vhost
        self.own_prefix = own_prefix  # the observer's connection names and queue names start with it
        self.resolver = resolver
        self.forget_port = forget_port  # a closed connection's port may be reused by another process
        self.attribution_timeout = attribution_timeout
        self.own_ports: set[int] = set()
        self.conns: dict[str, Connection] = {}
        self.chans: dict[str, Channel] = {}
        self.consumers: dict[tuple[str, str], dict[str, Any]] = {}  # (chan, tag) -> stage, queue, tag, chan, prefetch
        self.queue_generation: dict[str, int] = {}  # queue -> queue.created events seen
        self.pending: list[Event] = []
        self.problems: list[str] = []  # events that could not be recorded (a bug, or an odd event)

    # ------------------------------------------------------------------ the fold
    def add(self, t: float, key: str, headers: dict) -> None:
        """Take one event from the broker (or the BROKER_DOWN marker); recorded by the next ``advance``."""
        if self._concerns_us(key, headers):
            self.pending.append((t, key, headers))

    def advance(self, now: float, flush: bool = False) -> list[Record]:
        """Record every pending event whose owner is known or whose time is up (all of them with ``flush``)."""
        records: list[Record] = []
        progress = True
        while progress and self.pending:
            progress = False
            still: list[Event] = []
            for t, key, headers in self.pending:
                expired = flush or now - t > self.attribution_timeout
                try:
                    made = self.handle(t, key, headers, expired, still)
                except Exception as exc:  # one odd event must not stop the recording
                    self.problems.append(f"event {key!r} not recorded: {exc!r}")
                    made = []
                if made is None:
                    still.append((t, key, headers))
                else:
                    records += made
                    progress = True
            self.pending = still
        return records

    def handle(self, t: float, key: str, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        """The history events for one broker event; None = not yet attributable (try again later)."""
        handler = HANDLERS.get(key)
        if handler is None:
            return []  # an event kind we do not record
        return handler(self, t, h, expired, blocked)

    def _concerns_us(self, key: str, headers: dict) -> bool:
        if key in (BROKER_DOWN, NODE_DOWN):
            return True
        vhost = headers.get("vhost")
        if vhost is not None:
            return vhost == self.vhost
        # connection.closed and channel.closed carry no vhost: keep them when we know the pid,
        # or when its creation event is still waiting for attribution.
        pid = headers.get("pid")
        if key == "connection.closed":
            return pid in self.conns or _waits_on(self.pending, "connection.created", pid)
        if key == "channel.closed":
            return pid in self.chans or _waits_on(self.pending, "channel.created", pid)
        return False

    # ------------------------------------------------------------------ one handler per event key
    def on_broker_down(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record]:
        """A dead node announces no closes: every open stage connection ends now, with its consumers."""
        records = []
        for pid, conn in self.conns.items():
            if conn.open and not conn.own:
                conn.open = False
                self.forget_port(conn.port)
                records.append(("connection_closed", t, dict(conn=pid, name=conn.name, stage=conn.stage,
                                                             broker_ms=None, cause="broker_down")))
        self.consumers.clear()
        return records

    def on_node_down(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record]:
        """A killed cluster node announces no closes either: its stage connections (those to its AMQP
        port, ``127.0.0.1:CLIENT -> 127.0.0.1:PORT``) end now, with their consumers."""
        records, closed = [], set()
        for pid, conn in self.conns.items():
            if conn.open and not conn.own and _server_port(conn.name) == h.get("port"):
                conn.open = False
                closed.add(pid)
                self.forget_port(conn.port)
                records.append(("connection_closed", t, dict(conn=pid, name=conn.name, stage=conn.stage,
                                                             broker_ms=None, cause="node_down")))
        for key, consumer in list(self.consumers.items()):
            chan = self.chans.get(consumer["chan"])
            if chan is not None and chan.conn in closed:
                del self.consumers[key]
        return records

    def on_connection_created(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        pid, name = h.get("pid"), h.get("name")
        port = h.get("peer_port")
        port = int(port) if port not in (None, "") else port_of_name(name)
        if port in self.own_ports or str(h.get("user_provided_name") or "").startswith(self.own_prefix):
            self.own_ports.add(port)
            self.conns[pid] = Connection(name, port, None, own=True)
            return []
        stage = self.resolver(port, h.get("user"))
        if stage is None and not expired:
            return None
        self.conns[pid] = Connection(name, port, stage, own=False)
        return [("connection_created", t, dict(conn=pid, name=name, peer_port=port, stage=stage,
                                               broker_ms=h.get("timestamp_in_ms")))]

    def on_connection_closed(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        pid = h.get("pid")
        conn = self.conns.get(pid)
        if conn is None:
            return [] if expired else None  # its creation is still pending; give up once expired
        if _waits_on(blocked, "connection.created", pid):
            return None
        if conn.own or not conn.open:  # ours, or already closed by a broker-down marker
            return []
        conn.open = False
        self.forget_port(conn.port)
        return [("connection_closed", t, dict(conn=pid, name=h.get("name"), stage=conn.stage,
                                              broker_ms=h.get("timestamp_in_ms"), cause=None))]

    def on_channel_created(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        pid, conn_pid = h.get("pid"), h.get("connection")
        conn = self.conns.get(conn_pid)
        if conn is not None:
            owner = Channel(conn_pid, conn.stage, conn.own)
        else:
            if _waits_on(blocked, "connection.created", conn_pid) and not expired:
                return None
            # A connection from before the observer subscribed: attribute by the port in the channel's name.
            port = port_of_name(h.get("name"))
            if port in self.own_ports:
                owner = Channel(conn_pid, None, own=True)
            else:
                stage = self.resolver(port, h.get("user"))
                if stage is None and not expired:
                    return None
                owner = Channel(conn_pid, stage, own=False)
        self.chans[pid] = owner
        if owner.own:
            return []
        return [("channel_created", t, dict(chan=pid, conn=conn_pid, stage=owner.stage, number=h.get("number"),
                                            broker_ms=h.get("timestamp_in_ms")))]

    def on_channel_closed(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        pid = h.get("pid")
        chan = self.chans.get(pid)
        if chan is None:
            return [] if expired else None
        if _waits_on(blocked, "channel.created", pid):
            return None
        if chan.own:
            return []
        return [("channel_closed", t, dict(chan=pid, stage=chan.stage, broker_ms=h.get("timestamp_in_ms")))]

    def on_consumer_created(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        found = self._consumer_owner(h, expired, blocked)
        if found is None or found == "own":
            return None if found is None else []
        chan_pid, tag, queue = h.get("channel"), h.get("consumer_tag"), h.get("queue")
        prefetch = as_int(h.get("prefetch_count"))
        self.consumers[(chan_pid, tag)] = {"stage": found[0], "queue": queue, "tag": tag, "chan": chan_pid,
                                           "prefetch": prefetch}
        return [("consumer_created", t, dict(stage=found[0], queue=queue, tag=tag, chan=chan_pid, prefetch=prefetch,
                                             ack_required=as_bool(h.get("ack_required")),
                                             broker_ms=h.get("timestamp_in_ms")))]

    def on_consumer_deleted(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record] | None:
        found = self._consumer_owner(h, expired, blocked)
        if found is None or found == "own":
            return None if found is None else []
        chan_pid, tag = h.get("channel"), h.get("consumer_tag")
        self.consumers.pop((chan_pid, tag), None)
        return [("consumer_deleted", t, dict(stage=found[0], queue=h.get("queue"), tag=tag, chan=chan_pid,
                                             broker_ms=h.get("timestamp_in_ms")))]

    def _consumer_owner(self, h: dict, expired: bool, blocked: list[Event]) -> tuple[str | None] | str | None:
        """(stage,) for a consumer event that can be recorded, "own" for the observer's, None = wait."""
        chan_pid, tag = h.get("channel"), h.get("consumer_tag")
        chan = self.chans.get(chan_pid)
        if chan is None and not expired:
            return None
        if chan is not None and chan.own:
            return "own"
        if _waits_on(blocked, "consumer.created", chan_pid, field="channel", tag=tag):
            return None
        return (chan.stage if chan else None,)

    def on_queue_created(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record]:
        name = h.get("name")
        self.queue_generation[name] = self.queue_generation.get(name, 0) + 1
        if self.is_own_queue(name) or self._is_own_exclusive(h):
            return []
        return [("queue_created", t, dict(queue=name, durable=as_bool(h.get("durable")),
                                          auto_delete=as_bool(h.get("auto_delete")),
                                          arguments=h.get("arguments") or [], exclusive=as_bool(h.get("exclusive")),
                                          broker_ms=h.get("timestamp_in_ms")))]

    def on_queue_deleted(self, t: float, h: dict, expired: bool, blocked: list[Event]) -> list[Record]:
        if self.is_own_queue(h.get("name")):
            return []
        return [("queue_deleted", t, dict(queue=h.get("name"), broker_ms=h.get("timestamp_in_ms")))]

    # ------------------------------------------------------------------ helpers
    def is_own_queue(self, name: str | None) -> bool:
        return str(name or "").startswith(self.own_prefix)

    def _is_own_exclusive(self, headers: dict) -> bool:
        owner = self.conns.get(headers.get("owner_pid"))
        return bool(owner and owner.own)

    def open_connections(self) -> list[tuple[str | None, str | None]]:
        """(stage, broker name) of every open connection that is not the observer's."""
        return [(c.stage, c.name) for c in self.conns.values() if c.open and not c.own]


HANDLERS: dict[str, Callable[..., list[Record] | None]] = {
    BROKER_DOWN: Attribution.on_broker_down,
    NODE_DOWN: Attribution.on_node_down,
    "connection.created": Attribution.on_connection_created,
    "connection.closed": Attribution.on_connection_closed,
    "channel.created": Attribution.on_channel_created,
    "channel.closed": Attribution.on_channel_closed,
    "consumer.created": Attribution.on_consumer_created,
    "consumer.deleted": Attribution.on_consumer_deleted,
    "queue.created": Attribution.on_queue_created,
    "queue.deleted": Attribution.on_queue_deleted,
}


def _waits_on(events: list[Event], key: str, pid: Any, field: str = "pid", tag: Any = None) -> bool:
    """Whether one of ``events`` (still pending) is the creation an event depends on."""
    for _, k, h in events:
        if k == key and h.get(field) == pid and (tag is None or h.get("consumer_tag") == tag):
            return True
    return False


def _server_port(name: str | None) -> int | None:
    """The broker-side port of a connection name '127.0.0.1:CLIENT -> 127.0.0.1:PORT'."""
    try:
        return int(str(name).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
