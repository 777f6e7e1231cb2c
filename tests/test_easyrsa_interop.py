"""certwarden and the real easy-rsa 3.1 / openssl on the same PKI directory, both ways.

Operators keep using easy-rsa by hand next to the daemon, so every file certwarden writes
must be one that easy-rsa and ``openssl ca`` accept, and the reverse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import RunCli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.name import _ASN1Type
from easyrsa import (
    ORG_DN,
    EasyRSA,
    assert_openssl_ca_reads_index,
    audit_pki,
    certwarden_command,
    certwarden_environment,
    index_problems,
    openssl,
    openssl_ca,
    openssl_serial,
    run_command,
)

from certwarden.errors import LockHeld
from certwarden.pki.ca import CertificateAuthority, IssueRequest
from certwarden.pki.lock import PKILock
from certwarden.pki.model import KeyType, Profile, Reason, Status
from certwarden.pki.store import PKIStore
from certwarden.pki.x509 import _OPENSSL_SHORT_NAMES, _REASON_FLAGS, slash_subject


def authority(pki: Path) -> CertificateAuthority:
    return CertificateAuthority(PKIStore(pki))


def crl_entry(pki: Path, serial: str) -> x509.RevokedCertificate | None:
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    return crl.get_revoked_certificate_by_serial_number(int(serial, 16))


def crl_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def public_der(cert: Path) -> bytes:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def shown_serials(text: str) -> str:
    """`easyrsa show-cert` prints the serial as lowercase hex pairs split by colons."""
    return "".join(text.split()).replace(":", "").upper()


def index_line_of(pki: Path, serial: str) -> list[str]:
    for line in (pki / "index.txt").read_text().splitlines():
        fields = line.split("\t")
        if fields[3] == serial:
            return fields
    raise AssertionError(f"serial {serial} not in index.txt")


def assert_revoked_like_easyrsa(pki: Path, name: str, serial: str) -> None:
    """easy-rsa 3.1.0's layout after `revoke NAME`."""
    assert not (pki / "issued" / f"{name}.crt").exists()
    assert not (pki / "private" / f"{name}.key").exists()
    assert not (pki / "certs_by_serial" / f"{serial}.pem").exists()
    assert openssl_serial(pki / "revoked" / "certs_by_serial" / f"{serial}.crt") == serial
    assert (pki / "revoked" / "private_by_serial" / f"{serial}.key").is_file()
    assert index_line_of(pki, serial)[0] == "R"


# ---- (a) a certwarden PKI, then easy-rsa ----------------------------------------------------


