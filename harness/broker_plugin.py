"""Fixtures and options for the broker: one per session, a fresh vhost per test.

One broker per pytest process: without xdist that is the session; with
``-n N`` every worker starts (and stops) a broker of its own — measured
cheaper in wall time than sharing one on this hardware and simpler to get
right (see ``tests/broker`` and the README). Ports are claimed with lock
files and node names carry the pid, so workers never collide; only the
process that started a broker stops it, and a watchdog stops it if that
process dies.

No test can break the tests after it: after every test that used the
broker, ``BrokerGuard`` asks it to answer. A broker the harness runs (local
provider) that does not is revived before the next test, and the test that
broke it gets a teardown error; one the harness does not run is left alone,
and the tests after it fail at setup, naming the test after which it stopped
answering. Connections still open in a test's vhost at teardown are closed,
with a ``LeftConnectionsWarning`` naming them.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pika
import pytest

from harness import watchdog
from harness.broker import Broker, BrokerError, VhostOwner, health_problem
from harness.providers import DEFAULT_DOCKER_IMAGE, PROVIDERS, Provision, ProviderSettings, open_provider

# (option, ini key, help, default)
OPTIONS = [
    ("--rabbitmq-provider", "rabbitmq_provider",
     "where the broker comes from: auto (external if a URL is given, else docker if a Docker engine "
     "answers, else a local rabbitmq-server), external, docker or local", "auto"),
    ("--rabbitmq-url", "rabbitmq_url",
     "external broker, amqp://USER:PASS@HOST:PORT/ (user with the administrator tag; the harness only "
     "creates and deletes its own vhosts there); for a cluster, every node's URL, comma-separated: the "
     "harness talks to the first, stages are spread over all", ""),
    ("--rabbitmq-management-url", "rabbitmq_management_url",
     "management API of the external broker (default http://HOST:15672); for a cluster, the first node's "
     "or every node's, comma-separated", ""),
    ("--rabbitmq-docker-image", "rabbitmq_docker_image",
     f"image for the docker provider (default {DEFAULT_DOCKER_IMAGE})", DEFAULT_DOCKER_IMAGE),
    ("--rabbitmq-server-dir", "rabbitmq_server_dir",
     "directory holding rabbitmq-server for the local provider (default: /usr/lib/rabbitmq/bin and "
     "other usual places)", ""),
    ("--rabbitmq-start-timeout", "rabbitmq_start_timeout",
     "seconds to wait for the broker to be ready (default 60)", "60"),
    ("--rabbitmq-nodes", "rabbitmq_nodes",
     "local provider: start a cluster of this many rabbitmq-server nodes (stages spread over them)", "1"),
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
    nodes = option(config, "rabbitmq_nodes") or "1"
    if not nodes.isdigit() or not 1 <= int(nodes) <= 9:
        raise pytest.UsageError(f"--rabbitmq-nodes / ini rabbitmq_nodes: a number of nodes from 1 to 9, got {nodes!r}")
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
        nodes=int(nodes),
    )


def pytest_configure(config: pytest.Config) -> None:
    provider_settings(config)  # a bad ini value is a usage error at start, not a fixture error later
    config.stash[GUARD] = BrokerGuard()
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
    #: [test, what was wrong, seconds] for each revive of the local broker
    revived: list[list] = field(default_factory=list)


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
    guard = request.config.stash[GUARD]
    guard.opened(provision)
    try:
        yield provision.broker
    finally:
        guard.closed()
        STATS.revived = [list(r) for r in guard.revived]
        provision.close()


def _create_vhost(broker: Broker, label: str = "") -> str:
    name = f"qp-{worker_id()}-{label + '-' if label else ''}{secrets.token_hex(4)}"
    broker.management.create_vhost(name, tracing=True, description=VhostOwner.this_process().description())
    return name


@pytest.fixture
def vhost_factory(broker: Broker, request: pytest.FixtureRequest) -> Iterator[Callable[..., Vhost]]:
    """Make extra vhosts in a test (``vhost_factory("label")``); all deleted at teardown."""
    made: list[str] = []

    def make(label: str = "") -> Vhost:
        made.append(_create_vhost(broker, label))
        return Vhost(made[-1], broker)

    try:
        yield make
    finally:
        for name in made:
            _give_back(broker, name, request)


@pytest.fixture
def vhost(broker: Broker, request: pytest.FixtureRequest) -> Iterator[Vhost]:
    """A fresh vhost for this test, firehose tracer on; deleted (consumers and all) at teardown."""
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
        try:
            _give_back(broker, name, request)
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


# ----------------------------------------------------------------------------- broker health

class LeftConnectionsWarning(UserWarning):
    """A test's vhost still had client connections at teardown: a stage or client that did not exit."""


