"""``certwarden status --html FILE``: the status picture as one self-contained page.

Inline CSS and inline SVG only: no scripts, fonts, images or links to fetch, so the page shows
the same anywhere, offline, from a mail attachment or a file share, and leaks nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from html import escape

from certwarden import __version__
from certwarden.status import (
    CertificateStatus,
    CRLStatus,
    DeployedCRL,
    StatusReport,
    Urgency,
    describe_delta,
    next_try,
)

MAX_TIMELINE_ROWS = 200  # an SVG of 100,000 rows helps nobody; the table below lists all red
MAX_TABLE_ROWS = 1000

COLOURS = {Urgency.RED: "#d64545", Urgency.YELLOW: "#e0a100", Urgency.GREEN: "#2f9e5b"}
_PALE = {Urgency.RED: "#f2b8b8", Urgency.YELLOW: "#f5dc99", Urgency.GREEN: "#b5e0c5"}
_RANK = {Urgency.RED: 0, Urgency.YELLOW: 1, Urgency.GREEN: 2}

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d2330;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 40px}
header{display:flex;align-items:baseline;justify-content:space-between;gap:16px;flex-wrap:wrap}
h1{font-size:22px;margin:0}
h2{font-size:15px;margin:0 0 10px;text-transform:uppercase;letter-spacing:.06em;color:#4a5263}
.meta{color:#5f6778;font-size:13px}
.banner{margin:16px 0 18px;padding:12px 16px;border-radius:8px;font-weight:600}
.banner.ok{background:#e3f4ea;color:#1f6b3f;border:1px solid #b5e0c5}
.banner.bad{background:#fbe6e6;color:#8f1f1f;border:1px solid #f2b8b8}
.banner ul{margin:6px 0 0;padding-left:20px;font-weight:400}
.grid{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-bottom:18px}
.card{background:#fff;border:1px solid #dfe2e8;border-radius:8px;padding:14px 16px}
.tile .n{font-size:26px;font-weight:700}
.tile .l{color:#5f6778;font-size:12px;text-transform:uppercase;letter-spacing:.05em}
section.card{margin-bottom:16px}
table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:#5f6778;font-weight:600;border-bottom:1px solid #dfe2e8;padding:4px 8px}
td{border-bottom:1px solid #eef0f3;padding:4px 8px;vertical-align:top}
td.mono,span.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}
.legend{color:#5f6778;font-size:12px;margin-top:8px}
.legend span{margin-right:14px;white-space:nowrap}
.sw{display:inline-block;width:14px;height:9px;border-radius:2px;margin-right:4px}
svg{display:block;width:100%;height:auto}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
.err{color:#8f1f1f}
.nw{white-space:nowrap}
.rel{color:#8a91a0;font-size:12px;white-space:nowrap}
.muted{color:#8a91a0}
"""


def _daemon(report: StatusReport) -> str:
    if report.daemon_pid is not None:
        return f"daemon running (pid {report.daemon_pid})"
    return f'<span style="color:{COLOURS[Urgency.YELLOW]}">daemon not running</span>'


def render_html(report: StatusReport, *, title: str = "certwarden status") -> str:
    """The page for ``report``; a complete HTML document."""
    now = report.now
    certs = sorted(report.certificates, key=lambda c: (_RANK[c.urgency], c.not_after))
    counts = {u: sum(1 for c in certs if c.urgency is u) for u in Urgency}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>",
        "<header>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="meta">at {_when(now)} &middot; certwarden {escape(__version__)} '
        f"&middot; {_daemon(report)}</div>",
        "</header>",
        _banner(report),
        '<div class="grid">',
        _tile(str(len(certs)), "current certificates", "#1d2330"),
        _tile(
            str(counts[Urgency.RED]),
            "red certificates",
            COLOURS[Urgency.RED] if counts[Urgency.RED] else COLOURS[Urgency.GREEN],
        ),
        _tile(str(len(report.failing_deliveries)), "failing deliveries", _failing_colour(report)),
        _crl_tile(report.crl, now),
        "</div>",
    ]
    if report.failing_deliveries:
        parts.append(_failing_deliveries(report))
    parts.append(_crl_section(report))
    parts.append(_timeline_section(certs, now))
    parts.append(_certificate_table(certs, now))
    pending = [d for d in report.open_deliveries if d.status == "pending"]
    if pending:
        parts.append(
            '<section class="card"><h2>Waiting deliveries</h2>'
            + _table(
                ("Plugin", "Event", "Subject", "Waiting for"),
                [
                    (
                        escape(d.plugin),
                        escape(d.event_kind),
                        escape(d.subject),
                        escape(describe_delta(now - _ts(d.created_at), signed=False)),
                    )
                    for d in pending[:MAX_TABLE_ROWS]
                ],
            )
            + "</section>"
        )
    if report.pki_problems:
        parts.append(
            '<section class="card"><h2>PKI problems</h2><ul>'
            + "".join(f"<li>{escape(p)}</li>" for p in report.pki_problems)
            + "</ul></section>"
        )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


