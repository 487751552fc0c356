"""conftest.py of the child pytest runs of tests/robustness (copied into the child's folder).

Before each test that uses the broker it appends one JSON line to $QP_RECORD:
the child's pid, the broker's process groups and their members, the watchdog's
pid. With $QP_KILL_BROKER_AFTER=S it SIGKILLs the broker's process groups S
seconds into the first such test (a broker that dies mid-test).
"""
import json
import os
import signal
import threading
import time

import pytest

from harness.watchdog import group_members, watchdog_pid


def _record(**line):
    with open(os.environ["QP_RECORD"], "a") as f:
        f.write(json.dumps(line) + "\n")


_killer = []


@pytest.fixture(autouse=True)
def _qp_record_pids(request):
    if "broker" not in request.fixturenames or "QP_RECORD" not in os.environ:
        yield
        return
    broker = request.getfixturevalue("broker")
    groups = list(broker.process_groups)
    _record(event="test", test=request.node.nodeid, pid=os.getpid(), groups=groups,
            members=[p.pid for g in groups for p in group_members(g)], watchdog=watchdog_pid())
    after = os.environ.get("QP_KILL_BROKER_AFTER")
    if after and not _killer:
        def kill():
            time.sleep(float(after))
            groups = list(broker.process_groups)  # as they are now: a restart_broker fault renews them
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _record(event="broker_killed", groups=groups, t=time.time())
        _killer.append(threading.Thread(target=kill, daemon=True))
        _killer[0].start()
    yield
