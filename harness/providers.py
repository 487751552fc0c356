"""Where the session's broker comes from: external, docker, local, or auto.

``ProviderSettings`` holds what the options say; ``choose_provider`` picks
one (``auto``: external if a URL is given, else docker if a Docker engine
answers, else local if rabbitmq-server is installed, else one error that says
how to get each); ``open_provider`` returns a started ``Provision`` whose
``broker`` a test uses and whose ``close()`` undoes exactly what it did.
"""
from __future__ import annotations

import re
import secrets
import socket
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from harness.broker import (PLUGINS, Broker, BrokerError, BrokerNode, LocalBroker, find_rabbitmq_bin,
                            readiness_problem, stale_vhosts)

PROVIDERS = ("auto", "external", "docker", "local")
DEFAULT_DOCKER_IMAGE = "rabbitmq:3.10-management"

HOW_TO_GET_A_BROKER = """no RabbitMQ broker is available for qp-harness. Any one of these works:
  * an existing broker: --rabbitmq-url amqp://USER:PASS@HOST:5672/ (and --rabbitmq-management-url
    http://HOST:15672/ if the management API is elsewhere); the user must be allowed to create
    vhosts (administrator tag) and the plugins rabbitmq_management and rabbitmq_event_exchange
    must be enabled;
  * Docker: start a Docker engine and `pip install 'qp-harness[docker]'` (testcontainers);
  * a local install: `sudo apt-get install rabbitmq-server` (Debian/Ubuntu); the harness runs a
    private node as your user, the system service is not needed."""


@dataclass
class ProviderSettings:
    provider: str = "auto"
    url: str | None = None
    management_url: str | None = None
    docker_image: str = DEFAULT_DOCKER_IMAGE
    start_timeout: float = 60.0
    server_dir: str | None = None
    stop_mode: str = "kill"
    nodes: int = 1  # the local provider: more than one starts a cluster (harness.cluster)


class Provision:
    """A started broker and how to give it back."""

    name = "?"
    broker: Broker
    #: vhosts of killed sessions that ``start`` removed (external provider only)
    reaped: tuple[str, ...] = ()
    #: the harness runs this broker itself and may start it again when it stops answering
    revivable = False

    def revive(self) -> float:
        """Start the broker again on the same address and credentials; returns the seconds it took."""
        raise BrokerError(f"the {self.name} provider's broker is not the harness's to restart")

    def close(self) -> None:  # pragma: no cover - overridden
        pass


# --------------------------------------------------------------------------- choice

def docker_engine_answers(timeout: float = 3.0) -> bool:
    """True when a Docker engine answers a ping (and the docker package is installed)."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


def rabbitmq_container_class():
    """testcontainers' RabbitMqContainer (moved to ``testcontainers.community`` in 4.15), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # testcontainers' own deprecations
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:
            try:
                from testcontainers.rabbitmq import RabbitMqContainer
            except ImportError:
                return None
    return RabbitMqContainer


def testcontainers_installed() -> bool:
    return rabbitmq_container_class() is not None


def choose_provider(settings: ProviderSettings, *, docker_answers=docker_engine_answers,
                    local_installed=None) -> str:
    """The provider to use; ``auto`` probes in the documented order."""
    if settings.provider not in PROVIDERS:
        raise BrokerError(f"unknown rabbitmq provider {settings.provider!r}; choose one of {', '.join(PROVIDERS)}")
    if local_installed is None:
        def local_installed() -> bool:
            return find_rabbitmq_bin(settings.server_dir) is not None
    if settings.provider == "external" and not settings.url:
        raise BrokerError("--rabbitmq-provider external needs --rabbitmq-url amqp://USER:PASS@HOST:PORT/")
    if settings.provider != "auto":
        return settings.provider
    if settings.url:
        return "external"
    if testcontainers_installed() and docker_answers():
        return "docker"
    if local_installed():
        return "local"
    raise BrokerError(HOW_TO_GET_A_BROKER)


def open_provider(settings: ProviderSettings, workdir: Path) -> Provision:
    name = choose_provider(settings)
    provision = {"external": ExternalProvision, "docker": DockerProvision, "local": LocalProvision}[name](settings)
    provision.start(Path(workdir))
    return provision


# --------------------------------------------------------------------------- local

