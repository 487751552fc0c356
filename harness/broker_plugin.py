"""Fixtures and options for the broker: one per session, a fresh vhost per test."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator

import pika
import pytest

from harness.broker import Broker, LocalBroker


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qp-harness", "qp-harness: queue-priority conformance")
    group.addoption("--rabbitmq-provider", choices=["auto", "external", "docker", "local"], default=None,
                    help="where the broker comes from (ini: rabbitmq_provider; default auto)")
    parser.addini("rabbitmq_provider", "where the broker comes from", default="auto")


@dataclass
class Vhost:
    """A test's own vhost on the session broker."""

    name: str
    broker: Broker

    def parameters(self, **kwargs) -> pika.ConnectionParameters:
        return self.broker.connection_parameters(self.name, **kwargs)

    def url(self) -> str:
        return self.broker.amqp_url(self.name)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    local = LocalBroker(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture
def vhost(broker: Broker) -> Iterator[Vhost]:
    name = "qp-" + secrets.token_hex(6)
    broker.management.create_vhost(name, tracing=True)
    try:
        yield Vhost(name, broker)
    finally:
        broker.management.delete_vhost(name)


@pytest.fixture
def amqp_channel(vhost: Vhost):
    """A pika channel on the test's vhost, closed after the test."""
    connection = pika.BlockingConnection(vhost.parameters())
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()
