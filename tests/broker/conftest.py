"""Fixtures for the broker tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from broker_support import InnerRun


@pytest.fixture
def inner(tmp_path: Path):
    def make(source: str) -> InnerRun:
        return InnerRun(tmp_path / "inner", source)
    return make
