"""Issue, renew, revoke and CRL through CertificateAuthority and PKIStore, on real files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PKI, Clock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from easyrsa import EasyRSA, audit_pki, certwarden_environment

import certwarden.atomicfile
import certwarden.pki.lock
import certwarden.pki.store
from certwarden.atomicfile import TEMP_PREFIX, Move, WriteError, apply_moves
from certwarden.errors import (
    AlreadyExists,
    InsecurePermissions,
    InvalidName,
    LockHeld,
    MalformedFile,
    NotFound,
    StorageError,
)
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.index import format_date, format_serial, parse_index
from certwarden.pki.model import Profile, Reason, Status
from certwarden.pki.store import PKIStore, index_line, upserted_index
from certwarden.testing import unavailable

# ---- helpers ---------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under ``root`` with its bytes (folders and links marked)."""
    result: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            where = str(path.relative_to(root))
            if path.is_symlink():
                result[where] = b"-> " + os.fsencode(os.readlink(path))
            elif path.is_dir():
                result[where] = b"<folder>"
            else:
                result[where] = path.read_bytes()
    return result


def temporary_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(TEMP_PREFIX)]


def public_der(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key_matches(key_path: Path, cert: x509.Certificate) -> bool:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return public_der(key.public_key()) == public_der(cert.public_key())


def serial_of(path: Path) -> str:
    return format_serial(load_cert(path).serial_number)


def index_lines(pki: PKI) -> list[str]:
    return pki.store.index_path.read_text().splitlines()


def issue(pki: PKI, *names: str) -> list[str]:
    """Issue client certificates; return their serials."""
    return [item.record.serial for item in pki.ca.issue([IssueRequest(name) for name in names])]


def make_csr(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def gen_req(pki: PKI, name: str) -> None:
    """Leave private/NAME.key and reqs/NAME.req as `easyrsa gen-req NAME nopass` does."""
    key, csr = make_csr(name)
    key_path = pki.root / "private" / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    (pki.root / "reqs" / f"{name}.req").write_bytes(csr)


def assert_consistent_current(pki: PKI, name: str) -> str:
    """issued/NAME.crt, its copy by serial, its key and its index line agree; return serial."""
    cert_path = pki.root / "issued" / f"{name}.crt"
    serial = serial_of(cert_path)
    assert (pki.root / "certs_by_serial" / f"{serial}.pem").read_bytes() == cert_path.read_bytes()
    assert key_matches(pki.root / "private" / f"{name}.key", load_cert(cert_path))
    entries = {
        entry.serial: entry for entry in parse_index(pki.store.index_path.read_text()).entries
    }
    assert entries[serial].status == "V"
    assert entries[serial].subject == f"/CN={name}"
    return serial


# ---- issue -----------------------------------------------------------------------------------


def test_issue_writes_the_easyrsa_layout(pki: PKI) -> None:
    [serial] = issue(pki, "alice")
    cert_path = pki.root / "issued" / "alice.crt"
    key_path = pki.root / "private" / "alice.key"
    assert assert_consistent_current(pki, "alice") == serial
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = load_cert(cert_path)
    cert.verify_directly_issued_by(load_cert(pki.root / "ca.crt"))
    assert cert.not_valid_before_utc == pki.clock.now - timedelta(minutes=1)
    assert cert.not_valid_after_utc == pki.clock.now + timedelta(days=825)
    expected = index_line("V", serial, cert.not_valid_after_utc, "/CN=alice")
    assert index_lines(pki) == [expected]
    assert (pki.root / "serial").read_text() == format_serial(int(serial, 16) + 1) + "\n"
    [record] = pki.store.inventory(pki.clock()).records
    assert (record.name, record.status, record.profile, record.current) == (
        "alice",
        Status.VALID,
        Profile.CLIENT,
        True,
    )


def test_issuing_fifty_names_in_one_call_gives_fifty_distinct_serials(pki: PKI) -> None:
    names = [f"device-{number:02d}" for number in range(50)]
    serials = issue(pki, *names)
    assert len(set(serials)) == 50
    listed = {entry.serial for entry in parse_index(pki.store.index_path.read_text()).entries}
    assert listed == set(serials)
    for name, serial in zip(names, serials, strict=True):
        assert (pki.root / "certs_by_serial" / f"{serial}.pem").is_file()
        assert serial_of(pki.root / "issued" / f"{name}.crt") == serial
        assert len(serial) % 2 == 0
        assert serial == serial.upper()


def test_issuing_an_existing_name_raises_already_exists_and_changes_nothing(pki: PKI) -> None:
    issue(pki, "alice")
    before = snapshot(pki.root)
    with pytest.raises(AlreadyExists, match=r"issued/alice\.crt"):
        issue(pki, "alice")
    with pytest.raises(AlreadyExists):
        issue(pki, "bob", "alice", "carol")
    assert snapshot(pki.root) == before


def test_issuing_over_a_leftover_key_raises_already_exists(pki: PKI) -> None:
    (pki.root / "private" / "dave.key").write_bytes(b"left by easyrsa gen-req\n")
    before = snapshot(pki.root)
    with pytest.raises(AlreadyExists, match=r"private/dave\.key"):
        issue(pki, "dave")
    assert snapshot(pki.root) == before


def test_a_batch_with_one_bad_name_issues_nothing(pki: PKI) -> None:
    before = snapshot(pki.root)
    with pytest.raises(InvalidName, match="bad/name"):
        issue(pki, "good-1", "bad/name", "good-2")
    assert snapshot(pki.root) == before


def test_signing_a_csr_from_a_file_keeps_the_requesters_key(pki: PKI, tmp_path: Path) -> None:
    key, csr = make_csr("someone-else")
    csr_path = tmp_path / "bob.req"
    csr_path.write_bytes(csr)
    [issued] = pki.ca.issue([IssueRequest("bob", csr=csr_path)])
    assert issued.key_path is None
    cert = load_cert(pki.root / "issued" / "bob.crt")
    assert public_der(cert.public_key()) == public_der(key.public_key())
    assert cert.subject.rfc4514_string() == "CN=bob"
    assert (pki.root / "reqs" / "bob.req").read_bytes() == csr
    assert not (pki.root / "private" / "bob.key").exists()


def test_signing_the_request_in_reqs_like_easyrsa_sign_req(pki: PKI) -> None:
    gen_req(pki, "carol")
    key_before = (pki.root / "private" / "carol.key").read_bytes()
    req_before = (pki.root / "reqs" / "carol.req").read_bytes()
    pki.ca.issue([IssueRequest("carol")])
    assert assert_consistent_current(pki, "carol")
    assert (pki.root / "private" / "carol.key").read_bytes() == key_before
    assert (pki.root / "reqs" / "carol.req").read_bytes() == req_before


def test_a_csr_with_a_bad_signature_is_rejected(pki: PKI, tmp_path: Path) -> None:
    _, pem = make_csr("dave")
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"dave", b"evil", 1)  # the signed part changes, the signature not
    assert tampered != der
    csr_path = tmp_path / "dave.req"
    csr_path.write_bytes(tampered)
    before = snapshot(pki.root)
    with pytest.raises(MalformedFile, match="signature"):
        pki.ca.issue([IssueRequest("dave", csr=csr_path)])
    assert snapshot(pki.root) == before


# ---- renew and revoke ------------------------------------------------------------------------


def test_renew_moves_old_files_to_renewed_and_keeps_the_old_cert_valid(pki: PKI) -> None:
    gen_req(pki, "alice")
    [old_serial] = issue(pki, "alice")
    old_cert = (pki.root / "issued" / "alice.crt").read_bytes()
    old_key = (pki.root / "private" / "alice.key").read_bytes()
    old_req = (pki.root / "reqs" / "alice.req").read_bytes()
    pki.clock.advance(timedelta(days=30))

    [renewed] = pki.ca.renew(["alice"])

    new_serial = assert_consistent_current(pki, "alice")
    assert renewed.record.serial == new_serial != old_serial
    assert (pki.root / "renewed" / "issued" / "alice.crt").read_bytes() == old_cert
    assert (pki.root / "renewed" / "private" / "alice.key").read_bytes() == old_key
    assert (pki.root / "renewed" / "reqs" / "alice.req").read_bytes() == old_req
    assert not (pki.root / "reqs" / "alice.req").exists()
    assert (pki.root / "private" / "alice.key").read_bytes() != old_key
    assert (pki.root / "certs_by_serial" / f"{old_serial}.pem").read_bytes() == old_cert
    records = pki.store.inventory(pki.clock()).records
    assert [(r.serial, r.status, r.current) for r in records] == [
        (old_serial, Status.VALID, False),
        (new_serial, Status.VALID, True),
    ]


def test_renew_keep_key_keeps_the_key_bytes_identical(pki: PKI) -> None:
    issue(pki, "alice")
    key_path = pki.root / "private" / "alice.key"
    key_before = key_path.read_bytes()
    pki.ca.renew(["alice"], keep_key=True)
    assert key_path.read_bytes() == key_before
    assert assert_consistent_current(pki, "alice")
    assert not (pki.root / "renewed" / "private" / "alice.key").exists()


def test_renew_without_a_current_certificate_raises_not_found(pki: PKI) -> None:
    with pytest.raises(NotFound, match="ghost"):
        pki.ca.renew(["ghost"])


def test_revoke_moves_files_like_easyrsa(pki: PKI) -> None:
    gen_req(pki, "alice")
    [serial] = issue(pki, "alice")
    cert = (pki.root / "issued" / "alice.crt").read_bytes()
    key = (pki.root / "private" / "alice.key").read_bytes()
    req = (pki.root / "reqs" / "alice.req").read_bytes()
    pki.clock.advance(timedelta(hours=1))

    [record] = pki.ca.revoke("alice", Reason.KEY_COMPROMISE)

    revoked = pki.root / "revoked"
    assert (revoked / "certs_by_serial" / f"{serial}.crt").read_bytes() == cert
    assert (revoked / "private_by_serial" / f"{serial}.key").read_bytes() == key
    assert (revoked / "reqs_by_serial" / f"{serial}.req").read_bytes() == req
    for gone in ("issued/alice.crt", "private/alice.key", "reqs/alice.req"):
        assert not (pki.root / gone).exists(), gone
    assert not (pki.root / "certs_by_serial" / f"{serial}.pem").exists()
    [entry] = parse_index(pki.store.index_path.read_text()).entries
    assert (entry.status, entry.serial, entry.reason) == ("R", serial, Reason.KEY_COMPROMISE)
    assert entry.revoked_at == pki.clock.now
    assert record.status is Status.REVOKED
    assert f"\t{format_date(pki.clock.now)},keyCompromise\t" in index_lines(pki)[0]


def test_revoke_after_renew_revokes_both_old_and_new(pki: PKI) -> None:
    [old] = issue(pki, "alice")
    [renewed] = pki.ca.renew(["alice"])
    new = renewed.record.serial

    revoked = pki.ca.revoke("alice", Reason.CESSATION_OF_OPERATION)

    assert {record.serial for record in revoked} == {old, new}
    statuses = {r.serial: r.status for r in pki.store.inventory(pki.clock()).records}
    assert statuses == {old: Status.REVOKED, new: Status.REVOKED}
    out = pki.root / "revoked"
    for serial in (old, new):
        assert serial_of(out / "certs_by_serial" / f"{serial}.crt") == serial
        assert key_matches(
            out / "private_by_serial" / f"{serial}.key",
            load_cert(out / "certs_by_serial" / f"{serial}.crt"),
        )
        assert not (pki.root / "certs_by_serial" / f"{serial}.pem").exists()
    assert not (pki.root / "renewed" / "issued" / "alice.crt").exists()
    assert not (pki.root / "issued" / "alice.crt").exists()
    # Nothing valid is left: a second revoke has nothing to do.
    with pytest.raises(NotFound):
        pki.ca.revoke("alice")


def test_revoke_one_serial_leaves_the_other_valid(pki: PKI) -> None:
    [old] = issue(pki, "alice")
    [renewed] = pki.ca.renew(["alice"])
    pki.ca.revoke("alice", Reason.SUPERSEDED, serial=old.lower())
    statuses = {r.serial: r.status for r in pki.store.inventory(pki.clock()).records}
    assert statuses == {old: Status.REVOKED, renewed.record.serial: Status.VALID}
    assert assert_consistent_current(pki, "alice") == renewed.record.serial


# ---- CRL -------------------------------------------------------------------------------------


REASON_FLAGS = {
    Reason.UNSPECIFIED: x509.ReasonFlags.unspecified,
    Reason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    Reason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    Reason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    Reason.SUPERSEDED: x509.ReasonFlags.superseded,
    Reason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    Reason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
}


def ca_cert(pki: PKI) -> x509.Certificate:
    return load_cert(pki.root / "ca.crt")


def ca_public_key(pki: PKI) -> ec.EllipticCurvePublicKey:
    public = ca_cert(pki).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def crl_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def read_crl(pki: PKI) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki.root / "crl.pem").read_bytes())