class LocalProvision(Provision):
    name = "local"
    revivable = True

    def __init__(self, settings: ProviderSettings):
        self.settings = settings
        self.local: LocalBroker | None = None
        self.cluster = None  # harness.cluster.LocalCluster with --rabbitmq-nodes N > 1

    def start(self, workdir: Path) -> None:
        if self.settings.nodes > 1:
            from harness.cluster import LocalCluster
            self.cluster = LocalCluster(workdir, self.settings.nodes, self.settings.start_timeout,
                                        bin_dir=self.settings.server_dir, stop_mode=self.settings.stop_mode)
            self.broker = self.cluster.start()
            self.local = self.cluster.nodes[0]
            self.revivable = False  # a dead seed takes the cluster's state with it: not brought back
            self.broker.restart = self.cluster.restart_all  # restart_broker: the whole cluster
        else:
            self.local = LocalBroker(workdir, self.settings.start_timeout, bin_dir=self.settings.server_dir,
                                     stop_mode=self.settings.stop_mode)
            self.broker = self.local.start()
            self.broker.restart = self.local.restart

    def revive(self) -> float:
        if self.cluster is not None:
            raise BrokerError("a local cluster is not revived; the session's remaining tests cannot use it")
        return self.local.revive()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        elif self.local is not None:
            self.local.stop()


# --------------------------------------------------------------------------- external

def parse_amqp_url(url: str, management_url: str | None = None) -> Broker:
    """A ``Broker`` for ``amqp://user:pass@host:port/``; management defaults to http://host:15672."""
    parts = urlsplit(url)
    if parts.scheme != "amqp" or not parts.hostname:
        raise BrokerError(f"--rabbitmq-url must look like amqp://USER:PASS@HOST:PORT/, not {url!r}")
    if not parts.username or parts.password is None:
        raise BrokerError("--rabbitmq-url must carry a user and password (amqp://USER:PASS@HOST:PORT/); "
                          "the harness creates vhosts, so the user needs the administrator tag")
    management = management_url or f"http://{parts.hostname}:15672"
    return Broker(parts.hostname, parts.port or 5672, management.rstrip("/"),
                  unquote(parts.username), unquote(parts.password), "external")


def parse_amqp_urls(urls: str, management_urls: str | None = None) -> Broker:
    """One URL, or the nodes of a cluster separated by commas: the first is the node the harness
    (vhosts, observer, admin) talks to, and stages are spread over all of them (``Broker.nodes``).
    ``management_urls``: the first node's management API, or every node's, comma-separated
    (default http://HOST:15672; the firehose is switched on node by node)."""
    listed = _split(urls)
    if not listed:
        raise BrokerError("--rabbitmq-url is empty; give amqp://USER:PASS@HOST:PORT/ (several, comma-separated, "
                          "for the nodes of a cluster)")
    managements = _split(management_urls or "")
    if len(managements) > 1 and len(managements) != len(listed):
        raise BrokerError(f"--rabbitmq-management-url names {len(managements)} management APIs for {len(listed)} "
                          "--rabbitmq-url nodes; give one (the first node's) or one per node")
    brokers = [parse_amqp_url(url, managements[i] if i < len(managements) else None) for i, url in enumerate(listed)]
    seed = brokers[0]
    others = {(b.user, b.password) for b in brokers[1:]} - {(seed.user, seed.password)}
    if others:
        raise BrokerError("--rabbitmq-url: the nodes of one cluster share their users; give the same "
                          "USER:PASS in every URL")
    addresses = [(b.host, b.amqp_port) for b in brokers]
    if len(set(addresses)) < len(addresses):
        raise BrokerError(f"--rabbitmq-url names a node twice: {', '.join(f'{h}:{p}' for h, p in addresses)}")
    if len(brokers) > 1:
        seed.nodes = [BrokerNode(b.host, b.amqp_port, b.management_url) for b in brokers]
    return seed


