"""Scenario files: one YAML file says everything about a run.

The model is pydantic; ``load_scenario`` reads a file with a safe loader and
turns every problem into a ``ScenarioError`` that names the file, the field
path and the reason, never a traceback. ``python -m harness schema`` prints
the JSON Schema for editors.

Field paths are dotted, with list indexes: ``stages.0.kind``,
``workload.2.when.queue``, ``faults.1.params.seconds``. Problems found in
one file are all reported together.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from harness.checkers.registry import clause_ids
from harness.faults import HARNESS_FAULTS, param_problem
from harness.messages import DEFAULT_CONVERSION_QUEUE, DEFAULT_EXPLORER_QUEUE, OUTPUT_QUEUES

# Every clause id of SPEC.md (the registry's); checks.clauses and checks.expect_fail must name these.
CLAUSE_IDS = clause_ids()
FAULT_KINDS = tuple(HARNESS_FAULTS)

# Set by the stage launcher; a scenario may not override them through a stage's env.
RESERVED_ENV = ("QUEUE_PRIORITY", "CONVERSION_PRIORITY", "OS2DS_ENGINE_USER_CONFIG_PATH")


def _queue_name(value: str) -> str:
    if value.startswith("amq."):
        raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
    return value


QueueName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:\-]+$"),
                      AfterValidator(_queue_name)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
Seconds = Annotated[float, Field(ge=0.0)]
# A per-scan queue's tag (ENGINE_CONTRACT.md section 7: exact, case-sensitive words).
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
_TAG = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Names of phases and faults, for triggers and reports: free text such as "burst into middle".
Label = Annotated[str, Field(min_length=1, max_length=80, pattern=r"^\S(.*\S)?$")]


class Strict(BaseModel):
    # extra="forbid": a typo such as ``queue_prioirty`` is an error, not a silently ignored key.
    # strict=True: YAML types are taken as written ("10" is not a number, true is not 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class Client(Strict):
    """A tenant, with OS2datascanner's four queue fields and their defaults."""

    name: Name
    organisation: Annotated[str, Field(min_length=1, max_length=200)] | None = None  # Faker when absent
    explorer_full_queue: QueueName = DEFAULT_EXPLORER_QUEUE
    explorer_delta_queue: QueueName = DEFAULT_EXPLORER_QUEUE
    conversion_full_queue: QueueName = DEFAULT_CONVERSION_QUEUE
    conversion_delta_queue: QueueName = DEFAULT_CONVERSION_QUEUE
    # true: every scan of this client gets a per-scan queue (OS2datascanner 3.32), tagged as the admin
    # tags it (delta for a scan with a cutoff, else full); a phase's own per_scan overrides it.
    per_scan: bool = False


RESTART_POLICIES = ("no", "on-failure", "always")


class Restart(Strict):
    """A restart policy, as Docker's: ``on-failure`` starts an instance again after a non-zero exit,
    ``always`` after any exit the harness did not cause; ``limit`` restarts per instance, the
    ``backoff`` doubling after each (capped at MAX_BACKOFF)."""

    policy: Literal["no", "on-failure", "always"] = "no"
    limit: Annotated[int, Field(ge=0, le=100)] = 3
    backoff: Annotated[float, Field(ge=0.0, le=60.0)] = 1.0

    @field_validator("policy", mode="before")
    @classmethod
    def yaml_no_is_no(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted ``no`` as false.
        return "no" if value is False else value

    @property
    def supervised(self) -> bool:
        return self.policy != "no"


MAX_BACKOFF = 30.0


def parse_restart(text: str) -> Restart:
    """``POLICY[:LIMIT[:BACKOFF]]`` as the --engine-restart option takes it, e.g. ``on-failure:5:0.5``."""
    policy, *rest = text.strip().split(":")
    if policy not in RESTART_POLICIES or len(rest) > 2:
        raise ValueError(f"expected POLICY[:LIMIT[:BACKOFF]] with POLICY one of {', '.join(RESTART_POLICIES)}, "
                         f"got {text!r}")
    fields: dict[str, Any] = {"policy": policy}
    try:
        if rest:
            fields["limit"] = int(rest[0])
        if len(rest) > 1:
            fields["backoff"] = float(rest[1])
        return Restart(**fields)
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"expected POLICY[:LIMIT[:BACKOFF]] (LIMIT 0..100 restarts, BACKOFF 0..60 s), "
                         f"got {text!r}") from exc


