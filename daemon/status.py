"""What ``certwarden status`` shows: the daemon's picture, read from the PKI and the state.

The daemon need not be running: everything comes from the PKI directory, the state database
(read-only, WAL lets it read while the daemon writes) and the same policy functions the daemon
plans with. ``needs_attention`` lists what a person must act on; the command exits
:data:`EXIT_NEEDS_ATTENTION` when it is not empty. The terminal view
(:mod:`certwarden.terminal`), the HTML page (:mod:`certwarden.status_html`) and the metrics
(:mod:`certwarden.metrics`) all read a :class:`StatusReport`, so they never disagree.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from certwarden.config import Config
from certwarden.errors import PKIError
from certwarden.hookspecs import DEPLOYED_CRL_NEXT_UPDATE, HealthProblem, MetricSample
from certwarden.instance import running_pid
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import crl_number
from certwarden.policy import (
    RenewalPlan,
    crl_refresh_at,
    current_certificates,
    plan_renewal,
    unsafe_name_problem,
)
from certwarden.state import Delivery, StateStore

EXIT_NEEDS_ATTENTION = 2
# A certificate this close to its expiry is shown red whatever its plan: the threshold of the
# alert rule in docs/alerts.yml, and about the longest an operator is away.
URGENT = timedelta(days=7)


class Urgency(enum.StrEnum):
    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


class CertState(enum.StrEnum):
    """Where a current certificate stands; the last three need a person."""

    SCHEDULED = "scheduled"  # the daemon renews it at its renewal time
    MANUAL = "manual"  # cannot be renewed automatically; its renewal window is still ahead
    RENEWING = "renewing"  # renewal time passed less than [status] failing_for ago
    RENEWAL_FAILING = "renewal_failing"  # still not renewed long after its time, or too late
    MANUAL_DUE = "manual_due"  # in its renewal window, and only a person can renew it
    EXPIRED = "expired"


NEEDS_A_PERSON = frozenset({CertState.RENEWAL_FAILING, CertState.MANUAL_DUE, CertState.EXPIRED})


class CRLState(enum.StrEnum):
    FRESH = "fresh"
    REFRESH_DUE = "refresh_due"  # past its planned refresh, less than failing_for ago
    REFRESH_OVERDUE = "refresh_overdue"
    WITHIN_MARGIN = "within_margin"
    EXPIRED = "expired"


@dataclass(frozen=True)
class CertificateStatus:
    """One current certificate: its renewal plan and how it stands."""

    plan: RenewalPlan
    state: CertState
    urgency: Urgency
    renewal_failures: int  # failed renewal attempts recorded by the daemon (0 when not looked up)

    @property
    def name(self) -> str:
        return self.plan.record.name

    @property
    def serial(self) -> str:
        return self.plan.record.serial

    @property
    def not_after(self) -> datetime:
        return self.plan.record.not_after

    @property
    def renew_at(self) -> datetime:
        return self.plan.due_at

    @property
    def needs_a_person(self) -> bool:
        return self.state in NEEDS_A_PERSON


@dataclass(frozen=True)
class CRLStatus:
    number: int | None
    last_update: datetime
    next_update: datetime | None
    refresh_at: datetime
    revoked: int
    margin: timedelta  # the margin that applies to this CRL (see crl_margin)
    state: CRLState

    @property
    def urgency(self) -> Urgency:
        return _CRL_URGENCY[self.state]


_CRL_URGENCY = {
    CRLState.FRESH: Urgency.GREEN,
    CRLState.REFRESH_DUE: Urgency.YELLOW,
    CRLState.REFRESH_OVERDUE: Urgency.RED,
    CRLState.WITHIN_MARGIN: Urgency.RED,
    CRLState.EXPIRED: Urgency.RED,
}


@dataclass(frozen=True)
class DeployedCRL:
    """A CRL a plugin deployed (reported through ``certwarden_metrics``)."""

    plugin: str
    target: str
    next_update: datetime
    urgency: Urgency


@dataclass
class StatusReport:
    now: datetime
    plans: list[RenewalPlan]
    crl: CRLStatus | None
    open_deliveries: list[Delivery]
    health: list[HealthProblem]
    pki_problems: list[str]
    needs_attention: list[str] = field(default_factory=list)
    certificates: list[CertificateStatus] = field(default_factory=list)
    deployed_crls: list[DeployedCRL] = field(default_factory=list)
    failing_for: timedelta = timedelta(hours=1)
    crl_margin: timedelta = timedelta(days=2)
    daemon_pid: int | None = None  # the daemon using this state folder; None: not running

    @property
    def failing_deliveries(self) -> list[Delivery]:
        return [d for d in self.open_deliveries if d.status == "failed"]

    def delivery_overdue(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` has been failing for longer than ``[status] failing_for``."""
        return delivery.status == "failed" and _age(delivery, self.now) > self.failing_for

    def as_json(self) -> dict[str, Any]:
        counts = {urgency.value: 0 for urgency in Urgency}
        for cert in self.certificates:
            counts[cert.urgency.value] += 1
        return {
            "now": self.now.isoformat(),
            "daemon": {"running": self.daemon_pid is not None, "pid": self.daemon_pid},
            "certificates": [
                {
                    **cert.plan.record.as_json(),
                    "renew_at": cert.plan.due_at.isoformat(),
                    "renewable": cert.plan.renewable,
                    "why_not_renewable": cert.plan.reason,
                    "state": cert.state.value,
                    "urgency": cert.urgency.value,
                    "renewal_failures": cert.renewal_failures,
                }
                for cert in self.certificates
            ],
            "certificate_counts": counts,
            "crl": None
            if self.crl is None
            else {
                "number": self.crl.number,
                "last_update": self.crl.last_update.isoformat(),
                "next_update": self.crl.next_update.isoformat() if self.crl.next_update else None,
                "refresh_at": self.crl.refresh_at.isoformat(),
                "revoked": self.crl.revoked,
                "margin_seconds": self.crl.margin.total_seconds(),
                "state": self.crl.state.value,
                "urgency": self.crl.urgency.value,
            },
            "deployed_crls": [
                {
                    "plugin": d.plugin,
                    "target": d.target,
                    "next_update": d.next_update.isoformat(),
                    "urgency": d.urgency.value,
                }
                for d in self.deployed_crls
            ],
            "deliveries": [
                {
                    "id": d.id,
                    "plugin": d.plugin,
                    "event": d.event_kind,
                    "subject": d.subject,
                    "serial": d.serial,
                    "status": d.status,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "next_attempt_at": datetime.fromtimestamp(d.next_attempt_at, UTC).isoformat(),
                    "since": datetime.fromtimestamp(d.created_at, UTC).isoformat(),
                    "needs_attention": self.delivery_overdue(d),
                }
                for d in self.open_deliveries
            ],
            "health": [{"plugin": h.plugin, "message": h.message} for h in self.health],
            "pki_problems": self.pki_problems,
            "settings": {
                "failing_for_seconds": self.failing_for.total_seconds(),
                "crl_margin_seconds": self.crl_margin.total_seconds(),
            },
            "needs_attention": self.needs_attention,
        }