@pytest.fixture(params=[True, False], ids=["host-cnf", "own-cnf"])
def pki_by_certwarden(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A PKI made by certwarden with a client (alice, bob) and a server (web) certificate."""
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.init("certwarden test CA", easyrsa_conf_from_host=request.param)
    ca.issue(
        [
            IssueRequest("alice"),
            IssueRequest("bob"),
            IssueRequest("web", Profile.SERVER, ("DNS:web.example",)),
        ]
    )
    return pki


def test_easyrsa_revoke_moves_certwarden_issued_files(pki_by_certwarden: Path) -> None:
    pki = pki_by_certwarden
    easyrsa = EasyRSA(pki)
    serials = {name: openssl_serial(pki / "issued" / f"{name}.crt") for name in ("alice", "web")}

    easyrsa.run("revoke", "alice")
    easyrsa.run("revoke", "web", "cessationOfOperation")

    for name, serial in serials.items():
        assert_revoked_like_easyrsa(pki, name, serial)
    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    for serial in serials.values():
        record = inventory.by_serial(serial)
        assert record is not None and record.status is Status.REVOKED
    web = inventory.by_serial(serials["web"])
    assert web is not None and web.reason is Reason.CESSATION_OF_OPERATION
    assert audit_pki(pki) == []


def test_easyrsa_gen_crl_lists_serials_revoked_by_certwarden(pki_by_certwarden: Path) -> None:
    pki = pki_by_certwarden
    ca = authority(pki)
    (alice,) = ca.revoke("alice", Reason.SUPERSEDED)

    EasyRSA(pki).run("gen-crl")

    check = openssl("crl", "-in", pki / "crl.pem", "-CAfile", pki / "ca.crt", "-noout")
    assert "verify OK" in check.stdout + check.stderr
    entry = crl_entry(pki, alice.serial)
    assert entry is not None and crl_reason(entry) is x509.ReasonFlags.superseded
    assert crl_entry(pki, openssl_serial(pki / "issued" / "bob.crt")) is None


def test_easyrsa_build_full_on_certwarden_pki_appears_in_inventory(pki_by_certwarden: Path) -> None:
    pki = pki_by_certwarden
    easyrsa = EasyRSA(pki)

    easyrsa.run("build-client-full", "carol", "nopass")
    easyrsa.run("build-server-full", "api", "nopass")

    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    for name, profile in (("carol", Profile.CLIENT), ("api", Profile.SERVER)):
        record = inventory.current(name)
        assert record is not None
        assert record.serial == openssl_serial(pki / "issued" / f"{name}.crt")
        assert (record.profile, record.status) == (profile, Status.VALID)
    # certwarden goes on writing the index easy-rsa just rewrote.
    authority(pki).issue([IssueRequest("dave")])
    assert audit_pki(pki) == []


def test_easyrsa_san_options_work_with_the_pki_openssl_cnf(pki_by_certwarden: Path) -> None:
    """--subject-alt-name and --copy-ext need marker lines in openssl-easyrsa.cnf.

    Without them easy-rsa silently drops the SAN, which breaks a server certificate.
    """
    pki = pki_by_certwarden
    easyrsa = EasyRSA(pki)

    easyrsa.run("--subject-alt-name=DNS:api.example", "gen-req", "api", "nopass")
    easyrsa.run("--copy-ext", "sign-req", "server", "api")

    request = openssl("req", "-in", pki / "reqs" / "api.req", "-noout", "-text").stdout
    assert "DNS:api.example" in request
    cert = openssl("x509", "-in", pki / "issued" / "api.crt", "-noout", "-ext", "subjectAltName")
    assert "DNS:api.example" in cert.stdout
    record = PKIStore(pki).inventory().current("api")
    assert record is not None and record.profile is Profile.SERVER


def test_openssl_ca_reads_certwarden_index(pki_by_certwarden: Path) -> None:
    pki = pki_by_certwarden
    (revoked,) = authority(pki).revoke("bob", Reason.KEY_COMPROMISE)
    valid = openssl_serial(pki / "issued" / "alice.crt")

    # `openssl ca -status` exits 1 even when it found the serial: judge it by its output.
    assert f"{valid}=Valid (V)" in openssl_ca(pki, "-status", valid, check=False).stderr
    status = openssl_ca(pki, "-status", revoked.serial, check=False).stderr
    assert f"{revoked.serial}=Revoked (R)" in status
    assert_openssl_ca_reads_index(pki)
    assert audit_pki(pki) == []


# ---- (b) an easy-rsa PKI, then certwarden ---------------------------------------------------

EASYRSA_NAMES = {
    "alice": Profile.CLIENT,
    "web": Profile.SERVER,
    "dev": Profile.CLIENT,  # gen-req + sign-req
    "bob": Profile.CLIENT,
    "carol": Profile.CLIENT,
    "erin": Profile.CLIENT,
}


@pytest.fixture(scope="module", params=["ec", "rsa"])
def easyrsa_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A PKI made entirely by easy-rsa, built once per algorithm and copied by each test."""
    pki = tmp_path_factory.mktemp(f"easyrsa-{request.param}") / "pki"
    easyrsa = EasyRSA(pki)
    algo = f"--use-algo={request.param}"
    easyrsa.run("init-pki")
    easyrsa.run(algo, "build-ca", "nopass", env={"EASYRSA_REQ_CN": "easy-rsa test CA"})
    easyrsa.run(algo, "build-client-full", "alice", "nopass")
    easyrsa.run(algo, "build-server-full", "web", "nopass")
    easyrsa.run(algo, "gen-req", "dev", "nopass")
    easyrsa.run(algo, "sign-req", "client", "dev")
    for name in ("bob", "carol", "erin"):
        easyrsa.run(algo, "build-client-full", name, "nopass")
    return pki


def copied(template: Path, tmp_path: Path) -> Path:
    """A copy of a PKI built once for the module, for one test to change."""
    pki = tmp_path / "pki"
    shutil.copytree(template, pki, symlinks=True)
    return pki


@pytest.fixture
def pki_by_easyrsa(easyrsa_template: Path, tmp_path: Path) -> Path:
    return copied(easyrsa_template, tmp_path)


def test_certwarden_lists_easyrsa_certificates(pki_by_easyrsa: Path) -> None:
    inventory = PKIStore(pki_by_easyrsa).inventory()

    assert inventory.problems == []
    assert sorted(record.name for record in inventory.records) == sorted(EASYRSA_NAMES)
    for name, profile in EASYRSA_NAMES.items():
        record = inventory.current(name)
        assert record is not None
        assert record.serial == openssl_serial(pki_by_easyrsa / "issued" / f"{name}.crt")
        assert (record.status, record.profile, record.subject) == (
            Status.VALID,
            profile,
            f"/CN={name}",
        )


def test_certwarden_renew_of_easyrsa_cert_moves_old_files_to_renewed(pki_by_easyrsa: Path) -> None:
    pki = pki_by_easyrsa
    old_cert = (pki / "issued" / "alice.crt").read_bytes()
    old_key = (pki / "private" / "alice.key").read_bytes()
    old_serial = openssl_serial(pki / "issued" / "alice.crt")

    (renewed,) = authority(pki).renew(["alice"])

    assert (pki / "renewed" / "issued" / "alice.crt").read_bytes() == old_cert
    assert (pki / "renewed" / "private" / "alice.key").read_bytes() == old_key
    assert (pki / "renewed" / "reqs" / "alice.req").is_file()
    assert (pki / "private" / "alice.key").read_bytes() != old_key
    assert renewed.record.serial == openssl_serial(pki / "issued" / "alice.crt") != old_serial
    assert renewed.record.profile is Profile.CLIENT
    assert renewed.record.serial in shown_serials(EasyRSA(pki).run("show-cert", "alice").stdout)
    records = PKIStore(pki).inventory().of_name("alice")
    assert [(r.serial, r.status, r.current) for r in records] == [
        (old_serial, Status.VALID, False),
        (renewed.record.serial, Status.VALID, True),
    ]
    assert audit_pki(pki) == []


def test_certwarden_renew_keep_key_of_signed_request_keeps_the_key(pki_by_easyrsa: Path) -> None:
    pki = pki_by_easyrsa
    key = (pki / "private" / "dev.key").read_bytes()
    old_public = public_der(pki / "issued" / "dev.crt")

    (renewed,) = authority(pki).renew(["dev"], keep_key=True)

    assert (pki / "private" / "dev.key").read_bytes() == key
    assert public_der(pki / "issued" / "dev.crt") == old_public
    assert openssl_serial(pki / "renewed" / "issued" / "dev.crt") != renewed.record.serial
    assert renewed.record.serial in shown_serials(EasyRSA(pki).run("show-cert", "dev").stdout)
    assert audit_pki(pki) == []


def test_certwarden_revoke_of_easyrsa_cert_moves_files_like_easyrsa(pki_by_easyrsa: Path) -> None:
    pki = pki_by_easyrsa
    serial = openssl_serial(pki / "issued" / "bob.crt")
    ca = authority(pki)

    ca.revoke("bob", Reason.AFFILIATION_CHANGED)
    ca.generate_crl()

    assert_revoked_like_easyrsa(pki, "bob", serial)
    assert (pki / "revoked" / "reqs_by_serial" / f"{serial}.req").is_file()
    entry = crl_entry(pki, serial)
    assert entry is not None and crl_reason(entry) is x509.ReasonFlags.affiliation_changed
    openssl("crl", "-in", pki / "crl.pem", "-CAfile", pki / "ca.crt", "-noout")
    assert audit_pki(pki) == []


def test_certwarden_renew_of_easyrsa_server_keeps_lifetime_and_san(pki_by_easyrsa: Path) -> None:
    """A renewal gets the old lifetime again, counted from now (minus the backdate)."""
    old = x509.load_pem_x509_certificate((pki_by_easyrsa / "issued" / "web.crt").read_bytes())

    (renewed,) = authority(pki_by_easyrsa).renew(["web"])

    assert renewed.record.not_before is not None
    lifetime = renewed.record.not_after - renewed.record.not_before
    assert abs(lifetime - (old.not_valid_after_utc - old.not_valid_before_utc)) < timedelta(
        seconds=2
    )
    assert renewed.record.profile is Profile.SERVER
    san = openssl(
        "x509", "-in", pki_by_easyrsa / "issued" / "web.crt", "-noout", "-ext", "subjectAltName"
    )
    assert "DNS:web" in san.stdout


def test_easyrsa_keeps_working_after_certwarden_writes(pki_by_easyrsa: Path) -> None:
    pki = pki_by_easyrsa
    ca = authority(pki)
    ca.renew(["alice"])
    ca.renew(["dev"], keep_key=True)
    ca.revoke("bob")
    ca.generate_crl()
    easyrsa = EasyRSA(pki)
    carol = openssl_serial(pki / "issued" / "carol.crt")

    easyrsa.run("revoke", "carol")
    easyrsa.run("gen-crl")
    easyrsa.run("build-client-full", "frank", "nopass")
    easyrsa.run("show-cert", "alice")

    assert_revoked_like_easyrsa(pki, "carol", carol)
    assert crl_entry(pki, carol) is not None
    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    frank = inventory.current("frank")
    assert frank is not None
    assert (frank.serial, frank.profile) == (
        openssl_serial(pki / "issued" / "frank.crt"),
        Profile.CLIENT,
    )
    assert_openssl_ca_reads_index(pki)
    assert audit_pki(pki) == []


def test_easyrsa_revocation_reason_is_in_certwarden_crl(pki_by_easyrsa: Path) -> None:
    pki = pki_by_easyrsa
    serial = openssl_serial(pki / "issued" / "erin.crt")
    EasyRSA(pki).run("revoke", "erin", "keyCompromise")

    authority(pki).generate_crl()

    record = PKIStore(pki).inventory().by_serial(serial)
    assert record is not None
    assert (record.status, record.reason) == (Status.REVOKED, Reason.KEY_COMPROMISE)
    entry = crl_entry(pki, serial)
    assert entry is not None and crl_reason(entry) is x509.ReasonFlags.key_compromise
    text = openssl("crl", "-in", pki / "crl.pem", "-noout", "-text").stdout
    assert "Key Compromise" in text


# ---- (c) openssl verify with certwarden's CRL -------------------------------------------------


@pytest.mark.parametrize(
    "key_type",
    [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.ED25519],
    ids=str,
)
def test_openssl_verify_rejects_revoked_cert_with_certwarden_crl(
    key_type: KeyType, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.init(key_type=key_type)
    ca.issue([IssueRequest("good", key_type=key_type), IssueRequest("lost", key_type=key_type)])
    (lost,) = ca.revoke("lost", Reason.KEY_COMPROMISE)
    ca.generate_crl()
    verify = ("verify", "-CAfile", pki / "ca.crt", "-crl_check", "-CRLfile", pki / "crl.pem")

    good = openssl(*verify, pki / "issued" / "good.crt")
    revoked = openssl(
        *verify, pki / "revoked" / "certs_by_serial" / f"{lost.serial}.crt", check=False
    )

    assert good.stdout.strip().endswith(": OK")
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr


# ---- (d) index.txt dates from 2050 on --------------------------------------------------------


def test_index_dates_after_2050_use_generalized_time_and_tools_accept_them(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    now = datetime.now(UTC)
    not_after = datetime(2051, 6, 1, tzinfo=UTC)
    ca = authority(pki)
    ca.init(validity=datetime(2053, 1, 1, tzinfo=UTC) - now)
    (late,) = ca.issue([IssueRequest("late", validity=not_after - now)])
    ca.issue([IssueRequest("later", validity=not_after - now)])

    fields = index_line_of(pki, late.record.serial)
    assert len(fields[1]) == 15 and fields[1].startswith("20510601"), fields
    assert_openssl_ca_reads_index(pki)
    status = openssl_ca(pki, "-status", late.record.serial, check=False).stderr
    assert f"{late.record.serial}=Valid (V)" in status

    easyrsa = EasyRSA(pki)
    easyrsa.run("revoke", "late")
    days = str((not_after - now).days)
    easyrsa.run("build-client-full", "by-easyrsa", "nopass", env={"EASYRSA_CERT_EXPIRE": days})

    revoked = index_line_of(pki, late.record.serial)
    assert revoked[0] == "R" and len(revoked[1]) == 15 and len(revoked[2]) == 13
    assert_openssl_ca_reads_index(pki)
    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    record = inventory.by_serial(late.record.serial)
    assert record is not None and record.status is Status.REVOKED
    by_easyrsa = inventory.current("by-easyrsa")
    assert by_easyrsa is not None and by_easyrsa.not_after.year == 2051
    authority(pki).revoke("later")
    assert_openssl_ca_reads_index(pki)
    assert audit_pki(pki) == []


# ---- (e) the shared lock ---------------------------------------------------------------------


@pytest.fixture
def small_pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    authority(pki).init()
    return pki


@pytest.fixture
def lock_holder(small_pki: Path) -> Iterator[subprocess.Popen[str]]:
    """Another certwarden process holding the PKI lock until its stdin closes."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from certwarden.pki.lock import PKILock
        with PKILock(Path({str(small_pki)!r})):
            print("held", flush=True)
            sys.stdin.read()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    yield holder
    holder.kill()
    holder.wait()


def test_lock_held_by_another_certwarden_is_refused_naming_its_pid(
    small_pki: Path, lock_holder: subprocess.Popen[str]
) -> None:
    index = (small_pki / "index.txt").read_bytes()

    with pytest.raises(LockHeld, match=rf"process {lock_holder.pid}\b"):
        PKILock(small_pki, timeout=0.2).acquire()
    with pytest.raises(LockHeld, match=str(lock_holder.pid)):
        CertificateAuthority(PKIStore(small_pki, lock_timeout=0.2)).issue([IssueRequest("x")])

    assert (small_pki / "index.txt").read_bytes() == index
    assert lock_holder.stdin is not None
    lock_holder.stdin.close()
    assert lock_holder.wait(timeout=30) == 0
    authority(small_pki).issue([IssueRequest("x")])
    assert not (small_pki / "lock.file").exists()


def test_lock_held_by_another_store_of_the_same_process_is_refused(small_pki: Path) -> None:
    """Two PKIStore objects in one daemon must not write at the same time either."""
    with PKILock(small_pki):
        with pytest.raises(LockHeld, match=rf"process {os.getpid()}\b"):
            PKILock(small_pki, timeout=0.2).acquire()
        assert (small_pki / "lock.file").read_text() == f"{os.getpid()}\n"


def test_lock_file_with_own_pid_but_not_held_here_is_stale(small_pki: Path) -> None:
    """A restarted container reuses PIDs: our own PID in lock.file may be a dead process's."""
    (small_pki / "lock.file").write_text(f"{os.getpid()}\n")

    authority(small_pki).issue([IssueRequest("x")])

    assert not (small_pki / "lock.file").exists()


def test_easyrsa_32_lock_file_with_live_pid_blocks_certwarden_until_it_dies(
    small_pki: Path,
) -> None:
    """easy-rsa 3.2.3+ takes pki/lock.file (noclobber, its PID inside) while it writes.

    easy-rsa 3.1.0, installed here, ignores lock.file entirely: only 3.2.3 and later create
    and honour it. So easy-rsa holding the lock is simulated: a live process (`sleep`) whose
    PID is in lock.file, as 3.2 leaves it while running.
    """
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (small_pki / "lock.file").write_text(f"{sleeper.pid}\n")
        index = (small_pki / "index.txt").read_bytes()
        slow = CertificateAuthority(PKIStore(small_pki, lock_timeout=0.2))

        with pytest.raises(LockHeld, match=rf"process {sleeper.pid}\b"):
            slow.issue([IssueRequest("alice")])
        with pytest.raises(LockHeld):
            slow.generate_crl()
        assert (small_pki / "index.txt").read_bytes() == index
        assert (small_pki / "lock.file").read_text() == f"{sleeper.pid}\n"
    finally:
        sleeper.kill()
        sleeper.wait()

    (issued,) = authority(small_pki).issue([IssueRequest("alice")])

    assert issued.record.status is Status.VALID
    assert not (small_pki / "lock.file").exists()
    assert audit_pki(small_pki) == []


# ---- (f) every revocation openssl ca writes is in certwarden's CRL -----------------------------

# name: the options of `openssl ca -revoke`, and what a CRL entry then holds
# (reason, invalidity date, hold instruction OID)
OPENSSL_REVOCATIONS: dict[
    str, tuple[tuple[str, ...], tuple[str | None, str | None, str | None]]
] = {
    "plain": ((), (None, None, None)),
    **{
        f"reason-{reason.value}": (
            ("-crl_reason", reason.value),
            (_REASON_FLAGS[reason].value, None, None),
        )
        for reason in Reason
    },
    "compromise": (
        ("-crl_compromise", "20260101000000Z"),
        ("keyCompromise", "2026-01-01T00:00:00+00:00", None),
    ),
    "compromise-short": (  # openssl accepts the time without seconds, or with an offset
        ("-crl_compromise", "202601010130+0100"),
        ("keyCompromise", "2026-01-01T00:30:00+00:00", None),
    ),
    "ca-compromise": (
        ("-crl_CA_compromise", "20250601120000Z"),
        ("cACompromise", "2025-06-01T12:00:00+00:00", None),
    ),
    "hold-reject": (
        ("-crl_hold", "holdInstructionReject"),
        ("certificateHold", None, "1.2.840.10040.2.3"),
    ),
    "hold-call": (
        ("-crl_hold", "1.2.840.10040.2.2"),
        ("certificateHold", None, "1.2.840.10040.2.2"),
    ),
}


CRLEntry = tuple[str, str | None, str | None, str | None]


def crl_entries(path: Path) -> dict[int, CRLEntry | None]:
    """serial -> (revocation date, reason, invalidity date, hold instruction) of a CRL; None
    for an entry whose extensions cryptography cannot read."""
    out: dict[int, CRLEntry | None] = {}
    for entry in x509.load_pem_x509_crl(path.read_bytes()):
        try:
            reason = crl_reason(entry)
        except ValueError:
            # openssl ca writes -crl_compromise's time as it was typed, which need not be DER
            # (202601010130+0100): cryptography refuses it. certwarden writes it in UTC.
            out[entry.serial_number] = None
            continue
        invalidity = hold = None
        for ext in entry.extensions:
            if isinstance(ext.value, x509.InvalidityDate):
                invalidity = ext.value.invalidity_date_utc.isoformat()
            elif ext.oid.dotted_string == "2.5.29.23":
                assert isinstance(ext.value, x509.UnrecognizedExtension)
                hold = x509.ObjectIdentifier(  # the DER OID: 06 len arcs
                    _dotted(ext.value.value[2:])
                ).dotted_string
        out[entry.serial_number] = (
            entry.revocation_date_utc.isoformat(),
            None if reason is None else reason.value,
            invalidity,
            hold,
        )
    return out


def _dotted(body: bytes) -> str:
    arcs, value = [], 0
    for byte in body:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def verify_with_crl(pki: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return openssl(
        "verify",
        "-CAfile",
        pki / "ca.crt",
        "-crl_check",
        "-CRLfile",
        pki / "crl.pem",
        cert,
        check=False,
    )


def certwarden_cli(pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_command(certwarden_command(pki, *args), env=certwarden_environment())


def test_every_openssl_ca_revocation_option_reaches_certwarden_crl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.init("revocation options CA")
    names = [*OPENSSL_REVOCATIONS, "released", "good"]
    ca.issue([IssueRequest(name) for name in names])
    serials = {name: openssl_serial(pki / "issued" / f"{name}.crt") for name in names}
    for name, (options, _) in OPENSSL_REVOCATIONS.items():
        openssl_ca(pki, "-revoke", str(pki / "issued" / f"{name}.crt"), *options)
    openssl_ca(pki, "-revoke", str(pki / "issued" / "released.crt"), "-crl_reason", "removeFromCRL")
    theirs = tmp_path / "openssl-crl.pem"
    openssl_ca(pki, "-gencrl", "-out", str(theirs))
    assert_openssl_ca_reads_index(pki)
    assert index_problems(pki) == []

    crl = certwarden_cli(pki, "crl")

    # Only the removeFromCRL line is left out, with a warning naming it.
    (warning,) = [line for line in crl.stderr.splitlines() if "WARNING" in line or "warn" in line]
    assert f"serial {serials['released']}: revocation reason removeFromCRL" in warning
    ours = crl_entries(pki / "crl.pem")
    openssl_entries = crl_entries(theirs)
    for name, (_, expected) in OPENSSL_REVOCATIONS.items():
        serial = int(serials[name], 16)
        entry = ours[serial]
        assert entry is not None and entry[1:] == expected, name
        # the same entry as openssl ca -gencrl writes for that index.txt line
        if name != "compromise-short":
            assert entry == openssl_entries[serial], name
    assert int(serials["released"], 16) not in ours
    assert int(serials["good"], 16) not in ours
    assert len(ours) == len(OPENSSL_REVOCATIONS)
    text = openssl("crl", "-in", pki / "crl.pem", "-noout", "-text").stdout
    for shown in ("Invalidity Date", "Hold Instruction Reject", "Hold Instruction Call Issuer"):
        assert shown in text
    for name in OPENSSL_REVOCATIONS:
        refused = verify_with_crl(pki, pki / "issued" / f"{name}.crt")
        assert refused.returncode != 0, name
        assert "certificate revoked" in refused.stdout + refused.stderr, name
    # nginx's openssl reads a removeFromCRL entry (openssl's own CRL has one) as not revoked:
    # leaving it out of the CRL has the same effect.
    assert verify_with_crl(pki, pki / "issued" / "released.crt").returncode == 0
    assert verify_with_crl(pki, pki / "issued" / "good.crt").returncode == 0
    inventory = PKIStore(pki).inventory()
    for name, (_, (reason, _, _)) in OPENSSL_REVOCATIONS.items():
        record = inventory.by_serial(serials[name])
        assert record is not None and record.status is Status.REVOKED, name
        assert (record.reason and _REASON_FLAGS[record.reason].value) == reason, name
    listed = certwarden_cli(pki, "list", "--all").stdout
    for name in OPENSSL_REVOCATIONS:
        (row,) = [line for line in listed.splitlines() if line.split()[0] == name]
        assert row.split()[2] == "revoked", row


def test_a_hand_damaged_revoked_line_is_still_in_the_crl(tmp_path: Path) -> None:
    """Fail closed: a revoked line certwarden cannot fully read is still revoked, with a
    warning naming the line, instead of silently accepted again by nginx."""
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.init("damaged index CA")
    ca.issue([IssueRequest("mallory"), IssueRequest("trudy"), IssueRequest("good")])
    serials = {
        name: openssl_serial(pki / "issued" / f"{name}.crt") for name in ("mallory", "trudy")
    }
    index = pki / "index.txt"
    lines = index.read_text().splitlines()
    for number, text in enumerate(lines):
        fields = text.split("\t")
        if fields[3] == serials["mallory"]:  # an impossible date and an unknown reason
            lines[number] = "\t".join(["R", fields[1], "261341125857Z,stolen", *fields[3:]])
        elif fields[3] == serials["trudy"]:  # a serial in lowercase, a reason in capitals
            lines[number] = "\t".join(
                ["R", fields[1], "261127125857Z,KEYCOMPROMISE", fields[3].lower(), *fields[4:]]
            )
    index.write_text("\n".join(lines) + "\n")

    crl = certwarden_cli(pki, "crl")

    warnings = [line for line in crl.stderr.splitlines() if "index.txt:" in line]
    assert any(
        "revocation date '261341125857Z'" in w
        and "listed without a reason" in w
        and f"the CRL lists serial {serials['mallory']} anyway" in w
        for w in warnings
    ), crl.stderr
    assert any(
        f"read as {serials['trudy']}" in w and "listed as keyCompromise" in w for w in warnings
    ), crl.stderr
    entries = crl_entries(pki / "crl.pem")
    mallory = entries[int(serials["mallory"], 16)]
    assert mallory is not None and mallory[1:] == (None, None, None)
    ours = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert mallory[0] == ours.last_update_utc.isoformat()  # the CRL's own date stands in
    trudy = entries[int(serials["trudy"], 16)]
    assert trudy is not None and trudy[1] == "keyCompromise"
    text = openssl("crl", "-in", pki / "crl.pem", "-noout", "-text").stdout
    assert serials["mallory"] in text and serials["trudy"] in text
    for name in ("mallory", "trudy"):
        refused = verify_with_crl(pki, pki / "issued" / f"{name}.crt")
        assert "certificate revoked" in refused.stdout + refused.stderr, name
    assert verify_with_crl(pki, pki / "issued" / "good.crt").returncode == 0


# ---- (g) subjects: renewal keeps them, index.txt writes them as openssl ca does --------------


@pytest.fixture(scope="module")
def org_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An easy-rsa PKI in organisational DN mode: frank (client) and api (server with SANs)."""
    pki = tmp_path_factory.mktemp("easyrsa-org") / "pki"
    easyrsa = EasyRSA(pki)
    easyrsa.run("init-pki")
    easyrsa.run("build-ca", "nopass", env={**ORG_DN, "EASYRSA_REQ_CN": "org test CA"})
    easyrsa.run("build-client-full", "frank", "nopass", env=ORG_DN)
    easyrsa.run(
        "--subject-alt-name=DNS:api.example,IP:192.0.2.7",
        "build-server-full",
        "api",
        "nopass",
        env=ORG_DN,
    )
    return pki


@pytest.fixture
def org_pki(org_template: Path, tmp_path: Path) -> Path:
    return copied(org_template, tmp_path)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certwarden_renew_keeps_an_easyrsa_org_subject(org_pki: Path) -> None:
    pki = org_pki
    old = load(pki / "issued" / "frank.crt")
    old_line = index_line_of(pki, openssl_serial(pki / "issued" / "frank.crt"))
    assert old_line[5] == "/C=DE/ST=BY/L=M/O=ACME/OU=Ops/CN=frank/emailAddress=frank@example.com"

    certwarden_cli(pki, "renew", "frank")

    new = load(pki / "issued" / "frank.crt")
    new_serial = openssl_serial(pki / "issued" / "frank.crt")
    assert new_serial != old_line[3]
    assert new.subject.public_bytes() == old.subject.public_bytes()
    assert index_line_of(pki, new_serial)[5] == old_line[5]  # as openssl ca wrote it
    shown = openssl(
        "x509", "-in", pki / "issued" / "frank.crt", "-noout", "-subject", "-nameopt", "compat"
    )
    assert shown.stdout.strip() == "subject=" + old_line[5]
    record = PKIStore(pki).inventory().current("frank")
    assert record is not None and record.serial == new_serial and record.subject == old_line[5]
    assert_openssl_ca_reads_index(pki)
    assert audit_pki(pki) == []


def test_certwarden_renew_keeps_the_subject_and_sans_of_an_org_server(org_pki: Path) -> None:
    pki = org_pki
    old = load(pki / "issued" / "api.crt")

    (renewed,) = authority(pki).renew(["api"])

    new = load(pki / "issued" / "api.crt")
    assert new.subject == old.subject
    assert (
        renewed.record.subject
        == index_line_of(pki, openssl_serial(pki / "renewed" / "issued" / "api.crt"))[5]
    )
    san = x509.SubjectAlternativeName
    assert new.extensions.get_extension_for_class(san).value == (
        old.extensions.get_extension_for_class(san).value
    )
    assert renewed.record.profile is Profile.SERVER
    assert audit_pki(pki) == []


RICH_SUBJECT = (
    "/C=DE/ST=Bayern/L=M\u00fcnchen/O=AC\\/ME\\+Co/OU=Ops+serialNumber=42/CN=rich"
    "/emailAddress=rich@example.com/title=Dr/GN=Ri/SN=Ch/DC=example/UID=u1/street=Main St 1"
    "/postalCode=80331/pseudonym=r/organizationIdentifier=VATDE-1"
)


def test_index_subject_is_written_as_openssl_ca_writes_it(tmp_path: Path) -> None:
    """openssl ca signs a request with a subject of many attributes (short names OpenSSL
    knows, an OID it does not, a multi-valued RDN, escapes, UTF-8); its index.txt line is
    the reference for slash_subject(), which certwarden writes when renewing it."""
    pki = tmp_path / "pki"
    ca = authority(pki)
    ca.init("subject CA")
    key, request = tmp_path / "rich.key", tmp_path / "rich.req"
    extensions = tmp_path / "client.ext"
    extensions.write_text("basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n")
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", request, "-utf8", "-multivalue-rdn", "-subj", RICH_SUBJECT,
    )  # fmt: skip
    openssl_ca(
        pki, "-in", str(request), "-out", str(pki / "issued" / "rich.crt"), "-batch",
        "-preserveDN", "-policy", "policy_anything", "-extfile", str(extensions),
    )  # fmt: skip
    shutil.copy(key, pki / "private" / "rich.key")
    cert = load(pki / "issued" / "rich.crt")
    openssl_line = index_line_of(pki, openssl_serial(pki / "issued" / "rich.crt"))
    assert "\\xC3\\xBC" in openssl_line[5] and "/serialNumber=42+OU=Ops/" in openssl_line[5]

    assert slash_subject(cert.subject) == openssl_line[5]

    (renewed,) = ca.renew(["rich"])
    assert index_line_of(pki, renewed.record.serial)[5] == openssl_line[5]
    assert load(pki / "issued" / "rich.crt").subject == cert.subject
    assert_openssl_ca_reads_index(pki)


def test_slash_subject_is_x509_name_oneline_for_any_attribute_and_string_type(
    tmp_path: Path,
) -> None:
    """What cryptography can build that openssl req cannot: an OID OpenSSL does not know, the
    string types (BMPString as UTF-16 bytes), control characters, and every short name in
    the table, each compared with OpenSSL's one-line form (X509_NAME_oneline(), which
    `-nameopt compat` prints and `openssl ca` writes in index.txt)."""

    def attribute(oid: str, value: str, kind: _ASN1Type) -> x509.NameAttribute[str]:
        return x509.NameAttribute(x509.ObjectIdentifier(oid), value, _type=kind)

    utf8 = _ASN1Type.UTF8String
    rdns = [
        x509.RelativeDistinguishedName([attribute("2.5.4.6", "DE", _ASN1Type.PrintableString)]),
        x509.RelativeDistinguishedName([attribute("1.2.3.4.5", "odd/+\\ \x01\x7f", utf8)]),
        x509.RelativeDistinguishedName([attribute("2.5.4.10", "M\u00fcller \u20ac", utf8)]),
        x509.RelativeDistinguishedName([attribute("2.5.4.11", "Bmp\u00e9", _ASN1Type.BMPString)]),
        x509.RelativeDistinguishedName(
            [attribute("2.5.4.3", "a", utf8), attribute("2.5.4.5", "1", utf8)]
        ),
        *(
            x509.RelativeDistinguishedName([attribute(oid, "v", utf8)])
            for oid in _OPENSSL_SHORT_NAMES
            if oid not in ("2.5.4.6", "1.3.6.1.4.1.311.60.2.1.3")  # two letters only
        ),
    ]
    name = x509.Name(rdns)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = x509.CertificateBuilder(
        issuer_name=name,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=1,
        not_valid_before=now,
        not_valid_after=now + timedelta(days=1),
    ).sign(key, hashes.SHA256())
    path = tmp_path / "name.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    shown = openssl("x509", "-in", path, "-noout", "-subject", "-nameopt", "compat").stdout

    assert slash_subject(x509.load_pem_x509_certificate(path.read_bytes()).subject) == (
        shown.strip().removeprefix("subject=")
    )


# ---- keys easy-rsa encrypted (built without nopass) -------------------------------------------


def test_an_encrypted_easyrsa_key_is_exported_with_its_passphrase_and_kept_on_renewal(
    pki_by_easyrsa: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    pki = pki_by_easyrsa
    EasyRSA(pki).run("build-client-full", "frank", env={"EASYRSA_PASSOUT": "pass:frank-secret"})
    key = (pki / "private" / "frank.key").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    passphrase = tmp_path / "frank-passphrase"
    passphrase.write_text("frank-secret\n")
    passphrase.chmod(0o600)
    bundle = tmp_path / "frank.p12"
    export: list[str | Path] = ["--pki", pki, "export", "frank", "--format", "p12", "--out", bundle]

    code, _, err = run_cli(export)
    assert code == 65
    assert err == (
        "certwarden: error: private/frank.key: the key is encrypted; give its passphrase with "
        "--key-passphrase-file\n"
    )
    code, out, err = run_cli([*export, "--key-passphrase-file", passphrase])
    assert code == 0, err
    [password] = re.findall(r"^password: (\S+)$", out, re.MULTILINE)
    exported_key, cert, _ = pkcs12.load_key_and_certificates(bundle.read_bytes(), password.encode())
    assert exported_key is not None and cert is not None
    assert "frank-secret" not in out + err

    # --keep-key checks the key through its request, never decrypting or rewriting it.
    (renewed,) = authority(pki).renew(["frank"], keep_key=True)
    assert (pki / "private" / "frank.key").read_bytes() == key
    assert renewed.record.serial == openssl_serial(pki / "issued" / "frank.crt")
    assert audit_pki(pki, keys_required=False) == []


# ---- requests made with another CN (--req-cn): named after easy-rsa's files ------------------


@pytest.fixture(scope="module", params=["carol.example.com", "Carol Phone"])
def req_cn_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """An easy-rsa PKI where `gen-req carol` was made with another CN, then signed; and alice."""
    cn = str(request.param)
    pki = tmp_path_factory.mktemp("easyrsa-req-cn") / "pki"
    easyrsa = EasyRSA(pki)
    easyrsa.run("init-pki")
    easyrsa.run("--use-algo=ec", "build-ca", "nopass", env={"EASYRSA_REQ_CN": "req-cn test CA"})
    easyrsa.run("--use-algo=ec", f"--req-cn={cn}", "gen-req", "carol", "nopass")
    easyrsa.run("sign-req", "client", "carol")
    easyrsa.run("--use-algo=ec", "build-client-full", "alice", "nopass")
    return pki, cn


@pytest.fixture
def req_cn_pki(req_cn_template: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    template, cn = req_cn_template
    return copied(template, tmp_path), cn


def audit_req_cn_pki(pki: Path, cn: str) -> list[str]:
    """audit_pki() but for its wish that issued/NAME.crt be the CN's: here it is not."""
    return [problem for problem in audit_pki(pki) if not problem.endswith(f" as /CN={cn}")]


def test_certwarden_lists_a_req_cn_certificate_under_its_file_name(
    req_cn_pki: tuple[Path, str],
) -> None:
    pki, cn = req_cn_pki
    serial = openssl_serial(pki / "issued" / "carol.crt")

    records = json.loads(certwarden_cli(pki, "list", "--json").stdout)

    carol = next(record for record in records if record["serial"] == serial)
    assert (carol["name"], carol["subject"], carol["status"], carol["profile"]) == (
        "carol",
        f"/CN={cn}",
        "valid",
        "client",
    )
    assert sorted(record["name"] for record in records) == ["alice", "carol"]
    assert "carol" in certwarden_cli(pki, "list").stdout
    inventory = PKIStore(pki).inventory()
    assert inventory.problems == []
    record = inventory.current("carol")
    assert record is not None and record.serial == serial
    assert inventory.current(cn) is None


def test_certwarden_renews_a_req_cn_certificate_by_its_file_name_keeping_the_subject(
    req_cn_pki: tuple[Path, str],
) -> None:
    pki, cn = req_cn_pki
    old = load(pki / "issued" / "carol.crt")
    old_serial = openssl_serial(pki / "issued" / "carol.crt")

    certwarden_cli(pki, "renew", "carol")

    new = load(pki / "issued" / "carol.crt")
    new_serial = openssl_serial(pki / "issued" / "carol.crt")
    assert new_serial != old_serial
    assert new.subject.public_bytes() == old.subject.public_bytes()
    assert index_line_of(pki, new_serial)[5] == f"/CN={cn}"
    assert openssl_serial(pki / "renewed" / "issued" / "carol.crt") == old_serial
    for store in (PKIStore(pki), PKIStore(pki)):  # the cache as written, and as read back
        records = store.inventory().of_name("carol")
        assert [(r.serial, r.status, r.current, r.subject) for r in records] == [
            (old_serial, Status.VALID, False, f"/CN={cn}"),
            (new_serial, Status.VALID, True, f"/CN={cn}"),
        ]
    (pki / ".certwarden" / "meta.tsv").unlink()  # derived from the files again: the same
    records = PKIStore(pki).inventory().of_name("carol")
    assert [(r.serial, r.current) for r in records] == [(old_serial, False), (new_serial, True)]
    assert new_serial in shown_serials(EasyRSA(pki).run("show-cert", "carol").stdout)
    assert_openssl_ca_reads_index(pki)
    assert audit_req_cn_pki(pki, cn) == []


def test_certwarden_revokes_and_exports_a_req_cn_certificate_by_its_file_name(
    req_cn_pki: tuple[Path, str], tmp_path: Path
) -> None:
    pki, cn = req_cn_pki
    serial = openssl_serial(pki / "issued" / "carol.crt")
    bundle = tmp_path / "carol.pem"

    certwarden_cli(pki, "export", "carol", "--format", "pem", "--out", str(bundle))
    certwarden_cli(pki, "revoke", "carol")

    assert b"PRIVATE KEY" in bundle.read_bytes()
    assert_revoked_like_easyrsa(pki, "carol", serial)
    assert (pki / "revoked" / "reqs_by_serial" / f"{serial}.req").is_file()
    record = PKIStore(pki).inventory().by_serial(serial)
    assert record is not None
    assert (record.name, record.status, record.subject) == ("carol", Status.REVOKED, f"/CN={cn}")
    assert_openssl_ca_reads_index(pki)
    assert audit_req_cn_pki(pki, cn) == []


def test_a_meta_cache_of_an_older_version_naming_by_cn_is_derived_again_once(
    req_cn_pki: tuple[Path, str],
) -> None:
    pki, cn = req_cn_pki
    carol, alice = (openssl_serial(pki / "issued" / f"{name}.crt") for name in ("carol", "alice"))
    meta = pki / ".certwarden" / "meta.tsv"
    meta.parent.mkdir()
    # As certwarden wrote it before names were file names: the CN, and no meta.version.
    meta.write_text(
        f"{carol}\t{cn}\tclient\t20250101000000Z\n{alice}\talice\tclient\t20250101000000Z\n"
    )

    first = PKIStore(pki).inventory()
    again = PKIStore(pki).inventory()  # from the cache written by the first

    assert first.problems == again.problems == []
    assert first.records == again.records
    assert [(r.serial, r.name) for r in first.records] == [(carol, "carol"), (alice, "alice")]
    # the dates are the certificates' (the old cache is not read), and the file rewritten once
    record = first.by_serial(carol)
    assert record is not None and record.not_before == load(
        pki / "issued" / "carol.crt"
    ).not_valid_before_utc.replace(microsecond=0)
    lines = sorted(meta.read_text().splitlines())
    assert [line.split("\t")[:3] for line in lines] == sorted(
        [[carol, "carol", "client"], [alice, "alice", "client"]]
    )
    assert (pki / ".certwarden" / "meta.version").read_text() == "2\n"
