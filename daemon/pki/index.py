"""index.txt, the certificate database shared with easy-rsa and ``openssl ca``.

Each line has six TAB-separated fields: status (V, R or E), notAfter, revocation date with an
optional ``,reason``, serial (uppercase hex, even number of digits), a file name that is always
``unknown``, and the subject in OpenSSL's slash form. Dates are UTCTime (``YYMMDDHHMMSSZ``)
before 2050 and GeneralizedTime (``YYYYMMDDHHMMSSZ``) from 2050 on; both may appear in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from certwarden.errors import MalformedFile
from certwarden.pki.model import Reason

_REASONS = {reason.value: reason for reason in Reason}
_HEX = frozenset("0123456789ABCDEF")
_from_iso = datetime.fromisoformat


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of index.txt. ``status`` is the letter as written, which may be stale."""

    status: str
    not_after: datetime
    revoked_at: datetime | None
    reason: Reason | None
    serial: str
    subject: str
    filename: str = "unknown"

    @property
    def common_name(self) -> str:
        return common_name(self.subject)

    def revoke(self, when: datetime, reason: Reason | None) -> IndexEntry:
        return replace(self, status="R", revoked_at=when, reason=reason)


def parse_date(text: str) -> datetime:
    """Parse an ASN.1 UTCTime or GeneralizedTime as index.txt writes it."""
    # strptime costs ~10 us a call, which dominates listing 100k certificates; the checked
    # digits in ISO 8601 basic form go to datetime.fromisoformat() (C, ~0.2 us) instead.
    n = len(text)
    if not text.isascii():  # str.isdigit() also accepts digits of other scripts
        raise ValueError(f"date {text!r} is neither YYMMDDHHMMSSZ nor YYYYMMDDHHMMSSZ")
    if n == 13 and text[12] == "Z" and text[:12].isdigit():
        iso = ("19" if text[0] >= "5" else "20") + text[:6] + "T" + text[6:]
    elif n == 15 and text[14] == "Z" and text[:14].isdigit():
        iso = text[:8] + "T" + text[8:]
    else:
        raise ValueError(f"date {text!r} is neither YYMMDDHHMMSSZ nor YYYYMMDDHHMMSSZ")
    try:
        return _from_iso(iso)
    except ValueError:
        return _calendar_date(text)  # raises datetime's own message (month must be in 1..12)


def _calendar_date(text: str) -> datetime:
    if len(text) == 13:
        yy = int(text[0:2])
        year = 1900 + yy if yy >= 50 else 2000 + yy
        rest = text[2:12]
    else:
        year = int(text[0:4])
        rest = text[4:14]
    return datetime(
        year,
        int(rest[0:2]),
        int(rest[2:4]),
        int(rest[4:6]),
        int(rest[6:8]),
        int(rest[8:10]),
        tzinfo=UTC,
    )


def format_date(when: datetime) -> str:
    """Format like OpenSSL: UTCTime until 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5)."""
    when = when.astimezone(UTC)
    if 1950 <= when.year < 2050:
        return when.strftime("%y%m%d%H%M%SZ")
    # Not %Y: it does not pad years before 1000 to four digits, which parse_date() needs.
    return f"{when.year:04d}" + when.strftime("%m%d%H%M%SZ")


