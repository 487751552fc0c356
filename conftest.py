"""Root conftest: registers the qp-harness plugin for this repository's own runs.

When the package is installed the plugin also loads through its ``pytest11``
entry point; pytest refuses to register the same module twice, so we only add
it here when the entry point has not already done so.
"""
import importlib.metadata

_entry_points = {ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
if "harness.plugin" not in _entry_points:
    pytest_plugins = ["harness.plugin"]
