"""Fixtures shared by the observer and stage-launcher tests."""
import sys
from pathlib import Path

import pytest

from harness.history import HistoryWriter
from harness.stages import StageLauncher

FAKE_STAGE = [sys.executable, str(Path(__file__).parent / "helpers" / "fake_stage.py"), "{stage}"]


@pytest.fixture
def history(tmp_path):
    writer = HistoryWriter(tmp_path / "history.jsonl")
    yield writer
    writer.close()


@pytest.fixture
def make_launcher(broker, vhost, history, tmp_path):
    """``make_launcher(command=FAKE_STAGE, env=None, observer=None, restart=None)``: launchers stopped after the test."""
    launchers = []

    def make(command=FAKE_STAGE, env=None, observer=None, restart=None):
        launcher = StageLauncher(command, env or {}, broker, vhost.name, tmp_path, history, observer, restart)
        launchers.append(launcher)
        return launcher

    yield make
    for launcher in launchers:
        launcher.stop_all(grace=2)
