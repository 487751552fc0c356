"""A local RabbitMQ cluster (--rabbitmq-nodes N): real nodes joined into one, a node killed and brought back."""
from __future__ import annotations

import socket

import pika
import pytest

from harness import watchdog
from harness.broker import Broker, BrokerError, find_rabbitmq_bin
from harness.cluster import LocalCluster
from harness.providers import ExternalProvision, ProviderSettings
from waiting import wait_until

pytestmark = pytest.mark.skipif(find_rabbitmq_bin() is None, reason="rabbitmq-server is not installed")


def node_broker(cluster: LocalCluster, index: int) -> Broker:
    seed = cluster.broker
    return Broker(seed.host, cluster.broker.nodes[index].amqp_port, seed.management_url, seed.user, seed.password, "local")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = LocalCluster(tmp_path_factory.mktemp("cluster"), 3)
    made.start()
    yield made
    made.stop()
    assert not [pg for node in made.nodes for pg in node.broker.process_groups if watchdog.group_members(pg)], \
        "a node's processes outlived stop()"


@pytest.mark.slow
def test_three_nodes_form_one_cluster_that_routes_across_nodes_and_survives_a_node(cluster):
    assert len(cluster.members()) == 3
    assert len(set(cluster.broker.nodes)) == 3
    cluster.broker.management.create_vhost("qp-cluster-test")
    # A queue declared through node 2 is reachable through node 3: one cluster, not three brokers.
    two = pika.BlockingConnection(node_broker(cluster, 1).connection_parameters("qp-cluster-test"))
    two.channel().queue_declare("on_node_2", durable=True)
    three = pika.BlockingConnection(node_broker(cluster, 2).connection_parameters("qp-cluster-test"))
    publisher = three.channel()
    publisher.confirm_delivery()  # the queue holds it once the broker confirms, not when basic_publish returns
    publisher.basic_publish("", "on_node_2", b"hello")
    assert two.channel().queue_declare("on_node_2", passive=True).method.message_count == 1
    three.close()
    cluster.kill_node(2)
    wait_until(lambda: len(cluster.members()) == 2, 30, "the cluster to report node 3 down")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(node_broker(cluster, 2).connection_parameters("qp-cluster-test", connection_attempts=1))
    cluster.restart_node(2, down=0.5)
    wait_until(lambda: len(cluster.members()) == 3, 30, "the cluster to report node 3 back")
    two.close()


@pytest.mark.slow
def test_an_external_cluster_is_given_as_one_url_per_node(cluster, tmp_path):
    seed = cluster.broker
    urls = ",".join(f"amqp://{seed.user}:{seed.password}@{node.host}:{node.amqp_port}/" for node in seed.nodes)
    managements = ",".join(node.management_url for node in seed.nodes)
    provision = ExternalProvision(ProviderSettings("external", urls, managements))
    provision.start(tmp_path)
    assert provision.broker.node_addresses() == seed.node_addresses()
    assert provision.broker.provider == "external cluster of 3"
    dead = f"amqp://{seed.user}:{seed.password}@127.0.0.1:{free_port()}/"
    with pytest.raises(BrokerError, match="is not usable"):
        ExternalProvision(ProviderSettings("external", f"{urls},{dead}", managements + ",http://127.0.0.1:9")).start(tmp_path)


@pytest.mark.slow
def test_restarting_the_whole_cluster_keeps_its_durable_queues(cluster):
    """restart_broker on a cluster: every node down, then all started at once; they find each other again."""
    cluster.broker.management.create_vhost("qp-cluster-restart")
    with pika.BlockingConnection(node_broker(cluster, 1).connection_parameters("qp-cluster-restart")) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("kept", durable=True)
        channel.basic_publish("", "kept", b"persistent", pika.BasicProperties(delivery_mode=2))
    cluster.restart_all(down=0.5)
    wait_until(lambda: len(cluster.members()) == 3, 30, "all three nodes running again")
    with pika.BlockingConnection(node_broker(cluster, 2).connection_parameters("qp-cluster-restart")) as connection:
        assert connection.channel().queue_declare("kept", passive=True).method.message_count == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cluster_needs_two_nodes(tmp_path):
    with pytest.raises(BrokerError, match="at least 2 nodes"):
        LocalCluster(tmp_path, 1)
