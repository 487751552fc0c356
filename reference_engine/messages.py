"""OS2datascanner's wire format: gzip JSON bodies and the message shapes of ENGINE_CONTRACT.md."""
from __future__ import annotations

import copy
import gzip
import json
import zlib
from datetime import datetime, timezone
from typing import Any

import pika

DEFAULT_EXPLORER_QUEUE = "os2ds_scan_specs"
DEFAULT_CONVERSION_QUEUE = "os2ds_conversions"
DATA_PROPERTIES = pika.BasicProperties(delivery_mode=2, content_encoding="gzip")
# A CommandMessage since OS2datascanner 3.32 (ENGINE_CONTRACT.md section 7), in the engine's key order.
COMMAND_FIELDS = ("abort", "log_level", "profiling", "new_queue", "new_queue_priority", "delete_queue",
                  "worker_hello")
COMMAND_KEYS = frozenset(COMMAND_FIELDS)
# Per-scan conversion queues: osds_conversions.<scanner pk>_<YYYYmmddTHHMMSS>, declared by the admin only.
PER_SCAN_PREFIX = "osds_conversions."


class PoisonMessage(ValueError):
    """A body the stage cannot use: not JSON, or missing the fields it needs."""


def decode(body: bytes, content_encoding: str | None = None) -> Any:
    data = body
    if content_encoding == "gzip" or body[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise PoisonMessage(f"bad gzip body: {exc}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"body is not JSON: {exc}") from None


def encode(obj: Any) -> bytes:
    return gzip.compress(json.dumps(obj).encode("utf-8"))


def _require(obj: Any, key: str, kind: type, where: str):
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise PoisonMessage(f"{where}: missing or bad field {key!r}")
    return obj[key]


def normalise_time(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat()


def normalise_tag(tag: dict) -> dict:
    """The scan tag as a stage re-serialises it (time normalised, destination forced)."""
    tag = copy.deepcopy(tag)
    tag["time"] = normalise_time(tag.get("time"))
    tag.setdefault("user", None)
    for key in ("scanner",):
        if isinstance(tag.get(key), dict):
            tag[key].setdefault("test", False)
            tag[key].setdefault("keep_fp", False)
    tag["destination"] = "pipeline_collector"
    return tag


def scan_key(tag: Any) -> tuple | None:
    """(scanner.pk, time) identifies one scan run."""
    if not isinstance(tag, dict):
        return None
    scanner = tag.get("scanner") if isinstance(tag.get("scanner"), dict) else {}
    return (scanner.get("pk"), normalise_time(tag.get("time")))


def parse_scan_spec(obj: Any) -> dict:
    tag = _require(obj, "scan_tag", dict, "ScanSpecMessage")
    _require(obj, "source", dict, "ScanSpecMessage")
    _require(obj, "rule", dict, "ScanSpecMessage")
    if not isinstance(obj["source"].get("type"), str):
        raise PoisonMessage("ScanSpecMessage: source without a type")
    spec = {
        "scan_tag": normalise_tag(tag),
        "source": obj["source"],
        "rule": obj["rule"],
        "configuration": obj.get("configuration") or {},
        "filter_rule": obj.get("filter_rule"),
        "progress": obj.get("progress"),
        "explorer_queue": obj.get("explorer_queue") or DEFAULT_EXPLORER_QUEUE,
        "conversion_queue": obj.get("conversion_queue") or DEFAULT_CONVERSION_QUEUE,
    }
    return spec


def parse_conversion(obj: Any) -> dict:
    scan_spec = parse_scan_spec(_require(obj, "scan_spec", dict, "ConversionMessage"))
    handle = _require(obj, "handle", dict, "ConversionMessage")
    progress = obj.get("progress")
    if progress is not None and not isinstance(progress, dict):
        raise PoisonMessage("ConversionMessage: bad field 'progress'")
    if "progress" not in obj:
        raise PoisonMessage("ConversionMessage: missing field 'progress'")
    rule = (progress or {}).get("rule") or scan_spec["rule"]
    return {"scan_spec": scan_spec, "handle": handle,
            "progress": {"rule": rule, "matches": (progress or {}).get("matches") or []}}


def parse_command(obj: Any) -> dict:
    """The seven keys of a CommandMessage (3.32); a command without ``abort`` is refused, as 3.32 does."""
    if not isinstance(obj, dict) or not (COMMAND_KEYS & obj.keys()):
        raise PoisonMessage("not a CommandMessage")
    if "abort" not in obj:
        raise PoisonMessage("a CommandMessage without the key 'abort' (refused, as OS2datascanner 3.32 does)")
    return {key: obj.get(key) for key in COMMAND_FIELDS}


def command(**fields: Any) -> dict:
    """A CommandMessage with all seven keys present, as the engine writes one."""
    unknown = set(fields) - COMMAND_KEYS
    if unknown:
        raise ValueError(f"not CommandMessage keys: {', '.join(sorted(unknown))}")
    return {key: fields.get(key) for key in COMMAND_FIELDS}


def file_handle(source: dict, relpath: str) -> dict:
    return {"type": "file", "source": source, "path": relpath, "hints": None}


def conversion(spec: dict, handle: dict) -> dict:
    return {"scan_spec": spec, "handle": handle, "progress": {"rule": spec["rule"], "matches": []}}


def status(scan_tag: Any, *, total_objects=None, matches_found=None, skipped_by_last_modified=None,
           object_size=None, object_type=None, message: str = "", is_error: bool = False,
           new_objects: int | None = None) -> dict:
    body = {"scan_tag": scan_tag, "message": message, "status_is_error": is_error,
            "total_objects": total_objects, "new_sources": None, "matches_found": matches_found,
            "skipped_by_last_modified": skipped_by_last_modified, "object_size": object_size,
            "object_type": object_type}
    if new_objects is not None:  # 3.32: the explorer's status after each conversion into a per-scan queue
        body["new_objects"] = new_objects
    return body


def is_per_scan_queue(queue: str) -> bool:
    return queue.startswith(PER_SCAN_PREFIX)


def problem(scan_tag: Any, message: str, *, source=None, handle=None, missing: bool = False) -> dict:
    return {"scan_tag": scan_tag, "source": source, "handle": handle, "message": message,
            "missing": missing}


def matches(spec: dict, handle: dict, matched: bool, found: list) -> dict:
    return {"scan_spec": spec, "handle": handle, "matched": matched, "matches": found}


def metadata(scan_tag: Any, handle: dict, meta: dict) -> dict:
    return {"scan_tag": scan_tag, "handle": handle, "metadata": meta}


def best_effort_tag(obj: Any) -> Any:
    """The scan tag of a message that could not be parsed, if one can be found."""
    if isinstance(obj, dict):
        if isinstance(obj.get("scan_tag"), dict):
            return obj["scan_tag"]
        if isinstance(obj.get("scan_spec"), dict) and isinstance(obj["scan_spec"].get("scan_tag"), dict):
            return obj["scan_spec"]["scan_tag"]
    return None
