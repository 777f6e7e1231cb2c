"""X.509 building blocks on ``cryptography``: keys, certificates, CRLs, and safe loading.

Nothing here touches the PKI directory; :mod:`certwarden.pki.store` decides where bytes go.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import CRLEntryExtensionOID, ExtendedKeyUsageOID, NameOID

from certwarden.errors import MalformedFile, PKIError, UsageError
from certwarden.pki.index import Revocation, format_date, format_serial, parse_date
from certwarden.pki.model import KeyType, Profile, Reason

# The key types certwarden issues with and accepts (what easy-rsa and TLS clients use).
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# Certificates are backdated a little so a client whose clock runs slow still accepts them.
BACKDATE = timedelta(minutes=1)

_REASON_FLAGS = {
    Reason.UNSPECIFIED: x509.ReasonFlags.unspecified,
    Reason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    Reason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    Reason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    Reason.SUPERSEDED: x509.ReasonFlags.superseded,
    Reason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    Reason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
}
_REASON_EXTENSIONS = {
    reason: x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag))
    for reason, flag in _REASON_FLAGS.items()
}
# id-ce-holdInstructionCode (RFC 5280 5.3.2): cryptography has no class for it, so it is written
# as an UnrecognizedExtension holding the instruction's DER OBJECT IDENTIFIER.
HOLD_INSTRUCTION_CODE = x509.ObjectIdentifier("2.5.29.23")


# What a CA's key may do: sign certificates and CRLs (and, for OCSP or TLS, data).
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def generate_key(key_type: KeyType) -> PrivateKey:
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048 | KeyType.RSA_3072 | KeyType.RSA_4096:
            return rsa.generate_private_key(65537, int(key_type.value.split("-")[1]))
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
    raise UsageError(f"key type {key_type!r} is not supported")


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # EdDSA hashes internally
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_to_pem(key: PrivateKeyTypes, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_serial(taken: set[str]) -> int:
    """A random 128-bit serial like easy-rsa's, never one in ``taken`` (hex strings)."""
    while True:
        serial = secrets.randbits(128)
        if serial >= 1 << 64 and format_serial(serial) not in taken:
            return serial


def load_certificate(data: bytes, where: str) -> x509.Certificate:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MalformedFile(
            f"{where}: not a readable certificate ({_first_line(exc)}); restore it from "
            "certs_by_serial/ or a backup, or remove it"
        ) from None


def load_csr(data: bytes, where: str) -> x509.CertificateSigningRequest:
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise MalformedFile(f"{where}: not a readable certificate request ({exc})") from None
    if not csr.is_signature_valid:
        raise MalformedFile(f"{where}: the request's signature does not match its key")
    return csr


