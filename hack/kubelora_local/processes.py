"""Start/stop detached daemons by PID file, and small waiting helpers.

`kubelora-local up` returns while etcd, the API server, the controller-manager and the runner keep
running, so each gets its own session (not killed with the CLI) and a PID file that also records
the process start time: `down` must never signal an unrelated process that reused the PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (tiny race, acceptable for a dev cluster)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def spawn(name: str, argv: Sequence[str], run_dir: Path, env: dict[str, str] | None = None) -> int:
    """Start `argv` detached, output to `<run_dir>/<name>.log`, PID in `<run_dir>/<name>.pid`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    write_pid_file(run_dir / f"{name}.pid", proc.pid)
    (run_dir / f"{name}.argv").write_text(json.dumps(list(argv)))  # what a restart runs again
    return proc.pid


def write_pid_file(path: Path, pid: int) -> None:
    """Record `pid` with its start time, so that a reused PID is never mistaken for it."""
    path.write_text(f"{pid} {_start_time(pid) or ''}\n")


def read_pid(name: str, run_dir: Path) -> int | None:
    """The PID from `<run_dir>/<name>.pid` if that very process (same start time) is still alive."""
    return pid_from_file(run_dir / f"{name}.pid")


def pid_from_file(path: Path) -> int | None:
    """The PID recorded in `path` if that very process is still alive."""
    try:
        pid_s, _, started = path.read_text().strip().partition(" ")
    except OSError:
        return None
    pid = int(pid_s)
    now = _start_time(pid)
    if now is None or (started and now != started):
        return None
    return pid


def _reap(pid: int) -> None:
    """Collect our own exited children so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    _reap(pid)
    return _start_time(pid) is not None


def stop(name: str, run_dir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM the daemon, SIGKILL after `timeout`; True if something was running."""
    pid = read_pid(name, run_dir)
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: not alive(pid), timeout, interval=0.05):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 5, interval=0.05)
    return True


def wait_for(check: Callable[[], T], timeout: float, interval: float = 0.1) -> T | None:
    """Poll `check` until it returns something truthy (returned) or `timeout` passes (None).

    Exceptions from `check` count as "not yet": servers refuse connections while starting.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
