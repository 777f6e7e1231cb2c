"""Human output on a terminal: aligned tables of certificates, and the status picture.

Names, subjects and messages come from index.txt, certificates and plugins, so anyone who can
get a certificate signed chooses some of the text: every piece of it goes through
:func:`visible` (or :func:`echo`, which applies it), so a CN holding ``ESC [ 2 J`` shows as
``\\x1b[2J`` instead of clearing the operator's screen. JSON output is left exact: json
escapes control characters itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from certwarden.pki.model import CertRecord, Status

if TYPE_CHECKING:
    from certwarden.status import StatusReport

CERT_HEADER = ("NAME", "SERIAL", "STATUS", "NOT_AFTER", "PROFILE")


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on or not show written as its
    escape, as Python writes it: C0 and C1 controls (``\\x1b``, ``\\x9b``), DEL, line
    separators, bidirectional overrides (``\\u202e``) and the like. Plain text is returned
    as it is, at the cost of one check."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def echo(text: str = "", *, nl: bool = True, err: bool = False, **style: Any) -> None:
    """:func:`click.secho` of ``text`` made :func:`visible`: one line of human output."""
    click.secho(visible(text), nl=nl, err=err, **style)


def echo_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    shown = [[visible(cell) for cell in row] for row in rows]
    widths = [len(title) for title in header]
    for row in shown:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for cells in (header, *shown):
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
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


def _short(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%MZ")


FULL, SHADE, LIGHT, DOT = "\u2588", "\u2592", "\u2591", "\u25cf"  # blocks, shades, a dot
TIMELINE_WIDTH = 30
TIMELINE_ROWS = 40  # the most urgent certificates; --json and --html FILE list them all
_FG = {"red": "red", "yellow": "yellow", "green": "green"}
_RANK = {"red": 0, "yellow": 1, "green": 2}


def timeline_columns(
    now: datetime, renew_at: datetime, not_after: datetime, horizon: timedelta, width: int
) -> tuple[int, int]:
    """(columns until the renewal, columns until the expiry) of a bar ``width`` wide that
    spans ``horizon`` from ``now``: the bar's length is the time the certificate has left."""

    def column(moment: datetime) -> int:
        share = (moment - now) / horizon
        return max(0, min(width, math.ceil(share * width)))

    end = column(not_after)
    return min(column(renew_at), end), end


