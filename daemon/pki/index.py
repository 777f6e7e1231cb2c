"""index.txt, the certificate database shared with easy-rsa and ``openssl ca``.

Each line has six TAB-separated fields: status (V, R or E), notAfter, revocation date with an
optional ``,reason``, serial (uppercase hex, even number of digits), a file name that is always
``unknown``, and the subject in OpenSSL's slash form. Dates are UTCTime (``YYMMDDHHMMSSZ``)
before 2050 and GeneralizedTime (``YYYYMMDDHHMMSSZ``) from 2050 on; both may appear in one line.

The revocation field is what ``openssl ca -revoke`` writes (apps/ca.c, make_revocation_str()),
and reads back for ``-gencrl`` (unpack_revinfo()): ``DATE``, ``DATE,REASON`` (``-crl_reason``),
``DATE,keyTime,TIME`` (``-crl_compromise TIME``: keyCompromise, TIME the invalidity date),
``DATE,CAkeyTime,TIME`` (``-crl_CA_compromise TIME``: CACompromise likewise) or
``DATE,holdInstruction,OID`` (``-crl_hold OID``: certificateHold with a hold instruction code).
TIME is a GeneralizedTime as the operator typed it; OID a dotted OID or an OpenSSL object name.
"""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import compress, repeat

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
    # openssl ca's -crl_compromise / -crl_CA_compromise time (reason keyCompromise or
    # CACompromise only), and -crl_hold's instruction as written (reason certificateHold only)
    invalid_since: datetime | None = None
    hold_instruction: str | None = None

    @property
    def common_name(self) -> str:
        return common_name(self.subject)

    def revoke(self, when: datetime, reason: Reason | None) -> IndexEntry:
        return replace(
            self,
            status="R",
            revoked_at=when,
            reason=reason,
            invalid_since=None,
            hold_instruction=None,
        )


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


def format_generalized_time(when: datetime) -> str:
    """``YYYYMMDDHHMMSSZ`` in UTC, whatever the year (an invalidity date is always one)."""
    when = when.astimezone(UTC)
    return f"{when.year:04d}" + when.strftime("%m%d%H%M%SZ")


# What ASN1_GENERALIZEDTIME_set_string() accepts, so what openssl ca writes for -crl_compromise:
# seconds optional, fractional seconds, Z or an offset from UTC.
_GENERALIZED_TIME = re.compile(
    r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})([0-9]{2})?(?:\.[0-9]+)?"
    r"(Z|[+-][0-9]{4})",
    re.ASCII,
)


def parse_generalized_time(text: str) -> datetime:
    """A GeneralizedTime as openssl accepts it, in UTC, fractions of a second dropped."""
    match = _GENERALIZED_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"time {text!r} is not a GeneralizedTime (YYYYMMDDHHMMSSZ)")
    year, month, day, hour, minute = (int(match[group]) for group in range(1, 6))
    try:
        when = datetime(year, month, day, hour, minute, int(match[6] or 0), tzinfo=UTC)
        offset = match[7]
        if offset != "Z":
            hours, minutes = int(offset[1:3]), int(offset[3:5])
            if hours > 23 or minutes > 59:
                raise ValueError(f"offset {offset} is not a time zone")
            shift = timedelta(hours=hours, minutes=minutes)
            when = when - shift if offset[0] == "+" else when + shift
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"time {text!r}: {exc}") from None
    return when


HOLD_INSTRUCTIONS = {
    # OpenSSL's short and long names of the instructions of RFC 5280 5.3.2 (and their arc)
    **dict.fromkeys(("holdInstructionNone", "Hold Instruction None"), "1.2.840.10040.2.1"),
    **dict.fromkeys(
        ("holdInstructionCallIssuer", "Hold Instruction Call Issuer"), "1.2.840.10040.2.2"
    ),
    **dict.fromkeys(("holdInstructionReject", "Hold Instruction Reject"), "1.2.840.10040.2.3"),
    **dict.fromkeys(("holdInstructionCode", "Hold Instruction Code"), "1.2.840.10040.2"),
}
_DOTTED_OID = re.compile(
    r"(?:[01]\.(?:[0-9]|[1-3][0-9])|2\.(?:0|[1-9][0-9]*))(?:\.(?:0|[1-9][0-9]*))*"
)


