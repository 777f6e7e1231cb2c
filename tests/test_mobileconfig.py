"""Apple configuration profiles: their shape, renewals replacing them, signing, the CLI."""

from __future__ import annotations

import plistlib
import re
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import PKI, RunCli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from mdmserver import OpenedProfile, assert_apple_pkcs12
from profiles import SigningChain, der

from certwarden.errors import PKIError
from certwarden.pki.ca import IssueRequest
from certwarden.pki.export import Identity, load_identity
from certwarden.pki.mobileconfig import (
    ProfileOptions,
    ProfileSigner,
    build_mobileconfig,
    profile_identifier,
    sign_profile,
)

PASSWORD = "k7fq2-mz9xa-3hj4p-wr8tn"
UUID4 = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}")


@pytest.fixture
def identity(pki: PKI) -> Identity:
    pki.ca.issue([IssueRequest("alice-phone")])
    return load_identity(pki.store, "alice-phone")


def test_profile_installs_the_ca_as_root_and_the_identity_as_pkcs12(
    pki: PKI, identity: Identity
) -> None:
    options = ProfileOptions(
        identifier_prefix="com.example.certs",
        display_name="{name} at Example",
        organization="Example Ltd",
    )
    opened = OpenedProfile.parse(build_mobileconfig(identity, PASSWORD, options))
    plist = opened.plist
    assert plist["PayloadVersion"] == 1
    assert plist["PayloadIdentifier"] == "com.example.certs.alice-phone"
    assert plist["PayloadDisplayName"] == "alice-phone at Example"
    assert plist["PayloadOrganization"] == "Example Ltd"
    assert all(UUID4.fullmatch(value) for value in opened.uuids())
    assert [p["PayloadType"] for p in plist["PayloadContent"]] == [
        "com.apple.security.root",
        "com.apple.security.pkcs12",
    ]
    root = plist["PayloadContent"][0]
    assert root["PayloadVersion"] == 1
    assert root["PayloadCertificateFileName"].endswith(".cer")
    assert root["PayloadContent"] == der(pki.store.ca_certificate())
    payload = opened.pkcs12_payload
    assert payload["PayloadCertificateFileName"] == "alice-phone.p12"
    assert "Password" not in payload  # by default the device asks for it
    key, cert, chain = pkcs12.load_key_and_certificates(opened.pkcs12, PASSWORD.encode())
    assert cert is not None and key is not None
    assert der(cert) == der(identity.cert)
    assert [der(c) for c in chain] == [der(c) for c in identity.chain]


def test_embedded_password_opens_the_pkcs12(identity: Identity) -> None:
    options = ProfileOptions(embed_password=True)
    opened = OpenedProfile.parse(build_mobileconfig(identity, PASSWORD, options))
    password = opened.pkcs12_payload["Password"]
    assert password == PASSWORD
    _, cert, _ = pkcs12.load_key_and_certificates(opened.pkcs12, password.encode())
    assert cert is not None and der(cert) == der(identity.cert)


def test_renewed_profile_keeps_its_identifiers_with_fresh_uuids(
    pki: PKI, identity: Identity
) -> None:
    before = OpenedProfile.parse(build_mobileconfig(identity, PASSWORD))
    pki.clock.advance(timedelta(days=1))
    pki.ca.renew(["alice-phone"])
    renewed = load_identity(pki.store, "alice-phone")
    after = OpenedProfile.parse(build_mobileconfig(renewed, PASSWORD))
    assert renewed.serial != identity.serial
    assert after.identifiers() == before.identifiers()
    assert after.identifiers()[0] == profile_identifier("certwarden", "alice-phone")
    assert not set(after.uuids()) & set(before.uuids())
    _, cert, _ = pkcs12.load_key_and_certificates(after.pkcs12, PASSWORD.encode())
    assert cert is not None and der(cert) == der(renewed.cert)


def test_openssl_sees_sha1_mac_and_3des_in_the_profile_pkcs12(
    identity: Identity, tmp_path: Path
) -> None:
    opened = OpenedProfile.parse(build_mobileconfig(identity, PASSWORD))
    assert_apple_pkcs12(opened.pkcs12, PASSWORD, tmp_path)


def test_identifier_prefix_must_be_reverse_dns() -> None:
    assert profile_identifier("com.example", "bob") == "com.example.bob"
    for bad in ("", ".com", "com..x", "com example", "com/x"):
        with pytest.raises(ValueError, match="reverse-DNS"):
            profile_identifier(bad, "bob")


