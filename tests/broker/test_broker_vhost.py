"""A fresh vhost per test on the session broker: created, traced, isolated, deleted."""
from __future__ import annotations

import pika
import psutil
import pytest

from harness.watchdog import group_members

SEEN: dict[str, str] = {}


def test_vhost_exists_with_tracing_and_is_usable(broker, vhost, amqp_channel):
    record = broker.management.vhost(vhost.name)
    assert record is not None and record["tracing"] is True
    amqp_channel.queue_declare("smoke", durable=True)
    assert [q["name"] for q in broker.management.queues(vhost.name)] == ["smoke"]


@pytest.fixture
def vhost_seen_after_teardown(broker):
    """Requested before ``vhost``, so its teardown runs after the vhost's own."""
    names = []
    yield names
    assert names and all(broker.management.vhost(name) is None for name in names)


def test_vhost_is_deleted_at_teardown(vhost_seen_after_teardown, vhost, broker):
    vhost_seen_after_teardown.append(vhost.name)
    assert vhost.name in broker.management.vhosts()


@pytest.mark.parametrize("step", ["first", "second"])
def test_two_tests_see_nothing_of_each_other(step, broker, vhost, amqp_channel):
    # Both tests use the same queue name; each must find its vhost empty first.
    assert broker.management.queues(vhost.name) == []
    amqp_channel.confirm_delivery()
    amqp_channel.queue_declare("shared-name", durable=True)
    amqp_channel.basic_publish("", "shared-name", step.encode())
    declared = amqp_channel.queue_declare("shared-name", durable=True, passive=True)
    assert declared.method.message_count == 1
    for other_step, other_vhost in SEEN.items():
        assert other_step != step
        assert broker.management.vhost(other_vhost) is None, "the earlier test's vhost was not deleted"
    SEEN[step] = vhost.name


def test_two_vhosts_at_once_are_isolated(vhost_factory, broker):
    a, b = vhost_factory("a"), vhost_factory("b")
    with pika.BlockingConnection(a.parameters()) as conn_a, pika.BlockingConnection(b.parameters()) as conn_b:
        ch_a, ch_b = conn_a.channel(), conn_b.channel()
        ch_a.confirm_delivery()
        ch_a.queue_declare("q", durable=True)
        ch_b.queue_declare("q", durable=True)
        for _ in range(3):
            ch_a.basic_publish("", "q", b"x")
        assert ch_a.queue_declare("q", passive=True).method.message_count == 3
        assert ch_b.queue_declare("q", passive=True).method.message_count == 0
        ch_a.queue_declare("only-in-a", durable=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing:
            ch_b.queue_declare("only-in-a", passive=True)
        assert missing.value.reply_code == 404
    assert [q["name"] for q in broker.management.queues(b.name)] == ["q"]


def test_vhost_factory_deletes_its_vhosts(vhost_seen_after_teardown, vhost_factory, broker):
    for label in ("x", "y"):
        made = vhost_factory(label)
        vhost_seen_after_teardown.append(made.name)
        assert broker.management.vhost(made.name)["tracing"] is True


def test_deleting_the_vhost_cancels_attached_consumers(vhost_factory, broker):
    victim = vhost_factory("victim")
    connection = pika.BlockingConnection(victim.parameters())
    channel = connection.channel()
    channel.queue_declare("work", durable=True)
    channel.basic_consume("work", lambda *a: None)
    broker.management.delete_vhost(victim.name)
    with pytest.raises(pika.exceptions.AMQPError):
        for _ in range(50):
            connection.process_data_events(time_limit=0.1)
    assert broker.management.vhost(victim.name) is None


def test_the_event_exchange_is_there(broker):
    assert broker.management.exchange_exists("/", "amq.rabbitmq.event")


def test_local_broker_listens_on_loopback_only_and_not_as_guest(broker):
    if broker.provider != "local":
        pytest.skip("checks the local provider's own processes")
    listening = [conn.laddr.ip for pgid in broker.process_groups for proc in group_members(pgid)
                 for conn in proc.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4  # amqp, management, distribution, epmd
    assert set(listening) <= {"127.0.0.1", "::1"}
    assert broker.user != "guest"
    assert [u["name"] for u in broker.management.session.get(broker.management._url("users")).json()] == [broker.user]


def test_a_stage_user_may_use_its_vhost_only_and_goes_with_it(vhost_factory, broker):
    from harness.broker import stage_user
    mine, other = vhost_factory("mine"), vhost_factory("other")
    user = stage_user(mine.name, "worker#2")
    broker.management.create_user(user, "pw-of-the-stage", mine.name)
    credentials = pika.PlainCredentials(user, "pw-of-the-stage")
    connection = pika.BlockingConnection(broker.connection_parameters(mine.name, credentials=credentials))
    connection.close()
    with pytest.raises(pika.exceptions.AMQPConnectionError):  # access refused to the other vhost
        pika.BlockingConnection(broker.connection_parameters(other.name, credentials=credentials,
                                                             connection_attempts=1))
    broker.management.delete_vhost(mine.name)
    assert user not in broker.management.users()


def test_a_quorum_default_queue_type_makes_the_engines_plain_declarations_quorum_queues(broker, vhost):
    """broker.default_queue_type: queues declared as OS2datascanner declares them (durable, no arguments)
    become quorum queues; the harness's own exclusive and auto-delete queues stay classic; switching the
    firehose on again (after a broker restart) keeps the default. Set before anyone connects (a 3.10
    broker takes it only on a new vhost, which the harness then makes)."""
    broker.management.set_default_queue_type(vhost.name, "quorum")
    connection = pika.BlockingConnection(broker.connection_parameters(vhost.name))
    amqp_channel = connection.channel()
    amqp_channel.queue_declare("os2ds_conversions", durable=True)
    amqp_channel.queue_declare("private", exclusive=True)
    amqp_channel.queue_declare("trace", auto_delete=True, arguments={"x-queue-type": "classic"})
    types = {q["name"]: q.get("type") for q in broker.management.queues(vhost.name)}
    assert types == {"os2ds_conversions": "quorum", "private": "classic", "trace": "classic"}, types
    # The engine's next declaration of its queue, without arguments, is equivalent: no channel error.
    amqp_channel.queue_declare("os2ds_conversions", durable=True)
    broker.management.set_tracing(vhost.name, True)
    assert broker.management.default_queue_type(vhost.name) == "quorum"
    assert broker.management.vhost(vhost.name)["tracing"] is True
    connection.close()
