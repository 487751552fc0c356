"""``python -m harness``: see harness.cli."""
import os
import sys

from harness.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # e.g. piped into head: not an error worth a traceback
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    code = 0
raise SystemExit(code)