def hold_instruction_oid(text: str) -> str:
    """The dotted OID of a hold instruction as openssl ca writes it (an OID or its name)."""
    oid = HOLD_INSTRUCTIONS.get(text)
    if oid is not None:
        return oid
    if _DOTTED_OID.fullmatch(text):
        return text
    raise ValueError(
        f"hold instruction {text!r} is neither a dotted OID nor one of "
        "holdInstructionNone, holdInstructionCallIssuer, holdInstructionReject"
    )


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
    invalid_since: datetime | None = None
    hold: str | None = None
    if status == "R":
        date_text, _, reason_text = revoked_text.partition(",")
        try:
            revoked_at = parse_date(date_text)
        except ValueError as exc:
            raise MalformedFile(f"{where}: revocation date: {exc}") from None
        if reason_text:
            reason = _REASONS.get(reason_text)
            if reason is None:
                try:
                    reason, invalid_since, hold = revocation_details(reason_text)
                except ValueError as exc:
                    raise MalformedFile(f"{where}: {exc}") from None
    elif revoked_text:
        raise MalformedFile(f"{where}: status {status} must not carry a revocation date")
    return IndexEntry(
        status, not_after, revoked_at, reason, serial, subject, filename, invalid_since, hold
    )


_COMPROMISE_TIMES = {"keyTime": Reason.KEY_COMPROMISE, "CAkeyTime": Reason.CA_COMPROMISE}
_TIME_OF_COMPROMISE = {reason: name for name, reason in _COMPROMISE_TIMES.items()}
REMOVE_FROM_CRL = "removeFromCRL"
# RFC 5280 5.3.1: removeFromCRL says, in a delta CRL only, that a certificate left the CRL (its
# hold ended). A full CRL cannot carry it: certwarden's CRL leaves such a line out, which is
# what openssl verify (and so nginx) makes of the entry openssl ca -gencrl writes for it.
_REMOVED = (
    "revocation reason removeFromCRL belongs in delta CRLs only, so the CRL leaves this "
    "certificate out and TLS servers accept it; write another reason to revoke it, or make "
    "the line V without a revocation date to take it off hold"
)


def revocation_details(text: str) -> tuple[Reason, datetime | None, str | None]:
    """(reason, invalidity date, hold instruction) of what follows the revocation date's comma
    in a line ``openssl ca`` wrote; ValueError naming what is wrong otherwise."""
    reason = _REASONS.get(text)
    if reason is not None:
        return reason, None, None
    name, comma, argument = text.partition(",")
    if name in _COMPROMISE_TIMES:
        if not comma:
            raise ValueError(
                f"revocation reason {name} must be followed by ,TIME of the compromise"
            )
        try:
            invalid_since = parse_generalized_time(argument)
        except ValueError as exc:
            raise ValueError(f"{name}: compromise {exc}") from None
        return _COMPROMISE_TIMES[name], invalid_since, None
    if name == "holdInstruction":
        if not comma:
            raise ValueError("revocation reason holdInstruction must be followed by ,OID")
        try:
            hold_instruction_oid(argument)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return Reason.CERTIFICATE_HOLD, None, argument
    if text == REMOVE_FROM_CRL:
        raise ValueError(_REMOVED)
    raise ValueError(
        f"revocation reason {text!r} is unknown; expected one of "
        + ", ".join(_REASONS)
        + ", or keyTime,TIME, CAkeyTime,TIME or holdInstruction,OID"
    )


def format_line(entry: IndexEntry) -> str:
    revoked = ""
    if entry.revoked_at is not None:
        revoked = format_date(entry.revoked_at)
        reason = entry.reason
        if entry.invalid_since is not None and reason in _TIME_OF_COMPROMISE:
            revoked += f",{_TIME_OF_COMPROMISE[reason]},"
            revoked += format_generalized_time(entry.invalid_since)
        elif entry.hold_instruction is not None and reason is Reason.CERTIFICATE_HOLD:
            revoked += ",holdInstruction," + entry.hold_instruction
        elif reason is not None:
            revoked += "," + reason.value
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
    problems: list[str] = []
    entries = _parse_lines(text.split("\n"), 1, source, set(), problems)
    return ParsedIndex(entries, problems)


