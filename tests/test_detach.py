"""harness.detach: a stage started outside the launched process's tree, with a container runtime's manners."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from waiting import wait_until

DETACH = [sys.executable, "-m", "harness.detach"]
# A stand-in engine: prints its pid, then runs until told otherwise.
SLEEPER = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"]
DEADLINE = 10.0



@pytest.fixture
def detached():
    started = []

    def start(command=SLEEPER):
        wrapper = subprocess.Popen(DETACH + command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        engine = psutil.Process(int(wrapper.stdout.readline()))
        started.append(engine)
        return wrapper, engine
    yield start
    for engine in started:  # nothing left running, whatever a test did
        if engine.is_running():
            engine.kill()


def test_the_command_is_not_a_descendant_and_its_exit_code_comes_back(detached):
    wrapper, engine = detached([sys.executable, "-c", "import os, sys, time; print(os.getpid(), flush=True); "
                                                      "time.sleep(0.5); sys.exit(7)"])
    assert engine.pid not in [p.pid for p in psutil.Process(wrapper.pid).children(recursive=True)]
    assert os.getsid(engine.pid) != os.getsid(wrapper.pid)
    assert wrapper.wait(DEADLINE) == 7


def test_sigterm_is_forwarded_and_the_wrapper_ends_by_it(detached):
    wrapper, engine = detached()
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(DEADLINE) == -signal.SIGTERM
    wait_until(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, DEADLINE, "the engine gone")


def test_killing_the_wrappers_group_leaves_nothing_running(detached):
    wrapper, engine = detached()
    os.killpg(wrapper.pid, signal.SIGKILL)  # how the harness kills a stage
    wrapper.wait(DEADLINE)
    wait_until(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, DEADLINE, "the engine gone")


def test_a_stopped_wrapper_stops_the_command_and_a_continued_one_continues_it(detached):
    wrapper, engine = detached()
    os.killpg(wrapper.pid, signal.SIGSTOP)  # a pause fault
    wait_until(lambda: engine.status() == psutil.STATUS_STOPPED, DEADLINE, "the engine stopped")
    os.killpg(wrapper.pid, signal.SIGCONT)
    wait_until(lambda: engine.status() != psutil.STATUS_STOPPED, DEADLINE, "the engine running again")
    wrapper.terminate()
    assert wrapper.wait(DEADLINE) == -signal.SIGTERM


def test_a_command_that_cannot_start_is_reported():
    done = subprocess.run(DETACH + ["/nonexistent/engine"], capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 127
    assert "cannot start /nonexistent/engine" in done.stderr
