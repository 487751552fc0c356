"""Broker provisioning: a real RabbitMQ for the session, a fresh vhost per test.

``Broker`` is what a test sees (addresses, credentials, a management client).
``LocalBroker`` runs a private ``rabbitmq-server`` from the local install under
a directory of its own; ``harness.providers`` chooses between it, a Docker
container and an external broker.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from typing import Callable, NamedTuple

import pika
import psutil
import requests
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from harness import watchdog

RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/rabbitmq/sbin")
PLUGINS = "rabbitmq_management,rabbitmq_event_exchange"
EVENT_EXCHANGE = "amq.rabbitmq.event"
CLAIMS_DIR = Path(os.environ.get("QP_HARNESS_CLAIMS_DIR", Path(tempfile.gettempdir()) / "qp-harness-claims"))


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

    def _call(self, method: str, *parts: str, ok=(200, 201, 204), attempts: int = 3, **kwargs) -> requests.Response:
        # Every call the harness makes is idempotent (GET, PUT, DELETE), so a dropped keep-alive
        # connection or a slow answer on a loaded machine is simply tried again.
        for attempt in range(1, attempts + 1):
            try:
                response = self.session.request(method, self._url(*parts), timeout=30, **kwargs)
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == attempts:
                    raise BrokerError(f"management API {method} {'/'.join(parts)} at {self.base_url}: "
                                      f"no answer after {attempts} attempts ({type(exc).__name__})") from None
                time.sleep(0.5 * attempt)
        if response.status_code not in ok:
            raise BrokerError(f"management API {method} {'/'.join(parts)}: HTTP {response.status_code} {response.text[:300]}")
        return response

    def ping(self, timeout: float) -> str | None:
        """One authenticated call, one attempt within ``timeout`` seconds: None if it answered, else why not."""
        try:
            response = self.session.get(self._url("whoami"), timeout=timeout)
        except requests.RequestException as error:
            return f"management API at {self.base_url} did not answer within {timeout:g} s ({type(error).__name__})"
        if response.status_code != 200:
            return f"management API at {self.base_url} answered HTTP {response.status_code}"
        return None

    def overview(self) -> dict:
        return self._call("GET", "overview").json()

    def node(self, name: str) -> dict:
        return self._call("GET", "nodes", name).json()

    def nodes(self) -> list[dict]:
        return self._call("GET", "nodes").json()

    def whoami(self) -> dict:
        return self._call("GET", "whoami").json()

    def vhost(self, vhost: str) -> dict | None:
        """The vhost's record (``tracing`` included), or None if it does not exist."""
        response = self._call("GET", "vhosts", vhost, ok=(200, 404))
        return response.json() if response.status_code == 200 else None

    def exchange_exists(self, vhost: str, exchange: str) -> bool:
        return self._call("GET", "exchanges", vhost, exchange, ok=(200, 404)).status_code == 200

    def create_vhost(self, vhost: str, tracing: bool = True, description: str = "", **settings: str) -> None:
        # "tracing": true switches the firehose on for the vhost (as rabbitmqctl trace_on).
        self._call("PUT", "vhosts", vhost, json={"tracing": tracing, "description": description, **settings})
        self.grant(vhost, self.user)

    def grant(self, vhost: str, user: str) -> None:
        """Every permission on ``vhost`` (and on no other) to ``user``."""
        self._call("PUT", "permissions", vhost, user, json={"configure": ".*", "write": ".*", "read": ".*"})

    def set_default_queue_type(self, vhost: str, queue_type: str) -> None:
        """Queues declared in ``vhost`` without x-queue-type get ``queue_type`` from now on (RabbitMQ's
        per-vhost default queue type, 3.10 and later; exclusive queues stay classic).

        RabbitMQ 3.10 takes it only when the vhost is created (as ``defaultqueuetype``; 3.11 and later
        also update it, as ``default_queue_type``): when an update does not take, the vhost, still
        empty, is created again with it."""
        record = self.vhost(vhost) or {}
        tracing, description = bool(record.get("tracing", True)), record.get("description", "")
        settings = {"default_queue_type": queue_type, "defaultqueuetype": queue_type}
        self._call("PUT", "vhosts", vhost, json={"tracing": tracing, "description": description, **settings})
        if self.default_queue_type(vhost) == queue_type:
            return
        if self.queues(vhost):
            raise BrokerError(f"vhost {vhost!r} has queues already, and this broker sets a default queue type "
                              "only on a new vhost")
        self._call("DELETE", "vhosts", vhost, ok=(200, 204, 404))
        self.create_vhost(vhost, tracing, description, **settings)
        if self.default_queue_type(vhost) != queue_type:
            raise BrokerError(f"the broker did not take default queue type {queue_type!r} for vhost {vhost!r} "
                              "(RabbitMQ 3.10 or later is needed)")

    def default_queue_type(self, vhost: str) -> str:
        """The vhost's default queue type ('classic' when none is set: RabbitMQ says 'undefined')."""
        record = self.vhost(vhost) or {}
        value = record.get("default_queue_type") or (record.get("metadata") or {}).get("default_queue_type")
        return value if value and value != "undefined" else "classic"

    def set_tracing(self, vhost: str, on: bool = True) -> None:
        body: dict = {"tracing": on}
        queue_type = self.default_queue_type(vhost)
        if queue_type != "classic":  # a PUT may otherwise reset it
            body.update(default_queue_type=queue_type, defaultqueuetype=queue_type)
        self._call("PUT", "vhosts", vhost, json=body)

    def delete_vhost(self, vhost: str) -> None:
        """Delete the vhost and the stage users made for it (``stage_user``)."""
        self._call("DELETE", "vhosts", vhost, ok=(200, 204, 404))
        for user in self.users():
            if user.startswith(stage_user(vhost, "")):
                self.delete_user(user)

    def create_user(self, user: str, password: str, vhost: str) -> None:
        """A user with no tags and every permission on ``vhost`` only (a stage's own broker user)."""
        self._call("PUT", "users", user, json={"password": password, "tags": ""})
        self.grant(vhost, user)

    def delete_user(self, user: str) -> None:
        self._call("DELETE", "users", user, ok=(200, 204, 404))

    def users(self) -> list[str]:
        return [u["name"] for u in self._call("GET", "users").json()]

    def vhosts(self) -> list[str]:
        return [v["name"] for v in self.vhost_records()]

    def vhost_records(self) -> list[dict]:
        return self._call("GET", "vhosts").json()

    def queues(self, vhost: str) -> list[dict]:
        return self._call("GET", "queues", vhost).json()

    def connections(self, vhost: str | None = None) -> list[dict]:
        """Client connections (of ``vhost``; none when it does not exist) as far as the API knows yet."""
        if vhost is None:
            return self._call("GET", "connections").json()
        response = self._call("GET", "vhosts", vhost, "connections", ok=(200, 404))
        return response.json() if response.status_code == 200 else []

    def close_connection(self, name: str, reason: str = "closed by qp-harness") -> bool:
        """Close a connection by name; False when the API does not know it (yet, or any more)."""
        response = self._call("DELETE", "connections", name, headers={"X-Reason": reason}, ok=(200, 204, 404))
        return response.status_code != 404