# ---- signing ----------------------------------------------------------------------------------


@pytest.fixture(params=["ec", "rsa"])
def signing_chain(request: pytest.FixtureRequest, tmp_path: Path) -> SigningChain:
    return SigningChain.create(tmp_path / "signing", request.param)


def test_openssl_cms_verifies_a_signed_profile_and_returns_the_plist_byte_for_byte(
    identity: Identity, tmp_path: Path, signing_chain: SigningChain
) -> None:
    signer = ProfileSigner.from_pem(
        signing_chain.cert_file.read_bytes(),
        signing_chain.key_file.read_bytes(),
        cert_where="signer.pem",
        key_where="k",
    )
    plist = build_mobileconfig(identity, PASSWORD)

    assert signing_chain.verified(sign_profile(plist, signer), tmp_path) == plist


def test_signer_key_must_match_its_certificate(signing_chain: SigningChain) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(PKIError, match="does not belong"):
        ProfileSigner.from_pem(
            signing_chain.cert_file.read_bytes(), other, cert_where="c", key_where="k"
        )


# ---- certwarden export --format mobileconfig ----------------------------------------------------


def test_export_writes_a_profile_and_shows_the_password_once(
    pki: PKI, identity: Identity, run_cli: RunCli, tmp_path: Path
) -> None:
    out = tmp_path / "alice.mobileconfig"
    argv: list[str | Path] = [
        "--pki", pki.root, "export", "alice-phone", "--format", "mobileconfig", "--out", out
    ]  # fmt: skip
    code, stdout, stderr = run_cli(
        [*argv, "--identifier-prefix", "com.example", "--organization", "Ex"]
    )
    assert (code, stderr) == (0, "")
    [password] = re.findall(r"^password: (\S+)$", stdout, re.MULTILINE)
    assert stdout.count(password) == 1
    assert out.stat().st_mode & 0o777 == 0o600
    opened = OpenedProfile.parse(out.read_bytes())
    assert opened.plist["PayloadIdentifier"] == "com.example.alice-phone"
    assert opened.plist["PayloadOrganization"] == "Ex"
    assert "Password" not in opened.pkcs12_payload
    _, cert, _ = pkcs12.load_key_and_certificates(opened.pkcs12, password.encode())
    assert cert is not None and der(cert) == der(identity.cert)


def test_export_can_embed_the_password_and_then_does_not_print_it(
    pki: PKI, identity: Identity, run_cli: RunCli, tmp_path: Path
) -> None:
    out = tmp_path / "alice.mobileconfig"
    argv: list[str | Path] = [
        "--pki", pki.root, "export", "alice-phone", "--format", "mobileconfig", "--out", out
    ]  # fmt: skip
    code, stdout, _ = run_cli([*argv, "--embed-password"])
    assert code == 0
    assert "password:" not in stdout
    opened = OpenedProfile.parse(out.read_bytes())
    password = opened.pkcs12_payload["Password"]
    assert password not in stdout
    pkcs12.load_key_and_certificates(opened.pkcs12, password.encode())


def test_export_signs_with_sign_cert_and_sign_key(
    pki: PKI,
    identity: Identity,
    run_cli: RunCli,
    tmp_path: Path,
    signing_chain: SigningChain,
) -> None:
    out = tmp_path / "signed.mobileconfig"
    argv: list[str | Path] = [
        "--pki", pki.root, "export", "alice-phone", "--format", "mobileconfig", "--out", out,
        "--sign-cert", signing_chain.cert_file, "--sign-key", signing_chain.key_file,
    ]  # fmt: skip
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    plist = signing_chain.verified(out.read_bytes(), tmp_path)
    assert plistlib.loads(plist)["PayloadType"] == "Configuration"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--format", "p12", "--organization", "Ex"],
            "--organization: only for --format mobileconfig",
        ),
        (["--format", "mobileconfig", "--identifier-prefix", "bad prefix"], "--identifier-prefix"),
        (
            ["--format", "mobileconfig", "--sign-key", "KEY"],
            "--sign-cert and --sign-key go together",
        ),
    ],
)
def test_export_profile_options_are_checked(
    pki: PKI,
    identity: Identity,
    run_cli: RunCli,
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("unused")
    extra = [str(key) if item == "KEY" else item for item in extra]
    argv: list[str | Path] = ["--pki", pki.root, "export", "alice-phone", "--out", tmp_path / "x"]
    argv += extra
    code, _, stderr = run_cli(argv)
    assert code == 64
    assert message in stderr