def _parse_lines(
    lines: Iterable[str], first: int, source: str, seen: set[str], problems: list[str]
) -> list[IndexEntry]:
    """Lines numbered from ``first``: their entries; problems and serials seen are added to."""
    entries: list[IndexEntry] = []
    for number, line in enumerate(lines, start=first):
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
    return entries


# ---- index.txt in bulk, for listings -----------------------------------------------------
#
# Listing 100k certificates must take at most 3x what ``openssl ca -gencrl`` takes to read the
# same index.txt (0.12 s). parse_index() takes 2.5 us a line, Python-level work around C calls
# that take a tenth of it, so the lines are checked and converted a block at a time with
# C-level operations on whole columns (str.split, slicing, set and bytes operations, map over C
# functions): 0.8 us a line, dates as ISO 8601 text included. A block that any check refuses is
# parsed again by parse_line(), which decides what is wrong with it and says so exactly as
# parse_index() does: the bulk path is only ever a faster way to accept lines parse_line()
# accepts, with the same values (tests/test_listing.py compares the two).

BLOCK_CHARS = 1 << 15
"""Characters of index.txt per block (~450 lines): small enough to stay in the CPU's cache,
which makes a block 40% quicker to parse than the whole file at once."""

_NEWLINE_STATUSES = frozenset({"\nV", "\nR", "\nE"})
_HEX_BYTES = b"0123456789ABCDEF"
_DIGITS = b"0123456789"
# "" is a revocation without a reason. openssl ca's other forms (keyTime,TIME, CAkeyTime,TIME,
# holdInstruction,OID) are not here: a block holding one goes through parse_line(), which
# reads them (rare enough that the bulk path need not).
_REASON_TEXTS = frozenset({"", *_REASONS})
# One ISO 8601 date per row, as datetime.isoformat() prints an index.txt date: the digits of
# each date are copied into their places, a column at a time (bytearray slice assignment).
_ISO_ROW = b"YYYY-MM-DDTHH:MM:SS+00:00\n"
_ISO_WIDTH = len(_ISO_ROW)
# (place in _ISO_ROW, place in the date) for each digit: YYMMDDHHMMSSZ, YYYYMMDDHHMMSSZ
_UTCTIME_PLACES = tuple(zip((2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18), range(12), strict=True))
_GENERALIZED_PLACES = tuple(
    zip((0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18), range(14), strict=True)
)
# UTCTime YY: 50-99 is 19YY, 00-49 is 20YY; the century's two digits from YY's first one.
_CENTURY_TENS = bytes.maketrans(_DIGITS, b"2222211111")
_CENTURY_ONES = bytes.maketrans(_DIGITS, b"0000099999")


@dataclass(frozen=True, slots=True)
class IndexBlock:
    """Consecutive entries of index.txt as columns, the dates as ISO 8601 text
    (``2030-01-01T00:00:00+00:00``: exactly what ``datetime.isoformat()`` prints for them)."""

    serial: list[str]
    subject: list[str]
    not_after: list[str]
    revoked_at: list[str | None]  # None exactly when the status letter is not R
    reason: list[Reason | None]


@dataclass(frozen=True, slots=True)
class IndexBlocks:
    """:class:`ParsedIndex` as blocks of columns."""

    blocks: list[IndexBlock]
    problems: list[str]
    duplicates: bool  # whether a serial appears twice (each is also a problem)