def stage_user(vhost: str, instance: str) -> str:
    """The broker user of one stage instance in one test's vhost: the observer knows the stage by it
    (a stage in a container or on another host is no process the harness can look into)."""
    return f"{vhost}.{instance}"


# --------------------------------------------------------------------------- vhost owners
# Each per-test vhost carries its maker in its description. On a broker the harness did not
# start (external), a session killed with SIGKILL cannot delete its vhosts; the next session on
# the same host finds them by that description and removes those whose maker is dead.

OWNER_MARK = "made by qp-harness"


@dataclass(frozen=True)
class VhostOwner:
    host: str
    pid: int
    started: float  # the process's start time, so that a reused pid is not taken for the maker

    def description(self) -> str:
        return f"{OWNER_MARK}: host={self.host} pid={self.pid} started={self.started:.2f}"

    @classmethod
    def this_process(cls) -> "VhostOwner":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    @classmethod
    def parse(cls, description: str) -> "VhostOwner | None":
        if not description.startswith(OWNER_MARK + ": "):
            return None
        fields = dict(part.split("=", 1) for part in description[len(OWNER_MARK) + 2:].split() if "=" in part)
        try:
            return cls(fields["host"], int(fields["pid"]), float(fields["started"]))
        except (KeyError, ValueError):
            return None


