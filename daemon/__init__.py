"""certwarden: certificate lifecycle automation for an easy-rsa style private CA."""

from __future__ import annotations

__version__ = "0.1.0"
