"""Per-scan queues (3.32) without a broker: the decision, the command format, the settings.

The PS-* clause each test is about is named in a comment: the clause registry of this branch does
not know those ids yet, and an unknown id in a ``clauses`` marker is a collection error.
"""
import json

import pytest

from reference_engine import config, messages
from reference_engine.explorer import make_handler
from reference_engine.per_scan import allowed, decide_per_scan

D1, D2, F1, X1 = "osds_conversions.1_d", "osds_conversions.2_d", "osds_conversions.3_f", "osds_conversions.4_x"
TAGS = {D1: "delta", D2: "delta", F1: "full"}
PRIORITY = ["delta", "full"]


def test_filter_by_tag():  # PS-FILTER
    assert allowed("delta", PRIORITY) and allowed("full", PRIORITY)
    assert not allowed("Delta", PRIORITY) and not allowed(None, PRIORITY)
    assert allowed("anything", []) and allowed(None, [])  # no list: no filter
    assert allowed("other", PRIORITY, {"subscribe_every_tag"})


def test_only_the_highest_tag_with_ready_messages_is_served():  # PS-PRECEDENCE
    d = decide_per_scan(PRIORITY, TAGS, {D1, D2, F1}, {D1: 0, D2: 3, F1: 9})
    assert d.cancel == (F1,) and d.start == () and d.serving == "delta"
    # an empty delta queue keeps its consumer while another delta queue has work
    d = decide_per_scan(PRIORITY, TAGS, set(), {D1: 0, D2: 3, F1: 9})
    assert d.start == (D1, D2)


def test_lower_tag_served_when_higher_tags_are_empty():  # PS-PROGRESS
    d = decide_per_scan(PRIORITY, TAGS, {D1, D2}, {D1: 0, D2: 0, F1: 9})
    assert d.cancel == (D1, D2) and d.start == (F1,) and d.serving == "full"


def test_nothing_ready_consumes_every_known_queue():  # PS-SUBSCRIBE
    d = decide_per_scan(PRIORITY, TAGS, {F1}, {D1: 0, D2: 0, F1: 0})
    assert d.cancel == () and d.start == (D1, D2) and d.serving is None


def test_no_priority_list_consumes_everything_whatever_the_depths():
    d = decide_per_scan([], {**TAGS, X1: "x"}, set(), {D1: 5, D2: 0, F1: 9, X1: 1})
    assert d.start == (D1, D2, F1, X1) and d.cancel == ()


def test_missing_queue_is_never_started():
    d = decide_per_scan(PRIORITY, TAGS, set(), {D1: None, D2: 0, F1: 0})
    assert D1 not in d.start


def test_fault_delivery_count_priority_is_depth_blind():
    # delta has a backlog but delivered nothing in the window: 3.32 puts full back
    d = decide_per_scan(PRIORITY, TAGS, {D1}, {D1: 40, D2: 0, F1: 9}, {}, {"delivery_count_priority"})
    assert F1 in d.start and d.serving is None
    d = decide_per_scan(PRIORITY, TAGS, {D1, D2, F1}, {D1: 40, D2: 0, F1: 9}, {F1: 2, D1: 1},
                        {"delivery_count_priority"})
    assert d.cancel == (F1,) and d.serving == "delta"


def test_fault_subscribe_every_tag_ranks_unlisted_tags_last():
    tags = {**TAGS, X1: "other"}
    d = decide_per_scan(PRIORITY, tags, set(), {D1: 0, D2: 0, F1: 0, X1: 4}, faults={"subscribe_every_tag"})
    assert X1 in d.start and d.serving == "other"


@pytest.mark.clauses("FT-BAD-COMMAND")
@pytest.mark.parametrize("obj", [[], "abort", {"greeting": "hello"},
                                 {"log_level": "DEBUG", "profiling": None}])  # no 'abort': refused as 3.32
def test_not_a_command(obj):
    with pytest.raises(messages.PoisonMessage):
        messages.parse_command(obj)


def test_command_has_seven_keys():
    hello = messages.command(worker_hello="amq.gen-x")
    assert list(hello) == ["abort", "log_level", "profiling", "new_queue", "new_queue_priority",
                           "delete_queue", "worker_hello"]
    assert messages.parse_command(json.loads(json.dumps(hello))) == hello
    parsed = messages.parse_command({"abort": None, "new_queue": D1, "new_queue_priority": "delta"})
    assert parsed["new_queue"] == D1 and parsed["delete_queue"] is None
    with pytest.raises(ValueError, match="nope"):
        messages.command(nope=1)


def test_conversion_priority_is_read_by_workers_only(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text('[amqp]\nAMQP_HOST = "h"\n')
    env = {"OS2DS_ENGINE_USER_CONFIG_PATH": str(path), "CONVERSION_PRIORITY": " delta\tfull delta "}
    assert config.load_settings("worker", env).conversion_priority == ["delta", "full"]
    assert config.load_settings("explorer", env).conversion_priority == []
    assert config.load_settings("worker", {**env, "CONVERSION_PRIORITY": " "}).conversion_priority == []


def test_explorer_into_a_per_scan_queue_adds_a_status_per_object_and_no_mandatory(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("x")
    settings = config.Settings("explorer", "h", 1, "u", "p", "/", [])
    spec = {"scan_tag": {"time": "2026-05-05T12:00:00+02:00", "scanner": {"pk": 7, "name": "s"},
                         "organisation": {"name": "o", "uuid": "u"}},
            "source": {"type": "file", "path": str(tmp_path)}, "rule": {"type": "cpr"},
            "conversion_queue": "osds_conversions.7_20260505T120000"}
    outputs = make_handler(settings)(spec, "os2ds_scan_specs")
    assert [o.queue for o in outputs] == ["osds_conversions.7_20260505T120000", "os2ds_status"] * 2 + ["os2ds_status"]
    assert not any(o.mandatory for o in outputs)
    assert [o.body.get("new_objects") for o in outputs if o.queue == "os2ds_status"] == [1, 1, None]
    assert outputs[-1].body["total_objects"] == 2
    static = make_handler(settings)({**spec, "conversion_queue": "conversions_full"}, "os2ds_scan_specs")
    assert [o.queue for o in static] == ["conversions_full", "conversions_full", "os2ds_status"]
    assert static[0].mandatory and "new_objects" not in static[-1].body