def echo_status(report: StatusReport, *, rows: int = TIMELINE_ROWS) -> None:
    """What needs a person first, then failing deliveries, the CRL, and a timeline of the
    certificates: a bar each, as long as the time it has left, coloured by urgency."""
    from certwarden.status import describe_delta, next_try

    now = report.now
    echo(f"certwarden status at {_short(now)}", bold=True)
    if report.daemon_pid is not None:
        echo(f"daemon: running (pid {report.daemon_pid})")
    else:
        echo("daemon: not running; renewals, CRL refreshes and deliveries wait for it", fg="yellow")
    echo()
    if report.needs_attention:
        echo("NEEDS ATTENTION", fg="red", bold=True)
        for item in report.needs_attention:
            echo(f"  ! {item}", fg="red")
    else:
        echo("Nothing needs a person.", fg="green")
    echo()

    failing = report.failing_deliveries
    if failing:
        echo(f"FAILING DELIVERIES ({len(failing)})", bold=True)
        table = [
            [
                str(d.id),
                d.plugin,
                d.event_kind,
                d.subject,
                describe_delta(now - datetime.fromtimestamp(d.created_at, UTC), signed=False),
                str(d.attempts),
                next_try(d, now),
                (d.last_error or "")[:60],
            ]
            for d in failing[:rows]
        ]
        echo_table(
            table, ("ID", "PLUGIN", "EVENT", "SUBJECT", "FAILING FOR", "TRIES", "NEXT", "ERROR")
        )
        if len(failing) > rows:
            echo(f"... and {len(failing) - rows} more; --json lists them all")
        echo()

    echo("CRL", bold=True)
    crl = report.crl
    if crl is None:
        echo("  none: crl.pem is missing or unreadable", fg="red")
    else:
        if crl.next_update is not None:
            # Its validity from lastUpdate to nextUpdate: the time used light, the time left full.
            lifetime = crl.next_update - crl.last_update
            _, used = timeline_columns(crl.last_update, now, now, lifetime, 20)
            bar = LIGHT * used + FULL * (20 - used)
            left = describe_delta(crl.next_update - now)
            echo("  ", nl=False)
            echo(bar, fg=_FG[crl.urgency.value], nl=False)
            echo(
                f"  {crl.state.value.replace('_', ' ')}: next update "
                f"{_short(crl.next_update)} ({left})"
            )
        else:
            echo("  no nextUpdate: the CRL never expires")
        echo(
            f"  number {crl.number}, {crl.revoked} revoked, issued {_short(crl.last_update)}, "
            f"refresh {_short(crl.refresh_at)} ({describe_delta(crl.refresh_at - now)}), "
            f"margin {describe_delta(crl.margin, signed=False)}"
        )
    for deployed in report.deployed_crls:
        echo("  ", nl=False)
        echo(DOT, fg=_FG[deployed.urgency.value], nl=False)
        echo(
            f" {deployed.plugin} {deployed.target}: next update {_short(deployed.next_update)} "
            f"({describe_delta(deployed.next_update - now)})"
        )
    echo()

    certs = sorted(
        report.certificates, key=lambda c: (_RANK[c.urgency.value], c.plan.record.not_after)
    )
    echo(f"CERTIFICATES ({len(certs)})", bold=True)
    if not certs:
        echo("  none")
    shown = certs[:rows]
    if shown:
        horizon = max(max(c.not_after for c in shown) - now, timedelta(days=1))
        name_width = max(4, min(max(len(visible(c.name)) for c in shown), 28))
        scale = f"+{describe_delta(horizon, signed=False)}"
        echo(
            f"  {'NAME':{name_width}}  {'now':{TIMELINE_WIDTH - len(scale)}}{scale}  "
            "EXPIRES     LEFT      RENEWAL"
        )
    for cert in shown:
        renew_col, end_col = timeline_columns(
            now, cert.renew_at, cert.not_after, horizon, TIMELINE_WIDTH
        )
        bar = FULL * renew_col + SHADE * (end_col - renew_col)
        name = visible(cert.name)
        name = name if len(name) <= name_width else name[: name_width - 1] + "~"
        left = (
            describe_delta(cert.not_after - now, signed=False)
            if cert.not_after > now
            else "expired"
        )
        renewal = describe_delta(cert.renew_at - now) if cert.plan.renewable else "manual"
        echo(f"  {name:{name_width}}  ", nl=False)
        echo(bar, fg=_FG[cert.urgency.value], nl=False)
        echo(
            f"{' ' * (TIMELINE_WIDTH - end_col)}  {cert.not_after:%Y-%m-%d}  {left:8}  ",
            nl=False,
        )
        echo(renewal, fg="red" if cert.needs_a_person else None)
    if len(certs) > len(shown):
        rest = certs[len(shown) :]
        by_colour = ", ".join(
            f"{sum(1 for c in rest if c.urgency.value == colour)} {colour}"
            for colour in ("red", "yellow", "green")
            if any(c.urgency.value == colour for c in rest)
        )
        echo(f"  ... and {len(rest)} more ({by_colour}); --json lists them all")
    if shown:
        echo(f"  {FULL} in use until its renewal, {SHADE} renewal to expiry")
        echo("  red: expires within 7 days or past its renewal time; yellow: renewal within 7 days")

    if report.pki_problems:
        echo()
    for problem in report.pki_problems:
        echo(f"PKI: {problem}", fg="yellow")
    waiting = [d for d in report.open_deliveries if d.status == "pending"]
    if waiting:
        echo()
        echo(f"WAITING DELIVERIES ({len(waiting)})", bold=True)
        echo_table(
            [[d.plugin, d.event_kind, d.subject, str(d.serial or "")] for d in waiting[:rows]],
            ("PLUGIN", "EVENT", "SUBJECT", "SERIAL"),
        )
        if len(waiting) > rows:
            echo(f"... and {len(waiting) - rows} more")
