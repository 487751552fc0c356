"""Run an engine stage as a container (testcontainers), as OS2datascanner ships its engine.

    pytest suites/ --engine-image magentaaps/os2datascanner-engine:3.32.4
    python -m harness.container --image IMAGE [--network host|bridge] -- {stage}

``--engine-image`` makes every stage this wrapper: the harness launches it as it launches any
stage command, and the wrapper runs the image with the stage's command (by default just
``explorer`` or ``worker``, as the engine image's entrypoint takes it; ``--engine-cmd`` gives
another), so supervision, faults and attribution work unchanged:
- the engine's TOML config is mounted read-only at ``CONFIG_IN_CONTAINER`` and named in the
  container's environment; only the stage's own variables go in (QUEUE_PRIORITY,
  CONVERSION_PRIORITY, and those given by ``--engine-env`` or the scenario), never the host's;
- the container's output is the stage's log; its exit code is the wrapper's;
- SIGTERM/SIGINT stop the container (Docker's grace, then SIGKILL); a stopped wrapper (a pause
  fault) pauses it and a continued one unpauses it; a killed wrapper has it killed and removed
  by a keeper in a session of its own (harness.detach's arrangement);
- the network is the host's (``--network host``: the harness's broker listens on loopback), or
  Docker's bridge, reaching the broker at ``host.docker.internal``.

The stage's connections are attributed by its own broker user (harness.port_resolver): a
container is no process the harness can look into.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from harness.detach import is_stopped, process_state

CONFIG_IN_CONTAINER = "/etc/qp-harness/engine.toml"
CONFIG_VARIABLE = "OS2DS_ENGINE_USER_CONFIG_PATH"
# Set by the stage launcher: the names of the variables the stage itself was given.
STAGE_ENV_VARIABLE = "QP_STAGE_ENV"
ALWAYS_PASSED = ("QUEUE_PRIORITY", "CONVERSION_PRIORITY", "PYTHONUNBUFFERED")
STOP_GRACE = 10  # seconds Docker waits after SIGTERM before it kills the container
POLL_SECONDS = 0.1
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ContainerSpec:
    """Everything a stage's container is started with, built without talking to Docker."""

    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None
    network: str = "host"

    @classmethod
    def from_environment(cls, image: str, command: list[str], environ: dict[str, str],
                         network: str = "host") -> "ContainerSpec":
        """The spec for the stage the launcher described in ``environ`` (its own variables only)."""
        names = set(ALWAYS_PASSED) | {n for n in environ.get(STAGE_ENV_VARIABLE, "").split(",") if n}
        env = {name: environ[name] for name in sorted(names) if name in environ}
        config = environ.get(CONFIG_VARIABLE)
        if config:
            env[CONFIG_VARIABLE] = CONFIG_IN_CONTAINER
        return cls(image, command, env, config, network)

    @property
    def volumes(self) -> list[tuple[str, str, str]]:
        return [(str(Path(self.config_path).resolve()), CONFIG_IN_CONTAINER, "ro")] if self.config_path else []

    def for_bridge(self, directory: Path) -> "ContainerSpec":
        """On Docker's bridge the host's loopback is not the container's: a copy of the config names
        the host as ``host.docker.internal`` (the broker must listen there, not on loopback only)."""
        if self.network != "bridge" or not self.config_path:
            return self
        config = tomllib.loads(Path(self.config_path).read_text(encoding="utf-8"))
        amqp = config.get("amqp", {})
        if amqp.get("AMQP_HOST") in LOOPBACK:
            amqp["AMQP_HOST"] = "host.docker.internal"
        copy = directory / (Path(self.config_path).stem + ".bridge.toml")
        copy.write_text(tomli_w.dumps(config), encoding="utf-8")
        return ContainerSpec(self.image, self.command, self.env, str(copy), self.network)

    @property
    def docker_kwargs(self) -> dict:
        if self.network == "host":
            return {"network_mode": "host"}
        return {"extra_hosts": {"host.docker.internal": "host-gateway"}}

    def container(self):
        """A configured, not yet started testcontainers ``DockerContainer``."""
        try:
            from testcontainers.core.container import DockerContainer
        except ImportError:
            raise SystemExit("harness.container needs testcontainers: pip install 'qp-harness[docker]'") from None
        container = DockerContainer(self.image).with_command(self.command).with_kwargs(**self.docker_kwargs)
        for key, value in self.env.items():
            container.with_env(key, value)
        for host, inside, mode in self.volumes:
            container.with_volume_mapping(host, inside, mode)
        return container


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.container", description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--network", choices=["host", "bridge"], default="host")
    parser.add_argument("--watch", nargs=2, metavar=("WRAPPER_PID", "CONTAINER_ID"), help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*")
    args = parser.parse_args(argv)
    if args.watch:
        return _keep(int(args.watch[0]), args.watch[1])
    spec = ContainerSpec.from_environment(args.image, args.command, dict(os.environ), args.network)
    if spec.config_path:
        spec = spec.for_bridge(Path(spec.config_path).parent)
    return _run(spec)


def _run(spec: ContainerSpec) -> int:
    container = spec.container()
    container.start()
    wrapped = container.get_wrapped_container()
    # The keeper pauses, unpauses and finally kills the container as the wrapper is stopped, continued or killed.
    keeper = subprocess.Popen([sys.executable, "-m", "harness.container", "--image", spec.image,
                               "--watch", str(os.getpid()), wrapped.id], start_new_session=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: threading.Thread(target=wrapped.stop, kwargs={"timeout": STOP_GRACE}).start())
    threading.Thread(target=_copy_logs, args=(wrapped,), daemon=True).start()
    code = wrapped.wait().get("StatusCode", 1)
    time.sleep(POLL_SECONDS)  # the log copy's last lines
    keeper.terminate()
    _remove(wrapped)
    return int(code)


def _copy_logs(wrapped) -> None:
    for chunk in wrapped.logs(stream=True, follow=True):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def _keep(wrapper: int, container_id: str) -> int:
    """Mirror the wrapper's state on the container until the wrapper ends; kill the container if it dies."""
    import docker
    wrapped = docker.from_env().containers.get(container_id)
    paused = False
    while _alive(wrapper):
        if is_stopped(wrapper) != paused:
            paused = not paused
            (wrapped.pause if paused else wrapped.unpause)()
        time.sleep(POLL_SECONDS)
    _remove(wrapped)
    return 0


def _remove(wrapped) -> None:
    try:
        wrapped.remove(force=True)
    except Exception as exc:  # noqa: BLE001 - already removed, or Docker went away: nothing left to do
        print(f"harness.container: {exc}", file=sys.stderr)


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


if __name__ == "__main__":
    raise SystemExit(main())
