"""The easy-rsa compatible PKI: layout, index, store and CA operations."""

from __future__ import annotations
