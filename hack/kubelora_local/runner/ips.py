"""Pod IPs: every Pod gets <subnet>.x (default 10.244.0.x) in its own network namespace.

<subnet>.1 is the bridge's (the host's) address, where the API server and CoreDNS listen.
Clusters running side by side (parallel test sessions) use different subnets, e.g. 10.244.17.x,
so that their pods never collide on an address.
"""

from __future__ import annotations

import threading


class IpPool:
    """Hands out <subnet>.2 .. <subnet>.254; an address is reused once its pod has finished."""

    def __init__(self, subnet: str = "10.244.0") -> None:
        self.prefix = subnet.rstrip(".") + "."
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def allocate(self, preferred: str | None = None) -> str:
        with self._lock:
            if preferred and preferred.startswith(self.prefix):
                last = int(preferred.rsplit(".", 1)[1])
                if 2 <= last <= 254 and last not in self._used:
                    self._used.add(last)
                    return preferred
            for last in range(2, 255):
                if last not in self._used:
                    self._used.add(last)
                    return f"{self.prefix}{last}"
        raise RuntimeError("no free loopback pod IP (253 pods are running)")

    def release(self, ip: str | None) -> None:
        if ip and ip.startswith(self.prefix):
            with self._lock:
                self._used.discard(int(ip.rsplit(".", 1)[1]))