# ---- pieces -------------------------------------------------------------------------------------


def _banner(report: StatusReport) -> str:
    if not report.needs_attention:
        return '<div class="banner ok">Nothing needs a person.</div>'
    items = "".join(f"<li>{escape(item)}</li>" for item in report.needs_attention)
    count = len(report.needs_attention)
    return (
        f'<div class="banner bad">{count} thing{"s" if count != 1 else ""} need'
        f"{'' if count != 1 else 's'} a person<ul>{items}</ul></div>"
    )


def _tile(number: str, label: str, colour: str) -> str:
    return (
        f'<div class="card tile"><div class="n" style="color:{colour}">{escape(number)}</div>'
        f'<div class="l">{escape(label)}</div></div>'
    )


def _failing_colour(report: StatusReport) -> str:
    if any(report.delivery_overdue(d) for d in report.failing_deliveries):
        return COLOURS[Urgency.RED]
    return COLOURS[Urgency.YELLOW] if report.failing_deliveries else COLOURS[Urgency.GREEN]


def _crl_tile(crl: CRLStatus | None, now: datetime) -> str:
    if crl is None:
        return _tile("none", "CRL", COLOURS[Urgency.RED])
    if crl.next_update is None:
        return _tile("never", "CRL expires", COLOURS[Urgency.GREEN])
    left = describe_delta(crl.next_update - now, signed=False)
    label = "CRL expired" if crl.next_update <= now else "CRL left"
    return _tile(left, label, COLOURS[crl.urgency])


def _failing_deliveries(report: StatusReport) -> str:
    now = report.now
    rows = []
    for d in report.failing_deliveries[:MAX_TABLE_ROWS]:
        urgency = Urgency.RED if report.delivery_overdue(d) else Urgency.YELLOW
        rows.append(
            (
                _dot(urgency) + escape(d.plugin),
                escape(d.event_kind),
                escape(d.subject),
                escape(describe_delta(now - _ts(d.created_at), signed=False)),
                str(d.attempts),
                escape(next_try(d, now)),
                f'<span class="err">{escape(d.last_error or "")}</span>',
            )
        )
    return (
        '<section class="card"><h2>Failing deliveries</h2>'
        + _table(("Plugin", "Event", "Subject", "Failing for", "Tries", "Next try", "Error"), rows)
        + "</section>"
    )


def _crl_section(report: StatusReport) -> str:
    crl, now = report.crl, report.now
    body: list[str] = ['<section class="card"><h2>CRL freshness</h2>']
    if crl is None:
        body.append('<p class="err">There is no readable crl.pem.</p>')
    else:
        if crl.next_update is not None:
            body.append(_crl_svg(crl, now))
        facts = [
            f"number {crl.number if crl.number is not None else '-'}",
            f"{crl.revoked} revoked",
            f"issued {_when(crl.last_update)}",
            f"refresh {_when(crl.refresh_at)} ({describe_delta(crl.refresh_at - now)})",
            f"margin {describe_delta(crl.margin, signed=False)}",
            f"state: {crl.state.value.replace('_', ' ')}",
        ]
        body.append(f'<p class="meta">{escape(" · ".join(facts))}</p>')
    if report.deployed_crls:
        body.append(_deployed_table(report.deployed_crls, now))
    body.append("</section>")
    return "".join(body)


