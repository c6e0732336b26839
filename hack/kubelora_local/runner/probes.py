"""Readiness/liveness/startup probes (httpGet, tcpSocket, exec) with the kubelet's thresholds."""

from __future__ import annotations

import http.client
import socket
import subprocess
from typing import Any

from .context import Obj
from .sandbox import nsenter


def _port(value: Any, container: Obj) -> int:
    """A probe port: a number or the name of one of the container's ports."""
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for p in container.get("ports") or []:
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"unknown named port {value!r}")


def check(probe: Obj, container: Obj, pod_ip: str, pid: int | None, env: dict[str, str]) -> bool:
    """Run one probe attempt; True on success."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = get.get("host") or pod_ip
            cls = http.client.HTTPSConnection if get.get("scheme") == "HTTPS" else http.client.HTTPConnection
            conn = cls(host, _port(get["port"], container), timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                conn.request("GET", get.get("path", "/"), headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection((tcp.get("host") or pod_ip, _port(tcp["port"], container)), timeout):
                return True
        if "exec" in probe and pid is not None:
            argv = nsenter(pid, list(probe["exec"]["command"]))
            res = subprocess.run(argv, env=env, timeout=timeout, capture_output=True, check=False)
            return res.returncode == 0
    except (OSError, ValueError, subprocess.TimeoutExpired, http.client.HTTPException):
        return False
    return False


class ProbeState:
    """Tracks timing and consecutive results of one probe of one container run."""

    def __init__(self, probe: Obj | None, started: float) -> None:
        self.probe = probe
        self.result: bool | None = None  # None: not decided yet
        self._next = started + float((probe or {}).get("initialDelaySeconds", 0))
        self._successes = 0
        self._failures = 0

    def due(self, now: float) -> bool:
        return self.probe is not None and now >= self._next

    def record(self, ok: bool, now: float) -> None:
        assert self.probe is not None
        self._next = now + float(self.probe.get("periodSeconds", 10))
        if ok:
            self._successes, self._failures = self._successes + 1, 0
            if self._successes >= int(self.probe.get("successThreshold", 1)):
                self.result = True
        else:
            self._successes, self._failures = 0, self._failures + 1
            if self._failures >= int(self.probe.get("failureThreshold", 3)):
                self.result = False
