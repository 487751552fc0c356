"""Settings, read the way OS2datascanner's run_stage reads them.

- ``QUEUE_PRIORITY``: whitespace-separated queue names (commas are not
  separators); duplicates dropped keeping the first; empty = feature off.
- ``OS2DS_ENGINE_USER_CONFIG_PATH``: a TOML file with an ``[amqp]`` table
  (``AMQP_HOST``, ``AMQP_PORT``, ``AMQP_USER``, ``AMQP_PWD``, ``AMQP_VHOST``)
  and optionally a top-level ``LOG_LEVEL``. Must be set.
- ``<table>__<KEY>`` environment variables override keys of the file, e.g.
  ``amqp__AMQP_HOST``.
- ``CONVERSION_PRIORITY`` (workers, OS2datascanner 3.32): whitespace-separated tags of per-scan
  queues, highest first (exact, case-sensitive); empty = every tag allowed, no per-scan priority.
- ``PRIORITY_CHECK_SECONDS`` (default 5, fractions allowed),
  ``REFERENCE_WORK_SECONDS`` (default 0), ``REFERENCE_ENGINE_FAULTS``.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Mapping

from .faults import parse_faults

STAGES = ("explorer", "worker")
DEFAULT_READ_QUEUE = {"explorer": "os2ds_scan_specs", "worker": "os2ds_conversions"}
OUTPUT_QUEUES = {
    "explorer": ("os2ds_problems", "os2ds_status", "os2ds_scan_specs", "os2ds_checkups",
                 "os2ds_conversions"),
    "worker": ("os2ds_matches", "os2ds_checkups", "os2ds_problems", "os2ds_metadata",
               "os2ds_status"),
}
PREFETCH = {"explorer": 1, "worker": 2}
AMQP_DEFAULTS = {"AMQP_HOST": "localhost", "AMQP_PORT": 5672, "AMQP_USER": "guest",
                 "AMQP_PWD": "guest", "AMQP_VHOST": "/"}

ENV_HELP = """\
environment:
  OS2DS_ENGINE_USER_CONFIG_PATH  TOML file with an [amqp] table: AMQP_HOST, AMQP_PORT,
                                 AMQP_USER, AMQP_PWD, AMQP_VHOST (required); optional
                                 top-level LOG_LEVEL (DEBUG, INFO, WARNING, ...)
  amqp__AMQP_HOST, amqp__AMQP_PORT, amqp__AMQP_USER, amqp__AMQP_PWD, amqp__AMQP_VHOST
                                 override the file's keys (<table>__<KEY>)
  LOG_LEVEL                      overrides the file's LOG_LEVEL (default INFO)
  QUEUE_PRIORITY                 whitespace-separated queues, highest priority first;
                                 empty or unset = consume the default read queue
                                 (explorer os2ds_scan_specs, worker os2ds_conversions)
  CONVERSION_PRIORITY            workers: whitespace-separated tags of per-scan queues (e.g. 'delta full'),
                                 highest first; only announced queues with a listed tag are consumed,
                                 the highest tag with ready messages first. Empty or unset = every
                                 announced queue, no per-scan priority
  PRIORITY_CHECK_SECONDS         period of the priority check, QUEUE_PRIORITY and per-scan alike
                                 (default 5; fractions allowed)
  REFERENCE_WORK_SECONDS         extra time spent per handled message (default 0)
  REFERENCE_PREFETCH             prefetch per consumer (default: explorer 1, worker 2, as OS2datascanner)
  REFERENCE_ENGINE_FAULTS        comma-separated faults to inject on purpose
                                 (list: python -m reference_engine.faults)
"""


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which."""


def parse_queue_priority(value: str | None) -> list[str]:
    seen: list[str] = []
    for name in (value or "").split():
        if name not in seen:
            seen.append(name)
    return seen


