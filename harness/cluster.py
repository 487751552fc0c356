"""A local RabbitMQ cluster: N private rabbitmq-server nodes joined with ``rabbitmqctl join_cluster``.

    pytest suites/ --rabbitmq-provider local --rabbitmq-nodes 3

Each node is a ``LocalBroker`` of its own (own node name, ports, data and log dirs, process
group), all sharing one epmd and one Erlang cookie so that they can find each other. The first
node is the seed; every other one is stopped, reset, joined to it and started again, after which
users, vhosts and permissions are the cluster's. The ``Broker`` the tests get is the seed's, with
``nodes`` listing every node (address and management API): the stage launcher spreads stage instances over
them, so stages connect to different nodes, while the observer, on the seed, sees the whole
cluster (the event exchange and the firehose route across nodes).

``kill_node(i)``/``start_node(i)`` (SIGKILL) and ``stop_app(i)``/``start_app(i)`` (a graceful
restart, as in a rolling upgrade) are what the node faults call.
"""
from __future__ import annotations

import secrets
import subprocess
import threading
import time
from pathlib import Path

from harness.broker import Broker, BrokerError, BrokerNode, LocalBroker, readiness_problem, wait_for_port

JOIN_TIMEOUT = 120.0  # seconds for stop_app, reset, join_cluster and start_app on a loaded 2-core machine


class LocalCluster:
    def __init__(self, workdir: Path, nodes: int, start_timeout: float = 60.0, *, bin_dir: str | Path | None = None,
                 stop_mode: str = "kill"):
        if nodes < 2:
            raise BrokerError(f"a cluster needs at least 2 nodes, not {nodes}")
        self.workdir = Path(workdir)
        self.count = nodes
        self.start_timeout = start_timeout
        self.bin_dir = bin_dir
        self.stop_mode = stop_mode
        self.nodes: list[LocalBroker] = []
        self.broker: Broker | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> Broker:
        began = time.monotonic()
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        try:
            seed = self._node(1, home, epmd_port=None)
            self.broker = seed.start()
            for index in range(2, self.count + 1):
                node = self._node(index, home, epmd_port=seed.epmd_port)
                node.start()
                self._join(node, seed)
        except BaseException:
            self.stop()
            raise
        self.broker.nodes = [BrokerNode(n.broker.host, n.broker.amqp_port, n.broker.management_url)
                             for n in self.nodes]
        self.broker.cluster = self
        self.broker.provider = f"local cluster of {self.count}"
        self.timings["start"] = time.monotonic() - began
        return self.broker

    def _node(self, index: int, home: Path, epmd_port: int | None) -> LocalBroker:
        node = LocalBroker(self.workdir / f"node{index}", self.start_timeout, bin_dir=self.bin_dir,
                           stop_mode=self.stop_mode, home=home, epmd_port=epmd_port)
        self.nodes.append(node)
        return node

    def _join(self, node: LocalBroker, seed: LocalBroker) -> None:
        """stop_app, reset, join_cluster SEED, start_app; then the node answers with the cluster's users."""
        for args in (["stop_app"], ["reset"], ["join_cluster", seed.node], ["start_app"]):
            self.ctl(node, *args)
        # The node's own default user is gone with the reset: it is ready when the seed's answers there.
        node.broker = Broker(node.broker.host, node.broker.amqp_port, node.broker.management_url, self.broker.user,
                             self.broker.password, "local", process_groups=node.broker.process_groups)
        self._wait_answers(node, f"after joining {seed.node}")

    def _wait_answers(self, node: LocalBroker, when: str = "after start_app") -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if wait_for_port(node.broker.host, node.broker.amqp_port, min(deadline, time.monotonic() + 0.5)) \
                    and readiness_problem(node.broker) is None:
                return
            time.sleep(0.2)
        raise BrokerError(f"{node.node} did not answer {when}; log tail:\n{node.log_tail()}")

    def ctl(self, node: LocalBroker, *args: str) -> str:
        """``rabbitmqctl -n NODE ARGS`` with the node's environment (cookie, epmd); raises with its output."""
        command = [str(node.bin_path("rabbitmqctl")), "-n", node.node, *args]
        done = subprocess.run(command, env=node.environment, capture_output=True, text=True, timeout=JOIN_TIMEOUT)
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {node.node} failed ({done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-600:]}")
        return done.stdout

    def members(self) -> list[str]:
        """The running nodes, as the seed's management API reports them."""
        return sorted(n["name"] for n in self.broker.management.nodes() if n.get("running"))

    def node_index(self, address: tuple[str, int]) -> int:
        return [n.address for n in self.broker.nodes].index(address)

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` (0 = the seed) and leave it down."""
        self.nodes[index].kill_node()

    def start_node(self, index: int) -> None:
        """Start a killed node again on its ports and data; it rejoins the cluster."""
        self.nodes[index].start_again()

    def restart_node(self, index: int, down: float = 1.0) -> None:
        """Kill node ``index``, wait ``down`` seconds, start it again on its ports and data; it rejoins."""
        self.nodes[index].restart(down)

    def restart_all(self, down: float = 1.0) -> None:
        """The restart_broker fault on a cluster: every node killed, ``down`` seconds, every node started
        again at once (a clustered node waits for its peers' tables while it boots, so one at a time
        would wait for ever), ready when each answers."""
        for node in reversed(self.nodes):
            node.kill_node()
        time.sleep(down)
        errors: list[BaseException] = []

        def start(node: LocalBroker) -> None:
            try:
                node.start_again()
            except BaseException as exc:  # noqa: BLE001 - reported below, with the node's name
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(node,), name=f"start-{node.node}") for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BrokerError(f"the cluster did not come back after a restart: {errors[0]}")

    def stop_app(self, index: int) -> None:
        """``rabbitmqctl stop_app`` on node ``index``: RabbitMQ stops (closing its clients' connections),
        the Erlang node stays up and in the cluster."""
        self.ctl(self.nodes[index], "stop_app")

    def start_app(self, index: int) -> None:
        """``rabbitmqctl start_app`` after ``stop_app``; returns when the node answers AMQP again."""
        node = self.nodes[index]
        self.ctl(node, "start_app")
        self._wait_answers(node)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
