"""The workload generator: CPR numbers, determinism, delta cutoffs, and message shapes."""
from __future__ import annotations

import json
import os
import random
import re
import time
from datetime import date, datetime
from pathlib import Path

import pytest

from harness.messages import classify, encode_body, summarise
from harness.scenario import parse_scenario
from harness.workload import (BLACKLIST, CPR_LIKE, TIME_FORMAT, Workload, century_of, is_valid_cpr,
                              make_cpr)

# The captured wire examples (ENGINE_CONTRACT.md section 4): $QP_WIRE_EXAMPLES, else ../shared beside
# this clone, else the project's shared folder on the team's machines.
WIRE_EXAMPLE_DIRS = [Path(os.environ["QP_WIRE_EXAMPLES"])] if "QP_WIRE_EXAMPLES" in os.environ else [
    Path(__file__).resolve().parents[2] / "shared" / "wire-examples", Path("/work/shared/wire-examples")]
WIRE_EXAMPLES = next((d for d in WIRE_EXAMPLE_DIRS if d.is_dir()), WIRE_EXAMPLE_DIRS[0])

# Their key structure (key -> type name, recursively), kept in the repository so that the shape
# tests run in a clone without ../shared; checked against the examples whenever they are there.
WIRE_SHAPES = json.loads((Path(__file__).parent / "data" / "wire_shapes.json").read_text())


def shape(obj):
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [shape(x) for x in obj] if obj and isinstance(obj[0], dict) else "list"
    return type(obj).__name__


def scenario(seed: int = 11, **phase_overrides):
    phases = [
        {"client": "vejstrand", "mode": "full", "scans": 2, "objects": 30, "cpr_share": 0.4},
        {"client": "magenta", "mode": "delta", "scans": 2, "objects": 20, "cpr_share": 0.5},
        {"client": "magenta", "mode": "full", "scans": 1, "objects": 15, "via": "conversions"},
        {"client": "vejstrand", "mode": "delta", "scans": 1, "objects": 12, "old_files": 7, "via": "conversions"},
    ]
    return parse_scenario({
        "seed": seed,
        "clients": [
            {"name": "vejstrand", "organisation": "Vejstrand Kommune",
             "explorer_full_queue": "explorer_full", "explorer_delta_queue": "explorer_delta",
             "conversion_full_queue": "conversions_full_vejstrand",
             "conversion_delta_queue": "conversions_delta_vejstrand"},
            {"name": "magenta", "conversion_delta_queue": "conversions_delta"},
        ],
        "stages": [{"name": "explorer", "kind": "explorer"}, {"name": "worker", "kind": "worker"}],
        "workload": phases,
    }, "t")


def weighted_ok(cpr: str) -> bool:
    return sum(int(d) * w for d, w in zip(cpr, (4, 3, 2, 7, 6, 5, 4, 3, 2, 1))) % 11 == 0


# --- CPR numbers --------------------------------------------------------------------

def test_made_cprs_are_valid():
    rng = random.Random(5)
    for _ in range(5000):
        cpr = make_cpr(rng)
        assert re.fullmatch(r"\d{10}", cpr)
        assert weighted_ok(cpr), cpr
        year = century_of(cpr) + int(cpr[4:6])
        born = date(year, int(cpr[2:4]), int(cpr[0:2]))  # a real date
        assert date(1940, 1, 1) <= born <= date(2006, 12, 31), cpr
        assert is_valid_cpr(cpr)


@pytest.mark.parametrize("born", [date(1937, 5, 17), date(1999, 12, 31), date(2000, 2, 29), date(2036, 6, 1),
                                  date(1880, 3, 3)])
def test_seventh_digit_agrees_with_the_century(born):
    rng = random.Random(1)
    for _ in range(200):
        cpr = make_cpr(rng, born)
        assert cpr[:6] == born.strftime("%d%m%y")
        assert century_of(cpr) + int(cpr[4:6]) == born.year, cpr
        assert weighted_ok(cpr)


@pytest.mark.parametrize("text", [
    "0101901234",        # fails modulus 11 (sum 4+0+0+7+54+... not divisible)
    "3102901236",        # 31 February
    "12345",             # too short
    "abcdefghij",
])
def test_invalid_cprs_are_rejected(text):
    assert not (is_valid_cpr(text) and weighted_ok(text))


def test_known_valid_cpr():
    # 070761-4285: 0*4+7*3+0*2+7*7+6*6+1*5+4*4+2*3+8*2+5*1 = 154 = 14 * 11
    assert is_valid_cpr("0707614285") and is_valid_cpr("070761-4285")
    assert not is_valid_cpr("0707614286")


# --- files ----------------------------------------------------------------------------

