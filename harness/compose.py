"""A deployment as input: a docker-compose file's engine services (and a client export) as a scenario.

    python -m harness import compose.yml [--clients clients.json] [-o scenario.yaml]
    python -m harness lint compose.yml [--clients clients.json]

An engine service is one whose command runs an explorer or a worker stage (``run_stage worker``,
or just ``worker`` as OS2datascanner's engine image takes it), or, without a command, one named
``explorer``/``worker`` (``worker_2`` too). Its ``QUEUE_PRIORITY`` and ``CONVERSION_PRIORITY``
come from its ``environment`` (list or mapping form, ``${VAR:-default}`` resolved as compose does
from this process's environment), its replicas from ``deploy.replicas`` or ``scale``. Other
services (the broker, the admin, other stages) are listed as skipped.

The client export is JSON: a list of objects with ``name`` and optionally ``organisation`` and the
four queue fields (``explorer_full_queue`` ...), as the admin's Client model has them; absent, one
client with OS2datascanner's default queues stands in.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.scenario import ScenarioError, Scenario, parse_scenario

STAGE_KINDS = ("explorer", "worker")
QUEUE_FIELDS = ("explorer_full_queue", "explorer_delta_queue", "conversion_full_queue", "conversion_delta_queue")
CLIENT_FIELDS = ("name", "organisation", *QUEUE_FIELDS)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class DeploymentError(ScenarioError):
    """A compose file or client export that cannot be used: names the file, the field and the reason."""

    heading = "cannot be imported"


@dataclass
class EngineService:
    """One engine service of the compose file, as a scenario stage."""

    service: str  # the compose service name
    kind: str
    queue_priority: list[str]
    conversion_priority: list[str]
    replicas: int


@dataclass
class Deployment:
    path: Path
    services: list[EngineService]
    clients: list[dict[str, Any]]
    clients_path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # "name: why", services that are not engine stages
    notes: list[str] = field(default_factory=list)  # unresolved variables and the like

    @property
    def per_scan(self) -> bool:
        """A 3.32-style deployment: some worker has a CONVERSION_PRIORITY."""
        return any(s.conversion_priority for s in self.services)


def load_deployment(path: Path | str, clients_path: Path | str | None = None) -> Deployment:
    path = Path(path)
    data = _read_yaml(path)
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict) or not services:
        raise DeploymentError(path, [("services", "a compose file needs a 'services' mapping")])
    deployment = Deployment(path, [], [])
    problems: list[tuple[str, str]] = []
    for name, spec in services.items():
        if not isinstance(spec, dict):
            problems.append((f"services.{name}", "a service must be a mapping"))
            continue
        kind = _stage_kind(name, spec.get("command"))
        if kind is None:
            deployment.skipped.append(f"{name}: not an explorer or worker stage")
            continue
        try:
            deployment.services.append(_engine_service(name, kind, spec, deployment.notes))
        except ValueError as exc:
            problems.append((f"services.{name}.{exc.args[0]}", exc.args[1]))
    if problems:
        raise DeploymentError(path, problems)
    if not deployment.services:
        raise DeploymentError(path, [("services", "no explorer or worker service found (a service whose command "
                                                  "runs 'run_stage explorer|worker', or one named explorer/worker)")])
    if clients_path is not None:
        deployment.clients_path = Path(clients_path)
        deployment.clients = load_clients(deployment.clients_path)
    return deployment


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeploymentError(path, [("", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeploymentError(path, [("", f"cannot read: {exc}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DeploymentError(path, [(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")]) from None


def _stage_kind(name: str, command: Any) -> str | None:
    words = command.split() if isinstance(command, str) else [str(w) for w in command or []]
    if words:
        if "run_stage" in " ".join(words):
            after = words[[i for i, w in enumerate(words) if "run_stage" in w][-1] + 1:]
            return after[0] if after and after[0] in STAGE_KINDS else None
        return words[-1] if words[-1] in STAGE_KINDS else None
    match = re.fullmatch(r"(explorer|worker)(?:[_-]?\d+)?", name)
    return match.group(1) if match else None


def _engine_service(name: str, kind: str, spec: dict[str, Any], notes: list[str]) -> EngineService:
    env = _environment(name, spec.get("environment"), notes)
    replicas = (spec.get("deploy") or {}).get("replicas", spec.get("scale", 1))
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 16:
        raise ValueError("deploy.replicas", f"replicas must be a whole number from 1 to 16, not {replicas!r}")
    if spec.get("env_file"):
        notes.append(f"services.{name}.env_file: not read; QUEUE_PRIORITY and CONVERSION_PRIORITY are taken "
                     "from 'environment' only")
    conversion = env.get("CONVERSION_PRIORITY", "").split()
    if conversion and kind != "worker":
        notes.append(f"services.{name}: CONVERSION_PRIORITY on an explorer is ignored (only workers read it)")
        conversion = []
    return EngineService(name, kind, env.get("QUEUE_PRIORITY", "").split(), conversion, replicas)


def _environment(name: str, value: Any, notes: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        pairs = [str(item).partition("=") for item in value]
        env = {key: text for key, _, text in pairs}
    elif isinstance(value, dict):
        env = {str(k): "" if v is None else str(v) for k, v in value.items()}
    else:
        raise ValueError("environment", "must be a list of KEY=VALUE or a mapping")
    return {key: _interpolate(text, f"services.{name}.environment.{key}", notes) for key, text in env.items()}


def _interpolate(text: str, where: str, notes: list[str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$VAR``, from os.environ."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        current = os.environ.get(name)
        if op == ":-" and not current or op == "-" and current is None:
            return default
        if current is None:
            notes.append(f"{where}: ${{{name}}} is not set here; read as empty")
            return ""
        return current
    return _VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def load_clients(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeploymentError(path, [("", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeploymentError(path, [("", f"cannot read: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise DeploymentError(path, [(f"line {exc.lineno}", f"not JSON: {exc.msg}")]) from None
    if not isinstance(data, list) or not data:
        raise DeploymentError(path, [("", "a client export is a non-empty JSON list of client objects")])
    problems = []
    clients = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not entry.get("name"):
            problems.append((f"[{index}]", "each client is an object with at least a 'name'"))
            continue
        clients.append({k: str(entry[k]) for k in CLIENT_FIELDS if entry.get(k)})
    if problems:
        raise DeploymentError(path, problems)
    return clients


def to_scenario_data(deployment: Deployment) -> dict[str, Any]:
    """The scenario skeleton: the deployment's stages and clients, one full and one delta scan per client."""
    clients = [dict(c, name=_name(c["name"])) for c in deployment.clients] or [{"name": "default"}]
    if deployment.per_scan:
        clients = [dict(c, per_scan=True) for c in clients]
    stages = []
    for service in deployment.services:
        stage: dict[str, Any] = {"name": _name(service.service), "kind": service.kind}
        if service.queue_priority:
            stage["queue_priority"] = " ".join(service.queue_priority)
        if service.conversion_priority:
            stage["conversion_priority"] = " ".join(service.conversion_priority)
        if service.replicas != 1:
            stage["replicas"] = service.replicas
        stages.append(stage)
    via = "explorer" if any(s.kind == "explorer" for s in deployment.services) else "conversions"
    workload = [{"client": c["name"], "mode": mode, "objects": 20, "via": via}
                for c in clients for mode in ("full", "delta")]
    source = deployment.path.name + (f" and {deployment.clients_path.name}" if deployment.clients_path else "")
    return {"name": _name(deployment.path.stem), "description": f"Imported from {source}; the workload is a "
            "skeleton (one full and one delta scan per client): edit it to reproduce what you saw.",
            "clients": clients, "stages": stages, "workload": workload}


