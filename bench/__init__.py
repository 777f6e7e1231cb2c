"""certwarden's benchmarks against the tools it replaces (openssl ca, easy-rsa).

Not tests: ``python -m bench`` runs them all, ``python -m bench.crl`` (``.issue``,
``.listing``) one of them. Each prints a table of medians and ratios; see bench/README.md.
"""

from __future__ import annotations
