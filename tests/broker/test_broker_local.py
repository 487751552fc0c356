"""The local provider: a private rabbitmq-server that starts, fails loudly, and stops completely."""
from __future__ import annotations

import fcntl

import pytest

from harness import broker as broker_module
from harness.broker import BrokerError, LocalBroker, PortClaims, find_rabbitmq_bin
from harness.watchdog import group_members, registered_process_groups

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")


def test_a_broker_that_cannot_start_reports_its_log_tail(tmp_path):
    local = LocalBroker(tmp_path, start_timeout=60, extra_config="qp_no_such_setting = 1")
    with pytest.raises(BrokerError) as failure:
        local.start()
    message = str(failure.value)
    assert "exited with code" in message
    assert "log tail" in message and str(local.log_path) in message
    assert "unknown variable: qp_no_such_setting" in message
    assert not any(group_members(proc.pid) for proc in (local.process, local.epmd))
    assert not set(registered_process_groups()) & {local.process.pid, local.epmd.pid}
    assert not (tmp_path.parent / "erl_crash.dump").exists()


def test_a_broker_not_ready_in_time_reports_its_log_tail_and_is_stopped(tmp_path):
    local = LocalBroker(tmp_path, start_timeout=0.5)
    with pytest.raises(BrokerError) as failure:
        local.start()
    assert "not ready after" in str(failure.value) and "log tail" in str(failure.value)
    assert not any(group_members(proc.pid) for proc in (local.process, local.epmd))


def test_missing_install_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "RABBITMQ_BIN_DIRS", ())
    with pytest.raises(BrokerError, match="apt-get install rabbitmq-server"):
        LocalBroker(tmp_path, bin_dir=tmp_path / "nowhere").start()


@pytest.mark.parametrize("stop_mode", ["kill", "graceful"])
def test_start_and_stop_leave_nothing_running(tmp_path, stop_mode):
    local = LocalBroker(tmp_path, stop_mode=stop_mode)
    broker = local.start()
    members = [p.pid for g in broker.process_groups for p in group_members(g)]
    assert len(members) >= 2  # at least beam and epmd
    assert set(broker.process_groups) <= set(registered_process_groups())
    local.stop()
    assert not any(group_members(g) for g in broker.process_groups)
    assert not set(broker.process_groups) & set(registered_process_groups())
    assert local.timings["start"] < 60


def test_port_claims_are_exclusive(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "CLAIMS_DIR", tmp_path)
    first, second = PortClaims(), PortClaims()
    ports = [first.claim() for _ in range(20)] + [second.claim() for _ in range(20)]
    assert len(set(ports)) == 40
    # A claimed port is refused to anyone else until released.
    with open(tmp_path / f"port-{ports[0]}.lock", "a") as handle:
        with pytest.raises(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.release()
    with open(tmp_path / f"port-{ports[0]}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    second.release()
