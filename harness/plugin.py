"""qp-harness pytest plugin, registered through the ``pytest11`` entry point.

Each box of DESIGN.md that talks to pytest has a plugin module of its own;
this one only loads them. Their options all sit in the ``qp-harness`` group
of ``pytest --help``.
"""
pytest_plugins = [
    "harness.broker_plugin",
    "harness.scenario_plugin",
]
