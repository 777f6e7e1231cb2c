"""Certificate names: safe as a file name, a subject and an environment variable at once."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from certwarden.errors import InvalidName
from certwarden.pki.names import MAX_LENGTH, is_valid_name, validate_name

# The rule, written out independently of the module's regular expression.
ALLOWED = frozenset(string.ascii_letters + string.digits + "._@-")
FORBIDDEN_FIRST = frozenset(".-")


def follows_rule(name: str) -> bool:
    return (
        0 < len(name) <= MAX_LENGTH
        and set(name) <= ALLOWED
        and name[0] not in FORBIDDEN_FIRST
        and name != "ca"
    )


def shown_in_message(name: str) -> str:
    """How a rejected name appears in its one-line message (runs of spaces collapse)."""
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    return " ".join(shown.split())


valid_names = st.from_regex(r"\A[A-Za-z0-9_@][A-Za-z0-9._@-]{0,63}\Z").filter(
    lambda name: name != "ca"
)
SHELL_METACHARACTERS = "$`;|&<>*? \"'"
BAD_CHARACTERS = "/\n\r\0\t\\" + SHELL_METACHARACTERS


def assert_rejected(name: str) -> None:
    with pytest.raises(InvalidName) as caught:
        validate_name(name)
    message = str(caught.value)
    assert "\n" not in message
    assert "\r" not in message
    if name:
        assert shown_in_message(name) in message
    else:
        assert "empty" in message
    assert caught.value.exit_code == 65
    assert not is_valid_name(name)


def test_max_length_is_the_rfc5280_common_name_limit() -> None:
    assert MAX_LENGTH == 64


@given(st.text())
@example("ca")
@example("CA")
@example("a" * 64)
@example("a" * 65)
@example("")
def test_accepts_exactly_the_names_that_follow_the_rule(name: str) -> None:
    if follows_rule(name):
        assert validate_name(name) == name
        assert is_valid_name(name)
    else:
        assert_rejected(name)


@given(valid_names)
def test_accepts_every_name_built_from_the_rule(name: str) -> None:
    assert validate_name(name) == name


@given(valid_names, st.sampled_from(BAD_CHARACTERS), st.data())
def test_never_accepts_a_path_separator_control_or_shell_character(
    name: str, bad: str, data: st.DataObject
) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(name)))
    assert_rejected(name[:position] + bad + name[position:])


@given(valid_names, st.sampled_from(["..", ".", "-", "../", "./", "--"]))
def test_never_accepts_a_leading_dot_or_dash(name: str, prefix: str) -> None:
    assert_rejected(prefix + name)


@given(st.text(alphabet=sorted(ALLOWED), min_size=MAX_LENGTH + 1, max_size=300))
def test_never_accepts_more_than_64_characters(name: str) -> None:
    assert_rejected(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc/passwd",
        "a/b",
        "/abs",
        "-rf",
        ".hidden",
        "alice\nbob",
        "nul\0byte",
        "$(reboot)",
        "`id`",
        "a;b",
        "a|b",
        "a&b",
        "a<b",
        "a>b",
        "a*",
        "a?",
        "a b",
        "a  b",
        "'quoted'",
        '"quoted"',
        "ca",
        "caf\u00e9",
        "x" * 200,
    ],
)
def test_rejects_known_bad_names_with_a_one_line_message_naming_them(name: str) -> None:
    assert_rejected(name)


@pytest.mark.parametrize(
    "name", ["alice", "alice-laptop", "web.example.test", "a", "user@example.org", "_svc"]
)
def test_accepts_ordinary_names(name: str) -> None:
    assert validate_name(name) == name