# A failed probe is asked once more, given longer, before the broker is called broken: a busy broker
# on a loaded 2-core machine may miss HEALTH_DEADLINE once, and a wrong verdict costs a revive (about
# 5 s) and a teardown error on a test that did nothing wrong.
CONFIRM_PAUSE = 0.5
CONFIRM_DEADLINE = 5.0
# A connection its client has just closed stays in the management API's list for up to about 60 ms
# (measured on the local provider); one still listed after this pause was left open.
LEFT_CONNECTION_SETTLE = 0.5


class BrokerGuard:
    """The session broker's health between tests: one per pytest process, in ``config.stash``.

    ``after_test`` asks the broker to answer (``health_problem``) once the test's fixtures are
    torn down. A broker the harness runs (``Provision.revivable``) that does not answer is
    revived, so the next test has a working broker, and the test gets a teardown error saying
    what was wrong. A broker the harness does not run is not touched: ``before_test`` fails
    every later test that needs it, naming the test after which it stopped answering, until it
    answers again.
    """

    def __init__(self) -> None:
        self.provision: Provision | None = None
        #: why later tests cannot have the broker (set when it cannot be revived)
        self.down: str | None = None
        #: (test, what was wrong, seconds the revive took), for the summary
        self.revived: list[tuple[str, str, float]] = []
        #: the current test's verdict, so its fixtures and the teardown hook probe once
        self._verdict: tuple[str, str | None] | None = None
        #: vhosts of the current test not deleted because the broker did not answer
        self._orphans: list[str] = []

    def opened(self, provision: Provision) -> None:
        self.provision, self.down = provision, None

    def closed(self) -> None:
        self.provision = None

    def problem(self, test: str) -> str | None:
        """Why the broker does not answer after ``test`` (None when it does); probed once per test."""
        if self.provision is None:
            return None
        if self._verdict is None or self._verdict[0] != test:
            problem = health_problem(self.provision.broker)
            if problem is not None:
                time.sleep(CONFIRM_PAUSE)
                problem = health_problem(self.provision.broker, CONFIRM_DEADLINE)
            self._verdict = (test, problem)
        return self._verdict[1]

    def orphan(self, vhost: str) -> None:
        """A vhost of the current test left in place because the broker did not answer."""
        self._orphans.append(vhost)

    def before_test(self, test: str) -> None:
        """Fail this test's setup if the broker is known not to answer (and still does not)."""
        self._verdict, self._orphans = None, []
        if self.down is None or self.provision is None:
            return
        if health_problem(self.provision.broker) is None:
            self.down = None  # someone brought the external broker back
            return
        pytest.fail(self.down, pytrace=False)

    def after_test(self, test: str) -> str | None:
        """After ``test``'s fixtures are torn down: if the broker does not answer, revive it (ours) or mark
        it down (not ours). Returns the teardown error for ``test`` then, else None."""
        if self.provision is None or self.down is not None:
            return None
        problem = self.problem(test)
        if problem is None:
            return None
        provision, broker = self.provision, self.provision.broker
        what = f"the session's {provision.name} broker ({broker.host}:{broker.amqp_port})"
        if not provision.revivable:
            self.down = (f"qp-harness: {what} stopped answering after test {test} ({problem}); it is not the "
                         f"harness's to restart, so this test cannot run until it answers again")
            return (f"qp-harness: {what} stopped answering during test {test}: {problem}. It is not the "
                    f"harness's to restart: the tests after this one that need it fail at setup until it "
                    f"answers again")
        try:
            seconds = provision.revive()
        except BrokerError as error:
            self.down = (f"qp-harness: {what} stopped answering after test {test} ({problem}) and could not be "
                         f"restarted: {error}")
            return (f"qp-harness: {what} stopped answering during test {test}: {problem}. Restarting it "
                    f"failed, so the tests after this one that need it fail at setup: {error}")
        self.revived.append((test, problem, seconds))
        self._delete_orphans()
        return (f"qp-harness: {what} stopped answering during test {test}: {problem}. It was restarted "
                f"(same ports, data and credentials; {seconds:.1f} s) so that the tests after this one "
                f"have a working broker")

    def _delete_orphans(self) -> None:
        # The revived node kept its data dir, so the test's vhosts are still there.
        for name in self._orphans:
            try:
                self.provision.broker.management.delete_vhost(name)
            except BrokerError as error:
                logging.getLogger(__name__).warning("revived broker: cannot delete vhost %s: %s", name, error)
        self._orphans = []


