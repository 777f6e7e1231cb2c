"""The reconcile loop in-process: which PKI changes become which events.

A real PKI (written by certwarden's own CA code, driven by a settable clock), a real state
store, and a real dispatcher delivering to a plugin that records what it receives.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from easyrsa import EasyRSA

from certwarden.config import Config, parse_config
from certwarden.daemon import plugin_contexts
from certwarden.dispatch import Dispatcher, RetryPolicy
from certwarden.engine import Engine
from certwarden.errors import LockHeld, MalformedFile
from certwarden.events import (
    CAChanged,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
    CRLPublished,
    Event,
)
from certwarden.hookspecs import hookimpl
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.export import BundleFormat
from certwarden.pki.store import PKIStore, index_line
from certwarden.plugin_manager import PluginSet
from certwarden.state import StateStore


@dataclass
class Recorder:
    """A plugin that keeps every event it is given."""

    events: list[Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _keep(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    @hookimpl
    def certwarden_issued(self, event: CertificateIssued) -> None:
        self._keep(event)

    @hookimpl
    def certwarden_renewed(self, event: CertificateRenewed) -> None:
        self._keep(event)

    @hookimpl
    def certwarden_revoked(self, event: CertificateRevoked) -> None:
        self._keep(event)

    @hookimpl
    def certwarden_expiring(self, event: CertificateExpiring) -> None:
        self._keep(event)

    @hookimpl
    def certwarden_crl_published(self, event: CRLPublished) -> None:
        self._keep(event)

    @hookimpl
    def certwarden_ca_changed(self, event: CAChanged) -> None:
        self._keep(event)


@dataclass
class Harness:
    pki: PKI
    engine: Engine
    dispatcher: Dispatcher
    recorder: Recorder

    def reconcile(self) -> list[Event]:
        """Reconcile once; the events delivered because of it, in order."""
        return self._delivered(self.engine.reconcile)

    def renew_due(self) -> list[Event]:
        return self._delivered(self.engine.renew_due)

    def _delivered(self, work: Any) -> list[Event]:
        with self.recorder.lock:
            self.recorder.events.clear()
        work()
        assert self.dispatcher.wait_idle(10)
        with self.recorder.lock:
            return list(self.recorder.events)


def make_config(
    pki: PKI, state_dir: Path, profiles: dict[str, Any] | None, plugins: PluginSet
) -> Config:
    data: dict[str, Any] = {
        "pki": {"dir": str(pki.root)},
        "state": {"dir": str(state_dir)},
        "plugins": {"recorder": {"enabled": True}},
    }
    if profiles is not None:
        data["profiles"] = profiles
    return parse_config(data, "test", plugins.schemas())


MakeHarness = Callable[..., Harness]


@pytest.fixture
def make_harness(pki: PKI, tmp_path: Path) -> Iterator[MakeHarness]:
    dispatchers: list[Dispatcher] = []

    def make(profiles: dict[str, Any] | None = None) -> Harness:
        plugins = PluginSet()
        recorder = Recorder()
        plugins.register("recorder", recorder, "test")
        config = make_config(pki, tmp_path / "state", profiles, plugins)
        state = StateStore(config.state.dir / "state.sqlite3")
        dispatcher = Dispatcher(
            plugins,
            state,
            hook_timeout=5.0,
            retry=RetryPolicy(timedelta(seconds=1), timedelta(seconds=4)),
        )
        dispatcher.configure(plugin_contexts(config, plugins))
        dispatchers.append(dispatcher)
        return Harness(
            pki, Engine(config, pki.store, state, dispatcher, pki.clock), dispatcher, recorder
        )

    yield make
    for dispatcher in dispatchers:
        dispatcher.stop(5)


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    return make_harness()


def kinds(events: list[Event]) -> list[str]:
    return [event.kind.value for event in events]


def issue(pki: PKI, name: str, **options: Any) -> str:
    (item,) = pki.ca.issue([IssueRequest(name, **options)])
    return item.record.serial


# ---- the first start ---------------------------------------------------------------------------


def test_first_start_announces_the_ca_and_crl_but_not_existing_certificates(
    pki: PKI, harness: Harness
) -> None:
    issue(pki, "alice")
    issue(pki, "bob")

    events = harness.reconcile()

    assert kinds(events) == ["ca_changed", "crl_published"]
    ca_event, crl_event = events
    assert isinstance(ca_event, CAChanged) and isinstance(crl_event, CRLPublished)
    assert ca_event.ca.sha256 == hashlib.sha256((pki.root / "ca.crt").read_bytes()).hexdigest()
    assert crl_event.crl.sha256 == hashlib.sha256((pki.root / "crl.pem").read_bytes()).hexdigest()


def test_an_unchanged_pki_yields_no_events(pki: PKI, harness: Harness) -> None:
    issue(pki, "alice")
    harness.reconcile()

    assert harness.reconcile() == []
    assert harness.reconcile() == []


def test_a_restart_does_not_announce_again_what_was_announced(
    pki: PKI, make_harness: MakeHarness
) -> None:
    first = make_harness()
    first.reconcile()
    issue(pki, "alice")
    assert kinds(first.reconcile()) == ["issued"]

    second = make_harness()

    assert second.reconcile() == []


# ---- certificates ------------------------------------------------------------------------------


def test_a_new_name_is_issued_a_new_serial_of_a_known_name_is_renewed(
    pki: PKI, harness: Harness
) -> None:
    old_serial = issue(pki, "alice")
    harness.reconcile()

    bob_serial = issue(pki, "bob")
    (issued,) = harness.reconcile()
    (renewal,) = pki.ca.renew(["alice"])
    (renewed,) = harness.reconcile()

    assert isinstance(issued, CertificateIssued)
    assert (issued.cert.name, issued.cert.serial) == ("bob", bob_serial)
    assert isinstance(renewed, CertificateRenewed)
    assert renewed.old.serial == old_serial
    assert renewed.new.serial == renewal.record.serial
    # The accessors lead to the files of each serial, old and new.
    assert renewed.old.certificate().serial_number == int(old_serial, 16)
    assert renewed.new.certificate().serial_number == int(renewal.record.serial, 16)
    assert renewed.new.identity().key is not None


def test_a_revocation_is_announced_and_followed_by_a_crl_that_lists_it(
    pki: PKI, harness: Harness
) -> None:
    serial = issue(pki, "bob")
    harness.reconcile()

    pki.ca.revoke("bob")
    events = harness.reconcile()

    assert kinds(events) == ["revoked", "crl_published"]
    revoked, published = events
    assert isinstance(revoked, CertificateRevoked) and isinstance(published, CRLPublished)
    assert revoked.cert.serial == serial
    crl = x509.load_pem_x509_crl(published.crl.pem())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    assert harness.reconcile() == []


def test_a_name_issued_again_after_its_revocation_is_issued_not_renewed(
    pki: PKI, harness: Harness
) -> None:
    issue(pki, "bob")
    harness.reconcile()
    pki.ca.revoke("bob")
    harness.reconcile()

    serial = issue(pki, "bob")

    (event,) = harness.reconcile()
    assert isinstance(event, CertificateIssued)
    assert event.cert.serial == serial


def test_a_replaced_ca_is_announced_with_a_crl_signed_by_it(
    pki: PKI, harness: Harness, tmp_path: Path
) -> None:
    harness.reconcile()
    other = PKIStore(tmp_path / "other")
    CertificateAuthority(other).init("Replacement CA")

    # What an operator restoring or replacing the CA by hand does.
    (pki.root / "private" / "ca.key").write_bytes(other.ca_key_path.read_bytes())
    (pki.root / "ca.crt").write_bytes(other.ca_cert_path.read_bytes())
    events = harness.reconcile()

    assert kinds(events) == ["ca_changed", "crl_published"]
    ca_event, crl_event = events
    assert isinstance(ca_event, CAChanged) and isinstance(crl_event, CRLPublished)
    assert ca_event.ca.subject == "/CN=Replacement CA"
    assert ca_event.ca.sha256 == hashlib.sha256(other.ca_cert_path.read_bytes()).hexdigest()
    crl = x509.load_pem_x509_crl(crl_event.crl.pem())
    assert crl.is_signature_valid(other.ca_certificate().public_key())  # type: ignore[arg-type]


# ---- renewals and what cannot be renewed -------------------------------------------------------


def make_csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_a_due_certificate_signed_from_a_request_is_announced_expiring_once(
    pki: PKI, harness: Harness, tmp_path: Path
) -> None:
    harness.reconcile()
    request = tmp_path / "phone.req"
    request.write_bytes(make_csr("phone"))
    serial = issue(pki, "phone", csr=request, validity=timedelta(days=30))
    assert kinds(harness.reconcile()) == ["issued"]

    # Renewal is due once a third of the lifetime is left: the key is not here to do it.
    pki.clock.advance(timedelta(days=25))
    events = harness.renew_due() + harness.renew_due() + harness.reconcile()

    expiring = [e for e in events if isinstance(e, CertificateExpiring)]
    assert len(expiring) == 1
    assert expiring[0].cert.serial == serial
    assert "private/phone.key is not on this host" in expiring[0].reason
    assert not any(isinstance(e, CertificateRenewed) for e in events)


def test_a_due_certificate_no_profile_covers_is_announced_expiring_once(
    pki: PKI, make_harness: MakeHarness
) -> None:
    harness = make_harness({"client": {"names": ["staff-*"]}})
    harness.reconcile()
    serial = issue(pki, "printer", validity=timedelta(days=30))
    harness.reconcile()

    pki.clock.advance(timedelta(days=25))
    events = harness.renew_due() + harness.renew_due()

    expiring = [e for e in events if isinstance(e, CertificateExpiring)]
    assert [e.cert.serial for e in expiring] == [serial]
    assert expiring[0].reason == "no [profiles.*] table applies to printer (client)"
    assert not any(isinstance(e, CertificateRenewed) for e in events)


def test_a_due_certificate_is_renewed_by_the_engine_and_announced_as_renewed(
    pki: PKI, make_harness: MakeHarness
) -> None:
    harness = make_harness({"client": {"validity": "30d", "jitter": 0.0}})
    old_serial = issue(pki, "alice", validity=timedelta(days=30))
    harness.reconcile()
    assert harness.renew_due() == []

    pki.clock.advance(timedelta(days=25))
    events = harness.renew_due()

    renewed = [e for e in events if isinstance(e, CertificateRenewed)]
    assert [(e.old.serial, e.new.name) for e in renewed] == [(old_serial, "alice")]
    assert harness.renew_due() == []


def test_a_renewed_certificate_lasts_the_profile_validity_from_its_renewal(
    pki: PKI, make_harness: MakeHarness
) -> None:
    harness = make_harness({"client": {"validity": "2m", "renew_before": "1/2"}})
    issue(pki, "alice", validity=timedelta(minutes=2))
    harness.reconcile()

    pki.clock.advance(timedelta(seconds=90))
    (renewed,) = [e for e in harness.renew_due() if isinstance(e, CertificateRenewed)]

    # As `issue` does: validity counts from now, the backdate comes on top.
    assert renewed.new.not_after - pki.clock() == timedelta(minutes=2)


def test_a_crl_from_easyrsa_gen_crl_is_announced_as_the_operator_wrote_it(
    pki: PKI, harness: Harness
) -> None:
    harness.reconcile()
    stale_der = (pki.root / "crl.der").read_bytes()

    EasyRSA(pki.root).run("gen-crl")
    (event,) = harness.reconcile()

    assert isinstance(event, CRLPublished)
    written = (pki.root / "crl.pem").read_bytes()
    assert event.crl.sha256 == hashlib.sha256(written).hexdigest()
    assert event.crl.pem() == written
    # easy-rsa 3.1 writes no crl.der: the one on disk is still certwarden's older CRL.
    assert (pki.root / "crl.der").read_bytes() == stale_der
    assert event.crl.der() == x509.load_pem_x509_crl(written).public_bytes(
        serialization.Encoding.DER
    )


def test_a_certificate_copied_into_issued_is_adopted_and_announced(
    pki: PKI, harness: Harness, tmp_path: Path
) -> None:
    harness.reconcile()
    # A certificate of this CA that index.txt does not know: signed here, then its records
    # lost, as after restoring issued/ from a backup.
    serial = issue(pki, "carol")
    copy = (pki.root / "issued" / "carol.crt").read_bytes()
    index = pki.root / "index.txt"
    index.write_text(
        "".join(line + "\n" for line in index.read_text().splitlines() if serial not in line)
    )
    (pki.root / "certs_by_serial" / f"{serial}.pem").unlink()
    (pki.root / "issued" / "carol.crt").write_bytes(copy)
    # And one signed by another CA, which must stay out.
    other = CertificateAuthority(PKIStore(tmp_path / "other"))
    other.init("another CA")
    (stranger,) = other.issue([IssueRequest("mallory")])
    (pki.root / "issued" / "mallory.crt").write_bytes(stranger.cert_path.read_bytes())

    (event,) = harness.reconcile()

    assert isinstance(event, CertificateIssued)
    assert (event.cert.name, event.cert.serial) == ("carol", serial)
    assert serial in index.read_text() and "mallory" not in index.read_text()
    assert (pki.root / "certs_by_serial" / f"{serial}.pem").read_bytes() == copy
    assert harness.reconcile() == []


def test_a_hostile_name_in_index_txt_is_announced_expiring_never_renewed_nor_fatal(
    pki: PKI, harness: Harness
) -> None:
    bob = issue(pki, "bob")
    harness.reconcile()
    # A line written by hand whose CN is no file name: `private/...key` must never be built.
    not_after = pki.clock.now + timedelta(days=10)
    with (pki.root / "index.txt").open("a") as index:
        index.write(index_line("V", "7E57", not_after, "/CN=..") + "\n")
    pki.ca.revoke("bob")

    events = harness.reconcile() + harness.renew_due() + harness.renew_due()

    assert kinds(events) == ["revoked", "issued", "expiring", "crl_published"]
    expiring, published = events[2:]
    assert isinstance(published, CRLPublished) and isinstance(expiring, CertificateExpiring)
    crl = x509.load_pem_x509_crl(published.crl.pem())
    assert crl.get_revoked_certificate_by_serial_number(int(bob, 16)) is not None
    assert (expiring.cert.name, expiring.cert.serial) == ("..", "7E57")
    assert "is not a safe file name" in expiring.reason
    assert not (pki.root / "private" / "...key").exists()


def test_an_events_bundle_with_a_malformed_block_in_ca_crt_is_a_one_line_pki_error(
    pki: PKI, harness: Harness
) -> None:
    harness.reconcile()
    issue(pki, "alice")
    (event,) = harness.reconcile()
    assert isinstance(event, CertificateIssued)
    with (pki.root / "ca.crt").open("a") as chain:
        chain.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")

    with pytest.raises(MalformedFile) as raised:
        event.cert.bundle(BundleFormat.PEM)

    assert str(raised.value) == (
        f"{pki.root / 'ca.crt'}: PEM block 2 (-----BEGIN CERTIFICATE-----) is not a readable "
        "certificate; the file must hold the CA certificate and its chain only: fix or remove "
        "that block"
    )


def test_a_certificate_in_issued_that_cannot_be_adopted_is_looked_at_once_per_file(
    pki: PKI, harness: Harness, tmp_path: Path
) -> None:
    harness.reconcile()
    other = CertificateAuthority(PKIStore(tmp_path / "other"))
    other.init("another CA")
    (stranger,) = other.issue([IssueRequest("mallory")])
    copy = pki.root / "issued" / "mallory.crt"
    copy.write_bytes(stranger.cert_path.read_bytes())
    assert harness.reconcile() == []  # looked at, and left out of index.txt

    # Looking again would take the PKI lock at every reconcile, and its lock.file wakes the
    # daemon's watcher: a reconcile loop. Held by another process, it shows who takes it.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (pki.root / "lock.file").write_text(f"{holder.pid}\n")
        assert harness.reconcile() == []
        rewritten = copy.with_name("mallory.new")
        rewritten.write_bytes(copy.read_bytes())
        rewritten.replace(copy)  # another file in its place: looked at again
        with pytest.raises(LockHeld):
            harness.reconcile()
    finally:
        holder.kill()
        holder.wait()
    (pki.root / "lock.file").unlink()
    assert harness.reconcile() == []
    assert "mallory" not in (pki.root / "index.txt").read_text()


def test_an_easyrsa_certificate_named_after_its_request_is_no_copied_in_file(
    pki: PKI, harness: Harness
) -> None:
    """`easyrsa --req-cn=carol.example.com gen-req carol`: issued/carol.crt is carol's own."""
    harness.reconcile()
    easyrsa = EasyRSA(pki.root)
    easyrsa.run("--req-cn=carol.example.com", "gen-req", "carol", "nopass")
    easyrsa.run("sign-req", "client", "carol")

    events = harness.reconcile()

    issued = [event for event in events if isinstance(event, CertificateIssued)]
    assert [(event.cert.name, event.cert.subject) for event in issued] == [
        ("carol", "/CN=carol.example.com")
    ]
    inventory = pki.store.inventory(pki.clock())
    assert harness.engine._copied_in(inventory) == {}


@pytest.mark.parametrize("cn", ["carol.example.com", "Carol Phone"])
def test_an_easyrsa_certificate_named_after_its_request_is_renewed_keeping_its_subject(
    pki: PKI, make_harness: MakeHarness, cn: str
) -> None:
    harness = make_harness({"client": {"jitter": 0.0}})
    easyrsa = EasyRSA(pki.root)
    easyrsa.run(f"--req-cn={cn}", "gen-req", "carol", "nopass")
    easyrsa.run("sign-req", "client", "carol")
    (old,) = pki.store.inventory(pki.clock()).of_name("carol")
    harness.reconcile()

    pki.clock.advance(timedelta(days=700))  # of easy-rsa's 825
    events = harness.renew_due()

    (renewed,) = [event for event in events if isinstance(event, CertificateRenewed)]
    assert (renewed.old.serial, renewed.old.name) == (old.serial, "carol")
    assert (renewed.new.name, renewed.new.subject) == ("carol", f"/CN={cn}")
    current = pki.store.inventory(pki.clock()).current("carol")
    assert current is not None and current.serial == renewed.new.serial
    assert (pki.root / "renewed" / "issued" / "carol.crt").is_file()
