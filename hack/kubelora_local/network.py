"""The local cluster's pod network: a bridge on the host and one network namespace per Pod.

Why not loopback addresses: the API server refuses 127.0.0.0/8 in Endpoints and EndpointSlices,
so Services and DNS names would have no addresses. Instead each cluster gets a bridge
`klbr<N>` holding `<subnet>.1/24` (the API server and CoreDNS listen there) and every Pod gets its
own network namespace with a veth on that bridge and an address `<subnet>.x`, as a CNI plugin
would do: containers of a pod share `localhost`, pods reach each other, the host reaches every
pod. Nothing is routed off the machine: the namespaces have no route but the bridge.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    """An `ip` command failed; the message holds its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@dataclass(frozen=True)
class PodNetwork:
    """The /24 of one cluster: `<subnet>.1` is the host's end (gateway), pods get .2 .. .254."""

    subnet: str  # three octets, e.g. "10.244.0"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @property
    def bridge(self) -> str:
        # Interface names are at most 15 bytes; two octets keep clusters side by side apart.
        _, b, c = self.subnet.split(".")
        return f"klbr{b}x{c}"

    def create_bridge(self) -> None:
        """(Re)create the bridge with the gateway address; stale state of an earlier run goes first."""
        self.delete_bridge()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def delete_bridge(self) -> None:
        _ip("link", "del", self.bridge, check=False)

    @staticmethod
    def netns_name(pod_uid: str) -> str:
        return f"kl-{pod_uid[:12]}"

    def attach(self, pod_uid: str, ip: str) -> str:
        """A fresh network namespace for a pod with `ip` on eth0; returns its path for nsenter."""
        ns = self.netns_name(pod_uid)
        host_end, pod_end = f"kv{pod_uid[:8]}", f"kp{pod_uid[:8]}"
        self.detach(pod_uid)
        _ip("netns", "add", ns)
        try:
            _ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
            _ip("link", "set", pod_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", pod_end, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway)
        except NetworkError:
            self.detach(pod_uid)
            raise
        return str(NETNS_DIR / ns)

    def detach(self, pod_uid: str) -> None:
        """Remove the pod's namespace; its veth pair goes with it."""
        delete_netns(self.netns_name(pod_uid))
        _ip("link", "del", f"kv{pod_uid[:8]}", check=False)


def delete_netns(name: str) -> None:
    _ip("netns", "del", name, check=False)
