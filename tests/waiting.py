"""Waiting on a condition with a deadline, for the tests that talk to real processes and a real broker."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "", interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; at the deadline, fail
    naming ``what`` (or the predicate)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or predicate}")
        time.sleep(interval)