class Stage(Strict):
    """One engine process kind with its QUEUE_PRIORITY; ``replicas`` copies are started.

    ``restart`` is the stage's restart policy; absent, the run's default (--engine-restart) applies."""

    name: Name
    kind: Literal["explorer", "worker"]
    queue_priority: list[QueueName] = []
    conversion_priority: list[Tag] = []  # CONVERSION_PRIORITY (workers): per-scan tags, first = highest
    replicas: Annotated[int, Field(ge=1, le=16)] = 1
    env: dict[str, str] = {}
    start: Literal["immediately", "after_workload"] = "immediately"
    restart: Restart | None = None

    @field_validator("queue_priority", "conversion_priority", mode="before")
    @classmethod
    def split_string(cls, value: Any) -> Any:
        # Written as the engine reads it: one whitespace-separated string.
        if isinstance(value, str):
            return value.split()
        return value

    @field_validator("env", mode="before")
    @classmethod
    def env_values_are_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v if isinstance(v, str) or isinstance(v, (dict, list)) or v is None else str(v)
                    for k, v in value.items()}
        return value

    @field_validator("env")
    @classmethod
    def env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"@{key}: not a valid environment variable name")
            if key in RESERVED_ENV:
                hint = {"QUEUE_PRIORITY": "use the stage's queue_priority",
                        "CONVERSION_PRIORITY": "use the stage's conversion_priority"}.get(key, "the harness sets it")
                raise ValueError(f"@{key}: may not be set in env ({hint})")
        return value

    @model_validator(mode="after")
    def tags_for_workers(self) -> "Stage":
        if self.conversion_priority and self.kind != "worker":
            raise ValueError("@conversion_priority: only workers read CONVERSION_PRIORITY (per-scan queues)")
        return self

    @property
    def priority(self) -> list[str]:
        """QUEUE_PRIORITY as SPEC.md reads it: duplicates dropped, first kept."""
        return list(dict.fromkeys(self.queue_priority))

    @property
    def read_queues(self) -> list[str]:
        if self.priority:
            return self.priority
        return [DEFAULT_EXPLORER_QUEUE if self.kind == "explorer" else DEFAULT_CONVERSION_QUEUE]


class Duration(Strict):
    """How long, in seconds or in windows W (the check period plus tolerance of the run)."""

    seconds: Annotated[float, Field(gt=0, le=3600)] | None = None
    windows: Annotated[float, Field(gt=0, le=600)] | None = None

    @model_validator(mode="after")
    def one_unit(self) -> "Duration":
        if (self.seconds is None) == (self.windows is None):
            raise ValueError("@windows: give either 'seconds' or 'windows' (multiples of W), not both or neither")
        return self

    def resolve(self, window: float) -> float:
        """Seconds, with ``window`` = the run's W."""
        return self.seconds if self.seconds is not None else self.windows * window

    def describe(self) -> str:
        return f"{self.seconds:g} s" if self.seconds is not None else f"{self.windows:g} W"


