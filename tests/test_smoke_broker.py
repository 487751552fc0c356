def test_vhost_is_usable(amqp_channel, vhost, broker):
    amqp_channel.queue_declare("smoke", durable=True)
    assert "smoke" in [q["name"] for q in broker.management.queues(vhost.name)]
