"""Broker provisioning: a real RabbitMQ for the session, a fresh vhost per test.

``Broker`` is what a test sees (addresses, credentials, a management client).
Providers make one: ``LocalBroker`` runs a private ``rabbitmq-server`` from
the local install under a directory of its own.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pika
import requests

RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/rabbitmq/sbin")
PLUGINS = "rabbitmq_management,rabbitmq_event_exchange"


class BrokerError(RuntimeError):
    """The broker could not be provided; the message says why and what to do."""


class ManagementClient:
    """The few management-API calls the harness needs (loopback only)."""

    def __init__(self, base_url: str, user: str, password: str):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.auth = (user, password)
        self.user = user

    def _url(self, *parts: str) -> str:
        return self.base_url + "/api/" + "/".join(quote(p, safe="") for p in parts)

    def _call(self, method: str, *parts: str, ok=(200, 201, 204), **kwargs) -> requests.Response:
        response = self.session.request(method, self._url(*parts), timeout=30, **kwargs)
        if response.status_code not in ok:
            raise BrokerError(f"management API {method} {'/'.join(parts)}: HTTP {response.status_code} {response.text[:300]}")
        return response

    def overview(self) -> dict:
        return self._call("GET", "overview").json()

    def create_vhost(self, vhost: str, tracing: bool = True) -> None:
        # "tracing": true switches the firehose on for the vhost (as rabbitmqctl trace_on).
        self._call("PUT", "vhosts", vhost, json={"tracing": tracing})
        self._call("PUT", "permissions", vhost, self.user, json={"configure": ".*", "write": ".*", "read": ".*"})

    def set_tracing(self, vhost: str, on: bool = True) -> None:
        self._call("PUT", "vhosts", vhost, json={"tracing": on})

    def delete_vhost(self, vhost: str) -> None:
        self._call("DELETE", "vhosts", vhost, ok=(200, 204, 404))

    def vhosts(self) -> list[str]:
        return [v["name"] for v in self._call("GET", "vhosts").json()]

    def queues(self, vhost: str) -> list[dict]:
        return self._call("GET", "queues", vhost).json()

    def connections(self, vhost: str | None = None) -> list[dict]:
        if vhost is None:
            return self._call("GET", "connections").json()
        return self._call("GET", "vhosts", vhost, "connections").json()

    def close_connection(self, name: str, reason: str = "closed by qp-harness") -> None:
        self._call("DELETE", "connections", name, headers={"X-Reason": reason}, ok=(200, 204, 404))


@dataclass
class Broker:
    """A running broker as a test sees it."""

    host: str
    amqp_port: int
    management_url: str
    user: str
    password: str
    provider: str
    management: ManagementClient = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.management = ManagementClient(self.management_url, self.user, self.password)

    def amqp_url(self, vhost: str = "/") -> str:
        return f"amqp://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.amqp_port}/{quote(vhost, safe='')}"

    def connection_parameters(self, vhost: str = "/", **kwargs) -> pika.ConnectionParameters:
        kwargs.setdefault("connection_attempts", 3)
        kwargs.setdefault("retry_delay", 0.5)
        return pika.ConnectionParameters(
            host=self.host, port=self.amqp_port, virtual_host=vhost,
            credentials=pika.PlainCredentials(self.user, self.password), **kwargs,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_rabbitmq_bin() -> Path | None:
    for directory in RABBITMQ_BIN_DIRS:
        candidate = Path(directory) / "rabbitmq-server"
        if candidate.exists():
            return Path(directory)
    return None


def wait_for_port(host: str, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class LocalBroker:
    """A private rabbitmq-server: own HOME and cookie, node name, ports, data and log dirs.

    The server and its own epmd run in one new process group, stopped by
    group id at ``stop()``; nothing is found or stopped by name.
    """

    def __init__(self, workdir: Path, start_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.broker: Broker | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> Broker:
        bin_dir = find_rabbitmq_bin()
        if bin_dir is None:
            raise BrokerError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        for sub in ("home", "mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        amqp, mgmt, dist, epmd_port = (free_port() for _ in range(4))
        user, password = "qp-" + secrets.token_hex(4), secrets.token_urlsafe(18)
        node = f"qp{os.getpid()}x{secrets.token_hex(3)}@localhost"
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{amqp}\n"
            f"management.tcp.port = {mgmt}\nmanagement.tcp.ip = 127.0.0.1\n"
            f"default_user = {user}\ndefault_pass = {password}\n"
            "default_vhost = /\nloopback_users = none\n"
            "log.console = true\nlog.console.level = info\nlog.file = false\n"
        )
        env = {
            **os.environ,
            "HOME": str(self.workdir / "home"),
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": PLUGINS,
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }
        log = open(self.log_path, "ab")
        # Our own epmd on a private port, so none is left behind as a daemon.
        self.epmd = subprocess.Popen(["epmd", "-port", str(epmd_port)], stdout=log, stderr=log,
                                     start_new_session=True, env=env)
        self.process = subprocess.Popen([str(bin_dir / "rabbitmq-server")], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        broker = Broker("127.0.0.1", amqp, f"http://127.0.0.1:{mgmt}", user, password, "local")
        self._wait_ready(broker)
        self.broker = broker
        return broker

    def _wait_ready(self, broker: Broker) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise BrokerError(f"rabbitmq-server exited with code {self.process.returncode} while starting; "
                                  f"log tail:\n{self.log_tail()}")
            if wait_for_port(broker.host, broker.amqp_port, time.monotonic() + 0.5):
                try:
                    broker.management.overview()
                    return
                except (requests.RequestException, BrokerError):
                    pass
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"rabbitmq-server not ready after {self.start_timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        for proc in (self.process, self.epmd):
            if proc is None or proc.poll() is not None:
                continue
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        # beam may outlive the wrapper shell for a moment: reap the whole group.
        for proc in (self.process, self.epmd):
            if proc is not None:
                _wait_group_gone(proc.pid, timeout)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
