"""The reconcile loop: PKI -> inventory -> changes -> events -> deliveries; and due work.

Every change is found the same way, whoever made it: the daemon's renewals, the CLI, easy-rsa
by hand, a file copied in. :meth:`Engine.reconcile` compares the inventory with the snapshot of
the last reconcile and turns the difference into events; events and the new snapshot are
written in one transaction, then handed to the dispatcher. Work the daemon does itself
(renewals, CRL refreshes) only writes the PKI and reconciles, so it flows through the same path
and never loops: an unchanged PKI yields no events.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby

from cryptography import x509

from certwarden.config import Config, ProfileSettings
from certwarden.dispatch import Dispatcher
from certwarden.errors import CertwardenError, PKIError
from certwarden.events import (
    CAChanged,
    CAInfo,
    CertificateExpiring,
    CertificateInfo,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLInfo,
    CRLPublished,
    Event,
)
from certwarden.pki.ca import CertificateAuthority
from certwarden.pki.index import format_serial
from certwarden.pki.model import CertRecord, Status
from certwarden.pki.names import is_valid_name
from certwarden.pki.store import Inventory, PKIStore
from certwarden.pki.x509 import slash_subject
from certwarden.policy import (
    RenewalPlan,
    crl_refresh_at,
    current_certificates,
    plan_renewal,
    unsafe_name_problem,
)
from certwarden.state import SnapshotEntry, StateStore

log = logging.getLogger("certwarden.engine")
RENEW_BATCH = 200  # renewals per PKI transaction: big enough to be fast, small to interleave


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outlook:
    """What is due next, for the scheduler, systemd's STATUS= and ``certwarden status``."""

    next_renewal: RenewalPlan | None
    renewals_due: int
    crl_next_update: datetime | None
    crl_refresh_at: datetime | None

    def status_line(self) -> str:
        parts = []
        if self.next_renewal is not None:
            parts.append(
                f"next renewal {self.next_renewal.record.name} at "
                f"{self.next_renewal.due_at:%Y-%m-%d %H:%M:%S}Z"
            )
        else:
            parts.append("no renewal planned")
        if self.crl_next_update is not None:
            parts.append(f"CRL next update {self.crl_next_update:%Y-%m-%d %H:%M:%S}Z")
        else:
            parts.append("no valid CRL")
        return "; ".join(parts)