def _split(text: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", text) if part]


class ExternalProvision(Provision):
    """A broker someone else runs: we only create (and delete) our own vhosts there."""

    name = "external"

    def __init__(self, settings: ProviderSettings):
        self.settings = settings

    def start(self, workdir: Path) -> None:
        self.broker = parse_amqp_urls(self.settings.url, self.settings.management_url)
        problem = readiness_problem(self.broker)
        if problem is not None:
            raise BrokerError(f"external broker {self.broker.host}:{self.broker.amqp_port} "
                              f"(management {self.broker.management_url}) is not usable: {problem}")
        for node in self.broker.nodes[1:]:
            problem = readiness_problem(replace(self.broker, host=node.host, amqp_port=node.amqp_port,
                                                management_url=node.management_url, nodes=[]))
            if problem is not None:
                raise BrokerError(f"external cluster node {node.host}:{node.amqp_port} (from --rabbitmq-url; "
                                  f"management {node.management_url}) is not usable: {problem}")
        if self.broker.nodes:
            self.broker.provider = f"external cluster of {len(self.broker.nodes)}"
        tags = self.broker.management.whoami().get("tags", "")
        if "administrator" not in (tags if isinstance(tags, list) else str(tags).split(",")):
            raise BrokerError(f"external broker user {self.broker.user!r} cannot create vhosts: "
                              "it needs the administrator tag")
        self.reaped = self.remove_stale_vhosts()

    def remove_stale_vhosts(self) -> tuple[str, ...]:
        """Delete the vhosts of killed qp-harness sessions on this host (see ``stale_vhosts``)."""
        stale = stale_vhosts(self.broker.management.vhost_records(), socket.gethostname())
        for name in stale:
            self.broker.management.delete_vhost(name)
        return tuple(stale)

    def close(self) -> None:
        pass  # the per-test vhosts are deleted by their fixture; nothing else was touched


# --------------------------------------------------------------------------- docker

@dataclass
class DockerSpec:
    """Everything the container is started with, built without talking to Docker."""

    image: str
    user: str = field(default_factory=lambda: "qp-" + secrets.token_hex(4))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    amqp_port: int = 5672
    management_port: int = 15672
    plugins: tuple[str, ...] = tuple(PLUGINS.split(","))

    @property
    def env(self) -> dict[str, str]:
        return {"RABBITMQ_DEFAULT_USER": self.user, "RABBITMQ_DEFAULT_PASS": self.password}

    @property
    def ports(self) -> dict[str, tuple[str, None]]:
        # Published on the host's loopback only, on ports the engine chooses.
        return {f"{self.amqp_port}/tcp": ("127.0.0.1", None), f"{self.management_port}/tcp": ("127.0.0.1", None)}

    @property
    def enabled_plugins(self) -> bytes:
        return f"[{','.join(self.plugins)}].\n".encode()

    def container(self):
        """A configured, not yet started testcontainers ``RabbitMqContainer``."""
        RabbitMqContainer = rabbitmq_container_class()
        if RabbitMqContainer is None:
            raise BrokerError("the docker provider needs testcontainers: pip install 'qp-harness[docker]'")
        container = RabbitMqContainer(self.image, port=self.amqp_port, username=self.user, password=self.password)
        container.with_exposed_ports(self.management_port)
        container.ports.update(self.ports)
        container.with_copy_into_container(self.enabled_plugins, "/etc/rabbitmq/enabled_plugins", 0o644)
        return container


class DockerProvision(Provision):
    name = "docker"

    def __init__(self, settings: ProviderSettings):
        self.settings = settings
        self.spec = DockerSpec(settings.docker_image)
        self.container = None

    def start(self, workdir: Path) -> None:
        if not docker_engine_answers():
            raise BrokerError("--rabbitmq-provider docker: no Docker engine answers (checked DOCKER_HOST or "
                              "/var/run/docker.sock); start one, or use --rabbitmq-provider local/external")
        self.container = self.spec.container()
        try:
            self.container.start()
            host = self.container.get_container_host_ip()
            amqp = int(self.container.get_exposed_port(self.spec.amqp_port))
            management = int(self.container.get_exposed_port(self.spec.management_port))
            self.broker = Broker(host, amqp, f"http://{host}:{management}", self.spec.user,
                                 self.spec.password, "docker")
            deadline = time.monotonic() + self.settings.start_timeout
            while (problem := readiness_problem(self.broker)) is not None:
                if time.monotonic() > deadline:
                    logs = b"".join(self.container.get_logs()).decode(errors="replace")
                    tail = "\n".join(logs.splitlines()[-40:])
                    raise BrokerError(f"docker broker not ready after {self.settings.start_timeout:.0f} s "
                                      f"({problem}); log tail:\n{tail}")
                time.sleep(0.5)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.container is not None:
            self.container.stop()
            self.container = None
