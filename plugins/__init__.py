"""Built-in certwarden plugins."""

from __future__ import annotations
