"""Certificates and keys for a throw-away local cluster (openssl CLI).

EC P-256 keys instead of RSA: key generation takes milliseconds instead of up to ~2 s, and both
kube-apiserver (TLS, ES256 service-account tokens) and Python's ssl accept them. The serving cert
carries IP SANs (127.0.0.1 and the node address where pods and host clients connect) because Go ignores the CN.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """Paths of the generated material plus the admin bearer token."""

    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    sa_key: Path
    sa_pub: Path
    tokens_csv: Path
    admin_token: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def generate(directory: Path, extra_ips: list[str] | None = None) -> Pki:
    """Create a CA, an apiserver serving cert, SA signing keys and a token file in `directory`.

    `extra_ips` go into the serving cert's SANs: the node address where host clients and pods connect.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    d = directory
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=kubelora-local-ca",
        cwd=d,
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key", cwd=d)
    _openssl("req", "-new", "-key", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=d)
    (d / "apiserver.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,"
        + "".join(f"IP:{ip}," for ip in extra_ips or [])
        + "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "3650",
        "-extfile",
        "apiserver.ext",
        cwd=d,
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=d)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    token = secrets.token_hex(24)
    # system:masters gets every right under RBAC.
    (d / "tokens.csv").write_text(f"{token},admin,admin-uid,system:masters\n")
    for key in ("ca.key", "apiserver.key", "sa.key", "tokens.csv"):
        (d / key).chmod(0o600)
    return Pki(
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        server_crt=d / "apiserver.crt",
        server_key=d / "apiserver.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
        tokens_csv=d / "tokens.csv",
        admin_token=token,
    )
