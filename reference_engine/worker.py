"""The worker: ConversionMessage in; matches, metadata, problems and a status out."""
from __future__ import annotations

import mimetypes
import os

from . import messages, rules
from .config import Settings
from .stage import Output

METADATA_QUEUE = "os2ds_metadata"
TYPO_METADATA_QUEUE = "os2ds_meta_data"


def make_handler(settings: Settings):
    metadata_queue = TYPO_METADATA_QUEUE if settings.has("typo_output_queue") else METADATA_QUEUE

    def handle(obj: dict, queue: str) -> list[Output]:
        conv = messages.parse_conversion(obj)
        spec, handle_ = conv["scan_spec"], conv["handle"]
        tag = spec["scan_tag"]
        if handle_.get("type") != "file":
            body = messages.problem(tag, f"Unknown scheme '{handle_.get('type')}'", handle=handle_)
            return [Output("os2ds_problems", body), Output("os2ds_checkups", body),
                    Output("os2ds_status", messages.status(tag, message=body["message"],
                                                           is_error=True))]
        source = handle_.get("source") if isinstance(handle_.get("source"), dict) else spec["source"]
        relpath = handle_.get("path")
        if not isinstance(relpath, str) or not isinstance(source.get("path"), str):
            raise messages.PoisonMessage("ConversionMessage: handle without a path")
        path = os.path.join(source["path"], relpath)
        try:
            with open(path, "rb") as f:
                data = f.read()
            st = os.stat(path)
        except OSError:
            body = messages.problem(tag, "Resource check failed", handle=handle_, missing=True)
            return [Output("os2ds_problems", body), Output("os2ds_checkups", body),
                    Output("os2ds_status", messages.status(tag, message="Resource check failed",
                                                           is_error=True))]
        text = data.decode("utf-8", errors="replace")
        matched, found = rules.evaluate(conv["progress"]["rule"], text, st.st_mtime)
        result = messages.matches(spec, handle_, matched, found)
        outputs = [Output("os2ds_matches", result), Output("os2ds_checkups", result)]
        if matched:
            outputs.append(Output(metadata_queue, messages.metadata(tag, handle_, {
                "last-modified": rules.format_time(st.st_mtime),
                "filesystem-owner-uid": st.st_uid,
            })))
        n_found = sum(len(entry["matches"] or []) for entry in found)
        object_type = mimetypes.guess_type(relpath)[0] or "application/octet-stream"
        outputs.append(Output("os2ds_status", messages.status(
            tag, matches_found=n_found, object_size=len(data), object_type=object_type)))
        return outputs
    return handle
