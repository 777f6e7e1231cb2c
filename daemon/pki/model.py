"""Immutable records the PKI hands out: what a certificate is, not where it lives."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class Status(enum.StrEnum):
    VALID = "valid"
    REVOKED = "revoked"
    EXPIRED = "expired"


class Reason(enum.StrEnum):
    """Revocation reasons as easy-rsa and ``openssl ca`` write them in index.txt."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "CACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    CERTIFICATE_HOLD = "certificateHold"


class Profile(enum.StrEnum):
    """What a certificate is for, read from its extended key usage."""

    CLIENT = "client"
    SERVER = "server"
    SERVER_CLIENT = "serverClient"
    CA = "ca"
    UNKNOWN = "unknown"


class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"


@dataclass(frozen=True, slots=True)
class CertRecord:
    """One certificate as the inventory knows it.

    ``current`` is true for the newest non-revoked certificate of a name: the one in
    ``issued/NAME.crt``. Older ones that were renewed stay valid until they expire.
    ``not_before`` is None only for certificates whose file could not be read.
    """

    name: str
    serial: str
    status: Status
    not_after: datetime
    not_before: datetime | None
    revoked_at: datetime | None
    reason: Reason | None
    profile: Profile
    subject: str
    current: bool

    @property
    def lifetime_seconds(self) -> float | None:
        if self.not_before is None:
            return None
        return (self.not_after - self.not_before).total_seconds()

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "serial": self.serial,
            "status": self.status.value,
            "not_before": self.not_before.isoformat() if self.not_before else None,
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "reason": self.reason.value if self.reason else None,
            "profile": self.profile.value,
            "subject": self.subject,
            "current": self.current,
        }


@dataclass(frozen=True, slots=True)
class CertColumns:
    """Certificates as columns: row i of every list is one certificate, in index.txt order.

    What :class:`CertRecord` holds, with the dates kept as ISO 8601 text (exactly what
    ``isoformat()`` prints for them: ``2030-01-01T00:00:00+00:00``). Listing 100k certificates
    as JSON from these takes no CertRecord and no datetime a certificate, which cost more than
    reading and checking index.txt; :meth:`records` makes the records when they are needed.
    """

    name: list[str]
    serial: list[str]
    status: list[Status]
    not_before: list[str | None]
    not_after: list[str]
    revoked_at: list[str | None]
    reason: list[Reason | None]
    profile: list[Profile]
    subject: list[str]
    current: list[bool]

    def records(self) -> list[CertRecord]:
        return [self.record(row) for row in range(len(self.serial))]

    def record(self, row: int) -> CertRecord:
        not_before = self.not_before[row]
        revoked_at = self.revoked_at[row]
        return CertRecord(
            name=self.name[row],
            serial=self.serial[row],
            status=self.status[row],
            not_after=datetime.fromisoformat(self.not_after[row]),
            not_before=None if not_before is None else datetime.fromisoformat(not_before),
            revoked_at=None if revoked_at is None else datetime.fromisoformat(revoked_at),
            reason=self.reason[row],
            profile=self.profile[row],
            subject=self.subject[row],
            current=self.current[row],
        )