def load_private_key(
    data: bytes,
    where: str,
    passphrase: bytes | None = None,
    *,
    if_encrypted: str = "certwarden needs it unencrypted",
) -> PrivateKey:
    """A PEM private key. ``if_encrypted`` is the advice when it is encrypted and no
    ``passphrase`` was given (the CA's key: where its passphrase file is configured)."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise MalformedFile(f"{where}: the key is encrypted; {if_encrypted}") from None
        raise MalformedFile(
            f"{where}: the key is not encrypted but a passphrase was given"
        ) from None
    except ValueError:
        # Deliberately no detail: the message of a failed decryption may echo key material.
        raise MalformedFile(
            f"{where}: cannot read the private key (wrong passphrase or not a PEM key)"
        ) from None
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise MalformedFile(f"{where}: unsupported key type {type(key).__name__}")
    return key


def public_key_of_key_file(key_pem: bytes, request_pem: bytes | None) -> PublicKeyTypes | None:
    """The public key of a PEM private key without decrypting it: for an encrypted one
    (easy-rsa's gen-req without nopass), that of the request made with it. None when neither
    can be read."""
    try:
        return serialization.load_pem_private_key(key_pem, password=None).public_key()
    except TypeError:  # encrypted: easy-rsa's gen-req wrote its request next to it
        pass
    except (ValueError, UnsupportedAlgorithm):
        return None
    if request_pem is None:
        return None
    try:
        return x509.load_pem_x509_csr(request_pem).public_key()
    except ValueError:
        return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def profile_of(cert: x509.Certificate) -> Profile:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return Profile.CA
    except x509.ExtensionNotFound:
        pass
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return Profile.UNKNOWN
    server = ExtendedKeyUsageOID.SERVER_AUTH in usages
    client = ExtendedKeyUsageOID.CLIENT_AUTH in usages
    if server and client:
        return Profile.SERVER_CLIENT
    if server:
        return Profile.SERVER
    if client:
        return Profile.CLIENT
    return Profile.UNKNOWN


def parse_san(text: str) -> x509.GeneralName:
    """``DNS:host``, ``IP:addr``, ``email:addr`` or ``URI:uri`` (easy-rsa's --san syntax)."""
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if not sep or not value:
        raise UsageError(f"SAN {text!r}: write it as DNS:name, IP:address or email:address")
    if kind == "dns":
        if any(ch.isspace() or ch in "/\\" for ch in value):
            raise UsageError(f"SAN {text!r}: not a DNS name")
        return x509.DNSName(value)
    if kind == "ip":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise UsageError(f"SAN {text!r}: not an IPv4 or IPv6 address") from None
    if kind == "email":
        if "@" not in value or any(ch.isspace() for ch in value):
            raise UsageError(f"SAN {text!r}: not an email address")
        return x509.RFC822Name(value)
    if kind == "uri":
        if any(ch.isspace() for ch in value) or ":" not in value:
            raise UsageError(f"SAN {text!r}: not a URI")
        return x509.UniformResourceIdentifier(value)
    raise UsageError(f"SAN {text!r}: type must be DNS, IP, email or URI")


def sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def subject_for(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


# The short names OpenSSL writes in index.txt (OBJ_nid2sn()) for the attributes a subject may
# hold (checked against openssl x509 -nameopt compat); others are written as dotted OIDs, as
# OpenSSL does for an OID it does not know.
_OPENSSL_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.13": "description",
    "2.5.4.14": "searchGuide",
    "2.5.4.15": "businessCategory",
    "2.5.4.16": "postalAddress",
    "2.5.4.17": "postalCode",
    "2.5.4.18": "postOfficeBox",
    "2.5.4.19": "physicalDeliveryOfficeName",
    "2.5.4.20": "telephoneNumber",
    "2.5.4.21": "telexNumber",
    "2.5.4.22": "teletexTerminalIdentifier",
    "2.5.4.23": "facsimileTelephoneNumber",
    "2.5.4.24": "x121Address",
    "2.5.4.25": "internationaliSDNNumber",
    "2.5.4.26": "registeredAddress",
    "2.5.4.27": "destinationIndicator",
    "2.5.4.28": "preferredDeliveryMethod",
    "2.5.4.29": "presentationAddress",
    "2.5.4.30": "supportedApplicationContext",
    "2.5.4.31": "member",
    "2.5.4.32": "owner",
    "2.5.4.33": "roleOccupant",
    "2.5.4.34": "seeAlso",
    "2.5.4.35": "userPassword",
    "2.5.4.36": "userCertificate",
    "2.5.4.37": "cACertificate",
    "2.5.4.38": "authorityRevocationList",
    "2.5.4.39": "certificateRevocationList",
    "2.5.4.40": "crossCertificatePair",
    "2.5.4.41": "name",
    "2.5.4.42": "GN",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.45": "x500UniqueIdentifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.47": "enhancedSearchGuide",
    "2.5.4.48": "protocolInformation",
    "2.5.4.49": "distinguishedName",
    "2.5.4.50": "uniqueMember",
    "2.5.4.51": "houseIdentifier",
    "2.5.4.52": "supportedAlgorithms",
    "2.5.4.53": "deltaRevocationList",
    "2.5.4.54": "dmdName",
    "2.5.4.65": "pseudonym",
    "2.5.4.72": "role",
    "2.5.4.97": "organizationIdentifier",
    "2.5.4.98": "c3",
    "2.5.4.99": "n3",
    "2.5.4.100": "dnsName",
    "1.2.840.113549.1.9.1": "emailAddress",
    "1.2.840.113549.1.9.2": "unstructuredName",
    "1.2.840.113549.1.9.8": "unstructuredAddress",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.3": "mail",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
}
# The bytes of a value as its string type encodes them (OpenSSL writes those bytes).
_VALUE_ENCODINGS = {_ASN1Type.BMPString: "utf-16-be", _ASN1Type.UniversalString: "utf-32-be"}
# Printable ASCII but / and + (which OpenSSL escapes with a backslash)
_PLAIN = frozenset(chr(code) for code in range(0x20, 0x7F)) - {"/", "+"}


def slash_subject(name: x509.Name) -> str:
    """OpenSSL's one-line form (``/CN=alice``), as ``openssl ca`` writes it in index.txt.

    As X509_NAME_oneline() does: each attribute as /SHORTNAME=value, + instead of / between
    the attributes of one multi-valued RDN, / and + in a value escaped with a backslash, and
    every byte of the value outside printable ASCII as \\xHH.
    """
    parts = []
    for rdn in name.rdns:
        separator = "/"
        for attr in rdn:
            oid = attr.oid.dotted_string
            parts.append(f"{separator}{_OPENSSL_SHORT_NAMES.get(oid, oid)}={_oneline_value(attr)}")
            separator = "+"
    return "".join(parts)


def _oneline_value(attr: x509.NameAttribute[str | bytes]) -> str:
    value = attr.value
    if isinstance(value, str):
        if _PLAIN.issuperset(value):
            return value
        value = value.encode(_VALUE_ENCODINGS.get(attr._type, "utf-8"))
    return "".join(
        f"\\{chr(byte)}"
        if byte in b"/+"
        else chr(byte)
        if 0x20 <= byte < 0x7F
        else f"\\x{byte:02X}"
        for byte in value
    )


def build_ca(key: PrivateKey, common_name: str, now: datetime, days: int) -> x509.Certificate:
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_for(common_name))
        .issuer_name(subject_for(common_name))
        .public_key(public)
        .serial_number(new_serial(set()))
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            CA_KEY_USAGE,
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, signature_hash(key))


