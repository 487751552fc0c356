"""Bad option values (issue 7, "Bad input"): each a usage error (exit code 4) before any broker starts.

The message names the option (and its ini key where it has one) and the
reason; there is no Python traceback. The same values given in an ini file
are rejected the same way (argparse only checks the command line).
"""
from __future__ import annotations

import subprocess

import pytest

from robust_support import assert_no_traceback, inner_env, inner_pytest_command

CASES = [
    # (command-line args, ini line or None, what the message must say)
    (["--check-period", "abc"], "check_period = abc",
     ["--check-period / ini check_period", "expected a number of seconds, got 'abc'"]),
    (["--check-period=-1"], "check_period = -1", ["--check-period / ini check_period", "must be positive, got '-1'"]),
    (["--window-tolerance=-0.5"], None, ["--window-tolerance / ini window_tolerance", "got '-0.5'"]),
    (["--startup-grace", "0"], "startup_grace = 0", ["--startup-grace / ini startup_grace", "must be positive"]),
    (["--engine-cmd", "python -m reference_engine.run_stage"], "engine_cmd = my-engine --stage",
     ["--engine-cmd / ini engine_cmd", "the template must contain {stage}"]),
    (["--engine-cmd", "engine '{stage}"], None, ["--engine-cmd / ini engine_cmd", "No closing quotation"]),
    (["--engine-env", "NOEQUALS"], "engine_env = NOEQUALS",
     ["--engine-env / ini engine_env", "expected KEY=VALUE, got 'NOEQUALS'"]),
    (["--engine-env", "=value"], None, ["--engine-env / ini engine_env", "expected KEY=VALUE, got '=value'"]),
    (["--engine-restart", "sometimes"], "engine_restart = on-failure:lots",
     ["--engine-restart / ini engine_restart", "POLICY[:LIMIT[:BACKOFF]]"]),
    (["--timeline", "sometimes"], "timeline = sometimes", ["--timeline", "'sometimes'", "failed", "all", "none"]),
    (["--rabbitmq-provider", "nope"], "rabbitmq_provider = nope",
     ["--rabbitmq-provider", "'nope'", "auto", "external", "docker", "local"]),
    (["--rabbitmq-stop", "never"], None, ["--rabbitmq-stop", "'never'", "kill", "graceful"]),
    (["--rabbitmq-start-timeout", "soon"], "rabbitmq_start_timeout = soon",
     ["--rabbitmq-start-timeout / ini rabbitmq_start_timeout", "expected a number of seconds, got 'soon'"]),
]


def _run(directory, args, ini_line=None) -> subprocess.CompletedProcess:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pytest.ini").write_text("[pytest]\n" + (ini_line + "\n" if ini_line else ""))
    # A test that would need the broker: it must never get that far.
    (directory / "test_needs_broker.py").write_text("def test_x(broker):\n    raise SystemExit('ran')\n")
    return subprocess.run(inner_pytest_command(*args), cwd=directory, env=inner_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


def _check(done: subprocess.CompletedProcess, expected: list[str]) -> None:
    out = done.stdout
    assert done.returncode == 4, out  # pytest's usage error
    for text in expected:
        assert text in out, f"{text!r} missing from:\n{out}"
    assert "unrecognized arguments" not in out, out  # the plugin's own options must be known
    assert "INTERNALERROR" not in out and "collected" not in out, out
    assert_no_traceback(out)


@pytest.mark.parametrize("args, ini_line, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_option_value_on_the_command_line(tmp_path, args, ini_line, expected):
    _check(_run(tmp_path, args), expected)


INI_CASES = [c for c in CASES if c[1]]


@pytest.mark.parametrize("args, ini_line, expected", INI_CASES, ids=[c[1] for c in INI_CASES])
def test_bad_option_value_in_the_ini_file(tmp_path, args, ini_line, expected):
    _check(_run(tmp_path, [], ini_line), expected)
