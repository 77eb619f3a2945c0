"""Private certificate authorities and the certificates they sign, for every test that speaks TLS.

One way to make a CA and a leaf (EC P-256, valid for a day, the leaf named for ``localhost``
and ``127.0.0.1``), and the file sets the tests use:

- :func:`make_certificates`: a CA and a server certificate (the reverse proxies, HTTPS targets);
- :func:`make_client_certificate`: a client CA and a client certificate (mutual TLS);
- :func:`make_tls_files`: a CA with a server and a client certificate, plus a CA that signed
  neither (TLS to Redis, a single server or a cluster).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
VALIDITY = datetime.timedelta(days=1)
# Clocks of the processes under test may lag the test's by a little.
BACKDATE = datetime.timedelta(minutes=5)
LOOPBACK_NAMES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Leaf:
    """A certificate and its private key, as PEM."""

    cert: bytes
    key: bytes

    def write(self, cert_file: Path, key_file: Path, pem_file: Path | None = None) -> None:
        """The certificate, the key (mode 0600) and, if asked, both in one file."""
        cert_file.write_bytes(self.cert)
        for path, data in ((key_file, self.key), (pem_file, self.cert + self.key)):
            if path is not None:
                path.write_bytes(data)
                path.chmod(0o600)


class PrivateCA:
    """A self-signed CA that issues loopback certificates."""

    def __init__(self, common_name: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def issue(self, common_name: str, usage: x509.ObjectIdentifier) -> Leaf:
        """A certificate for ``localhost`` and ``127.0.0.1`` with the extended key usage
        ``usage`` (server or client authentication)."""
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(LOOPBACK_NAMES), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return Leaf(cert.public_bytes(PEM), key_bytes(key))

    def server(self) -> Leaf:
        return self.issue("localhost", ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, common_name: str) -> Leaf:
        return self.issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH)


# Server certificates (reverse proxies, HTTPS targets) ------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A private CA and a server certificate it signed for 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    pem_file: Path  # certificate and key in one file, as HAProxy wants them

    def client_context(self) -> ssl.SSLContext:
        """What a client trusting only the test CA verifies the server with."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_certificates(directory: Path) -> Certificates:
    """Write a test CA and a server certificate it signed to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = PrivateCA("webhook-connect test CA")
    certs = Certificates(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
        pem_file=directory / "server-with-key.pem",
    )
    certs.ca_file.write_bytes(ca.pem)
    ca.server().write(certs.cert_file, certs.key_file, certs.pem_file)
    return certs


# Client certificates (mutual TLS) --------------------------------------------------------------


@dataclass(frozen=True)
class ClientCertificate:
    """A client CA (what a server requiring client certificates trusts) and a certificate it
    signed, with its key apart and both in one file."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    pem_file: Path  # certificate and key in one file


def make_client_certificate(directory: Path, name: str = "connector") -> ClientCertificate:
    """Write a client CA and a client certificate for ``name`` to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = PrivateCA("webhook-connect client CA")
    files = ClientCertificate(
        ca_file=directory / f"{name}-client-ca.pem",
        cert_file=directory / f"{name}-client.pem",
        key_file=directory / f"{name}-client.key",
        pem_file=directory / f"{name}-client-with-key.pem",
    )
    files.ca_file.write_bytes(ca.pem)
    ca.client(name).write(files.cert_file, files.key_file, files.pem_file)
    return files


# Both ends, and a CA that signed neither (TLS to Redis) ---------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """Everything a TLS server and its clients need, as files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path  # a CA that signed nothing here

    def client_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path) -> TLSFiles:
    """Write a test CA, server and client certificates it signed, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = PrivateCA("webhook-connect redis test CA")
    files = TLSFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        wrong_ca=directory / "wrong-ca.pem",
    )
    files.ca.write_bytes(ca.pem)
    files.wrong_ca.write_bytes(PrivateCA("some other CA").pem)
    ca.server().write(files.server_cert, files.server_key)
    ca.client("webhook-connect").write(files.client_cert, files.client_key)
    return files