def stale_vhosts(records: list[dict], host: str,
                 alive: Callable[[int, float], bool] = watchdog.process_alive) -> list[str]:
    """Names of the vhosts a dead qp-harness process on ``host`` left behind.

    Vhosts made on other hosts are never judged: their makers cannot be seen from here.
    """
    stale = []
    for record in records:
        # RabbitMQ 3.8-3.10 give the description at the top level, 3.11+ also under "metadata"
        description = record.get("description") or (record.get("metadata") or {}).get("description") or ""
        owner = VhostOwner.parse(description)
        if owner is not None and owner.host == host and not alive(owner.pid, owner.started):
            stale.append(record["name"])
    return sorted(stale)


class BrokerNode(NamedTuple):
    """One node of a cluster: where its clients connect, and its own management API."""

    host: str
    amqp_port: int
    management_url: str

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.amqp_port)


@dataclass
class Broker:
    """A running broker as a test sees it."""

    host: str
    amqp_port: int
    management_url: str
    user: str
    password: str
    provider: str
    #: process groups the provider started (local provider), for diagnostics and tests
    process_groups: list[int] = field(default_factory=list, repr=False)
    management: ManagementClient = field(init=False, repr=False)
    #: stop the node, wait the given seconds, start it again with the same ports and data
    #: (the local provider only; None elsewhere): the restart_broker fault
    restart: Callable[[float], None] | None = field(default=None, repr=False)
    #: every node of a cluster, the seed's first; [] for one node. A local cluster (harness.cluster)
    #: or several --rabbitmq-url: stages are spread over them
    nodes: list["BrokerNode"] = field(default_factory=list)
    #: the harness.cluster.LocalCluster these nodes belong to (node faults), else None
    cluster: object | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.management = ManagementClient(self.management_url, self.user, self.password)

    def node_addresses(self) -> list[tuple[str, int]]:
        """Where stages may connect: every node of a cluster, else this broker's own address."""
        return [n.address for n in self.nodes] or [(self.host, self.amqp_port)]

    def trace_on(self, vhost: str) -> None:
        """Switch the firehose on for ``vhost`` on every node: RabbitMQ traces per node, and a node
        that (re)starts has it off, so each node's own management API is asked."""
        self.management.set_tracing(vhost, True)
        for node in self.nodes[1:]:
            ManagementClient(node.management_url, self.user, self.password).set_tracing(vhost, True)

    def amqp_url(self, vhost: str = "/") -> str:
        return f"amqp://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.amqp_port}/{quote(vhost, safe='')}"

    def connection_parameters(self, vhost: str = "/", **kwargs) -> pika.ConnectionParameters:
        kwargs.setdefault("connection_attempts", 3)
        kwargs.setdefault("retry_delay", 0.5)
        kwargs.setdefault("credentials", pika.PlainCredentials(self.user, self.password))
        return pika.ConnectionParameters(host=self.host, port=self.amqp_port, virtual_host=vhost, **kwargs)


# What a single-attempt BlockingConnection raises when the broker does not answer: a handshake that
# times out (a hung node) comes as pika's connector exception, not as an AMQPError.
CONNECT_ERRORS = (pika.exceptions.AMQPError, AMQPConnectorException)


def amqp_problem(broker: Broker, vhost: str = "/", timeout: float = 2.0, **limits: float) -> str | None:
    """Why a full AMQP handshake (login included) failed within ``timeout`` seconds, or None when it
    succeeded. ``limits`` are further pika connection timeouts (``stack_timeout``)."""
    try:
        connection = pika.BlockingConnection(broker.connection_parameters(
            vhost, connection_attempts=1, socket_timeout=timeout, blocked_connection_timeout=timeout, **limits))
    except CONNECT_ERRORS as error:
        return f"AMQP at {broker.host}:{broker.amqp_port} did not answer within {timeout:g} s ({type(error).__name__})"
    try:
        connection.close()
    except pika.exceptions.AMQPError:
        pass  # it answered; a close that fails says nothing about the broker
    return None


