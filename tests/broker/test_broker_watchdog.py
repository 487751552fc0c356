"""The watchdog on its own: bookkeeping, recycled ids, SIGTERM then SIGKILL when the owner dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from broker_support import REPO, alive, inner_env, kill_pids
from harness import watchdog

OWNER = """
import subprocess, sys, time
from harness import watchdog
polite = subprocess.Popen(["sleep", "300"], start_new_session=True)
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
    start_new_session=True, stdout=subprocess.PIPE, text=True)
stubborn.stdout.readline()
watchdog.register_process_group(polite.pid)
watchdog.register_process_group(stubborn.pid, grace=1.0)
print(polite.pid, stubborn.pid, watchdog.watchdog_pid(), flush=True)
time.sleep(300)
"""


def test_groups_are_stopped_when_the_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             env=inner_env(), cwd=REPO, start_new_session=True)
    pids = []
    try:
        pids = [int(x) for x in owner.stdout.readline().split()]
        assert len(pids) == 3 and alive(pids) == pids
        owner.kill()
        owner.wait()
        killed = time.monotonic()
        while alive(pids) and time.monotonic() - killed < 15:
            time.sleep(0.1)
        assert alive(pids) == []
        assert time.monotonic() - killed >= 1.0  # the stubborn one got its grace before SIGKILL
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()
        kill_pids(pids)


BOOKKEEPING = """
import signal, subprocess
from harness import watchdog
sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
try:
    watchdog.register_process_group(sleeper.pid)
    assert sleeper.pid in watchdog.registered_process_groups()
    assert watchdog.watchdog_pid() is not None
    watchdog.unregister_process_group(sleeper.pid)
    assert sleeper.pid not in watchdog.registered_process_groups()
    watchdog.register_process_group(sleeper.pid)
    # Anything still registered when the run ends is stopped by the sweep.
    watchdog.stop_watchdog()
    sleeper.wait(10)
    print(sleeper.returncode, flush=True)
finally:
    if sleeper.poll() is None:
        sleeper.kill()
"""


def test_registration_bookkeeping_and_sweep_at_stop():
    # In a process of its own: stop_watchdog() sweeps every group this process registered,
    # and in this test process that would include the session's broker.
    done = subprocess.run([sys.executable, "-c", BOOKKEEPING], cwd=REPO, env=inner_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(-signal.SIGTERM)]


def test_a_recycled_group_id_is_left_alone():
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        wrong_start_time = psutil.Process(sleeper.pid).create_time() - 100
        watchdog.stop_groups({sleeper.pid: (wrong_start_time, 0.0)})
        assert sleeper.poll() is None
        watchdog.stop_groups({sleeper.pid: (psutil.Process(sleeper.pid).create_time(), 0.0)})
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
