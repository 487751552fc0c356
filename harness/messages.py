"""OS2datascanner's message formats, as the harness needs to see them.

Pure functions: decode a body, classify a message from its top-level keys
(ENGINE_CONTRACT.md section 4), identify its scan and object, and reduce it
to the small summary that goes into the history.
"""
from __future__ import annotations

import gzip
import json
import zlib
from datetime import datetime, timezone
from typing import Any

# Queues that carry several types by design; RT-ONE-TYPE does not judge them.
MULTI_TYPE_QUEUES = frozenset({"os2ds_checkups", "os2ds_results"})

DEFAULT_EXPLORER_QUEUE = "os2ds_scan_specs"
DEFAULT_CONVERSION_QUEUE = "os2ds_conversions"

# Queues the engine writes to; the observer reads them.
OUTPUT_QUEUES = ("os2ds_matches", "os2ds_metadata", "os2ds_status", "os2ds_problems", "os2ds_checkups")

UNPARSEABLE = "Unparseable"

# OS2datascanner 3.32 (ENGINE_CONTRACT.md section 7): per-scan queues and the seven-key command.
PER_SCAN_PREFIX = "osds_conversions."
COMMAND_KEYS = ("abort", "log_level", "profiling", "new_queue", "new_queue_priority", "delete_queue", "worker_hello")
BROADCAST_EXCHANGE = "broadcast"


def decode_body(body: bytes, content_encoding: str | None = None) -> Any:
    """The JSON value of a message body (gzip or plain); raises ValueError."""
    data = body
    if content_encoding == "gzip" or body[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"bad gzip body: {exc}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


def encode_body(obj: Any) -> bytes:
    """Gzip of the JSON text, as OS2datascanner publishes."""
    return gzip.compress(json.dumps(obj).encode("utf-8"))


def per_scan_queue(tag: dict[str, Any]) -> str:
    """The per-scan queue the admin names for a scan: ``osds_conversions.<scanner pk>_<YYYYmmddTHHMMSS>``,
    the scan tag's time in its own (local) offset, to the second."""
    when = datetime.fromisoformat(str(tag["time"]))
    return f"{PER_SCAN_PREFIX}{tag['scanner']['pk']}_{when.strftime('%Y%m%dT%H%M%S')}"


def command(**fields: Any) -> dict[str, Any]:
    """A CommandMessage as a 3.32 engine writes one: all seven keys present, the unnamed ones null."""
    unknown = set(fields) - set(COMMAND_KEYS)
    if unknown:
        raise ValueError(f"not a command key: {', '.join(sorted(unknown))}")
    return {key: fields.get(key) for key in COMMAND_KEYS}


def classify(obj: Any) -> str:
    """The message type from its top-level keys, in the contract's order."""
    if not isinstance(obj, dict):
        return UNPARSEABLE
    keys = obj.keys()
    if "metadata" in keys:
        return "MetadataMessage"
    if "matched" in keys:
        return "MatchesMessage"
    if "representations" in keys:
        return "RepresentationMessage"
    if {"scan_spec", "handle", "progress"} <= keys:
        return "ConversionMessage"
    if {"source", "rule"} <= keys:
        return "ScanSpecMessage"
    if "status_is_error" in keys:
        return "StatusMessage"
    if {"message", "scan_tag"} <= keys:
        return "ProblemMessage"
    if keys & {"abort", "log_level", "profiling"}:
        return "CommandMessage"
    return UNPARSEABLE


def normalise_time(value: Any) -> str:
    """Scan times are re-serialised by every stage; compare them as UTC instants."""
    if not isinstance(value, str):
        return str(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat()


def scan_tag_of(obj: dict[str, Any], msg_type: str) -> dict[str, Any] | None:
    if msg_type in ("ConversionMessage", "MatchesMessage"):
        spec = obj.get("scan_spec")
        tag = spec.get("scan_tag") if isinstance(spec, dict) else None
    elif msg_type == "CommandMessage":
        tag = obj.get("abort")
    else:
        tag = obj.get("scan_tag")
    return tag if isinstance(tag, dict) else None


def scan_id(tag: dict[str, Any] | None) -> str | None:
    """One scan run = (scanner.pk, time)."""
    if not tag:
        return None
    scanner = tag.get("scanner") or {}
    return f"{scanner.get('pk')}@{normalise_time(tag.get('time'))}"


def org_of(tag: dict[str, Any] | None) -> str | None:
    if not tag:
        return None
    return (tag.get("organisation") or {}).get("uuid")


def object_of(obj: dict[str, Any]) -> str | None:
    handle = obj.get("handle")
    if isinstance(handle, dict):
        return handle.get("path")
    return None


def summarise(body: bytes, content_encoding: str | None = None) -> dict[str, Any]:
    """The history's view of a message: type, scan, organisation, object, and type-specific bits."""
    try:
        obj = decode_body(body, content_encoding)
    except ValueError as exc:
        return {"type": UNPARSEABLE, "error": str(exc)[:200], "size": len(body)}
    msg_type = classify(obj)
    if msg_type == UNPARSEABLE:
        return {"type": UNPARSEABLE, "error": "no known message shape", "size": len(body)}
    tag = scan_tag_of(obj, msg_type)
    summary: dict[str, Any] = {"type": msg_type, "scan": scan_id(tag), "org": org_of(tag)}
    if msg_type in ("ConversionMessage", "MatchesMessage", "MetadataMessage", "ProblemMessage"):
        summary["object"] = object_of(obj)
    if msg_type == "ScanSpecMessage":
        summary["explorer_queue"] = obj.get("explorer_queue") or DEFAULT_EXPLORER_QUEUE
        summary["conversion_queue"] = obj.get("conversion_queue") or DEFAULT_CONVERSION_QUEUE
    elif msg_type == "ConversionMessage":
        spec = obj.get("scan_spec") or {}
        summary["conversion_queue"] = spec.get("conversion_queue") or DEFAULT_CONVERSION_QUEUE
    elif msg_type == "MatchesMessage":
        summary["matched"] = bool(obj.get("matched"))
    elif msg_type == "StatusMessage":
        summary["total_objects"] = obj.get("total_objects")
        summary["object_size"] = obj.get("object_size")
        summary["status_is_error"] = obj.get("status_is_error")
    elif msg_type == "ProblemMessage":
        summary["message"] = str(obj.get("message"))[:200]
    elif msg_type == "CommandMessage":
        # The 3.32 keys that name a queue or a tag, when set (new_queue, delete_queue, worker_hello).
        summary.update({key: obj[key] for key in COMMAND_KEYS[3:] if obj.get(key) is not None})
    return summary
