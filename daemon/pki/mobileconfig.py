"""Apple configuration profiles (.mobileconfig) that install a client identity and its CA.

A profile is an XML property list: the CA as ``com.apple.security.root`` (intermediates as
``com.apple.security.pkcs1``) and the identity as ``com.apple.security.pkcs12`` in the
Apple-compatible PKCS#12 of :mod:`certwarden.pki.export`. Its PayloadIdentifier is stable per
certificate name, so installing the profile of a renewed certificate replaces the old one on
the device; its PayloadUUIDs are fresh, so the device sees a new version.

A profile can be signed: CMS SignedData in DER with the plist embedded (not detached) and the
signer's chain included, which is what iOS and macOS read. The Binary option keeps the plist
bytes exactly as they are; without it the signature covers S/MIME-canonicalised line endings.
"""

from __future__ import annotations

import plistlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from certwarden.errors import PKIError, UsageError
from certwarden.pki.export import Identity, pkcs12_bundle
from certwarden.pki.x509 import load_certificate, load_private_key, pem_blocks, same_public_key

# Used when nothing else is configured; sites should set their own reverse-DNS prefix.
DEFAULT_IDENTIFIER_PREFIX = "certwarden"
MEDIA_TYPE = "application/x-apple-aspen-config"
_PREFIX = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*")


def validate_identifier_prefix(prefix: str) -> str:
    """``prefix`` if it can start a PayloadIdentifier (``com.example.vpn``); else ValueError."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"{prefix!r} is not a reverse-DNS identifier such as com.example.certificates"
        )
    return prefix


def profile_identifier(prefix: str, name: str) -> str:
    """The PayloadIdentifier of ``name``'s profile: the same for every renewal of it."""
    return f"{validate_identifier_prefix(prefix)}.{name}"


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    """What a profile says about itself. ``display_name`` may use ``{name}``."""

    identifier_prefix: str = DEFAULT_IDENTIFIER_PREFIX
    display_name: str = "{name} certificate"
    organization: str | None = None
    description: str | None = None
    # Whether the PKCS#12 password goes into the profile: yes for an MDM, which installs
    # silently; no for a person, whose device then asks for it (it travels another way).
    embed_password: bool = False


@dataclass(frozen=True, slots=True)
class ProfileSigner:
    """A certificate and key that sign profiles, with the certificates that lead to its root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(
        cls, cert_pem: bytes, key_pem: bytes, *, cert_where: str, key_where: str
    ) -> ProfileSigner:
        """Load a signer: ``cert_pem`` holds the signing certificate, then its chain."""
        blocks = list(pem_blocks(cert_pem))
        if not blocks:
            raise PKIError(f"{cert_where}: holds no PEM certificate")
        cert = load_certificate(blocks[0], cert_where)
        chain = tuple(load_certificate(block, cert_where) for block in blocks[1:])
        key = load_private_key(key_pem, key_where, if_encrypted="a signing key must be unencrypted")
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PKIError(f"{key_where}: profiles can be signed with an RSA or EC key only")
        if not same_public_key(cert.public_key(), key.public_key()):
            raise PKIError(f"{key_where}: does not belong to the certificate in {cert_where}")
        return cls(cert, key, chain)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else cert.subject.rfc4514_string()
    return value if isinstance(value, str) else value.decode(errors="replace")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _uuid() -> str:
    return str(uuid.uuid4()).upper()


def _payload(kind: str, identifier: str, display_name: str, **fields: Any) -> dict[str, Any]:
    return {
        "PayloadType": kind,
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": _uuid(),
        "PayloadDisplayName": display_name,
        **fields,
    }


def profile_plist(
    identity: Identity, p12: bytes, password: str | None, options: ProfileOptions
) -> bytes:
    """The profile installing ``p12`` (``identity`` as PKCS#12) and ``identity``'s chain.

    ``password`` is written into the profile when given; leave it out to have the device ask.
    """
    identifier = profile_identifier(options.identifier_prefix, identity.name)
    content: list[dict[str, Any]] = []
    for position, cert in enumerate(identity.chain):
        self_signed = cert.subject == cert.issuer
        name = _common_name(cert)
        content.append(
            _payload(
                "com.apple.security.root" if self_signed else "com.apple.security.pkcs1",
                f"{identifier}.ca" + (f".{position}" if position else ""),
                name,
                PayloadContent=_der(cert),
                PayloadCertificateFileName=f"{_file_name(name)}.cer",
            )
        )
    identity_payload = _payload(
        "com.apple.security.pkcs12",
        f"{identifier}.identity",
        identity.name,
        PayloadContent=p12,
        PayloadCertificateFileName=f"{identity.name}.p12",
    )
    if password is not None:
        identity_payload["Password"] = password
    content.append(identity_payload)
    profile: dict[str, Any] = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": _uuid(),
        "PayloadDisplayName": options.display_name.format(name=identity.name),
        "PayloadDescription": options.description
        or f"Client certificate {identity.name} (serial {identity.serial}) and its CA.",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": content,
    }
    if options.organization:
        profile["PayloadOrganization"] = options.organization
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "ca"


def build_mobileconfig(
    identity: Identity,
    password: str,
    options: ProfileOptions | None = None,
    signer: ProfileSigner | None = None,
) -> bytes:
    """A profile for ``identity``, its PKCS#12 encrypted with ``password``; signed if asked."""
    options = options or ProfileOptions()
    if not password:
        raise UsageError("a profile's PKCS#12 needs a non-empty password")
    p12 = pkcs12_bundle(identity, password, legacy=True)
    plist = profile_plist(identity, p12, password if options.embed_password else None, options)
    return sign_profile(plist, signer) if signer is not None else plist


def sign_profile(plist: bytes, signer: ProfileSigner) -> bytes:
    """CMS SignedData (DER) embedding ``plist`` byte for byte, with the signer's chain."""
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(plist)
        .add_signer(signer.cert, signer.key, hashes.SHA256())
    )
    for cert in signer.chain:
        builder = builder.add_certificate(cert)
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
