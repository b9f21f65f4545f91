"""Certificates and keys for a deployment trial: TLS and SuperNode authentication.

Flower 1.41 secures a deployment in two independent layers, and a trial needs both:

* **TLS** (SuperNode/``flwr`` CLI -> SuperLink, one HTTPS port for the Fleet, Control
  and Runtime APIs): the SuperLink takes ``--ssl-ca-certfile ca.crt --ssl-certfile
  server.pem --ssl-keyfile server.key``; SuperNodes verify it with
  ``--root-certificates ca.crt``; the ``flwr`` CLI with ``root-certificates`` in its
  connection entry.  The server certificate names ``localhost`` and ``127.0.0.1``
  (add the SuperLink's real host names with ``hosts=`` for a multi-machine trial).
* **SuperNode authentication**: the SuperLink runs with ``--enable-supernode-auth``;
  each SuperNode holds an EC (NIST P-384) private key in OpenSSH format
  (``--auth-supernode-private-key``) and signs every Fleet request; its public key
  must have been registered beforehand with ``flwr supernode register <key.pub>``.
  An unregistered key cannot activate, so its SuperNode never joins.

Everything is generated with the ``cryptography`` package (no ``openssl`` binary).
The files are for a trial: the CA key is kept next to the certificates, and the
certificates live for ``days`` days.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class TrialCredentials:
    """Paths of everything a secured trial needs."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[NodeKey, ...]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune trial"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(out_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS,
                   days: int = 30) -> tuple[Path, Path, Path]:
    """Write a trial CA and a SuperLink server certificate signed by it.

    Returns ``(ca.crt, server.pem, server.key)``.  The server certificate carries
    every entry of ``hosts`` as a subject alternative name, because the SuperNodes'
    HTTPS client checks the address it dials against them.
    """
    if not hosts:
        raise ValueError("hosts: at least one host name or IP address is needed for the server certificate")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedtune trial CA")).issuer_name(_name("fedtune trial CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    paths = (out_dir / "ca.crt", out_dir / "server.pem", out_dir / "server.key")
    _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(paths[1], server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths[2], _pem_key(server_key), private=True)
    return paths


def make_node_key(out_dir: Path, name: str) -> NodeKey:
    """Write one SuperNode's P-384 key pair in the OpenSSH format Flower reads."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    node_key = NodeKey(out_dir / f"{name}_key", out_dir / f"{name}_key.pub")
    _write(node_key.private_key, private, private=True)
    _write(node_key.public_key, public + f" {name}\n".encode())
    return node_key


def make_trial_credentials(out_dir: str | Path, num_nodes: int,
                           hosts: tuple[str, ...] = DEFAULT_HOSTS) -> TrialCredentials:
    """TLS files plus ``num_nodes`` SuperNode key pairs (``supernode<i>_key[.pub]``) in ``out_dir``."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    out = Path(out_dir)
    ca, cert, key = make_tls_files(out, hosts)
    nodes = tuple(make_node_key(out, f"supernode{i}") for i in range(num_nodes))
    return TrialCredentials(ca, cert, key, nodes)