def test_files_hold_cprs_only_where_planned_and_no_blacklisted_words(tmp_path):
    workload = Workload(scenario(), tmp_path)
    blacklist = re.compile("|".join(BLACKLIST), re.IGNORECASE)
    for index in range(4):
        for scan in workload.plan(index):
            files = sorted(p.name for p in scan.source_dir.iterdir())
            assert files == sorted(scan.objects + scan.old_objects)
            assert len(set(scan.objects)) == len(scan.objects)
            for name in scan.objects:
                text = (scan.source_dir / name).read_text(encoding="utf-8")
                assert not blacklist.search(text), (name, text)
                found = [re.sub(r"\D", "", m) for m in CPR_LIKE.findall(text)]
                if name in scan.cpr_objects:
                    assert found and all(is_valid_cpr(c) for c in found), (name, found)
                    assert re.search(r"cpr|personnummer", text, re.IGNORECASE)
                else:
                    assert not found, (name, found)
            share = len(scan.cpr_objects) / max(1, len(scan.objects))
            phase = workload.scenario.workload[index]
            assert abs(share - phase.cpr_share) <= 1 / max(1, len(scan.objects)) + 1e-9


def test_text_is_danish_looking(tmp_path):
    scan = Workload(scenario(), tmp_path).plan(0)[0]
    text = "\n".join((scan.source_dir / n).read_text(encoding="utf-8") for n in scan.objects[:10])
    assert re.search(r"[æøåÆØÅ]", text)
    assert "Sagsbehandler" in text


# --- determinism ------------------------------------------------------------------------

def snapshot(workload: Workload, order=(0, 1, 2, 3)):
    result = {}
    for index in order:
        for scan in workload.plan(index):
            files = {n: ((scan.source_dir / n).read_text(encoding="utf-8"), int((scan.source_dir / n).stat().st_mtime))
                     for n in sorted(os.listdir(scan.source_dir))}
            body = json.dumps([(q, m) for q, m in scan.messages], sort_keys=True)
            body = body.replace(str(workload.data_dir), "<data>")
            result[(index, scan.scan)] = (scan.as_event(), files, body)
    return dict(sorted(result.items()))


def test_same_seed_same_workload_whatever_the_order(tmp_path):
    a = snapshot(Workload(scenario(seed=3), tmp_path / "a"))
    b = snapshot(Workload(scenario(seed=3), tmp_path / "b"), order=(3, 1, 0, 2))
    assert a == b
    c = snapshot(Workload(scenario(seed=4), tmp_path / "c"))
    assert [v[1] for v in a.values()] != [v[1] for v in c.values()]


def test_organisations_are_seeded(tmp_path):
    one, two = Workload(scenario(seed=3), tmp_path / "1"), Workload(scenario(seed=3), tmp_path / "2")
    assert one.organisations == two.organisations
    assert one.organisations["vejstrand"].name == "Vejstrand Kommune"
    assert one.organisations["magenta"].name  # from Faker
    other = Workload(scenario(seed=9), tmp_path / "3")
    assert other.organisations["magenta"].uuid != one.organisations["magenta"].uuid
    uuids = [o.uuid for o in one.organisations.values()]
    assert len(set(uuids)) == len(uuids)


def test_scans_are_unique_runs(tmp_path):
    workload = Workload(scenario(), tmp_path)
    scans = [s for i in range(4) for s in workload.plan(i)]
    assert len({s.scan for s in scans}) == len(scans)
    pks = {(s.client, s.mode): s.spec["scan_tag"]["scanner"]["pk"] for s in scans}
    assert len(set(pks.values())) == len(pks)  # one scanner job per client and mode


# --- delta scans -----------------------------------------------------------------------------

