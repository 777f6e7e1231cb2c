"""Fixtures shared by certwarden's tests; plugin authors can copy or import them too.

- ``pki``: a fresh PKI in ``tmp_path/"pki"`` with its CA, driven by the ``clock`` fixture.
- ``clock``: a clock that moves only when told; pass it as ``CertificateAuthority(store, clock)``.
- ``run_cli``: runs ``certwarden.cli.main(argv)`` in this process, returns (code, stdout, stderr).
- ``require_tool`` lives in :mod:`certwarden.testing`: it skips a test when a program is
  missing, but fails it when ``$CI`` is set, so that CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import pytest

from certwarden.cli import main
from certwarden.events import CertificateInfo, CertificateIssued
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.store import PKIStore


class Clock:
    """A settable clock: ``clock()`` returns ``clock.now``, which changes only through
    :meth:`advance` or assignment. It starts at the real time, whole seconds, so that
    certificates it stamps are also valid for outside tools (openssl, nginx)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@dataclass(frozen=True)
class PKI:
    """A PKI made by the ``pki`` fixture: ``ca`` uses the test's ``clock``."""

    store: PKIStore
    ca: CertificateAuthority
    clock: Clock

    @property
    def root(self) -> Path:
        return self.store.root

    def info(self, name: str) -> CertificateInfo:
        """The current certificate of ``name``, as plugins get it in events."""
        record = self.store.inventory(self.clock()).current(name)
        assert record is not None
        return CertificateInfo.from_record(record, self.root)

    def issued(self, name: str = "alice-phone") -> CertificateIssued:
        """Issue ``name`` and return the event the daemon would hand to plugins."""
        self.ca.issue([IssueRequest(name)])
        return CertificateIssued(cert=self.info(name))


@pytest.fixture
def pki(tmp_path: Path, clock: Clock) -> PKI:
    """A new easy-rsa layout PKI with an EC P-256 CA and its first CRL."""
    store = PKIStore(tmp_path / "pki", lock_timeout=2.0)
    ca = CertificateAuthority(store, clock=clock)
    ca.init("certwarden test CA")
    return PKI(store, ca, clock)


class CliResult(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


RunCli = Callable[[Sequence[str | os.PathLike[str]]], CliResult]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """``run_cli(["--pki", dir, "list"])``: the exit code and what the command printed."""

    def run(argv: Sequence[str | os.PathLike[str]]) -> CliResult:
        capsys.readouterr()  # drop what the test printed before
        code = main([os.fspath(arg) for arg in argv])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
