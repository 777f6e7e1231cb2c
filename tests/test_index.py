"""index.txt lines: the exact format ``openssl ca`` and easy-rsa read and write."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certwarden.errors import MalformedFile
from certwarden.pki.index import (
    HOLD_INSTRUCTIONS,
    IndexEntry,
    format_date,
    format_line,
    format_serial,
    parse_generalized_time,
    parse_index,
    parse_line,
    parse_revocations,
)
from certwarden.pki.model import Reason

ARABIC_INDIC_2030 = "".join(chr(0x0660 + int(digit)) for digit in "300101000000")


def line(*fields: str) -> str:
    return "\t".join(fields)


def test_utctime_two_digit_years_mean_1950_to_2049() -> None:
    assert parse_line(line("V", "491231235959Z", "", "0A", "unknown", "/CN=a")).not_after == (
        datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
    )
    assert parse_line(line("V", "500101000000Z", "", "0A", "unknown", "/CN=a")).not_after == (
        datetime(1950, 1, 1, tzinfo=UTC)
    )


def test_generalizedtime_four_digit_year_is_read() -> None:
    entry = parse_line(line("V", "20500101000000Z", "", "0A", "unknown", "/CN=a"))
    assert entry.not_after == datetime(2050, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), "491231235959Z"),
        (datetime(2050, 1, 1, 0, 0, 0, tzinfo=UTC), "20500101000000Z"),
        (datetime(1950, 1, 1, 0, 0, 0, tzinfo=UTC), "500101000000Z"),
        (datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC), "19491231235959Z"),
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "09990102030405Z"),
    ],
)
def test_format_date_switches_to_generalizedtime_outside_1950_to_2049(
    when: datetime, text: str
) -> None:
    assert format_date(when) == text


def test_both_date_forms_in_one_line() -> None:
    text = line("R", "20510630120000Z", "250102030405Z,superseded", "01AB", "unknown", "/CN=bob")
    entry = parse_line(text)
    assert entry.not_after == datetime(2051, 6, 30, 12, tzinfo=UTC)
    assert entry.revoked_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert entry.reason is Reason.SUPERSEDED
    assert format_line(entry) == text


@pytest.mark.parametrize("reason", list(Reason))
def test_each_revocation_reason_round_trips(reason: Reason) -> None:
    text = line("R", "300101000000Z", f"250101000000Z,{reason.value}", "0F", "unknown", "/CN=c")
    entry = parse_line(text)
    assert entry.reason is reason
    assert format_line(entry) == text


def test_reason_names_are_the_ones_openssl_writes() -> None:
    assert {reason.value for reason in Reason} == {
        "unspecified",
        "keyCompromise",
        "CACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
    }


def test_revoked_line_without_reason() -> None:
    text = line("R", "300101000000Z", "250101000000Z", "0F", "unknown", "/CN=c")
    entry = parse_line(text)
    assert entry.status == "R"
    assert entry.revoked_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert entry.reason is None
    assert format_line(entry) == text


def test_subject_keeps_every_component_and_cn_is_the_last_one() -> None:
    entry = parse_line(line("V", "300101000000Z", "", "0F", "unknown", "/O=Example/CN=a/CN=b"))
    assert entry.subject == "/O=Example/CN=a/CN=b"
    assert entry.common_name == "b"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (line("V", "300101000000Z", "", "0F", "/CN=a"), "expected 6 tab-separated fields"),
        (line("V", "300101000000Z", "", "0F", "unknown", "/CN=a", "x"), "found 7"),
        ("V 300101000000Z  0F unknown /CN=a", "found 1"),
        (line("X", "300101000000Z", "", "0F", "unknown", "/CN=a"), "status 'X'"),
        (line("v", "300101000000Z", "", "0F", "unknown", "/CN=a"), "status 'v'"),
        (line("", "300101000000Z", "", "0F", "unknown", "/CN=a"), "status ''"),
        (line("V", "3001010000Z", "", "0F", "unknown", "/CN=a"), "notAfter"),
        (line("V", "301301000000Z", "", "0F", "unknown", "/CN=a"), "notAfter"),
        (line("V", "300101000000", "", "0F", "unknown", "/CN=a"), "notAfter"),
        (line("V", "2030010100000Z", "", "0F", "unknown", "/CN=a"), "notAfter"),
        (line("V", "3O0101000000Z", "", "0F", "unknown", "/CN=a"), "notAfter"),
        # 300101000000Z in Arabic-Indic digits, which str.isdigit() accepts
        (line("V", ARABIC_INDIC_2030 + "Z", "", "0F", "unknown", "/CN=a"), "notAfter"),
        (line("V", "300101000000Z", "", "0f", "unknown", "/CN=a"), "serial '0f'"),
        (line("V", "300101000000Z", "", "ABC", "unknown", "/CN=a"), "serial 'ABC'"),
        (line("V", "300101000000Z", "", "", "unknown", "/CN=a"), "serial ''"),
        (line("V", "300101000000Z", "", "0G", "unknown", "/CN=a"), "serial '0G'"),
        (line("V", "300101000000Z", "", "0F", "unknown", "CN=a"), "subject 'CN=a'"),
        (line("V", "300101000000Z", "", "0F", "unknown", ""), "subject ''"),
        (line("R", "300101000000Z", "", "0F", "unknown", "/CN=a"), "revocation date"),
        (line("R", "300101000000Z", "2501Z,superseded", "0F", "unknown", "/CN=a"), "revocation"),
        (line("R", "300101000000Z", "250101000000Z,stolen", "0F", "unknown", "/CN=a"), "stolen"),
        (line("V", "300101000000Z", "250101000000Z", "0F", "unknown", "/CN=a"), "must not carry"),
        (line("E", "300101000000Z", "250101000000Z", "0F", "unknown", "/CN=a"), "must not carry"),
    ],
)
def test_malformed_line_raises_malformed_file_naming_the_line(text: str, complaint: str) -> None:
    with pytest.raises(MalformedFile) as caught:
        parse_line(text, "index.txt:7")
    message = str(caught.value)
    assert message.startswith("index.txt:7: ")
    assert complaint in message
    assert "\n" not in message


def test_parse_index_goes_past_bad_lines_and_reports_duplicates() -> None:
    text = "\n".join(
        [
            line("V", "300101000000Z", "", "01", "unknown", "/CN=a"),
            line("V", "3001010000", "", "02", "unknown", "/CN=b"),
            "",
            line("R", "300101000000Z", "250101000000Z,keyCompromise", "03", "unknown", "/CN=c"),
            line("V", "310101000000Z", "", "01", "unknown", "/CN=a"),
            "V\t31",
            line("E", "200101000000Z", "", "04", "unknown", "/CN=d"),
            "",
        ]
    )
    parsed = parse_index(text)
    assert [entry.serial for entry in parsed.entries] == ["01", "03", "01", "04"]
    assert len(parsed.problems) == 3
    assert parsed.problems[0].startswith("index.txt:2: notAfter")
    assert parsed.problems[1] == "index.txt:5: serial 01 appears twice"
    assert parsed.problems[2].startswith("index.txt:6: expected 6 tab-separated fields")


def test_parse_index_of_empty_file_is_empty() -> None:
    assert parse_index("") == parse_index("\n\n")
    assert parse_index("").entries == []
    assert parse_index("").problems == []


@pytest.mark.parametrize(
    ("serial", "text"),
    [(0, "00"), (1, "01"), (0xABC, "0ABC"), (0xFFFF, "FFFF"), (2**64, "01" + "00" * 8)],
)
def test_format_serial_is_uppercase_hex_with_even_digits(serial: int, text: str) -> None:
    assert format_serial(serial) == text


# ---- properties ----------------------------------------------------------------------------

dates = st.datetimes(
    min_value=datetime(1, 1, 1),
    max_value=datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.just(UTC),
).map(lambda when: when.replace(microsecond=0))
# Anything but the field separator and the line end; OpenSSL writes subjects with any
# other character (escaped or raw UTF-8).
free_text = st.text(st.characters(blacklist_characters="\t\n", blacklist_categories=["Cs"]))
subjects = st.builds(lambda rest: "/" + rest, free_text)
serials = st.integers(min_value=0, max_value=2**160).map(format_serial)


hold_instructions = st.sampled_from(sorted(HOLD_INSTRUCTIONS)) | st.from_regex(
    r"\A(?:[01]\.[1-3]?[0-9]|2\.(?:0|[1-9][0-9]{0,5}))(?:\.(?:0|[1-9][0-9]{0,9})){0,6}\Z"
)


@st.composite
def entries(draw: st.DrawFn) -> IndexEntry:
    status = draw(st.sampled_from(["V", "R", "E"]))
    revoked_at = draw(dates) if status == "R" else None
    reason = draw(st.none() | st.sampled_from(list(Reason))) if status == "R" else None
    # openssl ca -crl_compromise / -crl_CA_compromise TIME, -crl_hold OID
    invalid_since = None
    hold = None
    if reason in (Reason.KEY_COMPROMISE, Reason.CA_COMPROMISE):
        invalid_since = draw(st.none() | dates)
    elif reason is Reason.CERTIFICATE_HOLD:
        hold = draw(st.none() | hold_instructions)
    return IndexEntry(
        status=status,
        not_after=draw(dates),
        revoked_at=revoked_at,
        reason=reason,
        serial=draw(serials),
        subject=draw(subjects),
        filename=draw(st.just("unknown") | free_text),
        invalid_since=invalid_since,
        hold_instruction=hold,
    )


@given(entries())
def test_format_then_parse_round_trips(entry: IndexEntry) -> None:
    text = format_line(entry)
    assert parse_line(text) == entry
    assert format_line(parse_line(text)) == text


@given(st.lists(entries(), max_size=20))
def test_parse_index_reads_back_what_render_wrote(items: list[IndexEntry]) -> None:
    text = "".join(format_line(entry) + "\n" for entry in items)
    parsed = parse_index(text)
    assert parsed.entries == items
    duplicates = len(items) - len({entry.serial for entry in items})
    assert len(parsed.problems) == duplicates


def _check_only_malformed_file(text: str) -> None:
    try:
        entry = parse_line(text, "index.txt:3")
    except MalformedFile as exc:
        message = str(exc)
        assert message.startswith("index.txt:3: ")
        assert "\n" not in message
    else:
        # Whatever was accepted is written back as a line openssl reads the same way.
        assert parse_line(format_line(entry)) == entry


@given(st.text())
def test_parse_line_raises_only_malformed_file_on_any_text(text: str) -> None:
    _check_only_malformed_file(text)


near_fields = st.tuples(
    st.sampled_from(["V", "R", "E", "v", ""]) | st.text(max_size=2),
    st.from_regex(r"\A[0-9]{12}(?:[0-9]{2})?Z\Z") | st.text(max_size=16),
    st.from_regex(r"\A[0-9]{12}Z(?:,[A-Za-z]*)?\Z")
    | st.from_regex(r"\A[0-9]{12}Z,(?:keyTime|CAkeyTime|holdInstruction|x)(?:,[0-9.Z+-]*)?\Z")
    | st.text(max_size=16),
    st.from_regex(r"\A[0-9A-F]{1,6}\Z") | st.text(max_size=6),
    st.just("unknown") | st.text(max_size=8),
    st.from_regex(r"\A/CN=[^\t\n]*\Z") | st.text(max_size=8),
)


@given(near_fields)
def test_parse_line_raises_only_malformed_file_on_almost_valid_lines(
    fields: tuple[str, str, str, str, str, str],
) -> None:
    _check_only_malformed_file("\t".join(fields))


def test_revocations_for_a_crl_come_from_the_revoked_lines_with_their_date_text() -> None:
    text = (
        "V\t290301125857Z\t\tA668226F8A53E049604CFE528A98A112\tunknown\t/CN=srv\n"
        "R\t290301125856Z\t261127125857Z,keyCompromise\t1C7FA8A51E69A2768D6C23462F2F8B02\tunknown\t/CN=alice\n"
        "R\t20510301125856Z\t20510102030405Z\t0A\tunknown\t/CN=late\n"
        "R\t290301125856Z\t261127125857Z,keyTime,20260101000000Z\t0B\tunknown\t/CN=stolen\n"
        "R\t290301125856Z\t261127125857Z,holdInstruction,holdInstructionReject\t0C\tunknown\t/CN=held\n"
    )
    revocations, problems = parse_revocations(text)
    assert revocations == [
        ("1C7FA8A51E69A2768D6C23462F2F8B02", "261127125857Z", Reason.KEY_COMPROMISE, None, None),
        ("0A", "20510102030405Z", None, None, None),
        ("0B", "261127125857Z", Reason.KEY_COMPROMISE, "20260101000000Z", None),
        ("0C", "261127125857Z", Reason.CERTIFICATE_HOLD, None, "1.2.840.10040.2.3"),
    ]
    assert problems == []


# ---- the forms openssl ca writes (apps/ca.c, make_revocation_str) ------------------------------


@pytest.mark.parametrize(
    ("field", "reason", "invalid_since", "hold"),
    [
        # -crl_reason R
        ("261127125857Z,superseded", Reason.SUPERSEDED, None, None),
        # -crl_compromise TIME
        (
            "261127125857Z,keyTime,20260101000000Z",
            Reason.KEY_COMPROMISE,
            datetime(2026, 1, 1, tzinfo=UTC),
            None,
        ),
        # -crl_CA_compromise TIME
        (
            "261127125857Z,CAkeyTime,20250601120000Z",
            Reason.CA_COMPROMISE,
            datetime(2025, 6, 1, 12, tzinfo=UTC),
            None,
        ),
        # -crl_hold OID, by name or dotted
        (
            "261127125857Z,holdInstruction,holdInstructionReject",
            Reason.CERTIFICATE_HOLD,
            None,
            "holdInstructionReject",
        ),
        (
            "261127125857Z,holdInstruction,1.2.840.10040.2.2",
            Reason.CERTIFICATE_HOLD,
            None,
            "1.2.840.10040.2.2",
        ),
    ],
)
def test_openssl_revocation_forms_are_read_and_written_back_the_same(
    field: str, reason: Reason, invalid_since: datetime | None, hold: str | None
) -> None:
    text = line("R", "290301125856Z", field, "0F", "unknown", "/CN=c")

    entry = parse_line(text)

    assert entry.revoked_at == datetime(2026, 11, 27, 12, 58, 57, tzinfo=UTC)
    assert (entry.reason, entry.invalid_since, entry.hold_instruction) == (
        reason,
        invalid_since,
        hold,
    )
    assert format_line(entry) == text
    assert entry.revoke(datetime(2027, 1, 1, tzinfo=UTC), None).invalid_since is None


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("20260101000000Z", datetime(2026, 1, 1, tzinfo=UTC)),
        ("202601010000Z", datetime(2026, 1, 1, tzinfo=UTC)),  # seconds are optional
        ("20260101000000.5Z", datetime(2026, 1, 1, tzinfo=UTC)),  # fraction dropped
        ("20260101000000+0100", datetime(2025, 12, 31, 23, tzinfo=UTC)),
        ("20251231230000-0130", datetime(2026, 1, 1, 0, 30, tzinfo=UTC)),
    ],
)
def test_compromise_times_in_every_form_openssl_accepts(text: str, when: datetime) -> None:
    assert parse_generalized_time(text) == when
    entry = parse_line(line("R", "290301125856Z", f"261127125857Z,keyTime,{text}", "0F", "u", "/"))
    assert entry.invalid_since == when


@pytest.mark.parametrize(
    ("field", "complaint"),
    [
        ("261127125857Z,keyTime", "keyTime must be followed by ,TIME"),
        ("261127125857Z,CAkeyTime,2026", "CAkeyTime: compromise time '2026'"),
        ("261127125857Z,keyTime,20261301000000Z", "month must be in 1..12"),
        ("261127125857Z,keyTime,2601010000Z", "not a GeneralizedTime"),
        ("261127125857Z,holdInstruction", "holdInstruction must be followed by ,OID"),
        ("261127125857Z,holdInstruction,CN", "hold instruction 'CN'"),
        ("261127125857Z,holdInstruction,3.1", "hold instruction '3.1'"),
        ("261127125857Z,keyCompromise,extra", "'keyCompromise,extra' is unknown"),
        ("261127125857Z,KEYCOMPROMISE", "'KEYCOMPROMISE' is unknown"),
        ("261127125857Z,removeFromCRL", "removeFromCRL belongs in delta CRLs only"),
    ],
)
def test_revocation_forms_openssl_does_not_write_are_problems(field: str, complaint: str) -> None:
    with pytest.raises(MalformedFile, match=complaint) as caught:
        parse_line(line("R", "290301125856Z", field, "0F", "unknown", "/CN=c"), "index.txt:9")
    assert str(caught.value).startswith("index.txt:9: ")


# ---- the CRL fails closed -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revoked", "expected", "complaint"),
    [
        # an unreadable revocation date: the CRL's own date (None) stands for it
        (
            line("R", "290301125856Z", "261341125857Z,superseded", "0B", "unknown", "/CN=a"),
            ("0B", None, Reason.SUPERSEDED, None, None),
            "revocation date '261341125857Z' is not a valid",
        ),
        (
            line("R", "290301125856Z", "", "0B", "unknown", "/CN=a"),
            ("0B", None, None, None, None),
            "revocation date '' is not a valid",
        ),
        # an unknown reason: no reason (unspecified)
        (
            line("R", "290301125856Z", "261127125857Z,sometimes", "0C", "unknown", "/CN=a"),
            ("0C", "261127125857Z", None, None, None),
            "listed without a reason",
        ),
        # what openssl would read anyway: reasons in any case, arguments it ignores
        (
            line("R", "290301125856Z", "261127125857Z,KEYCOMPROMISE", "0C", "unknown", "/CN=a"),
            ("0C", "261127125857Z", Reason.KEY_COMPROMISE, None, None),
            "listed as keyCompromise",
        ),
        (
            line("R", "290301125856Z", "261127125857Z,keytime,2026", "0C", "unknown", "/CN=a"),
            ("0C", "261127125857Z", Reason.KEY_COMPROMISE, None, None),
            "listed as keyCompromise without a compromise time",
        ),
        (
            line("R", "290301125856Z", "261127125857Z,holdInstruction,x", "0C", "unknown", "/"),
            ("0C", "261127125857Z", Reason.CERTIFICATE_HOLD, None, None),
            "listed as certificateHold without a hold instruction",
        ),
        # a serial openssl reads (BN_hex2bn): any case, odd length, spaces around
        (
            line("R", "290301125856Z", "261127125857Z", "abc", "unknown", "/CN=a"),
            ("0ABC", "261127125857Z", None, None, None),
            "serial 'abc' read as 0ABC",
        ),
        (
            line("R", "290301125856Z", "261127125857Z", " 0A ", "unknown", "/CN=a"),
            ("0A", "261127125857Z", None, None, None),
            "serial ' 0A ' read as 0A",
        ),
        # fields openssl would not read at all, and a status only starting with R
        (
            line("R", "290301125856Z", "261127125857Z", "0D", "/CN=a"),
            ("0D", "261127125857Z", None, None, None),
            "expected 6 tab-separated fields, found 5",
        ),
        (
            line("R", "bad", "261127125857Z", "0D", "unknown", "/CN=a", "more"),
            ("0D", "261127125857Z", None, None, None),
            "found 7",
        ),
        (
            line("Rx", "290301125856Z", "261127125857Z,superseded", "0E", "unknown", "/CN=a"),
            ("0E", "261127125857Z", Reason.SUPERSEDED, None, None),
            "status 'Rx' is not R",
        ),
    ],
)
def test_a_malformed_revoked_line_with_a_readable_serial_is_still_in_the_crl(
    revoked: str, expected: tuple[object, ...], complaint: str
) -> None:
    good = line("R", "290301125856Z", "261127125857Z", "01", "unknown", "/CN=good")
    text = "\n".join([good, revoked, good.replace("\t01\t", "\t02\t")]) + "\n"

    revocations, problems = parse_revocations(text)

    assert revocations == [
        ("01", "261127125857Z", None, None, None),
        expected,
        ("02", "261127125857Z", None, None, None),
    ]
    (problem,) = problems
    assert problem.startswith("index.txt:2: ")
    assert complaint in problem
    assert problem.endswith(f"the CRL lists serial {expected[0]} anyway")


@pytest.mark.parametrize(
    "revoked",
    [
        line("R", "290301125856Z", "261127125857Z", "0G", "unknown", "/CN=a"),
        line("R", "290301125856Z", "261127125857Z", "", "unknown", "/CN=a"),
        "R\t31",
        "R",
    ],
)
def test_a_revoked_line_without_a_readable_serial_is_a_problem(revoked: str) -> None:
    revocations, problems = parse_revocations(revoked + "\n")

    assert revocations == []
    (problem,) = problems
    assert problem.startswith("index.txt:1: ")
    assert "the CRL cannot list this line" in problem


@pytest.mark.parametrize("reason", ["removeFromCRL", "REMOVEFROMCRL", "removeFromCRL,x"])
def test_remove_from_crl_is_left_out_of_a_full_crl_with_a_warning(reason: str) -> None:
    """RFC 5280 5.3.1: removeFromCRL only has a meaning in a delta CRL. openssl ca -gencrl
    writes such an entry, which openssl verify reads as "not revoked"; leaving it out of the
    full CRL has the same effect for nginx, and says nothing RFC 5280 forbids."""
    text = line("R", "290301125856Z", f"261127125857Z,{reason}", "0F", "unknown", "/CN=a")

    revocations, problems = parse_revocations(text)

    assert revocations == []
    (problem,) = problems
    assert problem.startswith("index.txt:1: serial 0F: revocation reason removeFromCRL")
    assert "TLS servers accept it" in problem


# ---- the CRL and parse_line agree --------------------------------------------------------------

revoked_lines = st.builds(
    lambda fields: "\t".join(fields),
    st.tuples(
        st.sampled_from(["R", "R", "R", "Rx", "V"]),
        st.from_regex(r"\A[0-9]{12}Z\Z") | free_text,
        st.from_regex(
            r"\A(?:[0-9]{12}Z|[0-9]{11}Z|)(?:,(?:keyCompromise|KEYcompromise|superseded|stolen"
            r"|keyTime|CAkeyTime|holdInstruction|removeFromCRL)(?:,[0-9.Z+a-zA-Z-]{0,16})?)?\Z"
        ),
        st.from_regex(r"\A[0-9A-Fa-f ]{0,6}\Z") | serials,
        st.just("unknown"),
        subjects,
    ),
)


@given(st.lists(entries().map(format_line) | revoked_lines, max_size=12))
def test_every_revoked_line_with_a_hex_serial_is_in_the_crl_and_good_ones_as_parse_line_reads(
    lines: list[str],
) -> None:
    revocations, problems = parse_revocations("\n".join(lines))

    listed = iter(revocations)
    for number, text in enumerate(lines, start=1):
        if not text.startswith("R"):
            continue
        fields = text.split("\t")
        serial = fields[3].strip() if len(fields) > 3 else ""
        about = [p for p in problems if p.startswith(f"index.txt:{number}: ")]
        try:
            entry = parse_line(text)
        except MalformedFile:
            entry = None
        if entry is not None:  # a good line: exactly what parse_line read, and no warning
            assert about == []
            date = fields[2].partition(",")[0]
            since = entry.invalid_since
            invalidity = since and f"{since.year:04d}" + since.strftime("%m%d%H%M%SZ")
            hold = entry.hold_instruction and HOLD_INSTRUCTIONS.get(
                entry.hold_instruction, entry.hold_instruction
            )
            assert next(listed) == (entry.serial, date, entry.reason, invalidity, hold)
        elif serial and all(c in "0123456789abcdefABCDEF" for c in serial):
            (problem,) = about
            if "removeFromCRL" not in problem:
                assert int(next(listed)[0], 16) == int(serial, 16)
        else:
            (problem,) = about
            assert "the CRL cannot list this line" in problem
    assert next(listed, None) is None
