"""What ``certwarden status`` shows: the daemon's picture, read from the PKI and the state.

The daemon need not be running: everything comes from the PKI directory, the state database
(read-only, WAL lets it read while the daemon writes) and the same policy functions the daemon
plans with. ``needs_attention`` lists what a person must act on; the command exits non-zero
when it is not empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from certwarden.config import Config
from certwarden.errors import PKIError
from certwarden.hookspecs import HealthProblem
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import crl_number
from certwarden.policy import RenewalPlan, crl_refresh_at, current_certificates, plan_renewal
from certwarden.state import Delivery, StateStore

EXIT_NEEDS_ATTENTION = 2


@dataclass(frozen=True)
class CRLStatus:
    number: int | None
    last_update: datetime
    next_update: datetime | None
    refresh_at: datetime
    revoked: int


@dataclass
class StatusReport:
    now: datetime
    plans: list[RenewalPlan]
    crl: CRLStatus | None
    open_deliveries: list[Delivery]
    health: list[HealthProblem]
    pki_problems: list[str]
    needs_attention: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "certificates": [
                {
                    **plan.record.as_json(),
                    "renew_at": plan.due_at.isoformat(),
                    "renewable": plan.renewable,
                    "why_not_renewable": plan.reason,
                }
                for plan in self.plans
            ],
            "crl": None
            if self.crl is None
            else {
                "number": self.crl.number,
                "last_update": self.crl.last_update.isoformat(),
                "next_update": self.crl.next_update.isoformat() if self.crl.next_update else None,
                "refresh_at": self.crl.refresh_at.isoformat(),
                "revoked": self.crl.revoked,
            },
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
                }
                for d in self.open_deliveries
            ],
            "health": [{"plugin": h.plugin, "message": h.message} for h in self.health],
            "pki_problems": self.pki_problems,
            "needs_attention": self.needs_attention,
        }


def gather(
    config: Config, store: PKIStore, health: list[HealthProblem], now: datetime | None = None
) -> StatusReport:
    now = now or datetime.now(UTC)
    inventory = store.inventory(now)
    state_path = config.state.dir / "state.sqlite3"
    state = StateStore(state_path, readonly=True) if state_path.exists() else None
    try:
        baseline = state.fact("baseline") if state else None
        since = datetime.fromisoformat(baseline) if baseline else now
        plans = [
            plan_renewal(config, record, has_key=store.key_path(record.name).exists())
            for record in current_certificates(inventory.records, since)
        ]
        deliveries = state.open_deliveries() if state else []
    finally:
        if state:
            state.close()
    crl_status = None
    problems = list(inventory.problems)
    try:
        crl = store.current_crl()
    except PKIError as exc:
        crl = None
        problems.append(str(exc))
    if crl is not None:
        crl_status = CRLStatus(
            number=crl_number(crl),
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            refresh_at=crl_refresh_at(crl, config.crl),
            revoked=len(crl),
        )
    plans.sort(key=lambda plan: plan.due_at)
    report = StatusReport(now, plans, crl_status, deliveries, health, problems)
    report.needs_attention = _needs_attention(report)
    return report


def _needs_attention(report: StatusReport) -> list[str]:
    items: list[str] = []
    now = report.now
    if report.crl is None:
        items.append("there is no readable crl.pem: nginx cannot check client certificates")
    elif report.crl.next_update is not None and report.crl.next_update <= now:
        items.append(
            f"the CRL expired at {report.crl.next_update:%Y-%m-%d %H:%M}Z: nginx rejects "
            "every client certificate until a new one is deployed"
        )
    elif report.crl.refresh_at < now and report.crl.next_update is not None:
        items.append(
            f"the CRL was due for refresh at {report.crl.refresh_at:%Y-%m-%d %H:%M}Z and is "
            "still the old one: is the daemon running?"
        )
    for plan in report.plans:
        if not plan.renewable and plan.due_at <= now:
            items.append(
                f"{plan.record.name} expires {plan.record.not_after:%Y-%m-%d %H:%M}Z and cannot "
                f"be renewed automatically: {plan.reason}"
            )
    failed = [d for d in report.open_deliveries if d.status == "failed"]
    for delivery in failed:
        items.append(
            f"delivery of {delivery.event_kind} {delivery.subject} to plugin {delivery.plugin} "
            f"is failing since {_ago(delivery.created_at)} ({delivery.attempts} attempts): "
            f"{delivery.last_error}"
        )
    items.extend(f"plugin {h.plugin}: {h.message}" for h in report.health)
    return items


def _ago(timestamp: float) -> str:
    seconds = int(time.time() - timestamp)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
