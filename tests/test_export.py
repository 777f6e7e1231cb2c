"""Bundles: PEM, modern PKCS#12, and the PKCS#12 that Apple devices accept."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PKI
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from certwarden.errors import NotFound, UsageError
from certwarden.pki.ca import IssueRequest
from certwarden.pki.export import (
    BundleFormat,
    Identity,
    export_bundle,
    generate_password,
    load_identity,
)
from certwarden.pki.x509 import pem_blocks
from certwarden.testing import require_tool

PASSWORD = "k7fq2-mz9xa-3hj4p-wr8tn"
# The documented alphabet: lowercase letters and digits without the look-alikes 0 o 1 l i.
ALPHABET = frozenset("23456789abcdefghjkmnpqrstuvwxyz")


@pytest.fixture
def identity(pki: PKI) -> Identity:
    pki.ca.issue([IssueRequest("alice")])
    return load_identity(pki.store, "alice")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_pem_bundle_holds_certificate_then_ca_then_key(pki: PKI, identity: Identity) -> None:
    bundle = export_bundle(identity, BundleFormat.PEM, None)
    blocks = list(pem_blocks(bundle))
    assert [block.split(b"\n")[0] for block in blocks] == [
        b"-----BEGIN CERTIFICATE-----",
        b"-----BEGIN CERTIFICATE-----",
        b"-----BEGIN PRIVATE KEY-----",
    ]
    assert blocks[0] == (pki.root / "issued" / "alice.crt").read_bytes()
    assert blocks[1] == (pki.root / "ca.crt").read_bytes()
    key = serialization.load_pem_private_key(blocks[2], None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == identity.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("fmt", [BundleFormat.P12, BundleFormat.P12_LEGACY])
def test_pkcs12_loads_back_with_its_password(identity: Identity, fmt: BundleFormat) -> None:
    bundle = export_bundle(identity, fmt, PASSWORD)
    key, cert, extra = pkcs12.load_key_and_certificates(bundle, PASSWORD.encode())
    assert cert is not None
    assert key is not None
    assert der(cert) == der(identity.cert)
    assert [der(c) for c in extra] == [der(c) for c in identity.chain]
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    loaded = pkcs12.load_pkcs12(bundle, PASSWORD.encode())
    assert loaded.cert is not None
    assert loaded.cert.friendly_name == b"alice"
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(bundle, b"wrong password")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (BundleFormat.P12, ["MAC: sha256", "AES-256-CBC"]),
        (BundleFormat.P12_LEGACY, ["MAC: sha1", "pbeWithSHA1And3-KeyTripleDES-CBC"]),
    ],
)
def test_openssl_reads_both_kinds_without_legacy_flag(
    identity: Identity, tmp_path: Path, fmt: BundleFormat, expected: list[str]
) -> None:
    openssl = require_tool("openssl")
    path = tmp_path / "bundle.p12"
    path.write_bytes(export_bundle(identity, fmt, PASSWORD))
    result = subprocess.run(
        [openssl, "pkcs12", "-info", "-in", str(path), "-passin", f"pass:{PASSWORD}", "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for text in expected:
        assert text in output
    if fmt is BundleFormat.P12:
        assert "TripleDES" not in output
        assert "MAC: sha1" not in output
    else:
        assert "AES" not in output


def test_pkcs12_needs_a_non_empty_password(identity: Identity) -> None:
    with pytest.raises(UsageError):
        export_bundle(identity, BundleFormat.P12, None)
    with pytest.raises(UsageError):
        export_bundle(identity, BundleFormat.P12_LEGACY, "")


def test_generated_passwords_are_23_characters_from_the_documented_alphabet() -> None:
    passwords = [generate_password() for _ in range(500)]
    assert len(set(passwords)) == len(passwords)
    for password in passwords:
        assert len(password) == 23
        groups = password.split("-")
        assert [len(group) for group in groups] == [5, 5, 5, 5]
        assert set("".join(groups)) <= ALPHABET
    # Every symbol of the alphabet is used: nothing is silently left out.
    assert set("".join(passwords).replace("-", "")) == ALPHABET


def test_identity_of_a_certificate_signed_from_a_request_has_no_key(
    pki: PKI, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob")]))
        .sign(key, hashes.SHA256())
    )
    csr_path = tmp_path / "bob.req"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    pki.ca.issue([IssueRequest("bob", csr=csr_path)])
    with pytest.raises(NotFound, match=r"private/bob\.key"):
        load_identity(pki.store, "bob")
    with pytest.raises(NotFound, match=r"issued/nobody\.crt"):
        load_identity(pki.store, "nobody")
