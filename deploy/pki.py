"""The key material a TLS + node-authenticated Flower deployment needs, made with ``cryptography``.

A private CA signs the SuperLink's certificate, whose subjectAltName must name the address SuperNodes
dial (TLS checks it); each SuperNode gets its own EC P-384 key pair in OpenSSH format, the form
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read. Private keys
are written owner-only. Nothing here talks to Flower: it only writes files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class Pki:
    """Paths of the files in one deployment's key folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, node: int) -> Path:
        return self.root / "nodes" / f"node-{node}"

    def node_public(self, node: int) -> Path:
        return self.root / "nodes" / f"node-{node}.pub"

    def nodes(self) -> list[int]:
        """Indices of the node key pairs present."""
        return sorted(int(p.stem.removeprefix("node-")) for p in (self.root / "nodes").glob("node-*.pub"))


def _private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, public_key, issuer: str, signer, *, ca: bool, hosts: list[str]) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(root: Path, hosts: list[str], nodes: int) -> Pki:
    """A fresh CA, a SuperLink certificate valid for every name/IP in ``hosts``, and ``nodes`` key pairs.

    Existing node keys are kept (a node's key is its identity; re-keying would need re-registering).
    """
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address for its SAN")
    pki = Pki(Path(root))
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = _certificate("fedlora-ca", ca_key.public_key(), "fedlora-ca", ca_key, ca=True, hosts=[])
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = _certificate(hosts[0], server_key.public_key(), "fedlora-ca", ca_key, ca=False, hosts=hosts)
    _private(pki.root / "ca.key", _pem_key(ca_key))
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _private(pki.server_key, _pem_key(server_key))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for node in range(nodes):
        if not pki.node_key(node).is_file():
            add_node_key(pki, node)
    return pki


def add_node_key(pki: Pki, node: int) -> Path:
    """Write an EC P-384 key pair for ``node`` in OpenSSH format; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _private(
        pki.node_key(node),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pki.node_public(node).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return pki.node_public(node)
