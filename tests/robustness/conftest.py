"""Fixtures for the robustness tests; the helpers live in robust_support.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from robust_support import ChildRun


@pytest.fixture
def child(tmp_path: Path):
    run = ChildRun(tmp_path / "child")
    try:
        yield run
    finally:
        run.cleanup()
