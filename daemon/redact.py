"""Keeping private keys out of logs and delivery records.

A last line of defence, not a licence: plugins must not put secrets in messages. It catches the
mistake that does happen, a PEM key in an exception's text, including one cut short.
"""

from __future__ import annotations

import re

_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
REDACTED = "[private key redacted]"


def redact(text: str) -> str:
    """``text`` with every PEM private key (even an unterminated one) replaced."""
    if "PRIVATE KEY-----" not in text:
        return text
    return _PRIVATE_KEY.sub(REDACTED, text)