def amqp_answers(broker: Broker, vhost: str = "/") -> bool:
    """True when a full AMQP handshake (login included) succeeds."""
    return amqp_problem(broker, vhost) is None


# A health probe runs after every test that used the session broker, so it must be cheap: one AMQP
# handshake and one management call, each given this long. A node that is up answers both in about
# 20 ms (50 ms at most, measured on the local provider here); a killed one refuses at once; only a hung
# one (SIGSTOP, a stuck disk) uses the deadline.
HEALTH_DEADLINE = 2.0


def health_problem(broker: Broker, deadline: float = HEALTH_DEADLINE) -> str | None:
    """Why the broker does not answer (None when it does): a cheap check between tests.

    A local broker whose server process group has emptied is known gone without asking it;
    otherwise an AMQP handshake (login included) and a management API call must each answer
    within ``deadline`` seconds.
    """
    if broker.process_groups and not watchdog.group_members(broker.process_groups[0]):
        return f"its rabbitmq-server (process group {broker.process_groups[0]}) is no longer running"
    return amqp_problem(broker, timeout=deadline, stack_timeout=deadline) or broker.management.ping(deadline)


def readiness_problem(broker: Broker) -> str | None:
    """What is not ready yet (None when ready): AMQP answers, node started, event exchange on."""
    if not amqp_answers(broker):
        return "AMQP does not answer"
    try:
        overview = broker.management.overview()
        if not broker.management.node(overview["node"]).get("running"):
            return f"node {overview['node']} does not report running"
        if not broker.management.exchange_exists("/", EVENT_EXCHANGE):
            return f"exchange {EVENT_EXCHANGE} missing (plugin rabbitmq_event_exchange not enabled)"
    except (requests.RequestException, BrokerError, KeyError) as error:
        return f"management API: {error}"
    return None


