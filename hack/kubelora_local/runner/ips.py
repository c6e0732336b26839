"""Loopback pod IPs: every Pod gets 127.0.0.x so that several pods can listen on the same port.

Linux routes all of 127.0.0.0/8 to `lo`, so no interface setup is needed. 127.0.0.1 stays the
host's (the API server listens there).
"""

from __future__ import annotations

import threading


class IpPool:
    """Hands out 127.0.0.2 .. 127.0.0.254; an address is reused once its pod has finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def allocate(self, preferred: str | None = None) -> str:
        with self._lock:
            if preferred and preferred.startswith("127.0.0."):
                last = int(preferred.rsplit(".", 1)[1])
                if 2 <= last <= 254 and last not in self._used:
                    self._used.add(last)
                    return preferred
            for last in range(2, 255):
                if last not in self._used:
                    self._used.add(last)
                    return f"127.0.0.{last}"
        raise RuntimeError("no free loopback pod IP (253 pods are running)")

    def release(self, ip: str | None) -> None:
        if ip and ip.startswith("127.0.0."):
            with self._lock:
                self._used.discard(int(ip.rsplit(".", 1)[1]))