def gather(
    config: Config,
    store: PKIStore,
    health: list[HealthProblem],
    now: datetime | None = None,
    *,
    state: StateStore | None = None,
    plugin_samples: Iterable[tuple[str, MetricSample]] = (),
) -> StatusReport:
    """Read the PKI and the state (``state``, else the database opened read-only) as of ``now``.

    ``plugin_samples`` are (plugin, sample) pairs from ``certwarden_metrics``; the deployed
    CRLs among them are judged with the same margin as crl.pem.
    """
    now = now or datetime.now(UTC)
    inventory = store.inventory(now)
    own_state = None
    if state is None:
        state_path = config.state.dir / "state.sqlite3"
        if state_path.exists():
            state = own_state = StateStore(state_path, readonly=True)
    try:
        baseline = state.fact("baseline") if state else None
        since = datetime.fromisoformat(baseline) if baseline else now
        keys = _key_names(store)
        plans = [
            plan_renewal(config, record, has_key=record.name in keys)
            for record in current_certificates(inventory.records, since)
        ]
        plans.sort(key=lambda plan: plan.due_at)
        failing_for = config.status.failing_for
        certificates = []
        for plan in plans:
            cert_state = certificate_state(plan, now, failing_for)
            # Only certificates past their renewal time can have failed renewals: one query
            # each for those few, not for every certificate of a large PKI.
            failures = (
                state.renewal_failures(plan.record.serial)
                if state is not None and plan.renewable and plan.due_at <= now
                else 0
            )
            certificates.append(
                CertificateStatus(plan, cert_state, urgency(plan, cert_state, now), failures)
            )
        deliveries = state.open_deliveries() if state else []
    finally:
        if own_state is not None:
            own_state.close()
    problems = list(inventory.problems)
    problems.extend(filter(None, map(unsafe_name_problem, plans)))
    try:
        crl = store.current_crl()
    except PKIError as exc:
        crl = None
        problems.append(str(exc))
    crl_status = None
    margin = config.status.crl_margin
    if crl is not None:
        refresh_at = crl_refresh_at(crl, config.crl)
        margin = crl_margin(crl.next_update_utc, refresh_at, config.status.crl_margin)
        crl_status = CRLStatus(
            number=crl_number(crl),
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            refresh_at=refresh_at,
            revoked=len(crl),
            margin=margin,
            state=crl_state(crl.next_update_utc, refresh_at, margin, failing_for, now),
        )
    report = StatusReport(
        now,
        plans,
        crl_status,
        deliveries,
        health,
        problems,
        certificates=certificates,
        deployed_crls=deployed_crls(plugin_samples, margin, now),
        failing_for=failing_for,
        crl_margin=config.status.crl_margin,
        daemon_pid=running_pid(config.state.dir),
    )
    report.needs_attention = _needs_attention(report)
    return report


