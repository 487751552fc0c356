"""Scenario files: every malformed file is rejected with file, field path and reason; shipped ones load."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import plugin as harness_plugin
from harness.scenario import (CLAUSE_IDS, FAULT_KINDS, Restart, Scenario, ScenarioError, json_schema, load_scenario,
                              parse_restart, parse_scenario)

ROOT = Path(__file__).resolve().parent.parent
ERRORS = sorted((ROOT / "tests" / "scenario_errors").glob("*.yaml"))
SHIPPED = sorted((ROOT / "scenarios").rglob("*.yaml")) + sorted((ROOT / "suites").rglob("*.yaml"))


def expected_path(path: Path) -> str:
    match = re.search(r"^# expect: (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"{path.name} has no '# expect: <field path>' line"
    return match.group(1).strip()


def rejection(path: Path | str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return info.value


def locations(error: ScenarioError) -> list[str]:
    return [loc or "<file>" for loc, _ in error.problems]


def test_there_are_at_least_twenty_malformed_files():
    assert len(ERRORS) >= 20


@pytest.mark.parametrize("path", ERRORS, ids=lambda p: p.stem)
def test_malformed_file_is_rejected_with_its_field_path(path):
    expected = expected_path(path)
    error = rejection(path)
    locs = locations(error)
    if expected.startswith("line "):  # YAML-level problems are located by line and column
        assert any(loc.startswith(expected + ",") for loc in locs), locs
    else:
        assert expected in locs, locs
    assert error.path == str(path)
    message = str(error)
    assert message.startswith(f"{path}: invalid scenario")
    assert path.name in message and expected in message
    assert all(reason.strip() for _, reason in error.problems)
    # No traceback: nothing chained, nothing in the text that looks like Python internals.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert "Traceback" not in message and 'File "' not in message
    assert "pydantic" not in message.lower() and "https://errors" not in message


def test_missing_file():
    error = rejection(ROOT / "scenarios" / "no-such-scenario.yaml")
    assert error.problems == [("", "no such file")]
    assert "no-such-scenario.yaml" in str(error)


def test_directory_and_non_utf8(tmp_path):
    assert "directory" in rejection(tmp_path).problems[0][1]
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("description: f\xf8rste\n".encode("latin-1"))
    assert "UTF-8" in rejection(binary).problems[0][1]


def test_python_tags_are_never_constructed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'seed: !!python/object/apply:os.mkdir ["{marker}"]\nclients: [{{name: a}}]\n'
                    "stages: [{name: w, kind: worker}]\n")
    error = rejection(path)
    assert "constructor" in error.problems[0][1]
    assert not marker.exists()


def test_all_problems_are_reported_together(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("clients: [{name: a}, {name: a}]\nstages: [{name: w, kind: exporter}]\n"
                    "workload: [{client: b, objects: -1}]\ncheckz: {}\n")
    locs = locations(rejection(path))
    assert {"stages.0.kind", "workload.0.objects", "checkz"} <= set(locs), locs


def test_cross_checks_reported_together(tmp_path):
    path = tmp_path / "cross.yaml"
    path.write_text("clients: [{name: a}, {name: a}]\nstages: [{name: w, kind: worker}]\n"
                    "workload: [{client: b, via: conversions}]\nfaults: [{kind: kill_stage, target: x, at: 1}]\n")
    assert set(locations(rejection(path))) == {"clients.1.name", "workload.0.client", "faults.0.target"}


def test_parse_scenario_rejects_non_mappings():
    with pytest.raises(ScenarioError) as info:
        parse_scenario([1, 2], "inline")
    assert info.value.problems[0][0] == "" and "mapping" in info.value.problems[0][1]
    with pytest.raises(ScenarioError):
        parse_scenario({1: "x", "clients": [], "stages": []}, "inline")


# --- what is accepted ------------------------------------------------------------------------

MINIMAL = {"clients": [{"name": "a"}], "stages": [{"name": "w", "kind": "worker"}]}


def test_defaults_are_os2datascanners():
    scenario = parse_scenario(dict(MINIMAL), "minimal.yaml")
    assert scenario.name == "minimal"
    client = scenario.clients[0]
    assert (client.explorer_full_queue, client.explorer_delta_queue) == ("os2ds_scan_specs",) * 2
    assert (client.conversion_full_queue, client.conversion_delta_queue) == ("os2ds_conversions",) * 2
    assert scenario.stages[0].read_queues == ["os2ds_conversions"]


def test_queue_priority_is_read_like_the_engine():
    stage = parse_scenario({**MINIMAL, "stages": [
        {"name": "w", "kind": "worker", "queue_priority": "  q1 q2\tq1\n q3 ", "env": {"REFERENCE_WORK_SECONDS": 0.02}}]
    }, "x").stages[0]
    assert stage.queue_priority == ["q1", "q2", "q1", "q3"]  # duplicates kept: CF-NO-DUP judges them
    assert stage.priority == ["q1", "q2", "q3"]
    assert stage.env == {"REFERENCE_WORK_SECONDS": "0.02"}


def test_a_stage_restart_policy_is_read_as_docker_spells_it():
    stages = parse_scenario({**MINIMAL, "stages": [
        {"name": "w", "kind": "worker", "restart": {"policy": "on-failure", "limit": 5, "backoff": 2}},
        {"name": "v", "kind": "worker", "restart": {"policy": False}},  # YAML's unquoted no
        {"name": "u", "kind": "worker"},
    ]}, "x").stages
    assert stages[0].restart == Restart(policy="on-failure", limit=5, backoff=2.0)
    assert stages[1].restart == Restart(policy="no") and not stages[1].restart.supervised
    assert stages[2].restart is None  # the run's --engine-restart decides


@pytest.mark.parametrize("text, expected", [
    ("on-failure", Restart(policy="on-failure")),
    ("on-failure:5", Restart(policy="on-failure", limit=5)),
    ("always:0:0.5", Restart(policy="always", limit=0, backoff=0.5)),
    ("no", Restart()),
])
def test_the_engine_restart_option_is_parsed(text, expected):
    assert parse_restart(text) == expected


@pytest.mark.parametrize("text", ["sometimes", "on-failure:x", "on-failure:-1", "on-failure:1:2:3", "always:1:99"])
def test_a_bad_engine_restart_option_is_refused_with_its_form(text):
    with pytest.raises(ValueError, match=r"POLICY\[:LIMIT\[:BACKOFF\]\]"):
        parse_restart(text)


@pytest.mark.parametrize("fault", [
    {"kind": "delete_queue", "target": "os2ds_conversions", "at": 3},
    {"kind": "close_connection", "target": "w"},
    {"kind": "kill_stage", "target": "w", "params": {"restart": True}},
    {"kind": "kill_stage", "target": "w#2"},
    {"kind": "restart_broker", "at": 10, "params": {"seconds": 2}},
    {"kind": "pause_stage", "target": "w", "params": {"seconds": 1.5}},
    {"kind": "poison", "target": "os2ds_conversions", "params": {"shape": "missing_fields", "count": 3}},
    {"kind": "poison", "target": "os2ds_conversions", "when": {"queue": "os2ds_conversions", "ready_at_least": 5}},
])
def test_valid_faults_are_accepted(fault):
    data = {**MINIMAL, "stages": [{"name": "w", "kind": "worker", "replicas": 2}], "faults": [fault]}
    assert parse_scenario(data, "x").faults[0].kind == fault["kind"]


def test_replica_targets_are_checked():
    data = {**MINIMAL, "stages": [{"name": "w", "kind": "worker", "replicas": 2}],
            "faults": [{"kind": "kill_stage", "target": "w#3"}]}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "x")
    assert locations(info.value) == ["faults.0.target"]


def test_every_fault_kind_is_carried_out_and_every_clause_id_is_registered():
    from harness.checkers import registry
    from harness.nemesis import Nemesis
    assert [k for k in FAULT_KINDS if not callable(getattr(Nemesis, f"_{k}", None))] == [], \
        "each harness fault kind needs a Nemesis._<kind> method"
    assert CLAUSE_IDS == registry.clause_ids() and len(set(CLAUSE_IDS)) == len(CLAUSE_IDS)
    families = [c.split("-")[0] for c in CLAUSE_IDS]
    assert families == sorted(families, key=registry.FAMILY_ORDER.index), "clauses are listed in SPEC.md's order"


def test_json_schema_is_exported():
    schema = json_schema()
    assert set(schema["required"]) == {"clients", "stages"}
    assert schema["additionalProperties"] is False
    assert "Phase" in schema["$defs"] and "Fault" in schema["$defs"]


# --- shipped scenarios -----------------------------------------------------------------------

def test_there_are_seed_scenarios():
    names = {p.stem for p in (ROOT / "scenarios").rglob("*.yaml")}
    assert len(names) >= 5, names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_scenario_loads(path):
    scenario = load_scenario(path)
    assert isinstance(scenario, Scenario)
    assert scenario.description.strip(), "every shipped scenario says what it is for"
    assert scenario.workload, "every shipped scenario has a workload"


@pytest.mark.skipif("harness.scenario_plugin" not in getattr(harness_plugin, "pytest_plugins", []),
                    reason="scenario collection plugin not registered yet")
def test_pytest_reports_a_bad_file_without_traceback():
    bad = ROOT / "tests" / "scenario_errors" / "typo_queue_prioirty.yaml"
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "stages.1.queue_prioirty" in output and "typo_queue_prioirty.yaml" in output
    assert "Traceback" not in output


# --- per-scan queues (OS2datascanner 3.32) ---------------------------------------------------

def per_scan(**changes) -> dict:
    data = {"clients": [{"name": "a", "per_scan": True}, {"name": "b"}],
            "stages": [{"name": "worker", "kind": "worker", "conversion_priority": "delta full"}],
            "workload": [{"name": "big", "client": "a", "via": "conversions", "objects": 5},
                         {"name": "plain", "client": "b", "via": "conversions"}]}
    data.update(changes)
    return data


def problems_of(data) -> dict[str, str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "ps.yaml")
    assert str(info.value).startswith("ps.yaml: invalid scenario")
    return dict(info.value.problems)


def test_per_scan_fields_and_tags():
    scenario = parse_scenario(per_scan(workload=[
        {"client": "a", "via": "conversions"}, {"client": "a", "mode": "delta", "via": "conversions"},
        {"client": "a", "via": "conversions", "per_scan": "urgent"}, {"client": "a", "via": "conversions", "per_scan": False},
        {"client": "b", "via": "conversions", "per_scan": True}]))
    assert [scenario.per_scan_tag(p) for p in scenario.workload] == ["full", "delta", "urgent", None, "full"]
    assert scenario.stages[0].conversion_priority == ["delta", "full"] and scenario.admin.rebroadcast_seconds == 60


def test_conversion_priority_is_for_workers_and_not_for_env():
    problems = problems_of(per_scan(stages=[
        {"name": "explorer", "kind": "explorer", "conversion_priority": "full"},
        {"name": "worker", "kind": "worker", "env": {"CONVERSION_PRIORITY": "full"}}]))
    assert "only workers read CONVERSION_PRIORITY" in problems["stages.0.conversion_priority"]
    assert "use the stage's conversion_priority" in problems["stages.1.env.CONVERSION_PRIORITY"]


def test_a_phase_fault_names_a_per_scan_phase():
    problems = problems_of(per_scan(faults=[{"kind": "delete_scan_queue", "target": "bog"},
                                            {"kind": "delete_scan_queue", "target": "plain"}]))
    assert problems["faults.0.target"].startswith("no workload phase is named 'bog'; did you mean 'big'?")
    assert "not routed per scan" in problems["faults.1.target"]
    assert "needs a target phase" in problems_of(per_scan(faults=[{"kind": "delete_scan_queue"}]))["faults.0.target"]


def test_admin_fault_parameters():
    problems = problems_of(per_scan(faults=[{"kind": "short_scan", "params": {"tag": "two words"}},
                                            {"kind": "stale_hello_reply", "target": "worker"},
                                            {"kind": "bad_command", "params": {"shape": "no_abort"}},
                                            {"kind": "bad_command", "params": {"shape": "loud"}}]))
    assert "must be a tag" in problems["faults.0.params.tag"]
    assert "takes no target" in problems["faults.1.target"]
    assert "faults.2.params.shape" not in problems and "must be one of" in problems["faults.3.params.shape"]


def test_per_scan_holds_and_backlogs():
    problems = problems_of(per_scan(workload=[
        {"client": "a", "via": "conversions", "hold": {"windows": 2, "queue": "somewhere"}},
        {"client": "a", "via": "conversions", "lasting": {"windows": 2}}]))
    assert "leave out hold.queue" in problems["workload.0.hold.queue"]
    assert "without the admin" in problems["workload.1.lasting"]
    wrong = problems_of(per_scan(workload=[{"client": "a", "per_scan": "not a tag"}]))
    assert wrong == {"workload.0.per_scan": "true, false or a tag (one word of letters, digits, '_' or '-'), "
                                            "not 'not a tag'"}


def test_rebroadcast_period_is_positive():
    problems = problems_of(per_scan(admin={"rebroadcast_seconds": 0}))
    assert "admin.rebroadcast_seconds" in problems


def test_a_consuming_tag_trigger_names_a_tag_the_scenario_announces():
    fine = per_scan(faults=[{"kind": "abort_scan", "target": "a", "when": {"stage": "worker", "consuming_tag": "full"}}])
    assert parse_scenario(fine).faults[0].when.consuming_tag == "full"
    unknown = problems_of(per_scan(faults=[
        {"kind": "abort_scan", "target": "a", "when": {"stage": "worker", "consuming_tag": "fuld"}}]))
    assert unknown["faults.0.when.consuming_tag"] == ("no phase of this scenario is routed per scan with tag 'fuld', "
                                                      "so the trigger would never fire; did you mean 'full'?")
    problems = problems_of(per_scan(faults=[
        {"kind": "abort_scan", "target": "a", "when": {"stage": "worker", "consuming_tag": "full",
                                                       "consuming": "os2ds_conversions"}},
        {"kind": "abort_scan", "target": "a", "when": {"consuming_tag": "full"}}]))
    assert "not both" in problems["faults.0.when.consuming_tag"]
    assert "needs the 'stage' that consumes" in problems["faults.1.when.stage"]
