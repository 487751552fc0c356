"""Provider choice and configuration, without needing a Docker engine."""
from __future__ import annotations

import subprocess
from unittest import mock

import pytest

from harness import providers
from harness.broker import BrokerError, VhostOwner, stale_vhosts
from harness.watchdog import process_alive
from harness.providers import (DEFAULT_DOCKER_IMAGE, DockerProvision, DockerSpec, ProviderSettings,
                               choose_provider, docker_engine_answers, parse_amqp_url,
                               parse_amqp_urls)


def choose(provider="auto", url=None, docker=False, local=False):
    return choose_provider(ProviderSettings(provider=provider, url=url),
                           docker_answers=lambda: docker, local_installed=lambda: local)


@pytest.mark.parametrize("url, docker, local, expected", [
    ("amqp://u:p@h:5672/", True, True, "external"),
    (None, True, True, "docker"),
    (None, False, True, "local"),
])
def test_auto_prefers_external_then_docker_then_local(url, docker, local, expected, monkeypatch):
    monkeypatch.setattr(providers, "testcontainers_installed", lambda: True)
    assert choose(url=url, docker=docker, local=local) == expected


def test_auto_skips_docker_without_testcontainers(monkeypatch):
    monkeypatch.setattr(providers, "testcontainers_installed", lambda: False)
    assert choose(docker=True, local=True) == "local"


def test_auto_with_nothing_says_how_to_get_each(monkeypatch):
    monkeypatch.setattr(providers, "testcontainers_installed", lambda: True)
    with pytest.raises(BrokerError) as failure:
        choose()
    message = str(failure.value)
    for hint in ("--rabbitmq-url", "qp-harness[docker]", "apt-get install rabbitmq-server"):
        assert hint in message


@pytest.mark.parametrize("provider", ["docker", "local"])
def test_an_explicit_provider_is_not_second_guessed(provider):
    assert choose(provider=provider) == provider


def test_external_needs_a_url():
    with pytest.raises(BrokerError, match="--rabbitmq-url"):
        choose(provider="external")


def test_unknown_provider_is_refused():
    with pytest.raises(BrokerError, match="unknown rabbitmq provider"):
        choose(provider="kubernetes")


def test_external_url_parsing():
    broker = parse_amqp_url("amqp://ad%40min:s%2Fecret@mq.example:5673/ignored")
    assert (broker.host, broker.amqp_port, broker.user, broker.password) == ("mq.example", 5673, "ad@min", "s/ecret")
    assert broker.management_url == "http://mq.example:15672"
    assert broker.provider == "external"
    assert parse_amqp_url("amqp://u:p@h/", "http://h:8080/").management_url == "http://h:8080"
    assert parse_amqp_url("amqp://u:p@h/").amqp_port == 5672
    for bad in ("http://u:p@h/", "amqp://h:5672/", "amqp:///"):
        with pytest.raises(BrokerError):
            parse_amqp_url(bad)


def test_several_external_urls_are_the_nodes_of_one_cluster_and_the_first_is_the_harnesss():
    broker = parse_amqp_urls("amqp://u:p@mq-1:5672/, amqp://u:p@mq-2:5672/,amqp://u:p@mq-3:5673/")
    assert (broker.host, broker.amqp_port) == ("mq-1", 5672)
    assert broker.management_url == "http://mq-1:15672"
    assert broker.node_addresses() == [("mq-1", 5672), ("mq-2", 5672), ("mq-3", 5673)]
    assert [n.management_url for n in broker.nodes] == ["http://mq-1:15672", "http://mq-2:15672", "http://mq-3:15672"]
    own = parse_amqp_urls("amqp://u:p@mq-1/,amqp://u:p@mq-2/", "http://mq-1:8080/, http://mq-2:8081")
    assert [n.management_url for n in own.nodes] == ["http://mq-1:8080", "http://mq-2:8081"]
    single = parse_amqp_urls("amqp://u:p@mq-1/")
    assert single.nodes == [] and single.node_addresses() == [("mq-1", 5672)]


@pytest.mark.parametrize("urls, reason", [
    ("", "is empty"),
    ("amqp://u:p@mq-1/,amqp://v:p@mq-2/", "same USER:PASS"),
    ("amqp://u:p@mq-1/,amqp://u:p@mq-1:5672/", "names a node twice"),
    ("amqp://u:p@mq-1/,http://mq-2/", "must look like"),
    ("amqp://u:p@mq-1/,amqp://u:p@mq-2/,amqp://u:p@mq-3/ http://a/,http://b/", "2 management APIs for 3"),
])
def test_a_bad_list_of_external_urls_says_what_is_wrong(urls, reason):
    amqp, _, management = urls.partition(" ")
    with pytest.raises(BrokerError, match=reason):
        parse_amqp_urls(amqp, management or None)


def test_docker_spec_uses_a_management_image_random_credentials_loopback_ports_and_the_event_plugin():
    spec, other = DockerSpec(DEFAULT_DOCKER_IMAGE), DockerSpec(DEFAULT_DOCKER_IMAGE)
    assert "management" in spec.image
    assert spec.user != "guest" and spec.password != "guest"
    assert (spec.user, spec.password) != (other.user, other.password)
    assert spec.env == {"RABBITMQ_DEFAULT_USER": spec.user, "RABBITMQ_DEFAULT_PASS": spec.password}
    assert spec.ports == {"5672/tcp": ("127.0.0.1", None), "15672/tcp": ("127.0.0.1", None)}
    assert spec.enabled_plugins == b"[rabbitmq_management,rabbitmq_event_exchange].\n"


