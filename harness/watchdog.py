"""A watchdog that stops our child process groups when pytest is gone.

Everything the harness starts (the local broker and its epmd, the stages)
runs in a process group of its own (``start_new_session=True``) and is
registered here with :func:`register_process_group`. The first registration
starts one small watchdog process per Python process (``python -m
harness.watchdog``, in a session of its own so Ctrl-C does not reach it). It
polls its owners (this process and, in an xdist worker, the controller) and,
as soon as one of them is gone — even after SIGKILL, when no ``finally`` or
``atexit`` runs — signals every group still registered: SIGTERM, a grace
period, then SIGKILL. Groups are only ever addressed by their id, never found
by name.

The registry is a small append-only text file: ``+PGID CTIME GRACE`` adds a
group (CTIME is the leader's start time, so a recycled id is not killed),
``-PGID`` removes it. On a normal exit :func:`stop_watchdog` (called from the
plugin's ``pytest_unconfigure`` and from ``atexit``) sweeps what is still
registered and ends the watchdog.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

POLL_INTERVAL = 0.25
DEFAULT_GRACE = 3.0

_lock = threading.Lock()
_proc: subprocess.Popen | None = None
_registry: Path | None = None
_owner_pid: int | None = None


# --------------------------------------------------------------------------- client side

def register_process_group(pgid: int, grace: float = DEFAULT_GRACE) -> None:
    """Have the watchdog stop process group ``pgid`` if this process dies.

    ``grace`` is how long the group gets between SIGTERM and SIGKILL (0: straight
    SIGKILL). Call :func:`unregister_process_group` once you have stopped it yourself.
    """
    _ensure_started()
    _append(f"+{pgid} {_start_time(pgid):.3f} {grace}")


def unregister_process_group(pgid: int) -> None:
    if _registry is not None and _owner_pid == os.getpid():
        _append(f"-{pgid}")


def registered_process_groups() -> list[int]:
    """The groups this process has registered and not yet unregistered."""
    if _registry is None or _owner_pid != os.getpid():
        return []
    return list(_read_registry(_registry))


def watchdog_pid() -> int | None:
    return _proc.pid if _proc is not None and _owner_pid == os.getpid() else None


def stop_watchdog(timeout: float = 20.0) -> None:
    """Sweep the groups still registered and end the watchdog (normal exit)."""
    global _proc, _registry, _owner_pid
    with _lock:
        proc, registry = _proc, _registry
        if proc is None or _owner_pid != os.getpid():
            return
        _proc = _registry = _owner_pid = None
    # Sweep here, not in the watchdog: it may not even have finished starting yet.
    if registry is not None:
        stop_groups(_read_registry(registry))
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
    if registry is not None:
        shutil.rmtree(registry.parent, ignore_errors=True)


def owner_pids() -> list[int]:
    """Processes whose death means our groups must go: this one and an xdist controller."""
    owners = [os.getpid()]
    if os.environ.get("PYTEST_XDIST_WORKER") and os.getppid() > 1:
        owners.append(os.getppid())
    return owners


def _ensure_started() -> None:
    global _proc, _registry, _owner_pid
    with _lock:
        if _proc is not None and _owner_pid == os.getpid() and _proc.poll() is None:
            return
        directory = Path(tempfile.mkdtemp(prefix="qp-watchdog-"))
        registry = directory / "groups"
        registry.touch()
        command = [sys.executable, "-m", "harness.watchdog", "--registry", str(registry)]
        for pid in owner_pids():
            command += ["--owner", f"{pid}:{_start_time(pid):.3f}"]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        _proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        _registry, _owner_pid = registry, os.getpid()
        atexit.register(stop_watchdog)


def _append(line: str) -> None:
    with _lock:
        if _registry is None:
            return
        with open(_registry, "a") as f:
            f.write(line + "\n")


def _start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _read_registry(registry: Path) -> dict[int, tuple[float, float]]:
    groups: dict[int, tuple[float, float]] = {}
    try:
        text = registry.read_text()
    except OSError:
        return groups
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0].startswith("+") and len(parts) == 3:
            groups[int(parts[0][1:])] = (float(parts[1]), float(parts[2]))
        elif parts[0].startswith("-"):
            groups.pop(int(parts[0][1:]), None)
    return groups


# --------------------------------------------------------------------------- process groups

def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _same_group(pgid: int, ctime: float) -> bool:
    """False when the leader's id was recycled by an unrelated process."""
    try:
        leader = psutil.Process(pgid)
    except psutil.NoSuchProcess:
        return True  # leader gone; its group (if any members remain) is still ours
    return ctime == 0.0 or abs(leader.create_time() - ctime) < 0.01


def stop_groups(groups: dict[int, tuple[float, float]]) -> None:
    """SIGTERM each group, wait its grace, SIGKILL what is left."""
    groups = {g: v for g, v in groups.items() if _same_group(g, v[0])}
    deadlines = {}
    for pgid, (_ctime, grace) in groups.items():
        _killpg(pgid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        deadlines[pgid] = time.monotonic() + grace
    pending = set(groups)
    while pending:
        for pgid in list(pending):
            if not group_members(pgid):
                pending.discard(pgid)
            elif time.monotonic() >= deadlines[pgid]:
                _killpg(pgid, signal.SIGKILL)
                deadlines[pgid] = time.monotonic() + 5
        if pending:
            time.sleep(0.1)
            if all(time.monotonic() > d + 5 for d in deadlines.values()):
                break


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- watchdog process

def process_alive(pid: int, ctime: float) -> bool:
    """Is the process that started at ``ctime`` still running under ``pid`` (not a reused pid)?"""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - ctime) < 0.01
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--owner", action="append", required=True, help="PID:START_TIME")
    args = parser.parse_args(argv)
    owners = [(int(p), float(t)) for p, t in (o.split(":") for o in args.owner)]
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set() and all(process_alive(pid, ctime) for pid, ctime in owners):
        stop.wait(POLL_INTERVAL)
    stop_groups(_read_registry(args.registry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