class Engine:
    def __init__(
        self,
        config: Config,
        store: PKIStore,
        state: StateStore,
        dispatcher: Dispatcher,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.dispatcher = dispatcher
        self.clock = clock
        self.ca = CertificateAuthority(store, clock)
        self._lock = threading.RLock()
        self._renew_not_before: dict[str, datetime] = {}  # serial -> after a failed renewal
        self._crl_serials: tuple[str, frozenset[int]] | None = None  # (sha256, serials)
        self._unsafe_names_logged: set[str] = set()  # serials: logged once, not every reconcile
        self._adopt_looked_at: dict[str, tuple[int, int, int]] = {}  # issued/NAME.crt files
        self.last_reconcile: datetime | None = None

    # ---- reconcile ---------------------------------------------------------------------------

    def reconcile(self) -> Outlook:
        """Bring the daemon's picture in line with the PKI; publish a CRL if one is owed."""
        with self._lock:
            outlook, crl_owed = self._reconcile_once()
            if crl_owed is not None:
                log.info("regenerating the CRL: %s", crl_owed)
                try:
                    self.ca.generate_crl(self.config.crl.validity)
                except CertwardenError as exc:
                    log.error("CRL generation failed: %s", exc)
                else:
                    outlook, _ = self._reconcile_once()
            return outlook

    def _reconcile_once(self) -> tuple[Outlook, str | None]:
        now = self.clock()
        inventory = self.store.inventory(now)
        copied_in = self._copied_in(inventory)
        if copied_in:
            adopted = self.ca.adopt(list(copied_in))
            # Looked at once: adopt() takes the PKI lock, whose file changes wake the watcher,
            # so trying again at every reconcile would reconcile in a loop.
            self._adopt_looked_at.update(copied_in)
            if adopted:
                inventory = self.store.inventory(now)
        for problem in inventory.problems:
            log.warning("PKI: %s", problem)
        snapshot = self.state.snapshot()
        baseline = self.state.fact("baseline") is None
        by_serial = {record.serial: record for record in inventory.records}
        events: list[Event] = []
        facts: dict[str, str] = {}

        ca_event, ca_digest = self._ca_change()
        if ca_event is not None:
            events.append(ca_event)
            facts["ca_sha256"] = ca_digest
        if not baseline:
            events.extend(self._certificate_changes(inventory, snapshot, by_serial))
        crl, crl_event, crl_owed = self._crl_state(inventory, now)
        plans = self._plans(inventory)
        self._log_unsafe_names(plans)
        expiring = [
            plan
            for plan in plans
            if not plan.renewable
            and plan.due_at <= now
            and self.state.fact(f"expiring:{plan.record.serial}") is None
        ]
        for plan in expiring:
            assert plan.reason is not None
            events.append(
                CertificateExpiring(
                    cert=CertificateInfo.from_record(plan.record, self.store.root),
                    reason=plan.reason,
                )
            )
            facts[f"expiring:{plan.record.serial}"] = now.isoformat()
        if crl_event is not None:
            events.append(crl_event)
            facts["crl_sha256"] = crl_event.crl.sha256
        changed, removed = self._snapshot_changes(inventory, snapshot)
        deliveries = self.dispatcher.plan(events)
        with self.state.transaction() as db:
            ids = self.state.add_deliveries(db, deliveries)
            self.state.replace_snapshot(db, changed, removed)
            for key, value in facts.items():
                self.state.set_fact(db, key, value)
            if baseline:
                self.state.set_fact(db, "baseline", now.isoformat())
        for event in events:
            log.info(
                "event %s %s%s",
                event.kind.value,
                event.subject_name,
                f" serial {event.serial}" if event.serial else "",
            )
        self.dispatcher.enqueue(ids, [d.plugin for d in deliveries])
        self.last_reconcile = now
        return self._outlook(plans, crl, now), crl_owed

    def _log_unsafe_names(self, plans: Sequence[RenewalPlan]) -> None:
        for plan in plans:
            problem = unsafe_name_problem(plan)
            if problem is not None and plan.record.serial not in self._unsafe_names_logged:
                self._unsafe_names_logged.add(plan.record.serial)
                log.warning("PKI: %s", problem)

    def _copied_in(self, inventory: Inventory) -> dict[str, tuple[int, int, int]]:
        """Names with an issued/NAME.crt but no current certificate in index.txt, with the
        file's identity, unless that very file was looked at before: one signed by another
        CA is left out and not looked at again until it or the CA changes."""
        current = {record.name for record in inventory.records if record.current}
        try:
            files = os.scandir(self.store.root / "issued")
        except FileNotFoundError:
            return {}
        found = {}
        with files:
            for entry in files:
                name = entry.name[:-4]
                if not entry.name.endswith(".crt") or name in current or not is_valid_name(name):
                    continue
                try:
                    info = entry.stat()
                except OSError:
                    continue
                stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
                if self._adopt_looked_at.get(name) != stamp:
                    found[name] = stamp
        return dict(sorted(found.items()))

    def _ca_change(self) -> tuple[CAChanged | None, str]:
        data = self.store.read_file(self.store.ca_cert_path)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.state.fact("ca_sha256"):
            return None, digest
        cert = self.store.ca_certificate()
        info = CAInfo(
            subject=slash_subject(cert.subject),
            serial=format_serial(cert.serial_number),
            not_after=cert.not_valid_after_utc,
            sha256=digest,
            path=self.store.ca_cert_path,
        )
        self._crl_serials = None
        self._adopt_looked_at.clear()  # a file left out as signed by another CA may be ours now
        return CAChanged(ca=info), digest

    def _certificate_changes(
        self,
        inventory: Inventory,
        snapshot: dict[str, SnapshotEntry],
        by_serial: dict[str, CertRecord],
    ) -> list[Event]:
        root = self.store.root
        previous_current = {e.name: e.serial for e in snapshot.values() if e.current}
        events: list[Event] = []
        for record in inventory.records:
            before = snapshot.get(record.serial)
            info = CertificateInfo.from_record(record, root)
            if before is None:
                if record.status is Status.REVOKED:
                    events.append(CertificateRevoked(cert=info))
                elif record.current and record.status is Status.VALID:
                    old = by_serial.get(previous_current.get(record.name, ""))
                    if (
                        old is not None
                        and old.serial != record.serial
                        and old.status is not Status.REVOKED
                    ):
                        events.append(
                            CertificateRenewed(old=CertificateInfo.from_record(old, root), new=info)
                        )
                    else:
                        events.append(CertificateIssued(cert=info))
            elif before.status != Status.REVOKED.value and record.status is Status.REVOKED:
                events.append(CertificateRevoked(cert=info))
        return events

    @staticmethod
    def _snapshot_changes(
        inventory: Inventory, snapshot: dict[str, SnapshotEntry]
    ) -> tuple[list[SnapshotEntry], list[str]]:
        changed = []
        seen = set()
        for record in inventory.records:
            seen.add(record.serial)
            entry = SnapshotEntry(record.serial, record.name, record.status.value, record.current)
            if snapshot.get(record.serial) != entry:
                changed.append(entry)
        removed = [serial for serial in snapshot if serial not in seen]
        return changed, removed

    def _crl_state(
        self, inventory: Inventory, now: datetime
    ) -> tuple[x509.CertificateRevocationList | None, CRLPublished | None, str | None]:
        """The CRL on disk, its event if it is new, and why a new one is owed (or None)."""
        try:
            data = self.store.read_file(self.store.crl_pem_path)
        except PKIError:
            return None, None, "there is no crl.pem"
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError:
            return None, None, "crl.pem is not a readable CRL"
        ca = self.store.ca_certificate()
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            return None, None, "crl.pem is not signed by the current CA"
        event = None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.state.fact("crl_sha256"):
            event = CRLPublished(crl=CRLInfo.from_crl(crl, data, self.store.root))
        if self._crl_serials is None or self._crl_serials[0] != digest:
            self._crl_serials = (digest, frozenset(entry.serial_number for entry in crl))
        listed = self._crl_serials[1]
        missing = [
            r.serial
            for r in inventory.records
            if r.status is Status.REVOKED and int(r.serial, 16) not in listed
        ]
        if missing:
            return crl, event, f"{len(missing)} revoked certificate(s) not in crl.pem yet"
        if crl.next_update_utc is None or now >= crl_refresh_at(crl, self.config.crl):
            return crl, event, "crl.pem is due for its refresh"
        return crl, event, None

    # ---- renewals ------------------------------------------------------------------------------

    def _plans(self, inventory: Inventory) -> list[RenewalPlan]:
        baseline = self.state.fact("baseline")
        # Certificates that expired before certwarden first ran are history, not work.
        since = datetime.fromisoformat(baseline) if baseline else self.clock()
        return [
            plan_renewal(self.config, record, has_key=self._has_key(record.name))
            for record in current_certificates(inventory.records, since)
        ]

    def _has_key(self, name: str) -> bool:
        # An unsafe name (easy-rsa signs any CN) is no path: plan_renewal reports it instead.
        return is_valid_name(name) and self.store.key_path(name).exists()

    def _outlook(
        self,
        plans: Sequence[RenewalPlan],
        crl: x509.CertificateRevocationList | None,
        now: datetime,
    ) -> Outlook:
        renewable = [p for p in plans if p.renewable]
        pending = [
            p for p in renewable if p.record.serial not in self._renew_not_before or p.due_at > now
        ]
        retry_times = [
            max(p.due_at, self._renew_not_before[p.record.serial])
            for p in renewable
            if p.record.serial in self._renew_not_before
        ]
        next_plan = min(pending, key=lambda p: p.due_at, default=None)
        if retry_times and (next_plan is None or min(retry_times) < next_plan.due_at):
            retry_plan = min(
                (p for p in renewable if p.record.serial in self._renew_not_before),
                key=lambda p: self._renew_not_before[p.record.serial],
            )
            next_plan = RenewalPlan(
                retry_plan.record, min(retry_times), retry_plan.profile, True, None
            )
        return Outlook(
            next_renewal=next_plan,
            renewals_due=sum(1 for p in renewable if p.due_at <= now),
            crl_next_update=crl.next_update_utc if crl is not None else None,
            crl_refresh_at=crl_refresh_at(crl, self.config.crl) if crl is not None else None,
        )

    def renew_due(self) -> Outlook:
        """Renew every certificate whose time has come, in batches, then reconcile."""
        with self._lock:
            now = self.clock()
            inventory = self.store.inventory(now)
            due = [
                plan
                for plan in self._plans(inventory)
                if plan.renewable
                and plan.due_at <= now
                and self._renew_not_before.get(plan.record.serial, now) <= now
            ]
            if due:
                log.info("%d certificate(s) due for renewal", len(due))
            # A batch shares one profile: the same validity and key type for all of it.
            due.sort(key=lambda p: _profile_key(p.profile))
            for _, group in groupby(due, key=lambda p: _profile_key(p.profile)):
                batch = list(group)
                for start in range(0, len(batch), RENEW_BATCH):
                    self._renew_batch(batch[start : start + RENEW_BATCH])
            return self.reconcile()

    def _renew_batch(self, plans: list[RenewalPlan]) -> None:
        profile = plans[0].profile
        assert profile is not None
        try:
            issued = self.ca.renew(
                [p.record.name for p in plans], validity=profile.validity, key_type=profile.key_type
            )
        except CertwardenError as exc:
            if len(plans) == 1:
                self._renewal_failed(plans[0], exc)
                return
            # One bad certificate must not hold up the rest: retry them one by one.
            log.warning("batch renewal failed (%s); renewing one by one", exc)
            for plan in plans:
                self._renew_batch([plan])
            return
        for plan, item in zip(plans, issued, strict=True):
            self._renew_not_before.pop(plan.record.serial, None)
            self.state.record_renewal(
                plan.record.name, plan.record.serial, item.record.serial, "renewed", None
            )

    def _renewal_failed(self, plan: RenewalPlan, exc: CertwardenError) -> None:
        failures = self.state.renewal_failures(plan.record.serial) + 1
        delay = min(
            self.config.daemon.retry_initial * (2 ** (failures - 1)), self.config.daemon.retry_max
        )
        retry_at = self.clock() + delay
        self._renew_not_before[plan.record.serial] = retry_at
        self.state.record_renewal(plan.record.name, plan.record.serial, None, "failed", str(exc))
        log.error(
            "renewal of %s serial %s failed (attempt %d, retry at %s): %s",
            plan.record.name,
            plan.record.serial,
            failures,
            retry_at.isoformat(timespec="seconds"),
            exc,
        )

    def refresh_crl(self) -> Outlook:
        """Regenerate the CRL if it is due (the scheduler's CRL job), then reconcile."""
        return self.reconcile()

    def current_infos(self) -> tuple[tuple[CertificateInfo, ...], CRLInfo | None]:
        """Current valid certificates and the CRL, for ``certwarden_daemon_started``."""
        inventory = self.store.inventory(self.clock())
        certs = tuple(
            CertificateInfo.from_record(record, self.store.root)
            for record in current_certificates(inventory.records)
        )
        crl_info = None
        try:
            data = self.store.read_file(self.store.crl_pem_path)
            crl_info = CRLInfo.from_crl(x509.load_pem_x509_crl(data), data, self.store.root)
        except (PKIError, ValueError):
            pass
        return certs, crl_info


def _profile_key(profile: ProfileSettings | None) -> str:
    return repr(profile)
