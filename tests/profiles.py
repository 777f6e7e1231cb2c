"""Reading bundles the way devices and openssl do: profile signatures, PKCS#12 contents.

Shared by the export, MDM and email tests, which compare what a plugin sent with what
``certwarden export`` writes.
"""

from __future__ import annotations

import plistlib
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from certwarden.testing import require_tool


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pkcs12_contents(data: bytes, password: str) -> tuple[bytes, bytes, list[bytes], bytes | None]:
    """What a PKCS#12 holds, decrypted: key, certificate, chain, friendly name."""
    loaded = pkcs12.load_pkcs12(data, password.encode())
    assert loaded.key is not None and loaded.cert is not None
    key = loaded.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = [der(c.certificate) for c in loaded.additional_certs]
    return key, der(loaded.cert.certificate), chain, loaded.cert.friendly_name


def normalized_profile(data: bytes, password: str) -> dict[str, Any]:
    """A profile with what differs by design between two builds taken out: the PayloadUUIDs
    (fresh for each build) and the PKCS#12 bytes (salted), replaced by what they decrypt to."""
    plist: dict[str, Any] = plistlib.loads(data)
    plist["PayloadUUID"] = "UUID"
    for payload in plist["PayloadContent"]:
        payload["PayloadUUID"] = "UUID"
        if payload["PayloadType"] == "com.apple.security.pkcs12":
            payload["PayloadContent"] = pkcs12_contents(payload["PayloadContent"], password)
    return plist


# ---- signed profiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningChain:
    """A profile-signing certificate under an intermediate under a root, as files."""

    root_file: Path  # what a device trusts
    cert_file: Path  # the signer, then the intermediate
    key_file: Path  # 0600, unencrypted

    @classmethod
    def create(cls, directory: Path, key_type: Literal["ec", "rsa"] = "ec") -> SigningChain:
        directory.mkdir(parents=True, exist_ok=True)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _cert("Profile Root", root_key, None, ca=True)
        middle_key = ec.generate_private_key(ec.SECP256R1())
        middle = _cert("Profile Intermediate", middle_key, (root, root_key), ca=True)
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if key_type == "ec"
            else rsa.generate_private_key(65537, 2048)
        )
        leaf = _cert("Profile Signer", key, (middle, middle_key), ca=False)
        pem = serialization.Encoding.PEM
        chain = cls(directory / "root.pem", directory / "signer.pem", directory / "signer.key")
        chain.root_file.write_bytes(root.public_bytes(pem))
        chain.cert_file.write_bytes(leaf.public_bytes(pem) + middle.public_bytes(pem))
        chain.key_file.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        chain.key_file.chmod(0o600)
        return chain

    def verified(self, signed: bytes, tmp_path: Path) -> bytes:
        """The plist inside ``signed``, once ``openssl cms -verify`` accepts its signature.

        Only the root is trusted: the intermediate must come from the signature itself, and
        without -content the plist must be embedded in it.
        """
        openssl = require_tool("openssl")
        signed_file, plist_file = tmp_path / "signed.mobileconfig", tmp_path / "verified.plist"
        signed_file.write_bytes(signed)
        done = subprocess.run(
            [
                openssl, "cms", "-verify", "-in", str(signed_file), "-inform", "DER",
                "-CAfile", str(self.root_file), "-out", str(plist_file),
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Verification successful" in done.stderr
        return plist_file.read_bytes()


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.now(UTC) - timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(signing_key, hashes.SHA256())
