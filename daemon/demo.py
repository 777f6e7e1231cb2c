"""The embedded default the README's run command starts from: a small demo PKI under ./var."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import Profile, Reason
from certwarden.pki.store import PKIStore
from certwarden.terminal import echo_records

DEMO_CERTIFICATES = (
    IssueRequest("web.demo.test", Profile.SERVER, ("DNS:web.demo.test", "IP:127.0.0.1")),
    IssueRequest("alice-laptop", Profile.CLIENT, validity=timedelta(days=90)),
    IssueRequest("alice-iphone", Profile.CLIENT, validity=timedelta(days=90)),
    IssueRequest("bob-laptop", Profile.CLIENT, validity=timedelta(days=30)),
)


def create_demo_pki(pki_dir: Path) -> PKIStore:
    """A CA, a server, three clients (one revoked) and a CRL; nothing is done twice."""
    store = PKIStore(pki_dir)
    ca = CertificateAuthority(store)
    if not store.exists():
        ca.init("certwarden demo CA")
        ca.issue(list(DEMO_CERTIFICATES))
        ca.revoke("bob-laptop", Reason.CESSATION_OF_OPERATION)
        ca.generate_crl(timedelta(days=7))
    return store


def run_demo(directory: Path) -> None:
    store = create_demo_pki(directory / "pki")
    inventory = store.inventory()
    click.echo(f"demo PKI: {store.root}\n")
    echo_records(inventory.records)
    crl = store.current_crl()
    if crl is not None:
        click.echo(
            f"\nCRL: {len(crl)} revoked, next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC"
        )
    click.echo(f"try: certwarden --pki {store.root} list --json")
