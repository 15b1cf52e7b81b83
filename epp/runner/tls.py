"""TLS for the ext_proc server: a mounted cert (``--cert-path``) or a self-signed one.

GIE serves ext_proc over TLS by default with a self-signed certificate generated at start;
gateways skip verification (Istio: DestinationRule ``insecureSkipVerify``). We do the same.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def self_signed(hostnames: tuple[str, ...] = ("localhost",), key_size: int = 2048) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) valid for 10 years, organisation "Inference Ext" as GIE's."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Inference Ext")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def load_cert_dir(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) from ``<path>/tls.crt`` and ``<path>/tls.key`` (a Kubernetes TLS Secret)."""
    d = Path(path)
    crt, key = d / "tls.crt", d / "tls.key"
    missing = [str(p) for p in (crt, key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--cert-path {d}: missing {', '.join(missing)}")
    return crt.read_bytes(), key.read_bytes()