GUARD = pytest.StashKey[BrokerGuard]()


def _uses_broker(item: pytest.Item) -> bool:
    return "broker" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _uses_broker(item):
        item.config.stash[GUARD].before_test(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    if not _uses_broker(item):
        return (yield)
    guard = item.config.stash[GUARD]
    try:
        result = yield  # the test's fixtures are torn down here (and the broker too, after the last test)
    except Exception as error:
        # Another teardown failed: report it, and still leave a working broker for the next test.
        broken = guard.after_test(item.nodeid)
        if broken is None:
            raise
        pytest.fail(f"{broken}\n(this test's teardown also failed: {type(error).__name__}: {error})",
                    pytrace=False)
    broken = guard.after_test(item.nodeid)
    if broken is not None:
        pytest.fail(broken, pytrace=False)
    return result


def left_connections(broker: Broker, vhost: str) -> list[dict]:
    """Client connections still open in ``vhost`` (as far as the management API knows yet)."""
    listed = broker.management.connections(vhost)
    if not listed:
        return []
    time.sleep(LEFT_CONNECTION_SETTLE)
    still = {c["name"] for c in broker.management.connections(vhost)}
    return [c for c in listed if c["name"] in still]


def describe_connection(connection: dict) -> str:
    label = (connection.get("client_properties") or {}).get("connection_name")
    return f"{connection['name']} (user {connection.get('user')}{', ' + repr(label) if label else ''})"


def _give_back(broker: Broker, name: str, request: pytest.FixtureRequest) -> None:
    """Close what the test left open in its vhost (with a warning), then delete the vhost."""
    guard = request.config.stash[GUARD]
    if guard.problem(request.node.nodeid) is not None:
        guard.orphan(name)  # the teardown hook revives the broker (or reports it gone) and says why
        return
    left = left_connections(broker, name)
    closed = [c for c in left if broker.management.close_connection(c["name"], "left open by a test; closed "
                                                                              "by qp-harness at teardown")]
    if closed:
        warnings.warn(LeftConnectionsWarning(
            f"qp-harness: {len(closed)} connection(s) still open in this test's vhost {name} at teardown (a stage "
            f"or client that did not exit?), closed: {', '.join(map(describe_connection, closed))}"))
    broker.management.delete_vhost(name)


WORKER_STATS: list[dict] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and STATS.provider is not None:  # an xdist worker reports to the controller
        workeroutput["qp_broker_stats"] = {"provider": STATS.provider, "broker_start": STATS.broker_start,
                                           "count": STATS.count, "seconds": STATS.seconds,
                                           "reaped": STATS.reaped, "revived": STATS.revived}


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
                     "count": STATS.count, "seconds": STATS.seconds, "reaped": STATS.reaped,
                     "revived": STATS.revived})
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
    for test, problem, seconds in (r for run in runs for r in run.get("revived", [])):
        terminalreporter.write_line(f"qp-harness: the local broker stopped answering during {test} ({problem}); "
                                    f"restarted in {seconds:.1f} s")