def _crl_svg(crl: CRLStatus, now: datetime) -> str:
    """A bar from lastUpdate to nextUpdate: the time used in grey, the time left in the
    CRL's colour, the margin before nextUpdate in red; now and the planned refresh marked."""
    assert crl.next_update is not None
    width, left, right = 1100, 10, 10
    span = (crl.next_update - crl.last_update).total_seconds() or 1.0
    inner = width - left - right
    end = left + inner

    def x(moment: datetime) -> float:
        share = (moment - crl.last_update).total_seconds() / span
        return left + inner * max(0.0, min(1.0, share))

    now_x, refresh_x = x(now), x(crl.refresh_at)
    margin_x = max(x(crl.next_update - crl.margin), now_x)
    parts = [
        f'<svg viewBox="0 0 {width} 70" role="img" aria-label="CRL validity">',
        f'<rect x="{left}" y="22" width="{inner}" height="18" rx="4" fill="#e3e6eb"/>',
    ]
    if margin_x > now_x:
        parts.append(
            f'<rect x="{now_x:.1f}" y="22" width="{margin_x - now_x:.1f}" height="18" '
            f'fill="{COLOURS[crl.urgency]}"/>'
        )
    if end > margin_x:
        parts.append(
            f'<rect x="{margin_x:.1f}" y="22" width="{end - margin_x:.1f}" height="18" '
            f'fill="{COLOURS[Urgency.RED]}" opacity="0.45"/>'
        )
    parts += [
        _mark(refresh_x, "#4a5263", "4 3"),
        _mark(now_x, "#1d2330"),
        f'<text x="{left}" y="14" font-size="12" fill="#5f6778">lastUpdate '
        f"{_short(crl.last_update)}</text>",
        f'<text x="{end}" y="14" font-size="12" fill="#5f6778" text-anchor="end">'
        f"nextUpdate {_short(crl.next_update)}</text>",
        *_labels_below(
            [
                (now_x, "now", "#1d2330"),
                (refresh_x, f"refresh {_short(crl.refresh_at)}", "#4a5263"),
            ],
            left,
            end,
        ),
        "</svg>",
    ]
    return "".join(parts)


def _mark(x: float, colour: str, dash: str | None = None) -> str:
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="44" stroke="{colour}" '
        f'stroke-width="2"{dashes}/>'
    )


def _labels_below(
    marks: Sequence[tuple[float, str, str]], low: float, high: float
) -> Iterable[str]:
    """Labels for (x, text, colour) marks in one row: each centred on its mark where there is
    room, pushed right of the previous one where there is not, never past either end."""
    cursor = low
    for x, text, colour in sorted(marks):
        width = 7.0 * len(text)  # about 12px system-ui; generous, so labels never touch
        start = max(cursor, low, min(x - width / 2, high - width))
        cursor = start + width + 12
        yield (f'<text x="{start:.1f}" y="60" font-size="12" fill="{colour}">{escape(text)}</text>')


def _deployed_table(deployed: Sequence[DeployedCRL], now: datetime) -> str:
    return "<h2 style='margin-top:12px'>Deployed CRLs</h2>" + _table(
        ("Plugin", "Target", "nextUpdate", "Left"),
        [
            (
                _dot(d.urgency) + escape(d.plugin),
                f'<span class="mono">{escape(d.target)}</span>',
                escape(_when(d.next_update)),
                escape(describe_delta(d.next_update - now)),
            )
            for d in deployed
        ],
    )


def _timeline_section(certs: Sequence[CertificateStatus], now: datetime) -> str:
    shown = list(certs[:MAX_TIMELINE_ROWS])
    head = '<section class="card"><h2>Expiry and renewal timeline</h2>'
    if not shown:
        return head + '<p class="muted">No current certificates.</p></section>'
    legend = (
        '<div class="legend">'
        f'<span><i class="sw" style="background:{COLOURS[Urgency.GREEN]}"></i>in use until '
        "its renewal</span>"
        f'<span><i class="sw" style="background:{_PALE[Urgency.GREEN]}"></i>renewal to '
        "expiry</span>"
        "<span>&#9670; planned renewal</span>"
        f'<span style="color:{COLOURS[Urgency.RED]}">red: expires within 7 days or past its '
        "renewal time</span>"
        f'<span style="color:{COLOURS[Urgency.YELLOW]}">yellow: renewal within 7 days</span>'
        f'<span style="color:{COLOURS[Urgency.GREEN]}">green: nothing soon</span>'
        "</div>"
    )
    more = ""
    if len(certs) > len(shown):
        more = (
            f'<p class="muted">The {len(shown)} most urgent of {len(certs)} certificates; '
            "the table below lists more.</p>"
        )
    return head + _timeline_svg(shown, now) + legend + more + "</section>"