def _key_usage(profile: Profile, public: CertificatePublicKeyTypes) -> x509.KeyUsage:
    # keyEncipherment only means something for RSA key transport (TLS 1.2 RSA kx on servers).
    encipher = isinstance(public, rsa.RSAPublicKey) and profile in (
        Profile.SERVER,
        Profile.SERVER_CLIENT,
    )
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_EKU = {
    Profile.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Profile.SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
    Profile.SERVER_CLIENT: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}


@dataclass(frozen=True, slots=True)
class CertificateTemplate:
    """What to put in one certificate, independent of the key it is for."""

    name: str
    profile: Profile
    sans: tuple[x509.GeneralName, ...]
    not_before: datetime
    not_after: datetime
    subject: x509.Name | None = None  # None: /CN=name (a renewal keeps the old subject)


class Signer:
    """The CA's key and certificate, with what every issued certificate shares precomputed."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: PrivateKey) -> None:
        self.cert = ca_cert
        self.key = ca_key
        self.hash = signature_hash(ca_key)
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        self._basic = x509.Extension(
            x509.BasicConstraints.oid, False, x509.BasicConstraints(ca=False, path_length=None)
        )

    def issue(
        self, template: CertificateTemplate, public: CertificatePublicKeyTypes, serial: int
    ) -> x509.Certificate:
        if template.profile not in _EKU:
            raise UsageError(
                f"{template.name}: cannot issue a certificate of kind {template.profile}"
            )
        sans = list(template.sans)
        if not sans and template.profile in (Profile.SERVER, Profile.SERVER_CLIENT):
            sans = [x509.DNSName(template.name)]  # as easy-rsa does for server certificates
        extensions: list[x509.Extension[x509.ExtensionType]] = [
            self._basic,
            x509.Extension(
                x509.SubjectKeyIdentifier.oid,
                False,
                x509.SubjectKeyIdentifier.from_public_key(public),
            ),
            x509.Extension(x509.AuthorityKeyIdentifier.oid, False, self._aki),
            x509.Extension(
                x509.ExtendedKeyUsage.oid, False, x509.ExtendedKeyUsage(_EKU[template.profile])
            ),
            x509.Extension(x509.KeyUsage.oid, True, _key_usage(template.profile, public)),
        ]
        if sans:
            extensions.append(
                x509.Extension(
                    x509.SubjectAlternativeName.oid, False, x509.SubjectAlternativeName(sans)
                )
            )
        builder = x509.CertificateBuilder(
            issuer_name=self.cert.subject,
            subject_name=(
                subject_for(template.name) if template.subject is None else template.subject
            ),
            public_key=public,
            serial_number=serial,
            not_valid_before=template.not_before,
            not_valid_after=template.not_after,
            extensions=extensions,
        )
        return builder.sign(self.key, self.hash)

    def crl(
        self,
        revoked: Sequence[Revocation],
        number: int,
        last_update: datetime,
        next_update: datetime,
    ) -> x509.CertificateRevocationList:
        """Sign a CRL of ``revoked`` entries (see :data:`~certwarden.pki.index.Revocation`).

        cryptography signs the CRL without entries; the entries are written here in DER, put
        in place and signed again. Its builders cost ~4 us an entry (an object each, checked,
        then encoded again): seconds at 100k entries, slower than ``openssl ca -gencrl``. The
        bytes are the same (tests/test_crl_encoding.py). Other key types go through the
        builders as before. An entry whose revocation date could not be read gets
        ``last_update``: the CA knew of the revocation by then at the latest.

        Extensions of an entry, in the order ``openssl ca -gencrl`` writes them: reasonCode,
        invalidityDate (GeneralizedTime), holdInstructionCode.
        """
        extensions = [
            x509.Extension(x509.AuthorityKeyIdentifier.oid, False, self._aki),
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
        ]
        header = x509.CertificateRevocationListBuilder(
            issuer_name=self.cert.subject,
            last_update=last_update,
            next_update=next_update,
            extensions=extensions,
        ).sign(self.key, self.hash)
        encoded = _encode_revoked(revoked, format_date(last_update))
        crl = _with_entries(header, encoded, self.key, self.hash)
        if crl is not None:
            return crl
        entries: list[x509.RevokedCertificate] = []
        for serial_hex, date, reason, invalidity, hold in revoked:
            try:
                entry = x509.RevokedCertificateBuilder(
                    serial_number=int(serial_hex, 16),
                    revocation_date=last_update if date is None else parse_date(date),
                    extensions=[],
                )
            except ValueError as exc:  # serial 0 or over 159 bits: cryptography refuses them
                raise PKIError(
                    f"index.txt: serial {serial_hex}: cannot be put in a CRL ({exc})"
                ) from None
            if reason is not None:
                ext = _REASON_EXTENSIONS[reason]
                entry = entry.add_extension(ext.value, ext.critical)
            if invalidity is not None:
                entry = entry.add_extension(x509.InvalidityDate(parse_date(invalidity)), False)
            if hold is not None:
                entry = entry.add_extension(
                    x509.UnrecognizedExtension(HOLD_INSTRUCTION_CODE, _der_oid(hold)), False
                )
            entries.append(entry.build())
        # The constructor takes the whole list: add_revoked_certificate() copies the list on
        # every call, which makes 100k entries quadratic (seconds instead of milliseconds).
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self.cert.subject,
            last_update=last_update,
            next_update=next_update,
            extensions=extensions,
            revoked_certificates=entries,
        )
        return builder.sign(self.key, self.hash)


# ---- CRL entries in DER (what RevokedCertificateBuilder and the CRL builder would write) ----


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _der(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _der_length(len(body)) + body


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_children(tlv: bytes) -> list[bytes]:
    """The TLVs inside one constructed DER TLV (definite lengths, as DER always has)."""
    first = tlv[1]
    pos = 2 + (first & 0x7F if first & 0x80 else 0)
    children = []
    while pos < len(tlv):
        first = tlv[pos + 1]
        if first & 0x80:
            count = first & 0x7F
            size = int.from_bytes(tlv[pos + 2 : pos + 2 + count], "big")
            end = pos + 2 + count + size
        else:
            end = pos + 2 + first
        children.append(tlv[pos:end])
        pos = end
    return children


def _der_extension(oid: x509.ObjectIdentifier, value: bytes) -> bytes:
    """One non-critical Extension: SEQUENCE { extnID, extnValue OCTET STRING }."""
    return _der(0x30, _der_oid(oid.dotted_string) + _der(0x04, value))


# One reasonCode extension for each reason, and crlEntryExtensions holding only that.
_REASON_DER = {
    reason: _der_extension(ext.oid, ext.value.public_bytes())
    for reason, ext in _REASON_EXTENSIONS.items()
}
_ENTRY_EXTENSIONS: dict[Reason | None, bytes] = {
    None: b"",
    **{reason: _der(0x30, der) for reason, der in _REASON_DER.items()},
}


def _entry_extensions(reason: Reason | None, invalidity: str | None, hold: str | None) -> bytes:
    """crlEntryExtensions with an invalidity date (YYYYMMDDHHMMSSZ) or a hold instruction."""
    parts = [] if reason is None else [_REASON_DER[reason]]
    if invalidity is not None:
        parts.append(
            _der_extension(CRLEntryExtensionOID.INVALIDITY_DATE, _der(0x18, invalidity.encode()))
        )
    if hold is not None:
        parts.append(_der_extension(HOLD_INSTRUCTION_CODE, _der_oid(hold)))
    return _der(0x30, b"".join(parts))


def _encode_revoked(revoked: Iterable[Revocation], fallback_date: str) -> list[bytes]:
    """Each entry as DER; ``fallback_date`` (index.txt's syntax) for a date that is None.

    Every serial is written, as ``openssl ca -gencrl`` does, even 0 or over 20 octets, which
    RFC 5280 forbids and cryptography's builder refuses: a certificate index.txt says is
    revoked must be in the CRL.
    """
    out: list[bytes] = []
    append = out.append
    extensions = _ENTRY_EXTENSIONS
    for serial_hex, date, reason, invalidity, hold in revoked:
        serial = bytes.fromhex(serial_hex).lstrip(b"\0") or b"\0"  # DER INTEGERs are minimal
        if serial[0] & 0x80:
            serial = b"\0" + serial  # positive INTEGER: a leading zero keeps the sign bit off
        if date is None:
            date = fallback_date
        # index.txt already writes ASN.1 time syntax; RFC 5280 wants UTCTime for 1950-2049
        # and GeneralizedTime otherwise, whichever form the line used.
        if len(date) == 13:
            when = b"\x17\x0d" + date.encode()
        elif "1950" <= date[:4] < "2050":
            when = b"\x17\x0d" + date[2:].encode()
        else:
            when = b"\x18\x0f" + date.encode()
        if invalidity is None and hold is None:
            ext = extensions[reason]
        else:
            ext = _entry_extensions(reason, invalidity, hold)
        size = len(serial)
        body = b"\x02" + (bytes((size,)) if size < 0x80 else _der_length(size)) + serial
        body += when + ext
        # Usually at most 22 + 17 + 14 bytes: the length fits the one-byte form.
        size = len(body)
        append(b"\x30" + (bytes((size,)) if size < 0x80 else _der_length(size)) + body)
    return out


def _with_entries(
    header: x509.CertificateRevocationList,
    entries: list[bytes],
    key: PrivateKey,
    digest: hashes.SHA256 | hashes.SHA384 | None,
) -> x509.CertificateRevocationList | None:
    """``header`` (a signed CRL without entries) with ``entries``, signed again by ``key``."""
    outer = _der_children(header.public_bytes(serialization.Encoding.DER))
    fields = _der_children(outer[0])  # version, signature, issuer, thisUpdate, nextUpdate, [0]
    if len(fields) != 6 or fields[0] != b"\x02\x01\x01" or fields[5][0] != 0xA0:
        return None
    revoked = [_der(0x30, b"".join(entries))] if entries else []
    tbs = _der(0x30, b"".join([*fields[:5], *revoked, fields[5]]))
    header_tbs = header.tbs_certlist_bytes
    try:
        # Sign as the builder signed the header (proven by checking its signature that way),
        # so the signature algorithm the header names is the one used.
        if isinstance(key, ec.EllipticCurvePrivateKey) and digest is not None:
            key.public_key().verify(header.signature, header_tbs, ec.ECDSA(digest))
            signature = key.sign(tbs, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPrivateKey) and digest is not None:
            key.public_key().verify(header.signature, header_tbs, padding.PKCS1v15(), digest)
            signature = key.sign(tbs, padding.PKCS1v15(), digest)
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            key.public_key().verify(header.signature, header_tbs)
            signature = key.sign(tbs)
        else:
            return None
    except InvalidSignature:
        return None
    return x509.load_der_x509_crl(_der(0x30, tbs + outer[1] + _der(0x03, b"\x00" + signature)))


def der_to_pem(der: bytes, label: str) -> bytes:
    """PEM from DER: base64 in 64-character lines between BEGIN and END ``label``.

    For a big CRL this is much cheaper than asking cryptography to encode it a second time.
    """
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"".join(
        (
            f"-----BEGIN {label}-----\n".encode(),
            b"\n".join(lines),
            f"\n-----END {label}-----\n".encode(),
        )
    )


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(
        serialization.Encoding.DER, fmt
    )


def pem_blocks(data: bytes) -> Iterable[bytes]:
    """Each PEM block in ``data`` (a chain file holds several)."""
    marker = b"-----BEGIN "
    start = data.find(marker)
    while start != -1:
        end = data.find(b"-----END ", start)
        if end == -1:
            return
        end = data.find(b"-----", end + 9)
        if end == -1:
            return
        yield data[start : end + 5] + b"\n"
        start = data.find(marker, end)
