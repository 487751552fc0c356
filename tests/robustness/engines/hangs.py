"""An engine that connects, declares and consumes its QUEUE_PRIORITY queues, then hangs in its first delivery.

It never acks and never returns from the callback: the consumers stay on the
broker (so it passes G), but no message is processed after the first one.
SIGTERM is ignored while hanging, so the harness has to escalate to SIGKILL.
"""
import os
import signal
import sys
import time
import tomllib

import pika

stage = sys.argv[1] if len(sys.argv) > 1 else "?"
with open(os.environ["OS2DS_ENGINE_USER_CONFIG_PATH"], "rb") as f:
    amqp = tomllib.load(f)["amqp"]
params = pika.ConnectionParameters(amqp["AMQP_HOST"], int(amqp["AMQP_PORT"]), amqp["AMQP_VHOST"],
                                   pika.PlainCredentials(amqp["AMQP_USER"], amqp["AMQP_PWD"]), heartbeat=0)
connection = pika.BlockingConnection(params)
channel = connection.channel()
channel.basic_qos(prefetch_count=1)
queues = list(dict.fromkeys(os.environ.get("QUEUE_PRIORITY", "").split())) or ["os2ds_conversions"]


def on_message(ch, method, properties, body):
    print(f"hangs {stage}: got a message from {method.routing_key}; hanging now", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)


for queue in queues:
    channel.queue_declare(queue, durable=True)
    channel.basic_consume(queue, on_message)
print(f"hangs {stage}: consuming {' '.join(queues)}", flush=True)
channel.start_consuming()