def parse_index_blocks(
    text: str, source: str = "index.txt", block_chars: int = BLOCK_CHARS
) -> IndexBlocks:
    """:func:`parse_index` as blocks of columns: the same entries and problems, in order.

    A block ends at the first line end ``block_chars`` or more characters after its start.
    """
    blocks: list[IndexBlock] = []
    problems: list[str] = []
    seen: set[str] = set()
    rows = 0
    length = len(text)
    while text.endswith("\n", 0, length):  # empty lines are skipped anyway: these end no block
        length -= 1
    start = 0
    first_line = 1
    while start < length:
        end = text.find("\n", start + block_chars, length)
        if end < 0:
            end = length
        chunk = text[start:end]
        block = _bulk_block(chunk)
        if block is None:
            entries = _parse_lines(chunk.split("\n"), first_line, source, seen, problems)
            block = _block_of(entries)
        else:
            seen.update(block.serial)
            if len(seen) != rows + len(block.serial):  # which ones, in order: seldom needed
                seen = {serial for earlier in blocks for serial in earlier.serial}
                for number, serial in enumerate(block.serial, start=first_line):
                    if serial in seen:
                        problems.append(f"{source}:{number}: serial {serial} appears twice")
                    seen.add(serial)
        blocks.append(block)
        rows += len(block.serial)
        first_line += chunk.count("\n") + 1
        start = end + 1
    return IndexBlocks(blocks, problems, duplicates=len(seen) != rows)


def _block_of(entries: Sequence[IndexEntry]) -> IndexBlock:
    return IndexBlock(
        [entry.serial for entry in entries],
        [entry.subject for entry in entries],
        [entry.not_after.isoformat() for entry in entries],
        [None if e.revoked_at is None else e.revoked_at.isoformat() for e in entries],
        [entry.reason for entry in entries],
    )


def _bulk_block(chunk: str) -> IndexBlock | None:
    """The entries of ``chunk`` (lines without the last newline), or None unless every line
    is one parse_line() accepts (and none is empty)."""
    # Every newline opens the next line's status field, so all fields come from one split.
    fields = chunk.replace("\n", "\t\n").split("\t")
    rows, rest = divmod(len(fields), 6)
    if rest or chunk.count("\n") != rows - 1:
        return None
    status = fields[0::6]
    status[0] = "\n" + status[0]
    # With one newline in each status but the first, and no more in the chunk, no other field
    # holds one: every line has exactly six fields.
    if not _NEWLINE_STATUSES.issuperset(status):
        return None
    serial = fields[3::6]
    joined = "".join(serial)  # isascii() is O(1); translate() leaves what is not hex
    if not joined.isascii() or joined.encode().translate(None, _HEX_BYTES):
        return None
    if any(length % 2 or not length for length in set(map(len, serial))):
        return None
    subject = fields[5::6]
    # No subject holds a newline: each one starts with "/" if there are as many "\n/" as rows.
    if ("\n" + "\n".join(subject)).count("\n/") != rows:
        return None
    not_after = iso_dates(fields[1::6])
    if not_after is None:
        return None
    revocation = fields[2::6]
    revoked_rows = status.count("\nR")
    # Only R lines carry a revocation date: as many fields as R lines are not empty, and
    # (checked below) none of those of R lines is.
    if rows - revocation.count("") != revoked_rows:
        return None
    revoked_at: list[str | None] = [None] * rows
    reason: list[Reason | None] = [None] * rows
    if revoked_rows:
        revoked = list(map("\nR".__eq__, status))
        dates, _, reasons = zip(
            *map(str.partition, compress(revocation, revoked), repeat(",")), strict=True
        )
        if not _REASON_TEXTS.issuperset(reasons):
            return None
        when = iso_dates(dates)
        if when is None:
            return None
        for row, date, text in zip(compress(range(rows), revoked), when, reasons, strict=True):
            revoked_at[row] = date
            reason[row] = _REASONS.get(text)
    return IndexBlock(serial, subject, not_after, revoked_at, reason)


