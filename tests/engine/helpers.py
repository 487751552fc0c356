"""Helpers for the reference engine's integration tests: start stages, watch the broker.

Everything is observed at the broker (event exchange, firehose tracer,
passive declares, the messages in the output queues); the engine runs as a
real subprocess and is always stopped by its process group.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions

from waiting import wait_until  # noqa: F401  (the engine tests take it from here)

REPO = Path(__file__).resolve().parents[2]
DATA_PROPS = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")



def encode(obj) -> bytes:
    return gzip.compress(json.dumps(obj).encode())


def decode(body: bytes):
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    return json.loads(body)


def publish(ch, queue: str, obj, raw: bytes | None = None) -> None:
    ch.basic_publish("", queue, raw if raw is not None else encode(obj), DATA_PROPS)


def declare(ch, *queues: str) -> None:
    for q in queues:
        ch.queue_declare(q, durable=True)


def ready(ch, queue: str) -> int | None:
    """Ready count by a passive declare on a throw-away channel (None = no such queue)."""
    side = ch.connection.channel()
    try:
        return side.queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        if side.is_open:
            side.close()


def take_all(ch, queue: str) -> list:
    out = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(decode(body))


def scan_tag(pk: int = 1, org: str = "aaaaaaaa-0000-4000-8000-000000000001") -> dict:
    return {"time": "2026-11-27T18:28:56.902152+00:00", "user": "admin",
            "scanner": {"pk": pk, "name": f"Scan {pk}"},
            "organisation": {"name": "Org", "uuid": org}}


def scan_spec(path: Path, pk: int = 1, rule=None, conversion_queue: str | None = None) -> dict:
    spec = {"scan_tag": scan_tag(pk), "source": {"type": "file", "path": str(path)},
            "rule": rule or {"type": "cpr"}}
    if conversion_queue:
        spec["conversion_queue"] = conversion_queue
    return spec


def conversion(path: Path, name: str, pk: int = 1, rule=None) -> dict:
    spec = scan_spec(path, pk, rule)
    handle = {"type": "file", "source": spec["source"], "path": name}
    return {"scan_spec": spec, "handle": handle, "progress": {"rule": spec["rule"], "matches": []}}


def fill(ch, data: Path, queue: str, n: int, pk: int = 1) -> list[str]:
    """Publish ``n`` conversions into ``queue`` for files named after the queue."""
    data.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{queue}-{i:03d}.txt"
        (data / name).write_text(f"object {i} of {queue}")
        publish(ch, queue, conversion(data, name, pk))
        names.append(name)
    return names


@dataclass
class Stage:
    stage: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


class Engine:
    """Starts reference engine stages on a vhost; stops every one of them at ``close()``."""

    def __init__(self, vhost, tmp_path: Path):
        self.vhost = vhost
        self.tmp_path = tmp_path
        self.stages: list[Stage] = []
        b = vhost.broker
        self.config = tmp_path / "engine.toml"
        self.config.write_text(
            f'[amqp]\nAMQP_HOST = "{b.host}"\nAMQP_PORT = {b.amqp_port}\nAMQP_USER = "{b.user}"\n'
            f'AMQP_PWD = "{b.password}"\nAMQP_VHOST = "{vhost.name}"\n')

    def start(self, stage: str, queue_priority: str = "", faults: str = "", check: float = 0.2,
              work: float = 0.0, **extra_env: str) -> Stage:
        if os.environ.get("QP_ENGINE_TESTS_DROP_FAULTS"):
            # Contrast run: every fault test must then FAIL (the symptom is the fault's).
            faults = ""
        env = {**os.environ, "OS2DS_ENGINE_USER_CONFIG_PATH": str(self.config),
               "QUEUE_PRIORITY": queue_priority, "PRIORITY_CHECK_SECONDS": str(check),
               "REFERENCE_WORK_SECONDS": str(work), "REFERENCE_ENGINE_FAULTS": faults,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **extra_env}
        log_path = self.tmp_path / f"{stage}-{len(self.stages)}.log"
        with open(log_path, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "reference_engine.run_stage", stage],
                                       env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        s = Stage(stage, process, log_path)
        self.stages.append(s)
        return s

    def close(self) -> None:
        for s in self.stages:
            s.stop()


@dataclass
class Event:
    t: float
    kind: str          # routing key: consumer.created, deliver.q, publish., ...
    headers: dict
    body: bytes = b""


class Observer:
    """Records the broker's events (for one vhost) and its firehose trace, on a thread of its own."""

    def __init__(self, vhost):
        self.vhost = vhost
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(15):
            raise AssertionError(f"observer did not start: {self._error!r}")

    def _run(self) -> None:
        conns = []
        try:
            b = self.vhost.broker
            events = pika.BlockingConnection(b.connection_parameters("/"))
            trace = pika.BlockingConnection(self.vhost.parameters())
            conns = [events, trace]
            ech = events.channel()
            q = ech.queue_declare("", exclusive=True).method.queue
            for key in ("consumer.*", "queue.*", "connection.*"):
                ech.queue_bind(q, "amq.rabbitmq.event", key)
            ech.basic_consume(q, self._on_event, auto_ack=True)
            tch = trace.channel()
            tq = tch.queue_declare("", exclusive=True).method.queue
            tch.queue_bind(tq, "amq.rabbitmq.trace", "#")
            tch.basic_consume(tq, self._on_trace, auto_ack=True)
            self._ready.set()
            while not self._stop.is_set():
                for c in conns:
                    c.process_data_events(time_limit=0.01)
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
        finally:
            for c in conns:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass

    def _on_event(self, ch, method, props, body) -> None:
        headers = dict(props.headers or {})
        vhost = headers.get("vhost")
        if isinstance(vhost, bytes):
            vhost = vhost.decode()
        if vhost != self.vhost.name:
            return
        headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in headers.items()}
        with self.lock:
            self.events.append(Event(time.monotonic(), method.routing_key, headers))

    def _on_trace(self, ch, method, props, body) -> None:
        headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
        with self.lock:
            self.events.append(Event(time.monotonic(), method.routing_key, headers, body))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)

    # -- views ------------------------------------------------------------------
    def snapshot(self) -> list[Event]:
        with self.lock:
            return list(self.events)

    def consumer_changes(self) -> list[tuple[float, str, str]]:
        """(t, 'created'|'deleted', queue) for data-queue consumers, in order."""
        out = []
        for e in self.snapshot():
            if e.kind in ("consumer.created", "consumer.deleted"):
                queue = str(e.headers.get("queue", ""))
                if not queue.startswith("amq.gen"):
                    out.append((e.t, e.kind.split(".")[1], queue))
        return out

    def active(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _t, kind, q in self.consumer_changes():
            counts[q] = counts.get(q, 0) + (1 if kind == "created" else -1)
        return {q: n for q, n in counts.items() if n > 0}

    def max_simultaneous(self, queues: set[str]) -> int:
        counts: dict[str, int] = {}
        best = 0
        for _t, kind, q in self.consumer_changes():
            counts[q] = counts.get(q, 0) + (1 if kind == "created" else -1)
            best = max(best, sum(1 for x in queues if counts.get(x, 0) > 0))
        return best

    def deliveries(self) -> list[tuple[str, dict]]:
        """(queue, headers) of every firehose deliver, in order."""
        return [(e.kind[len("deliver."):], e.headers) for e in self.snapshot() if e.kind.startswith("deliver.")]

    def publishes(self) -> list[tuple[list, bytes, dict]]:
        return [(list(e.headers.get("routing_keys") or []), e.body, e.headers)
                for e in self.snapshot() if e.kind.startswith("publish.")]

    def created_count(self, queue: str) -> int:
        return sum(1 for c in self.consumer_changes() if c[1:] == ("created", queue))

    def consuming(self, queue: str) -> bool:
        return queue in self.active()


def stage_ports(stage: Stage) -> set[int]:
    import psutil
    proc = psutil.Process(stage.process.pid)
    conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
    return {c.laddr.port for c in conns}


def close_stage_connection(vhost, stage: Stage, timeout: float = 20.0) -> str:
    """Close a stage's AMQP connection through the management API (found by its local port)."""
    mgmt = vhost.broker.management

    def find():
        ports = stage_ports(stage)
        return [c["name"] for c in mgmt.connections(vhost.name) if c.get("peer_port") in ports]

    names = wait_until(find, timeout, "the stage's connection in the management API", interval=0.25)
    mgmt.close_connection(names[0])
    return names[0]


# -- per-scan queues (OS2datascanner 3.32): the admin's side, played by a test ----------------------
COMMAND_PROPS = pika.BasicProperties(priority=10, delivery_mode=2, content_encoding="gzip")
COMMAND_KEYS = ("abort", "log_level", "profiling", "new_queue", "new_queue_priority", "delete_queue",
                "worker_hello")


def command(**fields) -> dict:
    return {key: fields.get(key) for key in COMMAND_KEYS}


class Admin:
    """What OS2datascanner's admin does with per-scan queues (ENGINE_CONTRACT.md section 7)."""

    def __init__(self, ch, observer: "Observer"):
        self.ch = ch
        self.observer = observer
        ch.exchange_declare("broadcast", "fanout", durable=True)

    def declare(self, *queues: str) -> None:
        declare(self.ch, *queues)

    def announce(self, queue: str, tag: str, to: str | None = None) -> None:
        """new_queue on broadcast, or (``to``) in reply to a hello, straight to that command queue."""
        body = encode(command(new_queue=queue, new_queue_priority=tag))
        if to is None:
            self.ch.basic_publish("broadcast", "", body, COMMAND_PROPS)
        else:
            self.ch.basic_publish("", to, body, COMMAND_PROPS)

    def delete(self, queue: str) -> None:
        self.ch.basic_publish("broadcast", "", encode(command(delete_queue=queue)), COMMAND_PROPS)
        self.ch.queue_delete(queue)

    def broadcast_raw(self, body: bytes, props: pika.BasicProperties | None = None) -> None:
        self.ch.basic_publish("broadcast", "", body, props)

    def hellos(self) -> list[str]:
        """The command queues named by every worker_hello published so far, in order."""
        out = []
        for e in self.observer.snapshot():
            if e.kind != "publish.broadcast" or not e.body:
                continue
            try:
                obj = decode(e.body)
            except (ValueError, OSError, EOFError):  # the malformed broadcasts of some tests
                continue
            if isinstance(obj, dict) and obj.get("worker_hello"):
                out.append(obj["worker_hello"])
        return out

    def wait_hello(self, count: int = 1, timeout: float = 20) -> str:
        """The command queue named by the ``count``-th hello."""
        return wait_until(lambda: len(self.hellos()) >= count and self.hellos()[count - 1], timeout,
                          f"worker_hello number {count}")


def queue_events(observer: "Observer", queue: str, kind: str) -> list[float]:
    """Times of queue.created / queue.deleted events for ``queue``."""
    return [e.t for e in observer.snapshot() if e.kind == f"queue.{kind}" and e.headers.get("name") == queue]
