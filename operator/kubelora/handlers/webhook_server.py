"""The admission webhook's HTTPS server, built from :class:`~kubelora.settings.Settings` at startup.

kopf's ``WebhookServer`` serves the handlers and reports a client config (URL + CA bundle), which kopf
writes into the ValidatingWebhookConfiguration ``settings.admission.managed``. Two modes:

* ``self-signed``: ``https://<webhook_host>:<port>`` with a certificate generated at start; for an
  API server on the same host (local clusters, the e2e tests).
* ``cluster``: listens on every interface and points the API server at the Service
  ``webhook_service`` (port 443), with the certificate from ``webhook_cert_dir`` (a mounted Secret,
  e.g. from cert-manager) or one generated for ``<name>.<namespace>.svc``. With several replicas use
  a shared certificate: each replica would otherwise publish its own CA bundle.

kopf generates certificates with ``certbuilder``; this module uses ``cryptography`` instead.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import kopf

from kubelora.settings import Settings


class _Server(kopf.WebhookServer):
    @staticmethod
    def build_certificate(hostnames: Collection[str], password: str | None = None) -> tuple[bytes, bytes]:
        return self_signed_certificate(list(hostnames))


class _ServiceServer(_Server):
    """Reports a Service reference instead of a URL: the API server reaches pods through Services."""

    def __init__(self, *, namespace: str, name: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.service = kopf.WebhookClientConfigService(namespace=namespace, name=name, port=443, path="")

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for config in super().__call__(fn):
            service_config = kopf.WebhookClientConfig(service=dict(self.service))  # type: ignore[typeddict-item]
            if config.get("caBundle"):
                service_config["caBundle"] = config["caBundle"]
            yield service_config


def build_server(settings: Settings) -> kopf.WebhookServer:
    """The server for ``settings.webhook`` ("self-signed" or "cluster")."""
    if settings.webhook == "self-signed":
        return _Server(addr=settings.webhook_host, port=settings.webhook_port, host=settings.webhook_host)
    namespace, sep, name = settings.webhook_service.partition("/")
    if not (sep and namespace and name):
        raise ValueError(f"webhook 'cluster' needs webhook_service as <namespace>/<name>, "
                         f"got {settings.webhook_service!r}")
    certs = Path(settings.webhook_cert_dir) if settings.webhook_cert_dir else None
    return _ServiceServer(
        namespace=namespace, name=name, addr="0.0.0.0", port=settings.webhook_port,
        host=f"{name}.{namespace}.svc", extra_sans=[f"{name}.{namespace}.svc.cluster.local", name],
        certfile=certs / "tls.crt" if certs else None, pkeyfile=certs / "tls.key" if certs else None)


def self_signed_certificate(hostnames: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """A PEM certificate and key for ``hostnames`` (DNS names or IPs; the first DNS name is the CN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hostnames if h):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
        else:
            if not ip.is_unspecified:
                names.append(x509.IPAddress(ip))
    common = next((str(n.value) for n in names if isinstance(n, x509.DNSName)), str(names[0].value))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key
