"""The desired state: the CA chain and CRLs nginx checks clients with, and each target's files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from certwarden.errors import CertwardenError, NotFound
from certwarden.pki.index import format_serial
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import load_private_key, pem_blocks, same_public_key
from certwarden.plugins.nginx.settings import MAX_READ, NginxError, Target


@dataclass(frozen=True)
class WantedFile:
    """One file nginx reads, with what it must hold."""

    what: str  # "ca_bundle", "crl", "certificate NAME", "key NAME"
    path: Path
    content: bytes
    mode: int


@dataclass(frozen=True)
class Trust:
    """What nginx needs to check client certificates: the CA chain and one CRL per CA."""

    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    verify_depth: int

    @property
    def ca_bundle(self) -> bytes:
        return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in self.cas)

    @property
    def crl_bundle(self) -> bytes:
        return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in self.crls)

    def chain_above(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The intermediate CAs from ``cert``'s issuer up to, not including, the root."""
        chain: list[x509.Certificate] = []
        current = cert
        while True:
            issuer = next((ca for ca in self.cas if _issued_by(current, ca)), None)
            if issuer is None or _self_signed(issuer) or issuer in chain:
                return chain
            chain.append(issuer)
            current = issuer

    def revoked(self, cert: x509.Certificate) -> bool:
        for crl in self.crls:
            if crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(
                cert.serial_number
            ):
                return True
        return False


