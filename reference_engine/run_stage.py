"""``python -m reference_engine.run_stage explorer|worker``: start one stage.

Configured exactly like OS2datascanner's run_stage (see ``--help``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ENV_HELP, STAGES, ConfigError, load_settings


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m reference_engine.run_stage",
        description="Run one stage of the qp-harness reference engine (an OS2datascanner-"
                    "compatible explorer or worker with QUEUE_PRIORITY consumption).",
        epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("stage", choices=STAGES, help="which stage to run")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.stage)
    except ConfigError as exc:
        print(f"run_stage: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format=f"%(asctime)s {args.stage}[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.WARNING)
    from .stage import Stage
    if args.stage == "explorer":
        from .explorer import make_handler
        problem_queues = ("os2ds_problems",)
    else:
        from .worker import make_handler
        problem_queues = ("os2ds_problems", "os2ds_checkups")
    if settings.faults:
        logging.getLogger("reference_engine").warning("faults on: %s", ", ".join(sorted(settings.faults)))
    return Stage(settings, make_handler(settings), problem_queues).run()


if __name__ == "__main__":
    raise SystemExit(main())
