"""The embedded default the README's run command starts: a demo PKI and daemon under ./var.

Lifetimes are minutes instead of years, so a newcomer sees renewals and CRL refreshes happen
within a coffee break; the exec plugin prints every event.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import click

from certwarden.atomicfile import write_atomic
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.model import Profile, Reason
from certwarden.pki.store import PKIStore
from certwarden.terminal import echo_records

DEMO_CERTIFICATES = (
    IssueRequest(
        "web.demo.test",
        Profile.SERVER,
        ("DNS:web.demo.test", "IP:127.0.0.1"),
        validity=timedelta(minutes=10),
    ),
    IssueRequest("alice-laptop", Profile.CLIENT, validity=timedelta(minutes=6)),
    IssueRequest("alice-iphone", Profile.CLIENT, validity=timedelta(minutes=6)),
    IssueRequest("bob-laptop", Profile.CLIENT, validity=timedelta(minutes=6)),
)

# Printed by the exec plugin for every event: what a deploy hook would see.
_ECHO = (
    "import os; e = os.environ; "
    "print('[exec]', e['CERTWARDEN_EVENT'], e.get('CERTWARDEN_NAME') or '', "
    "e.get('CERTWARDEN_SERIAL') or e.get('CERTWARDEN_CRL_NUMBER') or '')"
)


def demo_config(directory: Path) -> str:
    command = [sys.executable, "-c", _ECHO]
    argv = ", ".join(f'"{part}"' if '"' not in part else repr(part) for part in command)
    return f"""\
# certwarden demo: lifetimes of minutes so that renewals and CRL refreshes happen while you
# watch. Run it with `make run` (or `certwarden demo`); Ctrl-C stops it.
[pki]
dir = "{directory / "pki"}"

[state]
dir = "{directory / "state"}"

[crl]
validity = "4m"
refresh_after = 0.5

[daemon]
debounce = "300ms"
reconcile_interval = "1m"
retry_initial = "10s"
retry_max = "1m"
log_level = "info"

[profiles.client]
validity = "6m"
renew_before = "1/3"

[profiles.server]
validity = "10m"
renew_before = "1/3"

[plugins.exec]
enabled = true

[[plugins.exec.commands]]
on = ["issued", "renewed", "revoked", "expiring", "crl_published", "ca_changed"]
command = [{argv}]
timeout = "10s"
"""


def create_demo_pki(pki_dir: Path) -> PKIStore:
    """A CA, a server, three clients (one revoked) and a CRL; nothing is done twice."""
    store = PKIStore(pki_dir)
    ca = CertificateAuthority(store)
    if not store.exists():
        ca.init("certwarden demo CA", validity=timedelta(days=30))
        ca.issue(list(DEMO_CERTIFICATES))
        ca.revoke("bob-laptop", Reason.CESSATION_OF_OPERATION)
        ca.generate_crl(timedelta(minutes=4))
    return store


def run_demo(directory: Path, *, daemon: bool = True) -> int:
    directory = directory.absolute()
    store = create_demo_pki(directory / "pki")
    config_file = directory / "certwarden.toml"
    if not config_file.exists():
        write_atomic(config_file, demo_config(directory).encode(), 0o600)
    click.echo(f"demo PKI: {store.root}")
    echo_records(store.inventory().records)
    click.echo(f"\nconfiguration: {config_file}")
    if not daemon:
        return 0
    click.echo("starting the daemon; renewals every few minutes, Ctrl-C stops it\n")
    from certwarden.daemon import Daemon

    return Daemon(config_file).run()