def iso_dates(texts: Sequence[str]) -> list[str] | None:
    """``parse_date(text).isoformat()`` of each text, or None if any is not a valid date."""
    rows = len(texts)
    lengths = list(map(len, texts))
    for width in (13, 15):
        if lengths.count(width) == rows:
            return _iso_dates_of_width(texts, width)
    if lengths.count(13) + lengths.count(15) != rows:
        return None
    # Both forms (GeneralizedTime from 2050 on): each at once, then merged back in order.
    utc = list(map((13).__eq__, lengths))
    short = _iso_dates_of_width(list(compress(texts, utc)), 13)
    long = _iso_dates_of_width(list(compress(texts, map(operator.not_, utc))), 15)
    if short is None or long is None:
        return None
    short_dates, long_dates = iter(short), iter(long)
    return [next(short_dates) if is_utc else next(long_dates) for is_utc in utc]


def _iso_dates_of_width(texts: Sequence[str], width: int) -> list[str] | None:
    """:func:`iso_dates` of texts that are all ``width`` long: 13 (UTCTime) or 15."""
    rows = len(texts)
    if not rows:
        return []
    joined = "".join(texts)
    if not joined.isascii():
        return None
    data = joined.encode()
    zs = b"Z" * rows
    # Z closes every date and nothing else is left once the digits are removed: the rest of
    # each date is ASCII digits (what parse_date() checks before the calendar).
    if data[width - 1 :: width] != zs or data.translate(None, _DIGITS) != zs:
        return None
    out = bytearray(_ISO_ROW * rows)
    if width == 13:
        first = data[0::13]
        out[0::_ISO_WIDTH] = first.translate(_CENTURY_TENS)
        out[1::_ISO_WIDTH] = first.translate(_CENTURY_ONES)
        places = _UTCTIME_PLACES
    else:
        places = _GENERALIZED_PLACES
    for to, start in places:
        out[to::_ISO_WIDTH] = data[start::width]
    dates = out.decode().split("\n")
    dates.pop()  # after the last row's newline
    try:
        # The calendar (month 13, February 30, hour 24, year 0), as parse_date() checks it.
        deque(map(_from_iso, dates), maxlen=0)
    except ValueError:
        return None
    return dates


Revocation = tuple[str, str | None, Reason | None, str | None, str | None]
"""What a CRL entry needs: (serial hex, revocation date as index.txt writes it or None when it
cannot be read, reason, invalidity date as YYYYMMDDHHMMSSZ, hold instruction as a dotted OID)."""


def parse_revocations(text: str, source: str = "index.txt") -> tuple[list[Revocation], list[str]]:
    """The revoked lines of an index.txt as CRL entries, and warnings naming lines.

    The date stays text: index.txt already writes it in ASN.1 time syntax, so a CRL can hold
    it as it is. Parsing only what a CRL needs makes a 100k-line index quick to sign.

    It fails closed: every line whose status starts with R (all ``openssl ca`` looks at) and
    whose serial field holds hex digits becomes an entry, however wrong the rest is, with a
    warning saying what the entry holds instead (no reason, or the CRL's own date when the
    revocation date cannot be read). Only removeFromCRL lines are left out, on purpose (see
    :func:`revocation_details`); and lines without a serial, which cannot be listed.
    """
    out: list[Revocation] = []
    problems: list[str] = []
    reasons = _REASONS
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.startswith("R"):
            continue
        fields = line.split("\t")
        if len(fields) == 6 and fields[0] == "R":
            date, _, reason_text = fields[2].partition(",")
            serial = fields[3]
            reason = reasons.get(reason_text) if reason_text else None
            if (
                (reason is not None or not reason_text)
                and serial
                and not len(serial) % 2
                and _HEX.issuperset(serial)
                and _is_date(date)
            ):
                out.append((serial, date, reason, None, None))
                continue
        revocation, problem = _revocation_of(fields, f"{source}:{number}")
        if revocation is not None:
            out.append(revocation)
        if problem:
            problems.append(problem)
    return out, problems


_HEX_ANY_CASE = frozenset("0123456789abcdefABCDEF")
_FOLDED_REASONS = {
    **{reason.value.lower(): reason for reason in Reason},
    **{name.lower(): reason for name, reason in _COMPROMISE_TIMES.items()},
    "holdinstruction": Reason.CERTIFICATE_HOLD,
}


