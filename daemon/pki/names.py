"""Certificate names: the NAME in issued/NAME.crt and in the subject's CN.

A name becomes a file name, a subject and an environment variable for deploy commands, so it
is held to the strictest of the three: letters, digits and ``. _ @ -``, not starting with a dot
or a dash, at most 64 characters (the CN limit of RFC 5280).
"""

from __future__ import annotations

import re

from certwarden.errors import InvalidName

MAX_LENGTH = 64
_ALLOWED = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9._@-]*")
_RESERVED = frozenset({"ca"})  # private/ca.key and ca.crt belong to the CA itself


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is safe to use, else raise :class:`InvalidName`."""
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    if not name:
        raise InvalidName("certificate name is empty; give a name such as 'alice-laptop'")
    if len(name) > MAX_LENGTH:
        raise InvalidName(
            f"certificate name {shown} is {len(name)} characters long; use at most {MAX_LENGTH}"
        )
    if name in _RESERVED:
        raise InvalidName(f"certificate name {shown} is reserved for the CA; choose another")
    if not _ALLOWED.fullmatch(name):
        raise InvalidName(
            f"certificate name {shown} is not allowed: use letters, digits and . _ @ - "
            "only, not starting with '.' or '-'"
        )
    return name


def is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidName:
        return False
    return True
