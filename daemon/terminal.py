"""Human output on a terminal: aligned tables of certificates."""

from __future__ import annotations

from collections.abc import Sequence

import click

from certwarden.pki.model import CertRecord, Status

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
