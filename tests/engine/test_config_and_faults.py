"""Settings the way run_stage reads them, and the fault table (no broker)."""
import re
from pathlib import Path

import pytest

from reference_engine import config, faults

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference-engine.md"


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text('LOG_LEVEL = "DEBUG"\n[amqp]\nAMQP_HOST = "10.0.0.1"\nAMQP_PORT = 5673\n'
                    'AMQP_USER = "u"\nAMQP_PWD = "p"\nAMQP_VHOST = "/v"\n')
    return {"OS2DS_ENGINE_USER_CONFIG_PATH": str(path)}


def test_toml_file(cfg):
    s = config.load_settings("worker", cfg)
    assert (s.amqp_host, s.amqp_port, s.amqp_user, s.amqp_password, s.amqp_vhost) == ("10.0.0.1", 5673, "u", "p", "/v")
    assert s.log_level == "DEBUG" and s.check_seconds == 5.0 and s.work_seconds == 0
    assert s.queue_priority == [] and s.read_queues == ["os2ds_conversions"] and s.prefetch == 2
    assert config.load_settings("explorer", cfg).read_queues == ["os2ds_scan_specs"]
    assert config.load_settings("explorer", cfg).prefetch == 1


def test_env_overrides(cfg):
    s = config.load_settings("worker", {**cfg, "amqp__AMQP_HOST": "broker", "amqp__AMQP_PORT": "6000",
                                        "amqp__AMQP_VHOST": "tenant", "amqp__AMQP_PWD": "secret"})
    assert (s.amqp_host, s.amqp_port, s.amqp_vhost, s.amqp_password) == ("broker", 6000, "tenant", "secret")


def test_queue_priority_and_check_period(cfg):
    s = config.load_settings("worker", {**cfg, "QUEUE_PRIORITY": " a  b\ta c,d ", "PRIORITY_CHECK_SECONDS": "0.25",
                                        "REFERENCE_WORK_SECONDS": "0.5"})
    assert s.queue_priority == ["a", "b", "c,d"]
    assert s.check_seconds == 0.25 and s.work_seconds == 0.5
    assert config.load_settings("worker", {**cfg, "QUEUE_PRIORITY": "   "}).read_queues == ["os2ds_conversions"]


def test_prefetch_can_be_set_for_the_pace_matrix(cfg):
    assert config.load_settings("worker", {**cfg, "REFERENCE_PREFETCH": "10"}).prefetch == 10
    assert config.load_settings("explorer", {**cfg, "REFERENCE_PREFETCH": "1"}).prefetch == 1
    assert config.load_settings("worker", {**cfg, "REFERENCE_PREFETCH": " "}).prefetch == 2


@pytest.mark.parametrize("env,msg", [
    ({}, "OS2DS_ENGINE_USER_CONFIG_PATH"),
    ({"OS2DS_ENGINE_USER_CONFIG_PATH": "/nonexistent.toml"}, "cannot read"),
])
def test_missing_config(env, msg):
    with pytest.raises(config.ConfigError, match=msg):
        config.load_settings("worker", env)


@pytest.mark.parametrize("key,value", [("PRIORITY_CHECK_SECONDS", "0"), ("PRIORITY_CHECK_SECONDS", "x"),
                                       ("REFERENCE_WORK_SECONDS", "-1"), ("REFERENCE_ENGINE_FAULTS", "nope"),
                                       ("REFERENCE_PREFETCH", "0"), ("REFERENCE_PREFETCH", "ten")])
def test_bad_values(cfg, key, value):
    with pytest.raises(config.ConfigError, match=key):
        config.load_settings("worker", {**cfg, key: value})


def test_slow_check_fault_stretches_the_period(cfg):
    s = config.load_settings("worker", {**cfg, "REFERENCE_ENGINE_FAULTS": "slow_check, two_lower"})
    assert s.faults == {"slow_check", "two_lower"} and s.effective_check_seconds == 32.0


def test_docs_fault_table_matches_faults_py():
    text = DOC.read_text()
    assert faults.markdown_table() in text, "regenerate with: python -m reference_engine.faults --markdown"


def test_faults_cli(capsys):
    assert faults.main([]) == 0
    out = capsys.readouterr().out
    for name in faults.FAULTS:
        assert re.search(rf"^{name}\s", out, re.M)