def _timeline_svg(certs: Sequence[CertificateStatus], now: datetime) -> str:
    horizon = max(max(c.not_after for c in certs) - now, timedelta(days=1))
    width, label_w, right = 1100, 190, 110
    row_h, top = 22, 26
    inner = width - label_w - right
    height = top + row_h * len(certs) + 8

    def x(moment: datetime) -> float:
        share = (moment - now) / horizon
        return label_w + inner * max(0.0, min(1.0, share))

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="certificate timeline">']
    for tick, label in _ticks(now, horizon):
        tx = x(tick)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{height - 4}" '
            'stroke="#e6e9ee" stroke-width="1"/>'
            f'<text x="{tx:.1f}" y="{top - 10}" font-size="11" fill="#8a91a0" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    parts.append(
        f'<line x1="{label_w}" y1="{top - 6}" x2="{label_w}" y2="{height - 4}" '
        'stroke="#1d2330" stroke-width="1.5"/>'
    )
    for row, cert in enumerate(certs):
        y = top + row * row_h
        colour, pale = COLOURS[cert.urgency], _PALE[cert.urgency]
        end = x(cert.not_after)
        renew = min(x(cert.renew_at), end)
        name = cert.name if len(cert.name) <= 26 else cert.name[:25] + "\u2026"
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 14}" font-size="12" text-anchor="end" '
            f'fill="#1d2330"><title>{escape(cert.name)} serial {escape(cert.serial)}</title>'
            f"{escape(name)}</text>"
        )
        if end > label_w:
            parts.append(
                f'<rect x="{label_w}" y="{y + 4}" width="{end - label_w:.1f}" height="13" '
                f'rx="3" fill="{pale}" stroke="{colour}" stroke-width="1"/>'
            )
        if renew > label_w:
            parts.append(
                f'<rect x="{label_w}" y="{y + 4}" width="{renew - label_w:.1f}" height="13" '
                f'rx="3" fill="{colour}"/>'
            )
        if cert.plan.renewable and cert.renew_at > now:
            parts.append(
                f'<path d="M{renew:.1f} {y + 3} l5 7.5 l-5 7.5 l-5 -7.5 z" fill="#1d2330">'
                f"<title>renewal {_when(cert.renew_at)}</title></path>"
            )
        state = (
            "expired"
            if cert.not_after <= now
            else describe_delta(cert.not_after - now, signed=False)
        )
        parts.append(
            f'<text x="{end + 8:.1f}" y="{y + 14}" font-size="11" fill="{colour}">'
            f"{escape(state)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _ticks(now: datetime, horizon: timedelta) -> Iterable[tuple[datetime, str]]:
    """About six evenly spaced date marks; the first is now."""
    yield now, "now"
    step = horizon / 6
    for index in range(1, 7):
        moment = now + step * index
        label = f"{moment:%Y-%m-%d}" if horizon >= timedelta(days=3) else f"{moment:%m-%d %H:%M}"
        yield moment, label


def _certificate_table(certs: Sequence[CertificateStatus], now: datetime) -> str:
    rows = []
    for cert in certs[:MAX_TABLE_ROWS]:
        if cert.plan.renewable:
            plan = _dated(cert.renew_at, now)
        else:
            plan = "manual: " + escape(cert.plan.reason or "")
        rows.append(
            (
                f'<span class="nw">{_dot(cert.urgency)}{escape(cert.name)}</span>',
                f'<span class="mono">{escape(cert.serial)}</span>',
                escape(cert.plan.record.profile.value),
                _dated(cert.not_after, now),
                plan,
                f'<span class="nw">{escape(cert.state.value.replace("_", " "))}</span>',
            )
        )
    more = ""
    if len(certs) > MAX_TABLE_ROWS:
        more = (
            f'<p class="muted">{len(certs) - MAX_TABLE_ROWS} more; '
            "<code>certwarden status --json</code> lists every certificate.</p>"
        )
    return (
        '<section class="card"><h2>Certificates</h2>'
        + _table(("Name", "Serial", "Kind", "Expires", "Renewal", "State"), rows)
        + more
        + "</section>"
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dated(moment: datetime, now: datetime) -> str:
    return (
        f'<span class="nw">{escape(_when(moment))}</span><br>'
        f'<span class="rel">{escape(describe_delta(moment - now))}</span>'
    )


def _dot(urgency: Urgency) -> str:
    return f'<span class="dot" style="background:{COLOURS[urgency]}"></span>'


def _ts(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z"


def _short(value: datetime) -> str:
    return f"{value:%m-%d %H:%M}"