def test_docker_container_is_configured_from_the_spec():
    if providers.rabbitmq_container_class() is None:
        pytest.skip("testcontainers is not installed (extra 'docker')")
    # testcontainers talks to the engine when a container object is made: stand a fake client in.
    with mock.patch("testcontainers.core.container.DockerClient"):
        spec = DockerSpec("rabbitmq:3.10-management")
        container = spec.container()
    assert container.image.endswith("rabbitmq:3.10-management")
    assert container.env["RABBITMQ_DEFAULT_USER"] == spec.user
    assert container.env["RABBITMQ_DEFAULT_PASS"] == spec.password
    assert container.ports["5672/tcp"] == ("127.0.0.1", None)
    assert container.ports["15672/tcp"] == ("127.0.0.1", None)
    transfers = container._transferable_specs
    assert [(t[0], t[1]) for t in transfers] == [(spec.enabled_plugins, "/etc/rabbitmq/enabled_plugins")]


def test_docker_provider_without_an_engine_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(providers, "docker_engine_answers", lambda: False)
    with pytest.raises(BrokerError, match="no Docker engine answers"):
        DockerProvision(ProviderSettings(provider="docker")).start(tmp_path)


def test_options_reach_the_settings(pytestconfig):
    from harness.broker_plugin import OPTIONS, provider_settings
    settings = provider_settings(pytestconfig)
    assert settings.provider in providers.PROVIDERS
    assert {ini for _, ini, _, _ in OPTIONS} <= set(pytestconfig._parser._inidict)


def test_help_lists_the_options_in_the_qp_harness_group(inner):
    result = inner("def test_nothing():\n    pass\n").run("--help")
    assert result.returncode == 0
    section = result.stdout.split("qp-harness: queue-priority conformance", 1)[1]
    for option in ("--rabbitmq-provider", "--rabbitmq-url", "--rabbitmq-management-url",
                   "--rabbitmq-docker-image", "--rabbitmq-server-dir", "--rabbitmq-start-timeout", "--rabbitmq-stop"):
        assert option in section
    for ini in ("rabbitmq_provider", "rabbitmq_url", "rabbitmq_management_url", "rabbitmq_docker_image"):
        assert f"  {ini} (string):" in result.stdout


def test_ini_keys_are_honoured(inner):
    run = inner("def test_uses_broker(broker):\n    pass\n")
    (run.directory / "pytest.ini").write_text("[pytest]\nrabbitmq_provider = external\n")
    result = run.run()
    assert result.returncode != 0
    assert "--rabbitmq-provider external needs --rabbitmq-url" in result.stdout


@pytest.mark.skipif(not docker_engine_answers(), reason="no Docker engine answers on this machine "
                    "(DOCKER_HOST / /var/run/docker.sock); the docker provider's live test needs one")
def test_docker_provider_live(tmp_path):
    provision = DockerProvision(ProviderSettings(provider="docker"))
    provision.start(tmp_path)
    try:
        broker = provision.broker
        assert broker.host in ("127.0.0.1", "localhost")
        assert broker.management.exchange_exists("/", "amq.rabbitmq.event")
        broker.management.create_vhost("qp-docker-live")
        assert broker.management.vhost("qp-docker-live")["tracing"] is True
    finally:
        provision.close()


def test_bad_ini_values_are_usage_errors(inner):
    run = inner("def test_uses_broker(broker):\n    pass\n")
    (run.directory / "pytest.ini").write_text("[pytest]\nrabbitmq_stop = later\n")
    result = run.run()
    assert result.returncode == 4  # pytest's usage error, before anything starts
    assert "rabbitmq_stop must be kill or graceful" in result.stderr


# --------------------------------------------------------------------------- vhost owners

def owned(name: str, owner: VhostOwner, *, nested: bool = False) -> dict:
    """A vhost record as the management API lists it (3.11+ nests the description in metadata)."""
    if nested:
        return {"name": name, "description": "", "metadata": {"description": owner.description()}}
    return {"name": name, "description": owner.description()}


def test_a_vhost_owner_survives_its_description():
    me = VhostOwner.this_process()
    assert VhostOwner.parse(me.description()) == VhostOwner(me.host, me.pid, round(me.started, 2))
    for foreign in ("", "team vhost", "made by qp-harness: host=h pid=x started=1", "made by qp-harness: pid=1"):
        assert VhostOwner.parse(foreign) is None


def test_only_vhosts_of_dead_harness_processes_on_this_host_are_stale():
    dead, living = VhostOwner("here", 101, 1000.0), VhostOwner("here", 202, 2000.0)
    reused = VhostOwner("here", 202, 1500.0)  # the pid now belongs to a younger process
    elsewhere = VhostOwner("there", 101, 1000.0)
    records = [owned("qp-dead", dead), owned("qp-dead-nested", dead, nested=True), owned("qp-living", living),
               owned("qp-reused", reused), owned("qp-elsewhere", elsewhere),
               {"name": "/", "description": "Default virtual host"}, {"name": "team"}]

    def alive(pid: int, started: float) -> bool:
        return (pid, started) == (202, 2000.0)

    assert stale_vhosts(records, "here", alive) == ["qp-dead", "qp-dead-nested", "qp-reused"]


def test_process_alive_tells_a_live_process_from_a_dead_one_and_a_reused_pid():
    me = VhostOwner.this_process()
    assert process_alive(me.pid, me.started)
    assert not process_alive(me.pid, me.started - 3600)  # same pid, another start: not the maker
    child = subprocess.Popen(["true"])
    child.wait()
    assert not process_alive(child.pid, me.started)
