"""Stages as containers (--engine-image, harness.container): configuration tested here; the live run needs Docker."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from harness.container import CONFIG_IN_CONTAINER, ContainerSpec
from harness.providers import docker_engine_answers
from harness.scenario_plugin import engine_from, engine_profile, windows_from

pytest_plugins = ["pytester"]
IMAGE = "magentaaps/os2datascanner-engine:3.32.4"


@pytest.fixture
def parse(pytester: pytest.Pytester):
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\ncheck_period = "1"\nengine_env = ["PRIORITY_CHECK_SECONDS=1"]\n')
    return pytester.parseconfig


def test_an_image_makes_every_stage_the_container_wrapper_with_the_stage_as_its_command(parse):
    words = engine_from(parse("--engine-image", IMAGE)).command
    assert words == [sys.executable, "-m", "harness.container", "--image", IMAGE, "--network", "host", "--", "{stage}"]


def test_an_image_with_an_engine_command_runs_that_command_inside(parse):
    config = parse("--engine-image", IMAGE, "--engine-network", "bridge", "--engine-cmd", "run_stage {stage}")
    assert engine_from(config).command[-5:] == ["--network", "bridge", "--", "run_stage", "{stage}"]


def test_an_image_is_another_engine_than_the_ini_profile(parse):
    config = parse("--engine-image", IMAGE)
    assert not engine_profile(config).applies
    assert windows_from(config).check_period == 5.0
    assert engine_from(config).env == {}


def test_the_container_gets_the_stage_variables_and_the_config_read_only_never_the_hosts(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text("[amqp]\nAMQP_HOST = '127.0.0.1'\n")
    environ = {"PATH": "/usr/bin", "HOME": "/root", "QUEUE_PRIORITY": "a b", "CONVERSION_PRIORITY": "delta full",
               "LOG_LEVEL": "debug", "QP_STAGE_ENV": "LOG_LEVEL", "OS2DS_ENGINE_USER_CONFIG_PATH": str(config)}
    spec = ContainerSpec.from_environment(IMAGE, ["worker"], environ)
    assert spec.env == {"CONVERSION_PRIORITY": "delta full", "LOG_LEVEL": "debug",
                        "OS2DS_ENGINE_USER_CONFIG_PATH": CONFIG_IN_CONTAINER, "QUEUE_PRIORITY": "a b"}
    assert spec.volumes == [(str(config.resolve()), CONFIG_IN_CONTAINER, "ro")]
    assert spec.docker_kwargs == {"network_mode": "host"}
    assert spec.for_bridge(tmp_path) is spec  # host networking: the config as written


def test_on_the_bridge_the_broker_is_reached_at_the_host(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text(tomli_w.dumps({"amqp": {"AMQP_HOST": "127.0.0.1", "AMQP_PORT": 5672}}))
    spec = ContainerSpec.from_environment(IMAGE, ["worker"], {"OS2DS_ENGINE_USER_CONFIG_PATH": str(config)},
                                          network="bridge").for_bridge(tmp_path)
    mounted = tomllib.loads(Path(spec.config_path).read_text())
    assert mounted["amqp"] == {"AMQP_HOST": "host.docker.internal", "AMQP_PORT": 5672}
    assert spec.docker_kwargs == {"extra_hosts": {"host.docker.internal": "host-gateway"}}
    assert tomllib.loads(config.read_text())["amqp"]["AMQP_HOST"] == "127.0.0.1"  # the original is untouched


def test_the_wrapper_without_an_image_says_how_to_call_it():
    done = subprocess.run([sys.executable, "-m", "harness.container", "worker"], capture_output=True, text=True)
    assert done.returncode == 2 and "--image" in done.stderr


@pytest.mark.skipif(not docker_engine_answers(), reason="no Docker engine answers (DOCKER_HOST or "
                    "/var/run/docker.sock): the container launcher's live run needs one")
def test_a_container_stage_logs_to_the_wrapper_and_exits_with_its_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.container", "--image", "python:3.11-slim", "--",
                           "python", "-c", "print('from the container'); raise SystemExit(3)"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "from the container" in done.stdout
