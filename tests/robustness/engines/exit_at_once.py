"""An engine that prints a few lines and exits with code 3 at once (a broken install, a bad config)."""
import sys

stage = sys.argv[1] if len(sys.argv) > 1 else "?"
for number in range(1, 61):
    print(f"exit_at_once {stage}: start-up line {number}", flush=True)
print(f"exit_at_once {stage}: FATAL cannot read configuration, giving up", flush=True)
sys.exit(3)