class Trigger(Strict):
    """A state of the run, observed at the broker; every condition given must hold at once.

    - ``queue`` + ``ready_at_least``: that queue holds at least so many ready messages;
    - ``stage`` + ``consuming``: the stage (any replica, or one instance such as ``worker#2``)
      holds a consumer on that queue;
    - ``stage`` + ``consuming_tag`` (OS2datascanner 3.32): the stage holds a consumer on a live
      per-scan queue of this scenario announced with that tag (``full``, ``delta``, a forced tag);
    - ``after``: the phase or fault of that name has happened (a phase has published everything,
      or its hold has ended; a fault has been applied);
    - ``for``: the other conditions have held without a break for so long (``{windows: 1}``:
      through at least one of the engine's checks).
    """

    queue: QueueName | None = None
    ready_at_least: Annotated[int, Field(ge=1)] | None = None
    stage: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    consuming: QueueName | None = None
    consuming_tag: Tag | None = None
    after: Label | None = None
    held_for: Duration | None = Field(None, alias="for")

    @model_validator(mode="after")
    def pairs(self) -> "Trigger":
        problems = []
        if (self.queue is None) != (self.ready_at_least is None):
            problems.append("@ready_at_least: 'queue' and 'ready_at_least' go together" if self.queue is not None
                            else "@queue: 'ready_at_least' needs the 'queue' it counts")
        consumed = [key for key in ("consuming", "consuming_tag") if getattr(self, key) is not None]
        if self.stage is not None and len(consumed) != 1:
            problems.append("@consuming: 'stage' needs the queue it is 'consuming' (or the 'consuming_tag' of a "
                            "per-scan queue), one of the two" if not consumed
                            else "@consuming_tag: give 'consuming' or 'consuming_tag', not both")
        if self.stage is None and consumed:
            problems.append(f"@stage: '{consumed[0]}' needs the 'stage' that consumes")
        if self.queue is None and self.stage is None and self.after is None and not consumed:
            problems.append("@queue: a trigger needs a condition: queue + ready_at_least, stage + consuming "
                            "(or consuming_tag), or after")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def queues(self) -> list[str]:
        return [q for q in (self.queue, self.consuming) if q is not None]


class Hold(Duration):
    """Keep a queue non-empty for a while, topping it up at whatever pace the engine consumes it.

    The harness reads the queue's ready count as the observer samples it and publishes more work
    whenever it drops below the target, so a fast and a slow engine meet the same situation.
    """

    queue: QueueName | None = None  # the queue the phase publishes into; written out for readers
    depth_at_least: Annotated[int, Field(ge=1, le=10_000)] = 10


class Phase(Strict):
    """Part of the workload: scans of one client, published when due.

    A phase is due once ``at`` seconds have passed since the stages consume AND its ``when`` trigger
    holds (schedule.is_due, the one rule for phases and faults): ``at`` means "not before", never a
    delay counted from the trigger. What it publishes is one of:
    - ``scans`` scans of ``objects`` objects each (fixed counts);
    - a backlog ``lasting`` a given time at the measured pace of the stage that drains it (its
      stage starts after the workload; the harness measures that stage's pace first);
    - a ``hold``: the phase's queue is kept non-empty for a while, topped up closed-loop.
    """

    name: Label | None = None
    client: Name
    mode: Literal["full", "delta"] = "full"
    scans: Annotated[int, Field(ge=1, le=1000)] = 1
    objects: Annotated[int, Field(ge=0, le=100_000)] = 10
    cpr_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    at: Seconds = 0.0
    when: Trigger | None = None
    rate: Annotated[float, Field(gt=0, le=1_000_000)] | None = None  # messages per second; None = as fast as possible
    via: Literal["explorer", "conversions"] = "explorer"
    old_files: Annotated[int, Field(ge=0, le=100_000)] | None = None  # delta: files before the cutoff; default objects // 2
    lasting: Duration | None = None
    hold: Hold | None = None
    # Per-scan routing (OS2datascanner 3.32): true = each scan gets its own queue, tagged as the admin
    # tags it (delta / full from the mode); a tag = the same with that tag forced; false = the client's
    # conversion queues even when the client is per_scan; absent = the client's per_scan decides.
    per_scan: bool | Tag | None = None

    @field_validator("per_scan", mode="before")
    @classmethod
    def per_scan_value(cls, value: Any) -> Any:
        # One reason instead of pydantic's one per member of the union.
        if value is None or isinstance(value, bool) or (isinstance(value, str) and _TAG.fullmatch(value)):
            return value
        raise ValueError(f"true, false or a tag (one word of letters, digits, '_' or '-'), not {value!r}")

    @model_validator(mode="after")
    def consistent(self) -> "Phase":
        problems = []
        if self.old_files is not None and self.mode != "delta":
            problems.append("@old_files: only a delta phase has files before a cutoff")
        if self.scans * max(self.objects, 1) > 1_000_000:
            problems.append(f"@objects: {self.scans} scans of {self.objects} objects is more than 1000000 files")
        if self.hold is not None and self.lasting is not None:
            problems.append("@hold: give either 'hold' (keep a queue filled) or 'lasting' (a sized backlog), not both")
        sized_by_harness = "hold" if self.hold is not None else "lasting" if self.lasting is not None else None
        if sized_by_harness:
            for key in ("scans", "rate") + (("objects",) if self.via == "conversions" else ()):
                if key in self.model_fields_set:
                    problems.append(f"@{key}: a phase with '{sized_by_harness}' decides how much to publish; "
                                    f"leave out '{key}'" + (" (with via: explorer, 'objects' is per scan spec)"
                                                             if key == "objects" else ""))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def sized(self) -> bool:
        """The harness decides how much this phase publishes (hold or lasting)."""
        return self.hold is not None or self.lasting is not None