def test_delta_cutoff_splits_the_files(tmp_path):
    workload = Workload(scenario(), tmp_path)
    for index in (1, 3):
        for scan in workload.plan(index):
            assert scan.mode == "delta"
            rule = scan.spec["rule"]
            assert rule["type"] == "and"
            last_modified, cpr = rule["components"]
            assert last_modified["type"] == "last-modified" and cpr["type"] == "cpr"
            cutoff = datetime.strptime(last_modified["after"], TIME_FORMAT).timestamp()
            assert last_modified["after"] == scan.cutoff
            for name in scan.objects:
                assert (scan.source_dir / name).stat().st_mtime > cutoff + 60
            for name in scan.old_objects:
                assert (scan.source_dir / name).stat().st_mtime < cutoff - 60
            phase = workload.scenario.workload[index]
            assert len(scan.objects) == phase.objects
            assert len(scan.old_objects) == (phase.old_files if phase.old_files is not None else phase.objects // 2)
            # Old files carry CPRs too, so scanning them by mistake would show.
            assert any(CPR_LIKE.search((scan.source_dir / n).read_text(encoding="utf-8")) for n in scan.old_objects)


def test_conversions_only_for_expected_objects(tmp_path):
    workload = Workload(scenario(), tmp_path)
    (scan,) = workload.plan(3)
    assert scan.via == "conversions"
    assert [q for q, _ in scan.messages] == [scan.conversion_queue] * len(scan.objects)
    assert [m["handle"]["path"] for _, m in scan.messages] == scan.objects
    assert scan.conversion_queue == "conversions_delta_vejstrand"


# --- shapes ----------------------------------------------------------------------------------

def test_scan_specs_have_the_wire_shape(tmp_path):
    workload = Workload(scenario(), tmp_path)
    full, delta = workload.plan(0)[0], workload.plan(1)[0]
    assert shape(full.spec) == WIRE_SHAPES["scan_spec_full"]
    assert shape(delta.spec) == WIRE_SHAPES["scan_spec_delta"]
    assert full.messages == [("explorer_full", full.spec)]
    assert delta.messages == [("os2ds_scan_specs", delta.spec)]  # magenta keeps the default explorer queue
    assert full.spec["conversion_queue"] == "conversions_full_vejstrand"
    assert delta.spec["conversion_queue"] == "conversions_delta"
    assert full.spec["source"] == {"type": "file", "path": str(full.source_dir)}
    assert Path(full.spec["source"]["path"]).is_absolute()
    assert full.spec["scan_tag"]["destination"] == "pipeline_collector"
    datetime.fromisoformat(full.spec["scan_tag"]["time"])


def test_conversions_have_the_wire_shape(tmp_path):
    workload = Workload(scenario(), tmp_path)
    full, delta = workload.plan(2)[0], workload.plan(3)[0]
    assert shape(full.messages[0][1]) == WIRE_SHAPES["conversion_full"]
    assert shape(delta.messages[0][1]) == WIRE_SHAPES["conversion_delta"]
    message = full.messages[0][1]
    assert message["handle"]["source"] == message["scan_spec"]["source"]
    assert message["progress"] == {"rule": message["scan_spec"]["rule"], "matches": []}


@pytest.mark.skipif(not WIRE_EXAMPLES.is_dir(), reason="wire examples not found (set QP_WIRE_EXAMPLES)")
@pytest.mark.parametrize("name", sorted(WIRE_SHAPES))
def test_embedded_shapes_match_the_captured_examples(name):
    assert shape(json.loads((WIRE_EXAMPLES / f"{name}.json").read_text())) == WIRE_SHAPES[name]


def test_messages_classify_and_summarise_as_planned(tmp_path):
    workload = Workload(scenario(), tmp_path)
    for index in range(4):
        for scan in workload.plan(index):
            for queue, message in scan.messages:
                summary = summarise(encode_body(message), "gzip")
                assert summary["type"] == classify(message)
                assert summary["type"] == ("ConversionMessage" if scan.via == "conversions" else "ScanSpecMessage")
                assert summary["scan"] == scan.scan and summary["org"] == scan.org
                assert summary["conversion_queue"] == scan.conversion_queue
            event = scan.as_event()
            assert set(event) == {"scan", "client", "org", "mode", "explorer_queue", "conversion_queue",
                                  "objects", "via", "per_scan"}
            json.dumps(event)


def test_thousands_of_files_quickly(tmp_path):
    """Generation costs little beyond writing the files (creating files dominates on a loaded machine)."""
    sc = parse_scenario({"clients": [{"name": "c"}], "stages": [{"name": "w", "kind": "worker"}],
                         "workload": [{"client": "c", "objects": 3_000, "via": "conversions"}]}, "big")
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    start = time.perf_counter()
    for i in range(3_000):
        (bare_dir / f"doc{i:05d}.txt").write_text("x" * 1000, encoding="utf-8")
    bare = time.perf_counter() - start
    start = time.perf_counter()
    (scan,) = Workload(sc, tmp_path / "data").plan(0)
    seconds = time.perf_counter() - start
    assert len(scan.messages) == 3_000
    # ~1 s on an idle development machine, of which ~0.3 s writing files.
    assert seconds < 3 * bare + 5, (seconds, bare)


DIGEST = """
import hashlib, json, os, sys
from pathlib import Path
from harness.scenario import parse_scenario
from harness.workload import Workload
data = json.loads(sys.argv[1])
workload = Workload(parse_scenario(data, "x"), Path(sys.argv[2]))
h = hashlib.sha256()
for i in range(len(data["workload"])):
    for s in workload.plan(i):
        h.update(json.dumps([s.as_event(), s.spec], sort_keys=True).replace(sys.argv[2], "").encode())
        for n in sorted(os.listdir(s.source_dir)):
            p = s.source_dir / n
            h.update(n.encode() + p.read_bytes() + str(int(p.stat().st_mtime)).encode())
print(h.hexdigest())
"""


def test_same_seed_same_workload_across_processes(tmp_path):
    """Nothing depends on Python's per-process hash seed (xdist workers must agree)."""
    import subprocess
    import sys
    data = {"seed": 5, "clients": [{"name": "a"}, {"name": "b"}], "stages": [{"name": "e", "kind": "explorer"}],
            "workload": [{"client": "a", "objects": 20}, {"client": "b", "mode": "delta", "objects": 10}]}
    digests = set()
    for hash_seed in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", DIGEST, json.dumps(data), str(tmp_path / hash_seed)],
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=Path(__file__).parent.parent,
                             capture_output=True, text=True, timeout=60, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_the_scans_of_messages_the_runner_publishes_again():
    from harness.phases import _scans_of
    spec = {"scan_tag": {"scanner": {"pk": 7}, "time": "2026-01-05T07:00:00+00:00"}}
    conversion = {"scan_spec": spec, "handle": {}}
    assert _scans_of([("q", spec), ("q", conversion), ("q", b"raw")]) == ["7@2026-01-05T07:00:00+00:00"]
