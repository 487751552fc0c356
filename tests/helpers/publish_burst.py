"""Publish COUNT gzip ConversionMessages to QUEUE as fast as pika goes (a load source for bench/observer_capacity.py)."""
from __future__ import annotations

import gzip
import json
import sys
import time

import pika


def main() -> None:
    url, queue, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    tag = {"time": "2025-01-01T00:00:00+00:00", "user": "u", "scanner": {"pk": 1, "name": "s"},
           "organisation": {"name": "o", "uuid": "org"}}
    props = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")
    started = time.perf_counter()
    for number in range(count):
        body = {"scan_spec": {"scan_tag": tag, "source": {"type": "file", "path": "/srv"}, "rule": {"type": "cpr"},
                              "conversion_queue": queue},
                "handle": {"type": "file", "source": {"type": "file", "path": "/srv"}, "path": f"f{number}.txt"},
                "progress": {"rule": {"type": "cpr"}, "matches": []}}
        channel.basic_publish("", queue, gzip.compress(json.dumps(body).encode()), props)
    connection.process_data_events(0)
    elapsed = time.perf_counter() - started
    connection.close()
    print(json.dumps({"published": count, "seconds": round(elapsed, 3), "rate": round(count / elapsed)}))


if __name__ == "__main__":
    main()
