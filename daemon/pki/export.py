"""Bundles of a certificate with its key and chain: PEM, PKCS#12, and PKCS#12 for Apple.

OpenSSL 3's default PKCS#12 (PBES2/AES-256, SHA-256 MAC) is refused by iOS with a misleading
"wrong password"; Apple devices need PBE-SHA1-3DES and a SHA-1 MAC, what ``openssl pkcs12
-legacy`` writes. Passwords are generated per bundle when none is given and never logged.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certwarden.errors import MalformedFile, NotFound, PKIError, UsageError
from certwarden.pki.index import format_serial
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import (
    PrivateKey,
    cert_to_pem,
    key_to_pem,
    load_private_key,
    pem_blocks,
    same_public_key,
)

# Unambiguous on a phone keyboard: no 0/o, 1/l/i. 20 symbols of 31 = 99 bits.
_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
_GROUPS, _GROUP_LENGTH = 4, 5
MODERN_KDF_ROUNDS = 100_000
# What `openssl pkcs12 -export -legacy` uses; iOS is known to accept it.
LEGACY_KDF_ROUNDS = 2048


class BundleFormat(enum.StrEnum):
    PEM = "pem"
    P12 = "p12"
    P12_LEGACY = "p12-legacy"
    MOBILECONFIG = "mobileconfig"


def generate_password() -> str:
    """A strong password that is easy to type on a phone: ``k7fq2-mz9xa-…``."""
    groups = (
        "".join(secrets.choice(_ALPHABET) for _ in range(_GROUP_LENGTH)) for _ in range(_GROUPS)
    )
    return "-".join(groups)


@dataclass(frozen=True, slots=True)
class Identity:
    """A certificate with its private key and the chain up to the root."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def serial(self) -> str:
        return format_serial(self.cert.serial_number)


def load_identity(store: PKIStore, name: str, key_passphrase: bytes | None = None) -> Identity:
    """The current certificate of ``name`` with its key (decrypted with ``key_passphrase``,
    for easy-rsa's keys made without nopass) and the CA chain."""
    cert_path = store.cert_path(name)
    key_path = store.key_path(name)
    if not cert_path.exists():
        raise NotFound(f"issued/{name}.crt: no current certificate for {name}")
    if not key_path.exists():
        raise NotFound(
            f"private/{name}.key: not on this host (the certificate was made from a request); "
            "only its owner can build a bundle"
        )
    cert = store.load_cert(cert_path)
    key = load_private_key(
        store.read_file(key_path),
        store.relative(key_path),
        key_passphrase,
        if_encrypted="give its passphrase with --key-passphrase-file",
    )
    if not same_public_key(cert.public_key(), key.public_key()):
        raise PKIError(f"private/{name}.key: does not belong to issued/{name}.crt")
    chain = load_chain(store.read_file(store.ca_cert_path), store.relative(store.ca_cert_path))
    return Identity(name, cert, key, chain)


def load_chain(data: bytes, where: str) -> tuple[x509.Certificate, ...]:
    """Every certificate of ca.crt (``where`` names it): the CA, then any intermediates.

    A block that is not a readable certificate (a truncated copy, a key pasted in by mistake)
    is a one-line :class:`MalformedFile` naming the file and the block, never its content.
    """
    chain = []
    for number, block in enumerate(pem_blocks(data), start=1):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except (ValueError, UnsupportedAlgorithm):
            label = block.split(b"\n", 1)[0].decode("ascii", "replace")
            shown = label if label.isprintable() and len(label) <= 40 else "-----BEGIN ...-----"
            raise MalformedFile(
                f"{where}: PEM block {number} ({shown}) is not a readable certificate; the "
                "file must hold the CA certificate and its chain only: fix or remove that block"
            ) from None
    return tuple(chain)


def password_text(secret: bytes, where: Path | str) -> str:
    """A bundle password read from the file ``where`` as text; an error names the file and
    never quotes the bytes (a decoding error's message would show one)."""
    try:
        return secret.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"{where}: the bundle password is not UTF-8 text; write it to the file as UTF-8"
        ) from None


def pem_bundle(identity: Identity) -> bytes:
    """Certificate, chain, then key, in one PEM file (mode 0600 when written)."""
    parts = [cert_to_pem(identity.cert)]
    parts.extend(cert_to_pem(cert) for cert in identity.chain)
    parts.append(key_to_pem(identity.key))
    return b"".join(parts)


def pkcs12_bundle(identity: Identity, password: str, *, legacy: bool) -> bytes:
    if not password:
        raise UsageError("a PKCS#12 bundle needs a non-empty password")
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:
        encryption = (
            builder.kdf_rounds(LEGACY_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303 - what Apple devices require
            .build(password.encode())
        )
    else:
        encryption = (
            builder.kdf_rounds(MODERN_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password.encode())
        )
    return pkcs12.serialize_key_and_certificates(
        identity.name.encode(), identity.key, identity.cert, list(identity.chain), encryption
    )


def export_bundle(identity: Identity, fmt: BundleFormat, password: str | None) -> bytes:
    if fmt is BundleFormat.PEM:
        return pem_bundle(identity)
    if password is None:
        raise UsageError("PKCS#12 export needs a password")
    if fmt is BundleFormat.MOBILECONFIG:
        # Imported here: the profile builder is itself built on this module.
        from certwarden.pki.mobileconfig import build_mobileconfig

        return build_mobileconfig(identity, password)
    return pkcs12_bundle(identity, password, legacy=fmt is BundleFormat.P12_LEGACY)
