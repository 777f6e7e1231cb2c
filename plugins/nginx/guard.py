"""The CRL guard: the deployed CRL files, and those near or past their nextUpdate."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509

from certwarden.errors import CertwardenError
from certwarden.pki.store import PKIStore
from certwarden.plugins.nginx.settings import NginxError, NginxSettings
from certwarden.plugins.nginx.trust import _crl_signed_by, _dn, _pem_crls, _read_outside, _when
from certwarden.policy import crl_refresh_at

if TYPE_CHECKING:
    from certwarden.config import Config

GUARD_MAX_INTERVAL = timedelta(minutes=10)  # how often the daemon re-checks a CRL in trouble
GUARD_MIN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True)
class DeployedCRLs:
    """What the targets' CRL files hold now, judged by ``[status] crl_margin``."""

    next_updates: dict[str, datetime]  # per target: the first nextUpdate in its CRL file
    unreadable: list[str]  # targets whose CRL file is missing or unreadable
    late: list[str]  # deployed CRLs within the margin, with why
    next_check: datetime

    @property
    def problems(self) -> list[str]:
        return self.unreadable + self.late


def inspect_deployed_crls(
    settings: NginxSettings, config: Config, store: PKIStore, now: datetime
) -> DeployedCRLs:
    """Read every target's CRL file; report those expired or within the margin.

    The margin is the one ``certwarden status`` applies to deployed CRLs (the PKI CRL's, see
    :func:`certwarden.status.crl_margin`): never reached by a CRL refreshed on time, so a CRL
    within it means its refresh or its deployment has failed.
    """
    from certwarden.status import crl_margin as status_crl_margin  # see probe_once

    next_updates: dict[str, datetime] = {}
    unreadable: list[str] = []
    late: list[str] = []
    next_check = now + GUARD_MAX_INTERVAL
    pki_ca: x509.Certificate | None = None
    pki_crl: x509.CertificateRevocationList | None = None
    with contextlib.suppress(CertwardenError):
        pki_ca = store.ca_certificate()
        pki_crl = store.current_crl()
    margin = config.status.crl_margin
    if pki_crl is not None:
        margin = status_crl_margin(
            pki_crl.next_update_utc, crl_refresh_at(pki_crl, config.crl), margin
        )
    for index, target in enumerate(settings.targets):
        label = target.label(index)
        try:
            deployed = _pem_crls(_read_outside(target.crl, "crl"), str(target.crl))
        except NginxError as exc:
            unreadable.append(
                f"target {label}: {exc}: nginx cannot check client certificates; run "
                "`certwarden nginx deploy`"
            )
            continue
        dated = [crl for crl in deployed if crl.next_update_utc is not None]
        if dated:
            next_updates[label] = min(_next_update(crl) for crl in dated)
        for crl in dated:
            next_update = _next_update(crl)
            if next_update - now > margin:
                next_check = min(next_check, next_update - margin)
                continue
            if next_update <= now:
                state = f"EXPIRED at {_when(next_update)}: nginx rejects every client certificate"
            else:
                state = f"expires at {_when(next_update)}, in {_span(next_update - now)}"
            if pki_ca is not None and _crl_signed_by(crl, pki_ca):
                newer = pki_crl is not None and (
                    pki_crl.next_update_utc is None or pki_crl.next_update_utc > next_update
                )
                why = (
                    "a newer CRL is in the PKI but deploying it fails (see the deliveries "
                    "in `certwarden status`)"
                    if newer
                    else "the PKI's CRL was not refreshed (is the certwarden daemon running?)"
                )
            else:
                why = (
                    "it is not managed by certwarden: put a fresh CRL of that CA in "
                    "extra_crl_files, then run `certwarden nginx deploy`"
                )
            late.append(f"target {label}: the deployed CRL of {_dn(crl.issuer)} {state}; {why}")
    next_check = max(next_check, now + GUARD_MIN_INTERVAL)
    return DeployedCRLs(next_updates, unreadable, late, next_check)


def _next_update(crl: x509.CertificateRevocationList) -> datetime:
    assert crl.next_update_utc is not None
    return crl.next_update_utc


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size} {unit}"
    return f"{max(seconds, 0)} s"
