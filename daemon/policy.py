"""When work is due: certificate renewals and CRL refreshes, as pure functions of the facts.

The daemon, ``certwarden status`` and the metrics all ask these functions, so they always agree
on when the next renewal or CRL refresh happens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from certwarden.config import Config, CRLSettings, ProfileSettings
from certwarden.pki.model import CertRecord, Profile, Status
from certwarden.pki.names import is_valid_name

# Used to decide when an unmanaged certificate counts as expiring: the peers' default.
UNMANAGED_RENEW_FRACTION = 1 / 3
FALLBACK_LIFETIME = timedelta(days=825)


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    """What the daemon will do about one current certificate."""

    record: CertRecord
    due_at: datetime
    profile: ProfileSettings | None
    renewable: bool
    reason: str | None  # why it cannot be renewed automatically


def _spread(serial: str) -> float:
    """A stable number in [0, 1) per certificate, so jitter survives restarts."""
    digest = hashlib.sha256(serial.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def profile_of(config: Config, record: CertRecord) -> ProfileSettings | None:
    kind = record.profile.value if record.profile is not Profile.UNKNOWN else None
    return config.profile_for(record.name, kind)


def renewal_due_at(record: CertRecord, profile: ProfileSettings | None) -> datetime:
    if record.not_before is not None:
        lifetime = record.not_after - record.not_before
    else:
        lifetime = profile.validity if profile else FALLBACK_LIFETIME
    if profile is None:
        return record.not_after - lifetime * UNMANAGED_RENEW_FRACTION
    before = profile.renew_before_for(lifetime)
    if before >= lifetime:
        # A fixed renew_before longer than a (CA-shortened) lifetime would renew at once,
        # forever; renew half-way instead.
        before = lifetime / 2
    # Jitter only moves renewals earlier: a later one could run past the window.
    return record.not_after - before - before * profile.jitter * _spread(record.serial)


UNSAFE_NAME = (
    "its name (the CN of its subject) is not a safe file name, so certwarden cannot renew it: "
    "renew it by hand with easy-rsa, or issue a replacement named with letters, digits and "
    ". _ @ - only and revoke this one"
)


def unsafe_name_problem(plan: RenewalPlan) -> str | None:
    """What to report about a certificate whose name is no safe file name, else None.

    easy-rsa signs whatever CN a request carries (``--req-cn="Carol Phone"``) and index.txt
    may hold any subject: such a certificate is listed, revoked and announced like any other,
    but no path is ever built from its name, so it is never renewed automatically.
    """
    if plan.reason != UNSAFE_NAME:
        return None
    return f"certificate {plan.record.name!r} (serial {plan.record.serial}): {UNSAFE_NAME}"


def plan_renewal(config: Config, record: CertRecord, *, has_key: bool) -> RenewalPlan:
    profile = profile_of(config, record)
    reason = None
    if not is_valid_name(record.name):
        reason = UNSAFE_NAME
    elif profile is None:
        reason = f"no [profiles.*] table applies to {record.name} ({record.profile.value})"
    elif not has_key:
        reason = (
            f"private/{record.name}.key is not on this host (the certificate was signed "
            "from a request); its owner must send a new request"
        )
    return RenewalPlan(record, renewal_due_at(record, profile), profile, reason is None, reason)


def current_certificates(
    records: list[CertRecord], expired_since: datetime | None = None
) -> list[CertRecord]:
    """The newest certificate of each name that is valid, or that expired after
    ``expired_since`` (while the daemon was down: it is still owed its renewal)."""
    return [
        r
        for r in records
        if r.current
        and (
            r.status is Status.VALID
            or (
                r.status is Status.EXPIRED
                and expired_since is not None
                and r.not_after >= expired_since
            )
        )
    ]


def crl_refresh_at(crl: x509.CertificateRevocationList, settings: CRLSettings) -> datetime:
    """When a CRL should be replaced: after ``refresh_after``, and well before nextUpdate."""
    due = crl.last_update_utc + settings.refresh_delay()
    next_update = crl.next_update_utc
    if next_update is not None:
        # A hand-made CRL may be shorter-lived than ours; never let it get close to expiry.
        lifetime = next_update - crl.last_update_utc
        due = min(due, next_update - lifetime / 2)
    return due
