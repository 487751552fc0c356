"""Helpers for the robustness tests (imported as robust_support; conftest.py has the fixture): a child pytest run in a folder of its own, and its processes.

Each test runs ``python -m pytest -p no:cacheprovider`` in a subprocess, in a
temporary folder holding a ``pytest.ini``, a ``conftest.py`` (child_conftest.py:
records the broker's process groups and the watchdog's pid) and the scenario
files named on its command line. Every process the child started is then found
by PID (records, and the ``stage_started`` events of its histories), never by name.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "broker"))
from broker_support import (alive, ctrl_c_as_at_a_terminal, inner_env, inner_pytest_command,  # noqa: E402
                            kill_pids)

HERE = Path(__file__).resolve().parent
ENGINES = HERE / "engines"
SCENARIOS = HERE / "scenario_files"  # not "scenarios": the outer pytest must not collect them


def engine(name: str) -> str:
    """An --engine-cmd template running one of the helper engines under engines/."""
    return f"{sys.executable} {ENGINES / name}.py {{stage}}"


@dataclass
class Finished:
    returncode: int
    output: str
    seconds: float


class ChildRun:
    """A child pytest in ``directory``: scenario files copied in, PIDs it started collected afterwards."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "pytest.ini").write_text("[pytest]\n")
        shutil.copy(HERE / "child_conftest.py", directory / "conftest.py")
        self.record = directory / "record.jsonl"
        self.popen: subprocess.Popen | None = None

    def add(self, scenario: str, as_name: str | None = None, **replace: str) -> str:
        """Copy scenario_files/<scenario>.yaml in (``replace``: text substitutions); returns its file name."""
        text = (SCENARIOS / f"{scenario}.yaml").read_text()
        for old, new in replace.items():
            assert old in text, f"{old!r} not in {scenario}.yaml"
            text = text.replace(old, new)
        name = f"{as_name or scenario}.yaml"
        (self.directory / name).write_text(text)
        return name

    def command(self, *args: str) -> list[str]:
        return inner_pytest_command("--basetemp", str(self.directory / "tmp"), "--rabbitmq-provider", "local",
                                    *args)

    def run(self, *args: str, timeout: float = 150, **env: str) -> Finished:
        began = time.monotonic()
        done = subprocess.run(self.command(*args), cwd=self.directory, env=self.env(**env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return Finished(done.returncode, done.stdout, time.monotonic() - began)

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        self.popen = subprocess.Popen(self.command(*args), cwd=self.directory, env=self.env(**env),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, preexec_fn=ctrl_c_as_at_a_terminal)
        return self.popen

    def env(self, **extra: str) -> dict[str, str]:
        return inner_env(QP_RECORD=str(self.record), **extra)

    # -- what the child left behind ---------------------------------------------------
    def records(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def histories(self) -> list[list[dict]]:
        return [[json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                for path in sorted((self.directory / "reports").rglob("history.jsonl"))]

    def stage_events(self, kind: str = "stage_started") -> list[dict]:
        return [e for history in self.histories() for e in history if e.get("type") == kind]

    def pids(self) -> dict[str, list[int]]:
        """Every process the child is known to have started, by what it was."""
        found: dict[str, list[int]] = {"pytest": [], "broker": [], "watchdog": [], "stage": []}
        for r in self.records():
            if r.get("event") != "test":
                continue
            found["pytest"].append(r["pid"])
            found["broker"] += r["members"]
            if r.get("watchdog"):
                found["watchdog"].append(r["watchdog"])
        found["stage"] = [e["pid"] for e in self.stage_events()]
        if self.popen is not None:
            found["pytest"].append(self.popen.pid)
        return {k: sorted(set(v)) for k, v in found.items()}

    def assert_nothing_left(self, within: float = 15.0) -> float:
        """All known PIDs gone within ``within`` seconds; returns how long that took."""
        pids = [p for group in self.pids().values() for p in group]
        began = time.monotonic()
        while alive(pids) and time.monotonic() - began < within:
            time.sleep(0.2)
        left = {what: alive(group) for what, group in self.pids().items() if alive(group)}
        assert not left, f"still running {within:g} s after the child ended: {left}"
        return time.monotonic() - began

    def cleanup(self) -> None:
        """Last resort for a failing test: by PID and by the child's own process group only."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, 9)
            except ProcessLookupError:
                pass
            self.popen.wait(10)
        kill_pids([p for group in self.pids().values() for p in group])


def assert_no_traceback(output: str) -> None:
    assert "Traceback (most recent call last)" not in output, output
    assert not any(line.startswith("E   ") for line in output.splitlines()), output
