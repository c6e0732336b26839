"""Run a container's command as a local process in its pod's network namespace.

`unshare -m -u --propagation private` gives the process a private copy of the mount table and its
own hostname; a tiny shell prologue sets the pod's hostname, bind-mounts the pod's volumes onto the
container's mountPaths (and its /etc/hosts and /etc/resolv.conf) and then `exec`s the command, so
programs see the same paths as in a real pod (/mnt/pvc/<claim>, /etc/kubelora/...,
/var/run/secrets/kubernetes.io/serviceaccount, /dev/termination-log) while the host is untouched,
except for empty mount-point directories/files that bind mounts need.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

from .volumes import Mount


def _prologue(mounts: list[Mount], file_mounts: list[Mount], workdir: str | None, host: str | None) -> str:
    lines = ["set -e"]
    if host:
        lines.append(f"hostname {shlex.quote(host)}")
    for m in mounts:
        t = shlex.quote(m.target)
        if m.source.is_dir():
            lines.append(f"mkdir -p {t}")
        else:
            lines.append(f'mkdir -p "$(dirname {t})"; [ -e {t} ] || : > {t}')
        lines.append(f"mount --bind {shlex.quote(str(m.source))} {t}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {t}")
    for m in file_mounts:
        t = shlex.quote(m.target)
        lines.append(f'mkdir -p "$(dirname {t})"; [ -e {t} ] || : > {t}')
        lines.append(f"mount --bind {shlex.quote(str(m.source))} {t}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {t}")
    if workdir:
        lines.append(f"mkdir -p {shlex.quote(workdir)}; cd {shlex.quote(workdir)}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def wrap(
    argv: list[str],
    mounts: list[Mount],
    file_mounts: list[Mount],
    workdir: str | None,
    host: str | None = None,
    netns: str | None = None,
) -> list[str]:
    """The host argv that runs `argv` with the mounts in place, in the pod's network namespace.

    Needs root for the namespaces; without it the container runs in place on the host's network.
    """
    if os.geteuid() != 0:  # no namespaces without root: run in place (paths and hostname will differ)
        script = _prologue(mounts, file_mounts, workdir, None)
        return ["/bin/sh", "-c", script.replace("set -e", "set +e"), "kubelora-container", *argv]
    script = _prologue(mounts, file_mounts, workdir, host)
    enter_net = ["nsenter", f"--net={netns}", "--"] if netns else []
    return [
        *enter_net,
        "unshare",
        "-m",
        "-u",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        script,
        "kubelora-container",
        *argv,
    ]


def spawn(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start in a new session (own process group) so that signals reach the whole container."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), also those that left its process group or session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the container's whole process group (its PID is the group id).

    SIGKILL reaches every process of the container, as a runtime's cgroup kill does: also children that
    started their own session (torchrun starts each worker with ``start_new_session``), which would
    otherwise outlive their "container". SIGTERM goes to the group only, as a kubelet sends it to the
    container's main process, which forwards it.
    """
    below = descendants(pid) if sig == signal.SIGKILL else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for child in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def nsenter(pid: int, argv: list[str]) -> list[str]:
    """argv that runs a command in a running container's mount namespace (exec probes)."""
    if os.geteuid() != 0:
        return argv
    return ["nsenter", "-t", str(pid), "-m", "-u", "-n", "--", *argv]
