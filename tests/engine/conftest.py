"""Fixtures for the reference engine's integration tests (broker fixtures come from the harness plugin)."""
import pytest

from .helpers import Engine, Observer


@pytest.fixture
def engine(vhost, tmp_path):
    e = Engine(vhost, tmp_path)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def observer(vhost):
    o = Observer(vhost)
    try:
        yield o
    finally:
        o.close()


@pytest.fixture
def ch(amqp_channel):
    amqp_channel.confirm_delivery()
    return amqp_channel
