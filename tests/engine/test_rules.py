"""CPR, regex, boolean and last-modified rules (no broker)."""
from datetime import date

import pytest

from reference_engine import rules


def make_cpr(day: int, month: int, year: int) -> str:
    """A valid CPR for the date (first serial whose digits pass modulus 11 and the century rule)."""
    yy = year % 100
    for serial in range(10000):
        digits = f"{day:02d}{month:02d}{yy:02d}{serial:04d}"
        if rules.cpr_century(yy, int(digits[6])) == year and rules.modulus11_ok(digits):
            return digits
    raise AssertionError("no CPR")


@pytest.mark.parametrize("yy,seventh,year", [
    (90, 0, 1990), (5, 3, 1905), (36, 4, 2036), (37, 4, 1937), (57, 5, 2057), (58, 5, 1858),
    (0, 8, 2000), (99, 8, 1899), (36, 9, 2036), (37, 9, 1937),
])
def test_century_rule(yy, seventh, year):
    assert rules.cpr_century(yy, seventh) == year


def test_birth_date_and_leap_years():
    assert rules.cpr_birth_date("0101900002") == date(1990, 1, 1)
    assert rules.cpr_birth_date("2902004000") == date(2000, 2, 29)  # 7th digit 4, yy 00 -> 2000
    assert rules.cpr_birth_date("2902001000") is None  # 1900 is not a leap year
    assert rules.cpr_birth_date("3213901234") is None
    assert rules.cpr_birth_date("12345") is None


def test_modulus11():
    cpr = make_cpr(28, 10, 1975)
    assert rules.is_valid_cpr(cpr)
    bad = cpr[:9] + str((int(cpr[9]) + 1) % 10)
    assert not rules.is_valid_cpr(bad)
    assert rules.is_valid_cpr(bad, modulus_11=False)


def test_cpr_rule_finds_censors_and_reports_offsets():
    cpr = make_cpr(28, 10, 1975)
    text = f"Kunde: Jens Hansen, CPR: {cpr[:6]}-{cpr[6:]} bor i Aarhus"
    matched, found = rules.evaluate({"type": "cpr", "sensitivity": 1000}, text)
    assert matched
    (entry,) = found
    (m,) = entry["matches"]
    assert m["match"] == "2810XXXXXX"
    assert m["offset"] == text.index(cpr[:6])
    assert cpr[:6] not in m["context"] and "XXXXXX-XXXX" in m["context"]
    assert m["context"][m["context_offset"]:].startswith("XXXXXX-XXXX")
    assert m["sensitivity"] == 1000 and m["probability"] == 1.0


def test_cpr_without_separator_and_several_in_one_text():
    a, b = make_cpr(1, 1, 1990), make_cpr(14, 6, 2001)
    matched, found = rules.evaluate({"type": "cpr"}, f"Liste: {a} og {b[:6]} {b[6:]}.")
    assert matched and [m["match"] for m in found[0]["matches"]] == [a[:4] + "XXXXXX", b[:4] + "XXXXXX"]


def test_cpr_rule_rejects_bad_modulus_and_bad_dates():
    cpr = make_cpr(1, 1, 1990)
    bad = cpr[:9] + str((int(cpr[9]) + 1) % 10)
    assert rules.evaluate({"type": "cpr"}, f"CPR {bad}") [0] is False
    assert rules.evaluate({"type": "cpr", "modulus_11": False}, f"CPR {bad}")[0] is True
    assert rules.evaluate({"type": "cpr"}, "CPR 3213901234")[0] is False
    assert rules.evaluate({"type": "cpr"}, f"nr 9{cpr}")[0] is False  # part of a longer number


@pytest.mark.parametrize("word", ["faknr", "Ordrenummer", "p-nr", "P.nr", "fakturanummer", "protocol no."])
def test_blacklisted_context_is_ignored(word):
    cpr = make_cpr(3, 4, 1980)
    text = f"{word}: {cpr}"
    assert rules.evaluate({"type": "cpr"}, text)[0] is False
    assert rules.evaluate({"type": "cpr", "examine_context": False}, text)[0] is True


def test_blacklist_from_the_rule_replaces_the_default():
    cpr = make_cpr(3, 4, 1980)
    assert rules.evaluate({"type": "cpr", "blacklist": ["kundenr"]}, f"kundenr {cpr}")[0] is False
    assert rules.evaluate({"type": "cpr", "blacklist": ["kundenr"]}, f"faknr {cpr}")[0] is True


def test_regex_and_boolean_rules():
    text = "Hemmelig rapport om budget"
    regex = {"type": "regex", "expression": "hemmelig"}
    assert rules.evaluate(regex, text)[0]
    assert rules.evaluate({"type": "not", "rule": regex}, text)[0] is False
    assert rules.evaluate({"type": "and", "components": [regex, {"type": "regex", "expression": "budget"}]}, text)[0]
    matched, found = rules.evaluate({"type": "and", "components": [{"type": "regex", "expression": "nope"}, regex]}, text)
    assert not matched and len(found) == 1  # short-circuits like the real engine
    assert rules.evaluate({"type": "or", "components": [{"type": "regex", "expression": "nope"}, regex]}, text)[0]
    with pytest.raises(rules.RuleError):
        rules.evaluate({"type": "regex", "expression": "("}, text)
    with pytest.raises(rules.RuleError):
        rules.evaluate({"type": "bogus"}, text)


def test_last_modified_and_delta_cutoff(tmp_path):
    rule = {"type": "last-modified", "after": "2025-01-01T00:00:00+0100"}
    old = 1700000000.0  # 2023
    new = 1800000000.0  # 2027
    assert rules.evaluate(rule, "", new)[0] and not rules.evaluate(rule, "", old)[0]
    delta = {"type": "and", "components": [rule, {"type": "cpr"}]}
    from datetime import timezone
    assert rules.last_modified_cutoff(delta).astimezone(timezone.utc).day == 31  # 2024-12-31 23:00 UTC
    assert rules.last_modified_cutoff({"type": "cpr"}) is None
    cpr = make_cpr(5, 5, 1955)
    assert rules.evaluate(delta, f"cpr {cpr}", new)[0]
    assert not rules.evaluate(delta, f"cpr {cpr}", old)[0]