def to_scenario(deployment: Deployment) -> Scenario:
    try:
        return parse_scenario(to_scenario_data(deployment), deployment.path)
    except ScenarioError as exc:
        raise DeploymentError(deployment.path, [(_compose_field(deployment, loc), reason)
                                                for loc, reason in exc.problems]) from None


def to_yaml(deployment: Deployment) -> str:
    header = [f"# Generated by: python -m harness import {deployment.path}"
              + (f" --clients {deployment.clients_path}" if deployment.clients_path else "")]
    header += [f"# skipped {line}" for line in deployment.skipped] + [f"# note: {line}" for line in deployment.notes]
    body = yaml.safe_dump(to_scenario_data(deployment), sort_keys=False, width=100)
    return "\n".join(header) + "\n" + body


def compose_field(deployment: Deployment, scenario_field: str | None) -> str | None:
    """A scenario field path (``stages.1.queue_priority.2``) as the deployment's own file and field."""
    return None if scenario_field is None else _compose_field(deployment, scenario_field)


def _compose_field(deployment: Deployment, loc: str) -> str:
    parts = loc.split(".")
    if parts[0] == "stages" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(deployment.services):
        service = deployment.services[int(parts[1])].service
        renamed = {"queue_priority": "environment.QUEUE_PRIORITY", "conversion_priority":
                   "environment.CONVERSION_PRIORITY", "replicas": "deploy.replicas"}
        key = ".".join([renamed.get(parts[2], parts[2]), *parts[3:]]) if len(parts) > 2 else ""
        return f"{deployment.path.name}: services.{service}" + (f".{key}" if key else "")
    if parts[0] == "clients" and len(parts) > 1 and deployment.clients_path:
        return f"{deployment.clients_path.name}: [{parts[1]}]" + (f".{'.'.join(parts[2:])}" if len(parts) > 2 else "")
    return loc


def _name(text: str) -> str:
    """A scenario name (letters, digits, '_', '-') from a service or client name."""
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")[:64] or "unnamed"


def is_compose_file(path: Path) -> bool:
    """A YAML file whose top level has 'services' (and no 'stages'): a compose file, not a scenario."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "services" in data and "stages" not in data
