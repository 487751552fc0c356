"""A tiny stand-in engine stage for the harness's own tests (not an engine).

Reads the broker settings as an engine does (TOML file named by
OS2DS_ENGINE_USER_CONFIG_PATH, [amqp] table), then, driven by environment
variables:

- FAKE_EXIT=N: print FAKE_LINES numbered lines and exit with code N at once.
- FAKE_DUMP=path: write {"argv", "env", "config"} as JSON to path, then carry on.
- consume every queue of QUEUE_PRIORITY (whitespace-split; default FAKE_DEFAULT_QUEUE),
  declared durable with no arguments, prefetch FAKE_PREFETCH (default 2), acking
  what it receives;
- FAKE_PUBLISH_TO=queue: publish one gzip JSON message (FAKE_BODY, JSON text) there
  after consuming; FAKE_PUBLISH_ON_DELIVERY=queue: publish one message there per delivery;
- FAKE_IGNORE_TERM=1: ignore SIGTERM (to exercise the SIGKILL after the grace);
- FAKE_CHILD=1: run the whole thing in a child process (a wrapper-style engine command).
SIGTERM cancels the consumers, closes the connection and exits 0.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tomllib

import pika


def main() -> int:
    stage = sys.argv[1] if len(sys.argv) > 1 else "?"
    if os.environ.get("FAKE_CHILD") == "1":
        env = dict(os.environ, FAKE_CHILD="0")
        child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env=env)
        signal.signal(signal.SIGTERM, lambda *a: child.send_signal(signal.SIGTERM))
        return child.wait()
    if "FAKE_EXIT" in os.environ:
        for number in range(1, int(os.environ.get("FAKE_LINES", "50")) + 1):
            print(f"fake {stage} line {number}")
        return int(os.environ["FAKE_EXIT"])
    with open(os.environ["OS2DS_ENGINE_USER_CONFIG_PATH"], "rb") as f:
        config = tomllib.load(f)
    if os.environ.get("FAKE_DUMP"):
        with open(os.environ["FAKE_DUMP"], "w") as f:
            json.dump({"argv": sys.argv, "env": dict(os.environ), "config": config}, f)
    stop = []
    if os.environ.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    amqp = config["amqp"]
    params = pika.ConnectionParameters(amqp["AMQP_HOST"], int(amqp["AMQP_PORT"]), amqp["AMQP_VHOST"],
                                       pika.PlainCredentials(amqp["AMQP_USER"], amqp["AMQP_PWD"]))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    queues = list(dict.fromkeys(os.environ.get("QUEUE_PRIORITY", "").split())) or \
        [os.environ.get("FAKE_DEFAULT_QUEUE", "os2ds_conversions")]
    channel.basic_qos(prefetch_count=int(os.environ.get("FAKE_PREFETCH", "2")))
    body = gzip.compress(os.environ.get("FAKE_BODY", '{"abort": null}').encode())
    props = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")
    reply_to = os.environ.get("FAKE_PUBLISH_ON_DELIVERY")

    def on_message(ch, method, properties, payload):
        if reply_to:
            ch.basic_publish("", reply_to, body, props)
        ch.basic_ack(method.delivery_tag)

    for queue in queues:
        channel.queue_declare(queue, durable=True)
        channel.basic_consume(queue, on_message)
    print(f"fake {stage} consuming {' '.join(queues)}", flush=True)
    if os.environ.get("FAKE_PUBLISH_TO"):
        channel.basic_publish("", os.environ["FAKE_PUBLISH_TO"], body, props)
    while not stop:
        connection.process_data_events(time_limit=0.1)
    try:
        for tag in list(channel.consumer_tags):
            channel.basic_cancel(tag)
        connection.close()
    except pika.exceptions.AMQPError:
        pass
    print(f"fake {stage} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