def _revocation_of(fields: list[str], where: str) -> tuple[Revocation | None, str]:
    """The CRL entry of an R line the quick checks refused, and the warning about it ("" when
    it is a line openssl writes: a compromise time or a hold instruction)."""
    # Where openssl ca reads them, whatever the number of fields: the 3rd and the 4th.
    revocation_text = fields[2] if len(fields) > 2 else ""
    serial_text = fields[3] if len(fields) > 3 else ""
    complaints: list[str] = []
    if fields[0] != "R":
        complaints.append(f"status {fields[0]!r} is not R, but openssl ca takes it for R")
    if len(fields) != 6:
        complaints.append(f"expected 6 tab-separated fields, found {len(fields)}")
    serial = serial_text.strip()
    if not serial or not _HEX_ANY_CASE.issuperset(serial):
        complaints.append(f"serial {serial_text!r} is not hex, so the CRL cannot list this line")
        return None, f"{where}: " + "; ".join(complaints)
    if serial != serial_text or len(serial) % 2 or not _HEX.issuperset(serial):
        serial = serial.upper().zfill(len(serial) + len(serial) % 2)
        complaints.append(f"serial {serial_text!r} read as {serial}")
    date_text, _, reason_text = revocation_text.partition(",")
    date: str | None = date_text
    if not _is_date(date_text):
        date = None
        complaints.append(
            f"revocation date {date_text!r} is not a valid YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ; "
            "the CRL's own date stands for it"
        )
    reason: Reason | None = None
    invalidity: str | None = None
    hold: str | None = None
    if reason_text:
        try:
            reason, invalid_since, hold_text = revocation_details(reason_text)
        except ValueError as exc:
            if reason_text.partition(",")[0].lower() == REMOVE_FROM_CRL.lower():
                # What openssl reads as removeFromCRL (it ignores case and any argument).
                complaints.append(_REMOVED)
                return None, f"{where}: serial {serial}: " + "; ".join(complaints)
            reason, invalid_since, hold_text, taken = _lenient_details(reason_text)
            complaints.append(f"{exc}; {taken}")
        invalidity = None if invalid_since is None else format_generalized_time(invalid_since)
        hold = None if hold_text is None else hold_instruction_oid(hold_text)
    if not complaints:
        return (serial, date, reason, invalidity, hold), ""
    problem = f"{where}: " + "; ".join(complaints) + f"; the CRL lists serial {serial} anyway"
    return (serial, date, reason, invalidity, hold), problem


def _lenient_details(text: str) -> tuple[Reason | None, datetime | None, str | None, str]:
    """What a CRL entry can keep of a revocation reason :func:`revocation_details` refuses:
    (reason, invalidity date, hold instruction, what was taken of it, for the warning)."""
    name, _, argument = text.partition(",")
    reason = _FOLDED_REASONS.get(name.lower())
    if reason is None:
        return None, None, None, "listed without a reason (unspecified)"
    invalid_since: datetime | None = None
    hold: str | None = None
    kept = ""
    if name.lower() in ("keytime", "cakeytime"):
        try:
            invalid_since = parse_generalized_time(argument)
            kept = " with its compromise time"
        except ValueError:
            kept = " without a compromise time"
    elif name.lower() == "holdinstruction":
        try:
            hold_instruction_oid(argument)
            hold = argument
            kept = " with its hold instruction"
        except ValueError:
            kept = " without a hold instruction"
    return reason, invalid_since, hold, f"listed as {reason.value}{kept}"


def _is_date(text: str) -> bool:
    """Whether ``text`` is a valid YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ date."""
    n = len(text)
    try:
        if n == 13 and text[12] == "Z" and text.isascii() and text[:12].isdigit():
            _from_iso(("19" if text[0] >= "5" else "20") + text[:6] + "T" + text[6:12])
        elif n == 15 and text[14] == "Z" and text.isascii() and text[:14].isdigit():
            _from_iso(text[:8] + "T" + text[8:14])
        else:
            return False
    except ValueError:  # the calendar: month 13, February 30, hour 24
        return False
    return True


def render_index(entries: Iterable[IndexEntry]) -> str:
    return "".join(format_line(entry) + "\n" for entry in entries)