# --------------------------------------------------------------------------- ports

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortClaims:
    """Free loopback ports, each claimed by an exclusive lock file.

    The lock (``flock`` on ``CLAIMS_DIR/port-N.lock``) is held from the choice
    of a port until ``release()`` (a local broker holds its ports until it is
    stopped, through restarts and revives), so no two harness processes on
    this machine (xdist workers, parallel runs) ever hand out the same port;
    the kernel drops the lock if the holder dies, so claims never go stale.
    """

    def __init__(self) -> None:
        self._files: list = []

    def claim(self) -> int:
        CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(200):
            port = free_port()
            handle = open(CLAIMS_DIR / f"port-{port}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self._files.append(handle)
            return port
        raise BrokerError("could not claim a free loopback port")

    def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()


# --------------------------------------------------------------------------- local provider

def find_rabbitmq_bin(extra: str | Path | None = None) -> Path | None:
    for directory in ((extra,) if extra else ()) + RABBITMQ_BIN_DIRS:
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
            time.sleep(0.05)
    return False


class LocalBroker:
    """A private rabbitmq-server: own HOME and cookie, node name, ports, data and log dirs.

    The server and its own epmd each run in a new process group, registered
    with the watchdog and stopped by group id at ``stop()``; nothing is found
    or stopped by name. ``restart()`` (the restart_broker fault) and ``revive()``
    (a node that stopped answering) start it again on the same ports, data dir
    and credentials. ``extra_config`` is appended to ``rabbitmq.conf``.
    ``stop_mode`` ``"kill"`` (default) ends the throw-away node at once;
    ``"graceful"`` asks it to shut down (about 7 s on a 2-core machine).
    """

    def __init__(self, workdir: Path, start_timeout: float = 60.0, *, bin_dir: str | Path | None = None,
                 extra_config: str = "", stop_mode: str = "kill", start_attempts: int = 3,
                 home: Path | None = None, epmd_port: int | None = None):
        self.workdir = Path(workdir)
        # A cluster's nodes share one HOME (the Erlang cookie) and one epmd, started by the first node.
        self.home = Path(home) if home else self.workdir / "home"
        self.shared_epmd = epmd_port
        self.start_timeout = start_timeout
        self.bin_dir = bin_dir
        self.extra_config = extra_config
        self.stop_mode = stop_mode
        self.start_attempts = start_attempts
        self.process: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.epmd_port: int | None = None
        #: the node's four ports stay claimed while it may use them, so that no other harness
        #: process takes one while the node is down for a restart or a revive
        self.claims = PortClaims()
        self.broker: Broker | None = None
        self.node: str | None = None
        self.timings: dict[str, float] = {}

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 30, first_errors: int = 10) -> str:
        """The log's last lines, preceded by its first error lines (the cause is often early)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        tail = text[-lines:]
        early = [line for line in text[:-lines] if "[error]" in line or "rror" in line][:first_errors]
        return "\n".join((early + ["..."] if early else []) + tail)

    def start(self) -> Broker:
        bin_dir = find_rabbitmq_bin(self.bin_dir)
        if bin_dir is None:
            raise BrokerError("rabbitmq-server is not installed (sudo apt-get install rabbitmq-server; "
                              f"looked in {', '.join(map(str, ((self.bin_dir,) if self.bin_dir else ()) + RABBITMQ_BIN_DIRS))})")
        began = time.monotonic()
        for attempt in range(1, self.start_attempts + 1):
            try:
                broker = self._start_once(bin_dir)
                break
            except BrokerError as error:
                # A port taken by a stranger between our check and the broker's bind: new ports, new try.
                if "eaddrinuse" not in str(error) or attempt == self.start_attempts:
                    raise
        self.timings["start"] = time.monotonic() - began
        self.broker = broker
        return broker

    def _start_once(self, bin_dir: Path) -> Broker:
        for sub in ("mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            amqp, mgmt, dist = (self.claims.claim() for _ in range(3))
            epmd_port = self.shared_epmd or self.claims.claim()
            user, password = "qp-" + secrets.token_hex(4), secrets.token_urlsafe(18)
            self.node = f"qp{os.getpid()}x{secrets.token_hex(3)}@localhost"
            (self.workdir / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{amqp}\n"
                f"management.tcp.port = {mgmt}\nmanagement.tcp.ip = 127.0.0.1\n"
                f"default_user = {user}\ndefault_pass = {password}\n"
                "default_user_tags.administrator = true\n"
                "default_vhost = /\nloopback_users = none\n"
                # Connections reach the management API's view (and can be closed through it)
                # after one statistics interval: 0.5 s instead of the default 5 s.
                "collect_statistics_interval = 500\n"
                "log.console = true\nlog.console.level = info\nlog.file = false\n"
                + self.extra_config + ("\n" if self.extra_config else "")
            )
            (self.workdir / "rabbitmq-env.conf").write_text("")
            env = {
                # Nothing of a system or user RabbitMQ/Erlang set-up may leak into this node.
                **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
                "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
                "HOME": str(self.home),  # the Erlang cookie is created (or, in a cluster, shared) here
                "ERL_EPMD_PORT": str(epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(dist),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
                "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
                "RABBITMQ_ENABLED_PLUGINS": PLUGINS,
                "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
                "ERL_CRASH_DUMP": str(self.workdir / "erl_crash.dump"),
            }
            self._env, self._bin_dir, self.epmd_port = env, bin_dir, epmd_port
            if not self.shared_epmd:
                self._start_epmd()
            self._start_node()
            broker = Broker("127.0.0.1", amqp, f"http://127.0.0.1:{mgmt}", user, password, "local",
                            process_groups=[self.process.pid] + ([self.epmd.pid] if self.epmd else []))
            self._wait_ready(broker)
            return broker
        except BaseException:
            self.stop()  # Ctrl-C or any error half-way: nothing of this attempt stays up
            raise

    def _start_epmd(self) -> None:
        # Our own epmd on a private port, so none is left behind as a daemon; it must
        # listen before the node starts, or erl would spawn a detached one itself.
        with open(self.log_path, "ab") as log:
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=self._env)
        watchdog.register_process_group(self.epmd.pid, grace=0)
        if not wait_for_port("127.0.0.1", self.epmd_port, time.monotonic() + 10):
            self.stop()
            raise BrokerError(f"epmd did not listen on port {self.epmd_port}; log tail:\n{self.log_tail()}")

    def _start_node(self, note: str = "") -> None:
        with open(self.log_path, "ab") as log:
            if note:
                log.write(f"\n---- qp-harness: {note} ----\n".encode())
                log.flush()
            self.process = subprocess.Popen([str(self._bin_dir / "rabbitmq-server")], stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, env=self._env, start_new_session=True)
        watchdog.register_process_group(self.process.pid, grace=0)

    @property
    def environment(self) -> dict[str, str]:
        """The node's environment (cookie, epmd, node name): what rabbitmqctl needs to reach it."""
        return dict(self._env)

    def bin_path(self, name: str) -> Path:
        return self._bin_dir / name

    def kill_node(self) -> None:
        """SIGKILL the node (a node fault); ``restart`` brings it back."""
        self._kill_node()

    def _kill_node(self) -> None:
        """SIGKILL the node's process group (whatever is left of it) and wait until it is gone."""
        _signal_group(self.process, signal.SIGKILL)
        self.process.wait(15)
        _wait_group_gone(self.process.pid, 15)
        watchdog.unregister_process_group(self.process.pid)

    def start_again(self) -> None:
        """Start the node after ``kill_node``, on the same ports and data dir."""
        self._start_node(f"starting {self.node} again")
        self.broker.process_groups[0] = self.process.pid
        self._wait_ready(self.broker)

    def restart(self, down: float = 1.0) -> None:
        """Kill the node (not its epmd), wait ``down`` seconds, start it on the same ports and data dir.

        Vhosts, users and durable queues survive; the firehose tracer does not (the caller
        switches it on again)."""
        if self.broker is None or self.process is None:
            raise BrokerError("restart: the local broker is not running")
        self._kill_node()
        time.sleep(down)
        self._start_node(f"restarting {self.node} after {down:g} s down")
        self.broker.process_groups[0] = self.process.pid
        self._wait_ready(self.broker)

    def revive(self) -> float:
        """Bring a dead or hung node back for the next test; returns the seconds it took.

        Whatever is left of the node's process group is killed (by group id), epmd is started
        again if it went too, and the node starts on the same ports, data dir and credentials,
        so the ``Broker`` the tests hold stays valid. Raises ``BrokerError`` (with the log tail)
        and leaves nothing running if the node does not come back.
        """
        if self.broker is None or self.process is None:
            raise BrokerError("revive: the local broker was never started")
        began = time.monotonic()
        self._kill_node()
        if not self.shared_epmd and (self.epmd is None or not watchdog.group_members(self.epmd.pid)):
            if self.epmd is not None:
                self.epmd.wait(5)
                watchdog.unregister_process_group(self.epmd.pid)
            self._start_epmd()
        self._start_node(f"reviving {self.node}: it stopped answering")
        self.broker.process_groups[:] = [self.process.pid] + ([self.epmd.pid] if self.epmd else [])
        self._wait_ready(self.broker)
        self.timings["revive"] = time.monotonic() - began
        return self.timings["revive"]

    def _wait_ready(self, broker: Broker) -> None:
        deadline = time.monotonic() + self.start_timeout
        problem = "not started"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise BrokerError(f"rabbitmq-server ({self.node}) exited with code {code} while starting; "
                                  f"log tail ({self.log_path}):\n{self.log_tail()}")
            if wait_for_port(broker.host, broker.amqp_port, min(deadline, time.monotonic() + 0.5)):
                problem = readiness_problem(broker)
                if problem is None:
                    return
            else:
                problem = f"AMQP port {broker.amqp_port} not listening"
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"rabbitmq-server ({self.node}) not ready after {self.start_timeout:.0f} s ({problem}); "
                          f"log tail ({self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        began = time.monotonic()
        graceful = self.stop_mode == "graceful"
        for proc in (self.process, self.epmd):
            if proc is None:
                continue
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(5)
            # beam may outlive the wrapper shell for a moment: reap the whole group.
            _wait_group_gone(proc.pid, timeout)
            watchdog.unregister_process_group(proc.pid)
        self.claims.release()
        self.timings["stop"] = time.monotonic() - began


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not watchdog.group_members(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
