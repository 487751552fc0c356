"""Per-test isolation cost: a fresh vhost on a running broker vs a fresh broker.

Since issue 14 each stage instance also gets a broker user of its own (``StageLauncher.stage_user``:
created with its permissions on the test's vhost, deleted with the vhost); the per-test cost with
``--stage-users`` such users (default 3: an explorer and two workers) is measured beside the bare vhost.

Both are measured in the same run, on this machine, with the harness's own
code: the vhost path is exactly what the ``vhost`` fixture does (create the
vhost, switch its tracer on, grant permissions; delete it at teardown); the
broker path is what the ``local`` provider does for a session (start a
private rabbitmq-server until it is ready, stop it). The last line is

    RESULT isolation_speedup <x> x goal >=20 PASS|FAIL
    RESULT isolation_speedup_with_stage_users <x> x goal >=20 PASS|FAIL

Run: python bench/isolation.py [--vhosts 50] [--brokers 3] [--stage-users 3] [--stop kill|graceful]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.broker import LocalBroker, find_rabbitmq_bin, stage_user  # noqa: E402
from harness.broker_plugin import _create_vhost  # noqa: E402
from harness.watchdog import stop_watchdog  # noqa: E402

GOAL = 20.0


def fmt(seconds: list[float]) -> str:
    return (f"mean {1000 * statistics.mean(seconds):.1f} ms, median {1000 * statistics.median(seconds):.1f} ms, "
            f"min {1000 * min(seconds):.1f} ms, max {1000 * max(seconds):.1f} ms, n={len(seconds)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vhosts", type=int, default=50)
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--stage-users", type=int, default=3, help="stage instances (broker users) per test")
    parser.add_argument("--stop", choices=["kill", "graceful"], default="kill",
                        help="how the fresh brokers are stopped (kill is the harness default and the cheaper)")
    args = parser.parse_args()
    if find_rabbitmq_bin() is None:
        print("rabbitmq-server is not installed (sudo apt-get install rabbitmq-server)")
        print(f"RESULT isolation_speedup 0 x goal >={GOAL:.0f} FAIL")
        return 1
    with tempfile.TemporaryDirectory(prefix="qp-bench-isolation-") as tmp:
        broker_costs, starts, stops = [], [], []
        for i in range(args.brokers):
            local = LocalBroker(Path(tmp) / f"broker{i}", stop_mode=args.stop)
            began = time.monotonic()
            local.start()
            started = time.monotonic()
            local.stop()
            broker_costs.append(time.monotonic() - began)
            starts.append(started - began)
            stops.append(time.monotonic() - started)

        local = LocalBroker(Path(tmp) / "session", stop_mode=args.stop)
        broker = local.start()
        try:
            for i in range(3):  # warm-up: first requests pay for connection set-up
                broker.management.delete_vhost(_create_vhost(broker, "warmup"))
            vhost_costs = []
            for _ in range(args.vhosts):
                began = time.monotonic()
                name = _create_vhost(broker, "bench")
                broker.management.delete_vhost(name)
                vhost_costs.append(time.monotonic() - began)
            user_costs = []
            for _ in range(args.vhosts):
                began = time.monotonic()
                name = _create_vhost(broker, "bench")
                for n in range(args.stage_users):
                    broker.management.create_user(stage_user(name, f"stage#{n + 1}"), "a-password", name)
                broker.management.delete_vhost(name)  # deletes the vhost's stage users too
                user_costs.append(time.monotonic() - began)
            left = [u for u in broker.management.users() if ".stage#" in u]
            if left:
                print(f"stage users left after their vhosts were deleted: {left[:5]}")
        finally:
            local.stop()
    stop_watchdog()

    vhost = statistics.mean(vhost_costs)
    fresh = statistics.mean(broker_costs)
    speedup = fresh / vhost
    print(f"fresh vhost per test  (create + tracer on + permissions, delete): {fmt(vhost_costs)}")
    print(f"fresh broker per test (start until ready + stop '{args.stop}'): "
          f"mean {fresh:.2f} s = start {statistics.mean(starts):.2f} s + stop {statistics.mean(stops):.2f} s, "
          f"n={len(broker_costs)}")
    with_users = statistics.mean(user_costs)
    print(f"fresh vhost with {args.stage_users} stage users (create vhost, users, permissions; delete all): "
          f"{fmt(user_costs)}")
    verdict = "PASS" if speedup >= GOAL else "FAIL"
    print(f"RESULT isolation_speedup {speedup:.1f} x goal >={GOAL:.0f} {verdict}")
    users_speedup = fresh / with_users
    users_verdict = "PASS" if users_speedup >= GOAL else "FAIL"
    print(f"RESULT isolation_speedup_with_stage_users {users_speedup:.1f} x goal >={GOAL:.0f} {users_verdict}")
    return 0 if verdict == users_verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
