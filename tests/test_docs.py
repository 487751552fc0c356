"""Docs that must match the code."""
from pathlib import Path

from harness.history import HISTORY_VERSION, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_history_doc_lists_every_event_type():
    text = (ROOT / "docs" / "history.md").read_text()
    assert f"version {HISTORY_VERSION}" in text
    assert markdown_table() in text, "regenerate the table in docs/history.md from harness.history.markdown_table()"