def _key_names(store: PKIStore) -> set[str]:
    """Names whose private key is on this host, from one listing of private/: a stat per
    certificate would cost seconds at every status or scrape of a PKI of 100,000."""
    names = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(store.key_path("probe").parent):
            if entry.name.endswith(".key") and entry.is_file():
                names.add(entry.name.removesuffix(".key"))
    return names


# ---- judgements, shared by the terminal, the HTML page and the metrics ------------------------


def certificate_state(plan: RenewalPlan, now: datetime, failing_for: timedelta) -> CertState:
    record = plan.record
    if record.not_after <= now:
        return CertState.EXPIRED
    if not plan.renewable:
        return CertState.MANUAL_DUE if plan.due_at <= now else CertState.MANUAL
    if plan.due_at >= record.not_after:
        return CertState.RENEWAL_FAILING  # a renewal planned after expiry comes too late
    if plan.due_at > now:
        return CertState.SCHEDULED
    # The daemon renews at the renewal time and retries with backoff; give it failing_for.
    return CertState.RENEWING if now - plan.due_at <= failing_for else CertState.RENEWAL_FAILING


def urgency(plan: RenewalPlan, state: CertState, now: datetime) -> Urgency:
    """Red: expires within :data:`URGENT`, or past its renewal time (the daemon should have
    replaced it, or a person must). Yellow: its renewal time comes within :data:`URGENT`."""
    if state in NEEDS_A_PERSON or state is CertState.RENEWING:
        return Urgency.RED
    if plan.record.not_after - now < URGENT:
        return Urgency.RED
    if plan.due_at - now < URGENT:
        return Urgency.YELLOW
    return Urgency.GREEN


def crl_margin(next_update: datetime | None, refresh_at: datetime, margin: timedelta) -> timedelta:
    """The margin that applies to a CRL: ``[status] crl_margin``, unless the CRL is so
    short-lived that the daemon refreshes it later than that before its nextUpdate; then half
    of what is left after the refresh, so a CRL refreshed on time is never within its margin."""
    if next_update is None:
        return margin
    headroom = next_update - refresh_at
    return margin if margin < headroom else max(headroom / 2, timedelta(0))


def crl_state(
    next_update: datetime | None,
    refresh_at: datetime,
    margin: timedelta,
    failing_for: timedelta,
    now: datetime,
) -> CRLState:
    if next_update is not None:
        if next_update <= now:
            return CRLState.EXPIRED
        if next_update - now <= margin:
            return CRLState.WITHIN_MARGIN
    if refresh_at >= now:
        return CRLState.FRESH
    return CRLState.REFRESH_DUE if now - refresh_at <= failing_for else CRLState.REFRESH_OVERDUE


def deployed_crls(
    samples: Iterable[tuple[str, MetricSample]], margin: timedelta, now: datetime
) -> list[DeployedCRL]:
    found = []
    for plugin, sample in samples:
        if sample.name != DEPLOYED_CRL_NEXT_UPDATE:
            continue
        next_update = datetime.fromtimestamp(sample.value, UTC)
        left = next_update - now
        if left <= margin:
            level = Urgency.RED
        else:
            level = Urgency.YELLOW if left <= 2 * margin else Urgency.GREEN
        target = sample.labels.get("target", "")
        found.append(DeployedCRL(plugin, target, next_update, level))
    return sorted(found, key=lambda d: d.next_update)


