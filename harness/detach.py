"""Run an engine stage detached from the process that launched it, as ``docker run``, ``ssh`` or ``kubectl`` do.

    python -m harness.detach CMD [ARGS ...]
    pytest suites/ --engine-cmd "python -m harness.detach python -m reference_engine.run_stage {stage}"

CMD is started by a double fork in a session of its own, so it is not a descendant of this
wrapper: the harness cannot find it by walking the process tree of the command it launched, and
must tie the stage's broker connections to it in another way (as with a container or another host).

The wrapper stays the stage process the harness sees, with what a container runtime gives:
- it waits for CMD and exits as CMD did (the same code, or the same signal);
- SIGTERM, SIGINT and SIGHUP are forwarded to CMD;
- when the wrapper is stopped (SIGSTOP: a pause fault) CMD is stopped too, and continued with it;
- when the wrapper dies (SIGKILL) its keeper in the new session kills CMD, so nothing is left behind.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_SECONDS = 0.05  # how quickly the keeper mirrors a stop, a continue or the wrapper's death


def main(argv: list[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else argv
    if not command:
        print("usage: python -m harness.detach CMD [ARGS ...]", file=sys.stderr)
        return 2
    status_read, status_write = os.pipe()  # keeper -> wrapper: CMD's pid, then how it ended
    alive_read, alive_write = os.pipe()  # the wrapper holds the write end; EOF tells the keeper it is gone
    wrapper = os.getpid()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.close(status_read)
            os.close(alive_write)
            _keep(command, wrapper, status_write, alive_read)
        os._exit(0)
    os.close(status_write)
    os.close(alive_read)
    os.waitpid(middle, 0)
    return _wait(status_read)


def _keep(command: list[str], wrapper: int, status_fd: int, alive_fd: int) -> None:
    """The keeper, in its own session: start CMD, mirror the wrapper's state on it, report how it ended."""
    try:
        engine = subprocess.Popen(command)
    except OSError as exc:
        print(f"harness.detach: cannot start {command[0]}: {exc.strerror}", file=sys.stderr)
        os.write(status_fd, b"start-failed\n127\n")
        os._exit(127)
    os.write(status_fd, f"{engine.pid}\n".encode())
    stopped = False
    while engine.poll() is None:
        readable, _, _ = select.select([alive_fd], [], [], POLL_SECONDS)
        if readable:  # EOF: the wrapper is gone (killed); CMD must not outlive it
            engine.kill()
            engine.wait()
            os._exit(1)
        if is_stopped(wrapper) != stopped:
            stopped = not stopped
            _signal(engine.pid, signal.SIGSTOP if stopped else signal.SIGCONT)
    os.write(status_fd, f"{engine.returncode}\n".encode())
    os._exit(0)


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc/PID/stat (R, S, T, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP: state T)."""
    return process_state(pid) in ("T", "t")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended in between; the keeper's loop sees that next


def _wait(status_fd: int) -> int:
    """In the wrapper: forward signals to CMD until the keeper says how it ended; end the same way."""
    with os.fdopen(status_fd, encoding="ascii") as status:
        first = status.readline().strip()
        if first == "start-failed":
            return int(status.readline().strip() or 127)
        if not first.isdigit():
            print("harness.detach: the keeper ended before starting the command", file=sys.stderr)
            return 1
        engine = int(first)
        for sig in FORWARDED:
            signal.signal(sig, lambda number, _frame: _signal(engine, number))
        ended = status.readline().strip()
    if not ended.lstrip("-").isdigit():
        print("harness.detach: the keeper ended without the command's status", file=sys.stderr)
        return 1
    code = int(ended)
    if code < 0:  # ended by a signal: end by the same one, as the harness reads a stage's exit
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
