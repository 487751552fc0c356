"""Helpers for the broker tests: run a pytest of its own in a subprocess, check pids."""
from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def inner_pytest_command(*args: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    if "harness.plugin" not in {ep.value for ep in importlib.metadata.entry_points(group="pytest11")}:
        command += ["-p", "harness.plugin"]
    return command + list(args)


def inner_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


class InnerRun:
    """A test file written to a directory of its own, run by a child pytest."""

    def __init__(self, directory: Path, source: str):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "test_inner.py").write_text(textwrap.dedent(source))
        (directory / "pytest.ini").write_text("[pytest]\n")

    def command(self, *args: str) -> list[str]:
        return inner_pytest_command("--basetemp", str(self.directory / "tmp"), *args)

    def run(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.directory, env=inner_env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), cwd=self.directory, env=inner_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=ctrl_c_as_at_a_terminal)


def ctrl_c_as_at_a_terminal() -> None:
    """In the child before it runs: SIGINT does what Ctrl-C at a terminal does. A shell without job
    control starts background commands with SIGINT ignored, and an ignored signal stays ignored through
    exec, so a test suite started that way (``.ci/run &``) would hand its children a Ctrl-C that does
    nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    result = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


def kill_pids(pids) -> None:
    """Last-resort cleanup in a failing test: by pid, never by name."""
    for pid in alive(pids):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