def format_serial(serial: int) -> str:
    """Uppercase hex with an even number of digits, as ``openssl x509 -serial`` prints it."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def common_name(subject: str) -> str:
    """The CN of a slash-form subject (``/O=Example/CN=alice`` gives ``alice``)."""
    cn = ""
    for part in subject.split("/"):
        if part.startswith("CN="):
            cn = part[3:]  # the last CN wins, as in OpenSSL's display
    return cn


def parse_line(line: str, where: str = "index.txt") -> IndexEntry:
    """Parse one line (without its newline); ``where`` names it in errors, e.g. index.txt:12."""
    fields = line.split("\t")
    if len(fields) != 6:
        raise MalformedFile(
            f"{where}: expected 6 tab-separated fields, found {len(fields)}; "
            "restore index.txt from index.txt.old or a backup"
        )
    status, not_after_text, revoked_text, serial, filename, subject = fields
    if status not in ("V", "R", "E"):
        raise MalformedFile(f"{where}: status {status!r} is not V, R or E")
    try:
        not_after = parse_date(not_after_text)
    except ValueError as exc:
        raise MalformedFile(f"{where}: notAfter: {exc}") from None
    if not serial or len(serial) % 2 or not _HEX.issuperset(serial):
        raise MalformedFile(
            f"{where}: serial {serial!r} is not uppercase hex with an even number of digits"
        )
    if not subject.startswith("/"):
        raise MalformedFile(f"{where}: subject {subject!r} is not in /CN=... form")
    revoked_at: datetime | None = None
    reason: Reason | None = None
    if status == "R":
        date_text, _, reason_text = revoked_text.partition(",")
        try:
            revoked_at = parse_date(date_text)
        except ValueError as exc:
            raise MalformedFile(f"{where}: revocation date: {exc}") from None
        if reason_text:
            try:
                reason = _REASONS[reason_text]
            except KeyError:
                raise MalformedFile(
                    f"{where}: revocation reason {reason_text!r} is unknown; expected one of "
                    + ", ".join(_REASONS)
                ) from None
    elif revoked_text:
        raise MalformedFile(f"{where}: status {status} must not carry a revocation date")
    return IndexEntry(status, not_after, revoked_at, reason, serial, subject, filename)


def format_line(entry: IndexEntry) -> str:
    revoked = ""
    if entry.revoked_at is not None:
        revoked = format_date(entry.revoked_at)
        if entry.reason is not None:
            revoked += "," + entry.reason.value
    return "\t".join(
        (
            entry.status,
            format_date(entry.not_after),
            revoked,
            entry.serial,
            entry.filename,
            entry.subject,
        )
    )


@dataclass(frozen=True, slots=True)
class ParsedIndex:
    entries: list[IndexEntry]
    problems: list[str]


def parse_index(text: str, source: str = "index.txt") -> ParsedIndex:
    """Parse a whole index.txt; a bad line becomes a problem, never an exception."""
    entries: list[IndexEntry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        try:
            entry = parse_line(line, f"{source}:{number}")
        except MalformedFile as exc:
            problems.append(str(exc))
            continue
        if entry.serial in seen:
            problems.append(f"{source}:{number}: serial {entry.serial} appears twice")
        seen.add(entry.serial)
        entries.append(entry)
    return ParsedIndex(entries, problems)


Revocation = tuple[str, str, Reason | None]
"""(serial hex, revocation date as index.txt writes it, reason): what a CRL entry needs."""


def parse_revocations(text: str, source: str = "index.txt") -> tuple[list[Revocation], list[str]]:
    """The revoked lines of an index.txt, checked like :func:`parse_line`, as CRL entries.

    The date stays text: index.txt already writes it in ASN.1 time syntax, so a CRL can hold
    it as it is. Parsing only what a CRL needs makes a 100k-line index quick to sign.
    """
    out: list[Revocation] = []
    problems: list[str] = []
    reasons = _REASONS
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.startswith("R\t"):
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            problems.append(parse_error(line, f"{source}:{number}"))
            continue
        date, _, reason_text = fields[2].partition(",")
        serial = fields[3]
        try:
            _check_date(date)
        except ValueError:
            problems.append(parse_error(line, f"{source}:{number}"))
            continue
        reason = reasons.get(reason_text) if reason_text else None
        if (
            (reason_text and reason is None)
            or not serial
            or len(serial) % 2
            or not _HEX.issuperset(serial)
        ):
            problems.append(parse_error(line, f"{source}:{number}"))
            continue
        out.append((serial, date, reason))
    return out, problems


def _check_date(text: str) -> None:
    """Raise ValueError unless ``text`` is a valid YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ date."""
    n = len(text)
    if n == 13 and text[12] == "Z" and text.isascii() and text[:12].isdigit():
        _from_iso(("19" if text[0] >= "5" else "20") + text[:6] + "T" + text[6:12])
    elif n == 15 and text[14] == "Z" and text.isascii() and text[:14].isdigit():
        _from_iso(text[:8] + "T" + text[8:14])
    else:
        raise ValueError(text)


def parse_error(line: str, where: str) -> str:
    """The problem :func:`parse_line` reports for ``line`` (which must be malformed)."""
    try:
        parse_line(line, where)
    except MalformedFile as exc:
        return str(exc)
    return f"{where}: malformed line"


def render_index(entries: Iterable[IndexEntry]) -> str:
    return "".join(format_line(entry) + "\n" for entry in entries)
