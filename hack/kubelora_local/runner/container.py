"""One container of a pod: process lifecycle, restart backoff, probes and its status entry."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from ..processes import write_pid_file
from .context import ConfigError, Obj, now
from .probes import ProbeState, check
from .sandbox import signal_group, spawn

IMAGE_PREFIX = "ghcr.io/kubelora/"
# Entry points of our images, used when a container has no `command` (like the image ENTRYPOINT).
ENTRYPOINTS = {"operator": ["kubelora-operator"], "trainer": ["kubelora-train"]}
# Restart backoff: much shorter than the kubelet's 10 s .. 5 min, so that local tests stay quick.
BACKOFF_BASE, BACKOFF_MAX, BACKOFF_RESET = 1.0, 30.0, 60.0
MAX_MESSAGE = 4096


def image_repo(image: str) -> str:
    """`ghcr.io/kubelora/trainer:1.0@sha256:..` -> `trainer`, or '' if not one of ours."""
    if not image.startswith(IMAGE_PREFIX):
        return ""
    rest = image[len(IMAGE_PREFIX) :].split("@", 1)[0]
    return rest.split(":", 1)[0]


def unsupported_image_message(image: str) -> str:
    return (
        f"image {image!r} cannot run on the kubelora local runner: only {IMAGE_PREFIX}* images are "
        "supported (their command runs as a local process from the project virtualenv)"
    )


class Container:
    """Process + Kubernetes-visible state of one (init) container."""

    def __init__(self, spec: Obj, workdir: Path, log_path: Path) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.image: str = spec.get("image", "")
        self.repo = image_repo(self.image)
        self.workdir = workdir
        self.log_path = log_path
        self.term_file = workdir / "termination-log"
        self.pid_file = workdir / "pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.restart_count = 0
        self.runs = 0  # how many times it was started
        self.exit_code: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.next_start = 0.0
        self.kill_deadline: float | None = None
        self._log_offset = 0
        self._backoff = 0.0
        self.probes: dict[str, ProbeState] = {}
        self.env: dict[str, str] = {}  # of the current run, for exec probes

    @property
    def supported(self) -> bool:
        return bool(self.repo)

    @property
    def noop(self) -> bool:
        return self.repo == "noop"

    @property
    def running(self) -> bool:
        return self.proc is not None

    def set_waiting(self, reason: str, message: str | None = None) -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}

    def argv(self, mapping: dict[str, str]) -> list[str]:
        """command + args with `$(VAR)` expansion; falls back to the image's entry point."""
        from .envvars import expand

        command = self.spec.get("command") or ENTRYPOINTS.get(self.repo)
        if not command:
            raise ConfigError(
                "CreateContainerError",
                f"container {self.name} has no command and image {self.image} no known entry point",
            )
        return [expand(a, mapping) for a in [*command, *(self.spec.get("args") or [])]]

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        """Launch (or, for the noop image, complete at once)."""
        self.runs += 1
        self.env = env
        if self.runs > 1:
            self.restart_count += 1
        self.term_file.parent.mkdir(parents=True, exist_ok=True)
        self.term_file.write_bytes(b"")
        started = now()
        self.started_at = time.monotonic()
        self.ready = False
        self.kill_deadline = None
        self.probes = {
            kind: ProbeState(self.spec.get(f"{kind}Probe"), self.started_at)
            for kind in ("readiness", "liveness", "startup")
        }
        if self.noop:
            self._terminated(0, started, "", "local://noop")
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = spawn(argv, env, self.workdir / "cwd", self.log_path)
        write_pid_file(self.pid_file, self.proc.pid)  # lets `down` kill leftovers if the runner dies
        self.state = {"running": {"startedAt": started}}

    def poll(self) -> bool:
        """Reap the process if it exited; True when it just terminated."""
        if self.proc is None:
            return False
        if self.kill_deadline is not None and time.monotonic() > self.kill_deadline:
            signal_group(self.proc.pid, signal.SIGKILL)
        code = self.proc.poll()
        if code is None:
            return False
        signal_group(self.proc.pid, signal.SIGKILL)  # leftovers in the group die with the container
        exit_code = 128 - code if code < 0 else code
        started = self.state.get("running", {}).get("startedAt", now())
        container_id = self.container_id
        self.proc = None
        self.pid_file.unlink(missing_ok=True)
        self._terminated(exit_code, started, self._message(exit_code), container_id)
        return True

    def _message(self, exit_code: int) -> str:
        try:
            msg = self.term_file.read_bytes()[:MAX_MESSAGE].decode("utf-8", "replace")
        except OSError:
            msg = ""
        if not msg.strip() and exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_offset)
                    tail = f.read()
                lines = tail.decode("utf-8", "replace").splitlines()[-80:]
                msg = "\n".join(lines)[-2048:]
            except OSError:
                msg = ""
        return msg

    def _terminated(self, exit_code: int, started: str, message: str, container_id: str) -> None:
        self.exit_code = exit_code
        self.ready = False
        term: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
            "containerID": container_id,
        }
        if message:
            term["message"] = message
        self.state = {"terminated": term}

    def schedule_restart(self) -> None:
        """Move the terminated state to lastState and wait out the backoff (CrashLoopBackOff)."""
        ran_for = time.monotonic() - self.started_at
        self._backoff = (
            BACKOFF_BASE if ran_for > BACKOFF_RESET or not self._backoff else min(self._backoff * 2, BACKOFF_MAX)
        )
        self.next_start = time.monotonic() + self._backoff
        self.last_state = self.state
        self.set_waiting("CrashLoopBackOff", f"back-off {self._backoff:.0f}s restarting container {self.name}")

    def terminate(self, grace: float) -> None:
        """SIGTERM the group now, SIGKILL at `grace` seconds (enforced by poll())."""
        if self.proc is not None:
            signal_group(self.proc.pid, signal.SIGTERM)
            self.kill_deadline = time.monotonic() + grace

    def kill(self) -> None:
        if self.proc is not None:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            self.pid_file.unlink(missing_ok=True)

    def probe(self, pod_ip: str) -> str | None:
        """Run due probes; returns 'liveness' if the container must be restarted."""
        t = time.monotonic()
        startup = self.probes["startup"]
        if startup.probe is not None and startup.result is not True:
            if startup.due(t):
                startup.record(check(startup.probe, self.spec, pod_ip, self.pid, self.env), t)
            return "liveness" if startup.result is False else None
        for kind in ("liveness", "readiness"):
            state = self.probes[kind]
            if state.due(t):
                state.record(check(state.probe or {}, self.spec, pod_ip, self.pid, self.env), t)
        readiness = self.probes["readiness"]
        self.ready = readiness.result is True if readiness.probe is not None else True
        return "liveness" if self.probes["liveness"].result is False else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def container_id(self) -> str:
        return f"local://{self.pid or 0}"

    def status(self) -> Obj:
        """The containerStatuses entry."""
        running = "running" in self.state
        status: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": f"local://{self.image}" if self.runs else "",
            "ready": self.ready and running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        container_id = self.container_id if running else self.state.get("terminated", {}).get("containerID")
        if container_id:
            status["containerID"] = container_id
        return status