def _positive_float(env: Mapping[str, str], name: str, default: float, allow_zero: bool) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ConfigError(f"{name}={raw!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


def _coerce(value: str):
    """An environment override parsed as a TOML value when it is one, else a string."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


_OVERRIDE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*?)__([A-Za-z][A-Za-z0-9_]*)$")


def load_settings_file(env: Mapping[str, str]) -> dict:
    path = env.get("OS2DS_ENGINE_USER_CONFIG_PATH")
    if not path:
        raise ConfigError("OS2DS_ENGINE_USER_CONFIG_PATH is not set (it must name a TOML file "
                          "with an [amqp] table)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read OS2DS_ENGINE_USER_CONFIG_PATH={path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for key, value in env.items():
        m = _OVERRIDE.match(key)
        if m:
            table, sub = m.groups()
            section = data.setdefault(table, {})
            if isinstance(section, dict):
                section[sub] = _coerce(value)
    return data


@dataclass
class Settings:
    stage: str
    amqp_host: str
    amqp_port: int
    amqp_user: str
    amqp_password: str
    amqp_vhost: str
    queue_priority: list[str]
    check_seconds: float = 5.0
    work_seconds: float = 0.0
    prefetch_override: int | None = None
    faults: frozenset[str] = field(default_factory=frozenset)
    log_level: str = "INFO"
    conversion_priority: list[str] = field(default_factory=list)  # per-scan tags, highest first (workers)

    @property
    def read_queues(self) -> list[str]:
        """The queues the priority rules manage (QUEUE_PRIORITY or the default read queue)."""
        return self.queue_priority or [DEFAULT_READ_QUEUE[self.stage]]

    @property
    def output_queues(self) -> tuple[str, ...]:
        return OUTPUT_QUEUES[self.stage]

    @property
    def prefetch(self) -> int:
        return self.prefetch_override or PREFETCH[self.stage]

    @property
    def effective_check_seconds(self) -> float:
        if "slow_check" in self.faults:
            return self.check_seconds * 6 + 2.0
        return self.check_seconds

    def has(self, fault: str) -> bool:
        return fault in self.faults


def _prefetch(env: Mapping[str, str]) -> int | None:
    raw = env.get("REFERENCE_PREFETCH")
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"REFERENCE_PREFETCH={raw!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise ConfigError(f"REFERENCE_PREFETCH={raw!r} must be between 1 and 1000")
    return value


def load_settings(stage: str, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    data = load_settings_file(env)
    amqp = {**AMQP_DEFAULTS, **(data.get("amqp") or {})}
    try:
        port = int(amqp["AMQP_PORT"])
    except (TypeError, ValueError):
        raise ConfigError(f"AMQP_PORT={amqp['AMQP_PORT']!r} is not a port number") from None
    try:
        faults = parse_faults(env.get("REFERENCE_ENGINE_FAULTS"))
    except ValueError as exc:
        raise ConfigError(f"REFERENCE_ENGINE_FAULTS: {exc}") from None
    log_level = str(env.get("LOG_LEVEL") or data.get("LOG_LEVEL") or "INFO").upper()
    return Settings(
        stage=stage,
        amqp_host=str(amqp["AMQP_HOST"]), amqp_port=port,
        amqp_user=str(amqp["AMQP_USER"]), amqp_password=str(amqp["AMQP_PWD"]),
        amqp_vhost=str(amqp["AMQP_VHOST"]),
        queue_priority=parse_queue_priority(env.get("QUEUE_PRIORITY")),
        check_seconds=_positive_float(env, "PRIORITY_CHECK_SECONDS", 5.0, allow_zero=False),
        work_seconds=_positive_float(env, "REFERENCE_WORK_SECONDS", 0.0, allow_zero=True),
        prefetch_override=_prefetch(env),
        faults=faults, log_level=log_level,
        conversion_priority=parse_queue_priority(env.get("CONVERSION_PRIORITY")) if stage == "worker" else [],
    )
