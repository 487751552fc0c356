"""The explorer: ScanSpecMessage in, one ConversionMessage per object out."""
from __future__ import annotations

import os
from datetime import datetime, timezone

from . import messages, rules
from .config import Settings
from .stage import Output


def walk(root: str) -> list[str]:
    """Every file under ``root``, as sorted paths relative to it ([] when it is missing)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def make_handler(settings: Settings):
    def handle(obj: dict, queue: str) -> list[Output]:
        spec = messages.parse_scan_spec(obj)
        tag, source = spec["scan_tag"], spec["source"]
        conversion_queue = spec["conversion_queue"]
        if settings.has("ignore_conversion_queue"):
            conversion_queue = messages.DEFAULT_CONVERSION_QUEUE
        status_queue = conversion_queue if settings.has("status_into_conversions") else "os2ds_status"
        if source.get("type") != "file" or not isinstance(source.get("path"), str):
            return [Output("os2ds_problems",
                           messages.problem(tag, f"Unknown scheme '{source.get('type')}'")),
                    Output(status_queue, messages.status(tag, total_objects=0))]
        cutoff = rules.last_modified_cutoff(spec["rule"])
        outputs: list[Output] = []
        skipped = objects = 0
        for relpath in walk(source["path"]):
            if cutoff is not None:
                try:
                    mtime = os.stat(os.path.join(source["path"], relpath)).st_mtime
                except OSError:
                    mtime = None
                if mtime is not None and datetime.fromtimestamp(mtime, timezone.utc) <= cutoff:
                    skipped += 1
                    continue
            handle_ = messages.file_handle(source, relpath)
            outputs += conversion_outputs(spec, handle_, conversion_queue, status_queue)
            objects += 1
        outputs.append(Output(status_queue, messages.status(
            tag, total_objects=objects,
            skipped_by_last_modified=skipped if cutoff is not None else None)))
        return outputs
    return handle


def conversion_outputs(spec: dict, handle_: dict, conversion_queue: str, status_queue: str) -> list[Output]:
    """One object's conversion, and for a per-scan queue (3.32) the status that counts it."""
    body = messages.conversion(spec, handle_)
    if messages.is_per_scan_queue(conversion_queue):
        # As 3.32: no mandatory flag (a conversion to a deleted per-scan queue is dropped silently,
        # as after a cancelled scan), and a StatusMessage with new_objects: 1 after each conversion.
        return [Output(conversion_queue, body),
                Output(status_queue, messages.status(spec["scan_tag"], new_objects=1))]
    returned = messages.problem(
        spec["scan_tag"], f"Conversion queue '{conversion_queue}' does not exist: the conversion "
                          f"was returned unroutable", source=spec["source"], handle=handle_)
    return [Output(conversion_queue, body, mandatory=True, on_return=returned)]
