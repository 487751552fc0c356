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
        skipped = 0
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
            returned = messages.problem(
                tag, f"Conversion queue '{conversion_queue}' does not exist: the conversion "
                     f"was returned unroutable", source=source, handle=handle_)
            outputs.append(Output(conversion_queue, messages.conversion(spec, handle_),
                                  mandatory=True, on_return=returned))
        outputs.append(Output(status_queue, messages.status(
            tag, total_objects=len(outputs),
            skipped_by_last_modified=skipped if cutoff is not None else None)))
        return outputs
    return handle
