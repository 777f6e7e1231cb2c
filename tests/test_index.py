"""index.txt lines: the exact format ``openssl ca`` and easy-rsa read and write."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certwarden.errors import MalformedFile
from certwarden.pki.index import (
    IndexEntry,
    format_date,
    format_line,
    format_serial,
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


@st.composite
def entries(draw: st.DrawFn) -> IndexEntry:
    status = draw(st.sampled_from(["V", "R", "E"]))
    revoked_at = draw(dates) if status == "R" else None
    reason = draw(st.none() | st.sampled_from(list(Reason))) if status == "R" else None
    return IndexEntry(
        status=status,
        not_after=draw(dates),
        revoked_at=revoked_at,
        reason=reason,
        serial=draw(serials),
        subject=draw(subjects),
        filename=draw(st.just("unknown") | free_text),
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
    st.from_regex(r"\A[0-9]{12}Z(?:,[A-Za-z]*)?\Z") | st.text(max_size=16),
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
        "R\t290301125856Z\t261341125857Z\t0B\tunknown\t/CN=bad-month\n"
        "R\t290301125856Z\t261127125857Z,sometimes\t0C\tunknown\t/CN=bad-reason\n"
        "R\t290301125856Z\t261127125857Z\tabc\tunknown\t/CN=bad-serial\n"
    )
    revocations, problems = parse_revocations(text)
    assert revocations == [
        ("1C7FA8A51E69A2768D6C23462F2F8B02", "261127125857Z", Reason.KEY_COMPROMISE),
        ("0A", "20510102030405Z", None),
    ]
    assert [problem.split(":")[1] for problem in problems] == ["4", "5", "6"]
    assert all(problem.startswith("index.txt:") for problem in problems)
