"""What a stage's loop passes around: deliveries in, outputs out, and a deliberate exit."""
from __future__ import annotations

from dataclasses import dataclass

import pika


@dataclass
class Output:
    queue: str
    body: dict
    mandatory: bool = False
    on_return: dict | None = None  # published to os2ds_problems if the broker returns the message


@dataclass
class Delivery:
    queue: str
    consumer_tag: str | None
    delivery_tag: int
    properties: pika.BasicProperties
    body: bytes
    routing_key: str = ""


class StageExit(Exception):
    """The stage decided to exit with this code (faults that crash on purpose)."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code
