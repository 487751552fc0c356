"""The rules a worker applies to an object's text: CPR, regex, and/or/not, last-modified.

``evaluate(rule, text, mtime)`` returns ``(matched, matches)`` where
``matches`` lists one ``{"rule": <leaf rule>, "matches": [...] | None}``
entry per leaf rule that was evaluated, as in MatchesMessages.
"""
from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Any

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

DEFAULT_BLACKLIST = (
    "faknr", "test report no", "customer-no", "order number", "p-nr", "customer no", r"p\.nr",
    "tullstatistik", "pnr", "bilagsnummer", "p-nummer", "fak-nr", "ordrenummer", "dhk:tx",
    "tullstatistisk", "fakturanummer", r"protocol no\.",
)
DEFAULT_WHITELIST = ("cpr",)
MOD11_WEIGHTS = (4, 3, 2, 7, 6, 5, 4, 3, 2, 1)
CONTEXT_CHARS = 50
# A CPR candidate: DDMMYY, optional '-' or ' ', then four digits, not inside a longer number.
CPR_RE = re.compile(r"(?<![\d-])(\d{6})[- ]?(\d{4})(?![\d])")


class RuleError(ValueError):
    """The rule is malformed."""


def cpr_century(yy: int, seventh: int) -> int | None:
    """The full year from the two-digit year and the 7th digit (the century rule)."""
    if seventh <= 3:
        return 1900 + yy
    if seventh in (4, 9):
        return 2000 + yy if yy <= 36 else 1900 + yy
    # 5, 6, 7, 8
    return 2000 + yy if yy <= 57 else 1800 + yy


def cpr_birth_date(digits: str) -> date | None:
    """The birth date a ten-digit CPR encodes, or None when it is not a real date."""
    if len(digits) != 10 or not digits.isdigit():
        return None
    dd, mm, yy, seventh = int(digits[0:2]), int(digits[2:4]), int(digits[4:6]), int(digits[6])
    year = cpr_century(yy, seventh)
    try:
        return date(year, mm, dd)
    except ValueError:
        return None


def modulus11_ok(digits: str) -> bool:
    return sum(int(d) * w for d, w in zip(digits, MOD11_WEIGHTS)) % 11 == 0


def is_valid_cpr(digits: str, modulus_11: bool = True) -> bool:
    if cpr_birth_date(digits) is None:
        return False
    return modulus11_ok(digits) if modulus_11 else True


def censor(text: str) -> str:
    """Text with every CPR-shaped number replaced by X (separators kept)."""
    return CPR_RE.sub(lambda m: re.sub(r"\d", "X", m.group(0)), text)


def _context(text: str, start: int, end: int) -> tuple[str, int]:
    lo = max(0, start - CONTEXT_CHARS)
    hi = min(len(text), end + CONTEXT_CHARS)
    return censor(text[lo:hi]), start - lo


def _blacklisted(window: str, patterns) -> bool:
    for pattern in patterns:
        try:
            if re.search(pattern, window, re.IGNORECASE):
                return True
        except re.error:
            if pattern.lower() in window.lower():
                return True
    return False


def cpr_matches(rule: dict, text: str) -> list[dict]:
    modulus_11 = rule.get("modulus_11", True)
    examine_context = rule.get("examine_context", True)
    blacklist = rule.get("blacklist") or DEFAULT_BLACKLIST
    sensitivity = rule.get("sensitivity")
    found = []
    for m in CPR_RE.finditer(text):
        digits = m.group(1) + m.group(2)
        if not is_valid_cpr(digits, bool(modulus_11)):
            continue
        if examine_context:
            window = text[max(0, m.start() - CONTEXT_CHARS):m.end() + CONTEXT_CHARS]
            if _blacklisted(window, blacklist):
                continue
        context, context_offset = _context(text, m.start(), m.end())
        found.append({
            "match": digits[:4] + "XXXXXX",
            "offset": m.start(),
            "context": context,
            "context_offset": context_offset,
            "sensitivity": sensitivity,
            "probability": 1.0,
        })
    return found


def regex_matches(rule: dict, text: str) -> list[dict]:
    expression = rule.get("expression")
    if not isinstance(expression, str):
        raise RuleError("regex rule without an expression")
    try:
        compiled = re.compile(expression, re.IGNORECASE)
    except re.error as exc:
        raise RuleError(f"bad regular expression {expression!r}: {exc}") from None
    found = []
    for m in compiled.finditer(text):
        if m.end() == m.start():
            continue
        context, context_offset = _context(text, m.start(), m.end())
        found.append({"match": m.group(0), "offset": m.start(), "context": context,
                      "context_offset": context_offset, "sensitivity": rule.get("sensitivity"),
                      "probability": 1.0})
    return found


def parse_time(value: str) -> datetime:
    for fmt in (TIME_FORMAT, "%Y-%m-%dT%H:%M:%S.%f%z"):
        try:
            return datetime.strptime(value, fmt)
        except (ValueError, TypeError):
            pass
    try:
        parsed = datetime.fromisoformat(value)
    except (ValueError, TypeError):
        raise RuleError(f"bad time {value!r} (expected {TIME_FORMAT})") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime(TIME_FORMAT)


def last_modified_cutoff(rule: Any) -> datetime | None:
    """The cutoff of a delta scan: a last-modified rule, alone or directly under an 'and'."""
    if not isinstance(rule, dict):
        return None
    if rule.get("type") == "last-modified":
        return parse_time(rule.get("after"))
    if rule.get("type") == "and":
        for component in rule.get("components") or []:
            if isinstance(component, dict) and component.get("type") == "last-modified":
                return parse_time(component.get("after"))
    return None


def _not_operand(rule: dict) -> dict:
    for key in ("rule", "component", "components"):
        value = rule.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            return value
    raise RuleError("'not' rule without an operand")


def evaluate(rule: Any, text: str, mtime: float | None = None) -> tuple[bool, list[dict]]:
    """(matched, matches) for a rule on an object's text and modification time."""
    if not isinstance(rule, dict) or not isinstance(rule.get("type"), str):
        raise RuleError(f"not a rule: {rule!r}")
    kind = rule["type"]
    if kind == "cpr":
        found = cpr_matches(rule, text)
        return bool(found), [{"rule": rule, "matches": found or None}]
    if kind == "regex":
        found = regex_matches(rule, text)
        return bool(found), [{"rule": rule, "matches": found or None}]
    if kind == "last-modified":
        after = parse_time(rule.get("after"))
        ok = mtime is not None and datetime.fromtimestamp(mtime, timezone.utc) > after
        hit = [{"last-modified": format_time(mtime)}] if ok else None
        return ok, [{"rule": rule, "matches": hit}]
    if kind in ("and", "or"):
        components = rule.get("components")
        if not isinstance(components, list) or not components:
            raise RuleError(f"'{kind}' rule without components")
        collected: list[dict] = []
        for component in components:
            ok, found = evaluate(component, text, mtime)
            collected.extend(found)
            if kind == "and" and not ok:
                return False, collected
            if kind == "or" and ok:
                return True, collected
        return kind == "and", collected
    if kind == "not":
        ok, found = evaluate(_not_operand(rule), text, mtime)
        return not ok, found
    raise RuleError(f"unknown rule type {kind!r}")
