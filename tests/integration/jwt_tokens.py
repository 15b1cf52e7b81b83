"""RS256 test tokens and their JWKS, made in the test (no network, no key files).

Written with ``cryptography`` (already a dependency) rather than a JWT library: a JWS compact
token is three base64url parts and one PKCS#1 v1.5 signature. Envoy's jwt_authn is the
verifier in these tests, so a token built wrongly here fails them (Envoy answers 401).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass
class Issuer:
    """An RSA key pair standing for an identity provider."""

    issuer: str = "https://auth.test.example"
    audience: str = "inference"
    kid: str = "test-key-1"
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537,
                                                                                    key_size=2048))

    def jwks(self) -> str:
        pub = self.key.public_key().public_numbers()
        return orjson.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                                       "n": _uint(pub.n), "e": _uint(pub.e)}]}).decode()

    def token(self, ttl: float = 3600.0, **claims: Any) -> str:
        """A signed token with iss/aud/iat/exp plus ``claims``."""
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + int(ttl), **claims}
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}".encode()
        signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64(signature)}"