def test_crl_holds_every_revoked_serial_with_reason_and_date(pki: PKI) -> None:
    reasons: list[Reason | None] = [*Reason, None]
    names = [f"device-{number}" for number in range(len(reasons))]
    serials = dict(zip(names, issue(pki, *names), strict=True))
    issue(pki, "keeper")  # never revoked: not in the CRL
    expected: dict[int, tuple[datetime, x509.ReasonFlags | None]] = {}
    for name, reason in zip(names, reasons, strict=True):
        pki.clock.advance(timedelta(minutes=7))
        pki.ca.revoke(name, reason)
        flag = None if reason is None else REASON_FLAGS[reason]
        expected[int(serials[name], 16)] = (pki.clock.now, flag)

    published = pki.ca.generate_crl()

    crl = read_crl(pki)
    assert crl.is_signature_valid(ca_public_key(pki))
    got = {entry.serial_number: (entry.revocation_date_utc, crl_reason(entry)) for entry in crl}
    assert got == expected
    assert published.revoked == len(reasons)
    der = (pki.root / "crl.der").read_bytes()
    assert (
        x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
        == (pki.root / "crl.pem").read_bytes()
    )


def test_crl_number_strictly_increases_even_when_crl_pem_is_replaced_without_number(
    pki: PKI,
) -> None:
    def number() -> int:
        return read_crl(pki).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    numbers = [number()]  # written by init
    issuer = ca_cert(pki).subject
    ca_key = pki.store.ca_key()
    for _ in range(3):
        # What `easyrsa gen-crl` (3.1.0) writes: no crlnumber file, so no CRL Number.
        foreign = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer)
            .last_update(pki.clock.now - timedelta(hours=1))
            .next_update(pki.clock.now + timedelta(days=180))
            .sign(ca_key, hashes.SHA256())
        )
        (pki.root / "crl.pem").write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
        with pytest.raises(x509.ExtensionNotFound):
            number()
        published = pki.ca.generate_crl()  # the clock stands still: the time adds nothing
        numbers.append(number())
        assert published.number == numbers[-1]
    assert numbers == sorted(set(numbers))
    pki.clock.advance(-timedelta(days=1))  # a clock stepped back does not lower it either
    pki.ca.generate_crl()
    assert number() > numbers[-1]


