"""Fixtures and options for the broker: one per session, a fresh vhost per test.

One broker per pytest process: without xdist that is the session; with
``-n N`` every worker starts (and stops) a broker of its own — measured
cheaper in wall time than sharing one on this hardware and simpler to get
right (see ``tests/broker`` and the README). Ports are claimed with lock
files and node names carry the pid, so workers never collide; only the
process that started a broker stops it, and a watchdog stops it if that
process dies.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pika
import pytest

from harness import watchdog
from harness.broker import Broker, BrokerError, VhostOwner
from harness.providers import DEFAULT_DOCKER_IMAGE, PROVIDERS, ProviderSettings, open_provider

# (option, ini key, help, default)
OPTIONS = [
    ("--rabbitmq-provider", "rabbitmq_provider",
     "where the broker comes from: auto (external if a URL is given, else docker if a Docker engine "
     "answers, else a local rabbitmq-server), external, docker or local", "auto"),
    ("--rabbitmq-url", "rabbitmq_url",
     "external broker, amqp://USER:PASS@HOST:PORT/ (user with the administrator tag; the harness only "
     "creates and deletes its own vhosts there)", ""),
    ("--rabbitmq-management-url", "rabbitmq_management_url",
     "management API of the external broker (default http://HOST:15672)", ""),
    ("--rabbitmq-docker-image", "rabbitmq_docker_image",
     f"image for the docker provider (default {DEFAULT_DOCKER_IMAGE})", DEFAULT_DOCKER_IMAGE),
    ("--rabbitmq-server-dir", "rabbitmq_server_dir",
     "directory holding rabbitmq-server for the local provider (default: /usr/lib/rabbitmq/bin and "
     "other usual places)", ""),
    ("--rabbitmq-start-timeout", "rabbitmq_start_timeout",
     "seconds to wait for the broker to be ready (default 60)", "60"),
    ("--rabbitmq-stop", "rabbitmq_stop",
     "how the local broker is stopped: kill (default, instant; its data is thrown away) or graceful", "kill"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qp-harness", "qp-harness: queue-priority conformance")
    for option, ini, help_text, default in OPTIONS:
        kwargs = {"choices": list(PROVIDERS)} if ini == "rabbitmq_provider" else {}
        if ini == "rabbitmq_stop":
            kwargs = {"choices": ["kill", "graceful"]}
        group.addoption(option, dest=ini, default=None, help=f"{help_text} [ini: {ini}]", **kwargs)
        parser.addini(ini, help_text, default=default)


def option(config: pytest.Config, ini: str) -> str:
    """Command line beats ini file beats default."""
    value = config.getoption(ini)
    return str(value if value is not None else config.getini(ini))


def provider_settings(config: pytest.Config) -> ProviderSettings:
    try:
        timeout = float(option(config, "rabbitmq_start_timeout"))
    except ValueError:
        raise pytest.UsageError(f"--rabbitmq-start-timeout / ini rabbitmq_start_timeout: expected a number of "
                                f"seconds, got {option(config, 'rabbitmq_start_timeout')!r}") from None
    provider = option(config, "rabbitmq_provider") or "auto"
    if provider not in PROVIDERS:
        raise pytest.UsageError(f"--rabbitmq-provider / ini rabbitmq_provider: must be one of "
                                f"{', '.join(PROVIDERS)}, got {provider!r}")
    stop_mode = option(config, "rabbitmq_stop") or "kill"
    if stop_mode not in ("kill", "graceful"):
        raise pytest.UsageError(f"rabbitmq_stop must be kill or graceful, not {stop_mode!r}")
    return ProviderSettings(
        provider=provider,
        url=option(config, "rabbitmq_url") or None,
        management_url=option(config, "rabbitmq_management_url") or None,
        docker_image=option(config, "rabbitmq_docker_image") or DEFAULT_DOCKER_IMAGE,
        start_timeout=timeout,
        server_dir=option(config, "rabbitmq_server_dir") or None,
        stop_mode=stop_mode,
    )


def pytest_configure(config: pytest.Config) -> None:
    provider_settings(config)  # a bad ini value is a usage error at start, not a fixture error later
    # pika's transport layer logs every lost or refused connection with a stack trace (thousands of
    # lines once a broker dies mid-test); the harness reports lost connections itself, in one line.
    logging.getLogger("pika.adapters").setLevel(logging.CRITICAL)


def pytest_unconfigure(config: pytest.Config) -> None:
    # Normal end (pass, fail, Ctrl-C): sweep any group still registered and end the watchdog.
    watchdog.stop_watchdog()


def worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@dataclass
class Vhost:
    """A test's own vhost on the session broker."""

    name: str
    broker: Broker

    def parameters(self, **kwargs) -> pika.ConnectionParameters:
        return self.broker.connection_parameters(self.name, **kwargs)

    def url(self) -> str:
        return self.broker.amqp_url(self.name)