def _issuer_key(cert: x509.Certificate) -> CertificateIssuerPublicKeyTypes | None:
    """The public key of ``cert`` if it is of a kind that can sign (not X25519, say)."""
    key = cert.public_key()
    if isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey
        | dsa.DSAPublicKey,
    ):
        return key
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = _issuer_key(ca)
    return crl.issuer == ca.subject and key is not None and crl.is_signature_valid(key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _dn(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _read_outside(path: Path, what: str) -> bytes:
    """A file outside the PKI (extra CA and CRL files, installed files)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_READ + 1)
    except FileNotFoundError:
        raise NginxError(f"{what} {path}: does not exist") from None
    except OSError as exc:
        raise NginxError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_READ:
        raise NginxError(f"{what} {path}: larger than {MAX_READ} bytes; not a PEM file")
    return data


_PEMObject = TypeVar("_PEMObject", x509.Certificate, x509.CertificateRevocationList)


def _pem_objects(
    data: bytes, where: str, label: str, what: str, load: Callable[[bytes], _PEMObject]
) -> list[_PEMObject]:
    """Every ``label`` PEM block of ``data``, loaded; an error names ``where`` and the block."""
    blocks = [b for b in pem_blocks(data) if b.startswith(f"-----BEGIN {label}-----".encode())]
    if not blocks:
        raise NginxError(f"{where}: holds no PEM {what}")
    objects = []
    for number, block in enumerate(blocks, start=1):
        try:
            objects.append(load(block))
        except ValueError:
            raise NginxError(f"{where}: {what} {number} cannot be read") from None
    return objects


def _pem_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    return _pem_objects(data, where, "CERTIFICATE", "certificate", x509.load_pem_x509_certificate)


def _pem_crls(data: bytes, where: str) -> list[x509.CertificateRevocationList]:
    return _pem_objects(data, where, "X509 CRL", "CRL", x509.load_pem_x509_crl)


def _unique(items: list[_PEMObject]) -> list[_PEMObject]:
    seen: set[bytes] = set()
    unique = []
    for item in items:
        der = item.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            unique.append(item)
    return unique


def build_trust(target: Target, store: PKIStore, now: datetime) -> Trust:
    """The CA chain and CRLs for ``target``, checked the way nginx will use them."""
    try:
        ca_data = store.read_file(store.ca_cert_path)
        crl_data = store.read_file(store.crl_pem_path)
    except CertwardenError as exc:
        raise NginxError(f"PKI: {exc}") from None
    cas = _pem_certificates(ca_data, "ca.crt")
    crls = _pem_crls(crl_data, "crl.pem")
    for path in target.extra_ca_files:
        cas += _pem_certificates(_read_outside(path, "extra CA file"), str(path))
    for path in target.extra_crl_files:
        crls += _pem_crls(_read_outside(path, "extra CRL file"), str(path))
    cas, crls = _unique(cas), _unique(crls)

    for ca in cas:
        if not _is_ca(ca):
            raise NginxError(f"{_dn(ca.subject)}: is not a CA certificate (basicConstraints)")
    depth = 0
    for ca in cas:
        # OpenSSL only trusts a chain that ends in a self-signed certificate of the bundle.
        chain = [ca]
        while not _self_signed(chain[-1]):
            issuer = next((c for c in cas if _issued_by(chain[-1], c)), None)
            if issuer is None or issuer in chain:
                raise NginxError(
                    f"CA {_dn(chain[-1].subject)} is issued by {_dn(chain[-1].issuer)}, which is "
                    "not in the bundle: add that CA's certificate to extra_ca_files"
                )
            chain.append(issuer)
        depth = max(depth, len(chain))

    signing_ca = cas[0]  # ca.crt's first certificate: the one whose key signs crl.pem
    for ca in cas:
        own = [crl for crl in crls if _crl_signed_by(crl, ca)]
        if not own:
            where = "run `certwarden crl`" if ca == signing_ca else "add it to extra_crl_files"
            raise NginxError(
                f"no CRL signed by CA {_dn(ca.subject)}: nginx checks a CRL for every CA in the "
                f"chain and would reject every client; {where}"
            )
        if len(own) > 1:
            raise NginxError(f"several CRLs of CA {_dn(ca.subject)}: keep only the newest one")
    for crl in crls:
        if not any(_crl_signed_by(crl, ca) for ca in cas):
            raise NginxError(
                f"a CRL of {_dn(crl.issuer)} matches no CA of the bundle (wrong file, or a CRL "
                "not signed by the current CA)"
            )
        if crl.last_update_utc > now:
            raise NginxError(
                f"the CRL of {_dn(crl.issuer)} is valid only from {_when(crl.last_update_utc)}: "
                "nginx would reject every client until then"
            )
        if crl.next_update_utc is not None and crl.next_update_utc <= now:
            raise NginxError(
                f"the CRL of {_dn(crl.issuer)} expired at {_when(crl.next_update_utc)}: nginx "
                "would reject every client; publish a new one"
            )
    return Trust(tuple(cas), tuple(crls), depth)


@dataclass(frozen=True)
class PKICertificate:
    """A certificate of the PKI with its key, ready for nginx or the probe."""

    name: str
    cert: x509.Certificate
    cert_path: Path
    key_pem: bytes
    key_path: Path

    @property
    def serial(self) -> str:
        return format_serial(self.cert.serial_number)


def load_pki_certificate(
    name: str, store: PKIStore, trust: Trust | None, now: datetime
) -> PKICertificate:
    """``issued/NAME.crt`` and its key, checked: current, matching, not revoked."""
    cert_path, key_path = store.cert_path(name), store.key_path(name)
    try:
        cert = store.load_cert(cert_path)
        key_pem = store.read_file(key_path)
        key = load_private_key(
            key_pem,
            store.relative(key_path),
            if_encrypted=f"nginx reads it unencrypted; `certwarden renew {name}` gives the "
            "certificate a new, unencrypted key",
        )
    except NotFound as exc:
        raise NginxError(
            f"certificate {name}: {exc} (revoked and not issued again? "
            f"`certwarden issue {name}` makes a new one)"
        ) from None
    except CertwardenError as exc:
        raise NginxError(f"certificate {name}: {exc}") from None
    if not same_public_key(cert.public_key(), key.public_key()):
        raise NginxError(
            f"certificate {name}: private/{name}.key does not belong to issued/{name}.crt "
            "(a renewal in progress?)"
        )
    if cert.not_valid_after_utc <= now:
        raise NginxError(f"certificate {name}: expired at {_when(cert.not_valid_after_utc)}")
    if trust is not None and trust.revoked(cert):
        raise NginxError(
            f"certificate {name}: serial {format_serial(cert.serial_number)} is revoked; "
            f"issue a new one"
        )
    return PKICertificate(name, cert, cert_path, key_pem, key_path)


@dataclass
class Plan:
    """What one target should hold, and what could not be worked out (left as it is)."""

    files: list[WantedFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trust: Trust | None = None
    servers: dict[str, PKICertificate] = field(default_factory=dict)
    probe_identity: PKICertificate | None = None


def plan_target(target: Target, store: PKIStore, now: datetime) -> Plan:
    """Prepare: the desired files of ``target``. Each server certificate stands on its own,
    so one missing certificate never holds up a CRL; without the trust (a broken extra file),
    nothing is installed: a server certificate's chain and its revocation come from it."""
    plan = Plan()
    try:
        plan.trust = build_trust(target, store, now)
    except NginxError as exc:
        plan.problems.append(f"CA bundle and CRL not updated: {exc}")
        if target.server_certificates:
            plan.problems.append(
                "server certificates not updated either: their chain comes from the CA bundle"
            )
        return plan
    plan.files += [
        WantedFile("ca_bundle", target.ca_bundle, plan.trust.ca_bundle, target.mode),
        WantedFile("crl", target.crl, plan.trust.crl_bundle, target.mode),
    ]
    for server in target.server_certificates:
        try:
            loaded = load_pki_certificate(server.name, store, plan.trust, now)
        except NginxError as exc:
            plan.problems.append(f"server {exc}; the installed one is kept")
            continue
        chain = plan.trust.chain_above(loaded.cert)
        content = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [loaded.cert, *chain]
        )
        plan.servers[server.name] = loaded
        plan.files += [
            WantedFile(f"certificate {server.name}", server.cert, content, target.mode),
            WantedFile(f"key {server.name}", server.key, loaded.key_pem, target.key_mode),
        ]
    if target.probe is not None:
        try:
            plan.probe_identity = load_pki_certificate(
                target.probe.certificate, store, plan.trust, now
            )
        except NginxError as exc:
            plan.problems.append(f"probe not made: client {exc}")
    return plan
