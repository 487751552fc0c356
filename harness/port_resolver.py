"""Which stage owns a connection to the broker: by the stage's own broker user, else by its client port.

Each stage instance the harness starts logs in as a user of its own
(harness.broker.stage_user), so its connections are known by that user
wherever it runs: a child process, a container, another host. Connections of
other users (the harness's own, or an engine configured some other way) are
looked up by client port in the OS with psutil: the process tree of each
registered stage, and this process. What the port look-up already knows is
the cross-check: a user's connection whose port an earlier look-up found in
another stage's process tree is counted in ``mismatches``.

One implementation of attribution's resolver (``(port, user) -> stage |
None``). Not thread-safe: the observer's recorder thread is its only user.
"""
from __future__ import annotations

import time

import psutil

HARNESS = "harness"  # connections from the harness's own process (not the observer's)


class PortResolver:
    """Client ports of every registered stage process (and its children), and of this process."""

    def __init__(self, broker_port: int, own_pid: int, negative_ttl: float = 0.2):
        self.broker_port = broker_port
        self.own_pid = own_pid
        # How long a failed look-up is believed: the stage may not have registered its PID yet.
        self.negative_ttl = negative_ttl
        self.stage_pids: dict[str, int] = {}
        self.stage_users: dict[str, str] = {}  # broker user -> stage instance
        self.mismatches: list[tuple[int, str, str]] = []  # (port, stage by user, stage by process tree)
        self.skip: set[int] = set()  # the observer's own ports: never cached
        self._cache: dict[int, tuple[str | None, float]] = {}  # port -> (stage, believed until)

    def register(self, stage: str, pid: int, user: str | None = None) -> None:
        """A stage instance was spawned as ``pid`` logging in as ``user``: its connections are its own."""
        self.stage_pids[stage] = pid
        if user:
            self.stage_users[user] = stage
        # Forget failed look-ups: they may belong to this new process.
        self._cache = {p: v for p, v in self._cache.items() if v[0] is not None}

    def forget(self, port: int | None) -> None:
        """The connection on ``port`` closed: another process may get the port next."""
        if port is not None:
            self._cache.pop(port, None)

    def remember(self, port: int, stage: str) -> None:
        """Take ``port`` as ``stage``'s without asking the OS (for tests and benchmarks)."""
        self._cache[port] = (stage, float("inf"))

    def __call__(self, port: int | None, user: str | None = None) -> str | None:
        """Stage owning the connection: by its ``user`` when that is a stage's, else by client ``port``
        (HARNESS for this process); None when unknown."""
        by_user = self.stage_users.get(user) if user else None
        if by_user is not None:
            self._cross_check(port, by_user)
            return by_user
        return self._by_port(port)

    def _cross_check(self, port: int | None, stage: str) -> None:
        """Where the process tree also knows the port (a local child process), it must agree."""
        hit = self._cache.get(port) if port is not None else None
        if hit is not None and hit[0] is not None and hit[0] != stage:
            self.mismatches.append((port, stage, hit[0]))

    def _by_port(self, port: int | None) -> str | None:
        if port is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(port)
        if hit is not None and (hit[0] is not None or hit[1] > now):
            return hit[0]
        found = self.scan()
        for p, stage in found.items():
            if p not in self.skip:
                self._cache[p] = (stage, float("inf"))
        if port not in found:
            self._cache[port] = (None, now + self.negative_ttl)
        return found.get(port)

    def scan(self) -> dict[int, str]:
        found: dict[int, str] = {}
        owners = [(s, p, True) for s, p in self.stage_pids.items()] + [(HARNESS, self.own_pid, False)]
        for stage, pid, with_children in owners:
            try:
                root = psutil.Process(pid)
                procs = [root] + (root.children(recursive=True) if with_children else [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for proc in procs:
                try:
                    conns = proc.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                for c in conns:
                    if c.laddr and c.raddr and c.raddr.port == self.broker_port:
                        found.setdefault(c.laddr.port, stage)
        return found
