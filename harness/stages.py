"""The stage launcher: engine stages as real OS processes.

Each stage instance is started from the engine command template (``{stage}``
is replaced by ``explorer`` or ``worker``) with the engine's TOML config for
the test's vhost (``OS2DS_ENGINE_USER_CONFIG_PATH``) and its
``QUEUE_PRIORITY``, in a process group of its own, with stdout and stderr
captured to ``<report_dir>/stages/<instance>.log``. Nothing here knows which
engine runs (ENGINE_CONTRACT.md section 1).

Supervision: a stage under a restart policy (``stages[].restart`` or the run's
default) is started again, as Docker's ``restart: on-failure`` would, when it
exits on its own (not stopped or killed by the harness): after its backoff,
doubled for each restart of the instance, up to the policy's limit. Only an
exit the policy does not restart is returned by ``poll()``.

Processes are addressed only by their PID / process group id, never by name.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from harness.broker import stage_user
from harness.history import HistoryWriter
from harness.scenario import MAX_BACKOFF, Restart

DEFAULT_COMMAND = [sys.executable, "-m", "reference_engine.run_stage", "{stage}"]
TAIL_LINES = 40
_REPO_ROOT = Path(__file__).resolve().parent.parent


class StageStartError(RuntimeError):
    """A stage could not be started at all (command not found, not executable, bad template)."""


def describe_returncode(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {returncode})"
    return f"exit code {returncode}"


@dataclass
class StageExit:
    """A stage process that has exited."""

    name: str
    role: str
    pid: int
    returncode: int
    tail: str
    log_path: Path
    expected: bool = False  # stopped or killed by the harness itself
    supervisor: str | None = None  # 'restarting' or 'gave_up' under a restart policy, else None
    restarts: int = 0  # supervisor restarts of this instance before this exit

    def describe(self) -> str:
        lines = self.tail.rstrip("\n")
        after = ""
        if self.supervisor == "gave_up":
            after = f" after {self.restarts} supervisor restart{'s' if self.restarts != 1 else ''} (the policy's limit)"
        return (f"stage {self.name} (pid {self.pid}) exited early with {describe_returncode(self.returncode)}{after}; "
                f"last {TAIL_LINES} lines of {self.log_path}:\n{lines if lines else '(no output)'}")


class StageExited(Exception):
    """A stage exited while the scenario ran. ``str()`` names the instance, the exit code and its last lines."""

    def __init__(self, exits: StageExit | list[StageExit]):
        self.exits = [exits] if isinstance(exits, StageExit) else list(exits)
        super().__init__("\n\n".join(e.describe() for e in self.exits))

    @classmethod
    def from_exits(cls, exits: list[StageExit]) -> "StageExited":
        return cls(exits)


class StageProcess:
    """One running (or exited) stage instance."""

    def __init__(self, name: str, role: str, kind: str, argv: list[str], env: dict[str, str],
                 log_path: Path, config_path: Path, stage: Any):
        self.name = name
        self.role = role
        self.kind = kind
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.config_path = config_path
        self.stage = stage
        self.popen: subprocess.Popen | None = None
        self.started_at = 0.0
        self.reported = False  # stage_exited recorded
        self.expect_exit = False  # the harness stops or kills it on purpose
        self.restarts = 0  # by the supervisor (the restart policy), over the whole run
        self.restart_due: float | None = None  # monotonic time of the supervisor's next start

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else -1

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        return read_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"<StageProcess {self.name} pid={self.pid} rc={self.returncode}>"


# Terminal escape sequences (colours, cursor moves, window titles) that engines' loggers write:
# CSI "ESC [ ... final byte", OSC "ESC ] ... BEL or ESC \\", and two-byte escapes.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_escapes(text: str) -> str:
    return _ESCAPES.sub("", text)


def read_tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = strip_escapes(data.decode("utf-8", errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


def _register_group(pgid: int) -> None:
    try:
        from harness import watchdog
    except ImportError:
        return
    register = getattr(watchdog, "register_process_group", None)
    if register is not None:
        try:
            register(pgid)
        except Exception:  # the watchdog is a safety net, never a reason to fail a start
            pass


def _unregister_group(pgid: int) -> None:
    try:
        from harness import watchdog
    except ImportError:
        return
    unregister = getattr(watchdog, "unregister_process_group", None)
    if unregister is not None:
        try:
            unregister(pgid)
        except Exception:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Placeholders of an engine command template, filled per stage instance (StageLauncher.argv).
PLACEHOLDERS = {
    "stage": "explorer or worker",
    "instance": "the instance's name: worker, worker#2, ...",
    "config": "path of the instance's engine TOML config (also in OS2DS_ENGINE_USER_CONFIG_PATH)",
    "config_toml": "the text of that TOML config, for a command that must carry it elsewhere",
    "env_file": "path of a KEY=VALUE file with the instance's own variables (QUEUE_PRIORITY, "
                "CONVERSION_PRIORITY, --engine-env, the scenario's env, the config path): docker run --env-file",
}


def fill_placeholders(template: list[str], **values: str) -> list[str]:
    """The command for one instance: each ``{name}`` of PLACEHOLDERS replaced word by word, so that a
    config can travel to a container or another host."""
    words = []
    for part in template:
        for name, value in values.items():
            part = part.replace("{" + name + "}", value)
        words.append(part)
    return words


def write_env_file(path: Path, env: dict[str, str], own: set[str]) -> Path:
    """``{env_file}``: the instance's own variables (never the harness's environment), KEY=VALUE per line."""
    path.write_text("".join(f"{k}={env[k]}\n" for k in sorted(own) if k in env), encoding="utf-8")
    return path


class StageLauncher:
    """Starts, watches and stops the engine stages of one scenario run."""

    def __init__(self, command_template: list[str] | str | None, engine_env: dict[str, str] | None, broker,
                 vhost_name: str, report_dir: Path, history: HistoryWriter, observer=None,
                 default_restart: Restart | None = None, progress=None):
        if command_template is None or command_template == "" or command_template == []:
            command_template = list(DEFAULT_COMMAND)
            self._default = True
        else:
            self._default = False
        if isinstance(command_template, str):
            try:
                command_template = shlex.split(command_template)
            except ValueError as exc:
                raise StageStartError(f"engine command template {command_template!r} cannot be split: {exc}") from None
        if not command_template:
            raise StageStartError("the engine command template is empty")
        self.template = [str(part) for part in command_template]
        self.engine_env = dict(engine_env or {})
        self.broker = broker
        self.vhost = vhost_name
        self.report_dir = Path(report_dir)
        self.stage_dir = self.report_dir / "stages"
        self.history = history
        self.observer = observer
        self.default_restart = default_restart or Restart()
        self.say = progress or (lambda text: None)
        self.processes: dict[str, StageProcess] = {}
        self._users: dict[str, tuple[str, str]] = {}  # instance -> its broker user and password
        self._nodes: dict[str | None, tuple[str, int]] = {}  # instance -> the node (host, port) it connects to
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ start
    def argv(self, kind: str, **places: str) -> list[str]:
        return fill_placeholders(self.template, stage=kind, **places)

    def config(self, instance: str | None = None) -> dict[str, Any]:
        """The engine's TOML config; with ``instance``, that instance's own broker user."""
        user, password = self.stage_user(instance) if instance else (self.broker.user, self.broker.password)
        host, port = self.node_address(instance)
        return {"amqp": {
            "AMQP_HOST": host,
            "AMQP_PORT": port,
            "AMQP_USER": user,
            "AMQP_PWD": password,
            "AMQP_VHOST": self.vhost,
        }}

    def node_address(self, instance: str | None) -> tuple[str, int]:
        """The (host, AMQP port) an instance connects to: on a cluster, the nodes in turn, one instance each."""
        nodes = self.broker.node_addresses()
        with self._lock:
            if instance not in self._nodes:
                self._nodes[instance] = nodes[len(self._nodes) % len(nodes)]
            return self._nodes[instance]

    def stage_user(self, instance: str) -> tuple[str, str]:
        """The instance's own broker user (made once; deleted with the vhost): the observer ties the
        instance's connections to it by that user, wherever the instance runs."""
        with self._lock:
            if instance not in self._users:
                user, password = stage_user(self.vhost, instance), secrets.token_urlsafe(18)
                self.broker.management.create_user(user, password, self.vhost)
                self._users[instance] = (user, password)
            return self._users[instance]

    def environment(self, stage, config_path: Path) -> dict[str, str]:
        # The harness's own environment must not steer the stage to another broker or queue set:
        # the engine reads amqp__KEY overrides before its config file.
        env = {k: v for k, v in os.environ.items()
               if not k.lower().startswith("amqp__")
               and k not in ("QUEUE_PRIORITY", "CONVERSION_PRIORITY", "OS2DS_ENGINE_USER_CONFIG_PATH")}
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self._default:
            # The bundled engine runs from this checkout even when the package is not installed.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
        env["OS2DS_ENGINE_USER_CONFIG_PATH"] = str(config_path)
        # As written in the scenario (duplicates kept): the engine must cope with them itself.
        priority = " ".join(stage.queue_priority)
        if priority.strip():
            env["QUEUE_PRIORITY"] = priority
        tags = " ".join(stage.conversion_priority)
        if tags:
            env["CONVERSION_PRIORITY"] = tags
        env.update({k: str(v) for k, v in self.engine_env.items()})
        env.update({k: str(v) for k, v in (stage.env or {}).items()})
        # A wrapper that runs the stage elsewhere (harness.container) passes on these, not the host's.
        env["QP_STAGE_ENV"] = ",".join(sorted({*self.engine_env, *(stage.env or {})}))
        return env

    def start(self, stage) -> list[StageProcess]:
        """Start ``stage.replicas`` processes of ``stage``; instance names ``name``, ``name#2``, …"""
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        started: list[StageProcess] = []
        for index in range(stage.replicas):
            name = stage.name if index == 0 else f"{stage.name}#{index + 1}"
            with self._lock:
                if name in self.processes and self.processes[name].alive:
                    raise StageStartError(f"stage {name} is already running (pid {self.processes[name].pid})")
            config_path = self.stage_dir / f"{name}.toml"
            config_toml = tomli_w.dumps(self.config(name))
            config_path.write_text(config_toml, encoding="utf-8")
            env = self.environment(stage, config_path)
            own = {"QUEUE_PRIORITY", "CONVERSION_PRIORITY", "OS2DS_ENGINE_USER_CONFIG_PATH",
                   *self.engine_env, *(stage.env or {})}
            places = {"config": str(config_path), "config_toml": config_toml, "instance": name,
                      "env_file": str(write_env_file(self.stage_dir / f"{name}.env", env, own))}
            proc = StageProcess(name, stage.name, stage.kind, self.argv(stage.kind, **places), {},
                                self.stage_dir / f"{name}.log", config_path, stage)
            proc.env = env
            self._spawn(proc)
            started.append(proc)
        return started

    def _spawn(self, proc: StageProcess, supervisor_restart: int = 0) -> None:
        log = open(proc.log_path, "ab")
        try:
            if proc.log_path.stat().st_size:
                by = f" (supervisor restart {supervisor_restart})" if supervisor_restart else ""
                log.write(f"\n---- qp-harness: restarting {proc.name}{by} ----\n".encode())
                log.flush()
            proc.popen = subprocess.Popen(proc.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=proc.env, start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise StageStartError(f"cannot start stage {proc.name}: engine command {proc.argv[0]!r} not found "
                                  f"(command: {shlex.join(proc.argv)}); check --engine-cmd / engine_cmd") from None
        except PermissionError:
            raise StageStartError(f"cannot start stage {proc.name}: engine command {proc.argv[0]!r} is not executable "
                                  f"(command: {shlex.join(proc.argv)})") from None
        except OSError as exc:
            raise StageStartError(f"cannot start stage {proc.name}: {exc.strerror or exc} "
                                  f"(command: {shlex.join(proc.argv)})") from None
        finally:
            log.close()
        proc.started_at = time.time()
        proc.reported = False
        proc.expect_exit = False
        proc.restart_due = None
        _register_group(proc.pid)
        user = self._users.get(proc.name, (None,))[0]
        if self.observer is not None:
            self.observer.register_stage(proc.name, proc.pid, user)
        with self._lock:
            self.processes[proc.name] = proc
        stage = proc.stage
        self.history.record("stage_started", stage=proc.name, role=proc.role, kind=proc.kind, pid=proc.pid,
                            queue_priority=list(stage.priority), read_queues=list(stage.read_queues),
                            command=proc.argv, log=str(proc.log_path), supervisor_restart=supervisor_restart,
                            conversion_priority=list(stage.conversion_priority), broker_user=user)

    # ------------------------------------------------------------------ watch
    def poll(self, include_expected: bool = False) -> list[StageExit]:
        """Stages that exited since the last call (each reported once; ``stage_exited`` recorded).

        Exits the harness caused itself (``stop_all``, ``kill``, ``restart``) are recorded but
        only returned with ``include_expected``; exits the restart policy restarts are not
        returned (the instance is started again once its backoff has passed, by a later call).
        """
        exits: list[StageExit] = []
        with self._lock:
            self._start_due_restarts()
            for proc in list(self.processes.values()):
                if proc.reported or proc.popen is None or proc.popen.poll() is None:
                    continue
                exit_ = self._report(proc)
                if exit_.expected and not include_expected or exit_.supervisor == "restarting":
                    continue
                exits.append(exit_)
        return exits

    def restart_policy(self, stage) -> Restart:
        own = getattr(stage, "restart", None)
        return own if own is not None else self.default_restart

    def _supervise(self, proc: StageProcess, returncode: int) -> str | None:
        """What the restart policy does about this exit: 'restarting', 'gave_up' or None (not its business)."""
        policy = self.restart_policy(proc.stage)
        if proc.expect_exit or not policy.supervised or (policy.policy == "on-failure" and returncode == 0):
            return None
        if proc.restarts >= policy.limit:
            return "gave_up"
        proc.restarts += 1
        backoff = min(policy.backoff * 2 ** (proc.restarts - 1), max(MAX_BACKOFF, policy.backoff))
        proc.restart_due = time.monotonic() + backoff
        self.say(f"stage {proc.name} exited with {describe_returncode(returncode)}; restart policy "
                 f"{policy.policy}: restart {proc.restarts} of {policy.limit} in {backoff:g} s")
        return "restarting"

    def _start_due_restarts(self) -> None:
        now = time.monotonic()
        for proc in list(self.processes.values()):
            if proc.restart_due is not None and now >= proc.restart_due and not proc.alive:
                self._spawn(proc, supervisor_restart=proc.restarts)

    def _report(self, proc: StageProcess) -> StageExit:
        proc.reported = True
        returncode = proc.popen.returncode
        if not _group_alive(proc.pid):
            _unregister_group(proc.pid)
        restarts = proc.restarts
        supervisor = self._supervise(proc, returncode)
        try:
            self.history.record("stage_exited", stage=proc.name, pid=proc.pid, returncode=returncode,
                                expected=proc.expect_exit, supervisor=supervisor)
        except Exception:
            pass
        return StageExit(proc.name, proc.role, proc.pid, returncode, proc.tail(TAIL_LINES), proc.log_path,
                         proc.expect_exit, supervisor, restarts)

    @property
    def restart_pending(self) -> bool:
        """Some instance exited and its restart policy will start it again after the backoff."""
        with self._lock:
            return any(p.restart_due is not None for p in self.processes.values())

    def running(self) -> list[StageProcess]:
        with self._lock:
            return [p for p in self.processes.values() if p.alive]

    def instances(self, target: str) -> list[StageProcess]:
        """Instances named ``target``, or every instance of the stage (role) ``target``."""
        with self._lock:
            if target in self.processes:
                return [self.processes[target]]
            found = [p for p in self.processes.values() if p.role == target]
        if not found:
            raise KeyError(f"no stage instance or stage named {target!r}; known: {', '.join(sorted(self.processes))}")
        return found

    # ------------------------------------------------------------------ stop / faults
    def stop_all(self, grace: float = 10.0) -> list[StageExit]:
        """SIGTERM every stage's process group, SIGKILL what is left after ``grace``. Never raises."""
        try:
            with self._lock:
                procs = [p for p in self.processes.values() if p.popen is not None]
            return self._stop(procs, grace)
        except Exception:  # last resort: teardown must not fail, and must not leave processes
            for proc in list(self.processes.values()):
                if proc.popen is not None:
                    _signal_group(proc.pid, signal.SIGKILL)
            return []

    def _stop(self, procs: list[StageProcess], grace: float) -> list[StageExit]:
        for proc in procs:
            proc.restart_due = None  # a stopped stage is not the supervisor's to start again
            proc.expect_exit = proc.expect_exit or proc.alive
            if _group_alive(proc.pid):
                _signal_group(proc.pid, signal.SIGCONT)  # a paused stage cannot handle SIGTERM
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
            for p in procs:
                p.popen.poll()  # reap the leader, so its group can empty
            time.sleep(0.05)
        for proc in procs:
            if _group_alive(proc.pid):
                _signal_group(proc.pid, signal.SIGKILL)
        for proc in procs:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            end = time.monotonic() + 5
            while _group_alive(proc.pid) and time.monotonic() < end:
                _signal_group(proc.pid, signal.SIGKILL)
                time.sleep(0.02)
        exits = []
        with self._lock:
            for proc in procs:
                if not proc.reported and proc.popen.poll() is not None:
                    exits.append(self._report(proc))
                elif not _group_alive(proc.pid):
                    _unregister_group(proc.pid)
        return exits

    def stop(self, target: str, grace: float = 10.0) -> list[StageExit]:
        """Stop one instance (or every instance of a stage) as ``stop_all`` does."""
        return self._stop([p for p in self.instances(target) if p.popen is not None], grace)

    def kill(self, target: str, sig: int = signal.SIGKILL) -> list[StageProcess]:
        """Send ``sig`` to the process group of an instance (or of every instance of a stage).

        A terminating signal marks the exit as expected: ``poll()`` records it but does not return it.
        """
        procs = self.instances(target)
        for proc in procs:
            if sig not in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, 0):
                proc.expect_exit = True
            _signal_group(proc.pid, sig)
        return procs

    def restart(self, target: str, grace: float = 10.0) -> list[StageProcess]:
        """Stop the instance(s) if still running, then start them again with the same name, config and env."""
        procs = self.instances(target)
        self._stop([p for p in procs if p.popen is not None], grace)
        for proc in procs:
            self._spawn(proc)
        return procs
