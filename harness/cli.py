"""``python -m harness``: lint a scenario, re-check a saved history, print the scenario schema.

    python -m harness lint scenario.yaml|compose.yml [more ...] [--clients clients.json]
    python -m harness import compose.yml [--clients clients.json] [-o scenario.yaml]
    python -m harness check history.jsonl --scenario scenario.yaml [--check-period S] [--tolerance S]
                            [--grace S] [--clauses QP-PRECEDENCE,RT] [--timeline out.png] [--json]
    python -m harness schema
    python -m harness clauses [--rules]
    python -m harness faults [--markdown]

Exit status: 0 all good, 1 a clause failed (findings printed, clause id first), 2 a file could
not be used (the message names the file, the field and the reason; never a traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from harness import compose
from harness.checkers import CLAUSES, check_all, lint, rules, select, windows_for
from harness.checkers.model import Windows
from harness.history import History, HistoryError
from harness.report import format_failure, format_summary, render_timeline
from harness.scenario import ScenarioError, json_schema, load_scenario

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description="qp-harness: queue-priority conformance tools")
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("lint", help="check scenario files, or a deployment's compose file, statically "
                                     "(CF-* clauses, no broker)")
    lp.add_argument("scenarios", nargs="+", type=Path, metavar="scenario.yaml|compose.yml")
    lp.add_argument("--clients", type=Path, help="for a compose file: the client export (JSON list of clients)")
    ip = sub.add_parser("import", help="turn a docker-compose file's engine services (and a client export) into "
                                       "a scenario skeleton")
    ip.add_argument("compose", type=Path, metavar="compose.yml")
    ip.add_argument("--clients", type=Path, help="the client export: JSON list of {name, organisation, the four "
                                                  "queue fields}")
    ip.add_argument("-o", "--output", type=Path, help="write the scenario here instead of printing it")
    cp = sub.add_parser("check", help="re-run the checkers on a saved history.jsonl")
    cp.add_argument("history", type=Path, metavar="history.jsonl")
    cp.add_argument("--scenario", type=Path, help="the scenario the history was recorded from")
    cp.add_argument("--check-period", type=float,
                    help="engine check period in seconds (default: as recorded in the history, else scenario, else 5)")
    cp.add_argument("--tolerance", "--window-tolerance", type=float, dest="tolerance",
                    help="window tolerance in seconds (default: as recorded, else scenario, else 1)")
    cp.add_argument("--grace", "--startup-grace", type=float, dest="grace",
                    help="start-up grace G in seconds (default: as recorded, else scenario, else 30)")
    cp.add_argument("--clauses", help="comma-separated clause ids or families (default: the scenario's, else all)")
    cp.add_argument("--timeline", type=Path, help="also write the timeline PNG here")
    cp.add_argument("--json", action="store_true", help="print the results as JSON instead of text")
    sub.add_parser("schema", help="print the scenario JSON Schema")
    rp = sub.add_parser("clauses", help="list the clause ids (with --rules: the exact rule each checker applies)")
    rp.add_argument("--rules", action="store_true")
    fp = sub.add_parser("faults", help="list the harness, reference-engine and configuration faults "
                                       "(with --markdown: the docs table of engine faults)")
    fp.add_argument("--markdown", action="store_true")
    return p


def _lint(paths: list[Path], clients: Path | None = None) -> int:
    worst = EXIT_OK
    for path in paths:
        where = lambda field: f"{path}: {field}"  # noqa: E731 - a scenario's fields are its own
        try:
            if compose.is_compose_file(path):
                deployment = compose.load_deployment(path, clients)
                scenario = compose.to_scenario(deployment)
                where = lambda field: compose.compose_field(deployment, field)  # noqa: E731
            else:
                scenario = load_scenario(path)
        except ScenarioError as exc:
            print(str(exc), file=sys.stderr)
            worst = max(worst, EXIT_BAD_INPUT)
            continue
        results = lint(scenario)
        failed = [r for r in results if r.failed]
        print(f"{path}: " + ", ".join(f"{r.clause} {r.outcome.replace('_', ' ')}" for r in results))
        for r in failed:
            for f in r.findings:
                field = f.evidence[0].get("field") if f.evidence and isinstance(f.evidence[0], dict) else None
                print(f"{r.clause}: {f.explanation}" + (f" [{where(field)}]" if field else ""))
        if failed:
            worst = max(worst, EXIT_FAILED)
    return worst


def _import(args) -> int:
    try:
        deployment = compose.load_deployment(args.compose, args.clients)
        compose.to_scenario(deployment)  # the skeleton must be a valid scenario
    except ScenarioError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    text = compose.to_yaml(deployment)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
        print(f"{args.output}: {len(deployment.services)} engine services, "
              f"{len(deployment.clients) or 1} clients; lint it with: python -m harness lint {args.output}")
    else:
        print(text, end="")
    return EXIT_OK


def _check(args) -> int:
    scenario = None
    if args.scenario is not None:
        try:
            scenario = load_scenario(args.scenario)
        except ScenarioError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        history = History.load(args.history)
    except HistoryError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"{args.history}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Explicit options win; then the windows the run itself was judged with (recorded in run_started);
    # then the scenario's own checks; then SPEC.md's defaults.
    w = windows_for(scenario)
    values, sources = {n: getattr(w, n) for n in ("check_period", "tolerance", "grace")}, dict(w.sources)
    started = history.of("run_started")
    recorded = started[0] if started else {}
    for name in values:
        if recorded.get(name) is not None and (recorded[name] or name == "tolerance"):
            values[name] = recorded[name]
            first = (recorded.get("window_sources") or {}).get(name)
            sources[name] = "the history's run_started" + (f" ({first})" if first else "")
        given = getattr(args, name)
        if given is not None:
            values[name], sources[name] = given, f"command line --{name.replace('_', '-')}"
    w = Windows(**values, sources=sources)
    clauses = None
    if args.clauses:
        try:
            clauses = select([c for c in args.clauses.split(",") if c.strip()])
        except ValueError as exc:
            print(f"--clauses: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    results = check_all(history, scenario, w, clauses=clauses)
    timeline = None
    if args.timeline:
        timeline = render_timeline(history, results, args.timeline, w)
    if args.json:
        print(json.dumps({"windows": {"check_period": w.check_period, "tolerance": w.tolerance, "grace": w.grace,
                                      "sources": w.sources},
                          "results": [dataclasses.asdict(r) for r in results]}, indent=2, default=str))
    else:
        print(f"{args.history}: {len(history)} events; {w.describe()}")
        print(format_summary(results))
        text = format_failure(results, history, timeline)
        if text:
            print()
            print(text)
        elif timeline:
            print(f"timeline: {timeline}")
    return EXIT_FAILED if any(r.failed for r in results) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "lint":
        return _lint(args.scenarios, args.clients)
    if args.command == "import":
        return _import(args)
    if args.command == "check":
        return _check(args)
    if args.command == "clauses":
        texts = rules() if args.rules else {}
        for cid, title in CLAUSES:
            print(f"{cid:<17} {title}")
            if args.rules:
                print("\n".join("    " + line for line in texts[cid].splitlines()) + "\n")
        return EXIT_OK
    if args.command == "faults":
        from harness import faults
        print(faults.engine_fault_table() if args.markdown else faults.describe())
        return EXIT_OK
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    return EXIT_BAD_INPUT