@dataclass
class VhostStats:
    """Per-test vhost cost, for the terminal summary and the bench."""

    count: int = 0
    seconds: float = 0.0
    broker_start: float | None = None
    provider: str | None = None
    names: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)


STATS = VhostStats()


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The session's broker (per xdist worker): URLs, credentials, ``.management`` client."""
    settings = provider_settings(request.config)
    began = time.monotonic()
    try:
        provision = open_provider(settings, tmp_path_factory.mktemp(f"rabbitmq-{worker_id()}"))
    except BrokerError as error:
        pytest.fail(f"qp-harness: {error}", pytrace=False)
    STATS.broker_start, STATS.provider = time.monotonic() - began, provision.name
    STATS.reaped = list(provision.reaped)
    try:
        yield provision.broker
    finally:
        provision.close()


def _create_vhost(broker: Broker, label: str = "") -> str:
    name = f"qp-{worker_id()}-{label + '-' if label else ''}{secrets.token_hex(4)}"
    broker.management.create_vhost(name, tracing=True, description=VhostOwner.this_process().description())
    return name


@pytest.fixture
def vhost_factory(broker: Broker) -> Iterator[Callable[..., Vhost]]:
    """Make extra vhosts in a test (``vhost_factory("label")``); all deleted at teardown."""
    made: list[str] = []

    def make(label: str = "") -> Vhost:
        made.append(_create_vhost(broker, label))
        return Vhost(made[-1], broker)

    try:
        yield make
    finally:
        for name in made:
            broker.management.delete_vhost(name)


def broker_gone(broker: Broker) -> str | None:
    """Why the session's broker is unusable, when we can tell: its local server process has ended."""
    if broker.process_groups and not watchdog.group_members(broker.process_groups[0]):
        return (f"the session's local broker (rabbitmq-server, process group {broker.process_groups[0]}) "
                f"is no longer running")
    return None


@pytest.fixture
def vhost(broker: Broker) -> Iterator[Vhost]:
    """A fresh vhost for this test, firehose tracer on; deleted (consumers and all) at teardown."""
    gone = broker_gone(broker)
    if gone:
        pytest.fail(f"qp-harness: {gone}; this and every later test of the session that needs it fails",
                    pytrace=False)
    began = time.monotonic()
    try:
        name = _create_vhost(broker)
    except BrokerError as error:
        pytest.fail(f"qp-harness: cannot create this test's vhost: {error}", pytrace=False)
    cost = time.monotonic() - began
    try:
        yield Vhost(name, broker)
    finally:
        began = time.monotonic()
        if broker_gone(broker) is None:  # a broker that died took its vhosts with it
            try:
                broker.management.delete_vhost(name)
            except BrokerError as error:
                pytest.fail(f"qp-harness: cannot delete this test's vhost {name}: {error}", pytrace=False)
        STATS.count += 1
        STATS.seconds += cost + time.monotonic() - began


@pytest.fixture
def amqp_channel(vhost: Vhost):
    """A pika channel on the test's vhost, closed after the test."""
    connection = pika.BlockingConnection(vhost.parameters())
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass


WORKER_STATS: list[dict] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and STATS.provider is not None:  # an xdist worker reports to the controller
        workeroutput["qp_broker_stats"] = {"provider": STATS.provider, "broker_start": STATS.broker_start,
                                           "count": STATS.count, "seconds": STATS.seconds,
                                           "reaped": STATS.reaped}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    stats = getattr(node, "workeroutput", {}).get("qp_broker_stats")
    if stats:
        WORKER_STATS.append(stats)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    runs = list(WORKER_STATS)
    if STATS.provider is not None:
        runs.append({"provider": STATS.provider, "broker_start": STATS.broker_start,
                     "count": STATS.count, "seconds": STATS.seconds, "reaped": STATS.reaped})
    if not runs:
        return
    count, seconds = sum(r["count"] for r in runs), sum(r["seconds"] for r in runs)
    mean = f"{1000 * seconds / count:.0f} ms" if count else "n/a"
    starts = "/".join(f"{r['broker_start']:.1f}" for r in runs)
    brokers = f"{len(runs)} {runs[0]['provider']} brokers (one per worker)" if len(runs) > 1 \
        else f"{runs[0]['provider']} broker"
    terminalreporter.write_line(f"qp-harness: {brokers} ready in {starts} s; "
                                f"{count} per-test vhosts, mean create+delete {mean}")
    reaped = sorted({name for r in runs for name in r.get("reaped", [])})
    if reaped:
        terminalreporter.write_line(f"qp-harness: removed {len(reaped)} vhost(s) left on the broker by killed "
                                    f"qp-harness sessions on this host: {', '.join(reaped)}")
