"""An engine that starts, says so, and never connects to the broker (stuck resolving, waiting on a lock)."""
import sys
import time

stage = sys.argv[1] if len(sys.argv) > 1 else "?"
print(f"never_connects {stage}: starting up", flush=True)
print(f"never_connects {stage}: waiting for the licence server", flush=True)
while True:
    time.sleep(3600)
