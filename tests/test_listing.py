"""Listing in bulk (index.txt and meta.tsv a block of columns at a time) against the plain,
line-at-a-time reading it must agree with: the same entries, values, problems and JSON."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import PKI
from hypothesis import given, settings
from hypothesis import strategies as st

from certwarden.cli import _echo_json
from certwarden.pki.ca import IssueRequest
from certwarden.pki.index import (
    IndexEntry,
    common_name,
    format_date,
    format_line,
    format_serial,
    iso_dates,
    parse_date,
    parse_index,
    parse_index_blocks,
)
from certwarden.pki.model import CertRecord, Profile, Reason, Status
from certwarden.pki.store import (
    META_VERSION,
    META_VERSION_FILE,
    CachedMeta,
    PKIStore,
    read_meta,
)

# ---- strategies ----------------------------------------------------------------------------

dates = st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.just(UTC),
).map(lambda when: when.replace(microsecond=0))
# Mostly close to one another, so that a listing holds valid and expired certificates.
near_dates = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)
).map(lambda when: when.replace(microsecond=0))
any_dates = near_dates | dates
free_text = st.text(st.characters(blacklist_characters="\t\n", blacklist_categories=["Cs"]))
names = st.sampled_from(["alice", "bob", "web", 'q"uo\\te', "\u00e9t\u00e9", "x\x7fy"]) | free_text
serials = st.integers(min_value=0, max_value=2**24).map(format_serial)
date_texts = (
    any_dates.map(format_date)
    | st.from_regex(r"\A[0-9]{12}(?:[0-9]{2})?Z\Z")  # often a month 13 or a 31st of April
    | st.text(max_size=16)
)


@st.composite
def entries(draw: st.DrawFn) -> IndexEntry:
    status = draw(st.sampled_from(["V", "R", "E"]))
    name = draw(names)
    reason = draw(st.none() | st.sampled_from(list(Reason))) if status == "R" else None
    # openssl ca's -crl_compromise / -crl_CA_compromise TIME and -crl_hold OID forms
    invalid_since = hold = None
    if reason in (Reason.KEY_COMPROMISE, Reason.CA_COMPROMISE):
        invalid_since = draw(st.none() | any_dates)
    elif reason is Reason.CERTIFICATE_HOLD:
        hold = draw(st.none() | st.sampled_from(["holdInstructionReject", "1.2.840.10040.2.2"]))
    return IndexEntry(
        status=status,
        not_after=draw(any_dates),
        revoked_at=draw(any_dates) if status == "R" else None,
        reason=reason,
        serial=draw(serials),
        subject=draw(st.sampled_from(["/CN=", "/O=Example/CN="]).map(lambda s: s + name)),
        filename=draw(st.just("unknown") | free_text),
        invalid_since=invalid_since,
        hold_instruction=hold,
    )


# The forms openssl ca writes besides DATE,REASON (all good), and ones close to them (not).
REVOCATION_FORMS = [
    "250101000000Z,keyTime,20241231000000Z",
    "250101000000Z,CAkeyTime,202412310000Z",
    "250101000000Z,keyTime,20241231000000.25+0100",
    "250101000000Z,holdInstruction,holdInstructionReject",
    "250101000000Z,holdInstruction,1.2.840.10040.2.2",
    "250101000000Z,removeFromCRL",
    "250101000000Z,keyTime",
    "250101000000Z,keyTime,2024",
    "250101000000Z,holdInstruction,CN",
    "250101000000Z,KEYCOMPROMISE",
    "250101000000Z,superseded,x",
]

# One field of a good line made wrong, or right in another way, to meet each check alone.
FIELD_VALUES: tuple[st.SearchStrategy[str], ...] = (
    st.sampled_from(["V", "R", "E", "v", "", "X", "VV", " V"]),
    st.sampled_from(["301301000000Z", "300230000000Z", "3001010000Z", "20500101000000"])
    | st.sampled_from(["00000101000000Z", "300101240000Z", "3O0101000000Z", "300101000000z"])
    | date_texts,
    st.sampled_from(["", "250101000000Z", "20500101000000Z,superseded", "250101000000Z,"])
    | st.sampled_from(["250101000000Z,stolen", ",superseded", "250101000000Z,keyCompromise,"])
    | st.sampled_from(REVOCATION_FORMS)
    | date_texts,
    st.sampled_from(["", "0", "0a", "ABC", "0G", "\u0660\u0661", "0A\r", "0A0"]) | serials,
    st.just("unknown") | free_text,
    st.sampled_from(["/CN=a", "CN=a", "", " /CN=a", "/CN=a\r", "/"]),
)


@st.composite
def changed_lines(draw: st.DrawFn) -> str:
    """A good line with one thing changed (it may stay good: a subject is any text)."""
    fields = format_line(draw(entries())).split("\t")
    which = draw(st.integers(0, len(fields) + 1))
    if which == len(fields):  # one field fewer or more
        return "\t".join(fields[:-1] if draw(st.booleans()) else [*fields, "x"])
    if which == len(fields) + 1:  # cut in two lines
        cut = draw(st.integers(1, len(fields) - 1))
        return "\t".join(fields[:cut]) + "\n" + "\t".join(fields[cut:])
    fields[which] = draw(FIELD_VALUES[which])
    return "\t".join(fields)


index_lines = (
    changed_lines()
    | changed_lines()
    | st.sampled_from(["", "V\t31", "\r"])
    | st.text(st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]))
)


@st.composite
def index_texts(draw: st.DrawFn) -> str:
    """Mostly good lines around a few others, so that blocks of good lines meet each one."""
    lines = draw(st.lists(entries().map(format_line), max_size=20))
    for other in draw(st.lists(index_lines, max_size=4)):
        lines.insert(draw(st.integers(0, len(lines))), other)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))


# Often one line a block, so that each line is met alone by the checks of a block.
block_sizes = st.sampled_from([0, 0, 1, 60, 150, 400])


# ---- index.txt -------------------------------------------------------------------------------


def columns_of(entries: list[IndexEntry]) -> tuple[list[object], ...]:
    return (
        [entry.serial for entry in entries],
        [entry.subject for entry in entries],
        [entry.not_after.isoformat() for entry in entries],
        [entry.revoked_at.isoformat() if entry.revoked_at else None for entry in entries],
        [entry.reason for entry in entries],
    )


@settings(max_examples=500)
@given(index_texts(), block_sizes)
def test_blocks_hold_what_parse_index_reads_with_the_same_problems(
    text: str, block_chars: int
) -> None:
    parsed = parse_index(text)
    blocks = parse_index_blocks(text, block_chars=block_chars)
    assert blocks.problems == parsed.problems
    columns = (
        [value for block in blocks.blocks for value in getattr(block, name)]
        for name in ("serial", "subject", "not_after", "revoked_at", "reason")
    )
    assert tuple(columns) == columns_of(parsed.entries)
    serials = [entry.serial for entry in parsed.entries]
    assert blocks.duplicates == (len(set(serials)) != len(serials))


@given(st.lists(entries(), max_size=40), block_sizes)
def test_blocks_of_good_lines_read_them_back(items: list[IndexEntry], block_chars: int) -> None:
    text = "".join(format_line(entry) + "\n" for entry in items)
    blocks = parse_index_blocks(text, block_chars=block_chars)
    assert [v for block in blocks.blocks for v in block.not_after] == columns_of(items)[2]
    assert [v for block in blocks.blocks for v in block.revoked_at] == columns_of(items)[3]


def line(*fields: str) -> str:
    return "\t".join(fields)


@pytest.mark.parametrize(
    "bad",
    [
        line("V", "300101000000Z", "", "0F", "/CN=a"),
        line("V", "300101000000Z", "", "0F", "unknown", "/CN=a", "x"),
        line("V", "300101000000Z", "", "0F") + "\n" + line("unknown", "/CN=a"),
        line("V", "300101000000Z", "") + "\n" + line("0F", "unknown", "/CN=a"),
        "",
        "\r",
        line("X", "300101000000Z", "", "0F", "unknown", "/CN=a"),
        line("v", "300101000000Z", "", "0F", "unknown", "/CN=a"),
        line("", "300101000000Z", "", "0F", "unknown", "/CN=a"),
        line("VV", "300101000000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "3001010000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "301301000000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "300230000000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "300101240000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "00000101000000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "300101000000", "", "0F", "unknown", "/CN=a"),
        line("V", "2030010100000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "3O0101000000Z", "", "0F", "unknown", "/CN=a"),
        line("V", "30010100000Z0", "", "0F", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "0f", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "ABC", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "0G", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "\u0660\u0661", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "0F", "unknown", "CN=a"),
        line("V", "300101000000Z", "", "0F", "unknown", ""),
        line("R", "300101000000Z", "", "0F", "unknown", "/CN=a"),
        line("R", "300101000000Z", "2501Z,superseded", "0F", "unknown", "/CN=a"),
        line("R", "300101000000Z", "250101000000Z,stolen", "0F", "unknown", "/CN=a"),
        line("R", "300101000000Z", ",superseded", "0F", "unknown", "/CN=a"),
        *(line("R", "300101000000Z", form, "0F", "unknown", "/CN=a") for form in REVOCATION_FORMS),
        line("V", "300101000000Z", "250101000000Z", "0F", "unknown", "/CN=a"),
        line("E", "300101000000Z", "250101000000Z", "0F", "unknown", "/CN=a"),
        line("V", "300101000000Z", "", "03E8", "unknown", "/CN=a"),  # a serial seen before
    ],
)
@pytest.mark.parametrize("block_chars", [0, 150, 1 << 15])
def test_each_check_of_a_block_sends_a_bad_line_to_parse_line(bad: str, block_chars: int) -> None:
    good = [format_line(entry) for entry in make_entries(6)]
    text = "\n".join([*good[:3], bad, *good[3:]]) + "\n"
    parsed = parse_index(text)
    blocks = parse_index_blocks(text, block_chars=block_chars)
    assert blocks.problems == parsed.problems
    assert [v for block in blocks.blocks for v in block.serial] == columns_of(parsed.entries)[0]


def test_a_bad_line_in_a_block_is_a_problem_naming_its_line_and_the_rest_is_read() -> None:
    good = [format_line(entry) for entry in make_entries(40)]
    lines = [*good[:25], "V\t301301000000Z\t\t0F\tunknown\t/CN=bad", *good[25:]]
    blocks = parse_index_blocks("\n".join(lines) + "\n", block_chars=200)
    assert blocks.problems == ["index.txt:26: notAfter: month must be in 1..12"]
    assert [v for b in blocks.blocks for v in b.serial] == [line.split("\t")[3] for line in good]


def test_a_date_in_other_digits_is_refused_as_parse_line_does() -> None:
    arabic_indic = "".join(chr(0x0660 + int(digit)) for digit in "300101000000")
    line = f"V\t{arabic_indic}Z\t\t0F\tunknown\t/CN=a"
    blocks = parse_index_blocks(line)
    assert [len(block.serial) for block in blocks.blocks] == [0]
    assert blocks.problems[0].startswith("index.txt:1: notAfter: date ")


@given(st.lists(date_texts, max_size=12))
def test_iso_dates_are_parse_date_isoformat_or_none(texts: list[str]) -> None:
    expected: list[str] | None
    try:
        expected = [parse_date(text).isoformat() for text in texts]
    except ValueError:
        expected = None
    assert iso_dates(texts) == expected


def test_iso_dates_of_both_forms_keep_their_order() -> None:
    texts = ["491231235959Z", "20500101000000Z", "500101000000Z", "09990102030405Z"]
    assert iso_dates(texts) == [
        "2049-12-31T23:59:59+00:00",
        "2050-01-01T00:00:00+00:00",
        "1950-01-01T00:00:00+00:00",
        "0999-01-02T03:04:05+00:00",
    ]
    # 14 + 16 characters of two dates, but neither one is a date
    assert iso_dates(["491231235959Z", "20500101000000", "Z20500101000000Z"]) is None


# ---- meta.tsv --------------------------------------------------------------------------------

meta_lines = st.tuples(
    serials,
    names,
    st.sampled_from([p.value for p in Profile]) | st.sampled_from(["", "Client", "x"]),
    st.just("") | date_texts,
).map("\t".join) | st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)


def meta_line_by_line(text: str) -> list[tuple[str, CachedMeta]]:
    """The good lines of meta.tsv, read as they always were."""
    meta: list[tuple[str, CachedMeta]] = []
    for line in text.split("\n"):
        fields = line.split("\t")
        if len(fields) != 4:
            continue
        serial, name, profile_text, not_before = fields
        if profile_text not in {profile.value for profile in Profile}:
            continue
        try:
            when = parse_date(not_before).isoformat() if not_before else None
        except ValueError:
            continue
        meta.append((serial, (name, Profile(profile_text), when)))
    return meta


@given(st.lists(meta_lines, max_size=30), st.sampled_from(["", "\n"]), block_sizes)
def test_meta_in_blocks_is_meta_line_by_line(lines: list[str], end: str, size: int) -> None:
    text = "\n".join(lines) + end
    meta = read_meta(text, block_chars=size)
    expected = meta_line_by_line(text)
    columns = zip(meta.name, meta.profile, meta.not_before, strict=True)
    assert list(zip(meta.serial, columns, strict=True)) == expected
    assert meta.by_serial() == dict(expected)  # the last line of a serial wins


@pytest.mark.parametrize(
    "bad",
    [
        line("0C", "carol", "client", "220924192324Z", "x"),
        line("0C", "carol", "client"),
        line("0C", "carol", "client", "220924192324Z", "x") + "\n" + line("0D", "client", "x"),
        line("0C", "carol") + "\n" + line("client", "220924192324Z"),
        line("0C", "carol", "client", "", "X") + "\n" + line("0D", "client", "220924192324Z"),
        line("0C", "carol", "client", "") + "\n" + line("0D", "dave", "client", "x"),
        line("0C", "carol", "Client", "220924192324Z"),
        line("0C", "carol", "client", "221324192324Z"),
        line("0C", "carol", "client", "220924192324Z\r"),
        line("0C", "carol\r", "client", "220924192324Z"),
        line("0A", "again", "server", "20500101000000Z"),
        "",
    ],
)
@pytest.mark.parametrize("block_chars", [0, 60, 1 << 15])
def test_each_check_of_a_meta_block_sends_a_bad_line_to_the_lines(
    bad: str, block_chars: int
) -> None:
    good = [line(f"0{n}", f"user{n}", "client", f"22092419232{n}Z") for n in range(4)]
    text = "\n".join([*good[:2], bad, *good[2:]]) + "\n"
    meta = read_meta(text, block_chars=block_chars)
    columns = zip(meta.name, meta.profile, meta.not_before, strict=True)
    assert list(zip(meta.serial, columns, strict=True)) == meta_line_by_line(text)


# ---- the listing -----------------------------------------------------------------------------

NO_FILE = "no file found in certs_by_serial/, issued/ or revoked/; its profile is unknown"


def reference_inventory(
    index_text: str, meta_text: str, now: datetime
) -> tuple[list[CertRecord], list[str]]:
    """PKIStore.inventory() as it was written before listing in bulk, for a PKI without
    certificate files (so every serial missing from meta.tsv has an unknown profile)."""
    parsed = parse_index(index_text)
    problems = list(parsed.problems)
    meta = dict(meta_line_by_line(meta_text))
    rows: list[tuple[IndexEntry, CachedMeta, Status]] = []
    last_live: dict[str, int] = {}
    for entry in parsed.entries:
        info = meta.get(entry.serial)
        if info is None:
            problems.append(f"certificate {entry.serial} ({entry.subject}): {NO_FILE}")
            info = (common_name(entry.subject), Profile.UNKNOWN, None)
        if entry.status == "R":
            status = Status.REVOKED
        elif entry.not_after <= now:
            status = Status.EXPIRED
        else:
            status = Status.VALID
        if status is not Status.REVOKED:
            last_live[info[0]] = len(rows)
        rows.append((entry, info, status))
    current = set(last_live.values())
    records = [
        CertRecord(
            name=info[0],
            serial=entry.serial,
            status=status,
            not_after=entry.not_after,
            not_before=None if info[2] is None else datetime.fromisoformat(info[2]),
            revoked_at=entry.revoked_at,
            reason=entry.reason,
            profile=info[1],
            subject=entry.subject,
            current=position in current,
        )
        for position, (entry, info, status) in enumerate(rows)
    ]
    return records, problems


def write_meta(root: Path, text: str) -> None:
    """A .certwarden/meta.tsv of this version (with its meta.version)."""
    (root / ".certwarden").mkdir(exist_ok=True)
    (root / ".certwarden" / "meta.tsv").write_text(text, encoding="utf-8")
    (root / ".certwarden" / META_VERSION_FILE).write_bytes(META_VERSION)


def meta_line(entry: IndexEntry, profile: Profile, not_before: datetime | None) -> str:
    when = format_date(not_before) if not_before else ""
    return f"{entry.serial}\t{common_name(entry.subject)}\t{profile.value}\t{when}"


@st.composite
def pkis(draw: st.DrawFn) -> tuple[str, str]:
    """index.txt and meta.tsv: often meta.tsv in index order (read as columns), else not."""
    items = draw(st.lists(entries(), max_size=25))
    lines = [format_line(entry) for entry in items]
    for position, extra in draw(st.lists(st.tuples(st.integers(0, 30), index_lines))):
        lines.insert(position, extra)
    meta = [
        meta_line(entry, draw(st.sampled_from(list(Profile))), draw(st.none() | any_dates))
        for entry in items
    ]
    if draw(st.booleans()):  # shuffled, with gaps, bad lines and repeated serials
        meta = draw(st.permutations(meta + draw(st.lists(meta_lines, max_size=5))))
        meta = meta[: draw(st.integers(0, len(meta)))] + meta[: draw(st.integers(0, 3))]
    return "\n".join(lines) + "\n", "".join(line + "\n" for line in meta)


@given(pkis(), near_dates)
def test_listing_is_the_inventory_as_it_was_and_its_json_is_json_dumps(
    pki: tuple[str, str], now: datetime
) -> None:
    index_text, meta_text = pki
    records, problems = reference_inventory(index_text, meta_text, now)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "index.txt").write_text(index_text, encoding="utf-8")
        write_meta(root, meta_text)
        store = PKIStore(root)
        listing = store.listing(now)
        inventory = PKIStore(root).inventory(now)
    assert listing.problems == problems
    assert listing.records() == records
    assert inventory.records == records
    assert inventory.problems == problems
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _echo_json(listing)
    assert out.getvalue() == json.dumps([record.as_json() for record in records]) + "\n"


def make_entries(count: int) -> list[IndexEntry]:
    return [
        IndexEntry(
            "R" if n % 5 == 0 else "V",
            datetime(2030 + n % 30, 1 + n % 12, 1 + n % 28, n % 24, tzinfo=UTC),
            datetime(2025, 1, 1, tzinfo=UTC) if n % 5 == 0 else None,
            Reason.SUPERSEDED if n % 10 == 0 else None,
            format_serial(1000 + n),
            f"/CN=user{n % 30}",
        )
        for n in range(count)
    ]


def test_listing_names_the_current_certificate_of_each_name_across_blocks(
    tmp_path: Path,
) -> None:
    items = make_entries(1000)
    (tmp_path / "index.txt").write_text("".join(format_line(e) + "\n" for e in items))
    meta = "".join(meta_line(e, Profile.CLIENT, e.not_after) + "\n" for e in items)
    write_meta(tmp_path, meta)
    now = datetime(2040, 1, 1, tzinfo=UTC)
    records, problems = reference_inventory((tmp_path / "index.txt").read_text(), meta, now)
    listing = PKIStore(tmp_path).listing(now)
    assert len(listing.blocks) > 1
    assert (listing.records(), listing.problems) == (records, problems)
    # 30 names, all certificates of every fifth one revoked: the newest of each of the others
    assert sum(record.current for record in records) == 24


def test_what_a_listing_reads_from_certificates_is_cached_as_the_file_gives_it_back(
    pki: PKI,
) -> None:
    pki.ca.issue([IssueRequest(name) for name in ("alice", "bob", "carol")])
    pki.ca.renew(["bob"])
    pki.ca.revoke("carol", Reason.KEY_COMPROMISE)
    meta = pki.store.meta_dir / "meta.tsv"
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[1:]))  # alice's gone
    store = PKIStore(pki.root)
    first = store.listing(pki.clock())
    assert first.problems == []
    again = store.listing(pki.clock())  # from the cache in memory, with what was read
    fresh = PKIStore(pki.root).listing(pki.clock())  # from meta.tsv, with alice appended
    assert first.records() == again.records() == fresh.records()
    assert [r.name for r in fresh.records()] == ["alice", "bob", "carol", "bob"]
    assert meta.read_text().count("\talice\t") == 1
    assert all(record.not_before for record in fresh.records())


def test_listing_wants_an_aware_now(tmp_path: Path) -> None:
    (tmp_path / "index.txt").write_text("")
    try:
        PKIStore(tmp_path).listing(datetime(2030, 1, 1))
    except TypeError as exc:
        assert "timezone-aware" in str(exc)
    else:
        raise AssertionError("a naive now was taken")


# ---- start-up --------------------------------------------------------------------------------


def test_the_list_command_does_not_import_cryptography() -> None:
    code = (
        "import sys, certwarden.cli\n"
        "slow = sorted(m for m in sys.modules if m.startswith(('cryptography', "
        "'certwarden.pki.ca', 'certwarden.pki.export', 'certwarden.pki.mobileconfig')))\n"
        "print(slow)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