def test_crl_has_aki_and_next_update_from_the_clock(pki: PKI) -> None:
    pki.clock.advance(timedelta(days=3, seconds=17))
    published = pki.ca.generate_crl(timedelta(days=30))
    crl = read_crl(pki)
    assert crl.next_update_utc == pki.clock.now + timedelta(days=30) == published.next_update
    assert crl.last_update_utc == pki.clock.now - timedelta(minutes=1) == published.last_update
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert(pki).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.issuer == ca_cert(pki).subject
    assert crl.is_signature_valid(ca_public_key(pki))


def test_crl_entries_reused_from_the_previous_crl_are_identical(pki: PKI) -> None:
    issue(pki, "a", "b", "c", "d")
    for name, reason in (("a", Reason.KEY_COMPROMISE), ("b", None), ("c", Reason.SUPERSEDED)):
        pki.clock.advance(timedelta(seconds=5))
        pki.ca.revoke(name, reason)
    pki.ca.generate_crl()
    first = {entry.serial_number: entry for entry in read_crl(pki)}
    pki.clock.advance(timedelta(hours=2))
    pki.ca.revoke("d", Reason.AFFILIATION_CHANGED)
    pki.ca.generate_crl()
    second = {entry.serial_number: entry for entry in read_crl(pki)}

    assert set(first) < set(second)
    for serial, old in first.items():
        new = second[serial]
        assert new.revocation_date_utc == old.revocation_date_utc
        assert list(new.extensions) == list(old.extensions)


def test_crl_entry_follows_a_reason_changed_in_index_txt(pki: PKI) -> None:
    issue(pki, "a")
    pki.ca.revoke("a", Reason.KEY_COMPROMISE)
    pki.ca.generate_crl()
    index = pki.store.index_path
    index.write_text(index.read_text().replace(",keyCompromise", ",certificateHold"))
    pki.ca.generate_crl()
    [entry] = list(read_crl(pki))
    assert crl_reason(entry) is x509.ReasonFlags.certificate_hold


# ---- reading a PKI that was tampered with -----------------------------------------------------


def append_index(pki: PKI, *lines: str) -> None:
    with pki.store.index_path.open("a") as handle:
        handle.writelines(line + "\n" for line in lines)


def test_expiry_comes_from_the_date_not_the_status_letter(pki: PKI) -> None:
    now = pki.clock.now
    append_index(
        pki,
        index_line("V", "0A0A", now - timedelta(days=1), "/CN=stale-v"),
        index_line("E", "0B0B", now + timedelta(days=1), "/CN=fresh-e"),
    )
    statuses = {r.name: r.status for r in pki.store.inventory(now).records}
    assert statuses == {"stale-v": Status.EXPIRED, "fresh-e": Status.VALID}


def fresh_store_without_cache(pki: PKI) -> PKIStore:
    """A store that has to read certificate files again (no meta.tsv cache)."""
    with contextlib.suppress(FileNotFoundError):
        (pki.store.meta_dir / "meta.tsv").unlink()
    return PKIStore(pki.root)


def only_in_issued(pki: PKI, name: str) -> str:
    """Issue NAME and leave issued/NAME.crt as the only copy of its certificate."""
    [serial] = issue(pki, name)
    (pki.root / "certs_by_serial" / f"{serial}.pem").unlink()
    return serial


def test_a_garbage_issued_certificate_is_a_problem_naming_the_file(pki: PKI) -> None:
    issue(pki, "fine")
    only_in_issued(pki, "x")
    (pki.root / "issued" / "x.crt").write_bytes(b"\x00garbage\xff" * 10)
    inventory = fresh_store_without_cache(pki).inventory(pki.clock())
    assert [r.name for r in inventory.records] == ["fine", "x"]
    assert any(problem.startswith("issued/x.crt: ") for problem in inventory.problems)


def test_a_symlink_to_etc_passwd_in_issued_is_a_problem_naming_the_file(pki: PKI) -> None:
    only_in_issued(pki, "x")
    link = pki.root / "issued" / "x.crt"
    link.unlink()
    link.symlink_to("/etc/passwd")
    inventory = fresh_store_without_cache(pki).inventory(pki.clock())
    [problem] = [p for p in inventory.problems if "x.crt" in p]
    assert problem.startswith("issued/x.crt: ")
    assert "outside the PKI" in problem
    assert "root:" not in problem  # never shows what the link points at


