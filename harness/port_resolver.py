"""Which stage owns a client port to the broker, asked of the OS with psutil.

One implementation of attribution's resolver (``port -> stage | None``). Not
thread-safe: the observer's recorder thread is its only user.
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
        self.skip: set[int] = set()  # the observer's own ports: never cached
        self._cache: dict[int, tuple[str | None, float]] = {}  # port -> (stage, believed until)

    def register(self, stage: str, pid: int) -> None:
        """A stage instance was spawned as ``pid``; its connections (and its children's) are its own."""
        self.stage_pids[stage] = pid
        # Forget failed look-ups: they may belong to this new process.
        self._cache = {p: v for p, v in self._cache.items() if v[0] is not None}

    def forget(self, port: int | None) -> None:
        """The connection on ``port`` closed: another process may get the port next."""
        if port is not None:
            self._cache.pop(port, None)

    def remember(self, port: int, stage: str) -> None:
        """Take ``port`` as ``stage``'s without asking the OS (for tests and benchmarks)."""
        self._cache[port] = (stage, float("inf"))

    def __call__(self, port: int | None) -> str | None:
        """Stage owning client port ``port``: HARNESS for this process, None when unknown."""
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
