"""Human output on a terminal: aligned tables of certificates."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import click

from certwarden.pki.model import CertRecord, Status

if TYPE_CHECKING:
    from certwarden.status import StatusReport

CERT_HEADER = ("NAME", "SERIAL", "STATUS", "NOT_AFTER", "PROFILE")


def echo_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [len(title) for title in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in (header, *rows):
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def record_row(record: CertRecord) -> list[str]:
    status = record.status.value
    if record.status is Status.VALID and not record.current:
        status = "valid (renewed)"
    return [
        record.name,
        record.serial,
        status,
        record.not_after.isoformat(timespec="seconds").replace("+00:00", "Z"),
        record.profile.value,
    ]


def echo_records(records: Sequence[CertRecord]) -> None:
    echo_table([record_row(record) for record in records], CERT_HEADER)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def echo_status(report: StatusReport) -> None:
    """Needs-attention items first, then certificates by next renewal, the CRL, deliveries."""
    if report.needs_attention:
        click.secho("NEEDS ATTENTION", fg="red", bold=True)
        for item in report.needs_attention:
            click.secho(f"  ! {item}", fg="red")
        click.echo()
    rows = []
    for plan in report.plans:
        renew = _when(plan.due_at) if plan.renewable else "manual: " + (plan.reason or "")[:40]
        rows.append([plan.record.name, plan.record.serial, _when(plan.record.not_after), renew])
    echo_table(rows, ("NAME", "SERIAL", "EXPIRES", "RENEWS"))
    click.echo()
    if report.crl is None:
        click.echo("CRL: none")
    else:
        crl = report.crl
        click.echo(
            f"CRL: number {crl.number}, {crl.revoked} revoked, next update "
            f"{_when(crl.next_update)}, refresh at {_when(crl.refresh_at)}"
        )
    for problem in report.pki_problems:
        click.secho(f"PKI: {problem}", fg="yellow")
    if report.open_deliveries:
        click.echo()
        echo_table(
            [
                [d.plugin, d.event_kind, d.subject, d.status, str(d.attempts), d.last_error or ""]
                for d in report.open_deliveries
            ],
            ("PLUGIN", "EVENT", "SUBJECT", "STATUS", "ATTEMPTS", "LAST ERROR"),
        )
