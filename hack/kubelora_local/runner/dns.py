"""A pod's name-resolution files, as the kubelet writes them: its hostname, /etc/hosts, resolv.conf.

With `spec.hostname` and `spec.subdomain` (Indexed Jobs set both), a pod is
`<hostname>.<subdomain>.<ns>.svc.cluster.local`; the cluster DNS answers that name for every
pod behind the headless Service `<subdomain>`, and /etc/hosts holds the pod's own.
"""

from __future__ import annotations

from .context import Obj

CLUSTER_DOMAIN = "cluster.local"


def hostname(pod: Obj) -> str:
    """`spec.hostname`, else the pod name cut to a DNS label (what the kubelet does)."""
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"][:63].rstrip("-."))


def fqdn(pod: Obj) -> str | None:
    """The pod's DNS name when it has a subdomain, else None."""
    sub = pod["spec"].get("subdomain")
    if not sub:
        return None
    return f"{hostname(pod)}.{sub}.{pod['metadata']['namespace']}.svc.{CLUSTER_DOMAIN}"


def hosts_file(pod: Obj, pod_ip: str) -> str:
    names = " ".join(n for n in (fqdn(pod), hostname(pod)) if n)
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{names}\n"


def resolv_conf(pod: Obj, dns_ip: str) -> str | None:
    """resolv.conf for dnsPolicy ClusterFirst (the default); None keeps the host's file."""
    policy = pod["spec"].get("dnsPolicy") or "ClusterFirst"
    if not dns_ip or policy == "Default" or (policy == "ClusterFirst" and pod["spec"].get("hostNetwork")):
        return None
    ns = pod["metadata"]["namespace"]
    search = [f"{ns}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]
    return f"search {' '.join(search)}\nnameserver {dns_ip}\noptions ndots:5\n"
