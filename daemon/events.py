"""The immutable records handed to plugins: what changed, never the store itself.

An event is persisted as JSON with each delivery, so a failed delivery is retried with the same
event after a restart. Bundle accessors read the PKI when called: a plugin that only needs the
serial never touches a key.
"""

from __future__ import annotations

import enum
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certwarden.errors import NotFound, PKIError
from certwarden.pki.export import BundleFormat, Identity, export_bundle, load_chain
from certwarden.pki.model import CertRecord, Profile, Reason, Status
from certwarden.pki.x509 import load_certificate, load_private_key, same_public_key


class EventKind(enum.StrEnum):
    ISSUED = "issued"
    RENEWED = "renewed"
    REVOKED = "revoked"
    EXPIRING = "expiring"
    CRL_PUBLISHED = "crl_published"
    CA_CHANGED = "ca_changed"

    @property
    def hook_name(self) -> str:
        return f"certwarden_{self.value}"


def _dt(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _parse_dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: no longer exists (superseded by a newer change?)") from None


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """A certificate as plugins see it, with accessors for its files."""

    name: str
    serial: str
    profile: Profile
    status: Status
    not_before: datetime | None
    not_after: datetime
    subject: str
    revoked_at: datetime | None
    reason: Reason | None
    pki_dir: Path

    @classmethod
    def from_record(cls, record: CertRecord, pki_dir: Path) -> CertificateInfo:
        return cls(
            record.name,
            record.serial,
            record.profile,
            record.status,
            record.not_before,
            record.not_after,
            record.subject,
            record.revoked_at,
            record.reason,
            pki_dir,
        )

    @property
    def cert_path(self) -> Path:
        """The certificate's file; by serial, so it stays right after a later renewal."""
        for path in (
            self.pki_dir / "certs_by_serial" / f"{self.serial}.pem",
            self.pki_dir / "revoked" / "certs_by_serial" / f"{self.serial}.crt",
        ):
            if path.exists():
                return path
        return self.pki_dir / "issued" / f"{self.name}.crt"

    @property
    def key_path(self) -> Path:
        return self.pki_dir / "private" / f"{self.name}.key"

    @property
    def chain_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    def certificate(self) -> x509.Certificate:
        return load_certificate(_read(self.cert_path), str(self.cert_path))

    def cert_pem(self) -> bytes:
        return _read(self.cert_path)

    def chain_pem(self) -> bytes:
        return _read(self.chain_path)

    def has_key(self) -> bool:
        return self.key_path.exists()

    def identity(self) -> Identity:
        """Certificate, key and chain; fails if the key here belongs to another certificate."""
        cert = self.certificate()
        key = load_private_key(
            _read(self.key_path),
            str(self.key_path),
            if_encrypted=f"certwarden cannot put it in a bundle; `certwarden renew {self.name}` "
            "gives the certificate a new, unencrypted key",
        )
        if not same_public_key(cert.public_key(), key.public_key()):
            raise PKIError(
                f"{self.key_path}: belongs to a newer certificate of {self.name}; "
                f"serial {self.serial} was superseded"
            )
        chain = load_chain(self.chain_pem(), str(self.chain_path))
        return Identity(self.name, cert, key, chain)

    def bundle(self, fmt: BundleFormat, password: str | None = None) -> bytes:
        return export_bundle(self.identity(), fmt, password)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "serial": self.serial,
            "profile": self.profile.value,
            "status": self.status.value,
            "not_before": _dt(self.not_before),
            "not_after": _dt(self.not_after),
            "subject": self.subject,
            "revoked_at": _dt(self.revoked_at),
            "reason": self.reason.value if self.reason else None,
            "pki_dir": str(self.pki_dir),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CertificateInfo:
        not_after = _parse_dt(data["not_after"])
        assert not_after is not None
        return cls(
            name=data["name"],
            serial=data["serial"],
            profile=Profile(data["profile"]),
            status=Status(data["status"]),
            not_before=_parse_dt(data["not_before"]),
            not_after=not_after,
            subject=data["subject"],
            revoked_at=_parse_dt(data["revoked_at"]),
            reason=Reason(data["reason"]) if data["reason"] else None,
            pki_dir=Path(data["pki_dir"]),
        )


@dataclass(frozen=True, slots=True)
class CRLInfo:
    number: int | None
    last_update: datetime
    next_update: datetime | None
    revoked: int
    sha256: str
    pem_path: Path
    der_path: Path

    def pem(self) -> bytes:
        return _read(self.pem_path)

    def der(self) -> bytes:
        # Converted from crl.pem, not read from der_path: easy-rsa 3.1's gen-crl writes only
        # crl.pem, so crl.der may still hold the CRL before it.
        crl = x509.load_pem_x509_crl(self.pem())
        return crl.public_bytes(serialization.Encoding.DER)

    @classmethod
    def from_crl(cls, crl: x509.CertificateRevocationList, data: bytes, pki_dir: Path) -> CRLInfo:
        from certwarden.pki.x509 import crl_number

        return cls(
            number=crl_number(crl),
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            revoked=len(crl),
            sha256=hashlib.sha256(data).hexdigest(),
            pem_path=pki_dir / "crl.pem",
            der_path=pki_dir / "crl.der",
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "last_update": _dt(self.last_update),
            "next_update": _dt(self.next_update),
            "revoked": self.revoked,
            "sha256": self.sha256,
            "pem_path": str(self.pem_path),
            "der_path": str(self.der_path),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CRLInfo:
        last_update = _parse_dt(data["last_update"])
        assert last_update is not None
        return cls(
            data["number"],
            last_update,
            _parse_dt(data["next_update"]),
            data["revoked"],
            data["sha256"],
            Path(data["pem_path"]),
            Path(data["der_path"]),
        )


@dataclass(frozen=True, slots=True)
class CAInfo:
    subject: str
    serial: str
    not_after: datetime
    sha256: str
    path: Path

    def pem(self) -> bytes:
        return _read(self.path)

    def as_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "serial": self.serial,
            "not_after": _dt(self.not_after),
            "sha256": self.sha256,
            "path": str(self.path),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CAInfo:
        not_after = _parse_dt(data["not_after"])
        assert not_after is not None
        return cls(data["subject"], data["serial"], not_after, data["sha256"], Path(data["path"]))


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event; ``supersede_key`` groups deliveries a newer event replaces."""

    kind: ClassVar[EventKind]
    id: str = field(default_factory=_new_id)
    created_at: datetime = field(default_factory=_now)

    @property
    def supersede_key(self) -> str:
        raise NotImplementedError

    @property
    def subject_name(self) -> str:
        """What the event is about, for logs and delivery records."""
        raise NotImplementedError

    @property
    def serial(self) -> str | None:
        return None

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "id": self.id,
                "created_at": self.created_at.isoformat(),
                **self.body(),
            }
        )

    @staticmethod
    def from_json(text: str) -> Event:
        data = json.loads(text)
        kind = EventKind(data.pop("kind"))
        common = {
            "id": data.pop("id"),
            "created_at": datetime.fromisoformat(data.pop("created_at")),
        }
        match kind:
            case EventKind.ISSUED:
                return CertificateIssued(cert=CertificateInfo.from_json(data["cert"]), **common)
            case EventKind.RENEWED:
                return CertificateRenewed(
                    old=CertificateInfo.from_json(data["old"]),
                    new=CertificateInfo.from_json(data["new"]),
                    **common,
                )
            case EventKind.REVOKED:
                return CertificateRevoked(cert=CertificateInfo.from_json(data["cert"]), **common)
            case EventKind.EXPIRING:
                return CertificateExpiring(
                    cert=CertificateInfo.from_json(data["cert"]), reason=data["reason"], **common
                )
            case EventKind.CRL_PUBLISHED:
                return CRLPublished(crl=CRLInfo.from_json(data["crl"]), **common)
            case EventKind.CA_CHANGED:
                return CAChanged(ca=CAInfo.from_json(data["ca"]), **common)
        raise ValueError(f"unknown event kind {kind}")


@dataclass(frozen=True, kw_only=True)
class _OneCertificate(Event):
    """An event about one certificate, ``cert``."""

    cert: CertificateInfo

    @property
    def subject_name(self) -> str:
        return self.cert.name

    @property
    def serial(self) -> str | None:
        return self.cert.serial

    def body(self) -> dict[str, Any]:
        return {"cert": self.cert.as_json()}


@dataclass(frozen=True, kw_only=True)
class CertificateIssued(_OneCertificate):
    """A certificate for a name that had none (CLI, easy-rsa, or copied in)."""

    kind: ClassVar[EventKind] = EventKind.ISSUED

    @property
    def supersede_key(self) -> str:
        return f"cert:{self.cert.name}"


@dataclass(frozen=True, kw_only=True)
class CertificateRenewed(Event):
    """``new`` replaces ``old`` for the same name; ``old`` stays valid until it expires."""

    kind: ClassVar[EventKind] = EventKind.RENEWED
    old: CertificateInfo
    new: CertificateInfo

    @property
    def cert(self) -> CertificateInfo:
        return self.new

    @property
    def supersede_key(self) -> str:
        return f"cert:{self.new.name}"

    @property
    def subject_name(self) -> str:
        return self.new.name

    @property
    def serial(self) -> str | None:
        return self.new.serial

    def body(self) -> dict[str, Any]:
        return {"old": self.old.as_json(), "new": self.new.as_json()}


@dataclass(frozen=True, kw_only=True)
class CertificateRevoked(_OneCertificate):
    kind: ClassVar[EventKind] = EventKind.REVOKED

    @property
    def supersede_key(self) -> str:
        return f"revoked:{self.cert.serial}"


@dataclass(frozen=True, kw_only=True)
class CertificateExpiring(_OneCertificate):
    """A certificate inside its renewal window that certwarden cannot renew by itself."""

    kind: ClassVar[EventKind] = EventKind.EXPIRING
    reason: str

    @property
    def supersede_key(self) -> str:
        return f"expiring:{self.cert.name}"

    def body(self) -> dict[str, Any]:
        return {**super().body(), "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class CRLPublished(Event):
    """A new crl.pem, whether certwarden or an operator (easy-rsa gen-crl) wrote it."""

    kind: ClassVar[EventKind] = EventKind.CRL_PUBLISHED
    crl: CRLInfo

    @property
    def supersede_key(self) -> str:
        return "crl"

    @property
    def subject_name(self) -> str:
        return f"crl#{self.crl.number}" if self.crl.number is not None else "crl"

    def body(self) -> dict[str, Any]:
        return {"crl": self.crl.as_json()}


@dataclass(frozen=True, kw_only=True)
class CAChanged(Event):
    """ca.crt is new: first start, or the CA was replaced or re-signed."""

    kind: ClassVar[EventKind] = EventKind.CA_CHANGED
    ca: CAInfo

    @property
    def supersede_key(self) -> str:
        return "ca"

    @property
    def subject_name(self) -> str:
        return "ca"

    def body(self) -> dict[str, Any]:
        return {"ca": self.ca.as_json()}


CertificateEvent = CertificateIssued | CertificateRenewed | CertificateRevoked | CertificateExpiring
