"""A local RabbitMQ cluster (--rabbitmq-nodes N): real nodes joined into one, a node killed and brought back."""
from __future__ import annotations

import pika
import pytest

from harness import watchdog
from harness.broker import Broker, BrokerError, find_rabbitmq_bin
from harness.cluster import LocalCluster

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")


def node_broker(cluster: LocalCluster, index: int) -> Broker:
    seed = cluster.broker
    return Broker(seed.host, cluster.broker.node_ports[index], seed.management_url, seed.user, seed.password, "local")


@pytest.fixture
def cluster(tmp_path):
    made = LocalCluster(tmp_path / "cluster", 3)
    made.start()
    yield made
    made.stop()
    assert not [pg for node in made.nodes for pg in node.broker.process_groups if watchdog.group_members(pg)], \
        "a node's processes outlived stop()"


@pytest.mark.slow
def test_three_nodes_form_one_cluster_that_routes_across_nodes_and_survives_a_node(cluster):
    assert len(cluster.members()) == 3
    assert len(set(cluster.broker.node_ports)) == 3
    cluster.broker.management.create_vhost("qp-cluster-test")
    # A queue declared through node 2 is reachable through node 3: one cluster, not three brokers.
    two = pika.BlockingConnection(node_broker(cluster, 1).connection_parameters("qp-cluster-test"))
    two.channel().queue_declare("on_node_2", durable=True)
    three = pika.BlockingConnection(node_broker(cluster, 2).connection_parameters("qp-cluster-test"))
    three.channel().basic_publish("", "on_node_2", b"hello")
    assert two.channel().queue_declare("on_node_2", passive=True).method.message_count == 1
    three.close()
    cluster.kill_node(2)
    assert len(cluster.members()) == 2
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(node_broker(cluster, 2).connection_parameters("qp-cluster-test", connection_attempts=1))
    cluster.restart_node(2, down=0.5)
    assert len(cluster.members()) == 3
    two.close()


def test_a_cluster_needs_two_nodes(tmp_path):
    with pytest.raises(BrokerError, match="at least 2 nodes"):
        LocalCluster(tmp_path, 1)