class Fault(Strict):
    """A disturbance, due as a phase is: ``at`` seconds in, once its ``when`` trigger holds.

    ``kind`` is one of harness.faults.HARNESS_FAULTS (``python -m harness faults`` lists them with
    what ``target`` names and the ``params`` each takes).
    """

    name: Label | None = None
    kind: Literal[FAULT_KINDS]  # type: ignore[valid-type]
    at: Seconds = 0.0
    when: Trigger | None = None
    target: Annotated[str, Field(min_length=1)] | None = None
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def target_and_params(self) -> "Fault":
        problems = []
        wants = HARNESS_FAULTS[self.kind].target
        if wants and self.target is None:
            problems.append(f"@target: {self.kind} needs a target {wants}")
        elif not wants and self.target is not None:
            problems.append(f"@target: {self.kind} takes no target")
        for key, value in self.params.items():
            problem = param_problem(self.kind, key, value)
            if problem:
                problems.append(f"@params.{key}: {problem}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


ClauseId = Annotated[str, AfterValidator(lambda v: _clause_id(v))]


def _clause_id(value: str) -> str:
    if value not in CLAUSE_IDS:
        close = difflib.get_close_matches(value, CLAUSE_IDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(CLAUSE_IDS)}"
        raise ValueError(f"unknown clause id {value!r}{hint}")
    return value


class Checks(Strict):
    """Which clauses to judge and the windows of SPEC.md. None = take the command-line/ini value."""

    clauses: list[ClauseId] | None = None  # None = every clause that applies
    expect_fail: list[ClauseId] = []  # clause ids this scenario is expected to fail (fault demos)
    check_period: Annotated[float, Field(gt=0)] | None = None
    tolerance: Annotated[float, Field(ge=0)] | None = None
    grace: Annotated[float, Field(gt=0)] | None = None
    drain: bool = False
    allow_duplicates: bool = False


class Admin(Strict):
    """The harness's part as OS2datascanner's admin and status collector (per-scan queues)."""

    rebroadcast_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0  # R: live queues announced again


class BrokerSettings(Strict):
    """How the deployment's broker is set up for this scenario's vhost."""

    # Queues declared without x-queue-type (as OS2datascanner's engine and admin declare theirs) get
    # this type: the vhost's default queue type. quorum: replicated, so on a cluster they outlive a node.
    default_queue_type: Literal["classic", "quorum"] = "classic"


class Scenario(Strict):
    name: Name | None = None
    description: str = ""
    markers: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = []
    seed: Annotated[int, Field(ge=0)] = 0
    time_limit: Annotated[float, Field(gt=0, le=3600)] = 120.0
    clients: Annotated[list[Client], Field(min_length=1)]
    stages: Annotated[list[Stage], Field(min_length=1)]
    workload: list[Phase] = []
    faults: list[Fault] = []
    admin: Admin = Admin()
    broker: BrokerSettings = BrokerSettings()
    checks: Checks = Checks()

    @model_validator(mode="after")
    def names_are_known(self) -> "Scenario":
        problems: list[str] = []
        clients = [c.name for c in self.clients]
        stages = [s.name for s in self.stages]
        problems += _duplicates(clients, "clients", "name")
        problems += _duplicates(stages, "stages", "name")
        named = [(f"workload.{i}", p.name) for i, p in enumerate(self.workload) if p.name] + \
                [(f"faults.{i}", f.name) for i, f in enumerate(self.faults) if f.name]
        seen_names: set[str] = set()
        for where, name in named:
            if name in seen_names:
                problems.append(f"@{where}.name: duplicate {name!r} (phases and faults share one set of names)")
            seen_names.add(name)
        queues = set(self.queues) | set(OUTPUT_QUEUES)
        instances = {s.name: s.replicas for s in self.stages}
        tags = {tag for phase in self.workload if phase.client in clients
                for tag in [self.per_scan_tag(phase)] if tag is not None}
        for index, phase in enumerate(self.workload):
            where = f"workload.{index}"
            if phase.client not in clients:
                problems.append(f"@{where}.client: unknown client {phase.client!r}{_known(phase.client, clients)}")
            else:
                problems += self._sizing_problems(where, phase)
            problems += _trigger_problems(f"{where}.when", phase.when, queues, instances, seen_names, phase.name, tags)
            if phase.at >= self.time_limit:
                problems.append(f"@{where}.at: {phase.at:g} s is not before the time limit ({self.time_limit:g} s)")
            if phase.via == "explorer" and not any(s.kind == "explorer" for s in self.stages):
                problems.append(f"@{where}.via: the scan specs need an explorer stage and the scenario has none; "
                                "use 'via: conversions' to fill conversion queues directly")
        for index, fault in enumerate(self.faults):
            where = f"faults.{index}"
            wants = HARNESS_FAULTS[fault.kind].target
            if wants == "stage" and fault.target is not None and not _is_stage(fault.target, instances):
                problems.append(f"@{where}.target: unknown stage {fault.target!r}{_known(fault.target, stages)}")
            if wants == "client" and fault.target is not None and fault.target not in clients:
                problems.append(f"@{where}.target: unknown client {fault.target!r}{_known(fault.target, clients)}")
            if wants == "phase" and fault.target is not None:
                problems += self._phase_target_problems(where, fault.target)
            if wants == "queue" and fault.target is not None and fault.target not in queues:
                problems.append(f"@{where}.target: {fault.target!r} is not a queue of this scenario"
                                f"{_known(fault.target, sorted(queues))}")
            problems += _trigger_problems(f"{where}.when", fault.when, queues, instances, seen_names, fault.name, tags)
            if fault.at >= self.time_limit:
                problems.append(f"@{where}.at: {fault.at:g} s is not before the time limit ({self.time_limit:g} s)")
        for field_name in ("clauses", "expect_fail"):
            ids = getattr(self.checks, field_name) or []
            problems += _duplicates(ids, f"checks.{field_name}", None)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _phase_target_problems(self, where: str, target: str) -> list[str]:
        """A fault that acts on a phase's per-scan queue names a phase routed per scan."""
        names = [p.name for p in self.workload if p.name]
        phase = next((p for p in self.workload if p.name == target), None)
        if phase is None:
            return [f"@{where}.target: no workload phase is named {target!r}{_known(target, names)}"]
        if self.per_scan_tag(phase) is None:
            return [f"@{where}.target: phase {target!r} is not routed per scan, so it has no per-scan queue "
                    "(set per_scan on the phase or its client)"]
        return []

    def _sizing_problems(self, where: str, phase: "Phase") -> list[str]:
        """A hold keeps the phase's own queue filled; a lasting backlog needs the stage that drains it."""
        if self.per_scan_tag(phase) is not None:
            return self._per_scan_problems(where, phase)
        target = self.target_queue(phase)
        problems = []
        if phase.hold is not None and phase.hold.queue not in (None, target):
            problems.append(f"@{where}.hold.queue: this phase publishes into {target!r}; a hold keeps its own "
                            f"queue filled, not {phase.hold.queue!r}")
        if phase.lasting is not None and not self.drained_by(target):
            problems.append(f"@{where}.lasting: a lasting backlog is sized from the pace of the stage that drains "
                            f"it, and no stage with 'start: after_workload' reads {target!r}")
        return problems

    def _per_scan_problems(self, where: str, phase: "Phase") -> list[str]:
        problems = []
        if phase.lasting is not None:
            problems.append(f"@{where}.lasting: a lasting backlog is sized on a vhost of its own, without the "
                            "admin that per-scan routing needs; use scans or a hold with per_scan")
        if phase.hold is not None and phase.hold.queue is not None:
            problems.append(f"@{where}.hold.queue: the admin names a per-scan queue when its scan starts; leave "
                            "out hold.queue (a hold of conversions keeps its first scan's queue filled)")
        return problems

    def target_queue(self, phase: "Phase") -> str:
        """The queue a phase publishes into: its client's explorer queue, or conversion queue (via conversions)."""
        client = self.client(phase.client)
        if phase.via == "conversions":
            return client.conversion_delta_queue if phase.mode == "delta" else client.conversion_full_queue
        return client.explorer_delta_queue if phase.mode == "delta" else client.explorer_full_queue

    def drained_by(self, queue: str) -> list["Stage"]:
        """Stages that start after the workload and read ``queue`` (the drain's stages)."""
        return [s for s in self.stages if s.start == "after_workload" and queue in s.read_queues]

    def client(self, name: str) -> Client:
        return next(c for c in self.clients if c.name == name)

    def per_scan_tag(self, phase: "Phase") -> str | None:
        """The tag a phase's scans are announced with when routed per scan, else None."""
        routed = self.client(phase.client).per_scan if phase.per_scan is None else phase.per_scan
        if routed is False:
            return None
        return phase.mode if routed is True else routed

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def queues(self) -> list[str]:
        """Every queue the scenario names (clients' fields and stages' read queues), in a stable order."""
        names: list[str] = []
        for client in self.clients:
            names += [client.explorer_full_queue, client.explorer_delta_queue,
                      client.conversion_full_queue, client.conversion_delta_queue]
        for stage in self.stages:
            names += stage.read_queues
        return list(dict.fromkeys(names))


def _trigger_problems(where: str, trigger: Trigger | None, queues: set[str], instances: dict[str, int],
                      names: set[str], own_name: str | None, tags: set[str]) -> list[str]:
    if trigger is None:
        return []
    problems = [f"@{where}.{key}: {queue!r} is not a queue of this scenario, so the trigger would never fire"
                f"{_known(queue, sorted(queues))}"
                for key, queue in (("queue", trigger.queue), ("consuming", trigger.consuming))
                if queue is not None and queue not in queues]
    if trigger.stage is not None and not _is_stage(trigger.stage, instances):
        problems.append(f"@{where}.stage: unknown stage {trigger.stage!r}{_known(trigger.stage, list(instances))}")
    if trigger.consuming_tag is not None and trigger.consuming_tag not in tags:
        problems.append(f"@{where}.consuming_tag: no phase of this scenario is routed per scan with tag "
                        f"{trigger.consuming_tag!r}, so the trigger would never fire{_known(trigger.consuming_tag, sorted(tags))}")
    if trigger.after is not None:
        if trigger.after == own_name:
            problems.append(f"@{where}.after: {trigger.after!r} would wait for itself")
        elif trigger.after not in names:
            problems.append(f"@{where}.after: no phase or fault is named {trigger.after!r}"
                            f"{_known(trigger.after, sorted(names))}")
    return problems


def _is_stage(target: str, instances: dict[str, int]) -> bool:
    """A stage name, or one replica of it as the history names them (``worker#2``)."""
    if target in instances:
        return True
    name, _, number = target.partition("#")
    return name in instances and number.isdigit() and 1 <= int(number) <= instances[name]


def _known(value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(names)}" if names else ""


def _duplicates(names: list[str], where: str, field: str | None) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            path = f"{where}.{index}.{field}" if field else f"{where}.{index}"
            problems.append(f"@{path}: duplicate {name!r}")
        seen.add(name)
    return problems


class ScenarioError(Exception):
    """A scenario file that cannot be used. ``str()`` is the message for the user."""

    heading = "invalid scenario"

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems  # (field path, reason)
        lines = [f"{self.path}: {self.heading}"]
        lines += [f"  {loc or '<file>'}: {reason}" for loc, reason in problems]
        super().__init__("\n".join(lines))

    @property
    def fields(self) -> list[str]:
        return [loc for loc, _ in self.problems]


def _loc(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _all_fields() -> list[str]:
    names: set[str] = set()
    for model in (Scenario, Client, Stage, Trigger, Duration, Hold, Phase, Fault, Checks, Admin):
        names |= set(model.model_fields)
    return sorted(names)


_PATTERN_REASONS = {
    r"^[A-Za-z0-9_.:\-]+$": "a queue name is one word of letters, digits, '_', '.', ':' or '-'",
    r"^[A-Za-z0-9_\-]+$": "a name is one word of letters, digits, '_' or '-'",
    r"^[A-Za-z_][A-Za-z0-9_]*$": "a marker is a Python identifier",
    r"^\S(.*\S)?$": "a phase or fault name is text without leading or trailing blanks",
}


def _problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        message = error["msg"]
        loc = _loc(error["loc"])
        if error["type"] == "extra_forbidden":
            key = str(error["loc"][-1])
            close = difflib.get_close_matches(key, _all_fields(), n=1, cutoff=0.75)
            message = f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "string_pattern_mismatch":
            pattern = (error.get("ctx") or {}).get("pattern", "")
            message = _PATTERN_REASONS.get(pattern, message) + f", not {error['input']!r}"
        if message.startswith("Value error, "):
            # Errors raised in validators: one per line, each "@relative.path: reason".
            for line in message[len("Value error, "):].splitlines():
                where = loc
                if line.startswith("@") and ": " in line:
                    rel, line = line[1:].split(": ", 1)
                    where = f"{loc}.{rel}" if loc else rel
                problems.append((where, line))
            continue
        problems.append((loc, message))
    return problems


def parse_scenario(data: Any, path: Path | str = "<scenario>") -> Scenario:
    if data is None:
        raise ScenarioError(path, [("", "the file is empty; a scenario needs at least clients and stages")])
    if not isinstance(data, dict):
        raise ScenarioError(path, [("", f"the top level must be a mapping of keys, not a {type(data).__name__}")])
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ScenarioError(path, [(str(bad_keys[0]), "keys must be text")])
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(path, _problems_of(exc)) from None
    if scenario.name is None:
        scenario.name = Path(str(path)).stem
    return scenario


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let PyYAML report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario file; any problem is a ``ScenarioError`` (file, field path, reason)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(path, [("", "no such file")]) from None
    except IsADirectoryError:
        raise ScenarioError(path, [("", "is a directory, not a scenario file")]) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, [("", f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    except OSError as exc:
        raise ScenarioError(path, [("", f"cannot read: {exc.strerror}")]) from None
    try:
        # A safe loader only: tags such as !!python/object are refused, never constructed.
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - _UniqueKeyLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if "could not determine a constructor" in problem:
            problem += " (only plain YAML is allowed: no !!python or custom tags)"
        raise ScenarioError(path, [(where, f"not valid YAML: {problem}")]) from None
    return parse_scenario(data, path)


def json_schema() -> dict[str, Any]:
    return Scenario.model_json_schema()