def test_a_garbage_copy_by_serial_is_a_problem_naming_the_file(pki: PKI) -> None:
    [serial] = issue(pki, "x")
    (pki.root / "certs_by_serial" / f"{serial}.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    inventory = fresh_store_without_cache(pki).inventory(pki.clock())
    assert [r.serial for r in inventory.records] == [serial]
    assert any(p.startswith(f"certs_by_serial/{serial}.pem: ") for p in inventory.problems)


def test_a_truncated_index_line_is_a_problem_and_the_rest_is_listed(pki: PKI) -> None:
    issue(pki, "a", "b")
    text = pki.store.index_path.read_text()
    first, second = text.splitlines()
    pki.store.index_path.write_text(first + "\n" + second[:20] + "\n")
    inventory = PKIStore(pki.root).inventory(pki.clock())
    assert [r.name for r in inventory.records] == ["a"]
    assert [p.split(":")[0:2] for p in inventory.problems] == [["index.txt", "2"]]


# ---- the CA key ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_ca_key_readable_by_others_raises_insecure_permissions(pki: PKI, mode: int) -> None:
    pki.store.ca_key_path.chmod(mode)
    before = snapshot(pki.root)
    with pytest.raises(InsecurePermissions, match="chmod 600") as caught:
        issue(pki, "alice")
    assert str(pki.store.ca_key_path) in str(caught.value)
    assert caught.value.exit_code == 77
    assert snapshot(pki.root) == before


PASSPHRASE = b"correct horse battery staple"


def test_an_encrypted_ca_key_works_with_its_passphrase(tmp_path: Path, clock: Clock) -> None:
    root = tmp_path / "pki"
    CertificateAuthority(PKIStore(root), clock).init(passphrase=PASSPHRASE)
    assert b"ENCRYPTED PRIVATE KEY" in (root / "private" / "ca.key").read_bytes()
    ca = CertificateAuthority(PKIStore(root, ca_passphrase=PASSPHRASE), clock)
    ca.issue([IssueRequest("alice")])
    ca.generate_crl()
    assert (root / "issued" / "alice.crt").is_file()


@pytest.mark.parametrize(
    ("given", "complaint"),
    [(None, "encrypted; give its passphrase"), (b"wrong horse", "wrong passphrase")],
)
def test_an_encrypted_ca_key_fails_clearly_without_its_passphrase(
    tmp_path: Path, clock: Clock, given: bytes | None, complaint: str
) -> None:
    root = tmp_path / "pki"
    CertificateAuthority(PKIStore(root), clock).init(passphrase=PASSPHRASE)
    before = snapshot(root)
    ca = CertificateAuthority(PKIStore(root, ca_passphrase=given), clock)
    with pytest.raises(MalformedFile) as caught:
        ca.issue([IssueRequest("alice")])
    message = str(caught.value)
    assert message.startswith("private/ca.key: ")
    assert complaint in message
    assert PASSPHRASE.decode() not in message
    assert "horse" not in message
    assert snapshot(root) == before


# ---- the lock --------------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[int]:
    """The PID of a live process that is not this one."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def test_a_lock_held_by_a_live_process_raises_lock_held_naming_the_pid(
    pki: PKI, sleeper: int
) -> None:
    lock = pki.root / "lock.file"
    lock.write_text(f"{sleeper}\n")
    before = snapshot(pki.root)
    ca = CertificateAuthority(PKIStore(pki.root, lock_timeout=0.3), pki.clock)
    with pytest.raises(LockHeld) as caught:
        ca.issue([IssueRequest("alice")])
    assert f"process {sleeper}" in str(caught.value)
    assert "lock.file" in str(caught.value)
    assert caught.value.exit_code == 75
    assert snapshot(pki.root) == before  # the other holder's lock is left alone


def test_a_lock_held_by_the_parent_process_is_respected(pki: PKI) -> None:
    (pki.root / "lock.file").write_text(f"{os.getppid()}\n")
    store = PKIStore(pki.root, lock_timeout=0.2)
    with pytest.raises(LockHeld, match=f"process {os.getppid()}"):
        CertificateAuthority(store, pki.clock).generate_crl()


def test_a_lock_of_a_dead_process_is_removed_and_the_write_proceeds(pki: PKI) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    (pki.root / "lock.file").write_text(f"{finished.pid}\n")
    ca = CertificateAuthority(PKIStore(pki.root, lock_timeout=0.3), pki.clock)
    ca.issue([IssueRequest("alice")])
    assert (pki.root / "issued" / "alice.crt").is_file()
    assert not (pki.root / "lock.file").exists()


@pytest.mark.parametrize("content", ["0", "99999999999999999999", "not a pid"])
def test_a_lock_naming_no_possible_process_is_stale(pki: PKI, content: str) -> None:
    lock = pki.root / "lock.file"
    lock.write_text(content + "\n")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    ca = CertificateAuthority(PKIStore(pki.root, lock_timeout=0.2), pki.clock)
    ca.issue([IssueRequest("alice")])
    assert not lock.exists()


def test_an_empty_lock_is_a_lock_being_taken_until_it_is_old(pki: PKI) -> None:
    lock = pki.root / "lock.file"
    lock.write_bytes(b"")
    ca = CertificateAuthority(PKIStore(pki.root, lock_timeout=0.2), pki.clock)
    with pytest.raises(LockHeld, match="taking it now"):
        ca.issue([IssueRequest("alice")])
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    ca.issue([IssueRequest("alice")])
    assert not lock.exists()


def test_the_lock_is_released_after_a_failed_write(pki: PKI) -> None:
    issue(pki, "alice")
    with pytest.raises(AlreadyExists):
        issue(pki, "alice")
    assert not (pki.root / "lock.file").exists()


def test_a_lock_of_a_process_started_after_it_was_written_is_stale(pki: PKI, sleeper: int) -> None:
    # After a reboot (or a container restart) the PID in a leftover lock may be a new,
    # unrelated process: it started after the lock was written, so it cannot be the holder.
    lock = pki.root / "lock.file"
    lock.write_text(f"{sleeper}\n")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with PKIStore(pki.root, lock_timeout=0.2).writing():
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_a_lock_of_an_exited_process_not_yet_reaped_is_stale(pki: PKI) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, exited.pid, os.WEXITED | os.WNOWAIT)  # a zombie until wait()
        (pki.root / "lock.file").write_text(f"{exited.pid}\n")
        ca = CertificateAuthority(PKIStore(pki.root, lock_timeout=0.2), pki.clock)
        ca.issue([IssueRequest("alice")])
    finally:
        exited.wait()
    assert not (pki.root / "lock.file").exists()


def test_a_stale_lock_replaced_while_it_is_judged_is_left_to_its_new_holder(
    pki: PKI, sleeper: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = pki.root / "lock.file"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    lock.write_text(f"{finished.pid}\n")
    real_could_hold = certwarden.pki.lock._could_hold
    judged: list[int] = []

    def could_hold(pid: int, written_at: float) -> bool:
        if not judged:
            # Meanwhile another process removes the stale lock and takes its own.
            lock.unlink()
            lock.write_text(f"{sleeper}\n")
        judged.append(pid)
        return real_could_hold(pid, written_at)

    monkeypatch.setattr("certwarden.pki.lock._could_hold", could_hold)
    with pytest.raises(LockHeld, match=f"process {sleeper}"):
        PKIStore(pki.root, lock_timeout=0.2).lock.acquire()
    assert judged[0] == finished.pid
    assert lock.read_text() == f"{sleeper}\n"  # the new holder's lock is still there
    assert not (pki.root / "lock.file.break").exists()


LOCK_RACER = """
import os, sys, time
from pathlib import Path
from certwarden.errors import LockHeld
from certwarden.pki.lock import PKILock

root = Path(sys.argv[1])
for _ in sys.stdin:
    lock = PKILock(root, timeout=0)
    try:
        lock.acquire()
    except LockHeld:
        print("held", flush=True)
        continue
    try:
        # Another racer inside at the same time finds this file.
        fd = os.open(root / "inside", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        print("overlap", flush=True)
    else:
        time.sleep(0.005)
        os.unlink(root / "inside")
        os.close(fd)
        print("alone", flush=True)
    finally:
        lock.release()
"""


def test_processes_racing_for_a_stale_lock_take_it_one_at_a_time(tmp_path: Path) -> None:
    """Six processes find the same stale lock at once, forty times; each may remove it, and
    none may remove the lock another has just taken in its place."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", LOCK_RACER, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    outcomes: list[str] = []
    try:
        for _ in range(40):
            (tmp_path / "lock.file").write_text(f"{dead.pid}\n")
            for racer in racers:
                assert racer.stdin is not None
                racer.stdin.write("go\n")
                racer.stdin.flush()
            trial = []
            for racer in racers:
                assert racer.stdout is not None
                trial.append(racer.stdout.readline().strip())
            assert "alone" in trial, trial  # the stale lock was taken
            outcomes += trial
            (tmp_path / "lock.file").unlink(missing_ok=True)
    finally:
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.close()
            racer.wait()
    assert "overlap" not in outcomes
    assert set(outcomes) <= {"alone", "held"}
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# ---- a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def can_mount_tmpfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("simulating a full disk needs root to mount a tmpfs")
    try:
        with tmpfs(tmp_path / "probe", 64 * 1024):
            pass
    except (OSError, subprocess.CalledProcessError) as exc:
        unavailable(f"cannot mount a tmpfs here ({exc}); the full-disk test needs one")


def fill(filesystem: Path, leave_free: int, page: int) -> Path:
    """Fill ``filesystem`` to the last page, then free ``leave_free`` pages."""
    filler = filesystem / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    pages = 0
    try:
        while True:
            os.write(fd, b"\0" * page)
            pages += 1
    except OSError:
        pass
    os.ftruncate(fd, max(0, pages - leave_free) * page)
    os.close(fd)
    return filler


def new_pki_on(filesystem: Path, clock: Clock) -> PKI:
    store = PKIStore(filesystem / "pki", lock_timeout=0.5)
    ca = CertificateAuthority(store, clock)
    ca.init()
    return PKI(store, ca, clock)


# What issuing one certificate writes before its journal, each telling its file from the one a
# StorageError names (relative to the PKI).
WRITES_BEFORE_THE_JOURNAL: dict[str, Callable[[Path], bool]] = {
    "lock": lambda path: path == Path("lock.file"),
    "key": lambda path: path == Path("private/bob.key"),
    "copy by serial": lambda path: path.parent == Path("certs_by_serial"),
    "certificate": lambda path: path == Path("issued/bob.crt"),
    "index": lambda path: path == Path("index.txt"),
    "serial": lambda path: path == Path("serial"),
    "journal": lambda path: path == Path(".certwarden/journal.json"),
}


def named_file(pki: PKI, error: StorageError) -> Path:
    """The file a StorageError's message starts with, relative to the PKI."""
    where, _, _ = str(error).partition(": ")
    return Path(where).relative_to(pki.root)


@pytest.mark.usefixtures("can_mount_tmpfs")
@pytest.mark.parametrize("point", list(WRITES_BEFORE_THE_JOURNAL))
def test_a_full_disk_before_the_journal_changes_nothing_and_says_so(
    tmp_path: Path, clock: Clock, point: str
) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    is_point = WRITES_BEFORE_THE_JOURNAL[point]
    # Each file takes a page of the tmpfs: with one page more free each round, the write
    # fails one file later, until it fails at ``point``. Every failure on the way must leave
    # the PKI as it was, too. 32 pages hold a new PKI and a little more.
    failed_at: list[Path] = []
    for free in range(len(WRITES_BEFORE_THE_JOURNAL) + 4):
        with tmpfs(tmp_path / f"fs{free}", 32 * page) as filesystem:
            pki = new_pki_on(filesystem, clock)
            before = snapshot(pki.root)
            filler = fill(filesystem, free, page)
            with pytest.raises(StorageError) as raised:
                issue(pki, "bob")
            # Byte for byte: index.txt, serial, issued/, private/, certs_by_serial/, and no
            # temporary file, journal or lock.file left.
            assert snapshot(pki.root) == before
            message = str(raised.value)
            failed_at.append(named_file(pki, raised.value))
            assert message.startswith(f"{pki.root / failed_at[-1]}: "), message
            assert "no space left on device" in message.lower(), message
            assert "; nothing was changed" in message, message
            assert "journal" not in message.partition(": ")[2], message
            assert raised.value.exit_code == 74
            if not is_point(failed_at[-1]):
                continue
            filler.unlink()
            [serial] = issue(pki, "bob")
            assert assert_consistent_current(pki, "bob") == serial
            assert (pki.root / "serial").read_text() != before["serial"].decode()
            assert not temporary_files(pki.root)
            assert not pki.store.journal_path.exists()
            return
    pytest.fail(f"never failed at the {point}; failed at {[str(path) for path in failed_at]}")


@pytest.mark.parametrize("name", ["bob.key", "bob.crt", "index.txt", "serial", "journal.json"])
def test_a_write_failing_before_its_journal_changes_nothing_without_a_tmpfs(
    pki: PKI, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # The same as the tests above where no tmpfs can be mounted: the disk fills at ``name``.
    real_write_temp = certwarden.atomicfile._write_temp

    def write_temp(directory: Path, final_name: str, data: bytes, mode: int, sync: bool) -> Path:
        if final_name == name:
            raise WriteError(directory / final_name, OSError(errno.ENOSPC, "No space left"))
        return real_write_temp(directory, final_name, data, mode, sync)

    issue(pki, "alice")
    before = snapshot(pki.root)
    monkeypatch.setattr("certwarden.atomicfile._write_temp", write_temp)
    with pytest.raises(StorageError) as raised:
        issue(pki, "bob")
    assert snapshot(pki.root) == before
    where = str(raised.value).partition(": ")[0]
    assert Path(where).name == name
    assert str(raised.value) == (
        f"{where}: no space left on device; nothing was changed; free some space and retry"
    )
    monkeypatch.undo()
    issue(pki, "bob")
    assert_consistent_current(pki, "bob")


@pytest.mark.usefixtures("can_mount_tmpfs")
def test_after_its_journal_a_write_needs_no_space(tmp_path: Path, clock: Clock) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    failed_at: list[Path] = []
    for free in range(len(WRITES_BEFORE_THE_JOURNAL) + 4):
        with tmpfs(tmp_path / f"fs{free}", 32 * page) as filesystem:
            pki = new_pki_on(filesystem, clock)
            fill(filesystem, free, page)
            try:
                [serial] = issue(pki, "bob")
            except StorageError as exc:
                failed_at.append(named_file(pki, exc))
                continue
            assert assert_consistent_current(pki, "bob") == serial
            assert not temporary_files(pki.root)
            assert not pki.store.journal_path.exists()
            break
    else:
        pytest.fail(f"never issued; failed at {[str(path) for path in failed_at]}")
    # With one page less than the write needs, the last file it could not write is the
    # journal: index.txt and serial were written before it, and only renamed after it.
    assert failed_at[-1] == Path(".certwarden/journal.json"), failed_at


@pytest.mark.usefixtures("can_mount_tmpfs")
def test_a_full_disk_while_index_txt_changed_under_the_write_is_journaled_and_said_so(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    with tmpfs(tmp_path / "fs", 32 * page) as filesystem:
        pki = new_pki_on(filesystem, clock)
        index_before = pki.store.index_path.read_bytes()
        real_upserted_index = certwarden.pki.store.upserted_index
        made: list[bytes] = []
        filler: list[Path] = []

        def upserted_index(current: bytes, lines: list[str]) -> bytes:
            made.append(current)
            if len(made) == 1:
                # Edited in place meanwhile (a new mtime, no space needed): the index.txt
                # written before the journal is not used, and the lines are applied again.
                os.utime(pki.store.index_path, ns=(1, 1))
            else:
                filler.append(fill(filesystem, 0, page))  # and now the disk is full
            return real_upserted_index(current, lines)

        monkeypatch.setattr("certwarden.pki.store.upserted_index", upserted_index)
        with pytest.raises(StorageError) as raised:
            issue(pki, "bob")
        assert len(made) == 2
        assert str(raised.value) == (
            f"{pki.store.index_path}: no space left on device; the write is journaled and "
            "completes at the next certwarden write; free some space for it"
        )
        assert "nothing was changed" not in str(raised.value)
        assert pki.store.journal_path.exists()
        assert (pki.root / "issued" / "bob.crt").is_file()  # the renames were done
        assert pki.store.index_path.read_bytes() == index_before
        assert not temporary_files(pki.root)
        monkeypatch.undo()
        filler[0].unlink()
        with pki.store.writing():
            pass  # completes the journaled write
        assert not pki.store.journal_path.exists()
        assert not temporary_files(pki.root)
        assert_consistent_current(pki, "bob")


KILL_AFTER_THE_JOURNAL = """\
import os, sys
from pathlib import Path
import certwarden.pki.store
from certwarden.pki.ca import CertificateAuthority, IssueRequest
def die(moves, *, replay=False):
    os._exit(9)  # as kill -9 right after the journal: nothing cleaned up
certwarden.pki.store.apply_moves = die
CertificateAuthority(certwarden.pki.store.PKIStore(Path(sys.argv[1]))).issue([IssueRequest("bob")])
"""


def kill_after_the_journal(pki: PKI) -> None:
    """Issue bob in a process that dies right after writing the journal."""
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_THE_JOURNAL, str(pki.root)],
        env=certwarden_environment(),
        capture_output=True,
        check=False,
    )
    assert killed.returncode == 9, killed.stderr.decode()
    assert pki.store.journal_path.exists()


@pytest.mark.usefixtures("can_mount_tmpfs")
@pytest.mark.parametrize("prepared_left", [True, False], ids=["prepared files left", "none"])
def test_a_replay_on_a_full_disk_frees_what_the_killed_write_prepared_or_stays_journaled(
    tmp_path: Path, clock: Clock, prepared_left: bool
) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    with tmpfs(tmp_path / "fs", 32 * page) as filesystem:
        pki = new_pki_on(filesystem, clock)
        issue(pki, "alice")
        index_before = pki.store.index_path.read_bytes()
        kill_after_the_journal(pki)
        journaled = {
            Path(move["source"]).name
            for move in json.loads(pki.store.journal_path.read_text())["moves"]
        }
        # Left behind: the three staged files (in the journal), and index.txt and serial as
        # they would have been (not in it).
        prepared = [path for path in temporary_files(pki.root) if path.name not in journaled]
        assert (len(journaled), len(prepared)) == (3, 2)
        if not prepared_left:
            for path in prepared:
                path.unlink()  # nothing for the replay to free
        # Not a page free: the new lock.file takes the page of the killed process's one, and
        # the replay writes index.txt and serial again in the space of the two files it
        # removes first, if they are there.
        filler = fill(filesystem, 0, page)
        if not prepared_left:
            with pytest.raises(StorageError) as raised, pki.store.writing():
                pytest.fail("a write went on with an interrupted one not completed")
            assert str(raised.value) == (
                f"{pki.store.index_path}: no space left on device; an interrupted write is "
                "still journaled and completes at the next certwarden write; free some space "
                "for it"
            )
            assert pki.store.journal_path.exists()
            assert pki.store.index_path.read_bytes() == index_before
            assert not (pki.root / "lock.file").exists()
            filler.unlink()
        with pki.store.writing():
            pass
        assert not pki.store.journal_path.exists()
        assert not temporary_files(pki.root)
        assert_consistent_current(pki, "alice")
        assert_consistent_current(pki, "bob")


# ---- the journal -----------------------------------------------------------------------------


def crash_after(monkeypatch: pytest.MonkeyPatch, done: int) -> None:
    """Make the next commit stop after ``done`` renames, as a crash or I/O error would."""
    crashed = False

    def apply(moves: list[Move], *, replay: bool = False) -> None:
        nonlocal crashed
        if replay or crashed:
            apply_moves(moves, replay=replay)
            return
        crashed = True
        apply_moves(moves[:done])
        raise StorageError("simulated failure in the middle of a write")

    monkeypatch.setattr("certwarden.pki.store.apply_moves", apply)


def do_issue(pki: PKI) -> Callable[[], object]:
    return lambda: issue(pki, "alice")


def check_issued(pki: PKI) -> None:
    assert_consistent_current(pki, "alice")


def do_renew(pki: PKI) -> Callable[[], object]:
    issue(pki, "alice")
    return lambda: pki.ca.renew(["alice"])


def check_renewed(pki: PKI) -> None:
    new = assert_consistent_current(pki, "alice")
    old_cert = load_cert(pki.root / "renewed" / "issued" / "alice.crt")
    assert format_serial(old_cert.serial_number) != new
    assert key_matches(pki.root / "renewed" / "private" / "alice.key", old_cert)
    assert [r.current for r in pki.store.inventory(pki.clock()).records] == [False, True]


def do_revoke(pki: PKI) -> Callable[[], object]:
    gen_req(pki, "alice")
    issue(pki, "alice")
    return lambda: pki.ca.revoke("alice", Reason.KEY_COMPROMISE)


def check_revoked(pki: PKI) -> None:
    [entry] = parse_index(pki.store.index_path.read_text()).entries
    assert (entry.status, entry.reason) == ("R", Reason.KEY_COMPROMISE)
    for folder, suffix in (("certs", "crt"), ("private", "key"), ("reqs", "req")):
        assert (pki.root / "revoked" / f"{folder}_by_serial" / f"{entry.serial}.{suffix}").is_file()
    for gone in ("issued/alice.crt", "private/alice.key", "reqs/alice.req"):
        assert not (pki.root / gone).exists()
    assert not (pki.root / "certs_by_serial" / f"{entry.serial}.pem").exists()


OPERATIONS = {
    "issue": (do_issue, check_issued),
    "renew": (do_renew, check_renewed),
    "revoke": (do_revoke, check_revoked),
}


@pytest.mark.parametrize("done", [0, 1, 3, 99])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_an_interrupted_write_is_completed_by_recover_and_replaying_twice_is_a_no_op(
    pki: PKI, monkeypatch: pytest.MonkeyPatch, operation: str, done: int
) -> None:
    prepare, check = OPERATIONS[operation]
    run = prepare(pki)
    crash_after(monkeypatch, done)
    with pytest.raises(StorageError, match="simulated"):
        run()
    journal = pki.store.journal_path.read_bytes()
    assert any("interrupted" in p for p in PKIStore(pki.root).inventory(pki.clock()).problems)

    with pki.store.lock:
        assert pki.store.recover() is True
    check(pki)
    assert not pki.store.journal_path.exists()
    assert not temporary_files(pki.root)

    after = snapshot(pki.root)
    pki.store.journal_path.write_bytes(journal)
    with pki.store.lock:
        assert pki.store.recover() is True
    assert snapshot(pki.root) == after
    with pki.store.lock:
        assert pki.store.recover() is False


def test_a_journal_written_as_commit_writes_it_is_replayed(pki: PKI) -> None:
    store = pki.store
    [serial] = issue(pki, "alice")
    cert = store.root / "issued" / "alice.crt"
    not_after = load_cert(cert).not_valid_after_utc
    with store.lock:
        tx = store.transaction()
        tx.staged.stage(store.root / "issued" / "note.txt", b"staged\n")
        tx.staged.sync()
        tx.moves.append(
            Move.of_existing(cert, store.root / "revoked" / "certs_by_serial" / f"{serial}.crt")
        )
        tx.removals.append(store.by_serial_path(serial))
        revoked = index_line("R", serial, not_after, "/CN=alice", pki.clock.now, Reason.SUPERSEDED)
        tx.index_lines.append(revoked)
        journal = {
            "moves": [move.as_json() for move in [*tx.moves, *tx.staged.moves]],
            "removals": [str(path) for path in tx.removals],
            "index": tx.index_lines,
            "serial": None,
        }
        store.journal_path.write_text(json.dumps(journal))
        # The process dies here: nothing applied yet.
        assert store.recover() is True
        after = snapshot(store.root)
        store.journal_path.write_text(json.dumps(journal))
        assert store.recover() is True
        assert snapshot(store.root) == after
    assert (store.root / "issued" / "note.txt").read_bytes() == b"staged\n"
    assert not cert.exists()
    assert not store.by_serial_path(serial).exists()
    assert index_lines(pki) == [revoked]


def test_an_unreadable_journal_is_refused_naming_it(pki: PKI) -> None:
    pki.store.journal_path.write_text("{not json")
    with pytest.raises(MalformedFile, match=r"journal\.json"):
        issue(pki, "alice")


def test_a_write_removes_orphaned_temporary_files(pki: PKI) -> None:
    orphan = pki.root / "issued" / f"{TEMP_PREFIX}0badcafe-alice.crt"
    orphan.write_bytes(b"left by a crash before the journal\n")
    issue(pki, "bob")
    assert not orphan.exists()


# ---- easy-rsa 3.1.0 writing index.txt at the same time ---------------------------------------
# easy-rsa before 3.2.3 takes no lock: `easyrsa revoke` by hand may rewrite index.txt while a
# certwarden write holds lock.file. Neither change may be lost.


def line_of(pki: PKI, serial: str) -> list[str]:
    [line] = [line for line in index_lines(pki) if line.split("\t")[3] == serial]
    return line.split("\t")


def test_a_revoke_by_easyrsa_during_a_certwarden_write_is_kept(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    [alice] = issue(pki, "alice")
    real_upserted_index = certwarden.pki.store.upserted_index
    made: list[bytes] = []

    def upserted_index(current: bytes, lines: list[str]) -> bytes:
        if not made:
            # After certwarden read index.txt, before it puts its new one in place.
            EasyRSA(pki.root).run("revoke", "alice", "keyCompromise")
        made.append(current)
        return real_upserted_index(current, lines)

    monkeypatch.setattr("certwarden.pki.store.upserted_index", upserted_index)
    [bob] = issue(pki, "bob")
    assert len(made) == 2  # made again from easy-rsa's index.txt
    assert line_of(pki, alice)[0] == "R"
    assert line_of(pki, alice)[2].endswith(",keyCompromise")
    assert line_of(pki, bob)[0] == "V"
    assert not pki.store.journal_path.exists()
    assert not temporary_files(pki.root)
    statuses = {r.serial: r.status for r in pki.store.inventory(pki.clock()).records}
    assert statuses == {alice: Status.REVOKED, bob: Status.VALID}
    assert audit_pki(pki.root) == []


def test_a_revocation_is_never_undone_by_a_line_planned_before_it() -> None:
    # easy-rsa revoked alice after certwarden planned its lines from the older index.txt.
    alice_revoked = "R\t301231235959Z\t240101000000Z,keyCompromise\t0A\tunknown\t/CN=alice"
    bob_valid = "V\t301231235959Z\t\t0B\tunknown\t/CN=bob"
    current = f"{alice_revoked}\n{bob_valid}\n".encode()
    alice_valid = "V\t301231235959Z\t\t0A\tunknown\t/CN=alice"
    alice_superseded = "R\t301231235959Z\t240202000000Z,superseded\t0A\tunknown\t/CN=alice"
    bob_revoked = "R\t301231235959Z\t240202000000Z,superseded\t0B\tunknown\t/CN=bob"
    assert upserted_index(current, [alice_valid, bob_revoked]) == (
        f"{alice_revoked}\n{bob_revoked}\n".encode()
    )
    assert upserted_index(current, [alice_superseded]) == current


def test_an_index_that_keeps_changing_fails_the_write_until_the_next_one(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    [alice] = issue(pki, "alice")
    real_upserted_index = certwarden.pki.store.upserted_index

    def upserted_index(current: bytes, lines: list[str]) -> bytes:
        rewritten = pki.root / "index.txt.new"
        rewritten.write_bytes(pki.store.index_path.read_bytes())
        rewritten.replace(pki.store.index_path)  # as openssl ca does: a new file each time
        return real_upserted_index(current, lines)

    monkeypatch.setattr("certwarden.pki.store.upserted_index", upserted_index)
    with pytest.raises(LockHeld, match=r"index\.txt: changed 5 times"):
        issue(pki, "bob")
    assert [line.split("\t")[3] for line in index_lines(pki)] == [alice]
    assert pki.store.journal_path.exists()
    monkeypatch.undo()
    with pki.store.writing():
        pass  # the journal completes the write
    assert [line.split("\t")[0] for line in index_lines(pki)] == ["V", "V"]
    assert (pki.root / "issued" / "bob.crt").is_file()


def hide_index_after_the_moves(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the next commit find index.txt renamed away, as openssl ca does for a moment."""
    hidden = pki.root / "index.txt.old"

    def apply(moves: list[Move], *, replay: bool = False) -> None:
        apply_moves(moves, replay=replay)
        if not replay:
            pki.store.index_path.rename(hidden)

    monkeypatch.setattr("certwarden.pki.store.apply_moves", apply)
    return hidden


def test_an_index_missing_for_a_moment_is_waited_for(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    [alice] = issue(pki, "alice")
    hidden = hide_index_after_the_moves(pki, monkeypatch)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        if not waits:
            hidden.rename(pki.store.index_path)  # openssl's second rename
        waits.append(seconds)

    monkeypatch.setattr(
        "certwarden.pki.store.time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep)
    )
    [bob] = issue(pki, "bob")
    assert waits
    assert [line.split("\t")[3] for line in index_lines(pki)] == [alice, bob]


def test_a_missing_index_is_never_taken_for_an_empty_one(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    [alice] = issue(pki, "alice")
    hidden = hide_index_after_the_moves(pki, monkeypatch)
    monkeypatch.setattr("certwarden.pki.store.INDEX_RETRY_SECONDS", 0.05)
    with pytest.raises(NotFound, match=r"index\.txt: missing"):
        issue(pki, "bob")
    assert not pki.store.index_path.exists()  # not a new one listing bob alone
    assert pki.store.journal_path.exists()
    with pytest.raises(NotFound, match=r"index\.txt: missing"), pki.store.writing():
        pass  # nor when the journal is replayed
    hidden.rename(pki.store.index_path)  # the operator restores it
    with pki.store.writing():
        pass
    bob = serial_of(pki.root / "issued" / "bob.crt")
    assert [line.split("\t")[3] for line in index_lines(pki)] == [alice, bob]


def test_a_certificate_is_named_after_its_file_which_is_looked_for_once_per_listing(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """easy-rsa names files after the request's name, which may not be the CN: issued/NAME.crt
    is found by serial, from one read of issued/ and renewed/issued/, only when needed."""
    issue(pki, "alice", "bob", "carol", "dave")
    pki.ca.renew(["carol"])
    pki.ca.revoke("dave")
    (pki.root / "issued" / "bob.crt").rename(pki.root / "issued" / "robert.crt")
    (pki.root / "renewed" / "issued" / "carol.crt").rename(
        pki.root / "renewed" / "issued" / "caroline.crt"
    )
    reads: list[Path] = []
    file_names = PKIStore._file_names

    def counted(store: PKIStore) -> dict[str, str]:
        reads.append(store.root)
        return file_names(store)

    monkeypatch.setattr(PKIStore, "_file_names", counted)
    store = fresh_store_without_cache(pki)
    names = ["alice", "robert", "caroline", "dave", "carol"]
    for _ in range(2):  # read from the files, then from the cache in memory
        assert [r.name for r in store.inventory(pki.clock()).records] == names
    assert [r.name for r in PKIStore(pki.root).inventory(pki.clock()).records] == names
    assert len(reads) == 1  # the others came from meta.tsv

    (pki.root / "issued" / "robert.crt").rename(pki.root / "issued" / "bob.crt")
    (pki.root / "renewed" / "issued" / "caroline.crt").rename(
        pki.root / "renewed" / "issued" / "carol.crt"
    )
    inventory = fresh_store_without_cache(pki).inventory(pki.clock())
    assert [r.name for r in inventory.records] == ["alice", "bob", "carol", "dave", "carol"]
    assert inventory.problems == []
    assert len(reads) == 1  # every file is named after its CN: issued/ was not read