def _needs_attention(report: StatusReport) -> list[str]:
    items: list[str] = []
    now = report.now
    crl = report.crl
    if crl is None:
        items.append("there is no readable crl.pem: nginx cannot check client certificates")
    elif crl.state is CRLState.EXPIRED:
        assert crl.next_update is not None
        items.append(
            f"the CRL expired at {_when(crl.next_update)}: nginx rejects every client "
            "certificate until a new one is deployed"
        )
    elif crl.state is CRLState.WITHIN_MARGIN:
        assert crl.next_update is not None
        items.append(
            f"the CRL expires at {_when(crl.next_update)} ({describe_delta(crl.next_update - now)}"
            f"), within its margin of {describe_delta(crl.margin, signed=False)}: run "
            "`certwarden crl` (is the daemon running?)"
        )
    elif crl.state is CRLState.REFRESH_OVERDUE:
        items.append(
            f"the CRL was due for refresh at {_when(crl.refresh_at)} and is still the old one: "
            "is the daemon running?"
        )
    for deployed in report.deployed_crls:
        if deployed.urgency is Urgency.RED:  # within the margin
            verb = "expired" if deployed.next_update <= now else "expires"
            items.append(
                f"plugin {deployed.plugin}: the CRL deployed to {deployed.target} {verb} at "
                f"{_when(deployed.next_update)} ({describe_delta(deployed.next_update - now)})"
            )
    for cert in report.certificates:
        record, plan = cert.plan.record, cert.plan
        if cert.state is CertState.EXPIRED:
            items.append(
                f"{record.name} expired at {_when(record.not_after)} and was not renewed: its "
                f"clients are rejected (`certwarden renew {record.name}`)"
            )
        elif cert.state is CertState.MANUAL_DUE:
            items.append(
                f"{record.name} expires {_when(record.not_after)} and cannot be renewed "
                f"automatically: {plan.reason}"
            )
        elif cert.state is CertState.RENEWAL_FAILING:
            if plan.due_at >= record.not_after:
                why = "its renewal is planned after its expiry"
            elif cert.renewal_failures:
                why = (
                    f"it was due for renewal at {_when(plan.due_at)} and "
                    f"{_attempts(cert.renewal_failures)} failed (see the daemon's log)"
                )
            else:
                why = (
                    f"it was due for renewal at {_when(plan.due_at)} and is not renewed yet: "
                    "is the daemon running?"
                )
            items.append(f"{record.name} expires {_when(record.not_after)}: {why}")
    for delivery in report.failing_deliveries:
        if report.delivery_overdue(delivery):
            items.append(
                f"delivery of {delivery.event_kind} {delivery.subject} to plugin "
                f"{delivery.plugin} is failing since "
                f"{describe_delta(_age(delivery, now), signed=False)} "
                f"({_attempts(delivery.attempts)}): {delivery.last_error} "
                f"(`certwarden deliveries retry {delivery.id}` once fixed, or `drop "
                f"{delivery.id}`)"
            )
    items.extend(f"plugin {h.plugin}: {h.message}" for h in report.health)
    return items


# ---- words for times --------------------------------------------------------------------------


def _age(delivery: Delivery, now: datetime) -> timedelta:
    return now - datetime.fromtimestamp(delivery.created_at, UTC)


def next_try(delivery: Delivery, now: datetime) -> str:
    """When a failing delivery is tried again, in words; "due" once its time has come (the
    daemon retries it at its next wake-up, or when it starts)."""
    at = datetime.fromtimestamp(delivery.next_attempt_at, UTC)
    return describe_delta(at - now) if at > now else "due"


def _attempts(count: int) -> str:
    return f"{count} attempt{'' if count == 1 else 's'}"


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z"


def describe_delta(delta: timedelta, *, signed: bool = True) -> str:
    """``in 3d 4h`` / ``2h 5m ago`` (or without the direction): two units at most."""
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    units: Sequence[tuple[int, str]] = (
        (days, "d"),
        (hours, "h"),
        (minutes, "m"),
        (seconds, "s"),
    )
    first = next((i for i, (count, _) in enumerate(units) if count), len(units) - 1)
    text = " ".join(f"{count}{unit}" for count, unit in units[first : first + 2] if count)
    text = text or "0s"
    if not signed:
        return text
    return f"in {text}" if delta.total_seconds() >= 0 else f"{text} ago"
